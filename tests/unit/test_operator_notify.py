"""Notifications' decisions, without a socket: which notifications a notice goes to, the notice
of a job's phase, the URL a Secret gives, each type's request, what an answer means, and the
retry policy's attempts and waits. (tests/unit/test_operator_notify_http.py delivers to a
real HTTP receiver.)"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import pytest
from yarl import URL

from restic_manager.operator import notify
from restic_manager.operator.kube.api import ObjectKey
from restic_manager.operator.kube.cache import Job
from restic_manager.operator.kube.client import MANAGED_BY, SecretRead
from restic_manager.operator.notify import (
    NOTIFICATION_OPT_IN, Delivery, Kind, Lane, Notice, Notification, Outbox, RetryPolicy, Undelivered, Via,
)
from restic_manager.operator.validation import schedule_problems

NOW = datetime(2026, 3, 2, 2, 0, 5, tzinfo=timezone.utc)
NIGHTLY = ObjectKey("team-a", "nightly")
JOB_UID = "0b3f3c52-7f1e-4d5e-9a43-1c2d3e4f5a6b"
OPTED_IN = {NOTIFICATION_OPT_IN: "true"}


def notice(kind: Kind = Kind.FAILED, **fields: Any) -> Notice:
    values: dict[str, Any] = {"schedule": NIGHTLY, "agent": "web-01", "job": "nightly-web-01-29012345",
                              "reason": "ResticFailed", "message": "restic exited with code 1", "at": NOW,
                              "phase": "Failed", "job_uid": JOB_UID}
    return Notice(kind=kind, **{**values, **fields})


def entry(via: str, *, when: list[str] | None = None, key: str = "url") -> dict[str, Any]:
    made: dict[str, Any] = {"type": via, "urlSecretRef": {"name": "hooks", "key": key}}
    if when is not None:
        made["when"] = when
    return made


def notification(via: Via, *, key: str = "url") -> Notification:
    return Notification(0, via, "hooks", key, notify.DEFAULT_WHEN[via])


# --- which notifications ------------------------------------------------------------------


@pytest.mark.parametrize(("case", "entries", "kind", "expected"), [
    ("healthchecks take start, success and failure by default", [entry("healthchecks")], Kind.STARTED, [0]),
    ("healthchecks not health by default", [entry("healthchecks")], Kind.UNHEALTHY, []),
    ("a webhook takes failures by default", [entry("webhook")], Kind.FAILED, [0]),
    ("a webhook takes health by default", [entry("webhook")], Kind.HEALTHY, [0]),
    ("a webhook not starts by default", [entry("webhook")], Kind.STARTED, []),
    ("slack not successes by default", [entry("slack")], Kind.SUCCEEDED, []),
    ("when replaces the default", [entry("discord", when=["succeeded"])], Kind.SUCCEEDED, [0]),
    ("when replaces it wholly", [entry("discord", when=["succeeded"])], Kind.FAILED, []),
    ("each entry by itself", [entry("slack"), entry("healthchecks"), entry("webhook", when=["started"])],
     Kind.STARTED, [1, 2]),
    ("an entry validation refuses is left out", [entry("email"), {"type": "slack"}, "x", entry("slack")],
     Kind.FAILED, [3]),
])
def test_a_notice_goes_to_the_notifications_that_take_its_kind(case: str, entries: list[Any], kind: Kind,
                                                               expected: list[int]) -> None:
    found = notify.routes({"notifications": entries}, notice(kind))
    assert [each.index for each in found] == expected, case


def test_a_schedule_without_notifications_notifies_nobody() -> None:
    assert notify.routes({}, notice()) == []
    assert notify.routes({"notifications": None}, notice()) == []


def fired_job(*, schedule: bool = True) -> Job:
    spec: dict[str, Any] = {"agent": "web-01", "repository": "offsite", "type": "backup"}
    if schedule:
        spec["scheduleRef"] = {"name": "nightly", "uid": "uid-nightly"}
    return Job.from_body({"metadata": {"name": "nightly-web-01-29012345", "namespace": "team-a", "uid": JOB_UID,
                                       "resourceVersion": "1"}, "spec": spec})


@pytest.mark.parametrize(("phase", "reason", "expected"), [
    ("Pending", "AgentDisconnected", None),
    ("Running", "", Kind.STARTED),
    ("Succeeded", "Completed", Kind.SUCCEEDED),
    ("Failed", "ResticFailed", Kind.FAILED),
    ("Failed", "AgentLost", Kind.FAILED),
    ("Cancelled", "Replaced", Kind.FAILED),
])
def test_a_jobs_new_phase_is_its_notice(phase: str, reason: str, expected: Kind | None) -> None:
    status = {"phase": phase, "reason": reason, "message": "m", "completionTime": "2026-03-02T02:03:00Z"}
    made = notify.job_notice(fired_job(), status, at=NOW)
    if expected is None:
        assert made is None
        return
    assert made == Notice(kind=expected, schedule=NIGHTLY, agent="web-01", job="nightly-web-01-29012345",
                          reason=reason, message="m", at=datetime(2026, 3, 2, 2, 3, tzinfo=timezone.utc),
                          phase=phase, job_uid=JOB_UID)


def test_a_job_of_no_schedule_notifies_nobody() -> None:
    assert notify.job_notice(fired_job(schedule=False), {"phase": "Failed"}, at=NOW) is None


# --- the URL a Secret gives ---------------------------------------------------------------


URL_TEXT = "https://hooks.example/services/T000/B000/s3cr3t-t0ken"


@pytest.mark.parametrize(("case", "via", "data", "labels", "agent", "expected"), [
    ("the key", Via.WEBHOOK, {"url": URL_TEXT}, OPTED_IN, "web-01", (URL_TEXT, "url")),
    ("spaces and a newline around it", Via.SLACK, {"url": f" {URL_TEXT}\n"}, OPTED_IN, None, (URL_TEXT, "url")),
    ("healthchecks: the agent's own key", Via.HEALTHCHECKS, {"url": "https://hc.example/all", "web-01":
     "https://hc.example/web-01"}, OPTED_IN, "web-01", ("https://hc.example/web-01", "web-01")),
    ("healthchecks: the key when the agent has none", Via.HEALTHCHECKS, {"url": "https://hc.example/all",
     "web-02": "https://hc.example/web-02"}, OPTED_IN, "web-01", ("https://hc.example/all", "url")),
    ("only healthchecks take an agent's key", Via.WEBHOOK, {"url": URL_TEXT, "web-01": "https://other.example/"},
     OPTED_IN, "web-01", (URL_TEXT, "url")),
    ("no such key", Via.WEBHOOK, {"other": URL_TEXT}, OPTED_IN, None, "Secret hooks has no key 'url'"),
    ("not a URL", Via.WEBHOOK, {"url": "s3cr3t-t0ken"}, OPTED_IN, None,
     "Secret hooks key 'url' does not hold an http or https URL"),
    ("another scheme", Via.WEBHOOK, {"url": "file:///etc/s3cr3t-t0ken"}, OPTED_IN, None,
     "Secret hooks key 'url' does not hold an http or https URL"),
    ("not opted in", Via.WEBHOOK, {"url": URL_TEXT}, {}, None,
     f"Secret hooks is not labelled {NOTIFICATION_OPT_IN}=true, and only Secrets so labelled are used for "
     f"notifications (kubectl label secret hooks {NOTIFICATION_OPT_IN}=true, by someone who may change the "
     "Secret)"),
    ("the repository label is not enough", Via.WEBHOOK, {"url": URL_TEXT},
     {"resticmanager.io/repository-secret": "true"}, None, f"not labelled {NOTIFICATION_OPT_IN}=true"),
    ("an agent token Secret, labelled or not", Via.WEBHOOK, {"url": URL_TEXT}, {**MANAGED_BY, **OPTED_IN}, None,
     "Secret hooks is an agent token Secret of the operator's, which is never used for notifications"),
])
def test_the_url_comes_from_an_opted_in_secret(case: str, via: Via, data: dict[str, str], labels: dict[str, str],
                                               agent: str | None, expected: tuple[str, str] | str) -> None:
    secret = SecretRead(data=data, labels=labels)
    if isinstance(expected, tuple):
        url, key = notify.destination(notification(via), secret, agent=agent)
        assert (str(url), key) == expected, case
        return
    with pytest.raises(Undelivered) as refused:
        notify.destination(notification(via), secret, agent=agent)
    assert expected in refused.value.why, case
    assert not refused.value.transient
    assert "s3cr3t-t0ken" not in refused.value.why  # a Secret's value is never in a message


# --- each type's request ------------------------------------------------------------------


def test_the_generic_webhook_posts_the_notice_as_json() -> None:
    request = notify.request_for(Via.WEBHOOK, URL(URL_TEXT), notice())
    assert (request.method, str(request.url), request.text) == ("POST", URL_TEXT, None)
    assert request.json == {"event": "failed", "schedule": "nightly", "namespace": "team-a", "agent": "web-01",
                            "job": "nightly-web-01-29012345", "phase": "Failed", "reason": "ResticFailed",
                            "message": "restic exited with code 1", "time": "2026-03-02T02:00:05Z"}


def test_a_health_notice_names_no_job_or_phase() -> None:
    made = notify.health_notice(NIGHTLY, agent="web-01", healthy=False, reason="Overdue",
                                message="no successful run since 01:00", at=NOW)
    assert notify.webhook_payload(made) == {
        "event": "unhealthy", "schedule": "nightly", "namespace": "team-a", "agent": "web-01", "job": None,
        "phase": None, "reason": "Overdue", "message": "no successful run since 01:00", "time": "2026-03-02T02:00:05Z"}
    assert notify.summary(made) == ("restic-manager: Schedule team-a/nightly (agent web-01) is unhealthy: Overdue: "
                                    "no successful run since 01:00")


@pytest.mark.parametrize(("kind", "fields", "text"), [
    (Kind.FAILED, {}, "restic-manager: ResticJob team-a/nightly-web-01-29012345 (Schedule team-a/nightly, agent "
                      "web-01) failed: ResticFailed: restic exited with code 1"),
    (Kind.FAILED, {"phase": "Cancelled", "reason": "Replaced", "message": "replaced by x"},
     "restic-manager: ResticJob team-a/nightly-web-01-29012345 (Schedule team-a/nightly, agent web-01) was "
     "cancelled: Replaced: replaced by x"),
    (Kind.STARTED, {"phase": "Running", "reason": "", "message": "sent to agent web-01"},
     "restic-manager: ResticJob team-a/nightly-web-01-29012345 (Schedule team-a/nightly, agent web-01) started"),
    (Kind.HEALTHY, {"job": None, "agent": None, "reason": "", "message": ""},
     "restic-manager: Schedule team-a/nightly is healthy again"),
])
def test_the_text_for_people_says_what_happened_to_what(kind: Kind, fields: dict[str, Any], text: str) -> None:
    assert notify.summary(notice(kind, **fields)) == text


def test_slack_gets_text_with_its_control_characters_escaped() -> None:
    request = notify.request_for(Via.SLACK, URL(URL_TEXT), notice(message="<!channel> & more"))
    assert request.json is not None and request.json.keys() == {"text"}
    assert request.json["text"].endswith("ResticFailed: &lt;!channel&gt; &amp; more")


def test_discord_gets_content_that_pings_nobody_within_its_limit() -> None:
    request = notify.request_for(Via.DISCORD, URL(URL_TEXT), notice(message="@everyone " + "x" * 3000))
    assert request.json is not None
    assert request.json["allowed_mentions"] == {"parse": []}
    assert len(request.json["content"]) == 2000 and request.json["content"].endswith("…")


@pytest.mark.parametrize(("url", "kind", "uid", "expected"), [
    ("https://hc.example/ping/abc", Kind.STARTED, JOB_UID, f"https://hc.example/ping/abc/start?rid={JOB_UID}"),
    ("https://hc.example/ping/abc", Kind.SUCCEEDED, JOB_UID, f"https://hc.example/ping/abc?rid={JOB_UID}"),
    ("https://hc.example/ping/abc/", Kind.FAILED, JOB_UID, f"https://hc.example/ping/abc/fail?rid={JOB_UID}"),
    ("https://hc.example/ping/key/nightly?create=1", Kind.STARTED, JOB_UID,
     f"https://hc.example/ping/key/nightly/start?create=1&rid={JOB_UID}"),
    ("https://hc.example/ping/abc", Kind.UNHEALTHY, None, "https://hc.example/ping/abc/fail"),
    ("https://hc.example/ping/abc", Kind.HEALTHY, None, "https://hc.example/ping/abc"),
    ("https://hc.example/ping/abc", Kind.FAILED, "uid-not-a-uuid", "https://hc.example/ping/abc/fail"),
])
def test_healthchecks_pings_start_the_url_and_fail_paired_by_the_jobs_uid(
        url: str, kind: Kind, uid: str | None, expected: str) -> None:
    request = notify.request_for(Via.HEALTHCHECKS, URL(url), notice(kind, job_uid=uid))
    assert (request.method, str(request.url), request.json) == ("POST", expected, None)
    assert request.text is not None and request.text.startswith("restic-manager: ")


# --- what an answer means, and when to try again -------------------------------------------


@pytest.mark.parametrize(("status", "retry_after", "transient", "wait"), [
    (200, None, None, None),
    (204, None, None, None),
    (500, None, True, None),
    (502, None, True, None),
    (503, "7", True, 7.0),
    (429, "120", True, 120.0),
    (429, "Mon, 02 Mar 2026 02:01:05 GMT", True, 60.0),
    (429, "Mon, 02 Mar 2026 01:00:00 GMT", True, 0.0),  # a date past: at once
    (429, "soon", True, None),  # not a wait: the backoff's
    (408, None, True, None),
    (400, None, False, None),
    (401, None, False, None),
    (404, "5", False, None),
    (410, None, False, None),
    (301, None, False, None),
])
def test_what_an_answer_means(status: int, retry_after: str | None, transient: bool | None,
                              wait: float | None) -> None:
    failure = notify.answer(status, retry_after, now=NOW)
    if transient is None:
        assert failure is None
        return
    assert failure is not None and failure.transient is transient and failure.retry_after == wait
    assert f"HTTP {status}" in failure.why


class Script:
    """Attempts that fail as listed, then succeed; and the waits tenacity asked for."""

    def __init__(self, *failures: Undelivered) -> None:
        self.failures = list(failures)
        self.attempts = 0
        self.waits: list[float] = []

    async def sleep(self, seconds: float) -> None:
        self.waits.append(seconds)

    async def run(self, policy: RetryPolicy) -> str:
        try:
            async for attempt in policy.retrying(sleep=self.sleep):
                with attempt:
                    self.attempts += 1
                    if self.failures:
                        raise self.failures.pop(0)
        except Undelivered as failure:
            return f"gave up: {failure.why}"
        return "sent"


POLICY = RetryPolicy(attempts=5, budget=100.0, initial=2.0, cap=5.0)


def transient(why: str = "HTTP 503", retry_after: float | None = None) -> Undelivered:
    return Undelivered(why, transient=True, retry_after=retry_after)


async def test_a_transient_failure_is_tried_again_after_a_jittered_exponential_wait() -> None:
    script = Script(transient(), transient(), transient())
    assert await script.run(POLICY) == "sent"
    assert script.attempts == 4
    # Full jitter: the n-th wait is anywhere in [0, min(cap, initial * 2**(n-1))].
    assert all(0 <= wait <= bound for wait, bound in zip(script.waits, (2.0, 4.0, 5.0), strict=True))


async def test_retry_after_is_the_wait_when_the_receiver_names_one() -> None:
    script = Script(transient(retry_after=30.0), transient(retry_after=0.0))
    assert await script.run(POLICY) == "sent"
    assert script.waits == [30.0, 0.0]


async def test_the_attempts_are_bounded() -> None:
    script = Script(*[transient("HTTP 500")] * 10)
    assert await script.run(POLICY) == "gave up: HTTP 500"
    assert script.attempts == 5 and len(script.waits) == 4


async def test_a_wait_past_the_budget_gives_up_at_once() -> None:
    script = Script(transient("HTTP 429", retry_after=3600.0))
    assert await script.run(POLICY) == "gave up: HTTP 429"
    assert script.attempts == 1 and script.waits == []


async def test_a_failure_another_attempt_cannot_change_is_not_tried_again() -> None:
    script = Script(Undelivered("HTTP 404", transient=False))
    assert await script.run(POLICY) == "gave up: HTTP 404"
    assert script.attempts == 1


def test_the_default_policy_gives_up_within_bounds() -> None:
    policy = RetryPolicy()
    assert (policy.attempts, policy.budget, policy.initial, policy.cap, policy.timeout) == (8, 600.0, 2.0, 60.0, 10.0)


# --- the queue ----------------------------------------------------------------------------


def delivery(index: int, *, agent: str = "web-01", kind: Kind = Kind.FAILED) -> Delivery:
    return Delivery(NIGHTLY, "uid-nightly", Notification(index, Via.WEBHOOK, "hooks", "url", frozenset(Kind)),
                    notice(kind, agent=agent))


def test_the_outbox_gives_a_lanes_deliveries_in_order_and_drops_the_oldest_when_full() -> None:
    outbox = Outbox(capacity=3)
    started, succeeded = delivery(0, kind=Kind.STARTED), delivery(0, kind=Kind.SUCCEEDED)
    other = delivery(0, agent="web-02")
    assert [outbox.put(each) for each in (started, succeeded, other)] == [None, None, None]
    assert outbox.put(delivery(1)) is started  # the oldest of all goes
    assert len(outbox) == 3
    assert outbox.take(Lane("uid-nightly", 0, "web-01")) is succeeded
    assert outbox.take(Lane("uid-nightly", 0, "web-01")) is None
    assert outbox.take(Lane("uid-nightly", 0, "web-02")) is other
    assert outbox.take(Lane("uid-nightly", 1, "web-01")) is not None
    assert len(outbox) == 0


# --- validation ---------------------------------------------------------------------------


GOOD = {"agent": "web-01", "repository": "offsite", "schedule": "0 2 * * *",
        "template": {"type": "backup", "backup": {"paths": ["/etc"]}}}
AT = "spec.notifications[0]"


@pytest.mark.parametrize(("case", "entries", "expected"), [
    ("every type, defaults", [entry(via.value) for via in Via], []),
    ("a when", [entry("webhook", when=["started", "healthy"])], []),
    ("a dotted key", [entry("slack", key="slack.url")], []),
    ("not a list", {"type": "slack"}, ["spec.notifications: must be a list of at most 10 entries"]),
    ("too many", [entry("slack")] * 11, ["spec.notifications: must be a list of at most 10 entries"]),
    ("not an object", ["slack"], [f"{AT}: must be an object with type and urlSecretRef"]),
    ("an unknown type", [entry("email")], [f"{AT}.type 'email': must be one of webhook, slack, discord, healthchecks"]),
    ("a type that is a list", [{**entry("slack"), "type": ["slack"]}],
     [f"{AT}.type ['slack']: must be one of webhook, slack, discord, healthchecks"]),
    ("no Secret", [{"type": "slack"}],
     [f"{AT}.urlSecretRef: must be an object with the name and key of a Secret that holds the URL"]),
    ("another namespace's Secret", [{"type": "slack", "urlSecretRef": {"name": "team-b/hooks", "key": "url"}}],
     [f"{AT}.urlSecretRef.name 'team-b/hooks': must be the name of a Secret in the Schedule's own namespace "
      "(lowercase letters, digits, '-' and '.'; no namespace part)"]),
    ("a key no Secret can have", [entry("slack", key="a/b")],
     [f"{AT}.urlSecretRef.key 'a/b': must be a key of the Secret (letters, digits, '-', '_' and '.')"]),
    ("an unknown kind", [entry("slack", when=["failed", "finished"])],
     [f"{AT}.when[1] 'finished': must be one of started, succeeded, failed, unhealthy, healthy"]),
    ("an empty when", [entry("slack", when=[])],
     [f"{AT}.when: empty, so nothing would be sent; leave it out for its type's default"]),
])
def test_notifications_are_validated_naming_the_field(case: str, entries: Any, expected: list[str]) -> None:
    assert schedule_problems({**GOOD, "notifications": entries}, schedule_id="team-a/nightly") == expected, case
