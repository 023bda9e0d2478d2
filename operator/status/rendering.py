"""Status of Schedules, ResticJobs and Agents as pure functions of what the operator knows.

The operator owns every ``status`` it writes: it seeds its bookkeeping from the status it
finds (so a restart loses nothing), changes it only through these functions, and the
writer patches the difference.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from restic_manager.operator.kube.api import format_time, parse_time
from restic_manager.operator.kube.cache import Job, Schedule
from restic_manager.operator.status.health import HEALTHY, AgentHealth, LastJob, healthy_condition
from restic_manager.protocol import Hello, JobDone, JobProgress, JobStarted, Outcome, to_wire

Status = dict[str, Any]

TERMINAL_PHASES = frozenset({"Succeeded", "Failed", "Cancelled"})
LOST = "AgentLost"


# --- conditions ---------------------------------------------------------------------------


def condition_of(conditions: Sequence[Mapping[str, Any]], type: str) -> Mapping[str, Any] | None:
    """The condition of ``type`` in ``conditions``, if there is one."""
    return next((condition for condition in conditions if condition.get("type") == type), None)


def set_condition(
    conditions: Sequence[Mapping[str, Any]],
    *,
    type: str,
    status: bool,
    reason: str,
    message: str,
    now: datetime,
    observed_generation: int | None = None,
) -> list[dict[str, Any]]:
    """``conditions`` with ``type`` set in its place (new types go last); lastTransitionTime
    moves only when the status flips."""
    value = "True" if status else "False"
    previous = condition_of(conditions, type)
    since = (
        previous["lastTransitionTime"]
        if previous is not None and previous.get("status") == value and previous.get("lastTransitionTime")
        else format_time(now)
    )
    condition: dict[str, Any] = {"type": type, "status": value}
    if observed_generation is not None:
        condition["observedGeneration"] = observed_generation
    condition.update(lastTransitionTime=since, reason=reason, message=message)
    kept = [condition if c.get("type") == type else dict(c) for c in conditions]
    return kept if previous is not None else kept + [condition]


# --- Schedule -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Ack:
    """An agent's last answer about one Schedule: applied, or rejected with ``error``."""

    generation: int
    at: datetime
    error: str = ""


@dataclass
class ScheduleBook:
    """What the operator records about a Schedule between status writes."""

    acks: dict[str, Ack] = field(default_factory=dict)
    last_fire: dict[str, datetime] = field(default_factory=dict)
    last_schedule_time: datetime | None = None
    last_successful_time: datetime | None = None
    missed: int = 0
    refused: int = 0
    conditions: list[dict[str, Any]] = field(default_factory=list)
    # By agent: its newest ended job and newest success; its health as last rendered.
    last_job: dict[str, LastJob] = field(default_factory=dict)
    last_success: dict[str, LastJob] = field(default_factory=dict)
    health: dict[str, AgentHealth] = field(default_factory=dict)

    @classmethod
    def from_status(cls, status: Mapping[str, Any]) -> ScheduleBook:
        book = cls(
            last_schedule_time=parse_time(status.get("lastScheduleTime")),
            last_successful_time=parse_time(status.get("lastSuccessfulTime")),
            missed=int(status.get("missedFires", 0)),
            refused=int(status.get("refusedFires", 0)),
            conditions=copy.deepcopy(list(status.get("conditions") or [])),
        )
        for entry in status.get("agents") or []:
            at = parse_time(entry.get("ackedAt"))
            # Rejections are not seeded: the generation they refer to is not in the status,
            # and every agent answers a fresh push when it reconnects anyway.
            if at is not None and entry.get("ackedGeneration") is not None:
                book.acks[entry["name"]] = Ack(int(entry["ackedGeneration"]), at)
            fired = parse_time(entry.get("lastFireTime"))
            if fired is not None:
                book.last_fire[entry["name"]] = fired
            if (last_job := LastJob.from_status(entry.get("lastJob"))) is not None:
                book.last_job[entry["name"]] = last_job
            if (succeeded := parse_time(entry.get("lastSuccessfulTime"))) is not None:
                book.last_success[entry["name"]] = LastJob("", "Succeeded", "", succeeded)
        return book

    def record_end(self, agent: str, job: LastJob) -> None:
        """Take a job of the Schedule on ``agent`` that ended (reports may come out of order)."""
        before = self.last_job.get(agent)
        if before is None or (job.time, job.name) >= (before.time, before.name):
            self.last_job[agent] = job
        if job.phase != "Succeeded":
            return
        if agent not in self.last_success or job.time > self.last_success[agent].time:
            self.last_success[agent] = job
        if self.last_successful_time is None or job.time > self.last_successful_time:
            self.last_successful_time = job.time

    def record_ack(self, agent: str, *, applied: Mapping[str, int], rejected: Mapping[str, tuple[int, str]],
                   schedule_id: str, at: datetime) -> bool:
        """Take one agent's ack of a whole set; returns whether this Schedule's record changed.

        The same answer about the same generation again (every ack covers the agent's whole
        set) keeps the first one, and when it came: only the Schedules an ack is news for
        get their status written.
        """
        if schedule_id in applied:
            ack = Ack(applied[schedule_id], at)
        elif schedule_id in rejected:
            generation, error = rejected[schedule_id]
            ack = Ack(generation, at, error)
        else:
            return self.acks.pop(agent, None) is not None  # no longer in that agent's set
        before = self.acks.get(agent)
        if before is not None and (before.generation, before.error) == (ack.generation, ack.error):
            return False
        self.acks[agent] = ack
        return True


