"""Notifications of a Schedule's jobs and health, sent by the operator (docs/notifications.md).

A Schedule's ``spec.notifications`` lists where to report: a generic JSON webhook, a Slack- or
Discord-compatible incoming webhook, or healthchecks.io-style pings (``/start``, the URL
itself, ``/fail``), each with the kinds of :class:`Notice` it takes (``when``; its type's
:data:`DEFAULT_WHEN` if left out). The URL is in a Secret of the Schedule's namespace
(``urlSecretRef``), read at every attempt and never kept, so a rotated URL reaches the next
delivery; the Secret must carry :data:`NOTIFICATION_OPT_IN` (the repository Secrets' rule,
:func:`~restic_manager.operator.kube.client.opt_in_refusal`, with a label of its own). A
healthchecks Secret that also holds a key named after the agent pings that URL for that
agent's jobs: a per-host dead-man's switch on a fleet Schedule.

The decisions are functions without I/O: which notifications a notice goes to
(:func:`routes`), the notice of a job's new phase (:func:`job_notice`), the URL from a Secret
(:func:`destination`), the request (:func:`request_for`), what an answer means
(:func:`answer`, :func:`retry_after`, :func:`failure_of`) and when to try again
(:class:`RetryPolicy`, whose attempts, waits and stop are tenacity's); :class:`Outbox` is
the queue's bookkeeping. :class:`Notifier` is the shell: :meth:`Notifier.notify` only
queues, :meth:`Notifier.run` delivers with aiohttp, one delivery at a time per destination
(a healthchecks start ping is never overtaken by its success ping), many destinations side
by side. A delivery that finally fails is counted, logged and recorded as a Warning Event
``NotificationFailed`` on the Schedule (events.py aggregates repeats). No URL is ever logged,
posted or written: they carry tokens. Messages name the Secret and key instead.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import logging
import os
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from email.utils import parsedate_to_datetime
from typing import Any, NamedTuple, Protocol

import aiohttp
from prometheus_client import CollectorRegistry, Counter
from tenacity import (
    AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt, stop_before_delay,
    wait_random_exponential,
)
from tenacity.wait import wait_base
from yarl import URL

from restic_manager.operator.kits.coalesce import CoalescingLoop
from restic_manager.operator.kube.api import ObjectKey, format_time, parse_time
from restic_manager.operator.kube.cache import Job, Schedule
from restic_manager.operator.kube.client import KubeError, NotFound, SecretRead, opt_in_refusal
from restic_manager.operator.kube.events import involved
from restic_manager.operator.status import rendering as statuses

log = logging.getLogger(__name__)

# The label by which a Secret agrees to have its URL used by notifications. Not the
# repository label: a Secret handed to agents as restic's credentials has not agreed to
# become a URL the operator sends requests to, nor the other way round (docs/security.md).
NOTIFICATION_OPT_IN = "resticmanager.io/notification-secret"
MAX_NOTIFICATIONS = 10  # per Schedule, as the CRD's maxItems
QUEUE_CAPACITY = 1000   # deliveries waiting; beyond it the oldest is dropped
CONCURRENCY = 32        # destinations delivered to side by side
TEXT_LIMITS = {"slack": 3000, "discord": 2000, "healthchecks": 1000}  # characters of a message's text
REASON = "NotificationFailed"  # the Warning Event's reason


class Kind(enum.StrEnum):
    """What a notice says."""

    STARTED = "started"      # a job of the Schedule was sent to its agent (phase Running)
    SUCCEEDED = "succeeded"  # it ended Succeeded
    FAILED = "failed"        # it ended Failed or Cancelled
    UNHEALTHY = "unhealthy"  # the Schedule became unhealthy on an agent
    HEALTHY = "healthy"      # and healthy again


class Via(enum.StrEnum):
    """A notification's ``type``: the receiver's kind."""

    WEBHOOK = "webhook"
    SLACK = "slack"
    DISCORD = "discord"
    HEALTHCHECKS = "healthchecks"


DEFAULT_WHEN: Mapping[Via, frozenset[Kind]] = {
    Via.WEBHOOK: frozenset({Kind.FAILED, Kind.UNHEALTHY, Kind.HEALTHY}),
    Via.SLACK: frozenset({Kind.FAILED, Kind.UNHEALTHY, Kind.HEALTHY}),
    Via.DISCORD: frozenset({Kind.FAILED, Kind.UNHEALTHY, Kind.HEALTHY}),
    Via.HEALTHCHECKS: frozenset({Kind.STARTED, Kind.SUCCEEDED, Kind.FAILED}),
}
# The path a healthchecks ping of each kind goes to, after the check's URL.
PING_SUFFIX = {Kind.STARTED: "/start", Kind.SUCCEEDED: "", Kind.HEALTHY: "", Kind.FAILED: "/fail",
               Kind.UNHEALTHY: "/fail"}


@dataclass(frozen=True)
class Notice:
    """Something a Schedule's notifications may be told."""

    kind: Kind
    schedule: ObjectKey
    agent: str | None
    job: str | None     # the ResticJob's name (in the Schedule's namespace)
    reason: str
    message: str
    at: datetime
    phase: str = ""     # the job's phase, when it is about a job
    job_uid: str | None = None  # the run id of healthchecks pings (start and end paired per job)


