"""The one dispatcher of ResticJobs, whether a fire or kubectl created them.

Level-triggered: whenever a job, or its agent's connection, changes, :func:`next_step`
compares the job's phase with what the agent's connection says and names the one thing to
do; :class:`Dispatcher` carries it out:

* Pending and its agent connected → take the Repository from the watch (read it from the
  API only when the watch has not shown it) and read its Secrets now, add the
  cancel-on-delete finalizer unless the job holds it already (fired jobs are created with
  it), send ``command.run``, Running;
* listed in the agent's hello as finished (its job.done follows and settles it) → wait;
* listed in the agent's hello as interrupted (an earlier agent process died running it) →
  ``command.run`` again, Pending or Running: the agent does not rerun it but reports its
  outcome, a backup's snapshot if restic saved one (agent/runner.py);
* Running but the agent's hello listed it neither as running nor as finished and this
  connection never got it → the agent lost it: Failed, reason AgentLost; the same when the
  agent stays away past the job's timeoutSeconds (plus :data:`LOST_GRACE`), so no job stays
  Running forever;
* its agent or repository not a name an object can have → Failed, reason Invalid, once;
* being deleted while Running → ``command.cancel`` to the agent, then let it go;
* finished → drop the finalizer; prune the Schedule's history beyond its limits.

Finalizers are changed from the store's copy of the job (no read first); a stale copy costs
a failed patch and one read (:meth:`Kube.set_finalizer`). Secrets are read per dispatch, not
watched or cached (dispatches that overlap share one GET, :meth:`Kube.read_secret`): the
operator may list and watch only its own token Secrets, and a rotated credential must reach
the very next job.

``job.started`` / ``job.progress`` / ``job.done`` change the status through status/rendering.py; a
``job.done`` is answered with ``job.done.ack`` once the final status is written, and not
before: until then the agent keeps it and sends it again.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import msgspec

from restic_manager import protocol
from restic_manager.operator import validation
from restic_manager.operator.agents.server import Session
from restic_manager.operator.kits.coalesce import CoalescingLoop
from restic_manager.operator.kube.api import FINALIZER, ObjectKey, parse_time
from restic_manager.operator.kube.cache import Job, Repository, Store
from restic_manager.operator.kube.client import (
    FinalizersSeen, Kube, KubeError, NotFound, SecretRead, opt_in_refusal,
)
from restic_manager.operator.kube.events import Recorder, involved
from restic_manager.operator.status import rendering as statuses
from restic_manager.operator.status.writer import PROGRESS_INTERVAL, StatusWriter

log = logging.getLogger(__name__)

PLURAL = "resticjobs"
RETRY_DELAY = 10.0  # a job waiting for its Repository or Secret looks again this often
# Jobs dispatched side by side: the fires of a whole minute come at once, and each dispatch
# waits for its Repository's Secrets to be read.
DISPATCH_CONCURRENCY = 32
# The label by which a Secret agrees to be handed to agents as a Repository's credentials.
SECRET_OPT_IN = "resticmanager.io/repository-secret"
LOST_GRACE = 300.0  # beyond its timeout, how long a job waits for its agent to come back


class Step(enum.Enum):
    NOTHING = "nothing"
    WAIT = "wait"          # Pending until its agent connects
    DISPATCH = "dispatch"  # send command.run now
    ADOPT = "adopt"        # Pending here, but the agent says it runs it: Running
    LOSE = "lose"          # Running here, unknown to the agent: Failed/AgentLost
    CANCEL = "cancel"      # deleted while running: command.cancel, then release
    RELEASE = "release"    # remove the finalizer


@dataclass(frozen=True)
class AgentView:
    """What the agent's current connection says about its jobs."""

    running: frozenset[str]     # listed in its hello as running
    dispatched: frozenset[str]  # sent to it over this connection
    finished: frozenset[str] = frozenset()  # listed in its hello as ended, job.done to follow
    interrupted: frozenset[str] = frozenset()  # listed in its hello as interrupted, outcome unknown


