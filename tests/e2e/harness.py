"""End-to-end harness: the real control plane, `restic-manager operator` and `restic-manager
agent` as subprocesses, real restic, and a namespace per test.

    def test_x(world):
        world.start_operator()
        agent = world.add_agent("web-01")          # Agent resource, token, process
        world.apply(schedule_yaml)
        world.wait("schedule/nightly", "condition=Applied")

Every process a test starts is stopped when it ends; their logs stay in the test's
tmp_path (named in assertion messages) so a failure can be read.

The operator serves plain ws:// (--insecure-listen) unless started with ``tls=`` (a
:class:`Certificates` from :func:`make_certificates`): then agents connect over wss://,
verifying it against that CA.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import shutil
import textwrap
import threading
import time
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
RESTIC_MANAGER = Path(sys.executable).parent / "restic-manager"
PASSWORD = "e2e-repository-password"
WAIT = 60  # seconds any single expectation may take on a loaded two-core machine
T = TypeVar("T")


@dataclass(frozen=True)
class Certificates:
    """A CA and a serving certificate it signed, for 127.0.0.1 and localhost."""

    ca: Path
    cert: Path
    key: Path


def make_certificates(directory: Path, *, name: str = "operator") -> Certificates:
    """A fresh CA and a certificate for 127.0.0.1/localhost (openssl, as the control plane's)."""
    if shutil.which("openssl") is None:
        pytest.fail("openssl is needed for the TLS tests: apt-get install openssl", pytrace=False)
    directory.mkdir(parents=True, exist_ok=True)

    def openssl(*args: str) -> None:
        result = subprocess.run(["openssl", *args], cwd=directory, capture_output=True, text=True)
        assert result.returncode == 0, f"openssl {' '.join(args[:2])}: {result.stderr}"

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}-test-ca",
            "-keyout", f"{name}-ca.key", "-out", f"{name}-ca.crt")
    (directory / f"{name}.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", f"{name}.key",
            "-out", f"{name}.csr")
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{name}-ca.crt", "-CAkey", f"{name}-ca.key",
            "-CAcreateserial", "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.crt")
    return Certificates(directory / f"{name}-ca.crt", directory / f"{name}.crt", directory / f"{name}.key")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def fires_ahead(lead: float, count: int = 1) -> tuple[str, list[datetime]]:
    """A cron expression for ``count`` fire times two seconds apart, the first ``lead``
    seconds or more ahead and all in one minute, and then none for a day: no later fire of
    the Schedule can take their place in an agent's outbox (newest only) while a test's
    outage or restart settles."""
    first = datetime.now(timezone.utc).replace(microsecond=0) + timedelta(seconds=lead)
    if first.second + 2 * (count - 1) > 59:
        first = first.replace(second=0) + timedelta(minutes=1)
    times = [first + timedelta(seconds=2 * k) for k in range(count)]
    return f"{','.join(str(t.second) for t in times)} {first.minute} {first.hour} * * *", times


def fail_if_past(moment: datetime, what: str) -> None:
    """End a test whose setup took past the fire time it was to come before."""
    if datetime.now(timezone.utc) >= moment:
        pytest.fail(f"{what} took past the fire time {moment}", pytrace=False)


