"""operator/kube.py without an apiserver: the error classes, Retry-After, finalizer patches,
and, against a small HTTP server that holds requests until told, the order of calls
(ResticJob creates first) and the shared Secret reads."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field

import kubernetes.client
import pytest
from aiohttp import web

from restic_manager.operator import kube as kube_module
from restic_manager.operator.kube import (
    AlreadyExists, Conflict, FinalizersSeen, Kube, KubeError, NotFound, api_error, finalizer_patch, retry_after,
    until_warming,
)
from restic_manager.operator.store import FINALIZER, ObjectKey
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
    error = api_error("get x", status, body)
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


def test_connections_are_warmed_shortly_before_each_whole_minute() -> None:
    minute = 1_800_000_000.0  # a whole minute
    assert until_warming(minute) == 57.0
    assert until_warming(minute + 56.5) == 0.5
    assert until_warming(minute + 57.0) == 60.0
    assert until_warming(minute + 59.0) == 58.0


# --- against a server that holds each request until it is released ------------------------------------

SECRET = {"data": {"password": "c2VjcmV0"}}  # "secret"


@dataclass
class HeldServer:
    """Records each request as it arrives ("POST resticjobs", "GET secrets") and answers it
    once ``release`` is set."""

    host: str = ""
    release: asyncio.Event = field(default_factory=asyncio.Event)
    arrived: list[str] = field(default_factory=list)
    secret_status: int = 200
    ports: set[int] = field(default_factory=set)  # the client's side of each connection used

    async def handle(self, request: web.Request) -> web.Response:
        # The plural: the path's last part for a create, the one before the name for a read.
        parts = request.path.split("/")
        assert request.transport is not None
        self.ports.add(request.transport.get_extra_info("peername")[1])
        self.arrived.append(f"{request.method} {parts[-1] if request.method == 'POST' else parts[-2]}")
        await self.release.wait()
        if request.method == "POST":
            return web.json_response({"metadata": {"name": "j", "uid": "u"}}, status=201)
        if self.secret_status != 200:
            return web.json_response({"reason": "NotFound", "message": "secrets \"pw\" not found"},
                                     status=self.secret_status)
        return web.json_response(SECRET)

    async def until(self, count: int) -> None:
        while len(self.arrived) < count:
            await asyncio.sleep(0.005)


@pytest.fixture
async def held() -> AsyncIterator[tuple[HeldServer, Kube]]:
    server = HeldServer()
    async with serving(server.handle) as host:
        server.host = host
        kube = Kube(kubernetes.client.Configuration(host=host))
        try:
            yield server, kube
        finally:
            server.release.set()
            await kube.close()


def job(name: str = "j") -> dict[str, object]:
    return {"apiVersion": "resticmanager.io/v1alpha1", "kind": "ResticJob",
            "metadata": {"name": name, "namespace": "ns"}}


def start(call: Awaitable[object]) -> asyncio.Task[object]:
    return asyncio.ensure_future(call)


async def test_no_other_call_starts_while_a_job_create_is_on_its_way(held: tuple[HeldServer, Kube]) -> None:
    server, kube = held
    create = start(kube.create("resticjobs", job(), first=True))
    await server.until(1)
    read = start(kube.read_secret(ObjectKey("ns", "pw")))
    plain = start(kube.create("agents", job("a")))
    await asyncio.sleep(0.2)
    assert server.arrived == ["POST resticjobs"]  # the others wait for the create
    server.release.set()
    await asyncio.gather(create, read, plain)
    assert sorted(server.arrived[1:]) == ["GET secrets", "POST agents"]


async def test_creates_done_waits_for_the_job_creates_on_their_way(held: tuple[HeldServer, Kube]) -> None:
    server, kube = held
    await asyncio.wait_for(kube.creates_done(), 5)  # none at all: at once
    create = start(kube.create("resticjobs", job(), first=True))
    await server.until(1)
    done = start(kube.creates_done())
    await asyncio.sleep(0.1)
    assert not done.done()
    server.release.set()
    await asyncio.wait_for(asyncio.gather(create, done), 5)


async def test_work_in_the_first_lane_creates_in_the_place_it_holds(
        held: tuple[HeldServer, Kube], monkeypatch: pytest.MonkeyPatch) -> None:
    server, _ = held
    monkeypatch.setattr(kube_module, "FIRST_IN_FLIGHT", 2)
    kube = Kube(kubernetes.client.Configuration(host=server.host))

    async def fire(name: str) -> object:
        async with kube.first_lane():  # as a fire: its decision, then its create
            return await kube.create("resticjobs", job(name), first=True)

    async def refused() -> object:
        async with kube.first_lane():  # as a refused fire: its Event, not marked first
            return await kube.create("events", job("refused"))

    try:
        fires = [start(fire("j0")), start(refused()), start(fire("j1"))]
        # A call asking for a second place, or waiting for the lane to clear, would never come.
        await asyncio.wait_for(server.until(2), 5)
        read = start(kube.read_secret(ObjectKey("ns", "pw")))
        await asyncio.sleep(0.2)
        # Both places make their calls; the third fire and the read wait.
        assert server.arrived == ["POST resticjobs", "POST events"]
        server.release.set()
        await asyncio.wait_for(asyncio.gather(*fires, read), 5)
        assert server.arrived == ["POST resticjobs", "POST events", "POST resticjobs", "GET secrets"]
    finally:
        await kube.close()


async def test_a_job_create_does_not_wait_for_other_calls_on_their_way(held: tuple[HeldServer, Kube]) -> None:
    server, kube = held
    read = start(kube.read_secret(ObjectKey("ns", "pw")))
    await server.until(1)
    create = start(kube.create("resticjobs", job(), first=True))
    await server.until(2)
    assert server.arrived == ["GET secrets", "POST resticjobs"]
    server.release.set()
    await asyncio.gather(read, create)


async def test_overlapping_reads_of_a_secret_share_one_get(held: tuple[HeldServer, Kube]) -> None:
    server, kube = held
    key = ObjectKey("ns", "pw")
    reads = [start(kube.read_secret(key)) for _ in range(3)]
    await server.until(1)
    reads[0].cancel()  # one caller giving up leaves the others their answer
    await asyncio.sleep(0.05)
    server.release.set()
    assert [read.data for read in await asyncio.gather(*reads[1:])] == [{"password": "secret"}] * 2
    assert reads[0].cancelled() and server.arrived == ["GET secrets"]
    assert (await kube.read_secret(key)).data == {"password": "secret"}
    assert server.arrived == ["GET secrets"] * 2  # a read after the answer asks again


async def test_a_missing_secret_is_not_found_for_every_reader_of_the_get(held: tuple[HeldServer, Kube]) -> None:
    server, kube = held
    server.secret_status = 404
    reads = [start(kube.read_secret(ObjectKey("ns", "pw"))) for _ in range(2)]
    await server.until(1)
    server.release.set()
    results = await asyncio.gather(*reads, return_exceptions=True)
    assert all(isinstance(result, NotFound) for result in results) and server.arrived == ["GET secrets"]


async def test_job_creates_beyond_the_limit_wait_their_turn(
    held: tuple[HeldServer, Kube], monkeypatch: pytest.MonkeyPatch
) -> None:
    server, _ = held
    monkeypatch.setattr(kube_module, "FIRST_IN_FLIGHT", 2)
    kube = Kube(kubernetes.client.Configuration(host=server.host))
    try:
        creates = [start(kube.create("resticjobs", job(f"j{i}"), first=True)) for i in range(3)]
        await server.until(2)
        await asyncio.sleep(0.2)
        assert server.arrived == ["POST resticjobs"] * 2  # the third waits for a free slot
        server.release.set()
        await asyncio.gather(*creates)
        assert server.arrived == ["POST resticjobs"] * 3
    finally:
        await kube.close()


async def test_warming_opens_a_connection_per_request_and_the_next_round_reuses_them(
    held: tuple[HeldServer, Kube]
) -> None:
    server, kube = held
    warming = start(kube.warm(5))
    await server.until(5)  # all five in flight at once: each on a connection of its own
    server.release.set()
    await warming
    assert len(server.ports) == 5
    await kube.warm(5)
    assert len(server.arrived) == 10 and len(server.ports) == 5  # the same five, reused


async def test_warming_against_an_unreachable_apiserver_fails_quietly() -> None:
    kube = Kube(kubernetes.client.Configuration(host="http://127.0.0.1:9"))  # discard: nothing listens
    try:
        await kube.warm(3)
    finally:
        await kube.close()
