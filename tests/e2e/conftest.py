"""The `world` fixture of the end-to-end tests (the harness is in harness.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from e2e.harness import World


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