@dataclass(frozen=True)
class Notification:
    """One entry of ``spec.notifications``, its ``when`` defaulted."""

    index: int
    via: Via
    secret: str
    key: str
    when: frozenset[Kind]

    def describe(self, key: str | None = None) -> str:
        """How messages name it: its place, type, Secret and key, never its URL."""
        return (f"spec.notifications[{self.index}] ({self.via.value}, Secret {self.secret} "
                f"key {key or self.key})")


# --- which notifications, and what a job's phase says ------------------------------------


def notifications_of(spec: Mapping[str, Any]) -> list[Notification]:
    """The Schedule's notifications; an entry validation.py would refuse is left out."""
    entries = spec.get("notifications")
    found: list[Notification] = []
    if not isinstance(entries, Sequence) or isinstance(entries, str):
        return found
    for index, entry in enumerate(entries[:MAX_NOTIFICATIONS]):
        if not isinstance(entry, Mapping):
            continue
        ref = entry.get("urlSecretRef")
        try:
            via = Via(str(entry.get("type")))
            when = entry.get("when")
            kinds = DEFAULT_WHEN[via] if when is None else frozenset(Kind(kind) for kind in when)
        except (ValueError, TypeError):
            continue
        if not isinstance(ref, Mapping) or not isinstance(ref.get("name"), str) or not isinstance(ref.get("key"), str):
            continue
        found.append(Notification(index, via, ref["name"], ref["key"], kinds))
    return found


def routes(spec: Mapping[str, Any], notice: Notice) -> list[Notification]:
    """The notifications of a Schedule with ``spec`` that take ``notice``."""
    return [notification for notification in notifications_of(spec) if notice.kind in notification.when]


def job_notice(job: Job, status: Mapping[str, Any], *, at: datetime) -> Notice | None:
    """What a job of a Schedule whose phase just became ``status``'s tells its notifications.

    Running is ``started``: the operator sent the job to its agent (restic starts moments
    later, and an agent that refuses the job ends it Failed, which pings ``/fail``). Failed
    and Cancelled are ``failed``: the run the Schedule asked for did not complete (the phase
    in the notice tells them apart). Pending says nothing.
    """
    if job.schedule_key is None:
        return None
    phase = statuses.phase_of(status)
    kind = {"Running": Kind.STARTED, "Succeeded": Kind.SUCCEEDED, "Failed": Kind.FAILED,
            "Cancelled": Kind.FAILED}.get(phase)
    if kind is None:
        return None
    return Notice(kind=kind, schedule=job.schedule_key, agent=job.agent, job=job.key.name,
                  reason=str(status.get("reason") or ""), message=str(status.get("message") or ""),
                  at=parse_time(status.get("completionTime")) or at, phase=phase, job_uid=job.uid)


def health_notice(schedule: ObjectKey, *, agent: str | None, healthy: bool, reason: str, message: str,
                  at: datetime) -> Notice:
    """The notice of a Schedule that became unhealthy on ``agent`` (None: everywhere), or healthy again."""
    return Notice(kind=Kind.HEALTHY if healthy else Kind.UNHEALTHY, schedule=schedule, agent=agent, job=None,
                  reason=reason, message=message, at=at)


# --- the URL and the request ---------------------------------------------------------------


class Undelivered(Exception):
    """An attempt that did not deliver: why (never the URL), and whether another may.

    ``retry_after``: the wait the receiver asked for (Retry-After), when it did.
    """

    def __init__(self, why: str, *, transient: bool, retry_after: float | None = None) -> None:
        super().__init__(why)
        self.why = why
        self.transient = transient
        self.retry_after = retry_after


