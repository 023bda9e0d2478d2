"""The agent's real Connection against the operator's real AgentServer on 127.0.0.1 (no
control plane): what the server drops or leaves unanswered, the agent sends again."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from http import HTTPStatus
from pathlib import Path

import pytest
from support.fake_operator import FakeRunner

from restic_manager import protocol
from restic_manager.agent.connection import Connection, Endpoint, Identity as AgentIdentity
from restic_manager.agent.scheduler import Scheduler, SystemClock, Timer
from restic_manager.agent.state import Journal, Mailbox, Outbox, StateStore, state_saver
from restic_manager.operator.agents.identity import AuthError, Identity, Method
from restic_manager.operator.agents.limits import Limits
from restic_manager.operator.agents.server import AgentServer, Session
from restic_manager.operator.kube.api import ObjectKey

TOKEN = "receipts-token"
TIMEOUT = 10
AT = datetime(2026, 3, 2, 2, 0, tzinfo=timezone.utc)


class Operator:
    """A session handler in the operator's place: it pushes an empty set on connect and
    answers every fire it is handed with a created receipt, recording the fire."""

    def __init__(self) -> None:
        self.fires: asyncio.Queue[protocol.ScheduleFire] = asyncio.Queue()

    async def on_connect(self, session: Session) -> None:
        await session.send(protocol.ScheduleSet(version=1, schedules=[]))

    async def on_message(self, session: Session, frame: protocol.Frame) -> None:
        if isinstance(frame.payload, protocol.ScheduleFire):
            fire = frame.payload
            self.fires.put_nowait(fire)
            await session.send(protocol.FireResult(ref=frame.id, id=fire.id, scheduled_at=fire.scheduled_at,
                                                   outcome=protocol.FireOutcome.CREATED, job=f"{fire.id}-job"))

    async def on_disconnect(self, session: Session) -> None:
        pass

    def on_refused(self, agent: ObjectKey, reason: str, message: str) -> None:
        pass


async def authenticate(token: str) -> Identity:
    if token != TOKEN:
        raise AuthError(HTTPStatus.UNAUTHORIZED, "unknown-token", "not a known token")
    return Identity(ObjectKey("ns", "web-01"), Method.TOKEN, "digest")


@pytest.fixture
async def served() -> AsyncIterator[tuple[str, Operator]]:
    operator = Operator()
    # One frame a second, a burst of two: the ack and one fire pass, the next fire is dropped.
    server = AgentServer(authenticate=authenticate, handler=operator, limits=Limits(frames_per_second=1, burst=2))
    port: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(server.serve("127.0.0.1", 0, started=port.set_result))
    async with asyncio.timeout(TIMEOUT):
        url = f"ws://127.0.0.1:{await port}/agent"
    yield url, operator
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_a_fire_the_rate_limit_dropped_is_sent_again_and_settled(
        served: tuple[str, Operator], tmp_path: Path) -> None:
    url, operator = served
    (tmp_path / "token").write_text(TOKEN)
    store = StateStore(tmp_path / "state.json")
    scheduler, outbox = Scheduler(), Outbox()
    save = state_saver(store, cursors=scheduler.cursors, outbox=outbox, journal=Journal())
    mailbox = Mailbox(outbox, save=save)
    connection = Connection(endpoint=Endpoint(url, token_file=tmp_path / "token"),
                            identity=AgentIdentity(agent="web-01", restic_version="0.19.1", hostname="h"),
                            timer=Timer(scheduler, clock=SystemClock(), deliver=mailbox.post_many, save=save),
                            runner=FakeRunner([]), mailbox=mailbox, receipt_timeout=0.5)
    task = asyncio.create_task(connection.run())
    try:
        fires = [protocol.ScheduleFire(id=f"ns/s{n}", uid=f"u{n}", generation=1, scheduled_at=AT) for n in range(2)]
        await mailbox.post_many(fires)
        async with asyncio.timeout(TIMEOUT):
            handed = {(await operator.fires.get()).id for _ in fires}
            while len(outbox):  # settled by receipts: a bounded poll, the outbox has no event
                await asyncio.sleep(0.05)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert handed == {"ns/s0", "ns/s1"}
