"""operator/kube/client.py against the real apiserver: every call the operator makes, the error
classes the callers rely on, and the login (client certificate, bearer token that rotates).
The parts that need no apiserver are in tests/unit/test_operator_kube_offline.py."""

from __future__ import annotations

import asyncio
import datetime
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from kubernetes_asyncio import client
from kubernetes_asyncio.config import incluster_config

from restic_manager.operator.agents.identity import AuthError, IssuerKeys, verified_claims
from restic_manager.operator.kube.api import API_VERSION, FINALIZER, GROUP, VERSION, ObjectKey
from restic_manager.operator.kube.client import (
    MERGE_PATCH, TOKEN_SECRETS, AlreadyExists, Conflict, FinalizersSeen, Kube, KubeError, NotFound, SecretRead,
    load_configuration,
)

pytestmark = pytest.mark.cluster

OTHER_FINALIZER = "example.com/keep"


# --- against the apiserver ---------------------------------------------------------------------


def restic_job(namespace: str, name: str, *, finalizers: list[str] | None = None) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name, "namespace": namespace}
    if finalizers:
        metadata["finalizers"] = finalizers
    return {"apiVersion": API_VERSION, "kind": "ResticJob", "metadata": metadata,
            "spec": {"agent": "web-01", "repository": "offsite", "type": "backup", "backup": {"paths": ["/etc"]}}}


def kubectl_json(kube: Any, *args: str) -> Any:
    return json.loads(kube.kubectl(*args, "-o", "json").stdout)


@pytest.fixture
async def api(kube: Any) -> AsyncIterator[Kube]:
    kube_api = Kube(await load_configuration(Path(kube.kubeconfig)))
    yield kube_api
    await kube_api.close()


async def test_create_get_patch_status_delete(api: Kube, namespace: str) -> None:
    key = ObjectKey(namespace, "j")
    created = await api.create("resticjobs", restic_job(namespace, "j"))
    assert created["metadata"]["uid"] and created["spec"]["agent"] == "web-01"
    patched = await api.patch_status("resticjobs", key, {"phase": "Running"}, uid=created["metadata"]["uid"])
    assert patched["status"]["phase"] == "Running"
    got = await api.get("resticjobs", key)
    assert got["metadata"]["uid"] == created["metadata"]["uid"] and got["status"] == {"phase": "Running"}
    await api.delete("resticjobs", key)
    with pytest.raises(NotFound, match=f"get resticjobs {namespace}/j: 404 NotFound"):
        await api.get("resticjobs", key)
    await api.delete("resticjobs", key)  # already gone: nothing to do


async def test_a_second_create_of_a_name_is_already_exists(api: Kube, namespace: str) -> None:
    await api.create("resticjobs", restic_job(namespace, "twice"))
    with pytest.raises(AlreadyExists) as raised:
        await api.create("resticjobs", restic_job(namespace, "twice"))
    assert raised.value.status == 409 and f"create resticjobs {namespace}/twice" in str(raised.value)


async def test_a_status_patch_names_a_uid_the_apiserver_does_not_check(api: Kube, namespace: str) -> None:
    # Recorded so that nobody relies on it: metadata in a status patch is dropped, uid too.
    created = await api.create("resticjobs", restic_job(namespace, "j"))
    patched = await api.patch_status("resticjobs", ObjectKey(namespace, "j"), {"phase": "Failed"}, uid="not-its-uid")
    assert patched["metadata"]["uid"] == created["metadata"]["uid"] and patched["status"] == {"phase": "Failed"}


async def test_a_write_against_a_stale_version_is_a_conflict(api: Kube, namespace: str) -> None:
    # No public call sends a resourceVersion; every call shares _call and its error classes.
    created = await api.create("resticjobs", restic_job(namespace, "j"))
    stale = {"metadata": {"resourceVersion": created["metadata"]["resourceVersion"], "labels": {"a": "b"}}}
    uid = created["metadata"]["uid"]
    await api.patch_status("resticjobs", ObjectKey(namespace, "j"), {"phase": "Running"}, uid=uid)  # a newer version
    with pytest.raises(Conflict) as raised:
        await api._call(f"patch resticjobs {namespace}/j", api._objects.patch_namespaced_custom_object,
                        GROUP, VERSION, namespace, "resticjobs", "j", stale, _content_type=MERGE_PATCH)
    assert not isinstance(raised.value, AlreadyExists) and raised.value.status == 409
    assert f"patch resticjobs {namespace}/j: 409 Conflict" in str(raised.value)


