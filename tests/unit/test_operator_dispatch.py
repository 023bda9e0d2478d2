"""The dispatcher: what happens to a ResticJob as its agent comes and goes and reports."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from restic_manager import protocol
from restic_manager.operator.jobs.dispatch import (
    LOST_GRACE,
    AgentView,
    Dispatcher,
    RepositoryUnavailable,
    Step,
    history_to_delete,
    next_step,
    repository_env,
    secret_refusal,
)
from restic_manager.operator.kube.api import FINALIZER, ObjectKey
from restic_manager.operator.kube.cache import Job, Store
from restic_manager.operator.kube.client import MANAGED_BY, FinalizersSeen, SecretRead
from restic_manager.operator.kube.events import Recorder
from restic_manager.operator.status.writer import Rendered, StatusWriter, Target
from support.operator_fakes import FakeKube, FakeSession

UTC = timezone.utc
NOW = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)


def job_body(name: str = "j", *, phase: str | None = None, deleting: bool = False, finalizer: bool = False,
             agent: str = "web-01", rv: int = 1, scheduled_at: datetime | None = None,
             spec: dict[str, Any] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": "ns", "uid": f"uid-{name}", "resourceVersion": str(rv),
                            "creationTimestamp": "2026-03-01T00:00:00Z"}
    if deleting:
        meta["deletionTimestamp"] = "2026-03-01T12:00:00Z"
    if finalizer:
        meta["finalizers"] = [FINALIZER]
    body: dict[str, Any] = {"metadata": meta, "spec": spec or {
        "agent": agent, "repository": "offsite", "type": "backup", "backup": {"paths": ["/srv"]},
        "timeoutSeconds": 600}}
    if scheduled_at is not None:
        body["spec"]["scheduleRef"] = {"name": "nightly", "uid": "uid-nightly"}
        body["spec"]["scheduledAt"] = scheduled_at.strftime("%Y-%m-%dT%H:%M:%SZ")
    if phase is not None:
        body["status"] = {"phase": phase}
    return body


def job(**kwargs: Any) -> Job:
    return Job.from_body(job_body(**kwargs))


CONNECTED = AgentView(running=frozenset(), dispatched=frozenset())
LISTS_IT = AgentView(running=frozenset({"ns/j"}), dispatched=frozenset())
SENT_IT = AgentView(running=frozenset(), dispatched=frozenset({"ns/j"}))
ENDED_IT = AgentView(running=frozenset(), dispatched=frozenset(), finished=frozenset({"ns/j"}))
LOST_IT = AgentView(running=frozenset(), dispatched=frozenset(), interrupted=frozenset({"ns/j"}))
ASKED_IT = AgentView(running=frozenset(), dispatched=frozenset({"ns/j"}), interrupted=frozenset({"ns/j"}))

STEPS = [
    # (case, job, phase, agent view, step)
    ("new job, agent away", job(), None, None, Step.WAIT),
    ("new job, agent here", job(), None, CONNECTED, Step.DISPATCH),
    ("pending, agent here", job(), "Pending", CONNECTED, Step.DISPATCH),
    ("pending but the agent runs it", job(), "Pending", LISTS_IT, Step.ADOPT),
    ("running, agent away", job(), "Running", None, Step.NOTHING),
    ("running, agent away past the timeout", job(), "Running+overdue", None, Step.LOSE),
    ("running, listed in hello", job(), "Running", LISTS_IT, Step.NOTHING),
    ("running, sent on this connection", job(), "Running", SENT_IT, Step.NOTHING),
    ("running, agent came back without it", job(), "Running", CONNECTED, Step.LOSE),
    # its job.done follows hello: the real outcome, not AgentLost a moment before it
    ("running, agent came back with its job.done", job(), "Running", ENDED_IT, Step.NOTHING),
    ("pending, agent came back with its job.done", job(), "Pending", ENDED_IT, Step.NOTHING),
    # an earlier agent process died running it: command.run again makes the agent report its outcome
    ("running, agent came back having died running it", job(), "Running", LOST_IT, Step.DISPATCH),
    ("pending, agent came back having died running it", job(), "Pending", LOST_IT, Step.DISPATCH),
    ("running, its outcome asked for on this connection", job(), "Running", ASKED_IT, Step.NOTHING),
    ("finished, agent came back having died running it", job(), "Failed", LOST_IT, Step.NOTHING),
    ("deleted while running", job(deleting=True, finalizer=True), "Running", LISTS_IT, Step.CANCEL),
    ("deleted while running, agent away", job(deleting=True, finalizer=True), "Running", None, Step.RELEASE),
    ("deleted while pending", job(deleting=True), "Pending", CONNECTED, Step.NOTHING),
    ("fired, deleted while pending", job(deleting=True, finalizer=True), "Pending", CONNECTED, Step.RELEASE),
    ("finished, finalizer held", job(finalizer=True), "Succeeded", CONNECTED, Step.RELEASE),
    ("finished", job(), "Failed", None, Step.NOTHING),
]


@pytest.mark.parametrize(("job_", "phase", "view", "step"), [c[1:] for c in STEPS], ids=[c[0] for c in STEPS])
def test_next_step(job_: Job, phase: str | None, view: AgentView | None, step: Step) -> None:
    status: dict[str, Any] = {}
    if phase is not None:
        # Dispatched just now, or (overdue) longer ago than the timeout (600 s) and the grace.
        phase, _, overdue = phase.partition("+")
        since = NOW - timedelta(seconds=600 + LOST_GRACE) if overdue else NOW
        status = {"phase": phase, "dispatchedAt": since.strftime("%Y-%m-%dT%H:%M:%SZ")}
    assert next_step(job_, status, view, now=NOW) is step


def test_history_keeps_the_newest_of_each_outcome() -> None:
    def at(hours: int) -> datetime:
        return NOW + timedelta(hours=hours)

    jobs = [(job(name=f"ok-{h}", scheduled_at=at(h)), {"phase": "Succeeded"}) for h in range(5)]
    jobs += [(job(name=f"bad-{h}", scheduled_at=at(h)), {"phase": "Failed"}) for h in range(3)]
    jobs += [(job(name="cancelled", scheduled_at=at(9)), {"phase": "Cancelled"})]
    jobs += [(job(name="running", scheduled_at=at(-5)), {"phase": "Running"})]
    deleted = {key.name for key in history_to_delete(jobs, succeeded=3, failed=1)}
    assert deleted == {"ok-0", "ok-1", "bad-0", "bad-1", "bad-2"}


def test_history_limit_zero_keeps_nothing_finished() -> None:
    jobs = [(job(name="ok", scheduled_at=NOW), {"phase": "Succeeded"})]
    assert [key.name for key in history_to_delete(jobs, succeeded=0, failed=0)] == ["ok"]


REPOSITORY = {"metadata": {"name": "offsite", "namespace": "ns", "uid": "uid-offsite", "resourceVersion": "1"},
              "spec": {"url": "/srv/repo", "passwordSecretRef": {"name": "pw", "key": "password"},
                       "envFrom": [{"secretRef": {"name": "s3"}}], "initialize": True}}


OPTED_IN = {"resticmanager.io/repository-secret": "true"}


def opted_in(data: dict[str, str]) -> SecretRead:
    return SecretRead(data=data, labels=OPTED_IN)


def test_repository_env_has_the_password_and_every_envfrom_key() -> None:
    env = repository_env(REPOSITORY["spec"], {"pw": opted_in({"password": "hunter2"}),
                                              "s3": opted_in({"AWS_ACCESS_KEY_ID": "AK"})},
                         where="Repository ns/offsite")
    assert env == {"RESTIC_PASSWORD": "hunter2", "AWS_ACCESS_KEY_ID": "AK"}


def test_repository_env_names_a_missing_password_key() -> None:
    complaint = "Repository ns/offsite: spec.passwordSecretRef: Secret pw has no key 'password'"
    with pytest.raises(RepositoryUnavailable, match=complaint):
        repository_env(REPOSITORY["spec"], {"pw": opted_in({"pass": "x"}), "s3": opted_in({})},
                       where="Repository ns/offsite")


@pytest.mark.parametrize(("labels", "refusal"), [
    ({}, "Secret s3 is not labelled resticmanager.io/repository-secret=true, and only Secrets so labelled are "
         "handed to agents (kubectl label secret s3 resticmanager.io/repository-secret=true, by someone who may "
         "change the Secret)"),
    ({"resticmanager.io/repository-secret": "True"}, "Secret s3 is not labelled"),
    ({"resticmanager.io/repository-secret": "yes", "app": "x"}, "Secret s3 is not labelled"),
    ({**MANAGED_BY, **OPTED_IN}, "Secret s3 is an agent token Secret of the operator's, which is never handed"),
    ({**MANAGED_BY}, "Secret s3 is an agent token Secret"),
    (OPTED_IN, None),
    ({**OPTED_IN, "app": "x"}, None),
])
def test_only_secrets_that_opt_in_are_handed_to_agents(labels: dict[str, str], refusal: str | None) -> None:
    said = secret_refusal("s3", SecretRead(data={"AWS_ACCESS_KEY_ID": "AK"}, labels=labels))
    assert said == refusal if refusal is None else (said or "").startswith(refusal)


def test_one_secret_that_did_not_opt_in_hands_over_none() -> None:
    secrets = {"pw": opted_in({"password": "hunter2"}), "s3": SecretRead(data={"AWS_ACCESS_KEY_ID": "AK"}, labels={})}
    with pytest.raises(RepositoryUnavailable, match="Repository ns/offsite: Secret s3 is not labelled") as raised:
        repository_env(REPOSITORY["spec"], secrets, where="Repository ns/offsite")
    assert raised.value.reason == "SecretNotOptedIn"


# --- the dispatcher with a fake API and a fake connection ---------------------------------------


def fake_kube() -> FakeKube:
    """The API holding the Repository and its opted-in Secrets."""
    kube = FakeKube()
    kube.objects["repositories", ObjectKey("ns", "offsite")] = REPOSITORY
    kube.secrets.update({ObjectKey("ns", "pw"): opted_in({"password": "hunter2"}),
                         ObjectKey("ns", "s3"): opted_in({"AWS_ACCESS_KEY_ID": "AK"})})
    return kube


class Harness:
    def __init__(self, session: FakeSession | None, *, flush_timeout: float = 10.0) -> None:
        self.store = Store()
        self.kube = fake_kube()
        self.session = session
        self.changes: list[tuple[str, str]] = []
        self.writer = StatusWriter(self.kube, render=self._render, flush_timeout=flush_timeout)  # type: ignore[arg-type]
        self.events = Recorder(self.kube, clock=lambda: NOW)  # type: ignore[arg-type]
        self.dispatcher = Dispatcher(
            store=self.store, kube=self.kube,  # type: ignore[arg-type]
            writer=self.writer,
            session_of=lambda key: self.session,  # type: ignore[arg-type,return-value]
            on_phase_change=lambda job, status: self.changes.append((job.key.name, status["phase"])),
            clock=lambda: NOW, events=self.events,
        )

    def _render(self, target: Target) -> Rendered | None:
        found = self.store.jobs.get(target.key)
        return None if found is None else Rendered(found.uid, found.status, self.dispatcher.status_of(found))

    @contextlib.asynccontextmanager
    async def writing(self) -> AsyncIterator[None]:
        """The status writer's and the Event recorder's loops run meanwhile."""
        tasks = [asyncio.create_task(self.writer.run()), asyncio.create_task(self.events.run())]
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def add(self, **kwargs: Any) -> Job:
        self.store.jobs.upsert(job_body(**kwargs))
        found = self.store.jobs.get(ObjectKey("ns", kwargs.get("name", "j")))
        assert found is not None
        return found

    def phase(self, name: str = "j") -> str:
        found = self.store.jobs.get(ObjectKey("ns", name))
        assert found is not None
        return self.dispatcher.status_of(found).get("phase", "")


async def test_a_pending_job_is_sent_to_its_connected_agent_with_credentials() -> None:
    harness = Harness(FakeSession())
    harness.add()
    await harness.dispatcher.reconcile(ObjectKey("ns", "j"))
    [command] = harness.session.sent  # type: ignore[union-attr]
    assert isinstance(command, protocol.CommandRun)
    assert command.job == "ns/j" and command.type is protocol.JobType.BACKUP and command.timeout_seconds == 600
    assert command.repository.url == "/srv/repo"
    assert command.repository.env == {"RESTIC_PASSWORD": "hunter2", "AWS_ACCESS_KEY_ID": "AK"}
    assert command.repository.initialize is True
    assert command.args == protocol.BackupArgs(paths=["/srv"])
    assert harness.kube.finalizers == [(ObjectKey("ns", "j"), True, FinalizersSeen("uid-j", ()))]
    assert harness.phase() == "Running"
    assert "hunter2" not in repr(command)
    assert harness.kube.gets == [ObjectKey("ns", "offsite")]  # the watch had not shown the Repository


async def test_a_status_write_patches_what_changed_since_the_last_write_to_that_very_object() -> None:
    kube = fake_kube()
    shown: list[Rendered] = []
    writer = StatusWriter(kube, render=lambda target: shown[-1])  # type: ignore[arg-type]
    target, key = Target("resticjobs", ObjectKey("ns", "j")), ObjectKey("ns", "j")
    for rendered in (Rendered("u1", {}, {"phase": "Running", "message": "a"}),
                     Rendered("u1", {}, {"phase": "Running", "message": "b"}),      # from the last write
                     Rendered("u2", {"phase": "Running"}, {"phase": "Succeeded"})):  # recreated: from the API's view
        shown.append(rendered)
        await writer._write(target)
    writer.forget("resticjobs", key)  # deleted: the next object of that name starts from the API's view
    shown.append(Rendered("u3", {}, {"phase": "Succeeded"}))
    await writer._write(target)
    assert [status for _, _, status in kube.patches] == [
        {"phase": "Running", "message": "a"}, {"message": "b"}, {"phase": "Succeeded"}, {"phase": "Succeeded"}]


async def test_a_fired_job_holds_its_finalizer_already_and_is_sent_without_a_patch() -> None:
    harness = Harness(FakeSession())
    harness.add(finalizer=True)
    await harness.dispatcher.reconcile(ObjectKey("ns", "j"))
    assert isinstance(harness.session.sent[0], protocol.CommandRun)  # type: ignore[union-attr]
    assert harness.kube.finalizers == []


async def test_the_repository_is_taken_from_the_watch_without_a_read() -> None:
    harness = Harness(FakeSession())
    harness.store.repositories.upsert({**REPOSITORY, "spec": {**REPOSITORY["spec"], "url": "/srv/watched"}})
    harness.add(finalizer=True)
    await harness.dispatcher.reconcile(ObjectKey("ns", "j"))
    [command] = harness.session.sent  # type: ignore[union-attr]
    assert isinstance(command, protocol.CommandRun) and command.repository.url == "/srv/watched"
    assert harness.kube.gets == []


async def test_a_repository_deleted_from_the_watch_makes_the_job_wait() -> None:
    harness = Harness(FakeSession())
    harness.store.repositories.upsert(REPOSITORY)
    harness.store.repositories.delete(REPOSITORY)
    del harness.kube.objects["repositories", ObjectKey("ns", "offsite")]
    harness.add(finalizer=True)
    await harness.dispatcher.reconcile(ObjectKey("ns", "j"))
    status = harness.dispatcher.status_of(harness.store.jobs.get(ObjectKey("ns", "j")))  # type: ignore[arg-type]
    assert (status["phase"], status["reason"]) == ("Pending", "RepositoryNotFound")
    assert harness.session.sent == []  # type: ignore[union-attr]


async def test_a_job_waits_while_its_agent_is_away() -> None:
    harness = Harness(None)
    harness.add()
    await harness.dispatcher.reconcile(ObjectKey("ns", "j"))
    status = harness.dispatcher.status_of(harness.store.jobs.get(ObjectKey("ns", "j")))  # type: ignore[arg-type]
    assert (status["phase"], status["reason"]) == ("Pending", "AgentDisconnected")


async def test_a_job_waits_for_a_missing_secret_and_says_which() -> None:
    harness = Harness(FakeSession())
    del harness.kube.secrets[ObjectKey("ns", "s3")]
    harness.add()
    await harness.dispatcher.reconcile(ObjectKey("ns", "j"))
    status = harness.dispatcher.status_of(harness.store.jobs.get(ObjectKey("ns", "j")))  # type: ignore[arg-type]
    assert (status["phase"], status["reason"]) == ("Pending", "SecretNotFound")
    assert "Secret s3 of Repository ns/offsite does not exist" in status["message"]
    assert harness.session.sent == []  # type: ignore[union-attr]


async def test_a_job_whose_secret_did_not_opt_in_waits_and_its_agent_is_sent_nothing() -> None:
    harness = Harness(FakeSession())
    harness.kube.secrets[ObjectKey("ns", "s3")] = SecretRead(data={"AWS_ACCESS_KEY_ID": "AK"}, labels={})
    harness.add()
    await harness.dispatcher.reconcile(ObjectKey("ns", "j"))
    status = harness.dispatcher.status_of(harness.store.jobs.get(ObjectKey("ns", "j")))  # type: ignore[arg-type]
    assert (status["phase"], status["reason"]) == ("Pending", "SecretNotOptedIn")
    assert "Secret s3 is not labelled resticmanager.io/repository-secret=true" in status["message"]
    assert harness.session.sent == []  # type: ignore[union-attr]
    harness.kube.secrets[ObjectKey("ns", "s3")] = opted_in({"AWS_ACCESS_KEY_ID": "AK"})  # its owner labels it
    await harness.dispatcher.reconcile(ObjectKey("ns", "j"))
    [command] = harness.session.sent  # type: ignore[union-attr]
    assert isinstance(command, protocol.CommandRun) and command.repository.env["AWS_ACCESS_KEY_ID"] == "AK"


@pytest.mark.parametrize("names", [{"repository": ".."}, {"repository": "."}, {"repository": "%2e%2e"},
                                   {"agent": ".."}, {"repository": "Offsite"}])
async def test_names_that_can_never_resolve_fail_the_job_once_and_cost_nothing_after(names: dict[str, str]) -> None:
    harness = Harness(FakeSession())
    harness.add(spec={"agent": "web-01", "repository": "offsite", "type": "prune", **names})
    for _ in range(3):
        await harness.dispatcher.reconcile(ObjectKey("ns", "j"))
    status = harness.dispatcher.status_of(harness.store.jobs.get(ObjectKey("ns", "j")))  # type: ignore[arg-type]
    assert (status["phase"], status["reason"]) == ("Failed", "Invalid")
    assert f"{next(iter(names.values()))!r}: must be the name of" in status["message"]
    assert harness.kube.gets == [] and harness.session.sent == []  # type: ignore[union-attr]
    assert harness.changes == [("j", "Failed")]


async def test_invalid_parameters_fail_the_job() -> None:
    harness = Harness(FakeSession())
    harness.add(spec={"agent": "web-01", "repository": "offsite", "type": "restore",
                      "restore": {"snapshot": "not-an-id", "target": "/tmp/x"}})
    await harness.dispatcher.reconcile(ObjectKey("ns", "j"))
    status = harness.dispatcher.status_of(harness.store.jobs.get(ObjectKey("ns", "j")))  # type: ignore[arg-type]
    assert (status["phase"], status["reason"]) == ("Failed", "InvalidSpec")
    assert "args.snapshot" in status["message"] or "snapshot" in status["message"]


async def until_events(harness: Harness, count: int) -> list[tuple[str, str, str, str]]:
    async with asyncio.timeout(5):
        while len(harness.kube.events) < count:
            await asyncio.sleep(0.01)
    return [(e["involved"]["kind"], e["involved"]["name"], e["type"], e["reason"]) for e in harness.kube.events]


async def test_reports_drive_the_job_to_its_end_and_job_done_is_acked_once_written() -> None:
    session = FakeSession()
    harness = Harness(session)
    harness.add()
    await harness.dispatcher.reconcile(ObjectKey("ns", "j"))
    async with harness.writing():
        await harness.dispatcher.on_report(session, protocol.JobStarted(job="ns/j", started_at=NOW),  # type: ignore[arg-type]
                                           frame_id="s1")
        await harness.dispatcher.on_report(session, protocol.JobDone(  # type: ignore[arg-type]
            job="ns/j", outcome=protocol.Outcome.SUCCEEDED, exit_code=0, finished_at=NOW,
            summary=protocol.Summary(snapshot_id="abcdef12")), frame_id="d1")
        assert session.sent[-1] == protocol.JobDoneAck(ref="d1", job="ns/j")
        # the ack went out after a write that holds the final phase
        assert harness.kube.patches[-1][2]["phase"] == "Succeeded"
        assert await until_events(harness, 2) == [("ResticJob", "j", "Normal", "Started"),
                                                  ("ResticJob", "j", "Normal", "Completed")]
    assert harness.kube.events[1]["message"] == "backup on agent web-01: restic finished successfully; snapshot abcdef12"
    assert harness.phase() == "Succeeded"
    assert harness.changes == [("j", "Running"), ("j", "Succeeded")]
    assert "ns/j" not in session.dispatched


async def test_a_job_done_whose_status_cannot_be_written_is_not_acked() -> None:
    session = FakeSession()
    harness = Harness(session, flush_timeout=0.2)
    harness.add(phase="Running")
    harness.kube.refuse_patches = True
    async with harness.writing():
        await harness.dispatcher.on_report(session, protocol.JobDone(  # type: ignore[arg-type]
            job="ns/j", outcome=protocol.Outcome.SUCCEEDED, exit_code=0, finished_at=NOW), frame_id="d1")
    assert not any(isinstance(payload, protocol.JobDoneAck) for payload in session.sent)


async def test_a_job_done_about_a_deleted_job_is_acked_at_once() -> None:
    session = FakeSession()
    harness = Harness(session)
    await harness.dispatcher.on_report(session, protocol.JobDone(  # type: ignore[arg-type]
        job="ns/gone", outcome=protocol.Outcome.FAILED, exit_code=1, finished_at=NOW), frame_id="d1")
    assert session.sent == [protocol.JobDoneAck(ref="d1", job="ns/gone")]


async def test_a_running_job_the_agent_no_longer_has_is_lost() -> None:
    harness = Harness(FakeSession(running=[]))
    harness.add(phase="Running")
    await harness.dispatcher.reconcile(ObjectKey("ns", "j"))
    status = harness.dispatcher.status_of(harness.store.jobs.get(ObjectKey("ns", "j")))  # type: ignore[arg-type]
    assert (status["phase"], status["reason"]) == ("Failed", "AgentLost")


async def test_a_running_job_the_agent_still_has_stays_running() -> None:
    harness = Harness(FakeSession(running=["ns/j"]))
    harness.add(phase="Running")
    await harness.dispatcher.reconcile(ObjectKey("ns", "j"))
    assert harness.phase() == "Running"


async def test_deleting_a_running_job_cancels_it_on_the_agent() -> None:
    harness = Harness(FakeSession(running=["ns/j"]))
    harness.add(phase="Running", deleting=True, finalizer=True)
    await harness.dispatcher.reconcile(ObjectKey("ns", "j"))
    assert harness.session.sent == [protocol.CommandCancel(job="ns/j")]  # type: ignore[union-attr]
    # Released from the store's copy of the job, not from a fresh read.
    assert harness.kube.finalizers == [(ObjectKey("ns", "j"), False, FinalizersSeen("uid-j", (FINALIZER,)))]


async def test_a_finished_job_releases_its_finalizer_from_the_stores_copy() -> None:
    harness = Harness(FakeSession())
    harness.add(phase="Succeeded", finalizer=True)
    await harness.dispatcher.reconcile(ObjectKey("ns", "j"))
    assert harness.kube.finalizers == [(ObjectKey("ns", "j"), False, FinalizersSeen("uid-j", (FINALIZER,)))]


async def test_replace_cancels_a_running_job_and_ends_a_pending_one() -> None:
    session = FakeSession(running=["ns/old"])
    harness = Harness(session)
    harness.add(name="old", phase="Running")
    harness.add(name="waiting", phase="Pending")
    await harness.dispatcher.cancel_for_replace(ObjectKey("ns", "old"), by="new")
    await harness.dispatcher.cancel_for_replace(ObjectKey("ns", "waiting"), by="new")
    assert session.sent == [protocol.CommandCancel(job="ns/old")]
    assert harness.phase("waiting") == "Cancelled"


async def test_a_report_about_a_deleted_job_cancels_it() -> None:
    session = FakeSession()
    harness = Harness(session)
    await harness.dispatcher.on_report(session, protocol.JobStarted(job="ns/gone", started_at=NOW),  # type: ignore[arg-type]
                                       frame_id="s1")
    assert session.sent == [protocol.CommandCancel(job="ns/gone")]


async def test_a_failed_job_has_a_warning_with_its_reason() -> None:
    session = FakeSession(running=["ns/bad"])
    harness = Harness(session)
    harness.add(name="bad", phase="Running")
    session.dispatched.add("ns/bad")
    async with harness.writing():
        await harness.dispatcher.on_report(session, protocol.JobDone(  # type: ignore[arg-type]
            job="ns/bad", outcome=protocol.Outcome.FAILED, exit_code=12, finished_at=NOW), frame_id="d2")
        assert await until_events(harness, 1) == [("ResticJob", "bad", "Warning", "WrongPassword")]


async def test_a_job_deleted_while_it_ran_leaves_an_event_on_its_schedule() -> None:
    harness = Harness(FakeSession(running=["ns/j"]))
    harness.add(phase="Running", deleting=True, finalizer=True, scheduled_at=NOW)
    async with harness.writing():
        await harness.dispatcher.reconcile(ObjectKey("ns", "j"))
        [seen] = await until_events(harness, 1)
    assert seen == ("Schedule", "nightly", "Warning", "JobCancelled")
    assert harness.kube.events[0]["message"] == ("ResticJob j was deleted while restic backup ran on agent web-01: "
                                                 "restic was cancelled there")
