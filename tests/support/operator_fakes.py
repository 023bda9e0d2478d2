"""Fakes of the operator's collaborators shared by its unit tests."""

from __future__ import annotations

from restic_manager import protocol
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

    async def send(self, payload: protocol.Payload) -> bool:
        self.sent.append(payload)
        return True

    def log_refusal(self, message: str, *args: object) -> None:
        pass
