"""Authorization in the controller, with a fake API and fake connections: an agent acts only on
what is its own, and the namespace is the tenant boundary. Every refused message is answered
with ``forbidden``, counted, and changes nothing: no ResticJob, no status, no Event.
(tests/e2e/test_security_e2e.py shows the same on the real control plane.)"""

from __future__ import annotations

import copy
from datetime import datetime, timezone
from typing import Any

import pytest

from restic_manager import protocol
from restic_manager.operator.controller import Controller
from restic_manager.operator.kube.api import ObjectKey
from restic_manager.operator.status.writer import Target
from support.operator_fakes import FakeKube, FakeSession, connect as connect_session

NOW = datetime(2026, 3, 2, 2, 0, 5, tzinfo=timezone.utc)
AT = datetime(2026, 3, 2, 2, 0, tzinfo=timezone.utc)


def agent(name: str, namespace: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": namespace, "uid": f"uid-{namespace}-{name}",
                         "resourceVersion": "1"}}


def schedule(name: str, namespace: str, **spec: Any) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": namespace, "uid": f"uid-{name}", "generation": 1,
                         "resourceVersion": "10", "creationTimestamp": "2026-03-01T00:00:00Z"},
            "spec": {"repository": "offsite", "schedule": "0 2 * * *", "concurrencyPolicy": "Allow",
                     "template": {"type": "backup", "backup": {"paths": ["/etc"]}}, **spec}}


@pytest.fixture
async def controller() -> Controller:
    made = Controller(kube=FakeKube(), namespaces=None, clock=lambda: NOW)  # type: ignore[arg-type]
    made.view_complete()
    for name, namespace in (("web-a", "x"), ("web-b", "x"), ("web-y", "y")):
        made.observe("agents", "ADDED", agent(name, namespace))
    for namespace in ("x", "y"):
        made.observe("repositories", "ADDED", {"metadata": {"name": "offsite", "namespace": namespace,
                                                            "uid": f"uid-{namespace}-offsite", "resourceVersion": "2"},
                                               "spec": {}})
    made.observe("schedules", "ADDED", schedule("b-only", "x", agent="web-b"))
    made.observe("schedules", "ADDED", schedule("cross-agent", "x", agent="y/web-y"))
    made.observe("schedules", "ADDED", schedule("cross-repo", "x", agent="web-a", repository="y/offsite"))
    made.observe("resticjobs", "ADDED", {
        "metadata": {"name": "b-job", "namespace": "x", "uid": "uid-b-job", "resourceVersion": "20"},
        "spec": {"agent": "web-b", "repository": "offsite", "type": "prune"}})
    return made


def connect(controller: Controller, namespace: str, name: str) -> FakeSession:
    return connect_session(controller, ObjectKey(namespace, name))


def everything(controller: Controller) -> dict[str, Any]:
    """Every status the operator would write, and what it created or posted."""
    kube: FakeKube = controller._kube  # type: ignore[assignment]
    statuses = {}
    for plural, collection in (("schedules", controller.store.schedules), ("resticjobs", controller.store.jobs),
                               ("agents", controller.store.agents)):
        for obj in collection:
            rendered = controller._render(Target(plural, obj.key))
            statuses[f"{plural}/{obj.key}"] = copy.deepcopy(dict(rendered.desired)) if rendered else None
    for status in statuses.values():  # lastSeen moves with every frame: the sender was seen, nothing more
        if status is not None:
            status.pop("lastSeen", None)
    return {"statuses": statuses, "created": list(kube.created), "events": list(kube.events)}


def frame(payload: protocol.Payload, frame_id: str = "f1") -> protocol.Frame:
    return protocol.Frame(id=frame_id, payload=payload)  # type: ignore[arg-type]


def fire(schedule_id: str, uid: str) -> protocol.ScheduleFire:
    return protocol.ScheduleFire(id=schedule_id, uid=uid, generation=1, scheduled_at=AT)


