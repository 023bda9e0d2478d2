"""The tooling that builds the test binaries: pins, cache keys, the Go-missing message."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def load(name: str):  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location(f"testbin_{name}", REPO / "testbin" / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


build = load("build")
kube_gomod = load("kube_gomod")

UPSTREAM = """module k8s.io/kubernetes

go 1.26.0

require (
\tk8s.io/api v0.0.0
\tk8s.io/client-go v0.0.0
)

replace (
\tk8s.io/api => ./staging/src/k8s.io/api
\tk8s.io/client-go => ./staging/src/k8s.io/client-go
\tk8s.io/cri-streaming => ./staging/src/k8s.io/cri-streaming
)
"""


def test_kube_gomod_replaces_every_staging_module_with_the_matching_release() -> None:
    rendered = kube_gomod.render("v1.36.3", UPSTREAM)
    assert "require k8s.io/kubernetes v1.36.3" in rendered
    assert "\tk8s.io/api => k8s.io/api v0.36.3" in rendered
    assert "\tk8s.io/client-go => k8s.io/client-go v0.36.3" in rendered
    assert "\tk8s.io/cri-streaming => k8s.io/cri-streaming v0.36.3" in rendered
    assert "go 1.26.0" in rendered
    assert "tool k8s.io/kubernetes/cmd/kube-apiserver" in rendered


def test_kube_gomod_refuses_a_version_that_is_not_a_release() -> None:
    with pytest.raises(SystemExit, match="is not a Kubernetes release"):
        kube_gomod.render("1.36", UPSTREAM)


def test_the_committed_kubernetes_pin_matches_its_generator() -> None:
    gomod = (REPO / "testbin" / "kubernetes" / "go.mod").read_text()
    assert build.pinned_version(build.COMPONENTS[1]) == "v1.36.3"
    # every staging module is pinned to the release's v0.X.Y, none left at v0.0.0
    assert "=> k8s.io/api v0.36.3" in gomod
    assert " v0.0.0\n" not in gomod


def test_missing_go_fails_with_a_message_that_says_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    build.go_version.cache_clear()
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(build.BuildError, match="Go is not installed or not on PATH.*Install Go >= 1.26"):
        build.go_version()
    build.go_version.cache_clear()


def test_the_cache_key_follows_the_pins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    component = build.Component("restic", "github.com/restic/restic", ("github.com/restic/restic/cmd/restic",), ())
    (tmp_path / "restic").mkdir()
    gomod = tmp_path / "restic" / "go.mod"
    gomod.write_text("module x\n\nrequire github.com/restic/restic v0.19.1\n")
    monkeypatch.setattr(build, "HERE", tmp_path)
    first = build.cache_key(component, "go1.26.8")
    assert build.cache_key(component, "go1.26.8") == first
    assert build.cache_key(component, "go1.26.9") != first
    gomod.write_text("module x\n\nrequire github.com/restic/restic v0.19.2\n")
    assert build.cache_key(component, "go1.26.8") != first
    assert build.output_dir(component, "go1.26.8").name.startswith("restic-v0.19.2-")


def test_every_pinned_module_in_testbin_is_a_component_whose_packages_it_declares() -> None:
    directories = {gomod.parent.name for gomod in (REPO / "testbin").glob("*/go.mod")}
    assert directories == {component.name for component in build.COMPONENTS}
    for component in build.COMPONENTS:
        build.pinned_version(component)  # the go.mod requires the module
        gomod = (REPO / "testbin" / component.name / "go.mod").read_text()
        for package in component.packages:
            assert package == "." or f"tool {package}\n" in gomod, f"testbin/{component.name}: no tool line for {package}"
    (prometheus,) = [component for component in build.COMPONENTS if component.name == "prometheus"]
    assert build.pinned_version(prometheus) == "v0.316.0"
    assert build.binary_name(prometheus, prometheus.packages[0]) == "promtool"