def applied_condition(
    *, generation: int, targets: Sequence[str], acks: Mapping[str, Ack], connected: Collection[str],
    no_agents: str, cannot_run: tuple[str, str] | None = None,
) -> tuple[bool, str, str]:
    """(status, reason, message) of the Schedule's ``Applied`` condition.

    ``cannot_run`` is (reason, message) when the Schedule is invalid (validation.py) or its
    Repository does not exist: it is given to no agent.
    """
    if cannot_run is not None:
        return False, *cannot_run
    if not targets:
        return False, "NoAgents", no_agents
    rejected = [
        f"{name} rejected generation {generation}: {acks[name].error}"
        for name in targets
        if name in acks and acks[name].generation == generation and acks[name].error
    ]
    if rejected:
        return False, "Rejected", "; ".join(rejected)
    waiting = [
        name for name in targets
        if name not in acks or acks[name].generation != generation or acks[name].error
    ]
    if not waiting:
        noun = "agent" if len(targets) == 1 else f"all {len(targets)} agents"
        return True, "AllAgentsAcked", f"{noun} applied generation {generation}"
    disconnected = [name for name in waiting if name not in connected]
    if disconnected:
        return False, "AgentsDisconnected", (
            f"generation {generation} not applied yet; not connected: {', '.join(disconnected)}"
        )
    return False, "NotAcked", f"waiting for {', '.join(waiting)} to apply generation {generation}"


def schedule_status(
    schedule: Schedule,
    *,
    book: ScheduleBook,
    targets: Sequence[str],
    connected: Collection[str],
    resolved: str | None,
    next_fire: datetime | None,
    active: Sequence[str],
    no_agents: str,
    now: datetime,
    cannot_run: tuple[str, str] | None = None,
) -> Status:
    """The whole status of ``schedule``.

    ``targets`` are the names of the Agents it targets; ``next_fire`` is the next fire time
    after now where the expression resolves (shown for agents that applied this generation);
    ``book.health`` holds each target's health. The conditions keep the transition times of
    ``book.conditions``; the caller keeps the returned conditions in the book for the next time.
    """
    generation = schedule.generation
    agents = []
    for name in sorted(targets):
        entry: dict[str, Any] = {"name": name, "connected": name in connected}
        ack = book.acks.get(name)
        if ack is not None:
            if not ack.error:
                entry["ackedGeneration"] = ack.generation
            entry["ackedAt"] = format_time(ack.at)
            if ack.error:
                entry["error"] = ack.error
        if name in book.last_fire:
            entry["lastFireTime"] = format_time(book.last_fire[name])
        if (next_fire is not None and not schedule.suspend and ack is not None
                and ack.generation == generation and not ack.error):
            entry["nextFireTime"] = format_time(next_fire)
        if name in book.last_job:
            entry["lastJob"] = book.last_job[name].to_status()
        if name in book.last_success:
            entry["lastSuccessfulTime"] = format_time(book.last_success[name].time)
        agents.append(entry)
    applied = applied_condition(
        generation=generation, targets=targets, acks=book.acks, connected=connected, no_agents=no_agents,
        cannot_run=cannot_run,
    )
    health = {name: book.health.get(name, HEALTHY) for name in targets}
    healthy = healthy_condition(health, cannot_run=cannot_run, no_agents=no_agents)
    conditions = book.conditions
    for type, (value, reason, message) in (("Applied", applied), ("Healthy", healthy)):
        conditions = set_condition(conditions, type=type, status=value, reason=reason, message=message,
                                   now=now, observed_generation=generation)
    status: Status = {"observedGeneration": generation}
    if resolved is not None:
        status["resolvedSchedule"] = resolved
    if next_fire is not None and not schedule.suspend and cannot_run is None:
        status["nextFireTime"] = format_time(next_fire)
    status["agents"] = agents
    fine = 0 if cannot_run is not None else sum(state.healthy for state in health.values())
    status["healthyAgents"] = f"{fine}/{len(targets)}"  # as kubectl shows a Deployment's READY
    if book.last_schedule_time is not None:
        status["lastScheduleTime"] = format_time(book.last_schedule_time)
    if book.last_successful_time is not None:
        status["lastSuccessfulTime"] = format_time(book.last_successful_time)
    status["missedFires"] = book.missed
    status["refusedFires"] = book.refused
    status["active"] = [{"name": name} for name in sorted(active)]
    status["conditions"] = conditions
    return status