def eventually(what: str, probe: Callable[[], T | None], *, timeout: float = WAIT, interval: float = 0.25) -> T:
    """Poll ``probe`` (an API read) until it returns something truthy; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


@dataclass
class Process:
    """One `restic-manager` subprocess with its log file."""

    name: str
    argv: list[str]
    log: Path
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        assert self.popen is None or self.popen.poll() is not None, f"{self.name} is already running"
        with open(self.log, "ab") as log:
            log.write(f"--- start {datetime.now().isoformat()} ---\n".encode())
            log.flush()
            self.popen = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          cwd=REPO)

    def stop(self, *, timeout: float = 20) -> None:
        """SIGTERM and wait: a clean shutdown."""
        if self.popen is None or self.popen.poll() is not None:
            return
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()
            pytest.fail(f"{self.name} did not stop within {timeout}s of SIGTERM; see {self.log}")

    def kill(self) -> None:
        """SIGKILL: as if the host died (children in their own sessions, like restic, live on)."""
        if self.popen is not None and self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def output(self) -> str:
        return self.log.read_text(errors="replace")


class Proxy:
    """A TCP relay between agents and the operator that a test can cut like a network.

    ``relayed`` holds the moment each connection reached the operator, which says exactly
    when an agent was back.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.relayed: list[datetime] = []
        self._open = threading.Event()
        self._open.set()
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._closed = False
        self._thread = threading.Thread(target=self._accept, name="proxy", daemon=True)
        self._thread.start()

    def cut(self) -> None:
        """Drop every relayed connection and refuse new ones until ``restore``."""
        self._open.clear()
        with self._lock:
            for sock in self._sockets:
                _close(sock)
            self._sockets.clear()

    def restore(self) -> None:
        self._open.set()

    def relayed_after(self, moment: datetime) -> datetime | None:
        """When the first connection after ``moment`` reached the operator, if one has."""
        with self._lock:
            return next((at for at in self.relayed if at > moment), None)

    def close(self) -> None:
        self._closed = True
        self.cut()
        _close(self.listener)

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if not self._open.is_set():
                _close(client)
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                _close(client)
                continue
            with self._lock:
                self._sockets += [client, upstream]
                self.relayed.append(datetime.now(timezone.utc))
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=_pump, args=(source, sink), daemon=True).start()


