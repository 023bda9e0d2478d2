"""Repository status from the jobs that used it."""

from __future__ import annotations

import asyncio
from datetime import datetime, timezone

import pytest

from restic_manager.operator.kube.api import ObjectKey
from restic_manager.operator.kube.cache import Job, Store
from restic_manager.operator.kube.client import KubeError
from restic_manager.operator.kube.events import Recorder
from restic_manager.operator.status.repositories import RepositoryReporter, repository_event, repository_status
from support.operator_fakes import FakeKube

NOW = datetime(2026, 11, 26, 2, 0, 30, tzinfo=timezone.utc)
EARLIER = "2026-11-25T02:00:00Z"


def initialized(status: dict) -> tuple[str, str] | None:
    found = [c for c in status["conditions"] if c["type"] == "Initialized"]
    return (found[0]["status"], found[0]["reason"]) if found else None


@pytest.mark.parametrize(
    ("ended", "expected_condition", "expected_result"),
    [
        ({"phase": "Succeeded", "reason": "Completed", "completionTime": "2026-11-26T02:00:20Z"},
         ("True", "RepositoryOpened"), "backup nightly-1: Succeeded (Completed)"),
        ({"phase": "Failed", "reason": "RepositoryNotFound", "completionTime": "2026-11-26T02:00:20Z"},
         ("False", "RepositoryNotFound"), "backup nightly-1: Failed (RepositoryNotFound)"),
        # A wrong password or a lost agent says nothing about whether the repository exists.
        ({"phase": "Failed", "reason": "WrongPassword", "completionTime": "2026-11-26T02:00:20Z"},
         None, "backup nightly-1: Failed (WrongPassword)"),
        ({"phase": "Failed", "reason": "AgentLost"}, None, "backup nightly-1: Failed (AgentLost)"),
    ],
)
def test_a_finished_job_sets_initialized_and_the_last_result(ended: dict, expected_condition: tuple | None,
                                                             expected_result: str) -> None:
    status = repository_status({}, job="nightly-1", job_type="backup", ended=ended, now=NOW)
    assert initialized(status) == expected_condition
    assert status["lastCheckResult"] == expected_result
    assert status["lastCheckTime"] == ended.get("completionTime", "2026-11-26T02:00:30Z")


def test_initialized_keeps_its_transition_time_while_it_holds() -> None:
    current = {"conditions": [{"type": "Initialized", "status": "True", "reason": "RepositoryOpened",
                               "message": "", "lastTransitionTime": EARLIER}]}
    status = repository_status(current, job="nightly-2", job_type="backup",
                               ended={"phase": "Succeeded", "reason": "Completed"}, now=NOW)
    assert status["conditions"][0]["lastTransitionTime"] == EARLIER
    assert status["conditions"][0]["message"] == "ResticJob nightly-2 opened the repository"


def test_a_missing_repository_flips_initialized_and_says_what_to_do() -> None:
    current = {"conditions": [{"type": "Initialized", "status": "True", "reason": "RepositoryOpened",
                               "message": "", "lastTransitionTime": EARLIER}]}
    status = repository_status(current, job="nightly-3", job_type="check",
                               ended={"phase": "Failed", "reason": "RepositoryNotFound"}, now=NOW)
    [condition] = status["conditions"]
    assert condition["status"] == "False"
    assert condition["lastTransitionTime"] == "2026-11-26T02:00:30Z"
    assert "set spec.initialize or run an init job" in condition["message"]


def test_a_check_jobs_end_is_the_repositorys_integrity_check() -> None:
    for phase, result in (("Succeeded", "Passed"), ("Failed", "Failed")):
        status = repository_status({}, job="weekly-1", job_type="check",
                                   ended={"phase": phase, "reason": "r", "completionTime": EARLIER}, now=NOW)
        assert status["integrityCheck"] == {"job": "weekly-1", "result": result, "reason": "r", "time": EARLIER}
    assert "integrityCheck" not in repository_status({}, job="b", job_type="backup",
                                                     ended={"phase": "Failed", "reason": "ResticFailed"}, now=NOW)
    assert "integrityCheck" not in repository_status({}, job="c", job_type="check",
                                                     ended={"phase": "Cancelled", "reason": "Replaced"}, now=NOW)


