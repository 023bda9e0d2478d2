"""Whether a fire is honoured, the ResticJob name it yields, and the job it creates."""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from restic_manager import protocol
from restic_manager.cron import Cron
from restic_manager.operator.jobs import fires
from restic_manager.operator.jobs.fires import Verdict, decide, job_body, job_name
from restic_manager.operator.kube.api import ObjectKey
from restic_manager.operator.kube.cache import Schedule

UTC = timezone.utc
CREATED = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
AT = datetime(2026, 3, 2, 2, 0, 0, tzinfo=UTC)
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


@pytest.mark.parametrize(
    ("schedule", "agent", "scheduled_at", "expected"),
    [
        # On a whole minute: minutes since the epoch, as the CronJob controller names Jobs.
        ("nightly", "web-01", AT, f"nightly-web-01-{int(AT.timestamp()) // 60}"),
        # Seconds-level: seconds since the epoch.
        ("fast", "web-01", AT + timedelta(seconds=5), f"fast-web-01-{int(AT.timestamp()) + 5}"),
    ],
)
def test_job_name_is_derived_from_schedule_agent_and_time(
    schedule: str, agent: str, scheduled_at: datetime, expected: str
) -> None:
    assert job_name(schedule, agent, scheduled_at) == expected


def test_seconds_level_fires_never_share_a_name() -> None:
    start = AT - timedelta(minutes=2)
    names = {job_name("fast", "web-01", start + timedelta(seconds=s)) for s in range(0, 600)}
    assert len(names) == 600


def test_the_same_fire_always_names_the_same_job() -> None:
    later_copy = datetime.fromisoformat("2026-03-02T03:00:00+01:00")  # AT in another offset
    assert job_name("nightly", "web-01", AT) == job_name("nightly", "web-01", later_copy)


