"""The Event recorder (operator/kube/events.py): one Event per object, type, reason and message,
its count raised when it happens again, posted without ever holding up the caller."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from typing import Any

import pytest

from restic_manager.operator.kube import events as events_module
from restic_manager.operator.kube.api import ObjectKey
from restic_manager.operator.kube.client import AlreadyExists, KubeError, NotFound
from restic_manager.operator.kube.events import Recorder, event_name, involved

NOW = datetime(2026, 3, 2, 2, 0, tzinfo=timezone.utc)
JOB = involved("ResticJob", ObjectKey("ns", "nightly-web-01-1"), "uid-1")


class FakeEvents:
    """The Events API: Events by name, and every call made."""

    def __init__(self) -> None:
        self.stored: dict[str, dict[str, Any]] = {}
        self.calls: list[str] = []
        self.failures = 0  # this many calls fail as if the apiserver did not answer
        self.called = asyncio.Condition()

    async def _call(self, what: str) -> None:
        async with self.called:
            self.calls.append(what)
            self.called.notify_all()
        if self.failures:
            self.failures -= 1
            raise KubeError(f"{what}: 503", status=503)

    async def post_event(self, about: dict[str, Any], *, name: str, count: int, now: datetime, **event: Any) -> None:
        await self._call("post")
        if name in self.stored:
            raise AlreadyExists("409")
        self.stored[name] = {"about": about, "count": count, "last": now, **event}

    async def event_count(self, key: ObjectKey) -> int:
        await self._call("get")
        if key.name not in self.stored:
            raise NotFound("404")
        return int(self.stored[key.name]["count"])

    async def bump_event(self, key: ObjectKey, *, count: int, now: datetime) -> None:
        await self._call("patch")
        if key.name not in self.stored:
            raise NotFound("404")
        self.stored[key.name].update(count=count, last=now)

    async def until(self, calls: int) -> None:
        async with asyncio.timeout(5), self.called:
            await self.called.wait_for(lambda: len(self.calls) >= calls)


@contextlib.asynccontextmanager
async def running(recorder: Recorder) -> AsyncIterator[None]:
    task = asyncio.create_task(recorder.run())
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def recorder_on(api: FakeEvents) -> Recorder:
    return Recorder(api, clock=lambda: NOW)  # type: ignore[arg-type]


async def test_an_event_again_raises_the_count_of_the_one_event() -> None:
    api = FakeEvents()
    recorder = recorder_on(api)
    recorder.record(JOB, type="Warning", reason="WrongPassword", message="the password is wrong")
    recorder.record(JOB, type="Warning", reason="WrongPassword", message="the password is wrong")  # before any post
    async with running(recorder):
        await api.until(1)
        name = event_name(JOB, type="Warning", reason="WrongPassword", message="the password is wrong")
        assert api.stored[name]["count"] == 2 and api.stored[name]["reason"] == "WrongPassword"
        recorder.record(JOB, type="Warning", reason="WrongPassword", message="the password is wrong")
        await api.until(2)
    assert api.calls == ["post", "patch"]  # the count it posted is remembered: no read first
    assert api.stored[name]["count"] == 3 and len(api.stored) == 1


async def test_another_message_is_another_event() -> None:
    api = FakeEvents()
    recorder = recorder_on(api)
    async with running(recorder):
        recorder.record(JOB, type="Normal", reason="Started", message="restic backup started on agent web-01")
        recorder.record(JOB, type="Normal", reason="Completed", message="backup on agent web-01: done")
        await api.until(2)
    assert sorted(e["reason"] for e in api.stored.values()) == ["Completed", "Started"]


async def test_after_a_restart_the_event_found_is_counted_on() -> None:
    api = FakeEvents()
    async with running(first := recorder_on(api)):
        first.record(JOB, type="Warning", reason="Overdue", message="agent web-01: no successful run")
        await api.until(1)
    second = recorder_on(api)  # a new operator process: it knows no counts
    async with running(second):
        second.record(JOB, type="Warning", reason="Overdue", message="agent web-01: no successful run")
        await api.until(4)
    assert api.calls == ["post", "post", "get", "patch"]
    [event] = api.stored.values()
    assert event["count"] == 2


async def test_an_event_the_apiserver_expired_is_posted_anew() -> None:
    api = FakeEvents()
    recorder = recorder_on(api)
    async with running(recorder):
        recorder.record(JOB, type="Normal", reason="Started", message="m")
        await api.until(1)
        api.stored.clear()  # an hour later, gone
        recorder.record(JOB, type="Normal", reason="Started", message="m")
        await api.until(3)
    assert api.calls == ["post", "patch", "post"] and [e["count"] for e in api.stored.values()] == [1]


async def test_an_api_that_does_not_answer_is_tried_again_with_nothing_lost(monkeypatch: pytest.MonkeyPatch) -> None:
    api = FakeEvents()
    api.failures = 1
    recorder = recorder_on(api)
    monkeypatch.setattr(recorder._loop, "_retry_delay", 0.01)
    recorder.record(JOB, type="Warning", reason="Timeout", message="m")
    async with running(recorder):
        await api.until(2)
        recorder.record(JOB, type="Warning", reason="Timeout", message="m")
        await api.until(3)
    [event] = api.stored.values()
    assert event["count"] == 2


async def test_a_storm_of_events_keeps_the_newest_and_logs_what_it_dropped(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(events_module, "QUEUE_LIMIT", 3)
    api = FakeEvents()
    recorder = recorder_on(api)
    for number in range(5):
        recorder.record(JOB, type="Normal", reason="Started", message=f"run {number}")
    assert caplog.text.count("too many Events waiting to be posted; dropped") == 2
    async with running(recorder):
        await api.until(3)
    assert sorted(e["message"] for e in api.stored.values()) == ["run 2", "run 3", "run 4"]


def test_an_events_name_is_the_objects_and_stays_within_the_limit() -> None:
    long = involved("Schedule", ObjectKey("ns", "s" * 253), "uid")
    name = event_name(long, type="Normal", reason="Healthy", message="m")
    assert len(name) <= 253 and name.startswith("sss")
    assert name != event_name(long, type="Normal", reason="Healthy", message="other")
