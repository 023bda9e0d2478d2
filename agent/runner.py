"""The restic runner: starts, watches, stops and reports the agent's restic processes.

A thin asyncio shell around agent/restic.py, which decides the argv, the environment and what
the output means. One task per job, owned by :class:`JobRunner`: :meth:`JobRunner.aclose`
stops and awaits them all. Every job sends job.started when its first restic process starts
and exactly one job.done, whatever happens (an agent bug included).

A job's life: the host's agent config must allow it (agent/policy.py; a refused job ends
Failed before restic runs) → its journal entry is saved (agent/state.py) → (``restic unlock`` first when a
killed restic of this agent may have left the repository locked) → (init only: ``restic cat
config``; an existing repository ends the job) → the restic command → on a lock conflict,
``restic unlock`` and the command once more → if it was cancelled, timed out or killed,
``restic unlock`` so no stale lock outlives it. Stopping is SIGINT to restic's process group
(restic then removes its own lock), SIGKILL after ``kill_grace``. restic never outlives the
agent: it gets SIGINT when the agent dies (Linux's parent-death signal).

The jobs the journal still lists at the next start are interrupted (:func:`interrupted`): the
hello names them, and the operator sends their command.run again because only it holds the
repository's credentials. The agent then does not run restic's command a second time: it
unlocks the repository and, for a backup, looks for the snapshot tagged with the job's name
(:func:`~restic_manager.agent.restic.job_tag`), which restic may have saved before it was
stopped. Found, the job Succeeded with that snapshot; not found, it Failed as interrupted. An
interrupted job the operator does not ask for soon after it connects (the job was deleted
meanwhile; agent/connection.py's ``RECOVERY_WAIT``) ends as Failed without the lookup.

A job runs once: a command.run for a job that runs, has ended since the agent started, or
whose job.done still waits for its receipt is not run again.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import sys
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import msgspec

from restic_manager import protocol
from restic_manager.agent import policy
from restic_manager.agent import restic as rules
from restic_manager.agent.policy import HostPolicy
from restic_manager.agent.state import Journal
from restic_manager.protocol import JobType, Outcome

logger = logging.getLogger(__name__)

# forget --json prints every snapshot on one line; longer lines are dropped, not fatal.
_READ_LIMIT = 16 * 1024 * 1024
# The unlock after a stop runs outside the job's timeout; a dead backend must not hold it forever.
_CLEANUP_TIMEOUT = 120.0
_VERSION_TIMEOUT = 30.0
_FINISHED_KEPT = 256
INTERRUPTED = "the agent stopped while restic ran this job (killed or restarted); restic was stopped with it"


class ResticUnavailable(RuntimeError):
    """The restic binary cannot be run; ``str()`` names it and says why."""


class RunnerClosed(RuntimeError):
    """A job was started after :meth:`JobRunner.aclose`."""


@dataclass(eq=False)
class _Job:
    command: protocol.CommandRun
    redact: rules.Redactor
    tail: rules.LogTail = field(default_factory=rules.LogTail)
    stop_requested: asyncio.Event = field(default_factory=asyncio.Event)
    stop: rules.Stop | None = None
    started: bool = False
    last_progress: float | None = None
    task: asyncio.Task[None] | None = None

    @property
    def name(self) -> str:
        return self.command.job

    def request_stop(self, reason: rules.Stop) -> None:
        if self.stop is None:  # the first reason wins: a cancel after a timeout stays a timeout
            self.stop = reason
            self.stop_requested.set()


class JobRunner:
    """Runs restic jobs for one agent and reports them through ``send``."""

    def __init__(
        self,
        *,
        restic: str | os.PathLike[str],
        host: str,
        send: Callable[[protocol.Payload], Awaitable[None]],
        journal: Journal | None = None,
        save: Callable[[], Awaitable[None]] | None = None,
        unsettled: Callable[[], list[str]] = list,
        cache_dir: Path | None = None,
        host_policy: HostPolicy = HostPolicy(),
        progress_interval: float = 1.0,
        kill_grace: float = 10.0,
    ) -> None:
        self._restic = restic
        self._host = host
        self._send = send
        self._journal = journal if journal is not None else Journal()
        self._save = save
        self._unsettled = unsettled  # the jobs whose job.done waits for its receipt
        self._base_env = rules.base_environment(os.environ, cache_dir=cache_dir)
        self._progress_interval = progress_interval
        self._policy = host_policy
        self._kill_grace = kill_grace
        self._jobs: dict[str, _Job] = {}
        self._finished: OrderedDict[str, protocol.JobDone] = OrderedDict()
        self._closed = False

    async def start(self, command: protocol.CommandRun) -> None:
        """Start ``command`` as a job; returns once its task runs. A job already running is
        left alone (a repeated command.run, e.g. after a reconnect, is not a second run)."""
        if self._closed:
            raise RunnerClosed(f"job {command.job}: the runner is closed and starts no more jobs")
        if command.job in self._jobs:
            logger.info("job %s is already running; command.run ignored", command.job)
            return
        if command.job in self._finished or command.job in self._unsettled():
            logger.info("job %s has run already; command.run ignored (its job.done is the answer)", command.job)
            return
        job = _Job(command=command, redact=rules.Redactor.for_repository(command.repository))
        self._jobs[job.name] = job
        job.task = asyncio.create_task(self._run(job), name=f"restic job {job.name}")

    async def cancel(self, job: str) -> bool:
        """Ask a running job to stop (SIGINT, SIGKILL after kill_grace, then ``restic unlock``);
        returns at once, False if no such job runs. Its job.done says Cancelled."""
        running = self._jobs.get(job)
        if running is None:
            return False
        running.request_stop(rules.Stop.CANCELLED)
        return True

    def running(self) -> list[str]:
        return list(self._jobs)

    def interrupted(self) -> list[str]:
        """The interrupted jobs (see the module's docstring) whose outcome is still to be learned."""
        return sorted(job for job in self._journal.interrupted if job not in self._jobs)

    async def abandon_interrupted(self) -> None:
        """End the interrupted jobs nobody asked for as Failed, without looking them up."""
        for name in self.interrupted():
            del self._journal.interrupted[name]  # saved with the job.done's post
            logger.warning("job %s: %s; the operator did not ask for it again", name, INTERRUPTED)
            await self._report(_interrupted_done(name, now=datetime.now(timezone.utc)))

    async def wait(self, job: str) -> protocol.JobDone | None:
        """The job.done of ``job`` once it has finished; None for a job this runner does not know."""
        running = self._jobs.get(job)
        if running is not None and running.task is not None:
            await asyncio.shield(running.task)
        return self._finished.get(job)

    async def aclose(self) -> None:
        """Cancel every running job and wait until each has sent its job.done."""
        self._closed = True
        tasks = [job.task for job in self._jobs.values() if job.task is not None]
        for job in self._jobs.values():
            job.request_stop(rules.Stop.CANCELLED)
        # If aclose itself is cancelled, gather cancels the jobs, which then SIGKILL restic.
        await asyncio.gather(*tasks)

    # --- one job ---------------------------------------------------------------------------

    async def _run(self, job: _Job) -> None:
        command = job.command
        loop = asyncio.get_running_loop()
        expiry = loop.call_later(command.timeout_seconds, job.request_stop, rules.Stop.TIMED_OUT)
        verdict = rules.Verdict(Outcome.FAILED, "the agent stopped while running restic")
        exit_code: int | None = None
        summary: protocol.Summary | None = None
        recovering = job.name in self._journal.interrupted
        job.started = recovering  # restic started it in the earlier process: no second job.started
        refused = False
        try:
            if (why := await self._refusal(command)) is not None:
                refused = True
                verdict = rules.Verdict(Outcome.FAILED, job.redact(f"refused by this host: {why}"))
                job.tail.add(f"agent: {verdict.message}")
                return
            self._journal.running[job.name] = command.repository.url
            if self._save is not None:
                await self._save()  # before restic starts: a restart then knows it ran
            if command.repository.url in self._journal.unlock:
                await self._unlock(job, "a restic of this agent was killed while it used the repository")
                self._journal.unlock.discard(command.repository.url)
            if recovering:
                verdict, exit_code, summary = await self._recover(job)
            else:
                verdict, exit_code, summary = await self._perform(job)
            if job.stop is not None:
                await self._unlock(job, f"restic was stopped ({job.stop.value})")
            elif exit_code is not None and exit_code > 128:
                await self._unlock(job, f"restic was killed by signal {exit_code - 128}")
        except asyncio.CancelledError:
            verdict = rules.Verdict(Outcome.CANCELLED, f"{command.type.value} cancelled: the agent is shutting down")
            raise
        except rules.InvocationError as error:
            verdict = rules.Verdict(Outcome.FAILED, str(error))
        except OSError as error:  # restic missing or not executable
            verdict = rules.Verdict(Outcome.FAILED, f"cannot run restic {os.fspath(self._restic)}: {error.strerror or error}")
        except Exception as error:
            # An agent bug must still end the job with a job.done, not leave it Running forever.
            logger.exception("job %s: the runner failed", job.name)
            verdict = rules.Verdict(Outcome.FAILED, job.redact(f"agent error while running restic: {error!r}"))
        finally:
            expiry.cancel()
            self._journal.interrupted.pop(job.name, None)
            done = protocol.JobDone(
                job=job.name,
                outcome=verdict.outcome,
                exit_code=exit_code,
                finished_at=datetime.now(timezone.utc),
                summary=summary,
                error=rules.clip(verdict.message, rules.MAX_MESSAGE_CHARS),
                log_tail=job.tail.lines(),
                interrupted=recovering and verdict.outcome is Outcome.FAILED and not refused,
                refused=refused,
                timed_out=verdict.timed_out,
            )
            del self._jobs[job.name]
            self._journal.running.pop(job.name, None)  # saved with the job.done's post
            self._finished[job.name] = done
            while len(self._finished) > _FINISHED_KEPT:
                self._finished.popitem(last=False)
            logger.info("job %s: %s (exit code %s) %s", job.name, done.outcome.value, exit_code, done.error)
            await self._report(done)

    async def _refusal(self, command: protocol.CommandRun) -> str | None:
        """Why this host's agent config does not allow ``command`` (agent/policy.py), if it does not."""
        paths = policy.paths_of(command)
        real = await asyncio.to_thread(lambda: [os.path.realpath(path) for path in paths])
        return policy.refusal(command, self._policy, dict(zip(paths, real)))

    async def _perform(self, job: _Job) -> tuple[rules.Verdict, int | None, protocol.Summary | None]:
        command = job.command
        restic, base_env = self._restic, self._base_env
        if command.type is JobType.INIT or command.repository.initialize:
            verdict, code = await self._initialize(job)
            if command.type is JobType.INIT or verdict.outcome is not Outcome.SUCCEEDED:
                return verdict, code, None
        invocation = rules.build_invocation(command, restic=restic, host=self._host, base_env=base_env,
                                            protected=self._policy.excluded(policy.paths_of(command)))
        for retried in (False, True):
            transcript = rules.Transcript(redactor=job.redact, tail=job.tail)
            code = await self._execute(job, invocation, transcript, stop=job.stop_requested)
            verdict = rules.decide(command.type, code, transcript, stop=job.stop,
                                   timeout_seconds=command.timeout_seconds, retried=retried)
            if not verdict.retry_after_unlock or job.stop is not None:
                break
            job.tail.add("agent: repository is locked; removing stale locks with `restic unlock`, then retrying once")
            unlock = rules.Transcript(redactor=job.redact, tail=job.tail)
            unlock_call = rules.unlock_invocation(command, restic=restic, base_env=base_env)
            await self._execute(job, unlock_call, unlock, stop=job.stop_requested)
        return verdict, code, transcript.summary

    async def _recover(self, job: _Job) -> tuple[rules.Verdict, int | None, protocol.Summary | None]:
        """An interrupted job (the module's docstring): its snapshot, if restic saved one."""
        command = job.command
        if command.type is not JobType.BACKUP:
            return rules.Verdict(Outcome.FAILED, INTERRUPTED), None, None
        job.tail.add("agent: the agent stopped while restic ran this backup; looking for its snapshot")
        lookup = rules.Transcript(redactor=job.redact)
        call = rules.lookup_invocation(command, restic=self._restic, host=self._host, base_env=self._base_env)
        code = await self._execute(job, call, lookup, stop=job.stop_requested)
        found = lookup.summary.snapshot_id if code == 0 and lookup.summary is not None else None
        if found:
            job.tail.add(f"agent: restic saved snapshot {found[:8]} before it was stopped; the backup is complete "
                         "(restic's exit code and any files it could not read are not known)")
            return rules.Verdict(Outcome.SUCCEEDED, f"snapshot {found[:8]} found after the agent restarted"), None, \
                lookup.summary
        if code == 0:
            job.tail.add("agent: restic saved no snapshot for this job")
        else:
            job.tail.add(f"agent: cannot tell whether restic saved a snapshot: `restic snapshots` exited with "
                         f"{code}: {lookup.detail()}")
        return rules.Verdict(Outcome.FAILED, INTERRUPTED), None, None

    async def _initialize(self, job: _Job) -> tuple[rules.Verdict, int]:
        """`restic init` unless the repository exists already (an init job, or spec.initialize)."""
        command = msgspec.structs.replace(job.command, type=JobType.INIT, args=protocol.NoArgs())
        restic, base_env = self._restic, self._base_env
        probe = rules.Transcript(redactor=job.redact)  # its output (the config) is not log-worthy
        probe_call = rules.probe_invocation(command, restic=restic, base_env=base_env)
        code = await self._execute(job, probe_call, probe, stop=job.stop_requested)
        decided = rules.probe_verdict(code, probe, stop=job.stop, timeout_seconds=command.timeout_seconds)
        if decided is not None:
            return decided, code
        if job.command.type is not JobType.INIT:
            job.tail.add("agent: the repository does not exist yet; running `restic init` (Repository spec.initialize)")
        transcript = rules.Transcript(redactor=job.redact, tail=job.tail)
        init_call = rules.build_invocation(command, restic=restic, host=self._host, base_env=base_env)
        code = await self._execute(job, init_call, transcript, stop=job.stop_requested)
        return rules.decide(JobType.INIT, code, transcript, stop=job.stop, timeout_seconds=command.timeout_seconds), code

    async def _unlock(self, job: _Job, why: str) -> None:
        # SIGINT lets restic remove its own lock; after a SIGKILL only `restic unlock` can.
        job.tail.add(f"agent: {why}; removing stale locks with `restic unlock`")
        invocation = rules.unlock_invocation(job.command, restic=self._restic, base_env=self._base_env)
        deadline = asyncio.Event()
        handle = asyncio.get_running_loop().call_later(_CLEANUP_TIMEOUT, deadline.set)
        try:
            code = await self._execute(job, invocation, rules.Transcript(redactor=job.redact, tail=job.tail), stop=deadline)
        except OSError as error:  # the job's outcome stands; only the cleanup failed
            code = None
            job.tail.add(f"agent: cannot run `restic unlock`: {error.strerror or error}")
        finally:
            handle.cancel()
        if code != 0:
            logger.warning("job %s: `restic unlock` after the stop did not succeed (exit code %s)", job.name, code)

    # --- one restic process ------------------------------------------------------------------

    async def _execute(
        self, job: _Job, invocation: rules.Invocation, transcript: rules.Transcript, *, stop: asyncio.Event
    ) -> int:
        """Run ``invocation`` to its end, interrupting it once ``stop`` is set; its exit status."""
        process = await asyncio.create_subprocess_exec(
            *invocation.argv,
            env=dict(invocation.env),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,  # its own process group: our signals reach restic and its ssh only
            preexec_fn=_die_with_parent(os.getpid()),
            limit=_READ_LIMIT,
        )
        logger.debug("job %s: started %r as pid %d", job.name, invocation, process.pid)
        try:
            if not job.started:
                job.started = True
                await self._report(protocol.JobStarted(job=job.name, started_at=datetime.now(timezone.utc)))
            assert process.stdout is not None and process.stderr is not None
            async with asyncio.TaskGroup() as group:
                group.create_task(self._read(job, process.stdout, transcript))
                group.create_task(self._read(job, process.stderr, transcript))
                stopper = group.create_task(self._interrupt_when(job, process, stop))
                await process.wait()
                stopper.cancel()
        except BaseException:
            _signal(process, signal.SIGKILL)  # never leave restic running behind a dead job task
            raise
        assert process.returncode is not None
        return rules.exit_status(process.returncode)

    async def _read(self, job: _Job, stream: asyncio.StreamReader, transcript: rules.Transcript) -> None:
        while True:
            try:
                raw = await stream.readline()
            except ValueError:  # longer than _READ_LIMIT; asyncio has discarded it
                job.tail.add(f"agent: dropped an output line longer than {_READ_LIMIT} bytes")
                continue
            if not raw:
                return
            progress = transcript.feed(raw.decode(errors="replace"))
            if progress is not None:
                await self._report_progress(job, progress)

    async def _report_progress(self, job: _Job, progress: rules.Progress) -> None:
        now = asyncio.get_running_loop().time()
        if job.last_progress is not None and now - job.last_progress < self._progress_interval:
            return
        job.last_progress = now
        await self._report(progress.payload(job.name))

    async def _interrupt_when(self, job: _Job, process: asyncio.subprocess.Process, stop: asyncio.Event) -> None:
        await stop.wait()
        _signal(process, signal.SIGINT)
        try:
            async with asyncio.timeout(self._kill_grace):
                await process.wait()
        except TimeoutError:
            job.tail.add(f"agent: restic did not stop within {self._kill_grace:g} s of SIGINT; sent SIGKILL")
            _signal(process, signal.SIGKILL)

    async def _report(self, payload: protocol.Payload) -> None:
        try:
            await self._send(payload)
        except asyncio.CancelledError:
            raise
        except Exception:
            # A dropped connection must not kill the job: restic keeps running and must still
            # be stopped and unlocked; the operator learns the state from the next hello.
            logger.exception("could not send %s for job %s", payload.TYPE, getattr(payload, "job", "?"))


def interrupted(journal: Journal) -> list[str]:
    """At start-up: the jobs the last agent process was running when it died become
    interrupted, and their repositories are marked for `restic unlock`."""
    journal.unlock.update(journal.running.values())
    journal.interrupted.update(journal.running)
    journal.running.clear()
    return sorted(journal.interrupted)


def _interrupted_done(job: str, *, now: datetime) -> protocol.JobDone:
    return protocol.JobDone(job=job, outcome=Outcome.FAILED, finished_at=now, error=INTERRUPTED,
                            log_tail=[f"agent: {INTERRUPTED}"], interrupted=True)


_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None


def _die_with_parent(parent: int) -> Callable[[], None] | None:
    """What the child runs before exec: SIGINT when the agent dies (restic then removes its
    lock and exits), and at once if the agent died before the child got that far."""
    if _libc is None:
        return None
    prctl = _libc.prctl

    def arm() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGINT, 0, 0, 0)
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGINT)

    return arm


