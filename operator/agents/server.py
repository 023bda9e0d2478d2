"""The agents' WebSocket endpoint: one connection per agent, credentials at the handshake,
hello first, then frames.

A connection's life reads top to bottom here: the HTTP upgrade must carry a bearer
credential that :data:`Authenticate` turns into an :class:`~restic_manager.operator.agents.identity.Identity`,
or it is refused with 401/403 (the details go to the log and the metrics; the peer gets the
status and the refusal's reason code in :data:`protocol.REFUSAL_HEADER`, so an agent can say
why it is kept out and whether trying again can help); the first frame must be a ``hello``
naming that identity's Agent (another name is closed with
:data:`protocol.CLOSE_WRONG_AGENT`); the session is registered (replacing an older
connection of the same agent, closed with :data:`protocol.CLOSE_REPLACED`); then every inbound
frame is rate-limited, validated, checked against the session's rules
(restic_manager/session.py: an ack names a set this connection was sent, fires come after
the first ack) and handed to the :class:`SessionHandler` in order. An invalid, rate-limited,
out-of-order or forbidden frame is answered (a fire with a ``refused`` receipt, anything else
with an ``error`` frame) and never ends the connection; a frame over the size limit does
(1009), before it is buffered. What the frames mean is the handler's business. Every
handshake response names the protocol version spoken here (:data:`protocol.PROTOCOL_HEADER`).

Before any of that, at accept: an address that already has
:attr:`Limits.handshakes_per_address` handshakes in progress, or a new address (none of the
fleet's agents connected from it) while :attr:`Limits.handshakes_from_new_addresses` such
handshakes are in progress, has its connection reset before a TLS byte is read
(:class:`_GatedListener`), so a flood costs an accept, not a TLS handshake, and cannot crowd
the event loop that the fleet's handshakes share.

TLS: ``serve(tls=...)`` serves ``wss`` with a :class:`ServingCertificate`, which reloads its
files when they change (a renewed Secret) so new connections get the new certificate; plain
``ws`` only when the caller passes none (``--insecure-listen``). Compression is off: frames
carry repository credentials next to text a Schedule's author chooses, which is what
compression side channels feed on; and each connection would keep a zlib state (~50 kB).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import socket
import ssl
import struct
import time
import weakref
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http import HTTPStatus
from pathlib import Path
from typing import Any, Protocol

from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode
from websockets.http11 import Request, Response

from restic_manager import protocol
from restic_manager.operator.agents.identity import AuthError, Identity
from restic_manager.operator.agents.limits import HandshakeGate, Limits, LogBudget, Peer, TokenBucket
from restic_manager.operator.kube.api import ObjectKey
from restic_manager.operator.metrics import Metrics
from restic_manager.session import OperatorSession, SessionError

log = logging.getLogger(__name__)
# websockets logs frames at DEBUG, and command.run frames hold repository credentials: its
# logger for this server never goes below INFO, whatever the operator's log level.
_WIRE_LOG = logging.getLogger(f"{__name__}.wire")
_WIRE_LOG.setLevel(logging.INFO)

REPLACED_CLOSE_TIMEOUT = 1.0
LOGGED_REFUSALS = 10   # per connection; further refused frames are counted, not logged
LOGGED_HANDSHAKE_REFUSALS = 20  # a minute, of all peers; the rest are counted, and the count logged later
ACCEPT_BACKLOG = 100  # asyncio's default
# Connections reset by one accept call at most; then the event loop's other work runs.
RESETS_PER_ACCEPT = 100
_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close with RST, leaving no TIME_WAIT here


class _WrongAgent(protocol.ProtocolError):
    """A hello naming another Agent than the one its connection's credentials belong to."""


class TLSError(Exception):
    """The serving certificate or key cannot be loaded; the message names the file."""


class SessionHandler(Protocol):
    async def on_connect(self, session: Session) -> None: ...

    async def on_message(self, session: Session, frame: protocol.Frame) -> None: ...

    async def on_disconnect(self, session: Session) -> None: ...

    def on_refused(self, agent: ObjectKey, reason: str, message: str) -> None:
        """A connection with this Agent's credentials was refused after its handshake."""