def destination(notification: Notification, secret: SecretRead, *, agent: str | None) -> tuple[URL, str]:
    """The URL to send to, and the key it came from.

    A healthchecks notification uses the key named after the notice's agent when the Secret
    has one. Raises :class:`Undelivered` (not transient: the Secret must change first).
    """
    # The repository Secrets' rule (dispatch.py), with a label of its own: a tenant who may
    # create Schedules but not read Secrets cannot have a Secret's value sent anywhere.
    refusal = opt_in_refusal(notification.secret, secret, label=NOTIFICATION_OPT_IN, use="used for notifications")
    if refusal is not None:
        raise Undelivered(refusal, transient=False)
    key = notification.key
    if notification.via is Via.HEALTHCHECKS and agent is not None and agent in secret.data:
        key = agent
    if key not in secret.data:
        raise Undelivered(f"Secret {notification.secret} has no key {key!r}", transient=False)
    try:
        url = URL(secret.data[key].strip())
    except ValueError:
        url = None
    if url is None or url.scheme not in ("http", "https") or not url.host:
        raise Undelivered(f"Secret {notification.secret} key {key!r} does not hold an http or https URL",
                          transient=False)
    return url, key


class Request(NamedTuple):
    method: str
    url: URL
    json: Mapping[str, Any] | None = None
    text: str | None = None


def request_for(via: Via, url: URL, notice: Notice) -> Request:
    """The request that tells ``url``, a receiver of type ``via``, about ``notice``."""
    if via is Via.WEBHOOK:
        return Request("POST", url, json=webhook_payload(notice))
    if via is Via.SLACK:
        text = summary(notice).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
        return Request("POST", url, json={"text": _clip(text, TEXT_LIMITS["slack"])})
    if via is Via.DISCORD:
        # No mention in a job's message (say "@everyone") pings anyone.
        return Request("POST", url, json={"content": _clip(summary(notice), TEXT_LIMITS["discord"]),
                                          "allowed_mentions": {"parse": []}})
    ping = url.with_path(url.raw_path.rstrip("/") + PING_SUFFIX[notice.kind], encoded=True).with_query(url.query)
    if notice.job_uid is not None and _is_uuid(notice.job_uid):
        ping = ping.update_query(rid=notice.job_uid)  # pairs a job's start and end pings
    return Request("POST", ping, text=_clip(summary(notice), TEXT_LIMITS["healthchecks"]))


def webhook_payload(notice: Notice) -> dict[str, Any]:
    """The generic webhook's JSON body (docs/notifications.md lists its fields)."""
    return {"event": notice.kind.value, "schedule": notice.schedule.name, "namespace": notice.schedule.namespace,
            "agent": notice.agent, "job": notice.job, "phase": notice.phase or None, "reason": notice.reason,
            "message": notice.message, "time": format_time(notice.at)}


def summary(notice: Notice) -> str:
    """One line for people (Slack, Discord, a ping's body)."""
    namespace = notice.schedule.namespace
    subject = f"ResticJob {namespace}/{notice.job}" if notice.job else f"Schedule {notice.schedule}"
    context = [f"Schedule {notice.schedule}"] if notice.job else []
    context += [f"agent {notice.agent}"] if notice.agent else []
    verb = {Kind.STARTED: "started", Kind.SUCCEEDED: "succeeded",
            Kind.FAILED: "was cancelled" if notice.phase == "Cancelled" else "failed",
            Kind.UNHEALTHY: "is unhealthy", Kind.HEALTHY: "is healthy again"}[notice.kind]
    detail = "" if notice.kind is Kind.STARTED else ": ".join(part for part in (notice.reason, notice.message) if part)
    where = f" ({', '.join(context)})" if context else ""
    return f"restic-manager: {subject}{where} {verb}" + (f": {detail}" if detail else "")


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _is_uuid(text: str) -> bool:
    try:
        uuid.UUID(text)
    except ValueError:
        return False
    return True


# --- what an answer means, and when to try again -------------------------------------------


