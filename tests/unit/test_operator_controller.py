"""The controller's wiring with a fake API and fake connections: authentication, acks into
status, fires into ResticJobs and Events. (The real thing end to end is tests/e2e.)"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timedelta, timezone
from http import HTTPStatus
from types import SimpleNamespace
from typing import Any

import msgspec
import pytest
from prometheus_client.parser import text_string_to_metric_families

from restic_manager import protocol
from restic_manager.operator.agents.authenticator import NodeAgents
from restic_manager.operator.agents.identity import AuthError, Identity, Method
from restic_manager.operator.controller import Controller
from restic_manager.operator.controller.schedules import FIRE_STATUS_DELAY, HEALTH_RECHECK_MIN
from restic_manager.operator.controller.wiring import ACK_WAIT
from restic_manager.operator.jobs.fires import job_name
from restic_manager.operator.kube.api import ObjectKey, format_time
from restic_manager.operator.kube.cache import AgentPod, Change
from restic_manager.operator.status.writer import LAST_SEEN_INTERVAL, Target
from support.operator_fakes import FakeKube, FakeSession, complete_view, connect as connect_session

NOW = datetime(2026, 3, 2, 2, 0, 5, tzinfo=timezone.utc)


def agent_body(name: str, namespace: str = "ns") -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": namespace, "uid": f"uid-{namespace}-{name}",
                         "resourceVersion": "1", "labels": {"role": "web"}},
            "status": {"tokenSecretName": f"{name}-agent-token"}}


def schedule_body(*, suspend: bool = False, generation: int = 1) -> dict[str, Any]:
    return {"metadata": {"name": "nightly", "namespace": "ns", "uid": "uid-nightly", "generation": generation,
                         "resourceVersion": str(10 + generation), "creationTimestamp": "2026-03-02T01:50:00Z"},
            "spec": {"agentSelector": {"matchLabels": {"role": "web"}}, "repository": "offsite",
                     "schedule": "0 2 * * *", "suspend": suspend, "concurrencyPolicy": "Forbid",
                     "template": {"type": "backup", "backup": {"paths": ["/etc"]}}}}


def repository_body(name: str = "offsite") -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "ns", "uid": f"uid-{name}", "resourceVersion": "3"},
            "spec": {"url": "/srv/restic", "passwordSecretRef": {"name": "offsite", "key": "password"}}}


@pytest.fixture
async def controller() -> AsyncIterator[Controller]:
    kube = FakeKube()
    made = Controller(kube=kube, namespaces=None, clock=lambda: NOW)  # type: ignore[arg-type]
    made.view_complete()
    made.observe("repositories", "ADDED", repository_body())
    made.observe("agents", "ADDED", agent_body("web-01"))
    made.observe("schedules", "ADDED", schedule_body())
    # Receipts wait for status writes; Events are posted by their own loop.
    loops = [asyncio.create_task(made.writer.run()), asyncio.create_task(made.events.run())]
    yield made
    for loop in loops:
        loop.cancel()
    await asyncio.gather(*loops, return_exceptions=True)


def connect(controller: Controller, name: str = "web-01", *, acked: bool = True) -> FakeSession:
    return connect_session(controller, ObjectKey("ns", name), acked=acked)


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


async def test_the_addresses_agents_last_connected_from_are_known_at_accept_from_the_start(
        monkeypatch: pytest.MonkeyPatch) -> None:
    agents = [agent_body("web-01"), agent_body("web-02"), agent_body("new")]
    agents[0]["status"]["address"] = "192.0.2.1"
    agents[1]["status"]["address"] = "2001:db8::2"
    made = Controller(kube=FakeKube(), namespaces=None, clock=lambda: NOW)  # type: ignore[arg-type]
    remembered: list[str] = []
    monkeypatch.setattr(made.server, "remember_addresses", remembered.extend)
    complete_view(made, *(("agents", body) for body in agents))
    assert sorted(remembered) == ["192.0.2.1", "2001:db8::2"]


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


def receipts(session: FakeSession) -> list[tuple[str, protocol.FireOutcome, str | None]]:
    return [(p.ref, p.outcome, p.job) for p in session.sent if isinstance(p, protocol.FireResult)]


async def test_a_fire_creates_one_job_however_often_it_comes(controller: Controller) -> None:
    kube: FakeKube = controller._kube  # type: ignore[assignment]
    session = connect(controller)
    first, again = frame(FIRE), frame(FIRE)
    await controller.on_message(session, first)  # type: ignore[arg-type]
    await controller.on_message(session, again)  # type: ignore[arg-type]
    [job] = kube.created
    name = f"ns/{job['metadata']['name']}"
    assert receipts(session) == [(first.id, protocol.FireOutcome.CREATED, name),
                                 (again.id, protocol.FireOutcome.EXISTS, name)]
    assert job["metadata"]["name"] == f"nightly-web-01-{int(FIRE.scheduled_at.timestamp()) // 60}"
    assert job["spec"]["scheduleRef"] == {"name": "nightly", "uid": "uid-nightly"}
    status = schedule_status(controller)
    assert status["lastScheduleTime"] == "2026-03-02T02:00:00Z"
    assert status["active"] == [{"name": job["metadata"]["name"]}]
    assert status["agents"][0]["lastFireTime"] == "2026-03-02T02:00:00Z"
    assert kube.events == []


async def test_the_agents_of_one_schedule_have_their_jobs_created_side_by_side(controller: Controller) -> None:
    kube: FakeKube = controller._kube  # type: ignore[assignment]
    controller.observe("agents", "ADDED", agent_body("web-02"))
    kube.answer.clear()
    fires = [asyncio.ensure_future(controller.on_message(connect(controller, name), frame(FIRE)))  # type: ignore[arg-type]
             for name in ("web-01", "web-02")]
    async with asyncio.timeout(5):
        while len(kube.sent) < 2:  # both sent before either is answered
            await asyncio.sleep(0.01)
    kube.answer.set()
    await asyncio.gather(*fires)
    assert sorted(job["spec"]["agent"] for job in kube.created) == ["web-01", "web-02"]


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
    assert controller.metrics.fires_refused["Suspended"] == 1
    [(_, outcome, job)] = receipts(session)
    assert (outcome, job) == (protocol.FireOutcome.REFUSED, None)
    # the receipt went out once the count was in the API
    assert any(patch.get("refusedFires") == 1 for plural, _, patch in kube.patches if plural == "schedules")


async def test_a_refusal_delivered_twice_is_recorded_once(controller: Controller) -> None:
    kube: FakeKube = controller._kube  # type: ignore[assignment]
    controller.observe("schedules", "MODIFIED", schedule_body(suspend=True, generation=2))
    session = connect(controller)
    await controller.on_message(session, frame(FIRE))  # type: ignore[arg-type]
    await controller.on_message(session, frame(FIRE))  # its receipt was lost: the agent sent it again
    assert len(kube.events) == 1 and schedule_status(controller)["refusedFires"] == 1
    assert [outcome for _, outcome, _ in receipts(session)] == [protocol.FireOutcome.REFUSED] * 2


async def test_a_fire_past_its_deadline_is_missed(controller: Controller) -> None:
    body = schedule_body(generation=2)
    body["spec"]["startingDeadlineSeconds"] = 1
    controller.observe("schedules", "MODIFIED", body)
    session = connect(controller)
    await controller.on_message(session, frame(FIRE))  # type: ignore[arg-type]  # 5 s late
    [(_, outcome, _)] = receipts(session)
    assert outcome is protocol.FireOutcome.MISSED
    assert schedule_status(controller)["missedFires"] == 1


async def test_a_fire_the_api_cannot_take_now_is_answered_retry(controller: Controller) -> None:
    kube: FakeKube = controller._kube  # type: ignore[assignment]
    kube.fail_creates = True
    session = connect(controller)
    await controller.on_message(session, frame(FIRE))  # type: ignore[arg-type]
    [(_, outcome, _)] = receipts(session)
    assert outcome is protocol.FireOutcome.RETRY
    assert controller.metrics.fires_retried == {"KubeError": 1}

    kube.fail_creates = False
    await controller.on_message(session, frame(FIRE))  # type: ignore[arg-type]  # sent again
    assert receipts(session)[-1][1] is protocol.FireOutcome.CREATED and len(kube.created) == 1


async def test_a_fire_whose_create_the_api_does_not_answer_is_answered_retry_in_bounded_time(
        controller: Controller, monkeypatch: pytest.MonkeyPatch) -> None:
    kube: FakeKube = controller._kube  # type: ignore[assignment]
    monkeypatch.setattr("restic_manager.operator.controller.firing.FIRE_TIMEOUT", 0.1)
    kube.answer.clear()  # the create hangs
    session = connect(controller)
    await controller.on_message(session, frame(FIRE))  # type: ignore[arg-type]
    [(_, outcome, _)] = receipts(session)
    assert outcome is protocol.FireOutcome.RETRY
    assert controller.metrics.fires_retried == {"Timeout": 1}


async def test_a_fire_for_another_namespaces_schedule_is_refused(controller: Controller) -> None:
    kube: FakeKube = controller._kube  # type: ignore[assignment]
    session = connect(controller)
    foreign = msgspec.structs.replace(FIRE, id="other/nightly")
    await controller.on_message(session, frame(foreign))  # type: ignore[arg-type]
    assert kube.created == [] and controller.metrics.fires_refused["ForeignNamespace"] == 1


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


# --- what costs a status write, a push or a walk of the namespace ---------------------------


class Requests:
    """The status writes and pushes the controller asks for, with their delays."""

    def __init__(self, controller: Controller, monkeypatch: pytest.MonkeyPatch) -> None:
        self.marks: list[tuple[str, str, float]] = []
        self.pushes: list[str] = []
        monkeypatch.setattr(controller.writer, "mark", self._mark)
        monkeypatch.setattr(controller.pusher, "request", self._push)

    def _mark(self, plural: str, key: ObjectKey, *, delay: float = 0.0) -> None:
        self.marks.append((plural, key.name, delay))

    def _push(self, agents: Any) -> None:
        self.pushes.extend(agent.name for agent in agents)

    def clear(self) -> None:
        self.marks.clear()
        self.pushes.clear()


def ack_of(*generations: tuple[str, int], version: int = 7, at: datetime = NOW) -> protocol.Frame:
    applied = [protocol.AppliedEntry(id=f"ns/{name}", generation=generation) for name, generation in generations]
    return frame(protocol.ScheduleAck(version=version, applied_at=at, applied=applied))


def named_schedule(name: str, agent: str, *, uid: str | None = None) -> dict[str, Any]:
    body = schedule_body()
    body["metadata"] = {**body["metadata"], "name": name, "uid": uid or f"uid-{name}"}
    body["spec"] = {key: value for key, value in body["spec"].items() if key != "agentSelector"} | {"agent": agent}
    return body


def with_status(body: dict[str, Any], resource_version: str, **status: Any) -> dict[str, Any]:
    return {**body, "metadata": {**body["metadata"], "resourceVersion": resource_version}, "status": status}


async def test_an_ack_that_changes_nothing_writes_no_status(controller: Controller,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    controller.observe("schedules", "ADDED", named_schedule("other", "web-01"))
    session = connect(controller, acked=False)
    requests = Requests(controller, monkeypatch)
    await controller.on_message(session, ack_of(("nightly", 1), ("other", 1)))  # type: ignore[arg-type]
    assert sorted((name, delay) for plural, name, delay in requests.marks if plural == "schedules") == [
        ("nightly", 0.0), ("other", 0.0)]  # Applied: written at once
    acked_at = schedule_status(controller)["agents"][0]["ackedAt"]

    requests.clear()
    later = NOW.replace(minute=9)
    await controller.on_message(session, ack_of(("nightly", 1), ("other", 1), version=8, at=later))  # type: ignore[arg-type]
    assert [name for plural, name, _ in requests.marks if plural == "schedules"] == []
    assert schedule_status(controller)["agents"][0]["ackedAt"] == acked_at

    controller.observe("schedules", "MODIFIED", named_schedule("other", "web-01") | {
        "metadata": {**named_schedule("other", "web-01")["metadata"], "generation": 2, "resourceVersion": "50"}})
    requests.clear()
    await controller.on_message(session, ack_of(("nightly", 1), ("other", 2), version=9, at=later))  # type: ignore[arg-type]
    assert [name for plural, name, _ in requests.marks if plural == "schedules"] == ["other"]


async def test_an_ack_is_recorded_only_on_the_agents_own_schedules(controller: Controller) -> None:
    controller.observe("agents", "ADDED", agent_body("db-01") | {
        "metadata": {**agent_body("db-01")["metadata"], "labels": {"role": "db"}}})
    controller.observe("schedules", "ADDED", named_schedule("db-only", "db-01"))
    await controller.on_message(connect(controller), ack_of(("nightly", 1)))  # type: ignore[arg-type]
    assert "uid-nightly" in controller.schedules.books
    assert "uid-db-only" not in controller.schedules.books  # not even looked at


async def test_the_applied_version_is_written_lazily_like_last_seen(controller: Controller,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    session = connect(controller, acked=False)
    requests = Requests(controller, monkeypatch)
    await controller.on_message(session, ack_of(("nightly", 1), version=41))  # type: ignore[arg-type]
    assert ("agents", "web-01", 0.0) in requests.marks  # the Agent's first: it has applied a set at all
    requests.clear()
    await controller.on_message(session, ack_of(("nightly", 1), version=42))  # type: ignore[arg-type]
    agent = controller.store.agents.get(ObjectKey("ns", "web-01"))
    assert agent is not None and controller.fleet.status(agent)["appliedVersion"] == 42
    assert {delay for plural, _, delay in requests.marks if plural == "agents"} == {LAST_SEEN_INTERVAL}


async def test_the_operators_own_status_writes_coming_back_change_nothing(
        controller: Controller, monkeypatch: pytest.MonkeyPatch) -> None:
    requests = Requests(controller, monkeypatch)
    put = []
    monkeypatch.setattr(controller.index, "put_agent", lambda agent: put.append(agent))
    monkeypatch.setattr(controller.index, "put_schedule", lambda schedule: put.append(schedule))
    controller.observe("schedules", "MODIFIED", with_status(schedule_body(), "90", observedGeneration=1))
    controller.observe("agents", "MODIFIED", with_status(agent_body("web-01"), "91", connected=True))
    assert (requests.marks, requests.pushes, put) == ([], [], [])
    assert controller.store.schedules.get(ObjectKey("ns", "nightly")).resource_version == "90"  # type: ignore[union-attr]


async def test_an_agent_change_marks_only_the_schedules_it_joined_or_left(
        controller: Controller, monkeypatch: pytest.MonkeyPatch) -> None:
    controller.observe("schedules", "ADDED", named_schedule("db-only", "db-01"))
    controller.observe("schedules", "ADDED", named_schedule("for-web-02", "web-02"))
    requests = Requests(controller, monkeypatch)
    controller.observe("agents", "ADDED", agent_body("web-02"))
    assert sorted(name for plural, name, _ in requests.marks if plural == "schedules") == ["for-web-02", "nightly"]
    assert requests.pushes == ["web-02"]

    requests.clear()
    relabelled = agent_body("web-02")
    relabelled["metadata"] = {**relabelled["metadata"], "resourceVersion": "5", "labels": {"role": "web", "x": "y"}}
    controller.observe("agents", "MODIFIED", relabelled)  # a label nothing selects on: no Schedule moved
    assert ([m for m in requests.marks if m[0] == "schedules"], requests.pushes) == ([], [])


async def test_a_schedule_that_stops_targeting_an_agent_forgets_its_ack(controller: Controller) -> None:
    await controller.on_message(connect(controller), ack_of(("nightly", 1)))  # type: ignore[arg-type]
    assert schedule_status(controller)["conditions"][0]["status"] == "True"
    for version, role in (("5", "db"), ("6", "web")):  # labelled away, and back
        body = agent_body("web-01")
        body["metadata"] = {**body["metadata"], "resourceVersion": version, "labels": {"role": role}}
        controller.observe("agents", "MODIFIED", body)
    condition = schedule_status(controller)["conditions"][0]
    assert (condition["status"], condition["reason"]) == ("False", "NotAcked")  # until it acks again


async def test_fires_write_the_schedules_status_after_a_delay(controller: Controller,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    kube: FakeKube = controller._kube  # type: ignore[assignment]
    session = connect(controller)
    requests = Requests(controller, monkeypatch)
    for minute in range(3):  # a burst of fires (Allow, so each makes a job)
        controller.observe("schedules", "MODIFIED", schedule_body() | {
            "metadata": {**schedule_body()["metadata"], "resourceVersion": str(60 + minute)},
            "spec": {**schedule_body()["spec"], "concurrencyPolicy": "Allow", "schedule": "* * * * *"}})
        fire = msgspec.structs.replace(FIRE, scheduled_at=FIRE.scheduled_at - timedelta(minutes=minute))
        requests.clear()
        await controller.on_message(session, frame(fire))  # type: ignore[arg-type]
        schedule_marks = [delay for plural, _, delay in requests.marks if plural == "schedules"]
        # (Besides a render's own mark to look again when the next fire's deadline passes.)
        assert FIRE_STATUS_DELAY in schedule_marks
        assert all(delay == FIRE_STATUS_DELAY or delay >= HEALTH_RECHECK_MIN for delay in schedule_marks)
    assert len(kube.created) == 3

    requests.clear()
    [job] = [controller.store.jobs.get(ObjectKey("ns", kube.created[0]["metadata"]["name"]))]
    assert job is not None
    controller.history.phase_changed(job, {"phase": "Running"})
    assert requests.marks == []  # nothing on the Schedule's status depends on it
    controller.history.phase_changed(job, {"phase": "Succeeded", "completionTime": "2026-03-02T02:01:00Z"})
    assert ("schedules", "nightly", 0.0) in requests.marks  # leaves active, the last success: at once


async def test_an_edit_costs_one_status_write_when_its_agents_ack_it(controller: Controller,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    session = connect(controller)
    requests = Requests(controller, monkeypatch)
    controller.observe("schedules", "MODIFIED", schedule_body(generation=2))
    assert requests.pushes == ["web-01"]
    assert requests.marks == [("schedules", "nightly", ACK_WAIT)]  # waits for the ack...
    await controller.on_message(session, ack_of(("nightly", 2)))  # type: ignore[arg-type]
    assert ("schedules", "nightly", 0.0) in requests.marks  # ...which writes it at once

    del controller.server.sessions[session.agent]
    requests.clear()
    controller.observe("schedules", "MODIFIED", schedule_body(generation=3))
    assert requests.marks == [("schedules", "nightly", 0.0)]  # no agent to ack it: NotAcked, at once


async def test_an_in_cluster_session_ends_when_its_token_expires_or_its_pod_is_deleted() -> None:
    now = [NOW]
    controller = Controller(kube=FakeKube(), namespaces=None, clock=lambda: now[0],  # type: ignore[arg-type]
                            node_agents=NodeAgents(service_account=ObjectKey("backup", "agent"), namespace="backup"))
    controller.view_complete()
    key = ObjectKey("backup", "node-a")
    controller.observe("agents", "ADDED", {**agent_body("node-a", "backup"), "spec": {"nodeName": "node-a"}})
    revoked: list[tuple[ObjectKey, str]] = []

    async def revoke(agent: ObjectKey, reason: str) -> None:
        revoked.append((agent, reason))

    controller.server.revoke = revoke  # type: ignore[method-assign]
    session = FakeSession(key)
    session.identity = Identity(key, Method.SERVICE_ACCOUNT, "pod-uid",  # type: ignore[attr-defined]
                                expires_at=NOW.timestamp() + 60)
    controller.server.sessions[key] = session  # type: ignore[assignment]

    agents = controller.fleet.reconciles._coalescer
    assert agents.pop_due(time.monotonic() + 1) == [key]  # as the agent loop takes the key...
    await controller.fleet._reconcile(key)  # ...and works on it
    agents.done(key)
    assert revoked == []
    due = agents.next_deadline()
    assert due is not None and 59 < due - time.monotonic() <= 60  # looked at again when the token expires
    now[0] = NOW + timedelta(seconds=60)
    await controller.fleet._reconcile(key)
    assert revoked == [(key, "its ServiceAccount token expired")]

    revoked.clear()
    now[0] = NOW
    pod = AgentPod(key=ObjectKey("backup", "agent-x"), uid="pod-uid", resource_version="5", node_name="node-a")
    controller.fleet.pod_changed(Change(old=pod, new=None))
    await controller.fleet._reconcile(key)
    assert revoked == [(key, "the pod (uid pod-uid) its ServiceAccount token is bound to was deleted")]


async def until(what: str, holds: Callable[[], Any]) -> Any:
    """A bounded poll for something the controller's loops do in the background."""
    async with asyncio.timeout(5):
        while not (found := holds()):
            await asyncio.sleep(0.01)
    return found


