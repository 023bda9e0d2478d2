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
