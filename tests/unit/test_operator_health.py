"""The Healthy condition's decisions (operator/status/health.py), and what the Schedule's status
keeps of each agent's runs between writes."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from restic_manager import cron
from restic_manager.operator.status.health import (
    DEFAULT_GRACE, HEALTHY, ActiveJob, AgentHealth, LastJob, agent_health, due_fires, grace_of, healthy_condition,
)
from restic_manager.operator.status.rendering import ScheduleBook, set_condition

UTC = timezone.utc
T0 = datetime(2026, 3, 2, 2, 0, tzinfo=UTC)
GRACE = timedelta(seconds=60)


def judge(**given: Any) -> AgentHealth:
    facts: dict[str, Any] = dict(due=T0, grace=GRACE, since=T0 - timedelta(days=1), last_job=None, active=(),
                                 connected=True, applied=True, last_fire=None)
    facts.update(given)
    return agent_health(**facts)


def test_a_failed_last_run_is_unhealthy_whatever_else_is_true() -> None:
    failed = LastJob("nightly-web-01-1", "Failed", "WrongPassword", T0)
    for due in (None, T0):
        state = judge(last_job=failed, due=due, active=[ActiveJob("next", "Running", "", "")])
        assert (state.healthy, state.reason) == (False, "LastRunFailed")
        assert state.message == "its last run nightly-web-01-1 failed (WrongPassword) at 2026-03-02T02:00:00Z"


def test_a_cancelled_last_run_is_no_failure() -> None:
    assert judge(last_job=LastJob("j", "Cancelled", "Replaced", T0), due=None) == HEALTHY


def test_a_job_that_cannot_start_names_why() -> None:
    waiting = ActiveJob("j", "Pending", "SecretNotFound", "Secret pw of Repository ns/offsite does not exist")
    state = judge(active=[waiting], due=None)
    assert (state.healthy, state.reason) == (False, "SecretNotFound")
    assert state.message == "j cannot start: Secret pw of Repository ns/offsite does not exist"
    # Waiting for its agent is no such reason: the deadline covers it.
    assert judge(active=[ActiveJob("j", "Pending", "AgentDisconnected", "")], due=None) == HEALTHY


@pytest.mark.parametrize(("facts", "why"), [
    ({"connected": False}, "the agent is not connected"),
    ({"applied": False}, "the agent has not applied this generation"),
    ({"last_fire": T0}, "its fire came past the deadline and was not run"),
    ({"last_fire": T0 - timedelta(hours=1)}, "its fire has not reached the operator"),
])
def test_a_fire_past_its_deadline_with_no_success_since_says_why(facts: dict[str, Any], why: str) -> None:
    state = judge(**facts)
    assert (state.healthy, state.reason) == (False, "Overdue")
    assert state.message == (f"no successful run since 2026-03-01T02:00:00Z, and the fire at 2026-03-02T02:00:00Z "
                             f"is more than 60 s past: {why}")


def test_a_success_since_the_fire_or_a_job_under_way_on_a_connected_agent_keeps_it_healthy() -> None:
    assert judge(since=T0 + timedelta(seconds=5)) == HEALTHY
    assert judge(since=T0) == HEALTHY  # the fire at T0 itself ran
    assert judge(due=None) == HEALTHY  # suspended, or no fire past its deadline yet
    running = [ActiveJob("j", "Running", "", "")]
    assert judge(active=running) == HEALTHY
    # Its agent gone, a Running job covers nothing: its outcome is unknown until the agent is back.
    assert judge(active=running, connected=False).reason == "Overdue"


def test_due_fires_is_the_newest_fire_past_its_deadline_and_when_the_next_ones_passes() -> None:
    hourly = cron.Cron("0 * * * *", "UTC")
    created = T0 - timedelta(days=2)
    due = due_fires(hourly, created=created, grace=GRACE, now=T0 + timedelta(seconds=30))
    assert (due.latest, due.next) == (T0 - timedelta(hours=1), T0 + GRACE)
    due = due_fires(hourly, created=created, grace=GRACE, now=T0 + timedelta(seconds=61))
    assert (due.latest, due.next) == (T0, T0 + timedelta(hours=1) + GRACE)
    # Nothing is due from before the Schedule existed.
    assert due_fires(hourly, created=T0 - timedelta(seconds=1), grace=GRACE, now=T0 + timedelta(seconds=30)).latest is None
    assert grace_of(None) == DEFAULT_GRACE and grace_of(5) == timedelta(seconds=5)


def test_the_condition_names_every_unhealthy_agent_with_its_reason() -> None:
    overdue = AgentHealth(False, "Overdue", "no successful run since ...")
    failed = AgentHealth(False, "LastRunFailed", "its last run j failed (ResticFailed) at ...")
    assert healthy_condition({"b": overdue, "a": failed, "c": HEALTHY}, cannot_run=None, no_agents="-") == (
        False, "AgentsUnhealthy", "a: its last run j failed (ResticFailed) at ...; b: no successful run since ...")
    assert healthy_condition({"b": overdue, "c": HEALTHY}, cannot_run=None, no_agents="-")[:2] == (False, "Overdue")
    assert healthy_condition({"a": HEALTHY, "b": HEALTHY}, cannot_run=None, no_agents="-") == (
        True, "AllAgentsHealthy", "all 2 agents: no failed run, no fire past due")
    assert healthy_condition({}, cannot_run=None, no_agents="spec.agent: there is no Agent x") == (
        False, "NoAgents", "spec.agent: there is no Agent x")
    assert healthy_condition({"a": HEALTHY}, cannot_run=("RepositoryNotFound", "no Repository"), no_agents="-") == (
        False, "RepositoryNotFound", "no Repository")


def test_the_book_keeps_the_newest_end_and_the_newest_success_of_reports_out_of_order() -> None:
    book = ScheduleBook()
    ok = LastJob("j1", "Succeeded", "Completed", T0, duration=3.0, added_bytes=10, files=2)
    failed = LastJob("j2", "Failed", "ResticFailed", T0 + timedelta(hours=1))
    book.record_end("web-01", failed)
    book.record_end("web-01", ok)  # its report came late
    assert book.last_job["web-01"] is failed and book.last_success["web-01"] is ok
    assert book.last_successful_time == T0


def test_conditions_keep_their_places_so_a_status_does_not_change_by_being_rendered() -> None:
    conditions = set_condition([], type="Applied", status=True, reason="r", message="m", now=T0)
    conditions = set_condition(conditions, type="Healthy", status=True, reason="r", message="m", now=T0)
    again = set_condition(conditions, type="Applied", status=False, reason="r2", message="m2", now=T0)
    assert [c["type"] for c in again] == ["Applied", "Healthy"] and again[0]["status"] == "False"