# --- ResticJob ----------------------------------------------------------------------------


def phase_of(status: Mapping[str, Any]) -> str:
    return status.get("phase") or "Pending"


def is_terminal(status: Mapping[str, Any]) -> bool:
    return phase_of(status) in TERMINAL_PHASES


def last_job(job: Job, status: Mapping[str, Any], *, now: datetime) -> LastJob:
    """An ended job as its Schedule's status and metrics keep it."""
    ended = parse_time(status.get("completionTime")) or now
    started = parse_time(status.get("startTime"))
    summary = status.get("summary") or {}
    return LastJob(
        job.key.name, phase_of(status), status.get("reason", ""), ended,
        duration=summary.get("durationSeconds") or ((ended - started).total_seconds() if started else None),
        added_bytes=summary.get("dataAdded"), files=summary.get("totalFilesProcessed"),
    )


def ended_event(job: Job, status: Mapping[str, Any]) -> tuple[str, str, str]:
    """The (type, reason, message) of the Event an ended job gets: a failure's reason is the
    job's own (WrongPassword, Timeout, AgentLost, ...), so ``kubectl get events`` says why."""
    phase, reason = phase_of(status), status.get("reason", "")
    text = f"{job.type} on agent {job.agent}: {status.get('message', '')}"
    if phase == "Succeeded":
        summary = status.get("summary") or {}
        if summary.get("shortId"):
            text += f"; snapshot {summary['shortId']}"
        return "Normal", "Completed", text
    if phase == "Cancelled":
        return "Normal", "Cancelled", text
    return "Warning", reason or "Failed", text


def job_waiting(status: Mapping[str, Any], *, reason: str, message: str) -> Status:
    """Pending, with why it has not been sent to its agent yet."""
    return {**status, "phase": "Pending", "reason": reason, "message": message}


def job_dispatched(status: Mapping[str, Any], *, agent: str, now: datetime) -> Status:
    new = {**status, "phase": "Running", "dispatchedAt": format_time(now),
           "message": f"sent to agent {agent}"}
    new.pop("reason", None)
    return new


def job_started(status: Mapping[str, Any], message: JobStarted) -> Status:
    if is_terminal(status):
        return dict(status)
    return {**status, "phase": "Running", "startTime": format_time(message.started_at),
            "message": "restic is running"}


def job_progress(status: Mapping[str, Any], message: JobProgress) -> Status:
    if is_terminal(status):
        return dict(status)
    progress = {name: value for name, value in to_wire(message).items() if name != "job"}
    # Whole percent for the printer column, rounded down: 100 only once restic is done.
    progress["percent"] = math.floor(message.percent_done)
    return {**status, "phase": "Running", "progress": progress}


_EXIT_REASONS = {3: "IncompleteSnapshot", 10: "RepositoryNotFound", 11: "RepositoryLocked", 12: "WrongPassword"}
TIMEOUT = "Timeout"
SHORT_ID = 8  # hex digits of a snapshot id, as restic shows it


