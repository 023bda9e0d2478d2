"""Schedule, ResticJob and Agent status as the operator writes them."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from restic_manager import protocol
from restic_manager.operator.kube.api import format_time
from restic_manager.operator.kube.cache import Schedule
from restic_manager.operator.status import rendering as status
from restic_manager.operator.status.health import AgentHealth, LastJob
from restic_manager.operator.status.rendering import Ack, ScheduleBook, applied_condition, schedule_status, set_condition

UTC = timezone.utc
T0 = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
T1 = T0 + timedelta(minutes=5)

CASES = [
    # (case, targets, acks, connected, expected status, reason, words in the message)
    ("nobody targeted", [], {}, [], False, "NoAgents", ["no such agent"]),
    ("all acked", ["a", "b"], {"a": Ack(4, T0), "b": Ack(4, T0)}, ["a", "b"], True, "AllAgentsAcked",
     ["all 2 agents", "generation 4"]),
    ("one agent acked", ["a"], {"a": Ack(4, T0)}, ["a"], True, "AllAgentsAcked", ["agent applied generation 4"]),
    ("acked while since disconnected still counts", ["a"], {"a": Ack(4, T0)}, [], True, "AllAgentsAcked", []),
    ("one still on the old generation", ["a", "b"], {"a": Ack(4, T0), "b": Ack(3, T0)}, ["a", "b"],
     False, "NotAcked", ["b", "generation 4"]),
    ("one never answered", ["a", "b"], {"a": Ack(4, T0)}, ["a", "b"], False, "NotAcked", ["b"]),
    ("one disconnected", ["a", "b"], {"a": Ack(4, T0)}, ["a"], False, "AgentsDisconnected", ["b"]),
    ("one rejected", ["a", "b"], {"a": Ack(4, T0), "b": Ack(4, T0, "minute must be 0-59")}, ["a", "b"],
     False, "Rejected", ["b rejected generation 4", "minute must be 0-59"]),
    ("an old rejection is superseded", ["a"], {"a": Ack(3, T0, "bad")}, ["a"], False, "NotAcked", ["a"]),
]


@pytest.mark.parametrize(
    ("targets", "acks", "connected", "expected", "reason", "words"),
    [case[1:] for case in CASES], ids=[case[0] for case in CASES],
)
def test_applied_condition(
    targets: list[str], acks: dict[str, Ack], connected: list[str], expected: bool, reason: str, words: list[str]
) -> None:
    value, why, message = applied_condition(generation=4, targets=targets, acks=acks, connected=connected,
                                            no_agents="no such agent")
    assert (value, why) == (expected, reason)
    for word in words:
        assert word in message


def test_condition_keeps_its_transition_time_while_status_holds() -> None:
    first = set_condition([], type="Applied", status=False, reason="NotAcked", message="m", now=T0)
    same = set_condition(first, type="Applied", status=False, reason="AgentsDisconnected", message="n", now=T1)
    flipped = set_condition(same, type="Applied", status=True, reason="AllAgentsAcked", message="o", now=T1)
    assert same[0]["lastTransitionTime"] == "2026-03-01T12:00:00Z" and same[0]["reason"] == "AgentsDisconnected"
    assert flipped[0]["lastTransitionTime"] == "2026-03-01T12:05:00Z" and flipped[0]["status"] == "True"


def test_condition_leaves_other_types_alone() -> None:
    both = set_condition([{"type": "Other", "status": "True"}], type="Applied", status=True,
                         reason="r", message="m", now=T0, observed_generation=2)
    assert both[0] == {"type": "Other", "status": "True"}
    assert both[1]["observedGeneration"] == 2


def schedule(generation: int = 4, **spec: Any) -> Schedule:
    return Schedule.from_body({
        "metadata": {"name": "nightly", "namespace": "ns", "uid": "uid-1", "generation": generation,
                     "resourceVersion": "10", "creationTimestamp": "2026-03-01T00:00:00Z"},
        "spec": {"agentSelector": {}, "repository": "offsite", "schedule": "H 2 * * *",
                 "template": {"type": "prune"}, **spec},
    })


def render(book: ScheduleBook, *, spec: dict[str, Any] | None = None, targets: list[str] | None = None,
           connected: list[str] | None = None) -> dict[str, Any]:
    return schedule_status(
        schedule(**(spec or {})), book=book, targets=targets or ["web-01", "web-02"],
        connected=connected or ["web-01", "web-02"], resolved="17 2 * * *",
        next_fire=datetime(2026, 3, 2, 2, 17, tzinfo=UTC), active=["nightly-web-01-1"], no_agents="none", now=T1,
    )


def test_schedule_status_lists_every_targeted_agent() -> None:
    book = ScheduleBook(acks={"web-01": Ack(4, T0), "web-02": Ack(3, T0)},
                        last_fire={"web-01": T0}, last_schedule_time=T0, missed=1, refused=2)
    result = render(book)
    assert result["observedGeneration"] == 4
    assert result["resolvedSchedule"] == "17 2 * * *"
    assert result["agents"] == [
        {"name": "web-01", "connected": True, "ackedGeneration": 4, "ackedAt": "2026-03-01T12:00:00Z",
         "lastFireTime": "2026-03-01T12:00:00Z", "nextFireTime": "2026-03-02T02:17:00Z"},
        # An agent still on an old generation has no next fire of this generation to show.
        {"name": "web-02", "connected": True, "ackedGeneration": 3, "ackedAt": "2026-03-01T12:00:00Z"},
    ]
    assert result["lastScheduleTime"] == "2026-03-01T12:00:00Z"
    assert (result["missedFires"], result["refusedFires"]) == (1, 2)
    assert result["active"] == [{"name": "nightly-web-01-1"}]
    applied, healthy = result["conditions"]
    assert (applied["type"], applied["status"], applied["reason"], applied["observedGeneration"]) == (
        "Applied", "False", "NotAcked", 4)
    assert (healthy["type"], healthy["status"], healthy["reason"]) == ("Healthy", "True", "AllAgentsHealthy")
    assert (result["nextFireTime"], result["healthyAgents"]) == ("2026-03-02T02:17:00Z", "2/2")


def test_schedule_status_shows_a_rejection_with_its_error() -> None:
    book = ScheduleBook(acks={"web-01": Ack(4, T0, "time zone 'Mars/Olympus' is unknown")})
    result = render(book, targets=["web-01"])
    assert result["agents"] == [{"name": "web-01", "connected": True, "ackedAt": "2026-03-01T12:00:00Z",
                                 "error": "time zone 'Mars/Olympus' is unknown"}]
    assert result["conditions"][0]["reason"] == "Rejected"


def test_a_suspended_schedule_shows_no_next_fire() -> None:
    book = ScheduleBook(acks={"web-01": Ack(4, T0)})
    result = render(book, spec={"suspend": True}, targets=["web-01"])
    assert "nextFireTime" not in result["agents"][0]


def test_book_is_seeded_from_a_written_status() -> None:
    written = render(ScheduleBook(acks={"web-01": Ack(4, T0), "web-02": Ack(4, T0)}, last_fire={"web-02": T0},
                                  last_successful_time=T1, missed=3, refused=5))
    book = ScheduleBook.from_status(written)
    assert book.acks == {"web-01": Ack(4, T0), "web-02": Ack(4, T0)}
    assert book.last_fire == {"web-02": T0}
    assert (book.last_successful_time, book.missed, book.refused) == (T1, 3, 5)
    assert render(book) == written


def test_an_ack_records_applied_rejected_and_dropped_schedules() -> None:
    book = ScheduleBook()
    kwargs: dict[str, Any] = {"schedule_id": "ns/nightly", "at": T0}
    assert book.record_ack("a", applied={"ns/nightly": 4}, rejected={}, **kwargs)
    assert book.acks["a"] == Ack(4, T0)
    assert not book.record_ack("a", applied={"ns/nightly": 4}, rejected={}, **kwargs)
    assert book.record_ack("a", applied={}, rejected={"ns/nightly": (5, "bad")}, **kwargs)
    assert book.acks["a"] == Ack(5, T0, "bad")
    assert book.record_ack("a", applied={"ns/other": 1}, rejected={}, **kwargs)
    assert "a" not in book.acks
    assert not book.record_ack("a", applied={"ns/other": 1}, rejected={}, **kwargs)  # still not there


ACK_AGAIN = [
    # (case, first answer, later answer, changed, the Ack kept)
    ("the same generation applied again", ({"ns/nightly": 4}, {}), ({"ns/nightly": 4}, {}), False, Ack(4, T0)),
    ("the same rejection again", ({}, {"ns/nightly": (4, "bad")}), ({}, {"ns/nightly": (4, "bad")}), False,
     Ack(4, T0, "bad")),
    ("a new generation", ({"ns/nightly": 4}, {}), ({"ns/nightly": 5}, {}), True, Ack(5, T1)),
    ("rejected, then applied", ({}, {"ns/nightly": (4, "bad")}), ({"ns/nightly": 4}, {}), True, Ack(4, T1)),
    ("another error", ({}, {"ns/nightly": (4, "bad")}), ({}, {"ns/nightly": (4, "worse")}), True,
     Ack(4, T1, "worse")),
]


@pytest.mark.parametrize(("first", "later", "changed", "kept"), [case[1:] for case in ACK_AGAIN],
                         ids=[case[0] for case in ACK_AGAIN])
def test_an_ack_that_is_no_news_for_a_schedule_changes_nothing(
        first: tuple[dict[str, int], dict[str, tuple[int, str]]], later: tuple[dict[str, int], dict[str, tuple[int, str]]],
        changed: bool, kept: Ack) -> None:
    """Every ack covers the agent's whole set: only the Schedules it is news for get a status write."""
    book = ScheduleBook()
    assert book.record_ack("a", applied=first[0], rejected=first[1], schedule_id="ns/nightly", at=T0)
    assert book.record_ack("a", applied=later[0], rejected=later[1], schedule_id="ns/nightly", at=T1) is changed
    assert book.acks["a"] == kept


