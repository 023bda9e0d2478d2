"""The agent's one WebSocket to the operator: connect, hello, serve, and reconnect after a loss.

A connection's life, as `Connection.run` and `_serve` spell it out:

1. connect (bearer token from the token file, read afresh each time because projected
   ServiceAccount tokens rotate), with exponential backoff and full jitter between attempts;
2. send `hello`, naming the jobs still running;
3. serve the operator's frames: `schedule.set` → apply → `schedule.ack`; `command.run` and
   `command.cancel` → the job runner; `error` → logged; anything invalid → an `error` frame back;
4. once this connection's first set is acknowledged, deliver the mailbox (fires and job
   messages, including those that piled up while disconnected), each batch sent when posted
   and confirmed by a ping;
5. on shutdown, close with code 1001 and a reason; on any loss, go back to 1.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake
from websockets.frames import CloseCode

from restic_manager import __version__, protocol
from restic_manager.agent.scheduler import Timer
from restic_manager.agent.state import Mailbox

log = logging.getLogger(__name__)
# websockets logs frames at DEBUG, and command.run frames hold repository credentials: its
# logger for this connection never goes below INFO, whatever the agent's log level.
_WIRE_LOG = logging.getLogger(f"{__name__}.wire")
_WIRE_LOG.setLevel(logging.INFO)

SHUTDOWN_REASON = "agent shutting down"


class Runner(Protocol):
    """What the connection needs of the job runner (agent/runner.py's JobRunner)."""

    async def start(self, command: protocol.CommandRun) -> None: ...

    async def cancel(self, job: str) -> bool: ...

    def running(self) -> list[str]: ...


@dataclass(frozen=True)
class Endpoint:
    """Where and how to reach the operator."""

    url: str
    token_file: Path | None = None
    ssl: ssl.SSLContext | None = None  # for wss:// only
    ping_interval: float = 20.0  # keepalive: a silent peer is given up after this plus ping_timeout
    open_timeout: float = 10.0


@dataclass(frozen=True)
class Identity:
    """Who this agent is, as `hello` tells the operator."""

    agent: str
    restic_version: str
    hostname: str


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with full jitter: retry n waits a uniformly random time in
    [0, min(cap, base * 2**n)], so a fleet that lost its operator does not return in lockstep."""

    base: float = 1.0
    cap: float = 60.0

    def delay(self, retry: int, rng: random.Random) -> float:
        return rng.uniform(0.0, min(self.cap, self.base * 2.0 ** min(retry, 32)))


class Connection:
    """Keeps the agent connected to the operator and serves it until cancelled."""

    def __init__(
        self,
        *,
        endpoint: Endpoint,
        identity: Identity,
        timer: Timer,
        runner: Runner,
        mailbox: Mailbox,
        backoff: Backoff = Backoff(),
        rng: random.Random | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._endpoint = endpoint
        self._identity = identity
        self._timer = timer
        self._runner = runner
        self._mailbox = mailbox
        self._backoff = backoff
        self._rng = rng or random.Random()
        self._sleep = sleep

    async def run(self) -> None:
        """Connect, serve, reconnect; cancelling it closes an open socket with a reason."""
        url = self._endpoint.url
        retry = 0
        while True:
            established = asyncio.Event()
            try:
                async with connect(url, **await self._connect_options()) as websocket:
                    log.info("connected to the operator at %s", url)
                    try:
                        await self._serve(websocket, established)
                    except asyncio.CancelledError:
                        await websocket.close(CloseCode.GOING_AWAY, SHUTDOWN_REASON)
                        raise
                log.warning("connection to %s closed (code %s%s)", url, websocket.close_code,
                            f", {websocket.close_reason!r}" if websocket.close_reason else "")
            except (OSError, TimeoutError, InvalidHandshake, ConnectionClosed) as error:
                log.warning("connection to the operator at %s failed: %s", url, error)
            if established.is_set():
                retry = 0  # a session that got as far as an ack was a success
            delay = self._backoff.delay(retry, self._rng)
            retry += 1
            log.info("reconnecting to %s in %.1f s", url, delay)
            await self._sleep(delay)

    async def _connect_options(self) -> dict[str, Any]:
        headers = {}
        if self._endpoint.token_file is not None:
            token = await asyncio.to_thread(self._endpoint.token_file.read_text, encoding="utf-8")
            headers["Authorization"] = f"Bearer {token.strip()}"
        options: dict[str, Any] = {
            "additional_headers": headers,
            "user_agent_header": f"restic-manager-agent/{__version__}",
            "ping_interval": self._endpoint.ping_interval,
            "open_timeout": self._endpoint.open_timeout,
            "max_size": protocol.MAX_FRAME_BYTES,
            # No permessage-deflate: credentials travel next to text others choose (a
            # compression side channel), and frames are small JSON, so deflate would only cost
            # a compressor per connection on the operator and CPU on both ends.
            "compression": None,
            "logger": _WIRE_LOG,
        }
        if self._endpoint.ssl is not None:
            options["ssl"] = self._endpoint.ssl
        return options

    async def _serve(self, websocket: ClientConnection, established: asyncio.Event) -> None:
        """One connection's life after the handshake: hello, then frames until it closes."""
        await self._send(websocket, self._hello())
        async with asyncio.TaskGroup() as tasks:
            delivery = tasks.create_task(self._deliver(websocket, after=established))
            await self._receive(websocket, established)
            delivery.cancel()

    def _hello(self) -> protocol.Hello:
        return protocol.Hello(
            agent=self._identity.agent,
            agent_version=__version__,
            restic_version=self._identity.restic_version,
            protocol_version=protocol.PROTOCOL_VERSION,
            hostname=self._identity.hostname,
            running_jobs=sorted(self._runner.running()),
        )

    async def _receive(self, websocket: ClientConnection, established: asyncio.Event) -> None:
        try:
            async for message in websocket:
                await self._handle(websocket, message, established)
        except ConnectionClosed:
            return  # run() logs how it closed

    async def _handle(self, websocket: ClientConnection, message: str | bytes, established: asyncio.Event) -> None:
        try:
            frame = protocol.decode(message)
        except protocol.ProtocolError as error:
            log.warning("invalid frame from the operator: %s", error)
            await self._send(websocket, protocol.Error(code="invalid-frame", message=str(error), ref=error.ref))
            return
        match frame.payload:
            case protocol.ScheduleSet() as schedule_set:
                ack = await self._timer.apply(schedule_set)
                for rejected in ack.rejected:
                    log.warning("schedule %s generation %d rejected: %s",
                                rejected.id, rejected.generation, rejected.error)
                log.info("schedule set version %d applied: %d schedule(s), %d rejected",
                         ack.version, len(ack.applied), len(ack.rejected))
                await self._send(websocket, ack)
                established.set()
            case protocol.CommandRun() as command:
                log.info("job %s: %s requested", command.job, command.type.value)
                await self._runner.start(command)
            case protocol.CommandCancel(job=job):
                if not await self._runner.cancel(job):
                    log.info("job %s: cancel requested, but it is not running here", job)
            case protocol.Error() as reported:
                log.warning("the operator reports %s about frame %s: %s",
                            reported.code, reported.ref, reported.message)
            case _:
                await self._send(websocket, protocol.Error(
                    code="invalid-frame", ref=frame.id,
                    message=f"{frame.type} is sent by agents, not to them",
                ))

    async def _deliver(self, websocket: ClientConnection, *, after: asyncio.Event) -> None:
        """Send the mailbox in order, each batch as soon as it is posted. A batch leaves the
        mailbox only once a ping sent after it is answered: the operator's end has then read
        it. Confirming runs beside sending, so a new batch (the next wake-up's fires) never
        waits for the previous one's pong and save. Whatever was in flight when the
        connection dropped is sent again on the next one."""
        await after.wait()
        unconfirmed: asyncio.Queue[tuple[Awaitable[float], list[int]]] = asyncio.Queue()
        try:
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self._confirm(unconfirmed))
                sent = 0
                while True:
                    batch = await self._mailbox.pending(after=sent)
                    for payload in batch.values():
                        await self._send(websocket, payload)
                    sent = max(batch)
                    unconfirmed.put_nowait((await websocket.ping(), list(batch)))
        except* ConnectionClosed:
            pass  # _receive sees the same close and ends the session

    async def _confirm(self, unconfirmed: asyncio.Queue[tuple[Awaitable[float], list[int]]]) -> None:
        """Batches in the order sent: each leaves the mailbox when its pong arrives."""
        while True:
            pong, numbers = await unconfirmed.get()
            await pong
            await self._mailbox.delivered(numbers)

    async def _send(self, websocket: ClientConnection, payload: protocol.Payload) -> None:
        await websocket.send(protocol.encode(payload))
