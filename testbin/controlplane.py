"""A real, local Kubernetes control plane for tests and the demo: etcd, kube-apiserver and
kube-controller-manager on free loopback ports, built from the pins in testbin/.

The apiserver runs with generated certificates (openssl), RBAC authorization, a
service-account issuer and signing key (so TokenRequest and TokenReview work) and an admin
client-certificate kubeconfig. The controller-manager runs the garbage collector, job,
cronjob, namespace and service-account controllers. The CRDs in crds/ are installed and
established before `start()` returns.

    python3 testbin/controlplane.py up      # what `make cluster` runs; kubeconfig in .local/kubeconfig
    python3 testbin/controlplane.py down    # what `make cluster-down` runs

The pytest fixtures in tests/conftest.py use the same `ControlPlane` class.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
import build  # noqa: E402  (testbin/build.py, next to this file)

CRDS = REPO / "crds"
STARTUP_TIMEOUT = 120.0
KCM_ATTEMPTS = 3
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"


class ControlPlaneError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def openssl(*args: str, cwd: Path) -> None:
    result = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        raise ControlPlaneError(f"openssl {' '.join(args[:2])} failed: {result.stderr.strip()}")


def make_certificates(pki: Path) -> None:
    """A CA, the apiserver's serving certificate, an admin client certificate and the
    service-account key pair."""
    if shutil.which("openssl") is None:
        raise ControlPlaneError("openssl is needed to make the control plane's certificates: apt-get install openssl")
    pki.mkdir(parents=True, exist_ok=True)
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "3650", "-subj", "/CN=restic-manager-test-ca",
            "-keyout", "ca.key", "-out", "ca.crt", cwd=pki)
    (pki / "server.ext").write_text(
        "subjectAltName=IP:127.0.0.1,IP:10.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,"
        "DNS:kubernetes.default.svc\nextendedKeyUsage=serverAuth\n"
    )
    (pki / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    for name, subject, ext in (
        ("apiserver", "/CN=kube-apiserver", "server.ext"),
        ("admin", "/O=system:masters/CN=admin", "client.ext"),
    ):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", subject, "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=pki)
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                "-days", "3650", "-extfile", ext, "-out", f"{name}.crt", cwd=pki)
    openssl("genrsa", "-out", "sa.key", "2048", cwd=pki)
    openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=pki)


def write_kubeconfig(path: Path, *, server: str, pki: Path) -> None:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "restic-manager-test", "cluster": {"server": server, "certificate-authority": str(pki / "ca.crt")}}],
        "users": [{"name": "admin", "user": {"client-certificate": str(pki / "admin.crt"), "client-key": str(pki / "admin.key")}}],
        "contexts": [{"name": "restic-manager-test", "context": {"cluster": "restic-manager-test", "user": "admin"}}],
        "current-context": "restic-manager-test",
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config, indent=2))  # JSON is YAML: kubectl and clients read it


@functools.cache
def kubectl_path() -> Path:
    return build.ensure(["kubernetes"])["kubectl"]


@dataclass
class Cluster:
    """Any cluster reached through a kubeconfig: ours, or one given with --kubeconfig."""

    kubeconfig: Path
    directory: Path

    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        kubectl = kubectl_path()
        # A discovery cache of our own: a shared one goes stale when CRDs appear.
        result = subprocess.run(
            [str(kubectl), f"--kubeconfig={self.kubeconfig}", f"--cache-dir={self.directory / 'kubectl-cache'}", *args],
            input=input, capture_output=True, text=True,
        )
        if check and result.returncode != 0:
            raise ControlPlaneError(f"kubectl {' '.join(args)} failed: {result.stderr.strip()}")
        return result

    def install_crds(self) -> None:
        """Apply crds/ and wait until every CRD is Established."""
        self.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRDS))
        self.kubectl("wait", "--for=condition=Established", "--timeout=60s", "-f", str(CRDS))
        shutil.rmtree(self.directory / "kubectl-cache", ignore_errors=True)


@dataclass
class ControlPlane(Cluster):
    """etcd + kube-apiserver + kube-controller-manager rooted in `directory`."""

    binaries: dict[str, Path] = field(default_factory=dict)
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    server: str = ""
    # The CPUs etcd, the apiserver and the controller-manager may run on (all, if empty): the
    # benchmarks keep them off the operator's core (bench/README.md).
    cpus: tuple[int, ...] = ()

    @property
    def logs(self) -> Path:
        return self.directory / "logs"

    def start(self, *, detach: bool = False) -> None:
        self.binaries = build.ensure(["etcd", "kubernetes"])
        pki = self.directory / "pki"
        make_certificates(pki)
        self.logs.mkdir(parents=True, exist_ok=True)
        etcd_port, peer_port, api_port = free_port(), free_port(), free_port()
        self.server = f"https://127.0.0.1:{api_port}"
        write_kubeconfig(self.kubeconfig, server=self.server, pki=pki)
        self._spawn("etcd", [
            "--name=default", f"--data-dir={self.directory / 'etcd'}",
            f"--listen-client-urls=http://127.0.0.1:{etcd_port}", f"--advertise-client-urls=http://127.0.0.1:{etcd_port}",
            f"--listen-peer-urls=http://127.0.0.1:{peer_port}", f"--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}",
            f"--initial-cluster=default=http://127.0.0.1:{peer_port}",
            "--unsafe-no-fsync",  # test data: speed over durability
            "--log-level=warn",
        ], detach=detach)
        self._spawn("kube-apiserver", [
            f"--etcd-servers=http://127.0.0.1:{etcd_port}",
            "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", f"--secure-port={api_port}",
            f"--tls-cert-file={pki / 'apiserver.crt'}", f"--tls-private-key-file={pki / 'apiserver.key'}",
            f"--client-ca-file={pki / 'ca.crt'}",
            "--authorization-mode=RBAC",
            f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            "--service-cluster-ip-range=10.0.0.0/24",
            "--allow-privileged=true",
            "--profiling=false",
            "--v=1",
        ], detach=detach)
        self._wait_ready()
        self._start_controller_manager(detach=detach)
        self.install_crds()
        (self.directory / "pids").write_text(
            json.dumps({name: process.pid for name, process in self.processes.items()})
        )

    def _start_controller_manager(self, *, detach: bool) -> None:
        """Start it and wait until it serves. Its port is picked only now, and picked again
        if it was taken meanwhile: while the apiserver started, its own connections to etcd
        may have been given that port as theirs."""
        pki = self.directory / "pki"
        for attempt in range(1, KCM_ATTEMPTS + 1):
            port = free_port()
            self._spawn("kube-controller-manager", [
                f"--kubeconfig={self.kubeconfig}",
                f"--authentication-kubeconfig={self.kubeconfig}", f"--authorization-kubeconfig={self.kubeconfig}",
                "--bind-address=127.0.0.1", f"--secure-port={port}",
                "--leader-elect=false",
                "--controllers=garbagecollector,job,cronjob,namespace,serviceaccount,serviceaccount-token",
                f"--service-account-private-key-file={pki / 'sa.key'}",
                f"--root-ca-file={pki / 'ca.crt'}",
                "--use-service-account-credentials=false",
                "--concurrent-gc-syncs=5",
                "--v=1",
            ], detach=detach, append=attempt > 1)
            if self._serving(("kube-controller-manager",), f"https://127.0.0.1:{port}/healthz",
                             ssl._create_unverified_context()):  # its serving certificate is self-signed
                return
        raise ControlPlaneError(f"kube-controller-manager did not start in {KCM_ATTEMPTS} attempts; "
                                f"see {self.logs / 'kube-controller-manager.log'}")

    def _serving(self, names: tuple[str, ...], url: str, context: ssl.SSLContext) -> bool:
        """Whether ``url`` answers 200 within the timeout; False as soon as one of ``names`` exits."""
        deadline = time.monotonic() + STARTUP_TIMEOUT
        last_error = ""
        while time.monotonic() < deadline:
            if any(self.processes[name].poll() is not None for name in names):
                return False
            try:
                with urllib.request.urlopen(url, context=context, timeout=5) as response:
                    if response.status == 200:
                        return True
            except (urllib.error.URLError, OSError) as error:
                last_error = str(error)
            time.sleep(0.25)
        raise ControlPlaneError(f"{url} not served after {STARTUP_TIMEOUT:.0f}s ({last_error}); see {self.logs}")

    def _spawn(self, name: str, args: list[str], *, detach: bool, append: bool = False) -> None:
        log = open(self.logs / f"{name}.log", "ab" if append else "wb")  # noqa: SIM115 (the child holds it)
        # taskset execs the binary, so every thread it starts inherits the CPUs.
        pinned = ["taskset", "--cpu-list", ",".join(map(str, self.cpus))] if self.cpus else []
        self.processes[name] = subprocess.Popen(
            [*pinned, str(self.binaries[name]), *args], stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=detach,
        )
        log.close()

    def _wait_ready(self) -> None:
        pki = self.directory / "pki"
        context = ssl.create_default_context(cafile=str(pki / "ca.crt"))
        context.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))
        if not self._serving(("etcd", "kube-apiserver"), f"{self.server}/readyz", context):
            name, process = next((name, process) for name, process in self.processes.items()
                                 if process.poll() is not None)
            raise ControlPlaneError(f"{name} exited with {process.returncode}; see {self.logs / (name + '.log')}")

    def stop(self) -> None:
        # The controller-manager and apiserver first, etcd last, so nothing logs a lost etcd.
        for name in ("kube-controller-manager", "kube-apiserver", "etcd"):
            process = self.processes.pop(name, None)
            if process is not None:
                stop_process(process.pid, wait=process.wait)


def stop_process(pid: int, *, wait: Callable[..., object] | None = None, timeout: float = 15.0) -> None:
    """SIGTERM, then SIGKILL after `timeout`."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if wait is not None:
            try:
                wait(timeout=0.2)
                return
            except subprocess.TimeoutExpired:
                continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