def _pump(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        _close(source)
        _close(sink)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


@dataclass
class World:
    """One test's namespace, operator, agents and repository."""

    kube: Any
    namespace: str
    directory: Path
    restic: Path
    operator_port: int = field(default_factory=free_port)
    operator: Process | None = None
    tls: Certificates | None = None  # the operator's, once started with TLS
    agents: dict[str, Process] = field(default_factory=dict)
    proxies: list[Proxy] = field(default_factory=list)
    holds: list[Path] = field(default_factory=list)

    # --- kubectl ----------------------------------------------------------------------------

    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.kube.kubectl("-n", self.namespace, *args, input=input, check=check)

    def apply(self, manifest: str) -> None:
        self.kubectl("apply", "-f", "-", input=textwrap.dedent(manifest))

    def get(self, resource: str, *, check: bool = True) -> dict[str, Any] | None:
        result = self.kubectl("get", resource, "-o", "json", check=check)
        return json.loads(result.stdout) if result.returncode == 0 else None

    def items(self, kind: str) -> list[dict[str, Any]]:
        return json.loads(self.kubectl("get", kind, "-o", "json").stdout)["items"]

    def wait(self, resource: str, condition: str, *, timeout: int = WAIT) -> None:
        """``kubectl wait --for=<condition>``: a watch, not a poll."""
        result = self.kubectl("wait", f"--for={condition}", f"--timeout={timeout}s", resource, check=False)
        if result.returncode != 0:
            pytest.fail(f"{resource} never reached {condition}: {result.stderr.strip()}\n"
                        f"now: {json.dumps((self.get(resource, check=False) or {}).get('status'), indent=1)}\n"
                        f"{self.logs()}")

    def jobs(self, schedule: str | None = None) -> list[dict[str, Any]]:
        jobs = self.items("resticjobs")
        if schedule is not None:
            jobs = [j for j in jobs if j["spec"].get("scheduleRef", {}).get("name") == schedule]
        return sorted(jobs, key=lambda j: j["spec"].get("scheduledAt", j["metadata"]["creationTimestamp"]))

    def events(self, reason: str) -> list[dict[str, Any]]:
        return [e for e in self.items("events") if e.get("reason") == reason]

    def logs(self) -> str:
        names = [p.log for p in ([self.operator] if self.operator else []) + list(self.agents.values())]
        return "logs: " + ", ".join(str(n) for n in names)

    # --- processes --------------------------------------------------------------------------

    def start_operator(self, *, tls: Certificates | None = None, extra: Sequence[str] = (),
                       kubeconfig: Path | None = None) -> Process:
        """Start (or restart) the operator; ``tls``, ``extra`` and ``kubeconfig`` (the cluster's
        by default) count on the first start."""
        if self.operator is None:
            self.tls = tls
            serving = ["--tls-cert-file", str(tls.cert), "--tls-key-file", str(tls.key)] if tls else ["--insecure-listen"]
            self.operator = Process("operator", [
                str(RESTIC_MANAGER), "operator", "--kubeconfig", str(kubeconfig or self.kube.kubeconfig),
                "--listen", f"127.0.0.1:{self.operator_port}", "--namespace", self.namespace, *serving, *extra,
            ], self.directory / "operator.log")
        self.operator.start()
        return self.operator

    @property
    def server_url(self) -> str:
        return f"{'wss' if self.tls else 'ws'}://127.0.0.1:{self.operator_port}/agent"

    def add_agent(self, name: str, *, labels: dict[str, str] | None = None, start: bool = True,
                  restic: Path | None = None, via: Proxy | None = None, extra: Sequence[str] = ()) -> Process:
        """Create the Agent resource, fetch its token, and start its agent process."""
        self.apply(json.dumps({"apiVersion": "resticmanager.io/v1alpha1", "kind": "Agent",
                               "metadata": {"name": name, "labels": labels or {}}, "spec": {}}))
        token_file = self.directory / f"{name}.token"
        token_file.write_text(self.token(name))
        port = via.port if via is not None else self.operator_port
        if self.tls is not None:
            server = [f"wss://127.0.0.1:{port}/agent", "--ca-file", str(self.tls.ca)]
        else:
            server = [f"ws://127.0.0.1:{port}/agent", "--insecure"]
        agent = Process(f"agent {name}", [
            str(RESTIC_MANAGER), "agent", "--server", *server, *extra,
            "--token-file", str(token_file), "--state-dir", str(self.directory / f"{name}-state"),
            "--agent-name", name, "--restic", str(restic or self.restic),
        ], self.directory / f"agent-{name}.log")
        self.agents[name] = agent
        if start:
            agent.start()
        return agent

    def outbox(self, agent: str) -> list[dict[str, Any]]:
        """The frames agent ``agent`` keeps in its state file to send, as it last saved them."""
        path = self.directory / f"{agent}-state" / "state.json"
        try:
            outbox = json.loads(path.read_text())["outbox"]
        except FileNotFoundError:
            return []
        return [json.loads(frame) if isinstance(frame, str) else frame for frame in outbox]

    def token(self, agent: str) -> str:
        self.wait(f"agent/{agent}", "jsonpath={.status.tokenSecretName}")
        secret = self.get(f"secret/{agent}-agent-token")
        assert secret is not None
        return base64.b64decode(secret["data"]["token"]).decode()

    def apiserver_through(self, faults: Any) -> Path:
        """A kubeconfig that reaches the apiserver through a Toxiproxy proxy named "apiserver"
        (``faults``, a testbin/toxiproxy.py Toxiproxy), for an operator whose API link a test
        breaks."""
        config = yaml.safe_load(self.kube.kubeconfig.read_text())
        server = config["clusters"][0]["cluster"]["server"]
        address = urllib.parse.urlsplit(server)
        if address.hostname not in ("127.0.0.1", "localhost"):
            pytest.fail(f"the apiserver at {server} is not on this machine: its link cannot be proxied here",
                        pytrace=False)
        port = faults.proxy("apiserver", address.port or 443)
        config["clusters"][0]["cluster"]["server"] = f"{address.scheme}://127.0.0.1:{port}"
        path = self.directory / "operator.kubeconfig"
        path.write_text(yaml.safe_dump(config))
        return path

    def proxy(self) -> Proxy:
        relay = Proxy(self.operator_port)
        self.proxies.append(relay)
        return relay

    def close(self) -> None:
        for agent in self.agents.values():
            agent.stop()
        if self.operator is not None:
            self.operator.stop()
        for relay in self.proxies:
            relay.close()
        for hold in self.holds:  # lets held (possibly orphaned) restic processes end
            hold.unlink(missing_ok=True)

    # --- a repository -----------------------------------------------------------------------

    def repository(self, name: str = "local") -> Path:
        """A restic repository in a local directory, its password Secret and Repository."""
        path = self.directory / f"repo-{name}"
        self.run_restic(path, "init")
        self.apply(f"""
            apiVersion: v1
            kind: Secret
            metadata: {{name: {name}-password, labels: {{resticmanager.io/repository-secret: "true"}}}}
            stringData: {{password: {PASSWORD}}}
            ---
            apiVersion: resticmanager.io/v1alpha1
            kind: Repository
            metadata: {{name: {name}}}
            spec:
              url: {path}
              passwordSecretRef: {{name: {name}-password, key: password}}
        """)
        return path

    def run_restic(self, repository: Path, *args: str) -> str:
        env = {**os.environ, "RESTIC_PASSWORD": PASSWORD, "RESTIC_REPOSITORY": str(repository),
               "RESTIC_CACHE_DIR": str(self.directory / "restic-cache")}
        result = subprocess.run([str(self.restic), *args], env=env, capture_output=True, text=True, check=False)
        assert result.returncode == 0, f"restic {' '.join(args)}: {result.stderr}"
        return result.stdout

    def snapshot_ids(self, repository: Path) -> set[str]:
        return {s["id"] for s in json.loads(self.run_restic(repository, "snapshots", "--json"))}

    def source_tree(self) -> Path:
        tree = self.directory / "data"
        (tree / "etc").mkdir(parents=True, exist_ok=True)
        (tree / "etc" / "hosts").write_text("127.0.0.1 localhost\n")
        (tree / "notes.txt").write_text("what the backups are of\n")
        return tree

    def backup_job(self, name: str, tree: Path, *, agent: str = "web-01") -> None:
        """A kubectl-made ResticJob that backs ``tree`` up to the ``local`` repository."""
        self.apply(f"""
            apiVersion: resticmanager.io/v1alpha1
            kind: ResticJob
            metadata: {{name: {name}}}
            spec: {{agent: {agent}, repository: local, type: backup, backup: {{paths: [{tree}]}}}}
        """)

    def failing_restic(self) -> tuple[Path, Path]:
        """A restic whose backups fail (exit 1, as restic does on a fatal error) while the flag
        file it comes with exists; everything else is real restic."""
        flag = self.directory / "fail-backups"
        flag.touch()
        wrapper = self.directory / "failing-restic"
        wrapper.write_text(textwrap.dedent(f"""\
            #!{sys.executable}
            import os, sys
            if "backup" in sys.argv[1:] and os.path.exists({str(flag)!r}):
                sys.stderr.write("Fatal: unable to open the source: disk not mounted\\n")
                sys.exit(1)
            os.execv({str(self.restic)!r}, [{str(self.restic)!r}, *sys.argv[1:]])
        """))
        wrapper.chmod(0o755)
        return wrapper, flag

    def held_restic(self, *, after_backup: bool = False) -> Path:
        """A restic that holds every backup until the test ends: before starting it, or, with
        ``after_backup``, once restic has saved its snapshot and before the agent sees it end.

        It is real restic (exec'd after the hold, or run before it), so a job stays Running
        for as long as a test needs it to, and a cancel (SIGINT to its process group) ends it
        like restic.
        """
        hold = self.directory / ("hold-reports" if after_backup else "hold-backups")
        hold.touch()
        self.holds.append(hold)
        wrapper = self.directory / ("slow-to-exit-restic" if after_backup else "held-restic")
        wrapper.write_text(textwrap.dedent(f"""\
            #!{sys.executable}
            import os, subprocess, sys, time
            def hold():
                while os.path.exists({str(hold)!r}):
                    time.sleep(0.05)
            if "backup" in sys.argv[1:] and {after_backup!r}:
                code = subprocess.call([{str(self.restic)!r}, *sys.argv[1:]])
                hold()
                sys.exit(code)
            if "backup" in sys.argv[1:]:
                hold()
            os.execv({str(self.restic)!r}, [{str(self.restic)!r}, *sys.argv[1:]])
        """))
        wrapper.chmod(0o755)
        return wrapper


@dataclass
class Receiver:
    """Every request it got: (method, path, query, body), in order."""

    url: str = ""
    hits: list[tuple[str, str, dict[str, str], bytes]] = field(default_factory=list)
    arrived: threading.Condition = field(default_factory=threading.Condition)

    def wait_for(self, what: str, test: Any) -> tuple[str, str, dict[str, str], bytes]:
        with self.arrived:
            if not self.arrived.wait_for(lambda: next((hit for hit in self.hits if test(hit)), None), timeout=WAIT):
                pytest.fail(f"the receiver never got {what}; it got {self.hits}")
            return next(hit for hit in self.hits if test(hit))
