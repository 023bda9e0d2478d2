"""What each Schedule's status shows: its books (acks, fires, job ends), whether it can run,
the health of each of its agents, and the Events and notices when that health changes."""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from restic_manager import cron, protocol
from restic_manager.operator import notify, validation
from restic_manager.operator.agents.pushes import compile_schedule
from restic_manager.operator.agents.server import AgentServer
from restic_manager.operator.agents.targets import Index, Moved, selector_problem
from restic_manager.operator.jobs.dispatch import Dispatcher
from restic_manager.operator.kube.api import ObjectKey
from restic_manager.operator.kube.cache import Schedule, Store
from restic_manager.operator.kube.events import Recorder, involved
from restic_manager.operator.status import health
from restic_manager.operator.status import rendering as statuses
from restic_manager.operator.status.writer import Rendered, StatusWriter

# What fires change on a Schedule's status (lastFireTime, lastScheduleTime, active) waits this
# long, so a burst of fires and the jobs they create cost one status write, not three each.
FIRE_STATUS_DELAY = 1.0
# The soonest a Schedule's status is looked at again for a fire whose deadline may pass unmet:
# an every-second Schedule is not rendered every second for it (its fires render it anyway).
HEALTH_RECHECK_MIN = 30.0
# Reasons of a Healthy=False that are the Schedule's own, not one agent's.
SCHEDULE_WIDE = frozenset({"Invalid", "RepositoryNotFound", "NoAgents"})


