"""Coalescing: bursts of changes become one push per agent and one status write per object."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from restic_manager import protocol
from restic_manager.operator.coalesce import Coalescer, CoalescingLoop
from restic_manager.operator.pushes import Pusher, Versions, schedule_entries
from restic_manager.operator.store import ObjectKey, Schedule


def test_marking_again_never_postpones_a_deadline() -> None:
    pending: Coalescer[str] = Coalescer()
    assert pending.mark("a", now=0.0, delay=1.0)       # first deadline: wake the loop
    assert not pending.mark("a", now=0.5, delay=1.0)   # later mark: deadline stays 1.0
    assert pending.next_deadline() == 1.0
    assert pending.mark("a", now=0.5, delay=0.0)       # an urgent mark moves it earlier
    assert pending.next_deadline() == 0.5


def test_due_keys_come_out_once_earliest_first() -> None:
    pending: Coalescer[str] = Coalescer()
    pending.mark("late", now=0.0, delay=3.0)
    pending.mark("early", now=0.0, delay=1.0)
    pending.mark("middle", now=0.0, delay=2.0)
    assert pending.pop_due(2.0) == ["early", "middle"]
    assert pending.pop_due(2.5) == []
    assert pending.pop_due(3.0) == ["late"]
    assert len(pending) == 0 and pending.next_deadline() is None


SENTINEL = "sentinel"


class Recorder:
    """Work that records its keys; a ``sentinel`` key marks the end of a test's burst."""

    def __init__(self, fail_first: int = 0) -> None:
        self.calls: list[str] = []
        self.fail_first = fail_first
        self.finished = asyncio.Event()

    async def __call__(self, key: str) -> None:
        if key == SENTINEL:
            self.finished.set()
            return
        self.calls.append(key)
        if len(self.calls) <= self.fail_first:
            raise RuntimeError("transient")


async def run_burst(loop: CoalescingLoop[str], recorder: Recorder, *, after: float) -> None:
    """Run the loop until a sentinel marked ``after`` seconds out has been worked on: the
    burst's deadlines are all earlier, so everything it caused has run by then."""
    loop.mark(SENTINEL, delay=after)
    task = asyncio.create_task(loop.run())
    try:
        async with asyncio.timeout(5):
            await recorder.finished.wait()
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_a_burst_on_one_key_is_one_piece_of_work() -> None:
    recorder = Recorder()
    loop = CoalescingLoop("test", recorder)
    for _ in range(1000):
        loop.mark("schedule", delay=0.02)
    await run_burst(loop, recorder, after=0.1)
    assert recorder.calls == ["schedule"]


async def test_a_burst_on_many_keys_is_one_piece_of_work_each() -> None:
    recorder = Recorder()
    loop = CoalescingLoop("test", recorder)
    for _ in range(3):
        for index in range(50):
            loop.mark(f"agent-{index}", delay=0.02)
    await run_burst(loop, recorder, after=0.1)
    assert sorted(recorder.calls) == sorted(f"agent-{index}" for index in range(50))


async def test_failed_work_is_retried() -> None:
    recorder = Recorder(fail_first=1)
    loop = CoalescingLoop("test", recorder, retry_delay=0.01)
    loop.mark("schedule")
    await run_burst(loop, recorder, after=0.2)
    assert recorder.calls == ["schedule", "schedule"]


def test_set_versions_increase_even_when_the_clock_goes_back() -> None:
    times = iter([100.0, 100.0, 50.0, 200.0])
    versions = Versions(clock=lambda: next(times))
    produced = [versions.next() for _ in range(4)]
    assert produced == [100000, 100001, 100002, 200000]


def schedule(name: str, expression: str, *, generation: int = 1, suspend: bool = False) -> Schedule:
    return Schedule.from_body({
        "metadata": {"name": name, "namespace": "ns", "uid": f"uid-{name}", "generation": generation,
                     "resourceVersion": "1", "creationTimestamp": "2026-01-01T00:00:00Z"},
        "spec": {"agent": "web-01", "repository": "r", "schedule": expression, "timeZone": "Europe/London",
                 "suspend": suspend, "template": {"type": "prune"}},
    })


def test_entries_carry_the_resolved_expression() -> None:
    [entry] = schedule_entries([schedule("nightly", "H 2 * * *", generation=3, suspend=True)])
    assert entry.id == "ns/nightly" and entry.uid == "uid-nightly" and entry.generation == 3
    assert entry.time_zone == "Europe/London" and entry.suspend is True
    assert "H" not in entry.schedule and entry.schedule.endswith(" 2 * * *")


def test_an_expression_that_does_not_compile_is_sent_for_the_agent_to_reject() -> None:
    [entry] = schedule_entries([schedule("broken", "61 * * * *")])
    assert entry.schedule == "61 * * * *"


class FakeSession:
    def __init__(self) -> None:
        self.sent: list[protocol.Payload] = []
        self.pushed: tuple[protocol.ScheduleEntry, ...] | None = None
        self.open = True
        self.arrived = asyncio.Event()

    async def send(self, payload: protocol.Payload) -> bool:
        self.sent.append(payload)
        self.arrived.set()
        return True


async def test_a_burst_of_applies_is_one_push_per_agent() -> None:
    agents = {ObjectKey("ns", f"web-{index}"): FakeSession() for index in range(3)}
    sets: dict[ObjectKey, list[Schedule]] = {agent: [] for agent in agents}
    sentinel, last = ObjectKey("ns", "sentinel"), FakeSession()
    sessions = {**agents, sentinel: last}
    sets[sentinel] = [schedule("s", "0 2 * * *")]
    pusher = Pusher(schedules_of=lambda agent: sets[agent], session_of=sessions.get, window=0.02)  # type: ignore[arg-type]
    task = asyncio.create_task(pusher.run())
    try:
        for index in range(20):  # twenty Schedules applied in one go, each to every agent
            for agent in agents:
                sets[agent].append(schedule(f"s{index}", "0 2 * * *"))
            pusher.request(agents)
        # A request due later than the burst is pushed after every push the burst caused.
        pusher.request([sentinel], delay=0.1)
        async with asyncio.timeout(5):
            await last.arrived.wait()
    finally:
        task.cancel()
    for session in agents.values():
        [pushed] = session.sent
        assert isinstance(pushed, protocol.ScheduleSet) and len(pushed.schedules) == 20


async def test_an_unchanged_set_is_not_pushed_again() -> None:
    agent = ObjectKey("ns", "web-01")
    session = FakeSession()
    sets: dict[ObjectKey, Any] = {agent: [schedule("nightly", "0 2 * * *")]}
    pusher = Pusher(schedules_of=lambda key: sets[key], session_of={agent: session}.get)  # type: ignore[arg-type]
    await pusher.push(agent)
    await pusher.push(agent)
    assert len(session.sent) == 1
    sets[agent] = []
    await pusher.push(agent)
    assert [len(p.schedules) for p in session.sent] == [1, 0]  # type: ignore[attr-defined]
    first, second = session.sent
    assert second.version > first.version  # type: ignore[attr-defined]


async def test_no_push_to_an_agent_that_is_not_connected() -> None:
    pusher = Pusher(schedules_of=lambda key: [], session_of=lambda key: None)
    await pusher.push(ObjectKey("ns", "web-01"))  # nothing to send to, nothing raised