Authenticate = Callable[[str], Awaitable[Identity]]

_serials = itertools.count(1)


@dataclass(eq=False)
class Session:
    """One authenticated agent connection."""

    identity: Identity
    hello: protocol.Hello
    connection: ServerConnection
    connected_at: datetime
    serial: int = field(default_factory=lambda: next(_serials))
    # What this session has been told and asked, for the handler's bookkeeping.
    dispatched: set[str] = field(default_factory=set)
    pushed: tuple[protocol.ScheduleEntry, ...] | None = None
    replaced: str = ""  # the peer of the connection of the same agent this one replaced
    refusals_logged: int = 0
    rules: OperatorSession = field(default_factory=OperatorSession)

    @property
    def agent(self) -> ObjectKey:
        return self.identity.agent

    @property
    def peer(self) -> str:
        return _peer(self.connection)

    @property
    def open(self) -> bool:
        return self.connection.close_code is None

    async def send(self, payload: protocol.Payload) -> bool:
        """Send one frame; False when the connection is gone (the caller decides what that means)."""
        self.rules.sending(payload)
        try:
            await self.connection.send(protocol.encode(payload))
            return True
        except ConnectionClosed:
            return False

    def log_refusal(self, message: str, *args: object) -> None:
        """Log a refused frame, at most :data:`LOGGED_REFUSALS` times per connection, so a
        peer cannot flood the log (the metrics count every one)."""
        self.refusals_logged += 1
        if self.refusals_logged <= LOGGED_REFUSALS:
            log.warning("agent %s: " + message, self.agent, *args)
        if self.refusals_logged == LOGGED_REFUSALS:
            log.warning("agent %s: further refused frames on this connection are counted, not logged", self.agent)


class ServingCertificate:
    """The server side of ``wss``: TLS 1.2 or newer with a certificate chain and key from files,
    loaded again when the files change."""

    RELOAD_INTERVAL = 60.0

    def __init__(self, cert_file: Path, key_file: Path) -> None:
        self.cert_file, self.key_file = cert_file, key_file
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        # No TLS 1.3 session tickets. They arrive after the handshake, while the client is
        # already sending its HTTP upgrade; a client reading on one thread while it writes on
        # another (websockets' sync client) can then lose the request, and the handshake
        # times out. Agents never resume sessions: the tickets bought nothing.
        self.context.num_tickets = 0
        self._loaded = self._stamp()
        self._load()

    def _stamp(self) -> tuple[float, float]:
        try:
            return self.cert_file.stat().st_mtime, self.key_file.stat().st_mtime
        except OSError:
            return 0.0, 0.0

    def _load(self) -> None:
        # A pair that fails half-way would leave the live context with the new certificate
        # and the old key: try it on a scratch context first.
        for context in (ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), self.context):
            try:
                context.load_cert_chain(self.cert_file, self.key_file)
            except (OSError, ssl.SSLError) as error:
                raise TLSError(
                    f"certificate {self.cert_file} / key {self.key_file}: cannot load them: {error}") from None

    async def follow(self, *, interval: float = RELOAD_INTERVAL) -> None:
        """Until cancelled: every ``interval``, :meth:`reload` if the files changed."""
        while True:
            await asyncio.sleep(interval)
            await self.reload()

    async def reload(self) -> bool:
        """Load the files again if they changed since the last load; whether it did. A pair
        that does not load (half written, say) is tried again next time; the current
        certificate serves meanwhile."""
        stamp = await asyncio.to_thread(self._stamp)
        if stamp == self._loaded:
            return False
        try:
            await asyncio.to_thread(self._load)
        except TLSError as error:
            log.warning("keeping the current certificate: %s", error)
            return False
        self._loaded = stamp
        log.info("serving the renewed certificate %s", self.cert_file)
        return True


