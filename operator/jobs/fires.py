"""Whether an agent's ``schedule.fire`` becomes a ResticJob, the job's name and its body.

Like the CronJob controller, the job is named after its scheduled time, so a fire delivered
twice (a retry after a reconnect, two operator replicas) names the same ResticJob and the
second create meets AlreadyExists. Pure: the caller gathers the Schedule, the targeting
answer and the Schedule's jobs on that agent, and carries out the decision.
"""

from __future__ import annotations

import copy
import enum
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from restic_manager import cron
from restic_manager.operator.kube.api import API_VERSION, FINALIZER, ObjectKey, format_time, owner_reference
from restic_manager.operator.kube.cache import Schedule
from restic_manager.protocol import ScheduleFire

MAX_NAME = 63
# How far ahead of the operator's clock an agent's clock may be: a fire for a later time is a lie.
FUTURE_SKEW = timedelta(seconds=30)
LABEL_SCHEDULE = "resticmanager.io/schedule"
LABEL_AGENT = "resticmanager.io/agent"
ACTIVE_PHASES = frozenset({"Pending", "Running"})


class Verdict(enum.Enum):
    CREATE = "create"        # make the ResticJob (and cancel ``replace`` first)
    DUPLICATE = "duplicate"  # the job for this fire exists already: done, nothing to report
    REFUSED = "refused"      # not honoured; an Event and refusedFires
    MISSED = "missed"        # past startingDeadlineSeconds; an Event and missedFires
    # The agent may not fire this Schedule at all (another namespace's, one that does not
    # target it, an invalid one no agent was given): logged, counted and answered with an
    # error, but no state changes, so an agent cannot write into a Schedule it has no
    # business with.
    FORBIDDEN = "forbidden"


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    reason: str
    message: str
    job_name: str = ""
    replace: tuple[str, ...] = ()


