"""operator/kube/client.py without an apiserver: the error classes, Retry-After, finalizer patches,
which calls are made again and how a create checks its outcome, and, against a small HTTP
server, the retries themselves and the shared Secret reads."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from kubernetes_asyncio import client

from restic_manager.operator.kube import client as kube_module
from restic_manager.operator.kube.api import FINALIZER, ObjectKey
from restic_manager.operator.kube.client import (
    AlreadyExists, Conflict, ConnectionFailed, FinalizersSeen, Kube, KubeError, NotFound, finalizer_patch, landed,
    retry_after, retryable, status_error,
)
from support.http_server import serving

ERRORS = [
    # (status, body, class, message)
    (404, b'{"kind":"Status","reason":"NotFound","message":"resticjobs \\"j\\" not found"}', NotFound,
     'get x: 404 NotFound: resticjobs "j" not found'),
    (409, b'{"reason":"AlreadyExists","message":"exists"}', AlreadyExists, "get x: 409 AlreadyExists: exists"),
    (409, b'{"reason":"Conflict"}', Conflict, "get x: 409 Conflict"),
    (500, b"<html>proxy error</html>", KubeError, "get x: 500"),
]


@pytest.mark.parametrize(("status", "body", "kind", "message"), ERRORS)
def test_error_classes(status: int, body: bytes, kind: type[KubeError], message: str) -> None:
    error = status_error("get x", status, body)
    assert type(error) is kind and str(error) == message and error.status == status


@pytest.mark.parametrize(("status", "header", "wait"), [
    (429, "1", 1.0), (503, "0", 0.0), (429, "3600", 10.0), (429, None, None), (500, "1", None),
    (429, "Wed, 21 Oct 2026 07:28:00 GMT", None), (429, "nan", None),
])
def test_retry_after(status: int, header: str | None, wait: float | None) -> None:
    assert retry_after(status, header) == wait


def test_a_finalizer_patch_tests_the_uid_and_the_list_it_was_made_from() -> None:
    assert finalizer_patch(FinalizersSeen("u", ()), FINALIZER, present=True) == [
        {"op": "test", "path": "/metadata/uid", "value": "u"},
        {"op": "test", "path": "/metadata/finalizers", "value": None},
        {"op": "add", "path": "/metadata/finalizers", "value": [FINALIZER]},
    ]
    assert finalizer_patch(FinalizersSeen("u", ("a/b", FINALIZER)), FINALIZER, present=False) == [
        {"op": "test", "path": "/metadata/uid", "value": "u"},
        {"op": "test", "path": "/metadata/finalizers", "value": ["a/b", FINALIZER]},
        {"op": "add", "path": "/metadata/finalizers", "value": ["a/b"]},
    ]
    assert finalizer_patch(FinalizersSeen("u", (FINALIZER,)), FINALIZER, present=True) is None
    assert finalizer_patch(FinalizersSeen("u", ()), FINALIZER, present=False) is None


def test_only_calls_the_apiserver_did_not_serve_or_whose_connection_failed_are_made_again() -> None:
    assert retryable(status_error("get x", 429, b"", retry_after_header="1"))
    assert retryable(status_error("get x", 503, b"", retry_after_header="0"))
    assert retryable(ConnectionFailed("get x: ServerDisconnectedError"))
    assert not retryable(status_error("get x", 503, b""))  # no Retry-After: the apiserver may be failing
    assert not retryable(status_error("get x", 500, b""))
    assert not retryable(KubeError("get x: TimeoutError"))  # the loop that made the call tries later


JOB = {"apiVersion": "resticmanager.io/v1alpha1", "kind": "ResticJob",
       "metadata": {"name": "j", "namespace": "ns", "labels": {"a": "b"},
                    "ownerReferences": [{"kind": "Schedule", "name": "s", "uid": "s1"}]},
       "spec": {"type": "backup", "paths": ["/srv"]}}


def test_a_create_found_existing_is_its_own_only_if_everything_sent_is_there_as_sent() -> None:
    stored = {**JOB, "metadata": {**JOB["metadata"], "uid": "u", "resourceVersion": "7",  # type: ignore[dict-item]
                                  "finalizers": []},
              "spec": {**JOB["spec"], "retries": 0}, "status": {}}  # type: ignore[dict-item]
    assert landed(JOB, stored)  # the apiserver's additions and the schema's defaults do not count
    other = {**stored, "spec": {"type": "backup", "paths": ["/home"], "retries": 0}}
    assert not landed(JOB, other)
    assert not landed(JOB, {**stored, "metadata": {**stored["metadata"], "labels": {}}})  # type: ignore[dict-item]
    assert not landed({"spec": {"paths": ["/a", "/b"]}}, {"spec": {"paths": ["/a"]}})
    secret = {"metadata": {"name": "t"}, "stringData": {"token": "abc"}}
    assert landed(secret, {"metadata": {"name": "t", "uid": "u"},
                           "data": {"token": base64.b64encode(b"abc").decode()}})
    assert not landed(secret, {"metadata": {"name": "t"}, "data": {"token": base64.b64encode(b"xyz").decode()}})


# --- against a small HTTP server ------------------------------------------------------------------------

SECRET = {"data": {"password": "c2VjcmV0"}}  # "secret"
Answer = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Server:
    """Answers each request with the next of ``answers`` (the last one again when they run
    out), recording "METHOD path" as it arrives; ``release`` holds every answer until set."""

    answers: list[Answer] = field(default_factory=list)
    arrived: list[str] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.arrived.append(f"{request.method} {request.path}")
        await self.release.wait()
        answer = self.answers[min(len(self.arrived), len(self.answers)) - 1]
        return await answer(request)

    async def until(self, count: int) -> None:
        async with asyncio.timeout(5):
            while len(self.arrived) < count:
                await asyncio.sleep(0.005)


def reply(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Answer:
    async def answer(request: web.Request) -> web.StreamResponse:
        return web.json_response(body, status=status, headers=headers)
    return answer


async def disconnect(request: web.Request) -> web.StreamResponse:
    """The request arrived, and the connection drops before any answer."""
    assert request.transport is not None
    request.transport.close()
    return web.Response()


@pytest.fixture
async def server(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[Server, Kube]]:
    monkeypatch.setattr(kube_module, "RETRY_WAIT", (0.001, 0.002))
    fake = Server()
    fake.release.set()
    async with serving(fake.handle) as host:
        kube = Kube(client.Configuration(host=host))
        try:
            yield fake, kube
        finally:
            fake.release.set()
            await kube.close()


JOBS = "/apis/resticmanager.io/v1alpha1/namespaces/ns/resticjobs"


async def test_a_call_the_apiserver_asks_to_make_again_is_made_after_its_wait(server: tuple[Server, Kube]) -> None:
    fake, kube = server
    fake.answers = [reply({"reason": "TooManyRequests"}, 429, {"Retry-After": "0"}), reply(JOB, 201)]
    assert (await kube.create("resticjobs", JOB))["spec"] == JOB["spec"]
    assert fake.arrived == [f"POST {JOBS}"] * 2


async def test_a_read_whose_connection_failed_is_made_again(server: tuple[Server, Kube]) -> None:
    fake, kube = server
    fake.answers = [disconnect, reply(JOB)]
    assert (await kube.get("resticjobs", ObjectKey("ns", "j")))["metadata"]["name"] == "j"
    assert fake.arrived == [f"GET {JOBS}/j"] * 2


async def test_a_create_that_landed_before_its_connection_failed_is_taken_as_made(
        server: tuple[Server, Kube]) -> None:
    fake, kube = server
    stored = {**JOB, "metadata": {**JOB["metadata"], "uid": "u"}}  # type: ignore[dict-item]
    fake.answers = [disconnect, reply({"reason": "AlreadyExists"}, 409), reply(stored)]
    assert (await kube.create("resticjobs", JOB))["metadata"]["uid"] == "u"
    assert fake.arrived == [f"POST {JOBS}", f"POST {JOBS}", f"GET {JOBS}/j"]


async def test_a_create_finding_another_object_of_its_name_is_refused(server: tuple[Server, Kube]) -> None:
    fake, kube = server
    someone_elses = {**JOB, "spec": {"type": "backup", "paths": ["/home"]}}
    fake.answers = [disconnect, reply({"reason": "AlreadyExists"}, 409), reply(someone_elses)]
    with pytest.raises(AlreadyExists):
        await kube.create("resticjobs", JOB)


async def test_a_create_finding_its_name_taken_at_once_is_refused_without_a_read(
        server: tuple[Server, Kube]) -> None:
    fake, kube = server
    fake.answers = [reply({"reason": "AlreadyExists"}, 409)]
    with pytest.raises(AlreadyExists):
        await kube.create("resticjobs", JOB)
    assert fake.arrived == [f"POST {JOBS}"]


async def test_a_server_error_is_not_made_again(server: tuple[Server, Kube]) -> None:
    fake, kube = server
    fake.answers = [reply({"reason": "InternalError", "message": "etcd"}, 500)]
    with pytest.raises(KubeError, match="500 InternalError: etcd"):
        await kube.get("resticjobs", ObjectKey("ns", "j"))
    assert len(fake.arrived) == 1


async def test_a_connection_failing_every_time_gives_up_after_the_attempts(server: tuple[Server, Kube]) -> None:
    fake, kube = server
    fake.answers = [disconnect]
    with pytest.raises(ConnectionFailed):
        await kube.create("resticjobs", JOB)  # a POST: aiohttp itself never sends it twice
    assert fake.arrived == [f"POST {JOBS}"] * kube_module.ATTEMPTS


@pytest.fixture
async def held(server: tuple[Server, Kube]) -> tuple[Server, Kube]:
    fake, kube = server
    fake.release.clear()
    fake.answers = [reply(SECRET)]
    return fake, kube


SECRETS = "GET /api/v1/namespaces/ns/secrets/pw"


def start(call: Awaitable[object]) -> asyncio.Task[object]:
    return asyncio.ensure_future(call)


async def test_overlapping_reads_of_a_secret_share_one_get(held: tuple[Server, Kube]) -> None:
    server, kube = held
    key = ObjectKey("ns", "pw")
    reads = [start(kube.read_secret(key)) for _ in range(3)]
    await server.until(1)
    reads[0].cancel()  # one caller giving up leaves the others their answer
    await asyncio.wait([reads[0]])
    server.release.set()
    assert [read.data for read in await asyncio.gather(*reads[1:])] == [{"password": "secret"}] * 2
    assert reads[0].cancelled() and server.arrived == [SECRETS]
    assert (await kube.read_secret(key)).data == {"password": "secret"}
    assert server.arrived == [SECRETS] * 2  # a read after the answer asks again


async def test_a_missing_secret_is_not_found_for_every_reader_of_the_get(held: tuple[Server, Kube]) -> None:
    server, kube = held
    server.answers = [reply({"reason": "NotFound", "message": "secrets \"pw\" not found"}, 404)]
    reads = [start(kube.read_secret(ObjectKey("ns", "pw"))) for _ in range(2)]
    await server.until(1)
    server.release.set()
    results = await asyncio.gather(*reads, return_exceptions=True)
    assert all(isinstance(result, NotFound) for result in results) and server.arrived == [SECRETS]


@pytest.mark.parametrize(("server", "no_proxy", "expected"), [
    ("https://10.0.0.1:6443", "", "http://proxy.example:3128"),
    ("https://10.0.0.1:6443", "10.0.0.1,.cluster.local", None),
    ("https://kubernetes.default.svc.cluster.local", "10.0.0.1,.cluster.local", None),
])
def test_the_environment_names_the_apiserver_proxy_unless_no_proxy_says_otherwise(
        monkeypatch: pytest.MonkeyPatch, server: str, no_proxy: str, expected: str | None) -> None:
    for name in ("HTTPS_PROXY", "HTTP_PROXY", "NO_PROXY", "https_proxy", "http_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    monkeypatch.setenv("NO_PROXY", no_proxy)
    assert kube_module.environment_proxy(server) == expected


async def test_calls_go_through_the_environments_proxy_and_carry_no_netrc_credentials(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    """The apiserver's name does not resolve: a call answered came through the proxy, which
    the environment named when the client was made."""
    headers: list[str | None] = []

    async def proxy(request: web.Request) -> web.StreamResponse:
        headers.append(request.headers.get("Authorization"))
        return web.json_response({**JOB, "seen": str(request.url)})

    netrc = tmp_path / "netrc"
    netrc.write_text("machine apiserver.invalid login someone password leaked\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    for name in ("NO_PROXY", "no_proxy", "http_proxy"):
        monkeypatch.delenv(name, raising=False)
    async with serving(proxy) as address:
        monkeypatch.setenv("HTTP_PROXY", address)
        kube = Kube(client.Configuration(host="http://apiserver.invalid"))
        try:
            got = await kube.get("resticjobs", ObjectKey("ns", "j"))
        finally:
            await kube.close()
    assert got["seen"] == f"http://apiserver.invalid{JOBS}/j"
    assert headers == [None]