# --- ResticJob ------------------------------------------------------------------------------

STARTED = protocol.JobStarted(job="ns/j", started_at=T0)
PROGRESS = protocol.JobProgress(job="ns/j", percent_done=42.5, files_done=3, total_files=10)
DONE = protocol.JobDone(
    job="ns/j", outcome=protocol.Outcome.SUCCEEDED, exit_code=0, finished_at=T1,
    summary=protocol.Summary(snapshot_id="4e2a7c1f" + "9b" * 28, files_new=3, data_added=1024),
    log_tail=["snapshot 4e2a7c1f saved"],
)


def test_a_job_runs_through_started_progress_done() -> None:
    dispatched = status.job_dispatched({}, agent="web-01", now=T0)
    assert dispatched["phase"] == "Running" and dispatched["dispatchedAt"] == "2026-03-01T12:00:00Z"
    started = status.job_started(dispatched, STARTED)
    assert started["startTime"] == "2026-03-01T12:00:00Z"
    progressing = status.job_progress(started, PROGRESS)
    assert progressing["progress"] == {"percentDone": 42.5, "percent": 42, "filesDone": 3, "totalFiles": 10,
                                       "bytesDone": 0, "totalBytes": 0, "secondsElapsed": 0.0}
    done = status.job_done(progressing, DONE)
    assert (done["phase"], done["reason"], done["exitCode"]) == ("Succeeded", "Completed", 0)
    # The full id for programs, the short one restic prints for the Snapshot column.
    assert done["summary"] == {"snapshotId": "4e2a7c1f" + "9b" * 28, "shortId": "4e2a7c1f", "filesNew": 3,
                               "dataAdded": 1024}
    assert done["progress"]["percent"] == 100  # done is all done, whatever restic's last report said
    assert done["completionTime"] == "2026-03-01T12:05:00Z" and done["logTail"] == ["snapshot 4e2a7c1f saved"]
    conditions = {c["type"]: c["status"] for c in done["conditions"]}
    assert conditions == {"Complete": "True", "Failed": "False"}