async def test_an_invalid_object_is_a_kube_error_naming_the_call_and_the_field(api: Kube, namespace: str) -> None:
    body = restic_job(namespace, "bad")
    del body["spec"]["backup"]
    with pytest.raises(KubeError) as raised:
        await api.create("resticjobs", body)
    assert type(raised.value) is KubeError and raised.value.status == 422
    assert f"create resticjobs {namespace}/bad: 422 Invalid" in str(raised.value) and "backup" in str(raised.value)


async def test_secrets_are_created_read_and_listed_only_when_the_operators(
    api: Kube, kube: Any, namespace: str,
) -> None:
    job = await api.create("resticjobs", restic_job(namespace, "owner"))  # an owner that exists: not collected
    owner = {"apiVersion": API_VERSION, "kind": "ResticJob", "name": "owner", "uid": job["metadata"]["uid"]}
    kube.kubectl("-n", namespace, "create", "secret", "generic", "someone-elses", "--from-literal=k=v")
    kube.kubectl("-n", namespace, "label", "secret", "someone-elses", "resticmanager.io/repository-secret=true")
    created = await api.create_secret(ObjectKey(namespace, "web-01-agent-token"), {"token": "s3cr3t"}, owner=owner)
    assert created["metadata"]["labels"] == {"app.kubernetes.io/managed-by": "restic-manager"}
    assert await api.read_secret(ObjectKey(namespace, "web-01-agent-token")) == SecretRead(
        data={"token": "s3cr3t"}, labels={"app.kubernetes.io/managed-by": "restic-manager"})
    assert await api.read_secret(ObjectKey(namespace, "someone-elses")) == SecretRead(
        data={"k": "v"}, labels={"resticmanager.io/repository-secret": "true"})
    # The selector kopf watches Secrets with (handlers.py) takes the operator's only.
    listed = kubectl_json(kube, "-n", namespace, "get", "secrets", "-l", TOKEN_SECRETS)["items"]
    assert [item["metadata"]["name"] for item in listed] == ["web-01-agent-token"]
    with pytest.raises(NotFound):
        await api.read_secret(ObjectKey(namespace, "missing"))
    with pytest.raises(AlreadyExists):
        await api.create_secret(ObjectKey(namespace, "web-01-agent-token"), {"token": "again"}, owner=owner)


async def test_finalizers_are_added_and_removed_without_touching_others(api: Kube, kube: Any, namespace: str) -> None:
    key = ObjectKey(namespace, "j")
    created = await api.create("resticjobs", restic_job(namespace, "j"))
    uid = created["metadata"]["uid"]
    # From the caller's view (no finalizers: an absent list) without reading first.
    await api.set_finalizer("resticjobs", key, FINALIZER, present=True, seen=FinalizersSeen(uid, ()))
    assert (await api.get("resticjobs", key))["metadata"]["finalizers"] == [FINALIZER]
    # Without a view: read, then patch; present already, so nothing changes.
    await api.set_finalizer("resticjobs", key, FINALIZER, present=True)
    # Someone else adds one; a stale view fails the patch's test, and the retry keeps theirs.
    kube.kubectl("-n", namespace, "patch", "resticjob", "j", "--type=json", "-p",
                 json.dumps([{"op": "add", "path": "/metadata/finalizers/-", "value": OTHER_FINALIZER}]))
    await api.set_finalizer("resticjobs", key, FINALIZER, present=False, seen=FinalizersSeen(uid, (FINALIZER,)))
    assert (await api.get("resticjobs", key))["metadata"]["finalizers"] == [OTHER_FINALIZER]
    await api.set_finalizer("resticjobs", key, OTHER_FINALIZER, present=False)
    assert "finalizers" not in (await api.get("resticjobs", key))["metadata"]


