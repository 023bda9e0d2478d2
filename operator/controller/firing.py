"""An agent's fire: decided (jobs/fires.py), carried out, and answered with its receipt once
the outcome is durable.

An agent's fires count only for Schedules of its namespace that target it; any other is
refused with its reason, counted in the metrics, and changes nothing.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

from restic_manager import cron, protocol
from restic_manager.operator.agents.pushes import compile_schedule
from restic_manager.operator.agents.server import Session
from restic_manager.operator.agents.targets import Index
from restic_manager.operator.controller.schedules import FIRE_STATUS_DELAY, Schedules
from restic_manager.operator.jobs import fires
from restic_manager.operator.jobs.dispatch import Dispatcher
from restic_manager.operator.kube.api import ObjectKey, format_time
from restic_manager.operator.kube.cache import Schedule, Store
from restic_manager.operator.kube.client import AlreadyExists, Kube, KubeError
from restic_manager.operator.kube.events import involved
from restic_manager.operator.metrics import Metrics
from restic_manager.operator.status import rendering as statuses
from restic_manager.operator.status.writer import StatusWriter

log = logging.getLogger(__name__)

# How many recent generations of a Schedule have their expression remembered for checking fires.
EXPRESSIONS_KEPT = 8
# How long a fire's decision may take before it is answered with retry: the agent's frames
# are handled in order, so one fire waiting on an apiserver that does not answer must not
# hold up the connection for the client's whole request timeout.
FIRE_TIMEOUT = 10.0

# A fire's receipt: its outcome, the job it names (created, exists), the reason (the others).
FireAnswer = tuple[protocol.FireOutcome, str | None, str]


@dataclasses.dataclass(kw_only=True, eq=False)
class Firing:
    kube: Kube
    store: Store
    index: Index
    schedules: Schedules
    dispatcher: Dispatcher
    writer: StatusWriter
    metrics: Metrics
    clock: Callable[[], datetime]
    created: Callable[[str, Mapping[str, Any]], None]  # puts an object the operator created into the view
    # By Schedule, then agent: a fire's decision reads only that agent's jobs of the Schedule,
    # so the agents of one Schedule are decided, and their jobs created, side by side.
    _locks: dict[ObjectKey, dict[str, asyncio.Lock]] = dataclasses.field(
        init=False, default_factory=lambda: collections.defaultdict(lambda: collections.defaultdict(asyncio.Lock)))
    # By Schedule uid, then generation: the expression each recent generation had, so a
    # fire an agent sent before an edit is checked against the expression it fired by.
    _expressions: dict[str, dict[int, cron.Cron | cron.CronError]] = dataclasses.field(init=False,
                                                                                      default_factory=dict)

    def remember(self, schedule: Schedule) -> None:
        """A Schedule's new generation: its expression is kept for the fires sent by it."""
        remembered = self._expressions.setdefault(schedule.uid, {})
        remembered[schedule.generation] = compile_schedule(schedule)
        for generation in sorted(remembered)[:-EXPRESSIONS_KEPT]:
            del remembered[generation]

    def forget(self, schedule: Schedule, *, deleted: bool) -> None:
        """The Schedule is gone (``deleted``), or another Schedule of its name took its place."""
        self._expressions.pop(schedule.uid, None)
        if deleted:
            self._locks.pop(schedule.key, None)

    async def on_fire(self, session: Session, fire: protocol.ScheduleFire, *, frame_id: str) -> None:
        """Decide the fire, carry the decision out, and answer with its receipt once the outcome
        is durable; whatever stands in the way now (an API error, a timeout) answers ``retry``,
        and the agent sends the fire again."""
        try:
            async with asyncio.timeout(FIRE_TIMEOUT):
                result = await self._fire(session, fire)
        except TimeoutError:
            self.metrics.fires_retried["Timeout"] += 1
            result = (protocol.FireOutcome.RETRY, None,
                      f"the apiserver did not answer within {FIRE_TIMEOUT:g} s; send the fire again")
        except Exception as error:  # KubeError above all, but a bug must not lose the fire either
            if not isinstance(error, KubeError):
                log.exception("agent %s: handling the fire of %s at %s failed", session.agent, fire.id,
                              format_time(fire.scheduled_at))
            self.metrics.fires_retried[type(error).__name__] += 1
            result = (protocol.FireOutcome.RETRY, None, f"the operator could not decide now: {error}")
        outcome, job, reason = result
        await session.send(protocol.FireResult(ref=frame_id, id=fire.id, scheduled_at=fire.scheduled_at,
                                               outcome=outcome, job=job, reason=reason))

    async def _fire(self, session: Session, fire: protocol.ScheduleFire) -> FireAnswer:
        key = ObjectKey.parse(fire.id)
        schedule = self.store.schedules.get(key) if key.namespace == session.agent.namespace else None
        if schedule is None:
            # No lock: the key is the agent's to choose, and nothing is written.
            return await self._decided(session, fire, fires.decide(
                fire=fire, agent=session.agent, schedule=None, targeted=False, jobs={}, now=self.clock(),
                produced=False, acked=None))
        async with self._locks[key][session.agent.name]:
            jobs = {job.key.name: statuses.phase_of(self.dispatcher.status_of(job))
                    for job in self.store.jobs_of_schedule(schedule.uid, agent=session.agent.name)}
            expression = self._expressions.get(schedule.uid, {}).get(fire.generation) or compile_schedule(schedule)
            ack = self.schedules.book(schedule).acks.get(session.agent.name)
            decision = fires.decide(
                fire=fire, agent=session.agent, schedule=schedule,
                targeted=session.agent in self.index.agents_of(schedule.key),
                jobs=jobs, now=self.clock(), problems=self.schedules.problems(schedule),
                repository_missing=self.schedules.repository_missing(schedule),
                produced=isinstance(expression, cron.Cron) and fires.produces(expression, fire.scheduled_at),
                acked=ack.generation if ack is not None and not ack.error else None,
            )
            if decision.verdict is fires.Verdict.CREATE:
                return await self._decided(session, fire, decision, schedule)
        # Anything else is recorded outside the lock: its receipt waits for a status write.
        return await self._decided(session, fire, decision, schedule)

    async def _decided(self, session: Session, fire: protocol.ScheduleFire,
                       decision: fires.Decision, schedule: Schedule | None = None) -> FireAnswer:
        """Carry out a fire's decision; only a Schedule that targets the agent is touched."""
        namespace = session.agent.namespace
        if decision.verdict is fires.Verdict.FORBIDDEN:
            self.metrics.fires_refused[decision.reason] += 1
            self.metrics.frames_refused["forbidden-fire"] += 1
            session.log_refusal("forbidden: %s", decision.message)
            return protocol.FireOutcome.REFUSED, None, f"{decision.reason}: {decision.message}"
        book = self.schedules.book(schedule) if schedule is not None and schedule.uid == fire.uid else None
        if book is not None:
            assert schedule is not None
            previous = book.last_fire.get(session.agent.name)
            if previous is None or fire.scheduled_at > previous:
                book.last_fire[session.agent.name] = fire.scheduled_at
                self.writer.mark("schedules", schedule.key, delay=FIRE_STATUS_DELAY)
        if decision.verdict is fires.Verdict.DUPLICATE:
            log.info("Schedule %s: %s", fire.id, decision.message)
            return protocol.FireOutcome.EXISTS, f"{namespace}/{decision.job_name}", ""
        if book is None:
            # A Schedule gone or recreated since the agent got its set: nothing to record.
            self.metrics.fires_refused[decision.reason] += 1
            session.log_refusal("fire refused: %s", decision.message)
            return protocol.FireOutcome.REFUSED, None, f"{decision.reason}: {decision.message}"
        assert schedule is not None
        if decision.verdict is fires.Verdict.CREATE:
            return await self._create_job(schedule, book, session.agent.name, decision, fire)
        await self._refuse(schedule, book, decision, session.agent.name, fire)
        outcome = protocol.FireOutcome.MISSED if decision.verdict is fires.Verdict.MISSED else protocol.FireOutcome.REFUSED
        return outcome, None, f"{decision.reason}: {decision.message}"

    async def _create_job(self, schedule: Schedule, book: statuses.ScheduleBook, agent: str,
                          decision: fires.Decision, fire: protocol.ScheduleFire) -> FireAnswer:
        for name in decision.replace:
            await self.dispatcher.cancel_for_replace(ObjectKey(schedule.key.namespace, name), by=decision.job_name)
        created = None
        for name in (decision.job_name, fires.job_name(schedule.key.name, agent, fire.scheduled_at, hashed=True)):
            body = fires.job_body(schedule, agent=agent, name=name, scheduled_at=fire.scheduled_at)
            try:
                created = await self.kube.create("resticjobs", body)
                break
            except AlreadyExists:
                existing = await self.kube.get("resticjobs", ObjectKey(schedule.key.namespace, name))
                if fires.same_fire(existing, schedule_uid=schedule.uid, agent=agent, scheduled_at=fire.scheduled_at):
                    log.info("Schedule %s: ResticJob %s exists already (fire delivered twice)", schedule.key, name)
                    return protocol.FireOutcome.EXISTS, f"{schedule.key.namespace}/{name}", ""
                # Another Schedule/agent pair's job has this name: the hashed name is ours.
        if created is None:
            raise KubeError(f"Schedule {schedule.key}: no free ResticJob name for the fire at {fire.scheduled_at}")
        log.info("Schedule %s: %s → ResticJob %s", schedule.key, decision.message, created["metadata"]["name"])
        self.metrics.fire_lag.observe(max(0.0, (self.clock() - fire.scheduled_at).total_seconds()))
        self.created("resticjobs", created)
        if book.last_schedule_time is None or fire.scheduled_at > book.last_schedule_time:
            book.last_schedule_time = fire.scheduled_at
        self.writer.mark("schedules", schedule.key, delay=FIRE_STATUS_DELAY)
        return protocol.FireOutcome.CREATED, f"{schedule.key.namespace}/{created['metadata']['name']}", ""

    async def _refuse(self, schedule: Schedule, book: statuses.ScheduleBook, decision: fires.Decision,
                      agent: str, fire: protocol.ScheduleFire) -> None:
        """A fire of a Schedule that targets the agent, not honoured: an Event, counted on the
        status; returns once both are written.

        The Event is named after the fire, so a fire refused again (its receipt was lost, or
        the operator restarted before sending it) finds its Event and is not counted twice."""
        self.metrics.fires_refused[decision.reason] += 1
        log.warning("Schedule %s: %s", schedule.key, decision.message)
        try:
            await self.kube.post_event(
                involved("Schedule", schedule.key, schedule.uid),
                type="Warning", reason=decision.reason, message=decision.message, now=self.clock(),
                name=fires.event_name(schedule, agent=agent, scheduled_at=fire.scheduled_at, reason=decision.reason))
        except AlreadyExists:
            pass  # recorded before
        else:
            if decision.verdict is fires.Verdict.MISSED:
                book.missed += 1
            else:
                book.refused += 1
        if not await self.writer.flushed("schedules", schedule.key):
            raise KubeError(f"Schedule {schedule.key}: the status with the {decision.reason} fire is not written yet")