LOCAL = REPO / ".local"


def up() -> int:
    directory = LOCAL / "cluster"
    if (directory / "pids").exists():
        print(f"a control plane is already running ({directory}); `make cluster-down` first", file=sys.stderr)
        return 1
    shutil.rmtree(directory, ignore_errors=True)
    plane = ControlPlane(directory=directory, kubeconfig=LOCAL / "kubeconfig")
    try:
        plane.start(detach=True)
    except (ControlPlaneError, build.BuildError) as error:
        plane.stop()
        print(f"control plane: {error}", file=sys.stderr)
        return 1
    print(f"control plane up at {plane.server}; CRDs installed\n  export KUBECONFIG={plane.kubeconfig}\n  logs: {plane.logs}")
    return 0


def down() -> int:
    pids_file = LOCAL / "cluster" / "pids"
    if not pids_file.exists():
        print("no control plane is running")
        return 0
    pids = json.loads(pids_file.read_text())
    for name in ("kube-controller-manager", "kube-apiserver", "etcd"):
        if name in pids:
            stop_process(pids[name])
    pids_file.unlink()
    print("control plane stopped")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description="Start or stop the local test control plane.")
    parser.add_argument("action", choices=["up", "down"])
    return up() if parser.parse_args().action == "up" else down()


if __name__ == "__main__":
    sys.exit(main())
