"""The controller's wiring with a fake API and fake connections: authentication, acks into
status, fires into ResticJobs and Events. (The real thing end to end is tests/e2e.)"""

from __future__ import annotations

import base64
from datetime import datetime, timezone
from http import HTTPStatus
from typing import Any

import pytest

from restic_manager import protocol
from restic_manager.operator.controller import Controller
from restic_manager.operator.fires import job_name
from restic_manager.operator.kube import AlreadyExists, NotFound
from restic_manager.operator.identity import AuthError
from restic_manager.operator.store import ObjectKey
from restic_manager.operator.writer import Target
from support.operator_fakes import FakeSession

NOW = datetime(2026, 3, 2, 2, 0, 5, tzinfo=timezone.utc)


class FakeKube:
    def __init__(self) -> None:
        self.secrets: dict[ObjectKey, dict[str, str]] = {}
        self.created: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []
        self._rv = 100

    async def list_objects(self, plural: str, namespaces: list[str] | None) -> tuple[list[Any], str]:
        return [], "1"

    async def read_secret(self, key: ObjectKey) -> dict[str, str]:
        if key not in self.secrets:
            raise NotFound(f"get Secret {key}: 404")
        return self.secrets[key]

    async def create(self, plural: str, body: dict[str, Any]) -> dict[str, Any]:
        if any(c["metadata"]["name"] == body["metadata"]["name"] for c in self.created):
            raise AlreadyExists("409")
        self._rv += 1
        created = {**body, "metadata": {**body["metadata"], "uid": f"uid-{body['metadata']['name']}",
                                        "resourceVersion": str(self._rv),
                                        "creationTimestamp": "2026-03-02T02:00:06Z"}}
        self.created.append(created)
        return created

    async def get(self, plural: str, key: ObjectKey) -> dict[str, Any]:
        return next(c for c in self.created if c["metadata"]["name"] == key.name)

    async def post_event(self, involved: dict[str, Any], **event: Any) -> None:
        self.events.append({"involved": involved, **event})


def agent_body(name: str, namespace: str = "ns") -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": namespace, "uid": f"uid-{namespace}-{name}",
                         "resourceVersion": "1", "labels": {"role": "web"}},
            "status": {"tokenSecretName": f"{name}-agent-token"}}


def schedule_body(*, suspend: bool = False, generation: int = 1) -> dict[str, Any]:
    return {"metadata": {"name": "nightly", "namespace": "ns", "uid": "uid-nightly", "generation": generation,
                         "resourceVersion": str(10 + generation), "creationTimestamp": "2026-03-01T00:00:00Z"},
            "spec": {"agentSelector": {"matchLabels": {"role": "web"}}, "repository": "offsite",
                     "schedule": "0 2 * * *", "suspend": suspend, "concurrencyPolicy": "Forbid",
                     "template": {"type": "backup", "backup": {"paths": ["/etc"]}}}}


@pytest.fixture
async def controller() -> Controller:
    kube = FakeKube()
    made = Controller(kube=kube, namespaces=None, clock=lambda: NOW)  # type: ignore[arg-type]
    await made._prime()
    made.observe("agents", "ADDED", agent_body("web-01"))
    made.observe("schedules", "ADDED", schedule_body())
    return made


def connect(controller: Controller, name: str = "web-01") -> FakeSession:
    session = FakeSession(ObjectKey("ns", name))
    controller.server.sessions[session.agent] = session  # type: ignore[assignment]
    return session


def frame(payload: protocol.Payload) -> protocol.Frame:
    return protocol.Frame(id=protocol.new_id(), payload=payload)  # type: ignore[arg-type]


def schedule_status(controller: Controller) -> dict[str, Any]:
    rendered = controller._render(Target("schedules", ObjectKey("ns", "nightly")))
    assert rendered is not None
    return dict(rendered.desired)


FIRE = protocol.ScheduleFire(id="ns/nightly", uid="uid-nightly", generation=1,
                             scheduled_at=datetime(2026, 3, 2, 2, 0, tzinfo=timezone.utc))


def token_secret_body(agent: str, namespace: str, token: str) -> dict[str, Any]:
    return {"metadata": {"name": f"{agent}-agent-token", "namespace": namespace, "uid": f"s-{namespace}-{agent}",
                         "resourceVersion": "2",
                         "ownerReferences": [{"apiVersion": "resticmanager.io/v1alpha1", "kind": "Agent",
                                              "name": agent, "uid": f"uid-{namespace}-{agent}"}]},
            "data": {"token": base64.b64encode(token.encode()).decode()}}


async def test_an_agent_is_known_by_the_token_issued_for_it(controller: Controller) -> None:
    controller.observe("agents", "ADDED", agent_body("web-01", namespace="other"))
    controller.observe("secrets", "ADDED", token_secret_body("web-01", "ns", "ns-token"))
    controller.observe("secrets", "ADDED", token_secret_body("web-01", "other", "other-token"))
    assert (await controller.authenticator.authenticate("other-token")).agent == ObjectKey("other", "web-01")
    assert (await controller.authenticator.authenticate("ns-token")).agent == ObjectKey("ns", "web-01")
    with pytest.raises(AuthError) as refused:
        await controller.authenticator.authenticate("guess")
    assert (refused.value.status, refused.value.reason) == (HTTPStatus.UNAUTHORIZED, "unknown-token")