def job_done(status: Mapping[str, Any], message: JobDone) -> Status:
    """The job's end as the agent reports it.

    A job already given up as AgentLost takes the agent's late report: it is the truth.
    """
    if is_terminal(status) and status.get("reason") != LOST:
        return dict(status)
    outcome = message.outcome
    if message.refused:
        reason, text = "RefusedByAgent", message.error
    elif message.interrupted:
        reason, text = LOST, message.error or "the agent stopped while restic ran"
    elif message.timed_out and outcome is Outcome.FAILED:
        reason, text = TIMEOUT, message.error or "restic ran longer than spec.timeoutSeconds and was stopped"
    elif outcome is Outcome.SUCCEEDED:
        reason, text = "Completed", "restic finished successfully"
    elif outcome is Outcome.CANCELLED:
        reason, text = "Cancelled", message.error or "cancelled"
    else:
        reason = _EXIT_REASONS.get(message.exit_code or 0, "ResticFailed")
        text = message.error or f"restic exited with code {message.exit_code}"
    new: Status = {**status, "phase": outcome.value, "reason": reason, "message": text,
                   "completionTime": format_time(message.finished_at)}
    if message.exit_code is not None:
        new["exitCode"] = message.exit_code
    if message.summary is not None:
        new["summary"] = to_wire(message.summary)
        if message.summary.snapshot_id:
            new["summary"]["shortId"] = message.summary.snapshot_id[:SHORT_ID]
    if outcome is Outcome.SUCCEEDED:
        new["progress"] = {**(status.get("progress") or {}), "percent": 100}
    new["logTail"] = list(message.log_tail)
    return _with_outcome_conditions(new, now=message.finished_at)


def job_ended(status: Mapping[str, Any], *, phase: str, reason: str, message: str, now: datetime) -> Status:
    """The job ends without the agent's report: lost, invalid, or cancelled before it ran."""
    if is_terminal(status):
        return dict(status)
    new = {**status, "phase": phase, "reason": reason, "message": message, "completionTime": format_time(now)}
    return _with_outcome_conditions(new, now=now)


def _with_outcome_conditions(status: Status, *, now: datetime) -> Status:
    succeeded = status["phase"] == "Succeeded"
    conditions = set_condition(
        status.get("conditions") or [], type="Complete", status=succeeded,
        reason=status["reason"], message=status["message"], now=now,
    )
    conditions = set_condition(
        conditions, type="Failed", status=not succeeded,
        reason=status["reason"], message=status["message"], now=now,
    )
    return {**status, "conditions": conditions}


# --- Agent --------------------------------------------------------------------------------


def agent_connected(status: Mapping[str, Any], hello: Hello, *, peer: str, now: datetime,
                    replaced: str = "") -> Status:
    """Connected from ``peer``; ``replaced`` is the peer of a connection of the same Agent this
    one took the place of (the ``Replaced`` condition)."""
    new = {
        **status,
        "connected": True,
        "lastSeen": format_time(now),
        "hostname": hello.hostname,
        "agentVersion": hello.agent_version,
        "resticVersion": hello.restic_version,
        "protocolVersion": hello.protocol_version,
        "runningJobs": len(hello.running_jobs),
    }
    address = peer.rpartition(":")[0]  # peer is host:port
    if address:
        new["address"] = address
    conditions = set_condition(
        status.get("conditions") or [], type="Connected", status=True, reason="Connected",
        message=f"connected from {peer}", now=now,
    )
    if replaced:
        conditions = set_condition(conditions, type="Replaced", status=True, reason="AnotherConnection",
                                   message=REPLACED.format(new=peer, old=replaced), now=now)
    elif any(c.get("type") == "Replaced" for c in conditions):
        conditions = set_condition(conditions, type="Replaced", status=False, reason="SingleConnection",
                                   message=f"the connection from {peer} replaced none", now=now)
    new["conditions"] = conditions
    return new


REPLACED = ("a connection from {new} took the place of the one from {old}: the agent reconnected before "
            "its old connection closed, or a second process uses the same credentials")


def agent_disconnected(status: Mapping[str, Any], *, why: str, now: datetime) -> Status:
    new = {**status, "connected": False, "lastSeen": format_time(now)}
    new["conditions"] = set_condition(
        status.get("conditions") or [], type="Connected", status=False, reason="Disconnected",
        message=why, now=now,
    )
    return new