def give_up_at(job: Job, status: Mapping[str, Any]) -> datetime | None:
    """When a Running job whose agent is away counts as lost: its timeout plus a grace."""
    dispatched = parse_time(status.get("dispatchedAt")) or parse_time(status.get("startTime"))
    if dispatched is None:
        return None
    return dispatched + timedelta(seconds=int(job.spec.get("timeoutSeconds", 14400)) + LOST_GRACE)


def next_step(job: Job, status: Mapping[str, Any], agent: AgentView | None, *, now: datetime) -> Step:
    """The one thing to do about ``job`` (``agent`` is None while its agent is not connected)."""
    phase = statuses.phase_of(status)
    job_id = str(job.key)
    held = FINALIZER in job.finalizers
    if job.deleting:
        if phase == "Running" and agent is not None:
            return Step.CANCEL
        return Step.RELEASE if held else Step.NOTHING
    if phase in statuses.TERMINAL_PHASES:
        return Step.RELEASE if held else Step.NOTHING
    if agent is None:
        if phase == "Pending":
            return Step.WAIT
        deadline = give_up_at(job, status)
        return Step.LOSE if deadline is not None and now >= deadline else Step.NOTHING
    if job_id in agent.finished:
        return Step.NOTHING
    if job_id in agent.interrupted and job_id not in agent.dispatched:
        return Step.DISPATCH
    known = job_id in agent.running or job_id in agent.dispatched
    if phase == "Pending":
        return Step.ADOPT if known else Step.DISPATCH
    return Step.NOTHING if known else Step.LOSE


def history_to_delete(jobs: Sequence[tuple[Job, Mapping[str, Any]]], *, succeeded: int, failed: int) -> list[ObjectKey]:
    """Finished jobs beyond the limits (newest kept), as the CronJob controller prunes."""

    def newest_first(items: list[tuple[Job, Mapping[str, Any]]]) -> list[tuple[Job, Mapping[str, Any]]]:
        def when(item: tuple[Job, Mapping[str, Any]]) -> tuple[datetime, str]:
            job, status = item
            moment = job.scheduled_at or parse_time(status.get("completionTime")) or job.created
            assert moment is not None
            return moment, job.key.name
        return sorted(items, key=when, reverse=True)

    done = [(job, status) for job, status in jobs if not job.deleting]
    ok = newest_first([item for item in done if statuses.phase_of(item[1]) == "Succeeded"])
    bad = newest_first([item for item in done if statuses.phase_of(item[1]) in ("Failed", "Cancelled")])
    return [job.key for job, _ in ok[succeeded:] + bad[failed:]]


class RepositoryUnavailable(Exception):
    """The job's Repository or one of its Secrets cannot be read (yet)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class InvalidJob(Exception):
    """The job's spec cannot become a command.run."""


def command_args(job: Job) -> dict[str, Any]:
    """The parameters block of the job's type (as in the spec, camelCase)."""
    return dict(job.spec.get(job.type) or {})


def repository_env(spec: Mapping[str, Any], secrets: Mapping[str, SecretRead], *,
                   where: str) -> dict[str, str]:
    """restic's environment for a Repository's ``spec``: RESTIC_PASSWORD plus every envFrom Secret's keys.

    ``secrets`` maps Secret names to what was read of them; ``where`` names the Repository in
    messages. Every one of them must have opted in (:func:`secret_refusal`).
    """
    for name, secret in secrets.items():
        if (refusal := secret_refusal(name, secret)) is not None:
            raise RepositoryUnavailable("SecretNotOptedIn", f"{where}: {refusal}")
    ref = spec.get("passwordSecretRef") or {}
    env: dict[str, str] = {}
    for source in spec.get("envFrom") or []:
        name = source["secretRef"]["name"]
        env.update(secrets[name].data)
    password = secrets[ref["name"]].data
    if ref["key"] not in password:
        raise RepositoryUnavailable(
            "SecretKeyNotFound",
            f"{where}: spec.passwordSecretRef: Secret {ref['name']} has no key {ref['key']!r}")
    env["RESTIC_PASSWORD"] = password[ref["key"]]
    return env