class AgentServer:
    """Serves agents on ``host:port`` until cancelled; ``sessions`` holds the live ones."""

    def __init__(
        self,
        *,
        authenticate: Authenticate,
        handler: SessionHandler,
        limits: Limits = Limits(),
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._authenticate = authenticate
        self._handler = handler
        self._limits = limits
        self.metrics = metrics or Metrics()
        self._clock = clock
        self._refusal_log = LogBudget(lines=LOGGED_HANDSHAKE_REFUSALS, window=60.0)
        self._gate = HandshakeGate(per_address=limits.handshakes_per_address,
                                   from_new=limits.handshakes_from_new_addresses)
        self.sessions: dict[ObjectKey, Session] = {}
        # From the credential check to the connection's handler (one handshake each).
        self._identities: weakref.WeakKeyDictionary[ServerConnection, Identity] = weakref.WeakKeyDictionary()

    def session(self, agent: ObjectKey) -> Session | None:
        return self.sessions.get(agent)

    async def serve(self, host: str, port: int, *, tls: ServingCertificate | None = None,
                    started: Callable[[int], None] | None = None) -> None:
        limits = self._limits
        addresses = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                                 flags=socket.AI_PASSIVE)
        family, kind, proto, _, address = addresses[0]
        listener = _listen(family, kind, proto, address, self._gate, self._refused_at_accept)
        # A stalled TLS handshake ends after open_timeout too, as the rest of the opening does.
        async with serve(self._serve, sock=listener, ssl=tls.context if tls else None,
                         ssl_handshake_timeout=limits.open_timeout if tls else None,
                         process_request=self._check_credentials, process_response=_name_protocol,
                         max_size=limits.max_frame_bytes, compression=None, open_timeout=limits.open_timeout,
                         ping_interval=limits.ping_interval, ping_timeout=limits.ping_timeout,
                         server_header=None, logger=_WIRE_LOG) as server:
            if started is not None:
                started(next(iter(server.sockets)).getsockname()[1])
            try:
                await (tls.follow() if tls else asyncio.Future())  # until cancelled
            finally:
                server.close(close_connections=True)

    async def close_agent(self, agent: ObjectKey, reason: str) -> None:
        session = self.sessions.get(agent)
        if session is not None:
            await session.connection.close(CloseCode.POLICY_VIOLATION, reason)

    async def revoke(self, agent: ObjectKey, reason: str) -> None:
        """End ``agent``'s connection at once because its credential no longer holds."""
        session = self.sessions.get(agent)
        if session is not None:
            log.warning("agent %s: disconnected: %s", agent, reason)
            await _close_quickly(session.connection, protocol.CLOSE_REVOKED, "credentials revoked")

    def remember_addresses(self, addresses: Iterable[str]) -> None:
        """Addresses agents connected from before: their handshakes do not take the places of
        new addresses' (see :class:`HandshakeGate`)."""
        self._gate.remember(addresses)

    def _refused_at_accept(self, peer: Peer, why: str) -> None:
        self._count_refusal(f"{peer[0]}:{peer[1]}", "too-many-handshakes", "reset at accept", why)

    def _count_refusal(self, peer: str, reason: str, how: str, why: object) -> None:
        self.metrics.handshakes_refused[reason] += 1
        held = self._refusal_log.take(self._clock())
        if held is not None:
            log.warning("agent connection from %s refused (%s, %s): %s%s", peer, reason, how, why,
                        f" ({held} more refused since the last one logged; the metrics count each)" if held else "")

    async def _check_credentials(self, connection: ServerConnection, request: Request) -> Response | None:
        """The handshake's credential check: None lets the upgrade go on, a Response refuses it."""
        authenticated = False
        try:
            token = _bearer(request)
            if not token:
                raise AuthError(HTTPStatus.UNAUTHORIZED, "no-token", "no Authorization: Bearer header")
            self._identities[connection] = await self._authenticate(token)
            authenticated = True
            return None
        except AuthError as refusal:
            self._count_refusal(_peer(connection), refusal.reason, f"HTTP {refusal.status:d}", refusal)
            response = connection.respond(refusal.status, f"{refusal.status.phrase}\n")
            # The reason code only: it names which check failed, never whose credentials
            # they were (docs/security.md, "What a refused agent is told").
            response.headers[protocol.REFUSAL_HEADER] = refusal.reason
            if refusal.status is HTTPStatus.UNAUTHORIZED:
                response.headers["WWW-Authenticate"] = 'Bearer realm="restic-manager"'
            return response
        finally:
            if connection.remote_address:
                self._gate.settle(connection.remote_address[:2], authenticated=authenticated)

    async def _serve(self, connection: ServerConnection) -> None:
        identity = self._identities.pop(connection)
        try:
            hello_frame = await self._receive_hello(connection, identity)
        except protocol.ProtocolError as error:
            self.metrics.handshakes_refused["invalid-hello"] += 1
            log.warning("agent %s from %s refused: %s", identity.agent, _peer(connection), error)
            self._handler.on_refused(identity.agent, "InvalidHello", f"connection from {_peer(connection)}: {error}")
            code = protocol.CLOSE_WRONG_AGENT if isinstance(error, _WrongAgent) else CloseCode.POLICY_VIOLATION
            await _refuse(connection, protocol.Error(code="invalid-frame", message=str(error), ref=error.ref),
                          code=code)
            return
        except TimeoutError:
            self.metrics.handshakes_refused["hello-timeout"] += 1
            log.warning("agent %s from %s refused: no hello within %.0f s", identity.agent, _peer(connection),
                        self._limits.hello_timeout)
            self._handler.on_refused(identity.agent, "HelloTimeout", f"connection from {_peer(connection)} sent "
                                     f"no hello within {self._limits.hello_timeout:.0f} s")
            await _close_quickly(connection, CloseCode.POLICY_VIOLATION, "hello expected")
            return
        except ConnectionClosed:
            return
        rules = OperatorSession()
        rules.receive(hello_frame)
        hello = hello_frame.payload
        assert isinstance(hello, protocol.Hello)
        session = Session(identity=identity, hello=hello, connection=connection,
                          connected_at=datetime.now(timezone.utc), rules=rules)
        agent = session.agent
        previous = self.sessions.get(agent)
        self.sessions[agent] = session
        if previous is not None:
            session.replaced = previous.peer
            log.info("agent %s: new connection from %s replaces the one from %s",
                     agent, session.peer, previous.peer)
            await _close_quickly(previous.connection, protocol.CLOSE_REPLACED,
                                 "replaced by a newer connection of the same agent")
        log.info("agent %s connected from %s by %s (agent %s, restic %s, %d running job(s))", agent, session.peer,
                 identity.method.value, hello.agent_version, hello.restic_version, len(hello.running_jobs))
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

    async def _receive_hello(self, connection: ServerConnection, identity: Identity) -> protocol.Frame:
        async with asyncio.timeout(self._limits.hello_timeout):
            message = await connection.recv()
        frame = protocol.decode(message)
        if not isinstance(frame.payload, protocol.Hello):
            raise protocol.ProtocolError(f"the first frame must be hello, not {frame.type}", ref=frame.id)
        hello = frame.payload
        if hello.protocol_version != protocol.PROTOCOL_VERSION:
            raise protocol.ProtocolError(
                f"hello: protocolVersion {hello.protocol_version} is not supported; "
                f"this operator speaks {protocol.PROTOCOL_VERSION}", ref=frame.id)
        if hello.agent != identity.agent.name:
            # The credential decides who the agent is; hello must agree with it.
            raise _WrongAgent(
                f"hello: agent {hello.agent!r} is not the Agent these credentials belong to "
                f"({identity.agent.name!r})", ref=frame.id)
        return frame

    async def _receive(self, session: Session) -> None:
        limits = self._limits
        bucket = TokenBucket(rate=limits.frames_per_second, burst=limits.burst, now=self._clock())
        try:
            async for message in session.connection:
                if not bucket.take(self._clock()):
                    self.metrics.frames_refused["rate-limited"] += 1
                    session.log_refusal("frame dropped: over %g frames per second", limits.frames_per_second)
                    await session.send(protocol.Error(
                        code="rate-limited",
                        message=f"more than {limits.frames_per_second:g} frames per second (bursts up to "
                                f"{limits.burst}): this frame was dropped; slow down"))
                    continue
                try:
                    frame = protocol.decode(message)
                except protocol.ProtocolError as error:
                    self.metrics.frames_refused["invalid-frame"] += 1
                    session.log_refusal("invalid frame: %s", error)
                    await session.send(protocol.Error(code="invalid-frame", message=str(error), ref=error.ref))
                    continue
                try:
                    session.rules.receive(frame)
                except SessionError as error:
                    await self._out_of_order(session, frame, str(error))
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


    async def _out_of_order(self, session: Session, frame: protocol.Frame, message: str) -> None:
        """A frame the session's rules do not allow now: counted, answered, nothing else."""
        self.metrics.frames_refused["out-of-order"] += 1
        session.log_refusal("out of order: %s", message)
        if isinstance(frame.payload, protocol.ScheduleFire):
            fire = frame.payload
            await session.send(protocol.FireResult(ref=frame.id, id=fire.id, scheduled_at=fire.scheduled_at,
                                                   outcome=protocol.FireOutcome.REFUSED, reason=message))
        else:
            await session.send(protocol.Error(code="invalid-frame", ref=frame.id, message=message))