@pytest.mark.parametrize(("job_type", "ended", "event"), [
    ("backup", {"phase": "Failed", "reason": "WrongPassword"}, "WrongPassword"),
    ("check", {"phase": "Failed", "reason": "WrongPassword"}, "WrongPassword"),
    ("check", {"phase": "Failed", "reason": "ResticFailed", "message": "Fatal: repository contains errors"},
     "CheckFailed"),
    ("check", {"phase": "Failed", "reason": "Timeout"}, "CheckFailed"),
    ("check", {"phase": "Failed", "reason": "AgentLost"}, None),  # says nothing about the repository
    ("backup", {"phase": "Failed", "reason": "ResticFailed"}, None),
    ("check", {"phase": "Succeeded", "reason": "Completed"}, None),
])
def test_a_wrong_password_or_a_failed_check_is_a_warning_on_the_repository(
        job_type: str, ended: dict, event: str | None) -> None:
    said = repository_event(job="j", job_type=job_type, ended=ended)
    assert (said[0] if said else None) == event
    if event == "CheckFailed" and ended.get("message"):
        assert said is not None and said[1] == "ResticJob j (check) failed: Fatal: repository contains errors"


# --- RepositoryReporter: one write per burst, none lost, none made of nothing ---------------------------


def results(kube: FakeKube) -> list[str]:
    """The lastCheckResult of each Repository status patch, in order."""
    return [patch["lastCheckResult"] for _, _, patch in kube.patches]


REPOSITORY = ObjectKey("ns", "offsite")


def fake_kube() -> FakeKube:
    kube = FakeKube()
    kube.objects["repositories", REPOSITORY] = {"metadata": {"uid": "repo-uid"}, "status": {}}
    return kube


def ended_job(name: str, repository: str = "offsite") -> Job:
    return Job.from_body({"metadata": {"name": name, "namespace": "ns", "uid": f"uid-{name}"},
                          "spec": {"agent": "web-01", "repository": repository, "type": "backup"}})


def reporter_with(kube: FakeKube) -> RepositoryReporter:
    return RepositoryReporter(kube, clock=lambda: NOW, events=Recorder(kube, clock=lambda: NOW),  # type: ignore[arg-type]
                              known=Store().repositories)


async def test_a_job_ending_during_a_write_is_written_by_the_follow_up_and_then_nothing_is() -> None:
    kube = fake_kube()
    reporter = reporter_with(kube)
    reporter.job_ended(ended_job("first"), {"phase": "Succeeded"})
    kube.answer_gets.clear()
    writing = asyncio.ensure_future(reporter._write(REPOSITORY))
    await asyncio.sleep(0)
    reporter.job_ended(ended_job("second"), {"phase": "Failed"})
    kube.answer_gets.set()
    await writing
    await reporter._write(REPOSITORY)  # the follow-up the second job's mark asked for
    await reporter._write(REPOSITORY)  # a follow-up with nothing new: no write, no error
    assert results(kube) == ["backup first: Succeeded", "backup second: Failed"]


async def test_a_write_that_fails_is_made_by_the_retry() -> None:
    kube = fake_kube()
    reporter = reporter_with(kube)
    reporter.job_ended(ended_job("first"), {"phase": "Succeeded"})
    kube.fail_gets = True
    with pytest.raises(KubeError):
        await reporter._write(REPOSITORY)
    kube.fail_gets = False
    await reporter._write(REPOSITORY)
    assert results(kube) == ["backup first: Succeeded"]


@pytest.mark.parametrize("repository", ["..", ".", "%2e%2e", "Offsite"])
async def test_a_job_naming_what_no_repository_can_be_named_is_never_reported(repository: str) -> None:
    """The API refuses to read such a name (400): a retried read would fail every time."""
    kube = fake_kube()
    kube.fail_gets = True  # any read would fail
    reporter = reporter_with(kube)
    reporter.job_ended(ended_job("poison", repository), {"phase": "Failed", "reason": "Invalid"})
    await reporter._write(ObjectKey("ns", repository))
    assert reporter._ended == {} and results(kube) == []