@dataclasses.dataclass(kw_only=True, eq=False)
class Schedules:
    store: Store
    index: Index
    server: AgentServer
    dispatcher: Dispatcher
    writer: StatusWriter
    events: Recorder
    notifier: notify.Notifier
    clock: Callable[[], datetime]
    books: dict[str, statuses.ScheduleBook] = dataclasses.field(init=False, default_factory=dict)  # by Schedule uid
    # By Schedule uid: (generation, problems).
    _problems: dict[str, tuple[int, tuple[str, ...]]] = dataclasses.field(init=False, default_factory=dict)

    def book(self, schedule: Schedule) -> statuses.ScheduleBook:
        if schedule.uid not in self.books:
            self.books[schedule.uid] = statuses.ScheduleBook.from_status(schedule.status)
        return self.books[schedule.uid]

    def forget(self, schedule: Schedule) -> None:
        """The Schedule is gone, or another Schedule of its name took its place."""
        self.books.pop(schedule.uid, None)
        self._problems.pop(schedule.uid, None)

    # --- whether it can run -----------------------------------------------------------------

    def problems(self, schedule: Schedule) -> tuple[str, ...]:
        """What makes the Schedule invalid (validation.py), computed once per generation."""
        known = self._problems.get(schedule.uid)
        if known is None or known[0] != schedule.generation:
            found = tuple(validation.schedule_problems(schedule.spec, schedule_id=schedule.id))
            known = self._problems[schedule.uid] = (schedule.generation, found)
        return known[1]

    def cannot_run(self, schedule: Schedule) -> tuple[str, str] | None:
        """(reason, message) when the Schedule can run nowhere: it is invalid, or its Repository
        does not exist. It is then in no agent's set, so it holds no job Pending for ever."""
        if problems := self.problems(schedule):
            return "Invalid", "; ".join(problems)
        if missing := self.repository_missing(schedule):
            return "RepositoryNotFound", missing
        return None

    def repository_missing(self, schedule: Schedule) -> str:
        if self.store.repositories.get(ObjectKey(schedule.key.namespace, schedule.repository)) is not None:
            return ""
        return (f"spec.repository: there is no Repository {schedule.repository} in namespace "
                f"{schedule.key.namespace}; the Schedule runs on no agent until there is")

    def runnable_of(self, agent: ObjectKey) -> Sequence[Schedule]:
        """An agent's schedule set: the Schedules that target it and can run."""
        return [schedule for schedule in self.index.schedules_of(agent) if self.cannot_run(schedule) is None]

    # --- what the agents say ----------------------------------------------------------------

    def moved(self, agent: ObjectKey, moved: Moved) -> None:
        """The Schedules an Agent joined or left list it in their status. A Schedule it left
        forgets its ack: should it target the agent again, it is applied there only once
        the agent says so anew."""
        for key in moved.left:
            schedule = self.store.schedules.get(key)
            book = self.books.get(schedule.uid) if schedule is not None else None
            if book is not None:
                book.acks.pop(agent.name, None)
        for key in moved.joined | moved.left:
            self.writer.mark("schedules", key)

    def acked(self, agent: ObjectKey, ack: protocol.ScheduleAck) -> None:
        """Record the ack on the Schedules the agent was given; it says nothing about others."""
        applied = {entry.id: entry.generation for entry in ack.applied}
        rejected = {entry.id: (entry.generation, entry.error) for entry in ack.rejected}
        for schedule in self.index.schedules_of(agent):
            if self.book(schedule).record_ack(agent.name, applied=applied, rejected=rejected,
                                              schedule_id=schedule.id, at=ack.applied_at):
                self.writer.mark("schedules", schedule.key)

    # --- rendering --------------------------------------------------------------------------

    def render(self, schedule: Schedule) -> Rendered:
        now = self.clock()
        book = self.book(schedule)
        targets = [key.name for key in self.index.agents_of(schedule.key)]
        connected = [name for name in targets if self.server.session(ObjectKey(schedule.key.namespace, name))]
        compiled = compile_schedule(schedule)
        resolved = next_fire = None
        grace = health.grace_of(schedule.starting_deadline_seconds)
        due = health.NOTHING_DUE
        if isinstance(compiled, cron.Cron):
            resolved = compiled.resolved
            next_fire = compiled.next_after(now)
            if not schedule.suspend:
                due = health.due_fires(compiled, created=schedule.created, grace=grace, now=now)
        active: dict[str, list[health.ActiveJob]] = collections.defaultdict(list)
        for job in self.store.jobs_of_schedule(schedule.uid):
            status = self.dispatcher.status_of(job)
            if not statuses.is_terminal(status) and not job.deleting:
                active[job.agent].append(health.ActiveJob(job.key.name, statuses.phase_of(status),
                                                          status.get("reason", ""), status.get("message", "")))
        cannot_run = self.cannot_run(schedule)
        was, before = book.health, statuses.condition_of(book.conditions, "Healthy")
        book.health = {name: self._agent_health(schedule, book, name, due=due.latest, grace=grace,
                                                active=active.get(name, ()), connected=name in connected)
                       for name in targets}
        desired = statuses.schedule_status(
            schedule, book=book, targets=targets, connected=connected, resolved=resolved,
            next_fire=next_fire, active=[job.name for jobs in active.values() for job in jobs],
            no_agents=self._no_agents(schedule), now=now, cannot_run=cannot_run)
        book.conditions = desired["conditions"]
        after = statuses.condition_of(book.conditions, "Healthy")
        assert after is not None
        self._health_changed(schedule, book, was, before, after)
        if due.next is not None and any(state.healthy for state in book.health.values()):
            # Nothing may happen when a fire's deadline passes unmet: look again then. A deadline
            # in whole minutes ends on a fire time, so the look waits as long as the fires' own
            # status write does, and folds into it instead of competing with their creates.
            wait = max((due.next - now).total_seconds() + FIRE_STATUS_DELAY, HEALTH_RECHECK_MIN)
            self.writer.mark("schedules", schedule.key, delay=wait)
        return Rendered(schedule.uid, schedule.status, desired)

    def _agent_health(self, schedule: Schedule, book: statuses.ScheduleBook, agent: str, *,
                      due: datetime | None, grace: timedelta, active: Sequence[health.ActiveJob],
                      connected: bool) -> health.AgentHealth:
        ack = book.acks.get(agent)
        applied = ack is not None and ack.generation == schedule.generation and not ack.error
        succeeded = book.last_success.get(agent)
        since = succeeded.time if succeeded is not None else max(schedule.created, ack.at if ack else schedule.created)
        return health.agent_health(due=due, grace=grace, since=since, last_job=book.last_job.get(agent),
                                   active=active, connected=connected, applied=applied,
                                   last_fire=book.last_fire.get(agent))

    def _health_changed(self, schedule: Schedule, book: statuses.ScheduleBook,
                        was: Mapping[str, health.AgentHealth], before: Mapping[str, Any] | None,
                        after: Mapping[str, Any]) -> None:
        """An Event and a notice for each agent that became unhealthy (or for another reason),
        for a Schedule that cannot run, and for one that is healthy again.

        ``was`` is empty at the first look after a start: then ``before``, the condition as
        the status showed it, tells what was reported already."""
        about = involved("Schedule", schedule.key, schedule.uid)

        def tell(agent: str | None, healthy: bool, reason: str, message: str) -> None:
            self.events.record(about, type="Normal" if healthy else "Warning", reason=reason, message=message)
            self.notifier.notify(schedule, notify.health_notice(schedule.key, agent=agent, healthy=healthy,
                                                                 reason=reason, message=message, at=self.clock()))

        shown = before is not None and before.get("status") == "False"
        named = str(before.get("message", "")) if shown and before is not None else ""
        for name, state in sorted(book.health.items()):
            earlier = was.get(name)
            if state.healthy or (earlier is not None and not earlier.healthy and earlier.reason == state.reason):
                continue
            if earlier is None and f"{name}: " in named:
                continue
            tell(name, False, state.reason, f"agent {name}: {state.message}")
        if after["status"] == "False" and after["reason"] in SCHEDULE_WIDE and not (
                shown and before is not None and before.get("reason") == after["reason"]):
            tell(None, False, after["reason"], after["message"])
        if after["status"] == "True" and shown:
            tell(None, True, "Healthy", after["message"])

    def _no_agents(self, schedule: Schedule) -> str:
        problem = selector_problem(schedule)
        if problem is not None:
            return problem
        if schedule.agent is not None:
            return f"spec.agent: there is no Agent {schedule.agent} in namespace {schedule.key.namespace}"
        return f"spec.agentSelector matches no Agent in namespace {schedule.key.namespace}"