class _GatedListener(socket.socket):
    """The agents' listening socket: asyncio's event loop accepts through :meth:`accept`, which
    resets a connection the gate does not admit before anything is read from it."""

    gate: HandshakeGate
    refused: Callable[[Peer, str], None]

    def accept(self) -> tuple[socket.socket, object]:
        for _ in range(RESETS_PER_ACCEPT):
            fd, address = self._accept()  # type: ignore[attr-defined]  # BlockingIOError: none waiting
            peer: Peer = (address[0], address[1])
            why = self.gate.admit(peer)
            if why is None:
                connection = _GatedConnection(self.family, self.type, self.proto, fileno=fd)
                connection.gate, connection.peer = self.gate, peer
                return connection, address
            with socket.socket(self.family, self.type, self.proto, fileno=fd) as refused:
                refused.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
            self.refused(peer, why)
        raise BlockingIOError  # more may be waiting: the event loop calls again after its other work


class _GatedConnection(socket.socket):
    """An accepted connection; closing it ends its handshake for the gate, however it went."""

    gate: HandshakeGate
    peer: Peer

    def close(self) -> None:
        self.gate.settle(self.peer)
        super().close()


def _listen(family: socket.AddressFamily, kind: socket.SocketKind, proto: int, address: tuple[Any, ...],
            gate: HandshakeGate, refused: Callable[[Peer, str], None]) -> _GatedListener:
    """A listening socket on the (first) address the host resolved to, as asyncio would open it."""
    listener = _GatedListener(family, kind, proto)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(address)
        listener.listen(ACCEPT_BACKLOG)
        listener.setblocking(False)
    except OSError as error:
        listener.close()
        raise OSError(error.errno, f"cannot listen for agents on {address[0]}:{address[1]}: {error.strerror}") from error
    listener.gate, listener.refused = gate, refused
    return listener