def _signal(process: asyncio.subprocess.Process, signum: signal.Signals) -> None:
    if process.returncode is not None:
        return  # already reaped: its pid may belong to someone else now
    try:
        os.killpg(process.pid, signum)
    except ProcessLookupError:
        pass  # exited between the check and the signal


async def restic_version(restic: str | os.PathLike[str]) -> str:
    """The version of the restic binary at ``restic``, e.g. "0.19.1"."""
    try:
        process = await asyncio.create_subprocess_exec(
            os.fspath(restic), "version",
            env=rules.base_environment(os.environ),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
    except OSError as error:
        raise ResticUnavailable(f"restic binary {os.fspath(restic)}: {error.strerror or error}") from error
    try:
        async with asyncio.timeout(_VERSION_TIMEOUT):
            stdout, stderr = await process.communicate()
    except TimeoutError:
        process.kill()
        await process.wait()
        raise ResticUnavailable(f"`{os.fspath(restic)} version` did not answer within {_VERSION_TIMEOUT:g} s") from None
    if process.returncode != 0:
        raise ResticUnavailable(
            f"`{os.fspath(restic)} version` exited with {process.returncode}: "
            f"{rules.clip(stderr.decode(errors='replace').strip())}"
        )
    return rules.parse_version(stdout.decode(errors="replace"))
