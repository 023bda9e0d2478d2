"""Fakes of the operator's collaborators shared by its unit tests."""

from __future__ import annotations

import asyncio
import copy
import json
import threading
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

from restic_manager import protocol
from restic_manager.operator.kube.api import ObjectKey
from restic_manager.operator.kube.client import AlreadyExists, FinalizersSeen, KubeError, NotFound, SecretRead


class FakeSession:
    """An agent's session as the operator sees it (its hello says it runs ``running``);
    records what is sent to the agent, and sets ``arrived`` when something is."""

    def __init__(self, agent: ObjectKey = ObjectKey("ns", "web-01"), *, running: list[str] | None = None) -> None:
        self.agent = agent
        self.hello = protocol.Hello(agent=agent.name, agent_version="1", restic_version="0.19.1", protocol_version=1,
                                    running_jobs=running or [])
        self.dispatched: set[str] = set()
        self.pushed: tuple[protocol.ScheduleEntry, ...] | None = None
        self.open = True
        self.sent: list[protocol.Payload] = []
        self.arrived = asyncio.Event()
        self.peer = "192.0.2.10:40000"
        self.replaced = ""

    async def send(self, payload: protocol.Payload) -> bool:
        self.sent.append(payload)
        self.arrived.set()
        return self.open

    def log_refusal(self, message: str, *args: object) -> None:
        pass


def connect(controller: Any, agent: ObjectKey, *, acked: bool = True) -> FakeSession:
    """A session of ``agent`` registered with ``controller`` (a Controller) that, like a real
    agent's first frames, has acknowledged every Schedule targeting it at its generation."""
    session = FakeSession(agent)
    controller.server.sessions[agent] = session
    if acked:
        applied = [protocol.AppliedEntry(id=schedule.id, generation=schedule.generation)
                   for schedule in controller.index.schedules_of(agent)]
        ack = protocol.ScheduleAck(version=1, applied_at=datetime.now(timezone.utc), applied=applied)
        controller.schedules.acked(agent, ack)
        controller.fleet.acked(session, ack.version)
    return session


class FakeSecrets:
    """Secrets by key, as :meth:`Kube.read_secret` returns them; counts the reads."""

    def __init__(self) -> None:
        self.secrets: dict[ObjectKey, SecretRead] = {}
        self.reads = 0

    async def read_secret(self, key: ObjectKey) -> SecretRead:
        self.reads += 1
        if key not in self.secrets:
            raise NotFound(f"get Secret {key}: 404")
        return self.secrets[key]


class FakeEvents:
    """An Event recorder that keeps what it is given and lets a test await the next one."""

    def __init__(self) -> None:
        self.recorded: list[dict[str, Any]] = []
        self._arrived = asyncio.Event()

    def record(self, about: Mapping[str, str], *, type: str, reason: str, message: str) -> None:
        self.recorded.append({"about": dict(about), "type": type, "reason": reason, "message": message})
        self._arrived.set()

    async def wait(self, count: int = 1) -> list[dict[str, Any]]:
        """Once ``count`` Events were recorded: all of them."""
        while len(self.recorded) < count:
            self._arrived.clear()
            await self._arrived.wait()
        return self.recorded


class FakeKube(FakeSecrets):
    """The API as :class:`Kube` presents it to the operator, in memory: what was created,
    patched, deleted and posted, for tests to look at.

    ``objects`` answers gets (a test puts Repositories there; created objects land there
    too); ``answer`` cleared holds every create, ``answer_gets`` every get; ``fail_creates``
    and ``fail_gets`` make them fail as if the apiserver did not answer.
    Thread-safe where a test reads it from another thread than the operator's loop.
    """

    def __init__(self) -> None:
        super().__init__()
        self.objects: dict[tuple[str, ObjectKey], dict[str, Any]] = {}
        self.created: list[dict[str, Any]] = []
        self.sent: list[str] = []  # names of the creates that reached the API, answered or not
        self.answer = asyncio.Event()
        self.answer.set()
        self.answer_gets = asyncio.Event()
        self.answer_gets.set()
        self.fail_creates = False
        self.fail_gets = False
        self.patches: list[tuple[str, ObjectKey, dict[str, Any]]] = []
        self.refuse_patches = False
        self.deleted: list[tuple[str, ObjectKey]] = []
        self.finalizers: list[tuple[ObjectKey, bool, FinalizersSeen | None]] = []
        self.gets: list[ObjectKey] = []
        self.events: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._version = 100

    def jobs(self) -> int:
        with self._lock:
            return len(self.created)

    async def create(self, plural: str, body: dict[str, Any]) -> dict[str, Any]:
        self.sent.append(body["metadata"]["name"])
        await self.answer.wait()
        if self.fail_creates:
            raise KubeError(f"create {plural}: timed out", status=504)
        with self._lock:
            if any(c["metadata"]["name"] == body["metadata"]["name"] for c in self.created):
                raise AlreadyExists(f"create {plural}: 409 AlreadyExists")
            self._version += 1
            made = copy.deepcopy(body)
            made["metadata"].update(uid=f"uid-{body['metadata']['name']}", resourceVersion=str(self._version),
                                    creationTimestamp="2026-03-02T02:00:06Z")
            self.created.append(made)
            self.objects[plural, ObjectKey(made["metadata"].get("namespace", ""), made["metadata"]["name"])] = made
            return made

    async def get(self, plural: str, key: ObjectKey) -> dict[str, Any]:
        self.gets.append(key)
        await self.answer_gets.wait()
        if self.fail_gets:
            raise KubeError(f"get {plural} {key}: 503", status=503)
        with self._lock:
            if (plural, key) in self.objects:
                return self.objects[plural, key]
            # A test may put an object into ``created`` as if another writer had made it.
            made = next((c for c in self.created if c["metadata"]["name"] == key.name), None)
        if made is None:
            raise NotFound(f"get {plural} {key}: 404 NotFound")
        return made

    async def get_secret(self, key: ObjectKey) -> dict[str, Any]:
        return await self.get("secrets", key)

    async def delete(self, plural: str, key: ObjectKey) -> None:
        self.deleted.append((plural, key))

    async def patch_status(self, plural: str, key: ObjectKey, patch: dict[str, Any], *, uid: str) -> dict[str, Any]:
        if self.refuse_patches:
            raise KubeError(f"patch {plural} {key}: 503", status=503)
        json.dumps(patch, allow_nan=False)  # what the real API would refuse to store fails here too
        self.patches.append((plural, key, patch))
        return {}

    async def set_finalizer(self, plural: str, key: ObjectKey, finalizer: str, *, present: bool,
                            seen: FinalizersSeen | None = None) -> None:
        self.finalizers.append((key, present, seen))

    async def post_event(self, involved: dict[str, Any], **event: Any) -> None:
        if event.get("name") and any(e.get("name") == event["name"] for e in self.events):
            raise AlreadyExists("create events: 409 AlreadyExists")
        self.events.append({"involved": involved, **event})

    async def bump_event(self, key: ObjectKey, *, count: int, now: datetime) -> None:
        event = next(e for e in self.events if e.get("name") == key.name)
        event.update(count=count, now=now)

    async def token_review(self, token: str, *, audiences: list[str]) -> dict[str, Any]:
        return {"authenticated": False}


def complete_view(controller: Any, *objects: tuple[str, dict[str, Any]]) -> None:
    """What kopf does at an operator's start: every object of every kind (``(plural, body)``)
    into ``controller`` (a Controller), then the view is complete."""
    for plural, body in objects:
        controller.observe(plural, None, body)
    controller.view_complete()
