"""Build the test binaries from the pinned Go modules in testbin/, once per pin.

Each component is a small Go module whose go.mod/go.sum pin exactly one upstream release:

    etcd        go.etcd.io/etcd/server/v3 (a tiny main calling etcdmain)
    kubernetes  kube-apiserver, kube-controller-manager, kubectl from k8s.io/kubernetes
    restic      github.com/restic/restic/cmd/restic
    helm        helm.sh/helm/v3/cmd/helm
    toxiproxy   github.com/Shopify/toxiproxy/v2/cmd/server (the soak's fault proxy)
    prometheus  github.com/prometheus/prometheus/cmd/promtool (checks and unit-tests the chart's alerts)

Binaries go to a cache outside the checkout ($RESTIC_MANAGER_CACHE, default
~/.cache/restic-manager/testbin/<component>-<key>), keyed by a hash of the component's files
and the Go version, so a fresh clone reuses them and only a changed pin rebuilds. The
checkout's .local/bin gets symlinks to the current builds.

    python3 testbin/build.py            # build what is missing, link .local/bin
    python3 testbin/build.py restic     # only some components
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
LOCAL_BIN = REPO / ".local" / "bin"


@dataclass(frozen=True)
class Component:
    name: str
    module: str  # the pinned upstream module whose version the go.mod requires
    packages: tuple[str, ...]
    ldflags: tuple[str, ...]  # "-X" targets; {version} is the pinned version


COMPONENTS = (
    Component("etcd", "go.etcd.io/etcd/server/v3", (".",), ()),
    Component(
        "kubernetes",
        "k8s.io/kubernetes",
        (
            "k8s.io/kubernetes/cmd/kube-apiserver",
            "k8s.io/kubernetes/cmd/kube-controller-manager",
            "k8s.io/kubernetes/cmd/kubectl",
        ),
        (
            "k8s.io/component-base/version.gitVersion={version}",
            "k8s.io/component-base/version.gitMajor={major}",
            "k8s.io/component-base/version.gitMinor={minor}",
            "k8s.io/component-base/version.gitTreeState=clean",
            "k8s.io/client-go/pkg/version.gitVersion={version}",
        ),
    ),
    Component("restic", "github.com/restic/restic", ("github.com/restic/restic/cmd/restic",), ("main.version={bare}",)),
    Component("helm", "helm.sh/helm/v3", ("helm.sh/helm/v3/cmd/helm",), ("helm.sh/helm/v3/internal/version.version={version}",)),
    Component("toxiproxy", "github.com/Shopify/toxiproxy/v2", ("github.com/Shopify/toxiproxy/v2/cmd/server",),
              ("github.com/Shopify/toxiproxy/v2.Version={version}",)),
    Component("prometheus", "github.com/prometheus/prometheus", ("github.com/prometheus/prometheus/cmd/promtool",),
              ("github.com/prometheus/common/version.Version={bare}",)),
)
# etcd's main package is the module itself, toxiproxy's is called server: name their binaries.
BINARY_NAMES = {("etcd", "."): "etcd", ("toxiproxy", "github.com/Shopify/toxiproxy/v2/cmd/server"): "toxiproxy-server"}


class BuildError(RuntimeError):
    pass


def cache_root() -> Path:
    configured = os.environ.get("RESTIC_MANAGER_CACHE")
    return Path(configured) if configured else Path.home() / ".cache" / "restic-manager"


@functools.cache
def go_version() -> str:
    if shutil.which("go") is None:
        raise BuildError(
            "Go is not installed or not on PATH: the test binaries (etcd, kube-apiserver, "
            "kube-controller-manager, kubectl, restic, helm, toxiproxy, promtool) are built from pinned Go "
            "modules. Install Go >= 1.26.7 (e.g. `apt-get install golang-go` or from go.dev) and run again."
        )
    return subprocess.run(["go", "env", "GOVERSION"], check=True, capture_output=True, text=True).stdout.strip()


def pinned_version(component: Component) -> str:
    gomod = (HERE / component.name / "go.mod").read_text()
    match = re.search(rf"^\s*(?:require\s+)?{re.escape(component.module)}\s+(v\S+)", gomod, re.M)
    if not match:
        raise BuildError(f"testbin/{component.name}/go.mod does not require {component.module}")
    return match[1]


def cache_key(component: Component, go: str) -> str:
    digest = hashlib.sha256(go.encode())
    for path in sorted((HERE / component.name).iterdir()):
        if path.is_file():
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    digest.update(repr(component).encode())
    return digest.hexdigest()[:16]


def binary_name(component: Component, package: str) -> str:
    return BINARY_NAMES.get((component.name, package), package.rsplit("/", 1)[-1])


def output_dir(component: Component, go: str) -> Path:
    return cache_root() / "testbin" / f"{component.name}-{pinned_version(component)}-{cache_key(component, go)}"


def ldflags(component: Component) -> str:
    version = pinned_version(component)
    numbers = re.match(r"v(\d+)\.(\d+)", version)
    values = {
        "version": version,
        "bare": version.lstrip("v"),
        "major": numbers[1] if numbers else "",
        "minor": numbers[2] if numbers else "",
    }
    return " ".join(["-s", "-w", *(f"-X {flag.format(**values)}" for flag in component.ldflags)])


def build(component: Component, go: str) -> Path:
    target = output_dir(component, go)
    if all((target / binary_name(component, p)).is_file() for p in component.packages):
        return target
    print(f"testbin: building {component.name} {pinned_version(component)} (first build is slow; cached in {target})", flush=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{component.name}-", dir=target.parent))
    env = {**os.environ, "GOTOOLCHAIN": "local", "CGO_ENABLED": "0", "GOFLAGS": "-mod=readonly"}
    started = time.monotonic()
    try:
        for package in component.packages:
            command = ["go", "build", "-v", "-trimpath", f"-ldflags={ldflags(component)}",
                       "-o", str(staging / binary_name(component, package)), package]
            run_with_progress(command, cwd=HERE / component.name, env=env, label=f"{component.name}/{binary_name(component, package)}")
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"testbin: {component.name} built in {time.monotonic() - started:.0f}s", flush=True)
    return target


def run_with_progress(command: list[str], *, cwd: Path, env: dict[str, str], label: str) -> None:
    """Run `go build -v`, turning its package list into a progress line every 15 seconds."""
    process = subprocess.Popen(command, cwd=cwd, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    assert process.stderr is not None
    compiled, last_report, errors = 0, time.monotonic(), []
    for line in process.stderr:
        if line.startswith(("#", " ", "\t")) or ":" in line:
            errors.append(line.rstrip())
        else:
            compiled += 1
        if time.monotonic() - last_report >= 15:
            print(f"testbin:   {label}: {compiled} packages compiled so far", flush=True)
            last_report = time.monotonic()
    if process.wait() != 0:
        raise BuildError(f"go build of {label} failed:\n" + "\n".join(errors[-40:]))


def link(component: Component, directory: Path) -> None:
    LOCAL_BIN.mkdir(parents=True, exist_ok=True)
    for package in component.packages:
        name = binary_name(component, package)
        # Replace atomically: several test processes may link at once.
        temporary = LOCAL_BIN / f".{name}.{os.getpid()}"
        temporary.unlink(missing_ok=True)
        temporary.symlink_to(directory / name)
        os.replace(temporary, LOCAL_BIN / name)


def ensure(names: list[str] | None = None) -> dict[str, Path]:
    """Build (if needed) and return {binary name: path} for the chosen components."""
    go = go_version()
    wanted = [c for c in COMPONENTS if not names or c.name in names]
    unknown = set(names or ()) - {c.name for c in COMPONENTS}
    if unknown:
        raise BuildError(f"unknown component(s) {sorted(unknown)}; choose from {[c.name for c in COMPONENTS]}")
    paths: dict[str, Path] = {}
    for component in wanted:
        directory = build(component, go)
        link(component, directory)
        paths.update({binary_name(component, p): directory / binary_name(component, p) for p in component.packages})
    return paths


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("components", nargs="*", help="subset of: " + ", ".join(c.name for c in COMPONENTS))
    parser.add_argument("--print", action="store_true", help="print name=path for each binary")
    args = parser.parse_args()
    try:
        paths = ensure(args.components)
    except BuildError as error:
        print(f"testbin: {error}", file=sys.stderr)
        return 1
    if args.print:
        for name, path in paths.items():
            print(f"{name}={path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