def retry_after(value: str | None, *, now: datetime) -> float | None:
    """Seconds a Retry-After header asks to wait (delta-seconds or an HTTP date), or None."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, (when - now).total_seconds())


def answer(status: int, retry_after_header: str | None, *, now: datetime) -> Undelivered | None:
    """None for a 2xx; else why not, and whether to try again: after 408, 429 and any 5xx
    (429 and 503 as long as Retry-After asks); never after a redirect (none is followed) or
    another 4xx, which the receiver will answer the same way."""
    if 200 <= status < 300:
        return None
    why = f"the receiver answered HTTP {status}"
    if status in (408, 429) or status >= 500:
        return Undelivered(why, transient=True, retry_after=retry_after(retry_after_header, now=now))
    if 300 <= status < 400:
        return Undelivered(f"{why} (a redirect; notifications follow none)", transient=False)
    return Undelivered(why, transient=False)


def failure_of(error: Exception) -> Undelivered:
    """A request that raised, in words without the URL (aiohttp's messages may hold it);
    anything but a client or network error is raised again."""
    if isinstance(error, TimeoutError):
        return Undelivered("the receiver did not answer in time", transient=True)
    if isinstance(error, aiohttp.ClientConnectorError):
        # By errno: the OS error's own text may name the address ("Connect call failed (host, port)").
        cause = error.os_error
        said = os.strerror(cause.errno) if cause.errno else type(cause).__name__
        return Undelivered(f"no connection to the receiver ({said})", transient=True)
    if isinstance(error, aiohttp.InvalidURL):
        return Undelivered("the URL is not one aiohttp can send to", transient=False)
    if isinstance(error, aiohttp.ClientError | OSError):
        return Undelivered(f"the request failed ({type(error).__name__})", transient=True)
    raise error


class _WaitRetryAfter(wait_base):
    """What the receiver asked for (Retry-After) if it did, else ``fallback``'s backoff."""

    def __init__(self, fallback: wait_base) -> None:
        self._fallback = fallback

    def __call__(self, retry_state: RetryCallState) -> float:
        outcome = retry_state.outcome
        error = outcome.exception() if outcome is not None else None
        if isinstance(error, Undelivered) and error.retry_after is not None:
            return error.retry_after
        return float(self._fallback(retry_state))


@dataclass(frozen=True)
class RetryPolicy:
    """How a delivery is tried: at most ``attempts`` times, each within ``timeout``, and not
    beyond ``budget`` seconds after the first; between them an exponential backoff with full
    jitter (a uniform wait in [0, min(cap, initial * 2**n)]) or the receiver's Retry-After.
    Only transient failures (:class:`Undelivered`) are tried again.

    tenacity counts the attempts, draws the waits and stops; the wait Retry-After asks for is
    :class:`_WaitRetryAfter`'s, a Retry-After beyond the budget stops at once.
    """

    attempts: int = 8
    budget: float = 600.0
    initial: float = 2.0
    cap: float = 60.0
    timeout: float = 10.0

    def retrying(self, *, before_sleep: Callable[[RetryCallState], None] | None = None,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> AsyncRetrying:
        return AsyncRetrying(
            stop=stop_after_attempt(self.attempts) | stop_before_delay(self.budget),
            wait=_WaitRetryAfter(wait_random_exponential(multiplier=self.initial, max=self.cap)),
            retry=retry_if_exception(lambda error: isinstance(error, Undelivered) and error.transient),
            before_sleep=before_sleep, sleep=sleep, reraise=True)


# --- the queue ---------------------------------------------------------------------------


class Lane(NamedTuple):
    """A destination: its deliveries go one at a time, in order."""

    schedule_uid: str
    place: int  # in spec.notifications
    agent: str | None


@dataclass(frozen=True)
class Delivery:
    schedule: ObjectKey
    schedule_uid: str
    notification: Notification
    notice: Notice

    @property
    def lane(self) -> Lane:
        return Lane(self.schedule_uid, self.notification.index, self.notice.agent)


class Outbox:
    """Deliveries waiting, oldest first, at most ``capacity``: a new one beyond it drops the
    oldest. Taken per lane, in the order they came."""

    def __init__(self, capacity: int = QUEUE_CAPACITY) -> None:
        self._capacity = capacity
        self._waiting: collections.OrderedDict[int, Delivery] = collections.OrderedDict()
        self._lanes: dict[Lane, collections.deque[int]] = {}
        self._seq = 0

    def put(self, delivery: Delivery) -> Delivery | None:
        """Queue ``delivery``; the one dropped to make room, if any."""
        self._seq += 1
        self._waiting[self._seq] = delivery
        self._lanes.setdefault(delivery.lane, collections.deque()).append(self._seq)
        if len(self._waiting) <= self._capacity:
            return None
        _, dropped = self._waiting.popitem(last=False)
        return dropped

    def take(self, lane: Lane) -> Delivery | None:
        """The oldest delivery of ``lane`` still waiting, or None."""
        queued = self._lanes.get(lane)
        while queued:
            delivery = self._waiting.pop(queued.popleft(), None)
            if delivery is not None:
                if not queued:
                    del self._lanes[lane]
                return delivery
        self._lanes.pop(lane, None)
        return None

    def __len__(self) -> int:
        return len(self._waiting)


# --- the shell ---------------------------------------------------------------------------


class SecretReader(Protocol):
    """What the notifier needs of :class:`~restic_manager.operator.kube.client.Kube`."""

    async def read_secret(self, key: ObjectKey) -> SecretRead: ...


class EventSink(Protocol):
    """What the notifier needs of :class:`~restic_manager.operator.kube.events.Recorder`."""

    def record(self, about: Mapping[str, str], *, type: str, reason: str, message: str) -> None: ...


class Notifier:
    """Queues notices (:meth:`notify`) and delivers them (:meth:`run`)."""

    def __init__(self, kube: SecretReader, *, clock: Callable[[], datetime], registry: CollectorRegistry,
                 events: EventSink, policy: RetryPolicy = RetryPolicy(), capacity: int = QUEUE_CAPACITY,
                 concurrency: int = CONCURRENCY) -> None:
        self._kube = kube
        self._events = events
        self._clock = clock
        self._policy = policy
        self._outbox = Outbox(capacity)
        self._loop: CoalescingLoop[Lane] = CoalescingLoop("notifications", self._drain, concurrency=concurrency)
        self._http: aiohttp.ClientSession | None = None
        self.deliveries = Counter(
            "restic_manager_notifications",
            "Notifications by type and result: sent, failed (given up on) or dropped (the queue was full).",
            ["type", "result"], registry=registry)
        for via in Via:
            for result in ("sent", "failed", "dropped"):
                self.deliveries.labels(via.value, result)

    def notify(self, schedule: Schedule, notice: Notice) -> None:
        """Queue ``notice`` for every notification of ``schedule`` that takes it; never waits."""
        for notification in routes(schedule.spec, notice):
            delivery = Delivery(schedule.key, schedule.uid, notification, notice)
            dropped = self._outbox.put(delivery)
            if dropped is not None:
                self.deliveries.labels(dropped.notification.via.value, "dropped").inc()
                log.warning("Schedule %s: %s: the %s notice of %s dropped, %d notices are waiting already",
                            dropped.schedule, dropped.notification.describe(), dropped.notice.kind.value,
                            dropped.notice.job or dropped.notice.agent or "the Schedule", len(self._outbox))
            self._loop.mark(delivery.lane)

    async def run(self) -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self._policy.timeout),
                                         headers={"User-Agent": "restic-manager"}, trust_env=True) as http:
            self._http = http
            try:
                await self._loop.run()
            finally:
                self._http = None

    async def _drain(self, lane: Lane) -> None:
        while (delivery := self._outbox.take(lane)) is not None:
            await self._deliver(delivery)

    async def _deliver(self, delivery: Delivery) -> None:
        notification, attempts = delivery.notification, 0
        used = [notification.key]  # the key the last attempt took its URL from

        def before_sleep(state: RetryCallState) -> None:
            error = state.outcome.exception() if state.outcome is not None else None
            log.info("Schedule %s: %s: %s; trying again in %.1f s", delivery.schedule,
                     notification.describe(used[0]), error, state.upcoming_sleep)

        try:
            async for attempt in self._policy.retrying(before_sleep=before_sleep):
                with attempt:
                    attempts = attempt.retry_state.attempt_number
                    await self._attempt(delivery, used)
        except Undelivered as failure:
            self.deliveries.labels(notification.via.value, "failed").inc()
            about = delivery.notice.job or delivery.notice.agent or "the Schedule"
            what = (f"{notification.describe(used[0])}: a {delivery.notice.kind.value} notice was not sent: "
                    f"{failure.why} ({attempts} attempt{'s' if attempts != 1 else ''})")
            log.warning("Schedule %s: %s (about %s)", delivery.schedule, what, about)
            # Without the job's name: the same failure again is one Event with a count.
            self._events.record(involved("Schedule", delivery.schedule, delivery.schedule_uid), type="Warning",
                                reason=REASON, message=what)
        else:
            self.deliveries.labels(notification.via.value, "sent").inc()

    async def _attempt(self, delivery: Delivery, used: list[str]) -> None:
        assert self._http is not None, "run() opens the HTTP session"
        notification, notice = delivery.notification, delivery.notice
        try:
            secret = await self._kube.read_secret(ObjectKey(delivery.schedule.namespace, notification.secret))
        except NotFound:
            raise Undelivered(f"Secret {notification.secret} does not exist", transient=False) from None
        except KubeError as error:
            raise Undelivered(f"Secret {notification.secret} could not be read: {error}", transient=True) from None
        url, used[0] = destination(notification, secret, agent=notice.agent)
        request = request_for(notification.via, url, notice)
        try:
            async with self._http.request(request.method, request.url, json=request.json, data=request.text,
                                          allow_redirects=False) as response:
                failure = answer(response.status, response.headers.get("Retry-After"), now=self._clock())
        except Exception as error:
            raise failure_of(error) from None  # from None: the cause's message may hold the URL
        if failure is not None:
            raise failure
