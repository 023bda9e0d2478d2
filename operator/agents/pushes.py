"""``schedule.set`` pushes: each agent's whole set of schedules, coalesced per agent.

The operator asks for a push whenever an agent's set may have changed (a Schedule applied,
edited or deleted; an Agent's labels changed; the agent connected). A request for an agent
no push is under way for is pushed at once; requests that arrive while one is under way fold
into one more push after it (coalesce.py); a set identical to the one this connection already
holds is not sent again.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterable, Sequence

from restic_manager import cron, protocol
from restic_manager.operator.agents.server import Session
from restic_manager.operator.kits.coalesce import CoalescingLoop
from restic_manager.operator.kube.api import ObjectKey
from restic_manager.operator.kube.cache import Schedule

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=4096)
def _compile(expression: str, time_zone: str, name: str) -> cron.Cron | cron.CronError:
    try:
        return cron.Cron(expression, time_zone, name=name)
    except cron.CronError as error:
        return error


def compile_schedule(schedule: Schedule) -> cron.Cron | cron.CronError:
    """The Schedule's expression with H and @*-random resolved, or why it cannot be."""
    return _compile(schedule.expression, schedule.time_zone, schedule.id)


def schedule_entries(schedules: Sequence[Schedule]) -> list[protocol.ScheduleEntry]:
    """The ``schedule.set`` entries for these Schedules.

    The resolved expression is sent, so agents run exactly what the Schedule's status shows.
    The controller passes only Schedules that validate; one that still does not compile is
    sent as written, for the agent to reject it in its ack (and so on the Schedule's status)
    instead of it vanishing silently.
    """
    entries = []
    for schedule in sorted(schedules, key=lambda s: s.key):
        compiled = compile_schedule(schedule)
        expression = compiled.resolved if isinstance(compiled, cron.Cron) else schedule.expression
        entries.append(protocol.ScheduleEntry(
            id=schedule.id, uid=schedule.uid, generation=schedule.generation, schedule=expression,
            time_zone=schedule.time_zone, suspend=schedule.suspend,
        ))
    return entries


class Versions:
    """Set versions: increasing, and still increasing after an operator restart (they start
    from the wall clock in milliseconds) so an agent can tell a newer set from an older one."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._last = 0

    def next(self) -> int:
        self._last = max(self._last + 1, int(self._clock() * 1000))
        return self._last


class Pusher:
    """Owns the push loop; ``request`` is cheap and can be called from any handler."""

    def __init__(
        self,
        *,
        schedules_of: Callable[[ObjectKey], Sequence[Schedule]],
        session_of: Callable[[ObjectKey], Session | None],
        versions: Versions | None = None,
    ) -> None:
        self._schedules_of = schedules_of
        self._session_of = session_of
        self._versions = versions or Versions()
        self._loop: CoalescingLoop[ObjectKey] = CoalescingLoop("schedule.set push", self.push)

    def request(self, agents: Iterable[ObjectKey]) -> None:
        """Push to ``agents`` as soon as each has no push under way."""
        for agent in agents:
            self._loop.mark(agent)

    async def run(self) -> None:
        await self._loop.run()

    async def push(self, agent: ObjectKey) -> None:
        """Send ``agent`` its current set unless its connection holds exactly that already."""
        session = self._session_of(agent)
        if session is None or not session.open:
            return
        entries = tuple(schedule_entries(self._schedules_of(agent)))
        if session.pushed == entries:
            return
        version = self._versions.next()
        if await session.send(protocol.ScheduleSet(version=version, schedules=list(entries))):
            session.pushed = entries
            log.info("agent %s: pushed schedule set version %d with %d schedule(s)", agent, version, len(entries))
