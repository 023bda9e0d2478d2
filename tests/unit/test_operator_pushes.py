"""Pushes: each agent gets its whole set, at once, and a burst of changes folds into few pushes."""

from __future__ import annotations

import asyncio
from typing import Any

from restic_manager import protocol
from restic_manager.operator.agents.pushes import Pusher, Versions, schedule_entries
from restic_manager.operator.kube.api import ObjectKey
from restic_manager.operator.kube.cache import Schedule
from support.operator_fakes import FakeSession


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


async def test_a_burst_of_applies_is_one_push_per_agent() -> None:
    agents = {ObjectKey("ns", f"web-{index}"): FakeSession() for index in range(3)}
    sets: dict[ObjectKey, list[Schedule]] = {agent: [] for agent in agents}
    sentinel, last = ObjectKey("ns", "sentinel"), FakeSession()
    sessions = {**agents, sentinel: last}
    sets[sentinel] = [schedule("s", "0 2 * * *")]
    pusher = Pusher(schedules_of=lambda agent: sets[agent], session_of=sessions.get)  # type: ignore[arg-type]
    task = asyncio.create_task(pusher.run())
    try:
        for index in range(20):  # twenty Schedules applied in one go, each to every agent
            for agent in agents:
                sets[agent].append(schedule(f"s{index}", "0 2 * * *"))
            pusher.request(agents)
        pusher.request([sentinel])  # requested last, so pushed after every push the burst caused
        async with asyncio.timeout(5):
            await last.arrived.wait()
    finally:
        task.cancel()
    for session in agents.values():
        [pushed] = session.sent
        assert isinstance(pushed, protocol.ScheduleSet) and len(pushed.schedules) == 20


class SlowSession(FakeSession):
    """A connection whose first send waits until the test lets it through."""

    def __init__(self) -> None:
        super().__init__()
        self.sending = asyncio.Queue[protocol.Payload]()
        self.release = asyncio.Event()

    async def send(self, payload: protocol.Payload) -> bool:
        await self.sending.put(payload)
        if not self.sent:
            await self.release.wait()
        return await super().send(payload)


async def test_applies_made_while_a_push_is_under_way_become_one_more_push() -> None:
    agent, session = ObjectKey("ns", "web-01"), SlowSession()
    sets: dict[ObjectKey, list[Schedule]] = {agent: [schedule("s0", "0 2 * * *")]}
    pusher = Pusher(schedules_of=lambda key: list(sets[key]), session_of={agent: session}.get)  # type: ignore[arg-type]
    task = asyncio.create_task(pusher.run())
    try:
        pusher.request([agent])  # served at once: no window to wait out
        async with asyncio.timeout(5):
            first = await session.sending.get()
            for index in range(1, 10):
                sets[agent].append(schedule(f"s{index}", "0 2 * * *"))
                pusher.request([agent])
            session.release.set()
            second = await session.sending.get()
    finally:
        task.cancel()
    assert [len(p.schedules) for p in (first, second)] == [1, 10]  # type: ignore[attr-defined]
    assert session.sending.empty()


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