def _name_protocol(connection: ServerConnection, request: Request, response: Response) -> None:
    response.headers[protocol.PROTOCOL_HEADER] = str(protocol.PROTOCOL_VERSION)


def _peer(connection: ServerConnection) -> str:
    address = connection.remote_address
    return f"{address[0]}:{address[1]}" if address else "unknown"


def _bearer(request: Request) -> str:
    given = request.headers.get_all("Authorization")
    if len(given) > 1:
        raise AuthError(HTTPStatus.BAD_REQUEST, "duplicate-authorization", "more than one Authorization header")
    scheme, _, token = (given[0] if given else "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


async def _close_quickly(connection: ServerConnection, code: int, reason: str) -> None:
    """Close with a reason, but do not wait long for a peer that may be gone already."""
    try:
        async with asyncio.timeout(REPLACED_CLOSE_TIMEOUT):
            await connection.close(code, reason)
    except TimeoutError:
        connection.transport.abort()


async def _refuse(connection: ServerConnection, error: protocol.Error, *, code: int) -> None:
    """Say why, then close with ``code``."""
    try:
        await connection.send(protocol.encode(error))
        # A close reason may hold at most 123 bytes.
        await connection.close(code, error.message.encode()[:123].decode(errors="ignore"))
    except ConnectionClosed:
        pass
