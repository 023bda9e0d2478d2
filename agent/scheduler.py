"""When the agent's schedules fire: the decisions (`Scheduler`) and the timer that runs them.

`Scheduler` holds the applied set and one `Cursor` per schedule and answers three questions
for a given `now`, without a clock of its own: what does a new set change (`apply`), when is
the next fire (`next_wake`), and which fires are due (`due`). A schedule whose several fire
times went by unseen — the agent was down, the host slept, the clock jumped — fires once, for
the newest of them: a missed backup runs once, not never and not N times.

`Timer` is the thin shell on top: one task that sleeps until the earliest next fire, re-reads
the wall clock when it wakes, hands the due fires on, and is woken early by a new set.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Protocol

from restic_manager import protocol
from restic_manager.cron import Cron, CronError


@dataclass(frozen=True, slots=True)
class Cursor:
    """How far a schedule's fire times are dealt with: every time up to and including `until`
    has fired, or fell before the schedule was applied, or while it was suspended.

    This is what the agent persists (with the Schedule's uid, so a deleted and re-created
    Schedule of the same name starts afresh): after a restart the first fire time after
    `until` that has passed is the one missed fire to catch up on.
    """

    uid: str
    until: datetime


@dataclass(slots=True)
class _Armed:
    # The entry's fields the timer needs, not the entry itself: an agent may hold
    # thousands, and a wire model's instance is several times the size.
    uid: str
    generation: int
    suspend: bool
    cron: Cron
    next_fire: datetime | None  # None while suspended


class Scheduler:
    """The applied schedule set and its cursors; every method takes `now` instead of reading a clock."""

    def __init__(self, cursors: Mapping[str, Cursor] | None = None) -> None:
        # Cursors loaded from disk wait here until the first set says which schedules still exist.
        self._cursors: dict[str, Cursor] = dict(cursors or {})
        self._armed: dict[str, _Armed] = {}

    def cursors(self) -> dict[str, Cursor]:
        """The cursors to persist, by schedule id."""
        return dict(self._cursors)

    def apply(self, schedule_set: protocol.ScheduleSet, *, now: datetime) -> protocol.ScheduleAck:
        """Replace the whole set with `schedule_set`; entries that cannot be evaluated are rejected.

        A schedule keeps its cursor across generations (as the CronJob controller keeps
        lastScheduleTime across edits; the operator's startingDeadlineSeconds bounds how old
        a fire may be). A schedule seen for the first time starts at `now`: it does not fire
        for times before it was applied. Times while a schedule is suspended never fire, not
        even once it is resumed. Schedules left out of the set are forgotten with their cursors.
        """
        armed: dict[str, _Armed] = {}
        cursors: dict[str, Cursor] = {}
        # Schedules with the same times (after H is resolved) in the same zone share one Cron:
        # a set of thousands often holds a few expressions, and each Cron is ~3 kB.
        crons: dict[tuple[str, str], Cron] = {}
        applied: list[protocol.AppliedEntry] = []
        rejected: list[protocol.RejectedEntry] = []
        for entry in schedule_set.schedules:
            if entry.id in armed:
                rejected.append(protocol.RejectedEntry(
                    id=entry.id, generation=entry.generation,
                    error=f"schedule id {entry.id} appears more than once in set version "
                          f"{schedule_set.version}; the first entry is applied",
                ))
                continue
            try:
                cron = Cron(entry.schedule, entry.time_zone, name=entry.id)
            except CronError as error:
                rejected.append(protocol.RejectedEntry(id=entry.id, generation=entry.generation, error=str(error)))
                continue
            cron = crons.setdefault((cron.resolved, entry.time_zone), cron)
            cursor = self._carry_cursor(entry, now=now)
            cursors[entry.id] = cursor
            armed[entry.id] = _Armed(
                uid=entry.uid, generation=entry.generation, suspend=entry.suspend, cron=cron,
                next_fire=None if entry.suspend else cron.next_after(cursor.until),
            )
            applied.append(protocol.AppliedEntry(id=entry.id, generation=entry.generation))
        self._armed, self._cursors = armed, cursors
        return protocol.ScheduleAck(
            version=schedule_set.version, applied_at=now, applied=applied, rejected=rejected
        )

    def _carry_cursor(self, entry: protocol.ScheduleEntry, *, now: datetime) -> Cursor:
        old = self._cursors.get(entry.id)
        if old is None or old.uid != entry.uid:
            return Cursor(uid=entry.uid, until=now)
        previous = self._armed.get(entry.id)
        if entry.suspend or (previous is not None and previous.suspend):
            return Cursor(uid=entry.uid, until=max(old.until, now))
        return old

    def next_wake(self) -> datetime | None:
        """The earliest next fire over all active schedules, or None when nothing can fire."""
        return min((a.next_fire for a in self._armed.values() if a.next_fire is not None), default=None)

    def due(self, now: datetime) -> list[protocol.ScheduleFire]:
        """The fires due at `now`, one per schedule: the newest time passed since its cursor.

        Each fire carries the nominal cron time, not `now`. A clock that went back finds
        nothing due until it passes the last fire again, so nothing fires twice.
        """
        fires = []
        for schedule_id, armed in self._armed.items():
            if armed.next_fire is None or armed.next_fire > now:
                continue
            # On time, the next fire is the newest passed one and the search is skipped;
            # only after a sleep past several fire times is the newest searched for.
            latest, following = armed.next_fire, armed.cron.next_after(armed.next_fire)
            if following <= now:
                newest = armed.cron.latest_between(latest, now)
                assert newest is not None, "following <= now is a fire time in (latest, now]"
                latest, following = newest, armed.cron.next_after(newest)
            fires.append(protocol.ScheduleFire(
                id=schedule_id, uid=armed.uid, generation=armed.generation, scheduled_at=latest
            ))
            self._cursors[schedule_id] = Cursor(uid=armed.uid, until=latest)
            armed.next_fire = following
        return fires


class Clock(Protocol):
    """Wall-clock time for the timer; tests substitute one that moves when told."""

    def now(self) -> datetime: ...

    async def sleep_until(self, deadline: datetime) -> None: ...


class SystemClock:
    """The host's wall clock.

    asyncio sleeps on the monotonic clock, which stands still while the host is suspended
    and ignores steps of the wall clock, and Python 3.11 has no timer on absolute wall-clock
    time (timerfd arrives in 3.13). So a long sleep is taken in naps of at most `max_nap`
    seconds, each followed by a fresh look at the wall clock: after a resume or a step
    forward a due fire is at most one nap late. A nap costs one clock read, not a pass over
    the schedules; the timer itself wakes once per fire.
    """

    def __init__(self, *, max_nap: float = 60.0) -> None:
        self._max_nap = max_nap

    def now(self) -> datetime:
        return datetime.now(timezone.utc)

    async def sleep_until(self, deadline: datetime) -> None:
        while (remaining := (deadline - self.now()).total_seconds()) > 0:
            await asyncio.sleep(min(remaining, self._max_nap))


class Timer:
    """Runs a `Scheduler` against a `Clock`: sleeps until the earliest next fire, then delivers
    what is due, all together. `apply` swaps the set and wakes the sleeping timer at once."""

    def __init__(
        self,
        scheduler: Scheduler,
        *,
        clock: Clock,
        deliver: Callable[[list[protocol.ScheduleFire]], Awaitable[None]],
        save: Callable[[], Awaitable[None]],
    ) -> None:
        self._scheduler = scheduler
        self._clock = clock
        self._deliver = deliver
        self._save = save
        self._changed = asyncio.Event()

    async def apply(self, schedule_set: protocol.ScheduleSet) -> protocol.ScheduleAck:
        """Apply `schedule_set` now; its cursors are saved before the ack is returned.

        What is due at once (the catch-up after an outage) is delivered before the ack, so it
        replaces an older fire of the same schedule still in the outbox before either is
        sent: one fire per schedule, the newest."""
        now = self._clock.now()
        ack = self._scheduler.apply(schedule_set, now=now)
        if fires := self._scheduler.due(now):
            await self._deliver(fires)  # saves the cursors with the fires
        else:
            await self._save()
        self._changed.set()
        return ack

    async def run(self) -> None:
        """The timer task: runs until cancelled."""
        while True:
            # Cleared before looking at the set, so an apply during a delivery is not lost.
            self._changed.clear()
            # All of one wake-up's fires in one delivery: one state save, however many are due.
            if fires := self._scheduler.due(self._clock.now()):
                await self._deliver(fires)
            await self._sleep(self._scheduler.next_wake())

    async def _sleep(self, deadline: datetime | None) -> None:
        """Until `deadline` (never, if None) or the next apply, whichever comes first."""
        waits: list[asyncio.Future[object]] = [asyncio.ensure_future(self._changed.wait())]
        if deadline is not None:
            waits.append(asyncio.ensure_future(self._clock.sleep_until(deadline)))
        try:
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # a failing clock must not pass for a wake-up
        finally:
            for task in waits:
                task.cancel()
            await asyncio.gather(*waits, return_exceptions=True)
