"""The `world` fixture of the end-to-end tests (the harness is in harness.py)."""

from __future__ import annotations

import threading
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from e2e.harness import Receiver, World


@pytest.fixture
def world(kube: Any, namespace: str, tmp_path: Path, restic_bin: Path) -> Iterator[World]:
    here = World(kube=kube, namespace=namespace, directory=tmp_path, restic=restic_bin)
    try:
        yield here
    finally:
        here.close()


@pytest.fixture
def faults(tmp_path: Path) -> Iterator[Any]:
    """A Toxiproxy server (testbin/toxiproxy.py) whose proxies a test breaks like a network."""
    from toxiproxy import Toxiproxy, ToxiproxyError  # testbin/, on the path from tests/conftest.py
    from build import BuildError

    try:
        server = Toxiproxy(log=tmp_path / "toxiproxy.log")
        server.start()
    except (BuildError, ToxiproxyError) as error:
        pytest.fail(f"the fault proxy cannot run: {error}", pytrace=False)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    made = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            split = urllib.parse.urlsplit(self.path)
            with made.arrived:
                made.hits.append(("POST", split.path, dict(urllib.parse.parse_qsl(split.query)), body))
                made.arrived.notify_all()
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    made.url = f"http://127.0.0.1:{server.server_address[1]}"
    serving = threading.Thread(target=server.serve_forever, daemon=True)
    serving.start()
    try:
        yield made
    finally:
        server.shutdown()
        server.server_close()