def secret_refusal(name: str, secret: SecretRead) -> str | None:
    """Why Secret ``name``, which a Repository names, may not be handed to an agent, or None.

    The operator can read every Secret of the namespaces it manages; whoever may create a
    Repository may be kept from reading any. So a Secret's data goes to agents only when the Secret carries
    :data:`SECRET_OPT_IN`: labelling it takes the right to change the Secret, which a tenant
    kept from it does not have, and a Repository naming any other Secret gets nothing from it.
    The operator's own agent token Secrets never go, labelled or not.
    """
    return opt_in_refusal(name, secret, label=SECRET_OPT_IN, use="handed to agents")


class Dispatcher:
    """Carries out :func:`next_step` for every ResticJob, and takes the agents' job reports."""

    def __init__(
        self,
        *,
        store: Store,
        kube: Kube,
        writer: StatusWriter,
        session_of: Callable[[ObjectKey], Session | None],
        on_phase_change: Callable[[Job, Mapping[str, Any]], None],
        clock: Callable[[], datetime],
        events: Recorder,
    ) -> None:
        self._store = store
        self._kube = kube
        self._writer = writer
        self._session_of = session_of
        self._on_phase_change = on_phase_change
        self._clock = clock
        self._events = events
        self._status: dict[str, dict[str, Any]] = {}  # by job uid: the status the operator owns
        self._loop: CoalescingLoop[ObjectKey] = CoalescingLoop("dispatch", self.reconcile, transient=(KubeError,),
                                                               concurrency=DISPATCH_CONCURRENCY)

    # --- what others call -------------------------------------------------------------------

    def request(self, key: ObjectKey, *, delay: float = 0.0) -> None:
        self._loop.mark(key, delay=delay)

    def request_agent(self, agent: ObjectKey) -> None:
        for job in self._store.jobs_on_agent(agent):
            self.request(job.key)

    async def run(self) -> None:
        await self._loop.run()

    def status_of(self, job: Job) -> dict[str, Any]:
        """The operator's view of the job's status (seeded from the API on first sight)."""
        if job.uid not in self._status:
            self._status[job.uid] = dict(job.status)
        return self._status[job.uid]

    def forget(self, job: Job) -> None:
        self._status.pop(job.uid, None)
        self._writer.forget(PLURAL, job.key)

    async def cancel_for_replace(self, job_key: ObjectKey, *, by: str) -> None:
        """concurrencyPolicy Replace: stop ``job_key`` in favour of the job ``by``."""
        job = self._store.jobs.get(job_key)
        if job is None:
            return
        status = self.status_of(job)
        phase = statuses.phase_of(status)
        if phase == "Pending":
            self._set(job, statuses.job_ended(status, phase="Cancelled", reason="Replaced",
                                              message=f"replaced by {by} before it ran", now=self._clock()))
            return
        session = self._session_of(job.agent_key)
        if phase == "Running" and session is not None:
            await session.send(protocol.CommandCancel(job=str(job.key)))
            self._set(job, {**status, "message": f"cancel requested: replaced by {by}"})

    async def on_report(
        self, session: Session, report: protocol.JobStarted | protocol.JobProgress | protocol.JobDone, *,
        frame_id: str,
    ) -> None:
        """A job.* message from ``session``'s agent (checked to be about its own job)."""
        job = self._store.jobs.get(ObjectKey.parse(report.job))
        if job is None or job.deleting:
            if isinstance(report, protocol.JobDone):
                await session.send(protocol.JobDoneAck(ref=frame_id, job=report.job))  # nothing to record
            else:
                log.info("agent %s reports on job %s, which is gone: cancelling it", session.agent, report.job)
                await session.send(protocol.CommandCancel(job=report.job))
            return
        status = self.status_of(job)
        if isinstance(report, protocol.JobStarted):
            if not statuses.is_terminal(status) and "startTime" not in status:
                self._events.record(involved("ResticJob", job.key, job.uid), type="Normal", reason="Started",
                                    message=f"restic {job.type} started on agent {job.agent}")
            self._set(job, statuses.job_started(status, report))
        elif isinstance(report, protocol.JobProgress):
            self._set(job, statuses.job_progress(status, report), delay=PROGRESS_INTERVAL)
        else:
            session.dispatched.discard(report.job)
            self._set(job, statuses.job_done(status, report))
            log.info("job %s: %s (exit code %s)", job.key, report.outcome.value, report.exit_code)
            if await self._writer.flushed(PLURAL, job.key):
                await session.send(protocol.JobDoneAck(ref=frame_id, job=report.job))
            else:
                log.warning("job %s: final status not written in time; the agent will send job.done again", job.key)

    # --- the level-triggered reconcile --------------------------------------------------------

    async def reconcile(self, key: ObjectKey) -> None:
        job = self._store.jobs.get(key)
        if job is None:
            return
        status = self.status_of(job)
        if not statuses.is_terminal(status) and not job.deleting and (problems := validation.job_problems(job.spec)):
            # Names that can never resolve fail the job once, instead of a lookup retried for ever.
            self._set(job, statuses.job_ended(status, phase="Failed", reason="Invalid", message="; ".join(problems),
                                              now=self._clock()))
            return
        session = self._session_of(job.agent_key)
        view = AgentView(frozenset(session.hello.running_jobs), frozenset(session.dispatched),
                         frozenset(session.hello.finished_jobs),
                         frozenset(session.hello.interrupted_jobs)) if session else None
        now = self._clock()
        step = next_step(job, status, view, now=now)
        if step is Step.WAIT:
            self._set(job, statuses.job_waiting(
                status, reason="AgentDisconnected", message=f"waiting for agent {job.agent} to connect"))
        elif step is Step.ADOPT:
            self._set(job, {**status, "phase": "Running", "message": f"running on agent {job.agent}"})
        elif step is Step.DISPATCH:
            assert session is not None
            await self._dispatch(job, session)
        elif step is Step.LOSE:
            if view is None:
                message = (f"agent {job.agent} has been away for longer than the job's timeoutSeconds; "
                           "it is given up")
            else:
                message = (f"agent {job.agent} reconnected and does not run this job any more "
                           "(restarted or killed while it ran)")
            log.warning("job %s: %s", job.key, message)
            self._set(job, statuses.job_ended(status, phase="Failed", reason=statuses.LOST, now=now,
                                              message=message))
        elif step is Step.NOTHING and view is None and statuses.phase_of(status) == "Running":
            deadline = give_up_at(job, status)
            if deadline is not None:
                self.request(job.key, delay=(deadline - now).total_seconds())
        elif step is Step.CANCEL:
            assert session is not None
            log.info("job %s deleted while running: cancelling it on agent %s", job.key, job.agent)
            await session.send(protocol.CommandCancel(job=str(job.key)))
            self._deleted_while_running(job)
            await self._set_finalizer(job, present=False)
        elif step is Step.RELEASE:
            await self._set_finalizer(job, present=False)

    def _deleted_while_running(self, job: Job) -> None:
        """The job is gone, so the Event that it was cancelled goes on its Schedule, or its Agent."""
        message = (f"ResticJob {job.key.name} was deleted while restic {job.type} ran on agent {job.agent}: "
                   "restic was cancelled there")
        if job.schedule_ref is not None:
            about = involved("Schedule", ObjectKey(job.key.namespace, job.schedule_ref.name), job.schedule_ref.uid)
        elif (agent := self._store.agents.get(job.agent_key)) is not None:
            about = involved("Agent", agent.key, agent.uid)
        else:
            return
        self._events.record(about, type="Warning", reason="JobCancelled", message=message)

    async def _set_finalizer(self, job: Job, *, present: bool) -> None:
        await self._kube.set_finalizer(PLURAL, job.key, FINALIZER, present=present,
                                       seen=FinalizersSeen(job.uid, job.finalizers))

    async def _dispatch(self, job: Job, session: Session) -> None:
        status = self.status_of(job)
        try:
            command = await self._command(job)
        except RepositoryUnavailable as problem:
            self._set(job, statuses.job_waiting(status, reason=problem.reason, message=str(problem)))
            self.request(job.key, delay=RETRY_DELAY)
            return
        except InvalidJob as problem:
            self._set(job, statuses.job_ended(status, phase="Failed", reason="InvalidSpec",
                                              message=str(problem), now=self._clock()))
            return
        if FINALIZER not in job.finalizers:  # a kubectl-created job; a fired one has it from the start
            await self._set_finalizer(job, present=True)
        current = self._store.jobs.get(job.key)
        moved = current is None or current.uid != job.uid or current.deleting
        if moved or self._session_of(job.agent_key) is not session:
            self.request(job.key)  # the world moved while the Secrets were read: look again
            return
        session.dispatched.add(str(job.key))
        self._set(job, statuses.job_dispatched(self.status_of(job), agent=job.agent, now=self._clock()))
        if await session.send(command):
            log.info("job %s: sent to agent %s", job.key, job.agent)
        else:
            session.dispatched.discard(str(job.key))
            self._set(job, statuses.job_waiting(status, reason="AgentDisconnected",
                                                message=f"waiting for agent {job.agent} to connect"))

    async def _command(self, job: Job) -> protocol.CommandRun:
        """command.run for ``job`` with the Repository's URL and credentials as they are now."""
        namespace = job.key.namespace
        repository_key = ObjectKey(namespace, job.repository)
        where = f"ResticJob {job.key}: spec.repository {job.repository}"
        repository = await self._repository(repository_key)
        if repository is None:
            raise RepositoryUnavailable("RepositoryNotFound", f"{where}: no such Repository in namespace {namespace}")
        spec = repository.spec
        names = [spec.get("passwordSecretRef", {}).get("name", "")]
        names += [source["secretRef"]["name"] for source in spec.get("envFrom") or []]
        secrets: dict[str, SecretRead] = {}
        for name in dict.fromkeys(names):
            try:
                secrets[name] = await self._kube.read_secret(ObjectKey(namespace, name))
            except NotFound:
                raise RepositoryUnavailable(
                    "SecretNotFound", f"{where}: Secret {name} of Repository {repository_key} does not exist"
                ) from None
        env = repository_env(spec, secrets, where=f"Repository {repository_key}")
        try:
            return msgspec.convert({
                "job": str(job.key),
                "type": job.type,
                "args": command_args(job),
                "repository": {"url": spec.get("url", ""), "env": env, "initialize": bool(spec.get("initialize"))},
                "timeoutSeconds": job.spec.get("timeoutSeconds", 14400),
            }, protocol.CommandRun)
        except msgspec.ValidationError as error:
            raise InvalidJob(f"ResticJob {job.key}: {protocol.describe(error, protocol.CommandRun)}") from None

    async def _repository(self, key: ObjectKey) -> Repository | None:
        """The Repository as the watch last showed it; read from the API while the watch has not
        shown it (just created, or the operator just started)."""
        known = self._store.repositories.get(key)
        if known is not None:
            return known
        try:
            return Repository.from_body(await self._kube.get("repositories", key))
        except NotFound:
            return None

    def _set(self, job: Job, new: dict[str, Any], *, delay: float = 0.0) -> None:
        old = self.status_of(job)
        if new == old:
            return
        self._status[job.uid] = new
        self._writer.mark(PLURAL, job.key, delay=delay)
        if statuses.phase_of(new) != statuses.phase_of(old) or new.get("reason") != old.get("reason"):
            self._on_phase_change(job, new)
            if statuses.is_terminal(new):
                type, reason, message = statuses.ended_event(job, new)
                self._events.record(involved("ResticJob", job.key, job.uid), type=type, reason=reason,
                                    message=message)
                self.request(job.key)  # release the finalizer
