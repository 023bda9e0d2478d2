"""The notifier against a real HTTP receiver on loopback: each type's request, retries after
a 503 and a refused connection, giving up (an Event and a count), no retry after a 404, a
slow receiver that holds up nothing else, Secrets read per delivery and only when opted in.
Secrets and Events are fakes (tests/support/operator_fakes.py)."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from restic_manager.operator.controller import Controller
from restic_manager.operator.kube.api import ObjectKey
from restic_manager.operator.kube.cache import Job, Schedule
from restic_manager.operator.kube.client import SecretRead
from restic_manager.operator.notify import NOTIFICATION_OPT_IN, Kind, Notice, Notifier, RetryPolicy
from support.http_server import serving
from support.operator_fakes import FakeEvents, FakeSecrets

NOW = datetime(2026, 3, 2, 2, 0, 5, tzinfo=timezone.utc)
NIGHTLY = ObjectKey("team-a", "nightly")
JOB_UID = "0b3f3c52-7f1e-4d5e-9a43-1c2d3e4f5a6b"
TOKEN = "T000-B000-s3cr3t-t0ken"  # what a path holds; never in an Event
# Quick, so a test waits milliseconds between attempts; the numbers are the default's otherwise.
WAIT = 10.0  # seconds any expectation may take before the test fails
FAST = RetryPolicy(attempts=3, budget=30.0, initial=0.01, cap=0.05, timeout=5.0)


@dataclass
class Hit:
    method: str
    path: str
    query: dict[str, str]
    content_type: str
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Receiver:
    """Records every request; answers each path from its script (then 200), or waits first."""

    url: str = ""
    hits: list[Hit] = field(default_factory=list)
    scripts: dict[str, list[tuple[int, dict[str, str]]]] = field(default_factory=dict)
    always: dict[str, int] = field(default_factory=dict)
    held: dict[str, asyncio.Event] = field(default_factory=dict)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.Response:
        self.hits.append(Hit(request.method, request.path, dict(request.query), request.content_type,
                             await request.read()))
        self.arrived.set()
        if request.path in self.held:
            await self.held[request.path].wait()
        if request.path in self.always:
            return web.Response(status=self.always[request.path])
        script = self.scripts.get(request.path)
        if script:
            status, headers = script.pop(0)
            return web.Response(status=status, headers=headers)
        return web.Response(status=200, text="OK")

    async def hit(self, count: int = 1, *, path: str | None = None) -> list[Hit]:
        """Once ``count`` requests (to ``path``, if given) arrived: those requests."""
        async with asyncio.timeout(WAIT):
            while len(found := [hit for hit in self.hits if path is None or hit.path == path]) < count:
                self.arrived.clear()
                await self.arrived.wait()
        return found


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    made = Receiver()
    async with serving(made.handle) as url:
        made.url = url
        yield made
        for held in made.held.values():
            held.set()  # or the server's shutdown waits for the held requests


@dataclass
class World:
    secrets: FakeSecrets
    events: FakeEvents
    registry: CollectorRegistry
    notifier: Notifier

    def secret(self, name: str, data: dict[str, str], *, opted_in: bool = True) -> None:
        self.secrets.secrets[ObjectKey("team-a", name)] = SecretRead(
            data=data, labels={NOTIFICATION_OPT_IN: "true"} if opted_in else {})

    def count(self, via: str, result: str) -> float:
        value = self.registry.get_sample_value("restic_manager_notifications_total", {"type": via, "result": result})
        assert value is not None
        return value

    async def settled(self, via: str, *, sent: int = 0, failed: int = 0) -> None:
        """Until ``sent`` deliveries of ``via`` were sent and ``failed`` given up on.

        Called once the receiver has the last request: what is left is the answer's way back,
        in this event loop, so yielding to it is all the wait there is."""
        async with asyncio.timeout(WAIT):
            while self.count(via, "sent") < sent or self.count(via, "failed") < failed:
                await asyncio.sleep(0)


def start_world(**options: Any) -> tuple[World, Callable[[], Awaitable[None]]]:
    secrets, events, registry = FakeSecrets(), FakeEvents(), CollectorRegistry()
    notifier = Notifier(secrets, clock=lambda: NOW, registry=registry, events=events, **{"policy": FAST, **options})
    return World(secrets, events, registry, notifier), notifier.run


@pytest.fixture
async def world() -> AsyncIterator[World]:
    made, run = start_world()
    running = asyncio.create_task(run())
    yield made
    running.cancel()
    await asyncio.gather(running, return_exceptions=True)


def schedule(*notifications: dict[str, Any], name: str = "nightly") -> Schedule:
    return Schedule.from_body({
        "metadata": {"name": name, "namespace": "team-a", "uid": f"uid-{name}", "resourceVersion": "1",
                     "creationTimestamp": "2026-03-01T00:00:00Z"},
        "spec": {"agent": "web-01", "repository": "offsite", "schedule": "0 2 * * *",
                 "template": {"type": "backup", "backup": {"paths": ["/etc"]}}, "notifications": list(notifications)}})


def via(kind: str, key: str = "url", *, secret: str = "hooks", when: list[str] | None = None) -> dict[str, Any]:
    made: dict[str, Any] = {"type": kind, "urlSecretRef": {"name": secret, "key": key}}
    if when is not None:
        made["when"] = when
    return made


def notice(kind: Kind = Kind.FAILED, *, agent: str = "web-01", schedule_key: ObjectKey = NIGHTLY) -> Notice:
    phase = {Kind.STARTED: "Running", Kind.SUCCEEDED: "Succeeded"}.get(kind, "Failed")
    return Notice(kind=kind, schedule=schedule_key, agent=agent, job="nightly-web-01-29012345",
                  reason="ResticFailed" if phase == "Failed" else "", message="restic exited with code 1",
                  at=NOW, phase=phase, job_uid=JOB_UID)


async def test_each_type_gets_its_own_payload(world: World, receiver: Receiver) -> None:
    world.secret("hooks", {"webhook": f"{receiver.url}/hook/{TOKEN}", "slack": f"{receiver.url}/slack/{TOKEN}",
                           "discord": f"{receiver.url}/discord/{TOKEN}", "hc": f"{receiver.url}/ping/{TOKEN}"})
    world.notifier.notify(schedule(via("webhook", "webhook"), via("slack", "slack"), via("discord", "discord"),
                                   via("healthchecks", "hc")), notice())
    hits = {hit.path.split("/")[1]: hit for hit in await receiver.hit(4)}
    assert hits["hook"].json() == {
        "event": "failed", "schedule": "nightly", "namespace": "team-a", "agent": "web-01",
        "job": "nightly-web-01-29012345", "phase": "Failed", "reason": "ResticFailed",
        "message": "restic exited with code 1", "time": "2026-03-02T02:00:05Z"}
    assert hits["hook"].content_type == "application/json"
    assert hits["slack"].json() == {"text": "restic-manager: ResticJob team-a/nightly-web-01-29012345 (Schedule "
                                            "team-a/nightly, agent web-01) failed: ResticFailed: restic exited with "
                                            "code 1"}
    assert hits["discord"].json()["content"] == hits["slack"].json()["text"]
    assert hits["discord"].json()["allowed_mentions"] == {"parse": []}
    assert (hits["ping"].method, hits["ping"].path, hits["ping"].query) == ("POST", f"/ping/{TOKEN}/fail",
                                                                            {"rid": JOB_UID})
    assert hits["ping"].body.decode() == hits["slack"].json()["text"]
    for kind in ("webhook", "slack", "discord", "healthchecks"):
        await world.settled(kind, sent=1)
    assert world.events.recorded == []


async def test_healthchecks_ping_start_then_success_and_an_agents_own_url(world: World, receiver: Receiver) -> None:
    world.secret("hc", {"url": f"{receiver.url}/fleet", "web-02": f"{receiver.url}/web-02"})
    fleet = schedule(via("healthchecks", secret="hc"))
    for agent in ("web-01", "web-02"):
        world.notifier.notify(fleet, notice(Kind.STARTED, agent=agent))
        world.notifier.notify(fleet, notice(Kind.SUCCEEDED, agent=agent))
    await receiver.hit(4)
    assert [hit.path for hit in receiver.hits if hit.path.startswith("/fleet")] == ["/fleet/start", "/fleet"]
    assert [hit.path for hit in receiver.hits if hit.path.startswith("/web-02")] == ["/web-02/start", "/web-02"]


async def test_a_503_is_tried_again_and_then_delivered(world: World, receiver: Receiver) -> None:
    world.secret("hooks", {"url": f"{receiver.url}/hook"})
    receiver.scripts["/hook"] = [(503, {}), (429, {"Retry-After": "0"})]
    world.notifier.notify(schedule(via("webhook")), notice())
    await receiver.hit(3)
    await world.settled("webhook", sent=1)
    assert world.count("webhook", "failed") == 0 and world.events.recorded == []
    assert world.secrets.reads == 3  # read at every attempt


async def test_repeated_500s_give_up_with_an_event_and_a_count(world: World, receiver: Receiver) -> None:
    world.secret("alerts", {"slack-url": f"{receiver.url}/slack/{TOKEN}"})
    receiver.always[f"/slack/{TOKEN}"] = 500
    world.notifier.notify(schedule(via("slack", "slack-url", secret="alerts")), notice())
    [event] = await asyncio.wait_for(world.events.wait(), WAIT)
    assert len(receiver.hits) == FAST.attempts
    assert event["about"] == {"apiVersion": "resticmanager.io/v1alpha1", "kind": "Schedule", "name": "nightly",
                              "namespace": "team-a", "uid": "uid-nightly"}
    assert (event["type"], event["reason"]) == ("Warning", "NotificationFailed")
    assert event["message"] == ("spec.notifications[0] (slack, Secret alerts key slack-url): a failed notice was "
                                "not sent: the receiver answered HTTP 500 (3 attempts)")
    assert world.count("slack", "failed") == 1 and world.count("slack", "sent") == 0


async def test_a_404_is_not_tried_again(world: World, receiver: Receiver) -> None:
    world.secret("hooks", {"url": f"{receiver.url}/gone"})
    receiver.always["/gone"] = 404
    world.notifier.notify(schedule(via("discord")), notice())
    [event] = await asyncio.wait_for(world.events.wait(), WAIT)
    assert len(receiver.hits) == 1
    assert event["message"].endswith("the receiver answered HTTP 404 (1 attempt)")


async def test_a_refused_connection_is_tried_again_and_told_without_the_url(world: World) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    world.secret("hooks", {"url": f"http://127.0.0.1:{port}/hook/{TOKEN}"})
    world.notifier.notify(schedule(via("webhook")), notice())
    [event] = await asyncio.wait_for(world.events.wait(), WAIT)
    assert "no connection to the receiver" in event["message"] and "(3 attempts)" in event["message"]
    assert TOKEN not in event["message"] and str(port) not in event["message"]


async def test_a_slow_receiver_holds_up_neither_notify_nor_other_destinations(world: World,
                                                                             receiver: Receiver) -> None:
    world.secret("hooks", {"slow": f"{receiver.url}/slow", "fast": f"{receiver.url}/fast"})
    receiver.held["/slow"] = release = asyncio.Event()
    world.notifier.notify(schedule(via("webhook", "slow")), notice())
    await receiver.hit(path="/slow")  # the slow receiver has the request, and does not answer
    for _ in range(5):  # notify() only queues: it returns with the receiver still holding the first
        world.notifier.notify(schedule(via("webhook", "fast"), name="hourly"), notice(schedule_key=ObjectKey(
            "team-a", "hourly")))
    await receiver.hit(5, path="/fast")
    await world.settled("webhook", sent=5)
    assert not release.is_set() and len(receiver.hits) == 6
    release.set()
    await world.settled("webhook", sent=6)


async def test_a_secret_without_the_label_is_never_sent_to(world: World, receiver: Receiver) -> None:
    world.secret("hooks", {"url": f"{receiver.url}/hook/{TOKEN}"}, opted_in=False)
    world.notifier.notify(schedule(via("webhook")), notice())
    [event] = await asyncio.wait_for(world.events.wait(), WAIT)
    assert receiver.hits == []
    assert event["message"] == (
        f"spec.notifications[0] (webhook, Secret hooks key url): a failed notice was not sent: Secret hooks is not "
        f"labelled {NOTIFICATION_OPT_IN}=true, and only Secrets so labelled are used for notifications (kubectl "
        f"label secret hooks {NOTIFICATION_OPT_IN}=true, by someone who may change the Secret) (1 attempt)")
    assert world.count("webhook", "failed") == 1


async def test_a_missing_secret_is_named_in_the_event(world: World) -> None:
    world.notifier.notify(schedule(via("healthchecks", secret="nowhere")), notice())
    [event] = await asyncio.wait_for(world.events.wait(), WAIT)
    assert "Secret nowhere does not exist" in event["message"]


async def test_a_rotated_url_reaches_the_next_delivery(world: World, receiver: Receiver) -> None:
    world.secret("hooks", {"url": f"{receiver.url}/old"})
    nightly = schedule(via("webhook"))
    world.notifier.notify(nightly, notice())
    await receiver.hit(path="/old")
    world.secret("hooks", {"url": f"{receiver.url}/new"})
    world.notifier.notify(nightly, notice())
    await receiver.hit(path="/new")


async def test_a_full_queue_drops_the_oldest_and_counts_it() -> None:
    world, _ = start_world(capacity=2)  # not running: nothing leaves the queue
    world.secret("hooks", {"url": "http://127.0.0.1:9/hook"})
    for _ in range(3):
        world.notifier.notify(schedule(via("webhook")), notice())
    assert world.count("webhook", "dropped") == 1


async def test_a_schedules_jobs_reach_its_notifications() -> None:
    """The controller's wiring: a fired job sent to its agent is started, its end failed."""
    controller = Controller(kube=FakeSecrets(), namespaces=None, clock=lambda: NOW)  # type: ignore[arg-type]
    told: list[tuple[str, Notice]] = []

    def notify(schedule: Schedule, notice: Notice) -> None:
        told.append((schedule.key.name, notice))

    controller.notifier.notify = notify  # type: ignore[method-assign]
    nightly = schedule(via("healthchecks"))
    controller.observe("schedules", "ADDED", {
        "metadata": {"name": "nightly", "namespace": "team-a", "uid": "uid-nightly", "resourceVersion": "1",
                     "creationTimestamp": "2026-03-01T00:00:00Z"}, "spec": dict(nightly.spec)})
    job = Job.from_body({"metadata": {"name": "nightly-web-01-29012345", "namespace": "team-a", "uid": JOB_UID,
                                      "resourceVersion": "1"},
                         "spec": {"agent": "web-01", "repository": "offsite", "type": "backup",
                                  "scheduleRef": {"name": "nightly", "uid": "uid-nightly"}}})
    controller.history.phase_changed(job, {"phase": "Running", "message": "sent to agent web-01"})
    controller.history.phase_changed(job, {"phase": "Failed", "reason": "ResticFailed", "message": "exit 1"})
    assert [(name, told.kind, told.job, told.agent) for name, told in told] == [
        ("nightly", Kind.STARTED, "nightly-web-01-29012345", "web-01"),
        ("nightly", Kind.FAILED, "nightly-web-01-29012345", "web-01")]
