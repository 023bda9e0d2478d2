"""toxiproxy-server (built from testbin/toxiproxy's pinned module) and its HTTP API: TCP
proxies on loopback that a test or the soak turns into a bad network on demand.

    with Toxiproxy(log=path) as faults:
        port = faults.proxy("apiserver", upstream_port)   # point a client at 127.0.0.1:port
        faults.fault("apiserver", "partition")              # or latency, timeout, reset_peer, bandwidth
        faults.heal("apiserver")
"""

from __future__ import annotations

import json
import random
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import build

KINDS = ("latency", "timeout", "reset_peer", "bandwidth", "partition")
STARTUP_TIMEOUT = 30.0


class ToxiproxyError(RuntimeError):
    pass


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Toxiproxy:
    def __init__(self, *, log: Path) -> None:
        self.binary = build.ensure(["toxiproxy"])["toxiproxy-server"]
        self.port = _free_port()
        self.log = log
        self._process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Toxiproxy:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self._process = subprocess.Popen([str(self.binary), "-host", "127.0.0.1", "-port", str(self.port)],
                                             stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            try:
                self._call("GET", "/version")
                return
            except (ToxiproxyError, OSError):
                if time.monotonic() > deadline or self._process.poll() is not None:
                    raise ToxiproxyError(f"toxiproxy-server did not answer; see {self.log}") from None
                time.sleep(0.1)

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait()

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                text = response.read().decode()
                kind = response.headers.get_content_type()
        except urllib.error.HTTPError as error:
            raise ToxiproxyError(f"toxiproxy {method} {path}: {error.code} {error.read().decode()}") from None
        except urllib.error.URLError as error:
            raise ToxiproxyError(f"toxiproxy {method} {path}: {error.reason}") from None
        return json.loads(text) if text and kind == "application/json" else text

    def proxy(self, name: str, upstream_port: int) -> int:
        """A proxy named ``name`` to 127.0.0.1:``upstream_port``; returns the port it listens on."""
        port = _free_port()
        self._call("POST", "/proxies", {"name": name, "listen": f"127.0.0.1:{port}",
                                        "upstream": f"127.0.0.1:{upstream_port}", "enabled": True})
        return port

    def fault(self, name: str, kind: str, rng: random.Random | None = None, *,
              attributes: dict[str, int] | None = None) -> str:
        """Turn proxy ``name`` bad in the way ``kind`` says, until :meth:`heal`; returns what it
        did, for the record. A partition closes its connections and refuses new ones; the
        other kinds are toxics on both directions, with ``attributes`` or random ones
        (``timeout`` 0 is a peer that never answers)."""
        if kind not in KINDS:
            raise ToxiproxyError(f"unknown fault {kind!r}; choose from {KINDS}")
        if kind == "partition":
            self._call("POST", f"/proxies/{name}", {"enabled": False})
            return "partition"
        rng = rng or random.Random()
        attributes = attributes or {
            "latency": {"latency": rng.randint(300, 2000), "jitter": rng.randint(0, 500)},  # ms
            "timeout": {"timeout": rng.randint(500, 3000)},    # data stops; closed after this many ms
            "reset_peer": {"timeout": rng.randint(0, 1000)},   # a TCP reset after this many ms
            "bandwidth": {"rate": rng.randint(1, 8)},          # KB/s
        }[kind]
        for stream in ("upstream", "downstream"):
            self._call("POST", f"/proxies/{name}/toxics",
                       {"name": f"{kind}-{stream}", "type": kind, "stream": stream, "attributes": attributes})
        return f"{kind} {attributes}"

    def heal(self, name: str) -> None:
        self._call("POST", f"/proxies/{name}", {"enabled": True})
        for toxic in self._call("GET", f"/proxies/{name}/toxics"):
            self._call("DELETE", f"/proxies/{name}/toxics/{toxic['name']}")
