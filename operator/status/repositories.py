"""Repository status from the jobs that use it: `Initialized`, the last result, when.

The operator does not open repositories itself; every ResticJob that ends says something
about its Repository: a success means restic opened it (so it exists and the password
works), a RepositoryNotFound failure means it does not exist, a WrongPassword failure that
the password is wrong, and a check job's end is the last integrity check. :func:`repository_status`
is that decision; :class:`RepositoryReporter` writes it, one patch per Repository per burst, and
records a Warning Event on the Repository for a wrong password or a failed check.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

from restic_manager import protocol
from restic_manager.operator.kits.coalesce import CoalescingLoop
from restic_manager.operator.kube.api import ObjectKey, format_time
from restic_manager.operator.kube.cache import Collection, Job, Repository
from restic_manager.operator.kube.client import Kube, KubeError, NotFound
from restic_manager.operator.kube.events import Recorder, involved
from restic_manager.operator.status.rendering import set_condition

log = logging.getLogger(__name__)


def repository_status(current: Mapping[str, Any], *, job: str, job_type: str, ended: Mapping[str, Any],
                      now: datetime) -> dict[str, Any]:
    """The Repository's status after ResticJob ``job`` of ``job_type`` ended with status ``ended``."""
    phase, reason = ended.get("phase", ""), ended.get("reason", "")
    conditions = list(current.get("conditions") or [])
    if phase == "Succeeded":
        conditions = set_condition(conditions, type="Initialized", status=True, reason="RepositoryOpened",
                                   message=f"ResticJob {job} opened the repository", now=now)
    elif reason == "RepositoryNotFound":
        conditions = set_condition(conditions, type="Initialized", status=False, reason="RepositoryNotFound",
                                   message=f"ResticJob {job} found no repository; set spec.initialize "
                                           "or run an init job", now=now)
    status = {
        "lastCheckTime": ended.get("completionTime") or format_time(now),
        "lastCheckResult": f"{job_type} {job}: {phase}" + (f" ({reason})" if reason else ""),
        "conditions": conditions,
    }
    if job_type == "check" and phase in ("Succeeded", "Failed"):
        status["integrityCheck"] = {"job": job, "result": "Passed" if phase == "Succeeded" else "Failed",
                                    "reason": reason, "time": status["lastCheckTime"]}
    return status


def repository_event(*, job: str, job_type: str, ended: Mapping[str, Any]) -> tuple[str, str] | None:
    """The (reason, message) of the Warning Event the Repository gets for a job that ended so."""
    reason = ended.get("reason", "")
    if reason == "WrongPassword":
        return "WrongPassword", (f"ResticJob {job} could not open the repository: the password from "
                                 "spec.passwordSecretRef is wrong")
    if job_type == "check" and ended.get("phase") == "Failed" and reason in ("ResticFailed", "Timeout"):
        return "CheckFailed", f"ResticJob {job} (check) failed: {ended.get('message', '')}"
    return None


class RepositoryReporter:
    """Keeps the newest ended job per Repository and writes its status from it."""

    def __init__(self, kube: Kube, *, clock: Callable[[], datetime], events: Recorder,
                 known: Collection[Repository]) -> None:
        self._kube = kube
        self._clock = clock
        self._events = events
        self._known = known
        self._ended: dict[ObjectKey, tuple[Job, Mapping[str, Any]]] = {}
        self._loop: CoalescingLoop[ObjectKey] = CoalescingLoop("repository status", self._write, transient=(KubeError,))

    def job_ended(self, job: Job, status: Mapping[str, Any]) -> None:
        if not protocol.is_object_name(job.repository):
            return  # no Repository can have that name (the job failed Invalid): nothing to report on, ever
        key = ObjectKey(job.key.namespace, job.repository)
        self._ended[key] = (job, status)
        self._loop.mark(key)
        event = repository_event(job=job.key.name, job_type=job.type, ended=status)
        repository = self._known.get(key)
        if event is not None and repository is not None:
            self._events.record(involved("Repository", key, repository.uid), type="Warning", reason=event[0],
                                message=event[1])

    async def run(self) -> None:
        await self._loop.run()

    async def _write(self, key: ObjectKey) -> None:
        # A mark that lands after this run was started but before it read the newest job
        # brings a follow-up run with nothing left to write.
        if (newest := self._ended.get(key)) is None:
            return
        job, ended = newest
        await self._report(key, job, ended)  # when it raises, the entry stays for the retry
        if self._ended.get(key) is newest:  # a newer one stays for its follow-up run
            del self._ended[key]

    async def _report(self, key: ObjectKey, job: Job, ended: Mapping[str, Any]) -> None:
        try:
            repository = await self._kube.get("repositories", key)
        except NotFound:
            return  # the job named a Repository that is gone: nothing to report on
        status = repository_status(repository.get("status") or {}, job=job.key.name, job_type=job.type,
                                   ended=ended, now=self._clock())
        try:
            await self._kube.patch_status("repositories", key, status, uid=repository["metadata"]["uid"])
        except KubeError as error:
            log.warning("Repository %s: could not write status: %s", key, error)