async def test_acks_of_the_current_generation_make_the_schedule_applied(controller: Controller) -> None:
    assert schedule_status(controller)["conditions"][0]["reason"] == "AgentsDisconnected"
    session = connect(controller)
    applied = [protocol.AppliedEntry(id="ns/nightly", generation=1)]
    ack = protocol.ScheduleAck(version=7, applied_at=NOW, applied=applied)
    await controller.on_message(session, frame(ack))  # type: ignore[arg-type]
    status = schedule_status(controller)
    assert status["conditions"][0]["status"] == "True"
    [entry] = status["agents"]
    assert entry["ackedGeneration"] == 1 and entry["nextFireTime"] == "2026-03-03T02:00:00Z"
    controller.observe("schedules", "MODIFIED", schedule_body(generation=2))
    assert schedule_status(controller)["conditions"][0]["reason"] == "NotAcked"


async def test_a_rejection_is_shown_with_the_agents_error(controller: Controller) -> None:
    session = connect(controller)
    ack = protocol.ScheduleAck(version=7, applied_at=NOW, rejected=[
        protocol.RejectedEntry(id="ns/nightly", generation=1, error="time zone 'Mars/Olympus' is unknown")])
    await controller.on_message(session, frame(ack))  # type: ignore[arg-type]
    condition = schedule_status(controller)["conditions"][0]
    assert (condition["status"], condition["reason"]) == ("False", "Rejected")
    assert "Mars/Olympus" in condition["message"]


async def test_a_fire_creates_one_job_however_often_it_comes(controller: Controller) -> None:
    kube: FakeKube = controller._kube  # type: ignore[assignment]
    session = connect(controller)
    await controller.on_message(session, frame(FIRE))  # type: ignore[arg-type]
    await controller.on_message(session, frame(FIRE))  # type: ignore[arg-type]
    [job] = kube.created
    assert job["metadata"]["name"] == f"nightly-web-01-{int(FIRE.scheduled_at.timestamp()) // 60}"
    assert job["spec"]["scheduleRef"] == {"name": "nightly", "uid": "uid-nightly"}
    status = schedule_status(controller)
    assert status["lastScheduleTime"] == "2026-03-02T02:00:00Z"
    assert status["active"] == [{"name": job["metadata"]["name"]}]
    assert status["agents"][0]["lastFireTime"] == "2026-03-02T02:00:00Z"
    assert kube.events == []


async def test_a_refused_fire_is_an_event_and_a_count_never_a_job(controller: Controller) -> None:
    kube: FakeKube = controller._kube  # type: ignore[assignment]
    controller.observe("schedules", "MODIFIED", schedule_body(suspend=True, generation=2))
    session = connect(controller)
    await controller.on_message(session, frame(FIRE))  # type: ignore[arg-type]
    assert kube.created == []
    [event] = kube.events
    assert (event["type"], event["reason"]) == ("Warning", "Suspended")
    assert event["involved"]["kind"] == "Schedule" and event["involved"]["uid"] == "uid-nightly"
    assert schedule_status(controller)["refusedFires"] == 1
    assert controller.refused["Suspended"] == 1


async def test_a_fire_for_another_namespaces_schedule_is_refused(controller: Controller) -> None:
    kube: FakeKube = controller._kube  # type: ignore[assignment]
    session = connect(controller)
    foreign = FIRE.model_copy(update={"id": "other/nightly"})
    await controller.on_message(session, frame(foreign))  # type: ignore[arg-type]
    assert kube.created == [] and controller.refused["ForeignNamespace"] == 1


async def test_an_agent_cannot_report_on_another_agents_job(controller: Controller) -> None:
    controller.observe("resticjobs", "ADDED", {
        "metadata": {"name": "theirs", "namespace": "ns", "uid": "u1", "resourceVersion": "5"},
        "spec": {"agent": "web-02", "repository": "offsite", "type": "prune"}})
    session = connect(controller)
    report = protocol.JobStarted(job="ns/theirs", started_at=NOW)
    await controller.on_message(session, frame(report))  # type: ignore[arg-type]
    [error] = session.sent
    assert isinstance(error, protocol.Error) and error.code == "forbidden"


async def test_frames_only_the_operator_sends_are_refused(controller: Controller) -> None:
    session = connect(controller)
    await controller.on_message(session, frame(protocol.CommandCancel(job="ns/x")))  # type: ignore[arg-type]
    [error] = session.sent
    assert isinstance(error, protocol.Error) and error.code == "invalid-frame"


async def test_a_name_taken_by_another_pair_falls_back_to_the_hashed_name(controller: Controller) -> None:
    kube: FakeKube = controller._kube  # type: ignore[assignment]
    plain = f"nightly-web-01-{int(FIRE.scheduled_at.timestamp()) // 60}"
    # Schedule "nightly-web" on agent "01" made a job of the same plain name.
    kube.created.append({"metadata": {"name": plain}, "spec": {"agent": "01", "scheduleRef": {"uid": "other"}}})
    session = connect(controller)
    await controller.on_message(session, frame(FIRE))  # type: ignore[arg-type]
    await controller.on_message(session, frame(FIRE))  # delivered again: still one job of ours
    ours = [c for c in kube.created if c["spec"]["agent"] == "web-01"]
    assert [c["metadata"]["name"] for c in ours] == [
        job_name("nightly", "web-01", FIRE.scheduled_at, hashed=True)]
