"""Fakes of the operator's collaborators shared by its unit tests."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

from restic_manager import protocol
from restic_manager.operator.kube import NotFound, SecretRead
from restic_manager.operator.store import ObjectKey


class FakeSession:
    """An agent's session as the controller sees it; records what is sent to the agent."""

    def __init__(self, agent: ObjectKey) -> None:
        self.agent = agent
        self.hello = protocol.Hello(agent=agent.name, agent_version="1", restic_version="0.19.1", protocol_version=1)
        self.dispatched: set[str] = set()
        self.pushed = None
        self.open = True
        self.sent: list[protocol.Payload] = []
        self.peer = "192.0.2.10:40000"
        self.replaced = ""

    async def send(self, payload: protocol.Payload) -> bool:
        self.sent.append(payload)
        return True

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
        controller._on_ack(session, protocol.ScheduleAck(version=1, applied_at=datetime.now(timezone.utc),
                                                         applied=applied))
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