@pytest.mark.parametrize(
    ("schedule", "agent"),
    [
        ("a" * 60, "web-01"),
        ("nightly", "host." + "x" * 80 + ".example.com"),
        ("a" * 253, "b" * 253),
    ],
)
def test_long_names_are_shortened_to_a_valid_label_with_a_hash(schedule: str, agent: str) -> None:
    for when in (AT, AT + timedelta(seconds=1)):
        name = job_name(schedule, agent, when)
        assert len(name) <= 63 and DNS_LABEL.match(name), name
        assert name.endswith(str(int(when.timestamp()) // 60 if when.second == 0 else int(when.timestamp())))


def test_shortened_names_of_different_pairs_differ() -> None:
    assert job_name("a" * 60, "web-01", AT) != job_name("a" * 60, "web-02", AT)


def test_dotted_agent_names_cannot_collide_with_dashed_ones() -> None:
    assert job_name("nightly", "web.01", AT) != job_name("nightly", "web-01", AT)
    assert DNS_LABEL.match(job_name("nightly", "web.01", AT))


def make_schedule(**spec: Any) -> Schedule:
    return Schedule.from_body({
        "metadata": {"name": "nightly", "namespace": "ns", "uid": "uid-1", "generation": 3,
                     "resourceVersion": "10", "creationTimestamp": "2026-03-01T12:00:00Z"},
        "spec": {"agent": "web-01", "repository": "offsite", "schedule": "0 2 * * *",
                 "template": {"type": "backup", "backup": {"paths": ["/etc"]}, "timeoutSeconds": 60}, **spec},
    })


def fire(*, id: str = "ns/nightly", uid: str = "uid-1", generation: int = 3,
         at: datetime = AT) -> protocol.ScheduleFire:
    return protocol.ScheduleFire(id=id, uid=uid, generation=generation, scheduled_at=at)


THIS_JOB = job_name("nightly", "web-01", AT)
EARLIER_JOB = job_name("nightly", "web-01", AT - timedelta(days=1))
WEB01 = ObjectKey("ns", "web-01")

CASES = [
    # (case, fire, schedule, targeted, jobs, now, verdict, reason, replace)
    ("honoured", fire(), make_schedule(), True, {}, AT, Verdict.CREATE, "Honoured", ()),
    ("older generation still honoured", fire(generation=2), make_schedule(), True, {}, AT,
     Verdict.CREATE, "Honoured", ()),
    ("other namespace", fire(id="other/nightly"), make_schedule(), True, {}, AT,
     Verdict.FORBIDDEN, "ForeignNamespace", ()),
    ("schedule gone", fire(), None, False, {}, AT, Verdict.REFUSED, "ScheduleNotFound", ()),
    ("schedule recreated", fire(uid="uid-0"), make_schedule(), True, {}, AT,
     Verdict.REFUSED, "UidMismatch", ()),
    ("delivered twice", fire(), make_schedule(), True, {THIS_JOB: "Running"}, AT,
     Verdict.DUPLICATE, "AlreadyCreated", ()),
    ("delivered twice after suspend", fire(), make_schedule(suspend=True), True, {THIS_JOB: "Succeeded"}, AT,
     Verdict.DUPLICATE, "AlreadyCreated", ()),
    ("no longer targeted", fire(), make_schedule(), False, {}, AT, Verdict.FORBIDDEN, "NotTargeted", ()),
    ("suspended", fire(), make_schedule(suspend=True), True, {}, AT, Verdict.REFUSED, "Suspended", ()),
    ("generation from the future", fire(generation=4), make_schedule(), True, {}, AT,
     Verdict.REFUSED, "UnknownGeneration", ()),
    ("before the schedule existed", fire(at=CREATED - timedelta(minutes=1)), make_schedule(), True, {}, AT,
     Verdict.REFUSED, "BeforeCreation", ()),
    ("within the deadline", fire(), make_schedule(startingDeadlineSeconds=60), True, {},
     AT + timedelta(seconds=60), Verdict.CREATE, "Honoured", ()),
    ("past the deadline", fire(), make_schedule(startingDeadlineSeconds=60), True, {},
     AT + timedelta(seconds=61), Verdict.MISSED, "MissedSchedule", ()),
    ("no deadline: late is fine", fire(), make_schedule(), True, {}, AT + timedelta(days=2),
     Verdict.CREATE, "Honoured", ()),
    ("Forbid while active", fire(), make_schedule(), True, {EARLIER_JOB: "Running"}, AT,
     Verdict.REFUSED, "ConcurrencyForbid", ()),
    ("Forbid while pending", fire(), make_schedule(), True, {EARLIER_JOB: "Pending"}, AT,
     Verdict.REFUSED, "ConcurrencyForbid", ()),
    ("Forbid after it finished", fire(), make_schedule(), True, {EARLIER_JOB: "Failed"}, AT,
     Verdict.CREATE, "Honoured", ()),
    ("Allow runs both", fire(), make_schedule(concurrencyPolicy="Allow"), True, {EARLIER_JOB: "Running"}, AT,
     Verdict.CREATE, "Honoured", ()),
    ("Replace cancels the active one", fire(), make_schedule(concurrencyPolicy="Replace"), True,
     {EARLIER_JOB: "Running", "older": "Succeeded"}, AT, Verdict.CREATE, "Honoured", (EARLIER_JOB,)),
]


@pytest.mark.parametrize(
    ("fire_", "schedule", "targeted", "jobs", "now", "verdict", "reason", "replace"),
    [case[1:] for case in CASES], ids=[case[0] for case in CASES],
)
def test_fire_decision(
    fire_: protocol.ScheduleFire, schedule: Schedule | None, targeted: bool, jobs: dict[str, str],
    now: datetime, verdict: Verdict, reason: str, replace: tuple[str, ...],
) -> None:
    decision = decide(fire=fire_, agent=WEB01, schedule=schedule, targeted=targeted, jobs=jobs, now=now,
                      produced=fires.produces(NIGHTLY, fire_.scheduled_at), acked=3)
    assert (decision.verdict, decision.reason, decision.replace) == (verdict, reason, replace)
    assert decision.message
    if verdict in (Verdict.CREATE, Verdict.DUPLICATE):
        assert decision.job_name == job_name("nightly", "web-01", fire_.scheduled_at)


NIGHTLY = Cron("0 2 * * *", "UTC")
TRUTH = [
    # (case, fire, acked generation, verdict, reason): an agent may only say what is true
    ("a time the expression produces, acked", fire(), 3, Verdict.CREATE, "Honoured"),
    ("a time the expression does not produce", fire(at=AT + timedelta(minutes=7)), 3,
     Verdict.FORBIDDEN, "NotProduced"),
    ("a time with a fraction of a second", fire(at=AT + timedelta(microseconds=5)), 3,
     Verdict.FORBIDDEN, "NotProduced"),
    ("a produced time ten years ahead", fire(at=AT.replace(year=2036)), 3, Verdict.FORBIDDEN, "InTheFuture"),
    ("a produced time a day ahead", fire(at=AT + timedelta(days=1)), 3, Verdict.FORBIDDEN, "InTheFuture"),
    ("a generation the agent never applied", fire(), None, Verdict.FORBIDDEN, "NotAcked"),
    ("a generation newer than the agent applied", fire(generation=3), 2, Verdict.FORBIDDEN, "NotAcked"),
    ("an older generation than the agent applied", fire(generation=2), 3, Verdict.CREATE, "Honoured"),
]


@pytest.mark.parametrize(("fire_", "acked", "verdict", "reason"), [c[1:] for c in TRUTH], ids=[c[0] for c in TRUTH])
def test_an_agent_may_only_say_what_is_true(fire_: protocol.ScheduleFire, acked: int | None, verdict: Verdict,
                                            reason: str) -> None:
    decision = decide(fire=fire_, agent=WEB01, schedule=make_schedule(), targeted=True, jobs={}, now=AT,
                      produced=fires.produces(NIGHTLY, fire_.scheduled_at), acked=acked)
    assert (decision.verdict, decision.reason) == (verdict, reason), decision.message


def test_a_fire_at_the_first_instant_after_a_spring_forward_gap_is_produced() -> None:
    london = Cron("30 1 * * *", "Europe/London")  # 01:30 does not exist on 29 March 2026
    after_gap = datetime.fromisoformat("2026-03-29T02:00:00+01:00")
    assert fires.produces(london, after_gap) and not fires.produces(london, after_gap + timedelta(minutes=30))


def test_refusals_name_the_agent_and_the_time() -> None:
    decision = decide(fire=fire(), agent=WEB01, schedule=make_schedule(suspend=True), targeted=True,
                      jobs={}, now=AT, produced=True, acked=3)
    assert "web-01" in decision.message and "2026-03-02T02:00:00Z" in decision.message


def test_job_body_is_the_template_plus_where_and_why() -> None:
    schedule = make_schedule()
    body = job_body(schedule, agent="web-01", name=THIS_JOB, scheduled_at=AT)
    assert body["metadata"]["name"] == THIS_JOB and body["metadata"]["namespace"] == "ns"
    assert body["metadata"]["labels"] == {fires.LABEL_SCHEDULE: "nightly", fires.LABEL_AGENT: "web-01"}
    assert body["metadata"]["ownerReferences"] == [{
        "apiVersion": "resticmanager.io/v1alpha1", "kind": "Schedule", "name": "nightly", "uid": "uid-1",
        "controller": True, "blockOwnerDeletion": True,
    }]
    assert body["spec"] == {
        "type": "backup", "backup": {"paths": ["/etc"]}, "timeoutSeconds": 60,
        "agent": "web-01", "repository": "offsite",
        "scheduleRef": {"name": "nightly", "uid": "uid-1"}, "scheduledAt": "2026-03-02T02:00:00Z",
    }


def test_a_fired_job_is_created_holding_the_cancel_on_delete_finalizer() -> None:
    body = job_body(make_schedule(), agent="web-01", name=THIS_JOB, scheduled_at=AT)
    assert body["metadata"]["finalizers"] == ["resticmanager.io/cancel-on-delete"]


def test_job_body_does_not_share_the_template() -> None:
    schedule = make_schedule()
    body = job_body(schedule, agent="web-01", name=THIS_JOB, scheduled_at=AT)
    body["spec"]["backup"]["paths"].append("/home")
    assert schedule.template["backup"]["paths"] == ["/etc"]


def test_long_names_become_hashed_label_values() -> None:
    value = fires.label_value("n" * 100)
    assert len(value) <= 63 and value != fires.label_value("n" * 101)


def test_pairs_that_join_alike_can_be_told_apart_by_the_hashed_name() -> None:
    assert job_name("a-b", "c", AT) == job_name("a", "b-c", AT)
    hashed = {job_name("a-b", "c", AT, hashed=True), job_name("a", "b-c", AT, hashed=True)}
    assert len(hashed) == 2 and all(DNS_LABEL.match(name) for name in hashed)


def test_same_fire_compares_schedule_agent_and_time_not_the_name() -> None:
    body = job_body(make_schedule(), agent="web-01", name=THIS_JOB, scheduled_at=AT)
    assert fires.same_fire(body, schedule_uid="uid-1", agent="web-01", scheduled_at=AT)
    assert not fires.same_fire(body, schedule_uid="uid-2", agent="web-01", scheduled_at=AT)
    assert not fires.same_fire(body, schedule_uid="uid-1", agent="web-02", scheduled_at=AT)
    assert not fires.same_fire(body, schedule_uid="uid-1", agent="web-01", scheduled_at=AT + timedelta(seconds=1))
