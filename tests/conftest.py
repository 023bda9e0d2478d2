"""Fixtures shared by every test: the pinned test binaries and the real control plane.

Integration tests get a fresh local control plane (etcd, kube-apiserver,
kube-controller-manager; testbin/controlplane.py) once per session. Given
`--kubeconfig PATH`, or `--use-kubeconfig-env` with KUBECONFIG set, they run against that
existing cluster instead (kind on a laptop, say): the CRDs are applied there and nothing is
started.
"""

from __future__ import annotations

import os
import shutil
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


# testbin/ is a folder of scripts, not a package; its scripts import each other the same way.
sys.path.insert(0, str(REPO / "testbin"))
import build  # noqa: E402
import controlplane  # noqa: E402


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("restic-manager")
    group.addoption("--kubeconfig", metavar="PATH", help="run integration tests against this existing cluster")
    group.addoption("--use-kubeconfig-env", action="store_true",
                    help="run integration tests against the cluster in $KUBECONFIG")


def ensure_binaries(*components: str) -> dict[str, Path]:
    """Build the components (once per pin; cached outside the checkout) and return {binary: path}."""
    try:
        return build.ensure(list(components))
    except build.BuildError as error:
        pytest.fail(str(error), pytrace=False)


@pytest.fixture(scope="session")
def restic_bin() -> Path:
    """The real restic binary, built from testbin/restic's pinned module."""
    return ensure_binaries("restic")["restic"]


@pytest.fixture(scope="session")
def promtool_bin() -> Path:
    """The real promtool, built from testbin/prometheus's pinned module."""
    return ensure_binaries("prometheus")["promtool"]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):
    report = yield
    if report.failed:
        item.session.stash[_FAILED] = True
    return report


_FAILED = pytest.StashKey[bool]()


def _existing_kubeconfig(config: pytest.Config) -> Path | None:
    if config.getoption("--kubeconfig"):
        return Path(config.getoption("--kubeconfig")).expanduser()
    if config.getoption("--use-kubeconfig-env"):
        if not os.environ.get("KUBECONFIG"):
            raise pytest.UsageError("--use-kubeconfig-env needs KUBECONFIG to be set")
        return Path(os.environ["KUBECONFIG"].split(os.pathsep)[0]).expanduser()
    return None


@pytest.fixture(scope="session")
def kube(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """A cluster with the CRDs installed: `.kubeconfig`, `.kubectl(*args, input=, check=)`."""
    directory = tmp_path_factory.mktemp("controlplane")
    existing = _existing_kubeconfig(request.config)
    if existing is not None:
        cluster = controlplane.Cluster(kubeconfig=existing, directory=directory)
        cluster.install_crds()
        yield cluster
        return
    plane = controlplane.ControlPlane(directory=directory, kubeconfig=directory / "kubeconfig")
    try:
        plane.start()
    except (controlplane.ControlPlaneError, build.BuildError) as error:
        plane.stop()
        pytest.fail(f"control plane did not start: {error}", pytrace=False)
    yield plane
    plane.stop()
    if request.session.stash.get(_FAILED, False):
        print(f"\ncontrol plane logs kept in {plane.logs}")
    else:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def namespace(kube, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace per test, deleted afterwards (without waiting for it to go)."""
    stem = "".join(c if c.isalnum() else "-" for c in request.node.name.lower())[:40].strip("-")
    name = f"{stem}-{uuid.uuid4().hex[:6]}"
    kube.kubectl("create", "namespace", name)
    yield name
    kube.kubectl("delete", "namespace", name, "--wait=false", check=False)