CASES = [
    ("agent A fires agent B's Schedule", ("x", "web-a"), fire("x/b-only", "uid-b-only"),
     "forbidden-fire", "Schedule x/b-only does not target that agent"),
    ("agent A reports that B's job started", ("x", "web-a"), protocol.JobStarted(job="x/b-job", started_at=AT),
     "forbidden-job-of-another-agent", "job x/b-job is not a job of agent web-a"),
    ("agent A reports progress of B's job", ("x", "web-a"), protocol.JobProgress(job="x/b-job", percent_done=50),
     "forbidden-job-of-another-agent", "job x/b-job is not a job of agent web-a"),
    ("agent A reports that B's job failed", ("x", "web-a"),
     protocol.JobDone(job="x/b-job", outcome=protocol.Outcome.FAILED, exit_code=1, finished_at=AT),
     "forbidden-job-of-another-agent", "job x/b-job is not a job of agent web-a"),
    ("an agent in Y fires a Schedule in X", ("y", "web-y"), fire("x/b-only", "uid-b-only"),
     "forbidden-fire", "agent y/web-y fired Schedule x/b-only of another namespace"),
    ("an agent in Y reports on a job in X", ("y", "web-y"), protocol.JobStarted(job="x/b-job", started_at=AT),
     "forbidden-job-of-another-agent", "job x/b-job is not a job of agent web-y"),
    ("an agent in Y fires the X Schedule that names it", ("y", "web-y"), fire("x/cross-agent", "uid-cross-agent"),
     "forbidden-fire", "of another namespace"),
    ("agent A fires its Schedule that names Y's Repository", ("x", "web-a"), fire("x/cross-repo", "uid-cross-repo"),
     "forbidden-fire", "spec.repository 'y/offsite': must be the name of a Repository in the Schedule's own"),
]


@pytest.mark.parametrize(("case", "sender", "payload", "counted", "message"), CASES, ids=[c[0] for c in CASES])
async def test_a_message_about_what_is_not_the_agents_own_is_refused_and_changes_nothing(
        controller: Controller, case: str, sender: tuple[str, str], payload: protocol.Payload,
        counted: str, message: str) -> None:
    session = connect(controller, *sender)
    before = everything(controller)
    await controller.on_message(session, frame(payload))  # type: ignore[arg-type]
    [answer] = session.sent
    if isinstance(payload, protocol.ScheduleFire):
        # A fire is settled with a refusal (the agent stops sending it); nothing is recorded.
        assert isinstance(answer, protocol.FireResult)
        assert (answer.outcome, answer.ref) == (protocol.FireOutcome.REFUSED, "f1")
        assert message in answer.reason
    else:
        assert isinstance(answer, protocol.Error) and (answer.code, answer.ref) == ("forbidden", "f1")
        assert message in answer.message
    assert controller.metrics.frames_refused == {counted: 1}
    assert everything(controller) == before


def test_schedules_naming_another_namespace_are_invalid_and_given_to_no_agent(controller: Controller) -> None:
    for name, field in (("cross-agent", "spec.agent 'y/web-y'"), ("cross-repo", "spec.repository 'y/offsite'")):
        condition = everything(controller)["statuses"][f"schedules/x/{name}"]["conditions"][0]
        assert (condition["type"], condition["status"], condition["reason"]) == ("Applied", "False", "Invalid")
        assert condition["message"].startswith(field)
    given = {key: [s.key.name for s in controller.schedules.runnable_of(key)]
             for key in (ObjectKey("x", "web-a"), ObjectKey("x", "web-b"), ObjectKey("y", "web-y"))}
    assert given == {ObjectKey("x", "web-a"): [], ObjectKey("x", "web-b"): ["b-only"], ObjectKey("y", "web-y"): []}


async def test_an_ack_counts_only_for_the_schedules_the_agent_was_given(controller: Controller) -> None:
    session = connect(controller, "x", "web-a")
    before = everything(controller)
    claim = protocol.ScheduleAck(version=9, applied_at=AT, applied=[
        protocol.AppliedEntry(id="x/b-only", generation=1), protocol.AppliedEntry(id="y/whatever", generation=1)])
    await controller.on_message(session, frame(claim))  # type: ignore[arg-type]
    after = everything(controller)
    assert after["statuses"]["schedules/x/b-only"] == before["statuses"]["schedules/x/b-only"]
    assert after["statuses"]["agents/x/web-a"]["appliedVersion"] == 9  # its own Agent: that it may say
