"""The ResticJob watch without an apiserver: Kube.watch against a small HTTP server that
streams a watch's lines, and watch.py's list-and-watch loop against a scripted API."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import kubernetes.client
import pytest
from aiohttp import web

from restic_manager.operator import watch as watch_module
from restic_manager.operator.kube import Gone, Kube, KubeError
from restic_manager.operator.store import Change, Job, ObjectKey, Store
from restic_manager.operator.watch import Watch
from support.http_server import serving


def job(name: str, version: str, namespace: str = "ns", uid: str | None = None) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": namespace, "uid": uid or f"uid-{name}",
                         "resourceVersion": version},
            "spec": {"agent": "web-01", "repository": "offsite", "type": "backup"}}


def line(kind: str, obj: dict[str, Any]) -> bytes:
    return json.dumps({"type": kind, "object": obj}).encode() + b"\n"


# --- Kube.watch against a server that streams what it is given ------------------------------------


class StreamServer:
    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.status = 200
        self.queries: list[dict[str, str]] = []
        self.paths: list[str] = []

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.queries.append(dict(request.query))
        self.paths.append(request.path)
        if self.status != 200:
            return web.json_response({"kind": "Status", "code": self.status, "reason": "Expired",
                                      "message": "too old resource version"}, status=self.status)
        response = web.StreamResponse()
        await response.prepare(request)
        with contextlib.suppress(ConnectionResetError):  # a client that stopped at an error
            for chunk in self.chunks:
                await response.write(chunk)
                await asyncio.sleep(0.01)  # each chunk its own read
            await response.write_eof()
        return response


@pytest.fixture
async def streamed() -> AsyncIterator[tuple[StreamServer, Kube]]:
    server = StreamServer()
    async with serving(server.handle) as host:
        kube = Kube(kubernetes.client.Configuration(host=host))
        try:
            yield server, kube
        finally:
            await kube.close()


async def events(kube: Kube, namespace: str | None = "ns", version: str = "7") -> list[tuple[str, str]]:
    return [(kind, obj["metadata"]["resourceVersion"])
            async for kind, obj in kube.watch("resticjobs", namespace, version)]


async def test_a_watch_yields_its_events_however_the_stream_is_cut(streamed: tuple[StreamServer, Kube]) -> None:
    server, kube = streamed
    stream = (line("ADDED", job("a", "8")) + line("MODIFIED", job("a", "9")) + b"\n"
              + line("BOOKMARK", {"kind": "ResticJob", "metadata": {"resourceVersion": "12"}})
              + line("DELETED", job("a", "13")))
    server.chunks = [stream[:5], stream[5:70], stream[70:71], stream[71:]]
    assert await events(kube) == [("ADDED", "8"), ("MODIFIED", "9"), ("BOOKMARK", "12"), ("DELETED", "13")]
    assert server.paths == ["/apis/resticmanager.io/v1alpha1/namespaces/ns/resticjobs"]
    assert server.queries == [{"watch": "true", "resourceVersion": "7", "allowWatchBookmarks": "true",
                               "timeoutSeconds": "300"}]


async def test_a_cluster_wide_watch_asks_for_every_namespace(streamed: tuple[StreamServer, Kube]) -> None:
    server, kube = streamed
    assert await events(kube, namespace=None) == []
    assert server.paths == ["/apis/resticmanager.io/v1alpha1/resticjobs"]


async def test_an_expired_version_is_gone_in_an_error_event_or_a_response(
        streamed: tuple[StreamServer, Kube]) -> None:
    server, kube = streamed
    server.chunks = [line("ADDED", job("a", "8")),
                     line("ERROR", {"kind": "Status", "code": 410, "reason": "Expired", "message": "too old"})]
    seen: list[str] = []
    with pytest.raises(Gone, match="watch resticjobs in ns: 410 Expired: too old"):
        async for kind, _ in kube.watch("resticjobs", "ns", "7"):
            seen.append(kind)
    assert seen == ["ADDED"]
    server.status = 410
    with pytest.raises(Gone):
        await events(kube)


async def test_a_refused_watch_and_a_garbled_line_are_errors(streamed: tuple[StreamServer, Kube]) -> None:
    server, kube = streamed
    server.status = 403
    with pytest.raises(KubeError, match="watch resticjobs in ns: 403") as refused:
        await events(kube)
    assert type(refused.value) is KubeError
    server.status = 200
    server.chunks = [b"<html>proxy error</html>\n"]
    with pytest.raises(KubeError, match="not a watch event"):
        await events(kube)
    server.chunks = [b'{"type": "ADDED", "object": null}\n']
    with pytest.raises(KubeError, match="an event of type ADDED without an object"):
        await events(kube)


# --- watch.py's loop against a scripted API -------------------------------------------------------


class ScriptedKube:
    """Each watch call plays the next script: its events, then an end (None) or an error;
    with no script left, the watch stays open."""

    def __init__(self, listing: list[dict[str, Any]], listed_at: str) -> None:
        self.listing, self.listed_at = listing, listed_at
        self.scripts: list[tuple[list[tuple[str, dict[str, Any]]], Exception | None]] = []
        self.watches: list[tuple[str | None, str]] = []
        self.lists: list[list[str] | None] = []

    async def list_objects(self, plural: str, namespaces: list[str] | None, *,
                           field_selector: str = "") -> tuple[list[Any], str]:
        self.lists.append(namespaces)
        return self.listing, self.listed_at

    async def watch(self, plural: str, namespace: str | None, version: str, *,
                    field_selector: str = "") -> AsyncIterator[tuple[str, dict[str, Any]]]:
        self.watches.append((namespace, version))
        if not self.scripts:
            await asyncio.Event().wait()
        played, error = self.scripts.pop(0)
        for event in played:
            yield event
        if error is not None:
            raise error


class Clock:
    """Each reading is ``step`` seconds after the last: every watch "lasts" that long."""

    def __init__(self, step: float) -> None:
        self.now, self.step = 0.0, step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


# Taken before any test replaces asyncio.sleep (which watch.py's waits go through).
pause = asyncio.sleep


async def run_until(watch: Watch[Job], version: str, done: Any) -> None:
    task = asyncio.ensure_future(watch.run(version))
    try:
        for _ in range(500):
            if done():
                return
            await pause(0.01)
        raise AssertionError("the watch did not get there")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


@pytest.fixture(autouse=True)
def quick_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(watch_module, "BACKOFF", (0.01, 0.02))


def names(changes: list[Change[Job]]) -> list[tuple[str | None, str | None]]:
    return [(change.old.key.name if change.old else None, change.new.key.name if change.new else None)
            for change in changes]


async def test_events_change_the_store_and_each_watch_resumes_from_the_last_version() -> None:
    store, changes = Store(), []
    kube = ScriptedKube([], "5")
    kube.scripts = [([("ADDED", job("a", "6")), ("ADDED", job("b", "7")), ("MODIFIED", job("a", "8")),
                      ("ADDED", job("a", "8"))], None),  # the same version again: no change
                    ([("BOOKMARK", {"metadata": {"resourceVersion": "20"}}), ("DELETED", job("b", "21"))], None),
                    ([], KubeError("watch resticjobs in ns: ServerDisconnectedError"))]
    watch = Watch(kube, "resticjobs", ["ns"], collection=store.jobs, changed=changes.append,  # type: ignore[arg-type]
                  clock=Clock(5.0))
    await run_until(watch, "5", lambda: len(kube.watches) == 4)
    assert kube.watches == [("ns", "5"), ("ns", "8"), ("ns", "21"), ("ns", "21")]
    assert kube.lists == []  # nothing was Gone: never listed again
    assert names(changes) == [(None, "a"), (None, "b"), ("a", "a"), ("b", None)]
    assert [job.key for job in store.jobs] == [ObjectKey("ns", "a")]


async def test_a_gone_version_lists_again_and_drops_what_the_listing_lacks() -> None:
    store, changes = Store(), []
    store.jobs.upsert(job("kept", "3"))
    store.jobs.upsert(job("deleted-meanwhile", "4"))
    kube = ScriptedKube([job("kept", "3"), job("new", "40")], "50")
    kube.scripts = [([], Gone("watch resticjobs in ns: 410 Expired"))]
    watch = Watch(kube, "resticjobs", ["ns"], collection=store.jobs, changed=changes.append,  # type: ignore[arg-type]
                  clock=Clock(5.0))
    await run_until(watch, "5", lambda: len(kube.watches) == 2)
    assert kube.lists == [["ns"]]
    assert kube.watches == [("ns", "5"), ("ns", "50")]
    assert sorted(names(changes), key=str) == sorted([(None, "new"), ("deleted-meanwhile", None)], key=str)
    assert sorted(job.key.name for job in store.jobs) == ["kept", "new"]


async def test_each_namespace_has_its_watch_and_a_failing_one_backs_off_alone() -> None:
    store, changes = Store(), []
    kube = ScriptedKube([], "5")
    kube.scripts = [([], KubeError("watch resticjobs in a: 500"))] * 3
    watch = Watch(kube, "resticjobs", ["a", "b"], collection=store.jobs, changed=changes.append,  # type: ignore[arg-type]
                  clock=Clock(0.0))  # every watch ends at once
    await run_until(watch, "5", lambda: len(kube.watches) >= 5)
    assert {namespace for namespace, _ in kube.watches} == {"a", "b"}
    assert all(version == "5" for _, version in kube.watches)


async def test_a_watch_that_ends_at_once_is_not_made_again_in_a_tight_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    waits: list[float] = []
    async def sleep(seconds: float) -> None:
        waits.append(seconds)
        await pause(0)

    monkeypatch.setattr(watch_module.asyncio, "sleep", sleep)
    monkeypatch.setattr(watch_module, "BACKOFF", (0.5, 30.0))
    kube = ScriptedKube([], "5")
    kube.scripts = [([], None)] * 9 + [([("ADDED", job("a", "6"))], None), ([], None)]
    watch = Watch(kube, "resticjobs", None, collection=Store().jobs, changed=lambda change: None,  # type: ignore[arg-type]
                  clock=Clock(0.0))
    await run_until(watch, "5", lambda: len(kube.watches) == 12)
    # Empty at once: waits doubling up to the cap; one that delivered: again at once, and the wait starts over.
    assert waits == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0, 0.5]
    assert kube.watches[0] == (None, "5") and kube.watches[-1] == (None, "6")