def job_name(schedule: str, agent: str, scheduled_at: datetime, *, hashed: bool = False) -> str:
    """``<schedule>-<agent>-<stamp>``, a DNS-1123 label of at most 63 characters.

    The stamp counts minutes since the epoch when the fire is on a whole minute (as the
    CronJob controller does) and seconds otherwise, so seconds-level schedules never
    collide: since 2001 a seconds stamp has 10 digits, and a minutes stamp keeps 8 until
    the year 2160. A name that would be too long, or is asked to be ``hashed`` (because
    another pair's plain name took it: Schedule a-b on agent c, Schedule a on agent b-c),
    keeps its stamp and gets a hash of the schedule/agent pair in place of the prefix's tail.
    """
    seconds = int(scheduled_at.timestamp())
    stamp = str(seconds // 60) if seconds % 60 == 0 else str(seconds)
    prefix = _label_safe(f"{schedule}-{agent}")
    name = f"{prefix}-{stamp}"
    if not hashed and len(name) <= MAX_NAME and prefix == f"{schedule}-{agent}":
        return name
    digest = hashlib.sha256(f"{schedule}/{agent}".encode()).hexdigest()[:8]
    room = MAX_NAME - len(stamp) - len(digest) - 2
    return f"{prefix[:room].rstrip('-')}-{digest}-{stamp}"


def same_fire(job: Mapping[str, Any], *, schedule_uid: str, agent: str, scheduled_at: datetime) -> bool:
    """Whether the ResticJob ``job`` (a body) was made by this fire, not merely named alike."""
    spec = job.get("spec") or {}
    return (
        (spec.get("scheduleRef") or {}).get("uid") == schedule_uid
        and spec.get("agent") == agent
        and spec.get("scheduledAt") == format_time(scheduled_at)
    )


def event_name(schedule: Schedule, *, agent: str, scheduled_at: datetime, reason: str) -> str:
    """The name of the Event that records one fire's refusal or miss: one per fire and reason."""
    digest = hashlib.sha256(f"{schedule.uid}/{agent}/{format_time(scheduled_at)}/{reason}".encode()).hexdigest()[:16]
    return f"{schedule.key.name[:MAX_NAME]}.{digest}"


def label_value(name: str) -> str:
    """An object name as a label value (at most 63 characters; longer names end in a hash)."""
    if len(name) <= MAX_NAME:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{name[:MAX_NAME - 9].rstrip('-.')}-{digest}"


def _label_safe(text: str) -> str:
    # Object names may hold dots (DNS subdomains); a DNS-1123 label may not.
    return text.replace(".", "-")


def decide(
    *,
    fire: ScheduleFire,
    agent: ObjectKey,
    schedule: Schedule | None,
    targeted: bool,
    jobs: Mapping[str, str],
    now: datetime,
    produced: bool,
    acked: int | None,
    problems: Sequence[str] = (),
    repository_missing: str = "",
) -> Decision:
    """Whether ``agent``'s fire is honoured.

    ``jobs`` maps the names of the Schedule's ResticJobs on that agent to their phases as
    the operator knows them; ``targeted`` says whether the Schedule targets the agent now;
    ``produced`` whether the fire's time is one the expression of the fire's generation
    produces (in its zone, with the DST rules); ``acked`` the generation of the Schedule the
    agent last applied (None if it never did, or rejected it); ``problems`` are what makes
    the Schedule invalid (validation.py), if anything; ``repository_missing`` says so when the
    Schedule's Repository does not exist (a job would wait for it, and hold up every later fire
    under Forbid). An agent may only say what is true: a
    time the expression does not produce, one ahead of the operator's clock, or a generation
    the agent never applied is refused and changes nothing.
    """
    fire_key = ObjectKey.parse(fire.id)
    when = format_time(fire.scheduled_at)
    if fire_key.namespace != agent.namespace:
        return Decision(Verdict.FORBIDDEN, "ForeignNamespace",
                        f"agent {agent} fired Schedule {fire.id} of another namespace")
    if schedule is None or schedule.deleting:
        return Decision(Verdict.REFUSED, "ScheduleNotFound",
                        f"agent {agent} fired Schedule {fire.id}, which does not exist (any more)")
    if schedule.uid != fire.uid:
        return Decision(Verdict.REFUSED, "UidMismatch",
                        f"agent {agent} fired Schedule {fire.id} with uid {fire.uid}, but the "
                        f"Schedule of that name now has uid {schedule.uid} (it was recreated)")
    name = job_name(schedule.key.name, agent.name, fire.scheduled_at)
    for made in (name, job_name(schedule.key.name, agent.name, fire.scheduled_at, hashed=True)):
        if made in jobs:
            return Decision(Verdict.DUPLICATE, "AlreadyCreated",
                            f"fire at {when} of agent {agent.name} already made ResticJob {made}", made)
    if not targeted:
        return Decision(Verdict.FORBIDDEN, "NotTargeted",
                        f"fire at {when} from agent {agent.name}: Schedule {fire.id} does not target that agent")
    if problems:
        # An invalid Schedule is in no agent's set: this agent has no business firing it.
        return Decision(Verdict.FORBIDDEN, "InvalidSchedule",
                        f"fire at {when} from agent {agent.name}: Schedule {fire.id} is invalid and given to no "
                        f"agent: {'; '.join(problems)}")
    if schedule.suspend:
        return Decision(Verdict.REFUSED, "Suspended",
                        f"fire at {when} from agent {agent.name}: spec.suspend is true")
    if fire.generation > schedule.generation:
        return Decision(Verdict.REFUSED, "UnknownGeneration",
                        f"fire at {when} from agent {agent.name} names generation {fire.generation}, "
                        f"newer than the Schedule's {schedule.generation}")
    if fire.scheduled_at < schedule.created:
        return Decision(Verdict.REFUSED, "BeforeCreation",
                        f"fire at {when} from agent {agent.name} is older than the Schedule "
                        f"(created {format_time(schedule.created)})")
    if not produced:
        return Decision(Verdict.FORBIDDEN, "NotProduced",
                        f"fire at {when} from agent {agent.name}: the expression of Schedule {fire.id} "
                        f"generation {fire.generation} has no fire at that time")
    if fire.scheduled_at > now + FUTURE_SKEW:
        return Decision(Verdict.FORBIDDEN, "InTheFuture",
                        f"fire at {when} from agent {agent.name} is ahead of the operator's clock "
                        f"({format_time(now)}) by more than {FUTURE_SKEW.total_seconds():.0f}s")
    if acked is None or fire.generation > acked:
        return Decision(Verdict.FORBIDDEN, "NotAcked",
                        f"fire at {when} from agent {agent.name} names generation {fire.generation} of Schedule "
                        f"{fire.id}, which that agent has not applied"
                        + (f" (it applied {acked})" if acked is not None else ""))
    if repository_missing:
        return Decision(Verdict.REFUSED, "RepositoryNotFound", f"fire at {when} from agent {agent.name}: "
                                                               f"{repository_missing}")
    deadline = schedule.starting_deadline_seconds
    late = (now - fire.scheduled_at).total_seconds()
    if deadline is not None and late > deadline:
        return Decision(Verdict.MISSED, "MissedSchedule",
                        f"fire at {when} from agent {agent.name} arrived {late:.0f}s late, past "
                        f"spec.startingDeadlineSeconds {deadline}")
    active = tuple(sorted(job for job, phase in jobs.items() if phase in ACTIVE_PHASES))
    if active and schedule.concurrency_policy == "Forbid":
        return Decision(Verdict.REFUSED, "ConcurrencyForbid",
                        f"fire at {when} from agent {agent.name} skipped: concurrencyPolicy is Forbid "
                        f"and {', '.join(active)} is still active")
    replace = active if schedule.concurrency_policy == "Replace" else ()
    return Decision(Verdict.CREATE, "Honoured", f"fire at {when} from agent {agent.name}", name, replace)


def produces(expression: cron.Cron, moment: datetime) -> bool:
    """Whether ``moment`` is one of the expression's fire times (they fall on whole seconds)."""
    return expression.next_after(moment - timedelta(seconds=1)) == moment


def job_body(schedule: Schedule, *, agent: str, name: str, scheduled_at: datetime) -> dict[str, Any]:
    """The ResticJob a fire of ``schedule`` on ``agent`` creates: the template plus where and why.

    It holds the cancel-on-delete finalizer from the start, which spares the dispatcher a
    read and a patch to add it per job.
    """
    spec = copy.deepcopy(dict(schedule.template))
    spec.update(
        agent=agent,
        repository=schedule.repository,
        scheduleRef={"name": schedule.key.name, "uid": schedule.uid},
        scheduledAt=format_time(scheduled_at.astimezone(timezone.utc)),
    )
    return {
        "apiVersion": API_VERSION,
        "kind": "ResticJob",
        "metadata": {
            "name": name,
            "namespace": schedule.key.namespace,
            "labels": {LABEL_SCHEDULE: label_value(schedule.key.name), LABEL_AGENT: label_value(agent)},
            "finalizers": [FINALIZER],
            "ownerReferences": [owner_reference("Schedule", schedule.key, schedule.uid)],
        },
        "spec": spec,
    }
