"""The agents' WebSocket endpoint on 127.0.0.1: bearer credentials at the handshake, hello
first, validated frames, one connection per agent. The handler and the authentication are
fakes (tests/unit/test_security_server.py has limits, rates and hostile input)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from http import HTTPStatus

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from restic_manager import protocol
from restic_manager.operator.agents.identity import AuthError, Identity, Method
from restic_manager.operator.agents.server import AgentServer, Session
from restic_manager.operator.kube.api import ObjectKey

TOKEN = "good-token"
TIMEOUT = 5


class Handler:
    def __init__(self) -> None:
        self.events: asyncio.Queue[tuple[str, Session, protocol.Frame | None]] = asyncio.Queue()
        self.fail_on: str | None = None
        self.refused: list[tuple[ObjectKey, str, str]] = []

    async def on_connect(self, session: Session) -> None:
        await self.events.put(("connect", session, None))

    async def on_message(self, session: Session, frame: protocol.Frame) -> None:
        if frame.type == self.fail_on:
            raise RuntimeError("handler bug")
        await self.events.put(("message", session, frame))

    async def on_disconnect(self, session: Session) -> None:
        await self.events.put(("disconnect", session, None))

    def on_refused(self, agent: ObjectKey, reason: str, message: str) -> None:
        self.refused.append((agent, reason, message))

    async def next(self) -> tuple[str, Session, protocol.Frame | None]:
        async with asyncio.timeout(TIMEOUT):
            return await self.events.get()


async def authenticate(token: str) -> Identity:
    if token != TOKEN:
        raise AuthError(HTTPStatus.UNAUTHORIZED, "unknown-token", "the token is not that of any Agent")
    return Identity(ObjectKey("ns", "web-01"), Method.TOKEN, "digest")


@pytest.fixture
async def served() -> AsyncIterator[tuple[str, Handler, AgentServer]]:
    handler = Handler()
    server = AgentServer(authenticate=authenticate, handler=handler)
    port: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(server.serve("127.0.0.1", 0, started=port.set_result))
    async with asyncio.timeout(TIMEOUT):
        url = f"ws://127.0.0.1:{await port}/agent"
    yield url, handler, server
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def hello(agent: str = "web-01", **fields: object) -> str:
    return protocol.encode(protocol.Hello(agent=agent, agent_version="1", restic_version="0.19.1",
                                          protocol_version=fields.pop("protocol_version", protocol.PROTOCOL_VERSION),  # type: ignore[arg-type]
                                          **fields))  # type: ignore[arg-type]


async def receive(websocket: ClientConnection) -> protocol.Payload:
    async with asyncio.timeout(TIMEOUT):
        return protocol.decode(await websocket.recv()).payload


def authorized(token: str = TOKEN) -> dict[str, object]:
    return {"additional_headers": {"Authorization": f"Bearer {token}"}}


async def test_a_handshake_without_a_token_is_refused(served: tuple[str, Handler, AgentServer]) -> None:
    url, _, _ = served
    with pytest.raises(InvalidStatus) as refused:
        async with connect(url):
            pass
    assert refused.value.response.status_code == 401


async def test_the_first_frame_must_be_hello(served: tuple[str, Handler, AgentServer]) -> None:
    url, handler, _ = served
    async with connect(url, **authorized()) as websocket:  # type: ignore[arg-type]
        await websocket.send(protocol.encode(protocol.CommandCancel(job="ns/x"), frame_id="f1"))
        error = await receive(websocket)
        assert isinstance(error, protocol.Error) and error.code == "invalid-frame" and error.ref == "f1"
        assert "first frame must be hello" in error.message
        with pytest.raises(ConnectionClosed):
            await receive(websocket)
        assert websocket.close_code == 1008
    assert handler.events.empty()


async def test_an_unsupported_protocol_version_is_refused(served: tuple[str, Handler, AgentServer]) -> None:
    url, _, _ = served
    async with connect(url, **authorized()) as websocket:  # type: ignore[arg-type]
        await websocket.send(hello(protocol_version=99))
        error = await receive(websocket)
        assert isinstance(error, protocol.Error) and "protocolVersion 99 is not supported" in error.message


async def test_a_wrong_token_is_refused_at_the_handshake(served: tuple[str, Handler, AgentServer]) -> None:
    url, handler, server = served
    with pytest.raises(InvalidStatus) as refused:
        async with connect(url, **authorized("stolen")):  # type: ignore[arg-type]
            pass
    assert refused.value.response.status_code == 401
    assert refused.value.response.body == b"Unauthorized\n"  # the detail is the log's, not the peer's
    assert refused.value.response.headers[protocol.REFUSAL_HEADER] == "unknown-token"
    assert server.metrics.handshakes_refused == {"unknown-token": 1}
    assert handler.events.empty()


async def test_hello_must_name_the_authenticated_agent(served: tuple[str, Handler, AgentServer]) -> None:
    url, handler, server = served
    async with connect(url, **authorized()) as websocket:  # type: ignore[arg-type]
        await websocket.send(hello("db-01"))
        error = await receive(websocket)
        assert isinstance(error, protocol.Error) and error.code == "invalid-frame"
        assert "'db-01' is not the Agent these credentials belong to" in error.message
        with pytest.raises(ConnectionClosed):
            await receive(websocket)
        assert websocket.close_code == protocol.CLOSE_WRONG_AGENT  # the agent stops for good on it
        assert websocket.close_reason == error.message
    assert handler.events.empty() and server.metrics.handshakes_refused == {"invalid-hello": 1}


async def test_invalid_frames_are_answered_and_the_connection_goes_on(served: tuple[str, Handler, AgentServer]) -> None:
    url, handler, _ = served
    async with connect(url, **authorized()) as websocket:  # type: ignore[arg-type]
        await websocket.send(hello())
        kind, session, _ = await handler.next()
        assert kind == "connect" and session.agent == ObjectKey("ns", "web-01")
        await session.send(protocol.ScheduleSet(version=3, schedules=[]))
        assert isinstance(await receive(websocket), protocol.ScheduleSet)
        await websocket.send("{not json")
        bad_json = await receive(websocket)
        assert isinstance(bad_json, protocol.Error) and "not valid JSON" in bad_json.message
        await websocket.send(json.dumps({"type": "schedule.ack", "id": "a1", "payload": {"version": "x"}}))
        bad_ack = await receive(websocket)
        assert isinstance(bad_ack, protocol.Error) and bad_ack.ref == "a1" and "version" in bad_ack.message
        ack = protocol.ScheduleAck(version=3, applied_at=datetime.now(timezone.utc))
        await websocket.send(protocol.encode(ack))
        kind, _, frame = await handler.next()
        assert kind == "message" and frame is not None and frame.payload == ack


async def test_frames_out_of_order_are_answered_and_never_handled(served: tuple[str, Handler, AgentServer]) -> None:
    url, handler, server = served
    async with connect(url, **authorized()) as websocket:  # type: ignore[arg-type]
        assert websocket.response.headers[protocol.PROTOCOL_HEADER] == str(protocol.PROTOCOL_VERSION)
        await websocket.send(hello())
        _, session, _ = await handler.next()
        fire = protocol.ScheduleFire(id="ns/a", uid="u", generation=1, scheduled_at=datetime.now(timezone.utc))
        await websocket.send(protocol.encode(fire, frame_id="f1"))
        refused = await receive(websocket)
        assert isinstance(refused, protocol.FireResult)
        assert (refused.ref, refused.outcome) == ("f1", protocol.FireOutcome.REFUSED)
        assert "before this connection's schedule set was acknowledged" in refused.reason
        await websocket.send(protocol.encode(protocol.ScheduleAck(version=7, applied_at=datetime.now(timezone.utc)),
                                             frame_id="a1"))
        unsent = await receive(websocket)
        assert isinstance(unsent, protocol.Error) and unsent.ref == "a1"
        assert "version 7 was never sent on this connection" in unsent.message
        await websocket.send(hello())
        again = await receive(websocket)
        assert isinstance(again, protocol.Error) and "already received" in again.message
        await websocket.send(protocol.encode(protocol.CommandCancel(job="ns/j"), frame_id="c1"))
        wrong_way = await receive(websocket)
        assert isinstance(wrong_way, protocol.Error) and "sent by the operator" in wrong_way.message
    assert handler.events.qsize() <= 1  # at most the disconnect: no frame above reached the handler
    assert server.metrics.frames_refused["out-of-order"] == 4


async def test_a_failing_handler_does_not_end_the_connection(served: tuple[str, Handler, AgentServer]) -> None:
    url, handler, _ = served
    handler.fail_on = "schedule.ack"
    async with connect(url, **authorized()) as websocket:  # type: ignore[arg-type]
        await websocket.send(hello())
        _, session, _ = await handler.next()
        await session.send(protocol.ScheduleSet(version=1, schedules=[]))
        await receive(websocket)
        ack = protocol.ScheduleAck(version=1, applied_at=datetime.now(timezone.utc))
        await websocket.send(protocol.encode(ack, frame_id="s1"))
        error = await receive(websocket)
        assert isinstance(error, protocol.Error) and error.code == "internal" and error.ref == "s1"
        handler.fail_on = None
        await websocket.send(protocol.encode(ack))
        kind, _, _ = await handler.next()
        assert kind == "message"


async def test_a_second_connection_of_an_agent_replaces_the_first(served: tuple[str, Handler, AgentServer]) -> None:
    url, handler, server = served
    async with connect(url, **authorized()) as first:  # type: ignore[arg-type]
        await first.send(hello())
        _, old, _ = await handler.next()
        async with connect(url, **authorized()) as second:  # type: ignore[arg-type]
            await second.send(hello())
            _, new, _ = await handler.next()
            with pytest.raises(ConnectionClosed):
                await receive(first)
            assert first.close_code == protocol.CLOSE_REPLACED
            assert server.session(ObjectKey("ns", "web-01")) is new and new is not old
        kind, session, _ = await handler.next()
        # Only the connection that was current says the agent left.
        assert (kind, session) == ("disconnect", new)
    assert server.session(ObjectKey("ns", "web-01")) is None


async def test_a_client_offering_compression_gets_a_connection_without_it(
        served: tuple[str, Handler, AgentServer]) -> None:
    """permessage-deflate would cost each connection a zlib state (~50 kB) and open a
    compression side channel on frames carrying credentials: the offer is declined."""
    url, handler, _ = served
    async with connect(url, compression="deflate", **authorized()) as websocket:  # type: ignore[arg-type]
        assert websocket.request is not None and websocket.response is not None
        assert "permessage-deflate" in websocket.request.headers["Sec-WebSocket-Extensions"]
        assert "Sec-WebSocket-Extensions" not in websocket.response.headers
        assert websocket.protocol.extensions == []
        await websocket.send(hello())
        kind, _, _ = await handler.next()
        assert kind == "connect"
