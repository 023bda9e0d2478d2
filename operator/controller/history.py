"""A job's end: counted, entered in its Schedule's books and its Repository's status, notified,
and the Schedule's history beyond its limits deleted."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any, NamedTuple

from restic_manager.operator import notify
from restic_manager.operator.controller.schedules import Schedules
from restic_manager.operator.jobs.dispatch import Dispatcher, history_to_delete
from restic_manager.operator.kits.coalesce import CoalescingLoop
from restic_manager.operator.kube.api import ObjectKey
from restic_manager.operator.kube.cache import Job, Store
from restic_manager.operator.kube.client import Kube, KubeError
from restic_manager.operator.metrics import Metrics
from restic_manager.operator.status import rendering as statuses
from restic_manager.operator.status.repositories import RepositoryReporter
from restic_manager.operator.status.writer import StatusWriter

log = logging.getLogger(__name__)


class HistoryKey(NamedTuple):
    schedule: ObjectKey
    agent: str


@dataclasses.dataclass(kw_only=True, eq=False)
class History:
    kube: Kube
    store: Store
    schedules: Schedules
    dispatcher: Dispatcher
    writer: StatusWriter
    repositories: RepositoryReporter
    notifier: notify.Notifier
    metrics: Metrics
    clock: Callable[[], datetime]

    def __post_init__(self) -> None:
        self.prunes = CoalescingLoop[HistoryKey]("history", self._prune, transient=(KubeError,))

    def phase_changed(self, job: Job, status: Mapping[str, Any]) -> None:
        ended = statuses.is_terminal(status)
        if ended:
            self.metrics.jobs_finished[(job.key.namespace, job.type, statuses.phase_of(status),
                                         status.get("reason", ""))] += 1
            self.repositories.job_ended(job, status)
        schedule_key = job.schedule_key
        if schedule_key is None:
            return
        if ended:  # it leaves active (and may be the last success): at once
            self.writer.mark("schedules", schedule_key)
        schedule = self.store.schedules.get(schedule_key)
        if schedule is None or job.schedule_ref is None or schedule.uid != job.schedule_ref.uid:
            return
        if ended:
            self.schedules.book(schedule).record_end(job.agent, statuses.last_job(job, status, now=self.clock()))
            self.prunes.mark(HistoryKey(schedule_key, job.agent))
        if (notice := notify.job_notice(job, status, at=self.clock())) is not None:
            self.notifier.notify(schedule, notice)

    async def _prune(self, key: HistoryKey) -> None:
        schedule = self.store.schedules.get(key.schedule)
        if schedule is None:
            return
        jobs = [(job, self.dispatcher.status_of(job))
                for job in self.store.jobs_of_schedule(schedule.uid, agent=key.agent)]
        for job_key in history_to_delete(jobs, succeeded=schedule.successful_jobs_history_limit,
                                         failed=schedule.failed_jobs_history_limit):
            log.info("Schedule %s: deleting ResticJob %s (beyond the history limit)", schedule.key, job_key.name)
            await self.kube.delete("resticjobs", job_key)
