"""operator/kube.py against the real apiserver: every call the operator makes, the error
classes the callers rely on, and the login (client certificate, bearer token that rotates).
The parts that need no apiserver are in tests/unit/test_operator_kube_offline.py."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import kubernetes.client
import pytest

from restic_manager.operator.kube import (
    AlreadyExists, Conflict, FinalizersSeen, Gone, Kube, KubeError, NotFound, SecretRead, load_configuration,
)
from restic_manager.operator.identity import AuthError, IssuerKeys, verified_claims
from restic_manager.operator.store import API_VERSION, FINALIZER, Change, Job, ObjectKey, Store
from restic_manager.operator.watch import Watch

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
    client = Kube(load_configuration(Path(kube.kubeconfig)))
    yield client
    await client.close()


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
    # No public call sends a resourceVersion; every call shares _request and its error classes.
    created = await api.create("resticjobs", restic_job(namespace, "j"))
    stale = {"metadata": {"resourceVersion": created["metadata"]["resourceVersion"], "labels": {"a": "b"}}}
    uid = created["metadata"]["uid"]
    await api.patch_status("resticjobs", ObjectKey(namespace, "j"), {"phase": "Running"}, uid=uid)  # a newer version
    with pytest.raises(Conflict) as raised:
        await api._request(f"patch resticjobs {namespace}/j", "PATCH",
                           f"/apis/{API_VERSION}/namespaces/{namespace}/resticjobs/j", body=stale,
                           content_type="application/merge-patch+json")
    assert not isinstance(raised.value, AlreadyExists) and raised.value.status == 409
    assert f"patch resticjobs {namespace}/j: 409 Conflict" in str(raised.value)


async def test_an_invalid_object_is_a_kube_error_naming_the_call_and_the_field(api: Kube, namespace: str) -> None:
    body = restic_job(namespace, "bad")
    del body["spec"]["backup"]
    with pytest.raises(KubeError) as raised:
        await api.create("resticjobs", body)
    assert type(raised.value) is KubeError and raised.value.status == 422
    assert f"create resticjobs {namespace}/bad: 422 Invalid" in str(raised.value) and "backup" in str(raised.value)


async def test_list_everywhere_and_in_namespaces(api: Kube, namespace: str) -> None:
    await api.create("resticjobs", restic_job(namespace, "a"))
    await api.create("resticjobs", restic_job(namespace, "b"))
    everywhere, version = await api.list_objects("resticjobs", None)
    assert {ObjectKey.of(item) for item in everywhere} >= {ObjectKey(namespace, "a"), ObjectKey(namespace, "b")}
    assert version.isdigit()
    here, _ = await api.list_objects("resticjobs", [namespace])
    assert sorted(item["metadata"]["name"] for item in here) == ["a", "b"]


async def test_the_resticjob_watch_follows_creates_status_writes_and_deletes(api: Kube, namespace: str) -> None:
    store, changes = Store(), []
    _, version = await api.list_objects("resticjobs", [namespace])
    watch: Watch[Job] = Watch(api, "resticjobs", [namespace], collection=store.jobs, changed=changes.append)
    following = asyncio.ensure_future(watch.run(version))

    async def until(count: int) -> list[Change[Job]]:
        async with asyncio.timeout(30):
            while len(changes) < count:
                await asyncio.sleep(0.02)
        return changes

    try:
        created = await api.create("resticjobs", restic_job(namespace, "w"))
        key = ObjectKey(namespace, "w")
        await until(1)  # the create shows before the status write, so the store sees both
        await api.patch_status("resticjobs", key, {"phase": "Running"}, uid=created["metadata"]["uid"])
        await until(2)
        await api.delete("resticjobs", key)
        added, written, deleted = await until(3)
    finally:
        following.cancel()
        await asyncio.gather(following, return_exceptions=True)
    assert added.old is None and added.new is not None and added.new.uid == created["metadata"]["uid"]
    assert written.new is not None and written.new.status == {"phase": "Running"}
    assert deleted.old is not None and deleted.new is None and store.jobs.get(key) is None


async def test_a_watch_from_a_version_the_apiserver_no_longer_keeps_is_gone(api: Kube, namespace: str) -> None:
    with pytest.raises(Gone, match=f"watch resticjobs in {namespace}: 410"):
        async for _ in api.watch("resticjobs", namespace, "1"):
            pass


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
    listed, _ = await api.list_objects("secrets", [namespace])
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
    methods: list[str] = []
    request = api._request

    async def counted(what: str, method: str, path: str, **options: Any) -> Any:
        methods.append(method)
        return await request(what, method, path, **options)

    monkeypatch.setattr(api, "_request", counted)
    await api.set_finalizer("resticjobs", key, FINALIZER, present=False, seen=FinalizersSeen(uid, (FINALIZER,)))
    assert methods == ["PATCH"]
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


def bearer_configuration(kube: Any, token_file: Path) -> tuple[kubernetes.client.Configuration, list[str]]:
    """The cluster as an in-cluster operator sees it: a bearer token from a file the kubelet
    rotates (here the test), read again by the configuration's refresh hook; and the reads."""
    base = load_configuration(Path(kube.kubeconfig))
    configuration = kubernetes.client.Configuration()
    configuration.host, configuration.ssl_ca_cert = base.host, base.ssl_ca_cert
    configuration.verify_ssl = base.verify_ssl
    reads: list[str] = []

    def reread(into: kubernetes.client.Configuration) -> None:
        reads.append(token_file.read_text().strip())
        into.api_key["BearerToken"] = f"Bearer {reads[-1]}"

    configuration.refresh_api_key_hook = reread
    return configuration, reads


async def test_a_rotated_bearer_token_is_read_again_after_a_401(kube: Any, namespace: str, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("not-a-token")
    configuration, reads = bearer_configuration(kube, token_file)
    api = Kube(configuration)
    try:
        with pytest.raises(KubeError) as raised:
            await api.list_objects("resticjobs", [namespace])
        assert raised.value.status == 401 and type(raised.value) is KubeError
        assert reads == ["not-a-token", "not-a-token"]  # read, and read again after the 401
        token = service_account_token(kube, namespace)
        kube.kubectl("-n", namespace, "create", "rolebinding", "robot", "--clusterrole=cluster-admin",
                     f"--serviceaccount={namespace}:robot")
        token_file.write_text(token + "\n")  # the kubelet rotates it
        assert (await api.list_objects("resticjobs", [namespace]))[0] == []
        assert (await api.list_objects("resticjobs", [namespace]))[0] == []
        assert reads == ["not-a-token", "not-a-token", token]  # read once more after a 401, then kept
    finally:
        await api.close()


async def test_a_token_without_rights_is_refused_with_403_not_not_found(kube: Any, namespace: str,
                                                                         tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(service_account_token(kube, namespace))
    api = Kube(bearer_configuration(kube, token_file)[0])
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
    configuration = load_configuration(Path(kube.kubeconfig))
    configuration.proxy = f"http://127.0.0.1:{listening.sockets[0].getsockname()[1]}"
    client = Kube(configuration)
    try:
        created = await client.create("resticjobs", restic_job(namespace, "through-proxy"))
        listed, _ = await client.list_objects("resticjobs", [namespace])
    finally:
        await client.close()
        listening.close()
    assert [item["metadata"]["uid"] for item in listed] == [created["metadata"]["uid"]]
    apiserver = configuration.host.removeprefix("https://")
    assert tunnels and all(line == f"CONNECT {apiserver} HTTP/1.1".encode() for line in tunnels)
