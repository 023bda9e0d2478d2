"""The agent's scheduler (SPEC §4): what fires when, and a timer that sleeps until then.

The `Scheduler` is pure and is tested with tables of (set, times) → fires; the `Timer`
runs against a ManualClock, so simulated hours pass without real waiting and every sleep
the timer takes is counted.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path

import pytest
from support.fake_operator import ManualClock

from restic_manager import protocol
from restic_manager.agent.scheduler import Scheduler, Timer
from restic_manager.agent.state import Journal, Mailbox, Outbox, StateStore, state_saver


def at(text: str) -> datetime:
    return datetime.fromisoformat(text)


def entry(
    schedule_id: str, schedule: str, *, uid: str | None = None, generation: int = 1,
    time_zone: str = "UTC", suspend: bool = False,
) -> protocol.ScheduleEntry:
    return protocol.ScheduleEntry(
        id=schedule_id, uid=uid or f"uid-{schedule_id}", generation=generation,
        schedule=schedule, time_zone=time_zone, suspend=suspend,
    )


def schedule_set(*entries: protocol.ScheduleEntry, version: int = 1) -> protocol.ScheduleSet:
    return protocol.ScheduleSet(version=version, schedules=list(entries))


def fired(fires: list[protocol.ScheduleFire]) -> list[tuple[str, datetime]]:
    return [(fire.id, fire.scheduled_at) for fire in fires]


# --- apply ---------------------------------------------------------------------------------


def test_apply_replaces_the_whole_set() -> None:
    scheduler = Scheduler()
    scheduler.apply(schedule_set(entry("ns/a", "0 * * * *"), entry("ns/b", "30 * * * *")), now=at("2026-03-02T10:10Z"))
    ack = scheduler.apply(
        schedule_set(entry("ns/b", "30 * * * *"), entry("ns/c", "45 * * * *"), version=2), now=at("2026-03-02T10:20Z")
    )

    assert [(a.id, a.generation) for a in ack.applied] == [("ns/b", 1), ("ns/c", 1)]
    assert sorted(scheduler.cursors()) == ["ns/b", "ns/c"]
    assert fired(scheduler.due(at("2026-03-02T11:00Z"))) == [
        ("ns/b", at("2026-03-02T10:30Z")), ("ns/c", at("2026-03-02T10:45Z")),
    ]


def test_an_empty_set_disables_every_timed_job() -> None:
    scheduler = Scheduler()
    scheduler.apply(schedule_set(entry("ns/a", "* * * * *")), now=at("2026-03-02T10:00Z"))
    ack = scheduler.apply(schedule_set(version=2), now=at("2026-03-02T10:00:30Z"))

    assert (ack.applied, ack.rejected) == ([], [])
    assert scheduler.next_wake() is None
    assert scheduler.due(at("2026-03-03T10:00Z")) == []


@pytest.mark.parametrize(
    ("schedule", "time_zone", "message"),
    [
        ("61 * * * *", "UTC", "'61 * * * *': minute must be 0-59"),
        ("0 2 * * *", "Mars/Olympus_Mons", "unknown time zone 'Mars/Olympus_Mons'"),
        ("0 2 30 2 *", "UTC", "never occurs"),
        ("every day", "UTC", "every day"),
    ],
)
def test_a_bad_cron_or_zone_is_rejected_with_the_reason(schedule: str, time_zone: str, message: str) -> None:
    scheduler = Scheduler()
    now = at("2026-03-02T10:00Z")
    ack = scheduler.apply(
        schedule_set(entry("ns/good", "0 * * * *"), entry("ns/bad", schedule, generation=3, time_zone=time_zone),
                     version=7),
        now=now,
    )

    assert (ack.version, ack.applied_at) == (7, now)
    assert [(a.id, a.generation) for a in ack.applied] == [("ns/good", 1)]
    [rejected] = ack.rejected
    assert (rejected.id, rejected.generation) == ("ns/bad", 3)
    assert message in rejected.error
    assert sorted(scheduler.cursors()) == ["ns/good"]


def test_a_duplicate_schedule_id_is_rejected() -> None:
    ack = Scheduler().apply(
        schedule_set(entry("ns/a", "0 * * * *"), entry("ns/a", "5 * * * *", generation=2)), now=at("2026-03-02T10:00Z")
    )

    assert [a.generation for a in ack.applied] == [1]
    assert [(r.id, r.generation) for r in ack.rejected] == [("ns/a", 2)]
    assert "more than once" in ack.rejected[0].error


def test_a_suspended_schedule_is_applied_but_never_fires() -> None:
    scheduler = Scheduler()
    ack = scheduler.apply(schedule_set(entry("ns/a", "* * * * *", suspend=True)), now=at("2026-03-02T10:00Z"))

    assert [a.id for a in ack.applied] == ["ns/a"]
    assert scheduler.next_wake() is None
    assert scheduler.due(at("2026-03-02T12:00Z")) == []


def test_a_resumed_schedule_does_not_fire_for_times_while_it_was_suspended() -> None:
    scheduler = Scheduler()
    scheduler.apply(schedule_set(entry("ns/a", "0 * * * *")), now=at("2026-03-02T09:30Z"))
    scheduler.apply(schedule_set(entry("ns/a", "0 * * * *", generation=2, suspend=True)), now=at("2026-03-02T09:45Z"))
    scheduler.apply(schedule_set(entry("ns/a", "0 * * * *", generation=3)), now=at("2026-03-02T12:30Z"))

    assert scheduler.due(at("2026-03-02T12:30Z")) == []
    assert scheduler.next_wake() == at("2026-03-02T13:00Z")


# --- due -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("schedule", "applied", "now", "fire"),
    [
        # on time
        ("0 * * * *", "2026-03-02T10:30Z", "2026-03-02T11:00Z", "2026-03-02T11:00Z"),
        # a late wake-up fires the nominal time, not "now"
        ("0 * * * *", "2026-03-02T10:30Z", "2026-03-02T11:00:07.5Z", "2026-03-02T11:00Z"),
        # clock jump / suspend over three fire times: only the newest, once
        ("0 * * * *", "2026-03-02T10:30Z", "2026-03-02T13:45Z", "2026-03-02T13:00Z"),
        ("0 2 * * *", "2026-03-02T12:00Z", "2026-03-05T03:00Z", "2026-03-05T02:00Z"),
        # seconds-level schedule fires on the second
        ("*/10 * * * * *", "2026-03-02T10:00:03Z", "2026-03-02T10:00:10.4Z", "2026-03-02T10:00:10Z"),
        ("*/10 * * * * *", "2026-03-02T10:00:03Z", "2026-03-02T10:00:59Z", "2026-03-02T10:00:50Z"),
        # nothing due yet
        ("0 * * * *", "2026-03-02T10:30Z", "2026-03-02T10:59:59.9Z", None),
        # a new schedule does not fire for times before it was applied
        ("30 10 * * *", "2026-03-02T10:30:01Z", "2026-03-02T10:30:01Z", None),
    ],
)
def test_due_fires_the_newest_passed_time_once(schedule: str, applied: str, now: str, fire: str | None) -> None:
    scheduler = Scheduler()
    scheduler.apply(schedule_set(entry("ns/a", schedule, generation=4)), now=at(applied))

    fires = scheduler.due(at(now))

    assert fired(fires) == ([("ns/a", at(fire))] if fire else [])
    assert all((f.uid, f.generation) == ("uid-ns/a", 4) for f in fires)
    assert scheduler.due(at(now)) == []  # and only once


def test_the_timer_sleeps_until_the_earliest_next_fire() -> None:
    scheduler = Scheduler()
    scheduler.apply(
        schedule_set(entry("ns/hourly", "0 * * * *"), entry("ns/quarter", "*/15 * * * *"),
                     entry("ns/off", "* * * * *", suspend=True)),
        now=at("2026-03-02T10:20Z"),
    )
    assert scheduler.next_wake() == at("2026-03-02T10:30Z")
    scheduler.due(at("2026-03-02T10:30Z"))
    assert scheduler.next_wake() == at("2026-03-02T10:45Z")


def test_a_clock_that_goes_back_fires_nothing_twice() -> None:
    scheduler = Scheduler()
    scheduler.apply(schedule_set(entry("ns/a", "0 * * * *")), now=at("2026-03-02T10:30Z"))
    assert fired(scheduler.due(at("2026-03-02T13:10Z"))) == [("ns/a", at("2026-03-02T13:00Z"))]

    assert scheduler.due(at("2026-03-02T11:30Z")) == []
    assert scheduler.due(at("2026-03-02T13:10Z")) == []
    assert scheduler.next_wake() == at("2026-03-02T14:00Z")


@pytest.mark.parametrize(
    ("uid", "expected"),
    [
        ("uid-ns/a", [("ns/a", at("2026-03-02T13:00Z"))]),  # a new generation keeps its last fire
        ("uid-recreated", []),  # deleted and re-created: a new schedule
    ],
)
def test_a_new_generation_keeps_the_last_fire_time(uid: str, expected: list[tuple[str, datetime]]) -> None:
    scheduler = Scheduler()
    scheduler.apply(schedule_set(entry("ns/a", "0 * * * *")), now=at("2026-03-02T10:30Z"))
    scheduler.due(at("2026-03-02T11:00Z"))

    # 13:00 went by unseen (say the host slept), then generation 2 arrives
    scheduler.apply(schedule_set(entry("ns/a", "0 * * * *", uid=uid, generation=2), version=2),
                    now=at("2026-03-02T13:30Z"))

    fires = scheduler.due(at("2026-03-02T13:30Z"))
    assert fired(fires) == expected
    assert all(f.generation == 2 for f in fires)


def test_schedules_with_one_expression_fire_by_their_own_zone_and_name() -> None:
    # Schedules share a Cron when their times are the same; a zone or an H spread tells them apart.
    scheduler = Scheduler()
    scheduler.apply(schedule_set(
        entry("ns/utc", "0 2 * * *"), entry("ns/utc-too", "0 2 * * *"),
        entry("ns/tokyo", "0 2 * * *", time_zone="Asia/Tokyo"),
        entry("ns/spread-a", "H 2 * * *"), entry("ns/spread-b", "H 2 * * *"),
    ), now=at("2026-03-02T00:00Z"))

    fires = {fire.id: fire.scheduled_at for fire in scheduler.due(at("2026-03-03T03:00Z"))}

    assert fires["ns/utc"] == fires["ns/utc-too"] == at("2026-03-03T02:00Z")
    assert fires["ns/tokyo"] == at("2026-03-03T02:00+09:00")
    assert fires["ns/spread-a"] != fires["ns/spread-b"]


def test_daylight_saving_time_comes_from_cron() -> None:
    # Europe/London goes back at 02:00 BST on 2026-10-25: 01:30 happens twice, a fixed-time
    # schedule fires at the first one only.
    scheduler = Scheduler()
    scheduler.apply(schedule_set(entry("ns/a", "30 1 * * *", time_zone="Europe/London")), now=at("2026-10-24T23:00Z"))

    # (compared as text: Python never calls a time in a repeated hour equal to one in another zone)
    assert [f.scheduled_at.isoformat() for f in scheduler.due(at("2026-10-25T00:30Z"))] == ["2026-10-25T01:30:00+01:00"]
    assert scheduler.due(at("2026-10-25T01:30Z")) == []
    assert scheduler.next_wake() == at("2026-10-26T01:30+00:00")


# --- restart with persisted state ------------------------------------------------------------


async def test_a_fire_missed_while_the_agent_was_down_runs_once_after_restart(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.json")
    before = Scheduler()
    before.apply(schedule_set(entry("ns/nightly", "0 2 * * *")), now=at("2026-03-01T12:00Z"))
    before.due(at("2026-03-02T02:00Z"))
    await state_saver(store, cursors=before.cursors, outbox=Outbox(), journal=Journal())()
    # the agent is down from 2026-03-02T03:00 until 2026-03-05T12:00

    after = Scheduler(store.load().cursors)
    after.apply(
        schedule_set(entry("ns/nightly", "0 2 * * *"), entry("ns/brand-new", "0 2 * * *")), now=at("2026-03-05T12:00Z")
    )

    assert fired(after.due(at("2026-03-05T12:00Z"))) == [("ns/nightly", at("2026-03-05T02:00Z"))]
    assert after.due(at("2026-03-05T12:00Z")) == []


async def test_a_schedule_applied_but_never_fired_catches_up_after_restart(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.json")
    before = Scheduler()
    before.apply(schedule_set(entry("ns/nightly", "0 2 * * *")), now=at("2026-03-01T12:00Z"))
    await state_saver(store, cursors=before.cursors, outbox=Outbox(), journal=Journal())()

    after = Scheduler(store.load().cursors)
    after.apply(schedule_set(entry("ns/nightly", "0 2 * * *")), now=at("2026-03-02T09:00Z"))

    assert fired(after.due(at("2026-03-02T09:00Z"))) == [("ns/nightly", at("2026-03-02T02:00Z"))]


# --- the timer -------------------------------------------------------------------------------


async def nothing_to_save() -> None:
    pass


class Harness:
    """A Timer on a ManualClock whose fires are collected, each delivery's apart (and posted
    to a mailbox, if given)."""

    def __init__(self, start: datetime, *, mailbox: Mailbox | None = None) -> None:
        self.clock = ManualClock(start)
        self.deliveries: list[list[protocol.ScheduleFire]] = []
        self.scheduler = Scheduler()

        async def deliver(fires: list[protocol.ScheduleFire]) -> None:
            self.deliveries.append(fires)
            if mailbox is not None:
                await mailbox.post_many(fires)

        self.timer = Timer(self.scheduler, clock=self.clock, deliver=deliver, save=nothing_to_save)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        task = asyncio.create_task(self.timer.run())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    @property
    def fires(self) -> list[protocol.ScheduleFire]:
        return [fire for delivery in self.deliveries for fire in delivery]


async def test_the_timer_wakes_once_per_fire_not_every_second() -> None:
    harness = Harness(at("2026-03-02T10:00:30Z"))
    async with harness.running():
        await harness.timer.apply(schedule_set(entry("ns/hourly", "0 * * * *")))
        await harness.clock.run_until(at("2026-03-02T13:00:30Z"))

    assert fired(harness.fires) == [
        ("ns/hourly", at("2026-03-02T11:00Z")), ("ns/hourly", at("2026-03-02T12:00Z")),
        ("ns/hourly", at("2026-03-02T13:00Z")),
    ]
    # one sleep towards each fire, and the one it is in now
    assert harness.clock.sleeps == [at(f"2026-03-02T{hour}:00Z") for hour in (11, 12, 13, 14)]


async def test_a_new_set_wakes_the_timer_early() -> None:
    harness = Harness(at("2026-03-02T10:00:30Z"))
    async with harness.running():
        await harness.timer.apply(schedule_set(entry("ns/daily", "0 2 * * *")))
        assert await harness.clock.asleep() == at("2026-03-03T02:00Z")
        sleeps = len(harness.clock.sleeps)

        await harness.timer.apply(
            schedule_set(entry("ns/daily", "0 2 * * *"), entry("ns/q", "*/15 * * * *"), version=2)
        )

        assert await harness.clock.asleep(after=sleeps) == at("2026-03-02T10:15Z")
        assert len(harness.clock.sleeps) == sleeps + 1


async def test_a_clock_jump_while_asleep_fires_the_newest_time_once() -> None:
    harness = Harness(at("2026-03-02T10:00:30Z"))
    async with harness.running():
        await harness.timer.apply(schedule_set(entry("ns/hourly", "0 * * * *")))
        await harness.clock.asleep()
        await harness.clock.set(at("2026-03-02T15:20Z"))  # resumed from suspend
        assert await harness.clock.asleep(after=1) == at("2026-03-02T16:00Z")

    assert fired(harness.fires) == [("ns/hourly", at("2026-03-02T15:00Z"))]


async def test_while_disconnected_one_pending_fire_per_schedule_is_kept() -> None:
    outbox = Outbox()
    harness = Harness(at("2026-03-02T10:00:30Z"), mailbox=Mailbox(outbox, save=nothing_to_save))
    async with harness.running():
        # nobody takes from the mailbox: the agent is disconnected
        await harness.timer.apply(schedule_set(entry("ns/hourly", "0 * * * *"), entry("ns/quarter", "*/15 * * * *")))
        await harness.clock.run_until(at("2026-03-02T15:05Z"))

    assert len(harness.fires) == 5 + 20
    assert fired(list(outbox)) == [("ns/hourly", at("2026-03-02T15:00Z")), ("ns/quarter", at("2026-03-02T15:00Z"))]


async def test_fires_due_at_one_wake_up_are_delivered_together_and_saved_once() -> None:
    saves = 0

    async def save() -> None:
        nonlocal saves
        saves += 1

    outbox = Outbox()
    harness = Harness(at("2026-03-02T10:00:30Z"), mailbox=Mailbox(outbox, save=save))
    async with harness.running():
        await harness.timer.apply(schedule_set(
            *(entry(f"ns/hourly-{n}", "0 * * * *") for n in range(50)), entry("ns/half", "30 * * * *"),
        ))
        await harness.clock.run_until(at("2026-03-02T11:45Z"))

    assert [len(delivery) for delivery in harness.deliveries] == [1, 50, 1]  # 10:30, 11:00, 11:30
    assert saves == 3
    assert len(outbox) == 51
