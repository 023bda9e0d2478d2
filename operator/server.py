"""The agents' WebSocket endpoint: one connection per agent, hello first, then frames.

A connection's life reads top to bottom in :meth:`AgentServer._serve`: the handshake must
carry a bearer token; the first frame must be a valid ``hello``; the token must be the one
the operator issued for that Agent; the session is registered (replacing an older
connection of the same agent); then every inbound frame is validated and handed to the
:class:`SessionHandler` in order, and an invalid one is answered with an ``error`` frame
and never ends the connection. What the frames mean is the handler's business.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http import HTTPStatus
from typing import Protocol

from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode
from websockets.http11 import Request, Response

from restic_manager import protocol
from restic_manager.operator.store import ObjectKey

log = logging.getLogger(__name__)

HELLO_TIMEOUT = 10.0
CLOSE_REPLACED = 4000  # a newer connection of the same agent took over
REPLACED_CLOSE_TIMEOUT = 1.0


class AuthError(Exception):
    """The agent may not connect; the message says why (it is sent to the agent)."""


class SessionHandler(Protocol):
    async def on_connect(self, session: Session) -> None: ...

    async def on_message(self, session: Session, frame: protocol.Frame) -> None: ...

    async def on_disconnect(self, session: Session) -> None: ...


Authenticate = Callable[[protocol.Hello, str], Awaitable[ObjectKey]]

_serials = itertools.count(1)


@dataclass(eq=False)
class Session:
    """One authenticated agent connection."""

    agent: ObjectKey
    hello: protocol.Hello
    connection: ServerConnection
    connected_at: datetime
    serial: int = field(default_factory=lambda: next(_serials))
    # What this session has been told and asked, for the handler's bookkeeping.
    dispatched: set[str] = field(default_factory=set)
    pushed: tuple[protocol.ScheduleEntry, ...] | None = None

    @property
    def peer(self) -> str:
        address = self.connection.remote_address
        return f"{address[0]}:{address[1]}" if address else "unknown"

    @property
    def open(self) -> bool:
        return self.connection.close_code is None

    async def send(self, payload: protocol.Payload) -> bool:
        """Send one frame; False when the connection is gone (the caller decides what that means)."""
        try:
            await self.connection.send(protocol.encode(payload))
            return True
        except ConnectionClosed:
            return False


class AgentServer:
    """Serves agents on ``host:port`` until cancelled; ``sessions`` holds the live ones."""

    def __init__(self, *, authenticate: Authenticate, handler: SessionHandler) -> None:
        self._authenticate = authenticate
        self._handler = handler
        self.sessions: dict[ObjectKey, Session] = {}

    def session(self, agent: ObjectKey) -> Session | None:
        return self.sessions.get(agent)

    async def serve(self, host: str, port: int, *, started: Callable[[int], None] | None = None) -> None:
        # Frames up to twice the limit are read so that decode() can say what is wrong with
        # them; anything larger closes the connection (1009) before it is buffered.
        async with serve(self._serve, host, port, process_request=_require_token,
                         max_size=2 * protocol.MAX_FRAME_BYTES) as server:
            if started is not None:
                started(next(iter(server.sockets)).getsockname()[1])
            try:
                await asyncio.Future()  # until cancelled
            finally:
                server.close(close_connections=True)

    async def close_agent(self, agent: ObjectKey, reason: str) -> None:
        session = self.sessions.get(agent)
        if session is not None:
            await session.connection.close(CloseCode.POLICY_VIOLATION, reason)

    async def _serve(self, connection: ServerConnection) -> None:
        token = _bearer(connection.request) if connection.request else ""
        try:
            hello = await self._receive_hello(connection)
            agent = await self._authenticate(hello, token)
        except AuthError as error:
            log.warning("agent %s from %s refused: %s", hello.agent, connection.remote_address, error)
            await _refuse(connection, protocol.Error(code="forbidden", message=str(error)))
            return
        except protocol.ProtocolError as error:
            log.warning("agent connection from %s refused: %s", connection.remote_address, error)
            await _refuse(connection, protocol.Error(code="invalid-frame", message=str(error), ref=error.ref))
            return
        except (TimeoutError, ConnectionClosed):
            return
        session = Session(agent=agent, hello=hello, connection=connection, connected_at=datetime.now(timezone.utc))
        previous = self.sessions.get(agent)
        self.sessions[agent] = session
        if previous is not None:
            log.info("agent %s: new connection from %s replaces the one from %s",
                     agent, session.peer, previous.peer)
            await _close_quickly(previous.connection, CLOSE_REPLACED,
                                 "replaced by a newer connection of the same agent")
        log.info("agent %s connected from %s (agent %s, restic %s, %d running job(s))", agent, session.peer,
                 hello.agent_version, hello.restic_version, len(hello.running_jobs))
        try:
            await self._handler.on_connect(session)
            await self._receive(session)
        finally:
            current = self.sessions.get(agent) is session
            if current:
                del self.sessions[agent]
            log.info("agent %s disconnected (code %s%s)", agent, connection.close_code,
                     f", {connection.close_reason!r}" if connection.close_reason else "")
            if current:
                await self._handler.on_disconnect(session)

    async def _receive_hello(self, connection: ServerConnection) -> protocol.Hello:
        async with asyncio.timeout(HELLO_TIMEOUT):
            message = await connection.recv()
        frame = protocol.decode(message)
        if not isinstance(frame.payload, protocol.Hello):
            raise protocol.ProtocolError(f"the first frame must be hello, not {frame.type}", ref=frame.id)
        if frame.payload.protocol_version != protocol.PROTOCOL_VERSION:
            raise protocol.ProtocolError(
                f"hello: protocolVersion {frame.payload.protocol_version} is not supported; "
                f"this operator speaks {protocol.PROTOCOL_VERSION}", ref=frame.id)
        return frame.payload

    async def _receive(self, session: Session) -> None:
        try:
            async for message in session.connection:
                try:
                    frame = protocol.decode(message)
                except protocol.ProtocolError as error:
                    log.warning("agent %s sent an invalid frame: %s", session.agent, error)
                    await session.send(protocol.Error(code="invalid-frame", message=str(error), ref=error.ref))
                    continue
                try:
                    await self._handler.on_message(session, frame)
                except Exception:
                    # One bad message must not end the agent's connection; the log has the trace.
                    log.exception("agent %s: handling %s %s failed", session.agent, frame.type, frame.id)
                    await session.send(protocol.Error(
                        code="internal", ref=frame.id, message=f"the operator failed to handle {frame.type}"))
        except ConnectionClosed:
            pass


def _bearer(request: Request) -> str:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def _require_token(connection: ServerConnection, request: Request) -> Response | None:
    if not _bearer(request):
        return connection.respond(HTTPStatus.UNAUTHORIZED, "an Authorization: Bearer <token> header is required\n")
    return None


async def _close_quickly(connection: ServerConnection, code: int, reason: str) -> None:
    """Close with a reason, but do not wait long for a peer that may be gone already."""
    try:
        async with asyncio.timeout(REPLACED_CLOSE_TIMEOUT):
            await connection.close(code, reason)
    except TimeoutError:
        connection.transport.abort()


async def _refuse(connection: ServerConnection, error: protocol.Error) -> None:
    """Say why, then close with 1008 (policy violation)."""
    try:
        await connection.send(protocol.encode(error))
        # A close reason may hold at most 123 bytes.
        await connection.close(CloseCode.POLICY_VIOLATION, error.message.encode()[:123].decode(errors="ignore"))
    except ConnectionClosed:
        pass
