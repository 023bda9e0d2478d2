"""Whether a Schedule's backups are happening on every agent it targets: the ``Healthy``
condition, as pure functions of what the operator knows.

An agent is unhealthy when its last run of the Schedule failed, when a job of it cannot start
(its Repository or a Secret is missing), or when a fire time has passed its deadline with no
successful run since before it and no job under way on a connected agent: the agent is
disconnected or stopped, did not apply the Schedule, or its fire came too late. The deadline
is the Schedule's ``startingDeadlineSeconds``, or :data:`DEFAULT_GRACE` when it has none, so a
host that stops firing shows within minutes, not never.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from restic_manager import cron
from restic_manager.operator.kube.api import format_time, parse_time

# How long after a fire time an agent without a deadline may take to have a job under way.
DEFAULT_GRACE = timedelta(minutes=10)
# Why a Pending job cannot start (dispatch.py's waiting reasons) that make its agent unhealthy;
# a job waiting for its agent to connect is covered by the deadline instead.
CANNOT_START = frozenset({"RepositoryNotFound", "SecretNotFound", "SecretKeyNotFound", "SecretNotOptedIn"})
FAILED = "LastRunFailed"
OVERDUE = "Overdue"


@dataclass(frozen=True)
class LastJob:
    """An ended job of a Schedule on one agent: its status entry's ``lastJob``, and what the
    metrics show of it (the duration, and a backup's figures, are not in the status)."""

    name: str
    phase: str
    reason: str
    time: datetime  # when it ended
    duration: float | None = None
    added_bytes: int | None = None
    files: int | None = None

    def to_status(self) -> dict[str, Any]:
        return {"name": self.name, "phase": self.phase, "reason": self.reason, "time": format_time(self.time)}

    @classmethod
    def from_status(cls, entry: Mapping[str, Any] | None) -> LastJob | None:
        if not entry or (time := parse_time(entry.get("time"))) is None:
            return None
        return cls(str(entry.get("name", "")), str(entry.get("phase", "")), str(entry.get("reason", "")), time)


@dataclass(frozen=True)
class ActiveJob:
    name: str
    phase: str
    reason: str
    message: str


@dataclass(frozen=True)
class AgentHealth:
    healthy: bool
    reason: str = ""
    message: str = ""


HEALTHY = AgentHealth(True)


def grace_of(starting_deadline_seconds: int | None) -> timedelta:
    if starting_deadline_seconds is None:
        return DEFAULT_GRACE
    return timedelta(seconds=starting_deadline_seconds)


@dataclass(frozen=True)
class Due:
    """The newest fire time whose deadline has passed (None: none yet), and when the next
    one's will: the same for every agent of a Schedule, so worked out once per look."""

    latest: datetime | None
    next: datetime | None


NOTHING_DUE = Due(None, None)


def due_fires(expression: cron.Cron, *, created: datetime, grace: timedelta, now: datetime) -> Due:
    return Due(expression.latest_between(created, now - grace), expression.next_after(now - grace) + grace)


def agent_health(
    *,
    due: datetime | None,
    grace: timedelta,
    since: datetime,
    last_job: LastJob | None,
    active: Sequence[ActiveJob],
    connected: bool,
    applied: bool,
    last_fire: datetime | None,
) -> AgentHealth:
    """One agent's health.

    ``due`` is the newest fire time past its deadline (None when the Schedule is suspended or
    has not had one); ``since`` when a success was last seen (or, with none, when the agent
    could first have fired: the Schedule's creation or the agent's ack); ``last_fire`` the
    newest fire time the agent sent; ``applied`` whether it runs the current generation.
    """
    if last_job is not None and last_job.phase == "Failed":
        return AgentHealth(False, FAILED, f"its last run {last_job.name} failed ({last_job.reason}) at "
                                          f"{format_time(last_job.time)}")
    for job in active:
        if job.phase == "Pending" and job.reason in CANNOT_START:
            return AgentHealth(False, job.reason, f"{job.name} cannot start: {job.message}")
    # A job under way covers a fire's absence only while its agent is there to run it: one
    # whose agent went away is as good as lost until the agent says otherwise.
    if (active and connected) or due is None or due <= since:
        return HEALTHY
    if not connected:
        why = "the agent is not connected"
    elif not applied:
        why = "the agent has not applied this generation"
    elif last_fire is not None and last_fire >= due:
        why = "its fire came past the deadline and was not run"
    else:
        why = "its fire has not reached the operator"
    return AgentHealth(False, OVERDUE, f"no successful run since {format_time(since)}, and the fire at "
                                       f"{format_time(due)} is more than {int(grace.total_seconds())} s "
                                       f"past: {why}")


def healthy_condition(
    health: Mapping[str, AgentHealth], *, cannot_run: tuple[str, str] | None, no_agents: str,
) -> tuple[bool, str, str]:
    """(status, reason, message) of the Schedule's ``Healthy`` condition.

    ``cannot_run`` is (reason, message) when the Schedule cannot run anywhere (invalid, its
    Repository missing); ``no_agents`` says why it targets nothing, when it does not.
    """
    if cannot_run is not None:
        return False, *cannot_run
    if not health:
        return False, "NoAgents", no_agents
    sick = {name: state for name, state in sorted(health.items()) if not state.healthy}
    if not sick:
        noun = "agent" if len(health) == 1 else f"all {len(health)} agents"
        return True, "AllAgentsHealthy", f"{noun}: no failed run, no fire past due"
    reasons = {state.reason for state in sick.values()}
    reason = reasons.pop() if len(reasons) == 1 else "AgentsUnhealthy"
    return False, reason, "; ".join(f"{name}: {state.message}" for name, state in sick.items())
