"""The chart's security settings, rendered by the pinned helm and, where it matters, installed
on the real apiserver: TLS by default with a certificate the agents and the webhook trust,
the agents given the CA and never the key, plain ws only when asked, rights only for what is
enabled, and a generated certificate that survives an upgrade."""

from __future__ import annotations

import base64
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from integration.test_deploy import (  # noqa: F401 (helm is a fixture)
    CHART, NEVER_SCHEDULED, Helm, documents, helm, unique, write_values,
)


def render(helm: Helm, *settings: str) -> dict[tuple[str, str], dict[str, Any]]:
    """(kind, name) → object, as `helm template r CHART -n backup --set ...` renders them."""
    args = [arg for setting in settings for arg in ("--set", setting)]
    rendered = documents(helm("template", "r", CHART, "--namespace", "backup", *args).stdout)
    return {(doc["kind"], doc["metadata"]["name"]): doc for doc in rendered}


def operator_args(objects: dict[tuple[str, str], dict[str, Any]]) -> list[str]:
    (container,) = objects["Deployment", "r-restic-manager"]["spec"]["template"]["spec"]["containers"]
    return list(container["args"])


def openssl(*args: str | Path) -> str:
    result = subprocess.run(["openssl", *map(str, args)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_by_default_agents_and_the_apiserver_get_tls_from_a_generated_ca(helm: Helm, tmp_path: Path) -> None:
    objects = render(helm, "agentDaemonSet.enabled=true", "operator.watchNamespaces={team-a,team-b}")
    secret = objects["Secret", "r-restic-manager-tls"]
    assert secret["type"] == "kubernetes.io/tls"
    for key in ("tls.crt", "tls.key", "ca.crt"):
        (tmp_path / key).write_bytes(base64.b64decode(secret["data"][key]))
    assert "tls.crt: OK" in openssl("verify", "-CAfile", tmp_path / "ca.crt", tmp_path / "tls.crt")
    names = openssl("x509", "-in", tmp_path / "tls.crt", "-noout", "-ext", "subjectAltName")
    assert "DNS:r-restic-manager.backup.svc" in names and "DNS:r-restic-manager.backup.svc.cluster.local" in names

    args = operator_args(objects)
    assert {"--tls-cert-file=/etc/restic-manager/tls/tls.crt", "--tls-key-file=/etc/restic-manager/tls/tls.key",
            "--webhook-listen=0.0.0.0:9443", "--agent-service-account=backup/r-restic-manager-agent",
            "--node-agent-namespace=team-a"} <= set(args)
    assert "--insecure-listen" not in args

    (webhook,) = objects["ValidatingWebhookConfiguration", "r-restic-manager-backup"]["webhooks"]
    assert webhook["clientConfig"] == {"service": {"name": "r-restic-manager", "namespace": "backup",
                                                   "path": "/validate-schedule", "port": 9443},
                                       "caBundle": secret["data"]["ca.crt"]}
    # The release namespace is watched too, for the agents' pods: its Schedules are checked like any.
    assert webhook["namespaceSelector"]["matchExpressions"] == [
        {"key": "kubernetes.io/metadata.name", "operator": "In", "values": ["team-a", "team-b", "backup"]}]
    assert webhook["rules"][0]["resources"] == ["schedules"] and webhook["failurePolicy"] == "Ignore"
    service_ports = {p["name"]: p["port"] for p in objects["Service", "r-restic-manager"]["spec"]["ports"]}
    assert service_ports == {"agents": 8765, "webhook": 9443}


def test_plain_ws_only_when_asked_and_then_said_so(helm: Helm) -> None:
    objects = render(helm, "agentDaemonSet.enabled=true", "operator.insecureListen=true")
    assert "--insecure-listen" in operator_args(objects)
    (agent,) = objects["DaemonSet", "r-restic-manager-agent"]["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in agent["env"]}
    assert env["RESTIC_MANAGER_SERVER"] == "ws://r-restic-manager.backup.svc:8765"
    assert env["RESTIC_MANAGER_INSECURE"] == "true" and "RESTIC_MANAGER_CA_FILE" not in env


def test_a_certificate_of_ones_own_is_used_as_given(helm: Helm) -> None:
    ca = base64.b64encode(b"-----BEGIN CERTIFICATE-----\n...\n").decode()
    objects = render(helm, "operator.tls.secretName=from-cert-manager", f"operator.tls.caBundle={ca}")
    assert not [name for kind, name in objects if kind == "Secret"]
    (container,) = objects["Deployment", "r-restic-manager"]["spec"]["template"]["spec"]["containers"]
    volumes = objects["Deployment", "r-restic-manager"]["spec"]["template"]["spec"]["volumes"]
    (tls,) = [v for v in volumes if v["name"] == "tls"]
    assert tls["secret"]["secretName"] == "from-cert-manager"
    assert [i["key"] for i in tls["secret"]["items"]] == ["tls.crt", "tls.key"]
    (webhook,) = objects["ValidatingWebhookConfiguration", "r-restic-manager-backup"]["webhooks"]
    assert webhook["clientConfig"]["caBundle"] == ca


def rules(objects: dict[tuple[str, str], dict[str, Any]]) -> list[tuple[str, str, str]]:
    """(API group, resource, verb) of every ClusterRole rule; a non-resource URL's group is ""."""
    return sorted((group, resource, verb)
                  for (kind, _), doc in objects.items() if kind == "ClusterRole"
                  for rule in doc["rules"] for group in rule.get("apiGroups", [""])
                  for resource in rule.get("resources", rule.get("nonResourceURLs")) for verb in rule["verbs"])


def test_rights_for_in_cluster_agents_only_with_the_daemonset(helm: Helm) -> None:
    without, with_daemonset = rules(render(helm)), rules(render(helm, "agentDaemonSet.enabled=true"))
    extra = [rule for rule in with_daemonset if rule not in without]
    assert extra == [("", "/openid/v1/jwks", "get"), ("", "pods", "list"), ("", "pods", "watch"),
                     ("authentication.k8s.io", "tokenreviews", "create"),
                     ("resticmanager.io", "agents", "create"),
                     ("resticmanager.io", "agents", "get")]
    assert "--agent-service-account" not in " ".join(operator_args(render(helm)))


@pytest.mark.cluster
def test_the_generated_certificate_survives_an_upgrade(kube, helm: Helm, tmp_path: Path) -> None:
    release, namespace = unique("rm"), unique("rm-tls")
    kube.kubectl("create", "namespace", namespace)
    settings = ["--values", write_values(tmp_path / "values.yaml", {"operator": {"nodeSelector": NEVER_SCHEDULED}})]
    try:
        helm("install", release, CHART, "--namespace", namespace, *settings, kubeconfig=kube.kubeconfig)
        name = f"{release}-restic-manager-tls"

        def stored() -> tuple[dict[str, str], str]:
            secret = json.loads(kube.kubectl("-n", namespace, "get", "secret", name, "-o", "json").stdout)
            webhook = json.loads(kube.kubectl("get", "validatingwebhookconfiguration",
                                              f"{release}-restic-manager-{namespace}", "-o", "json").stdout)
            return secret["data"], webhook["webhooks"][0]["clientConfig"]["caBundle"]

        first, bundle = stored()
        assert bundle == first["ca.crt"]
        helm("upgrade", release, CHART, "--namespace", namespace, *settings, "--set", "operator.logLevel=DEBUG",
             kubeconfig=kube.kubeconfig)
        assert stored() == (first, bundle)
    finally:
        helm("uninstall", release, "--namespace", namespace, kubeconfig=kube.kubeconfig, check=False)
        kube.kubectl("delete", "namespace", namespace, "--wait=false", check=False)