def events_of(kube: FakeKube, kind: str, reason: str) -> list[dict[str, Any]]:
    return [e for e in kube.events if e["involved"]["kind"] == kind and e["reason"] == reason]


async def test_a_schedule_whose_repository_is_missing_is_given_to_no_agent_and_its_fires_are_refused(
        controller: Controller) -> None:
    kube: FakeKube = controller._kube  # type: ignore[assignment]
    session = connect(controller)
    controller.observe("repositories", "DELETED", repository_body())
    applied, healthy = schedule_status(controller)["conditions"]
    assert (applied["status"], applied["reason"]) == ("False", "RepositoryNotFound")
    assert applied["message"] == ("spec.repository: there is no Repository offsite in namespace ns; the Schedule "
                                  "runs on no agent until there is")
    assert (healthy["status"], healthy["reason"]) == ("False", "RepositoryNotFound")
    assert controller.schedules.runnable_of(ObjectKey("ns", "web-01")) == []
    await controller.on_message(session, frame(FIRE))  # type: ignore[arg-type]  # sent before it learned
    [(_, outcome, job)] = receipts(session)
    assert (outcome, job) == (protocol.FireOutcome.REFUSED, None) and kube.created == []
    assert controller.metrics.fires_refused["RepositoryNotFound"] == 1
    await until("a Warning Event on the Schedule", lambda: events_of(kube, "Schedule", "RepositoryNotFound"))

    controller.observe("repositories", "ADDED", repository_body())
    assert [s.key.name for s in controller.schedules.runnable_of(ObjectKey("ns", "web-01"))] == ["nightly"]
    assert schedule_status(controller)["conditions"][0]["reason"] != "RepositoryNotFound"