@pytest.mark.parametrize(
    ("exit_code", "reason"),
    [(1, "ResticFailed"), (3, "IncompleteSnapshot"), (10, "RepositoryNotFound"), (12, "WrongPassword"),
     (None, "ResticFailed")],
)
def test_a_failed_job_says_why(exit_code: int | None, reason: str) -> None:
    failed = protocol.JobDone(job="ns/j", outcome=protocol.Outcome.FAILED, exit_code=exit_code, finished_at=T1,
                              error="")
    done = status.job_done({"phase": "Running"}, failed)
    assert (done["phase"], done["reason"]) == ("Failed", reason)
    assert {c["type"]: c["status"] for c in done["conditions"]} == {"Complete": "False", "Failed": "True"}


@pytest.mark.parametrize(("percent_done", "percent"), [(0.0, 0), (0.27, 0), (68.61, 68), (99.99, 99), (100.0, 100)])
def test_progress_is_shown_as_a_whole_percent_rounded_down(percent_done: float, percent: int) -> None:
    report = protocol.JobProgress(job="ns/j", percent_done=percent_done)
    assert status.job_progress({"phase": "Running"}, report)["progress"]["percent"] == percent


def test_a_job_stopped_at_its_timeout_fails_with_reason_timeout() -> None:
    timed_out = protocol.JobDone(job="ns/j", outcome=protocol.Outcome.FAILED, exit_code=130, finished_at=T1,
                                 error="backup timed out after 3600 s: restic was interrupted", timed_out=True)
    done = status.job_done({"phase": "Running", "progress": {"percentDone": 40.2, "percent": 40}}, timed_out)
    assert (done["phase"], done["reason"], done["message"]) == (
        "Failed", "Timeout", "backup timed out after 3600 s: restic was interrupted")
    assert {(c["type"], c["status"], c["reason"]) for c in done["conditions"]} == {
        ("Complete", "False", "Timeout"), ("Failed", "True", "Timeout")}
    assert done["progress"]["percent"] == 40  # as far as it got


