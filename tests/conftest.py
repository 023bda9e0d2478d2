"""Fixtures shared by every test: the pinned test binaries and, for integration tests, the
real control plane (see tests/support/controlplane.py)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _testbin():
    spec = importlib.util.spec_from_file_location("testbin_build", REPO / "testbin" / "build.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["testbin_build"] = module
    spec.loader.exec_module(module)
    return module


def ensure_binaries(*components: str) -> dict[str, Path]:
    """Build the components (once per pin; cached outside the checkout) and return {binary: path}."""
    build = _testbin()
    try:
        return build.ensure(list(components))
    except build.BuildError as error:
        pytest.fail(str(error), pytrace=False)


@pytest.fixture(scope="session")
def restic_bin() -> Path:
    """The real restic binary, built from testbin/restic's pinned module."""
    return ensure_binaries("restic")["restic"]