def job_done(job: str, outcome: protocol.Outcome, *, at: datetime, exit_code: int) -> protocol.Frame:
    return frame(protocol.JobDone(job=job, outcome=outcome, exit_code=exit_code, finished_at=at,
                                  summary=protocol.Summary(data_added=2048, total_files_processed=7,
                                                           duration_seconds=1.5)
                                  if outcome is protocol.Outcome.SUCCEEDED else None))


def exposition(controller: Controller) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample /metrics serves, by name and labels."""
    text = controller.metrics.exposition().decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


ON_WEB_01 = (("agent", "web-01"), ("namespace", "ns"), ("schedule", "nightly"))


async def test_a_failed_run_makes_its_agent_unhealthy_with_events_and_metrics_until_a_run_succeeds(
        controller: Controller) -> None:
    kube: FakeKube = controller._kube  # type: ignore[assignment]
    session = connect(controller)
    await controller.on_message(session, frame(FIRE))  # type: ignore[arg-type]
    [failed] = [f"ns/{job['metadata']['name']}" for job in kube.created]
    assert schedule_status(controller)["conditions"][1]["status"] == "True"
    await controller.on_message(session, job_done(failed, protocol.Outcome.FAILED, at=NOW, exit_code=1))  # type: ignore[arg-type]
    healthy = schedule_status(controller)["conditions"][1]
    assert (healthy["status"], healthy["reason"]) == ("False", "LastRunFailed")
    assert healthy["message"].startswith(f"web-01: its last run {failed.split('/')[1]} failed (ResticFailed)")
    [event] = await until("the Schedule's Warning", lambda: events_of(kube, "Schedule", "LastRunFailed"))
    assert event["type"] == "Warning" and event["message"].startswith("agent web-01: its last run")
    await until("the job's Warning", lambda: events_of(kube, "ResticJob", "ResticFailed"))
    served = exposition(controller)
    assert served[("restic_manager_schedule_agent_healthy", ON_WEB_01)] == 0.0
    assert served[("restic_manager_schedule_last_attempt_timestamp_seconds", ON_WEB_01)] == NOW.timestamp()
    assert ("restic_manager_schedule_last_success_timestamp_seconds", ON_WEB_01) not in served
    assert served[("restic_manager_jobs_finished_total", (("namespace", "ns"), ("outcome", "Failed"),
                                                          ("reason", "ResticFailed"), ("type", "backup")))] == 1.0
    assert served[("restic_manager_fire_lag_seconds_count", ())] == 1.0
    assert served[("restic_manager_schedule_interval_seconds", (("namespace", "ns"), ("schedule", "nightly")))] == 86400

    # Another job of the Schedule on the agent (run by hand, say) that ends later: a success.
    controller.observe("resticjobs", "ADDED", {
        "metadata": {"name": "again", "namespace": "ns", "uid": "uid-again", "resourceVersion": "200"},
        "spec": {"agent": "web-01", "repository": "offsite", "type": "backup",
                 "scheduleRef": {"name": "nightly", "uid": "uid-nightly"}},
        "status": {"phase": "Running"}})
    session.dispatched.add("ns/again")
    succeeded = "ns/again"
    later = NOW + timedelta(seconds=30)
    await controller.on_message(session, job_done(succeeded, protocol.Outcome.SUCCEEDED, at=later, exit_code=0))  # type: ignore[arg-type]
    status = schedule_status(controller)
    assert (status["conditions"][1]["status"], status["healthyAgents"]) == ("True", "1/1")
    assert status["agents"][0]["lastSuccessfulTime"] == format_time(later)
    [recovered] = await until("a Normal Healthy Event", lambda: events_of(kube, "Schedule", "Healthy"))
    assert recovered["type"] == "Normal"
    served = exposition(controller)
    assert served[("restic_manager_schedule_agent_healthy", ON_WEB_01)] == 1.0
    assert served[("restic_manager_schedule_last_success_timestamp_seconds", ON_WEB_01)] == later.timestamp()
    assert served[("restic_manager_backup_last_added_bytes", ON_WEB_01)] == 2048
    assert served[("restic_manager_backup_last_files", ON_WEB_01)] == 7
    assert served[("restic_manager_schedule_last_duration_seconds", ON_WEB_01)] == 1.5

    controller.observe("schedules", "DELETED", schedule_body())
    # A deleted Schedule's series go with it.
    assert not [key for key in exposition(controller) if ("schedule", "nightly") in key[1]]


async def test_a_connection_that_takes_another_ones_place_is_an_event_and_a_condition(controller: Controller) -> None:
    kube: FakeKube = controller._kube  # type: ignore[assignment]
    controller.fleet._primed_at = NOW - timedelta(hours=1)  # past the reconnect grace: every connection is news
    session = connect(controller)
    session.identity = Identity(session.agent, Method.TOKEN, "digest")  # type: ignore[attr-defined]
    session.replaced = "192.0.2.99:51000"
    await controller.on_connect(session)  # type: ignore[arg-type]
    [agent] = controller.store.agents
    conditions = {c["type"]: c for c in controller.fleet.status(agent)["conditions"]}
    assert (conditions["Replaced"]["status"], conditions["Replaced"]["reason"]) == ("True", "AnotherConnection")
    assert "192.0.2.99:51000" in conditions["Replaced"]["message"]
    await until("Connected and Replaced Events", lambda: events_of(kube, "Agent", "Connected")
                and events_of(kube, "Agent", "Replaced"))
    assert exposition(controller)[("restic_manager_agent_connected", (("agent", "web-01"), ("namespace", "ns")))] == 1

    again = connect(controller)  # replacing none this time
    again.identity = session.identity  # type: ignore[attr-defined]
    await controller.on_connect(again)  # type: ignore[arg-type]
    conditions = {c["type"]: c for c in controller.fleet.status(agent)["conditions"]}
    assert (conditions["Replaced"]["status"], conditions["Replaced"]["reason"]) == ("False", "SingleConnection")
    again.connection = SimpleNamespace(close_code=1000)  # type: ignore[attr-defined]
    await controller.on_disconnect(again)  # type: ignore[arg-type]
    await until("a Disconnected Event", lambda: events_of(kube, "Agent", "Disconnected"))