def test_a_finished_job_ignores_late_reports() -> None:
    done = status.job_done({"phase": "Running"}, DONE)
    assert status.job_started(done, STARTED) == done
    assert status.job_progress(done, PROGRESS) == done
    cancelled = protocol.JobDone(job="ns/j", outcome=protocol.Outcome.CANCELLED, finished_at=T1)
    assert status.job_done(done, cancelled) == done


def test_a_lost_job_takes_the_agents_late_report() -> None:
    lost = status.job_ended({"phase": "Running"}, phase="Failed", reason=status.LOST, message="gone", now=T0)
    assert (lost["phase"], lost["reason"]) == ("Failed", "AgentLost")
    assert status.job_done(lost, DONE)["phase"] == "Succeeded"


def test_waiting_is_pending_with_a_reason() -> None:
    waiting = status.job_waiting({}, reason="AgentDisconnected", message="waiting for agent web-01 to connect")
    assert (status.phase_of(waiting), waiting["reason"]) == ("Pending", "AgentDisconnected")
    assert "reason" not in status.job_dispatched(waiting, agent="web-01", now=T0)


# --- Agent ----------------------------------------------------------------------------------

HELLO = protocol.Hello(agent="web-01", agent_version="0.1.0", restic_version="0.19.1", protocol_version=1,
                       hostname="web-01.example.com", running_jobs=["ns/j"])


def test_agent_connected_then_disconnected() -> None:
    connected = status.agent_connected({"tokenSecretName": "web-01-agent-token"}, HELLO, peer="10.0.0.1:5555", now=T0)
    assert connected["connected"] is True and connected["tokenSecretName"] == "web-01-agent-token"
    assert (connected["hostname"], connected["resticVersion"], connected["runningJobs"]) == (
        "web-01.example.com", "0.19.1", 1)
    assert connected["conditions"][0]["status"] == "True"
    assert connected["address"] == "10.0.0.1"
    gone = status.agent_disconnected(connected, why="connection closed (code 1006)", now=T1)
    assert gone["connected"] is False and gone["lastSeen"] == "2026-03-01T12:05:00Z"
    assert gone["address"] == "10.0.0.1"  # where it last connected from, remembered by the next operator
    assert (gone["conditions"][0]["status"], gone["conditions"][0]["reason"]) == ("False", "Disconnected")


def test_each_agents_last_job_and_success_are_shown_and_seed_the_book_again() -> None:
    book = ScheduleBook(acks={"web-01": Ack(4, T0), "web-02": Ack(4, T0)},
                        health={"web-02": AgentHealth(False, "LastRunFailed", "its last run j2 failed (Timeout)")})
    book.record_end("web-01", LastJob("j1", "Succeeded", "Completed", T1, duration=2.5))
    book.record_end("web-02", LastJob("j2", "Failed", "Timeout", T1))
    written = render(book, connected=["web-01"])
    first, second = written["agents"]
    assert first["lastJob"] == {"name": "j1", "phase": "Succeeded", "reason": "Completed", "time": format_time(T1)}
    assert first["lastSuccessfulTime"] == format_time(T1) and first["connected"] is True
    assert second["lastJob"]["phase"] == "Failed" and "lastSuccessfulTime" not in second
    assert second["connected"] is False
    healthy = written["conditions"][1]
    assert (healthy["type"], healthy["status"], healthy["reason"]) == ("Healthy", "False", "LastRunFailed")
    assert healthy["message"] == "web-02: its last run j2 failed (Timeout)"
    assert written["healthyAgents"] == "1/2"
    seeded = ScheduleBook.from_status(written)
    assert seeded.last_job["web-02"] == LastJob("j2", "Failed", "Timeout", T1)
    assert seeded.last_success["web-01"].time == T1


def test_a_schedule_that_cannot_run_is_neither_applied_nor_healthy_and_shows_no_next_fire() -> None:
    book = ScheduleBook(acks={"web-01": Ack(4, T0)})
    written = schedule_status(
        schedule(), book=book, targets=["web-01"], connected=["web-01"], resolved="17 2 * * *",
        next_fire=datetime(2026, 3, 2, 2, 17, tzinfo=UTC), active=[], no_agents="none", now=T1,
        cannot_run=("RepositoryNotFound", "spec.repository: there is no Repository offsite in namespace ns"))
    assert [(c["type"], c["status"], c["reason"]) for c in written["conditions"]] == [
        ("Applied", "False", "RepositoryNotFound"), ("Healthy", "False", "RepositoryNotFound")]
    assert "nextFireTime" not in written and written["healthyAgents"] == "0/1"