async def test_a_status_write_since_the_view_does_not_cost_a_read(
    api: Kube, namespace: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    key = ObjectKey(namespace, "j")
    created = await api.create("resticjobs", restic_job(namespace, "j", finalizers=[FINALIZER]))
    uid = created["metadata"]["uid"]
    await api.patch_status("resticjobs", key, {"phase": "Succeeded"}, uid=uid)  # the view is older now
    calls: list[str] = []
    once = api._once

    async def counted(what: str, call: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(what)
        return await once(what, call, *args, **kwargs)

    monkeypatch.setattr(api, "_once", counted)
    await api.set_finalizer("resticjobs", key, FINALIZER, present=False, seen=FinalizersSeen(uid, (FINALIZER,)))
    assert calls == [f"patch resticjobs {namespace}/j finalizers"]
    assert "finalizers" not in (await api.get("resticjobs", key))["metadata"]


async def test_releasing_the_last_finalizer_of_a_deleted_job_lets_it_go(api: Kube, namespace: str) -> None:
    key = ObjectKey(namespace, "j")
    created = await api.create("resticjobs", restic_job(namespace, "j", finalizers=[FINALIZER]))
    await api.delete("resticjobs", key)
    assert (await api.get("resticjobs", key))["metadata"]["deletionTimestamp"]
    await api.set_finalizer("resticjobs", key, FINALIZER, present=False,
                            seen=FinalizersSeen(created["metadata"]["uid"], (FINALIZER,)))
    with pytest.raises(NotFound):
        await api.get("resticjobs", key)


async def test_a_view_of_an_object_since_recreated_leaves_the_new_one_alone(api: Kube, namespace: str) -> None:
    key = ObjectKey(namespace, "j")
    await api.create("resticjobs", restic_job(namespace, "j", finalizers=[FINALIZER]))
    await api.set_finalizer("resticjobs", key, FINALIZER, present=False,
                            seen=FinalizersSeen("uid-of-an-older-one", (FINALIZER,)))
    assert (await api.get("resticjobs", key))["metadata"]["finalizers"] == [FINALIZER]
    await api.set_finalizer("resticjobs", key, FINALIZER, present=False)  # let the namespace go


async def test_events_are_posted_about_an_object(api: Kube, kube: Any, namespace: str) -> None:
    created = await api.create("resticjobs", restic_job(namespace, "j"))
    involved = {"apiVersion": API_VERSION, "kind": "ResticJob", "name": "j", "namespace": namespace,
                "uid": created["metadata"]["uid"]}
    await api.post_event(involved, type="Warning", reason="Refused", message="fire refused: suspended")
    [event] = kubectl_json(kube, "-n", namespace, "get", "events")["items"]
    assert (event["reason"], event["message"], event["type"]) == ("Refused", "fire refused: suspended", "Warning")
    assert event["involvedObject"]["uid"] == created["metadata"]["uid"]


def service_account_token(kube: Any, namespace: str, *, audience: str | None = None) -> str:
    if kube.kubectl("-n", namespace, "get", "serviceaccount", "robot", check=False).returncode != 0:
        kube.kubectl("-n", namespace, "create", "serviceaccount", "robot")
    args = ["-n", namespace, "create", "token", "robot"]
    if audience is not None:
        args.append(f"--audience={audience}")
    return str(kube.kubectl(*args).stdout.strip())


async def test_token_review_says_whose_token_it_is(api: Kube, kube: Any, namespace: str) -> None:
    token = service_account_token(kube, namespace, audience="restic-manager")
    review = await api.token_review(token, audiences=["restic-manager"])
    assert review["authenticated"] is True
    assert review["user"]["username"] == f"system:serviceaccount:{namespace}:robot"
    assert (await api.token_review(token, audiences=["someone-else"])).get("authenticated") is not True


async def test_the_issuer_keys_verify_the_clusters_tokens_and_no_forgery(api: Kube, kube: Any, namespace: str) -> None:
    keys = IssuerKeys(await api.issuer_keys())
    account = ObjectKey(namespace, "robot")
    token = service_account_token(kube, namespace, audience="restic-manager")
    claims = verified_claims(token, keys, audience="restic-manager", service_account=account)
    assert claims["sub"] == f"system:serviceaccount:{namespace}:robot"
    other = service_account_token(kube, namespace, audience="someone-else")
    forged = token.rpartition(".")[0] + "." + other.rpartition(".")[2]
    with pytest.raises(AuthError) as refused:
        verified_claims(forged, keys, audience="restic-manager", service_account=account)
    assert refused.value.reason == "unverified-token"


async def bearer_configuration(kube: Any, token_file: Path) -> tuple[client.Configuration,
                                                                     incluster_config.InClusterConfigLoader]:
    """The cluster as an in-cluster operator sees it (load_configuration without a kubeconfig):
    the library's in-cluster loader, here pointed at the test's token file and CA."""
    base = await load_configuration(Path(kube.kubeconfig))
    server = urlsplit(base.host)
    environ = {incluster_config.SERVICE_HOST_ENV_NAME: str(server.hostname),
               incluster_config.SERVICE_PORT_ENV_NAME: str(server.port or 443)}
    loader = incluster_config.InClusterConfigLoader(token_filename=str(token_file), cert_filename=base.ssl_ca_cert,
                                                    environ=environ)
    configuration = client.Configuration()
    loader.load_and_set(configuration)
    return configuration, loader


async def test_a_rotated_bearer_token_is_picked_up_by_the_library_once_its_refresh_period_is_over(
    kube: Any, namespace: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The loader re-reads the file on a clock, not after a 401: until then a 401 stays a 401.
    # A long period keeps the test apart from how long kubectl takes; its end is then forced.
    monkeypatch.setattr(incluster_config, "TOKEN_REFRESH_PERIOD", datetime.timedelta(hours=1))
    token_file = tmp_path / "token"
    token_file.write_text("not-a-token")
    configuration, loader = await bearer_configuration(kube, token_file)
    api = Kube(configuration)
    try:
        key = ObjectKey(namespace, "j")
        with pytest.raises(KubeError) as raised:
            await api.get("resticjobs", key)
        assert raised.value.status == 401 and type(raised.value) is KubeError
        token = service_account_token(kube, namespace)
        kube.kubectl("-n", namespace, "create", "rolebinding", "robot", "--clusterrole=cluster-admin",
                     f"--serviceaccount={namespace}:robot")
        token_file.write_text(token)  # the kubelet rotates it
        with pytest.raises(KubeError) as kept:
            await api.get("resticjobs", key)
        assert kept.value.status == 401  # the token read is kept until the period is over
        loader.token_expires_at = datetime.datetime.now()  # the period is over
        with pytest.raises(NotFound):  # authenticated and allowed now: there is no such job
            await api.get("resticjobs", key)
        assert loader.token == f"Bearer {token}" and configuration.api_key["BearerToken"] == f"Bearer {token}"
    finally:
        await api.close()


async def test_a_token_without_rights_is_refused_with_403_not_not_found(kube: Any, namespace: str,
                                                                         tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(service_account_token(kube, namespace))
    api = Kube((await bearer_configuration(kube, token_file))[0])
    try:
        with pytest.raises(KubeError) as raised:
            await api.get("resticjobs", ObjectKey(namespace, "j"))
        assert raised.value.status == 403 and type(raised.value) is KubeError
        assert f"get resticjobs {namespace}/j: 403 Forbidden" in str(raised.value)
    finally:
        await api.close()


async def test_calls_reach_the_apiserver_through_a_connect_proxy(kube: Any, namespace: str) -> None:
    tunnels: list[bytes] = []

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()

    async def proxy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.readuntil(b"\r\n\r\n")
        tunnels.append(request.split(b"\r\n")[0])
        host, _, port = request.split(b" ")[1].decode().rpartition(":")
        upstream_reader, upstream_writer = await asyncio.open_connection(host, int(port))
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        await asyncio.gather(relay(reader, upstream_writer), relay(upstream_reader, writer))

    listening = await asyncio.start_server(proxy, "127.0.0.1", 0)
    configuration = await load_configuration(Path(kube.kubeconfig))
    configuration.proxy = f"http://127.0.0.1:{listening.sockets[0].getsockname()[1]}"
    proxied = Kube(configuration)
    try:
        created = await proxied.create("resticjobs", restic_job(namespace, "through-proxy"))
        got = await proxied.get("resticjobs", ObjectKey(namespace, "through-proxy"))
    finally:
        await proxied.close()
        listening.close()
    assert got["metadata"]["uid"] == created["metadata"]["uid"]
    apiserver = configuration.host.removeprefix("https://")
    assert tunnels and all(line == f"CONNECT {apiserver} HTTP/1.1".encode() for line in tunnels)
