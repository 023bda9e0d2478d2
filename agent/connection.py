"""The agent's one WebSocket to the operator: connect, hello, serve, and reconnect after a loss.

A connection's life, as `Connection.run` and `_serve` spell it out:

1. connect (bearer token from the token file, read afresh each time because projected
   ServiceAccount tokens rotate), with exponential backoff and full jitter between attempts;
   an operator whose handshake names another protocol version is refused;
2. send `hello`, naming the jobs still running, those whose job.done waits for a receipt, and
   those an earlier agent process was running when it died (agent/runner.py: the operator
   sends their command.run again and the runner learns their outcome from the repository;
   those it does not ask for within `RECOVERY_WAIT` of the first ack end as Failed);
3. serve the operator's frames as restic_manager/session.py's `AgentSession` reads them:
   `schedule.set` → apply → `schedule.ack`; `command.run` and `command.cancel` → the job
   runner; receipts → what they settle leaves the mailbox; anything invalid → an `error` back;
4. once this connection's first set is acknowledged, deliver the mailbox (fires and job
   messages, including those that piled up while disconnected) and send again whatever the
   session says is due (no receipt in time, or `retry`);
5. on shutdown, close with code 1001 and a reason; on any loss, ask agent/retry.py's
   `Reconnect` what it means: go back to 1 after its delay, or raise `AgentStopped` when
   the operator refuses this agent for good.
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
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.frames import Close, CloseCode

from restic_manager import __version__, protocol, session
from restic_manager.agent import retry
from restic_manager.agent.scheduler import Timer
from restic_manager.agent.state import Mailbox

log = logging.getLogger(__name__)
# websockets logs frames at DEBUG, and command.run frames hold repository credentials: its
# logger for this connection never goes below INFO, whatever the agent's log level.
_WIRE_LOG = logging.getLogger(f"{__name__}.wire")
_WIRE_LOG.setLevel(logging.INFO)

SHUTDOWN_REASON = "agent shutting down"


# How long after a connection's first ack an interrupted job waits for its command.run.
RECOVERY_WAIT = 30.0


class Runner(Protocol):
    """What the connection needs of the job runner (agent/runner.py's JobRunner)."""

    async def start(self, command: protocol.CommandRun) -> None: ...

    async def cancel(self, job: str) -> bool: ...

    def running(self) -> list[str]: ...

    def interrupted(self) -> list[str]: ...

    async def abandon_interrupted(self) -> None: ...


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


class OperatorMismatch(Exception):
    """The operator speaks another protocol version; ``str()`` says which and what to do."""


class AgentStopped(Exception):
    """The operator refuses this agent for good; ``stop`` has the exit code and the message."""

    def __init__(self, stop: retry.Stop) -> None:
        super().__init__(stop.message)
        self.stop = stop


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
        backoff: retry.Backoff = retry.SOON,
        slow_backoff: retry.Backoff = retry.SLOWLY,
        receipt_timeout: float = session.RECEIPT_TIMEOUT,
        recovery_wait: float = RECOVERY_WAIT,
        rng: random.Random | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._receipt_timeout = receipt_timeout
        self._recovery_wait = recovery_wait
        self._endpoint = endpoint
        self._identity = identity
        self._timer = timer
        self._runner = runner
        self._mailbox = mailbox
        self._rng = rng or random.Random()
        self._reconnect = retry.Reconnect(agent=identity.agent, token_file=endpoint.token_file, rng=self._rng,
                                          soon=backoff, slowly=slow_backoff)
        self._sleep = sleep

    async def run(self) -> None:
        """Connect, serve, reconnect; cancelling it closes an open socket with a reason. Raises
        AgentStopped when the operator refuses this agent for good."""
        url = self._endpoint.url
        while True:
            established = asyncio.Event()
            ending: retry.Ending
            try:
                async with connect(url, **await self._connect_options()) as websocket:
                    log.info("connected to the operator at %s", url)
                    try:
                        await self._serve(websocket, established)
                    except asyncio.CancelledError:
                        await websocket.close(CloseCode.GOING_AWAY, SHUTDOWN_REASON)
                        raise
                ending = _closed(websocket.protocol.close_rcvd)
            except InvalidStatus as error:
                response = error.response
                ending = retry.Refused(response.status_code,
                                       retry.reason_code(response.headers.get(protocol.REFUSAL_HEADER)))
            except ConnectionClosed as error:  # while saying hello: the operator may have said why
                ending = _closed(error.rcvd)
            except (OSError, TimeoutError, InvalidHandshake) as error:
                ending = retry.Failed(f"cannot connect: {error}")
            except OperatorMismatch as error:
                ending = retry.Failed(str(error), level=logging.ERROR)
            decision = self._reconnect.after(ending, established=established.is_set(),
                                             now=asyncio.get_running_loop().time())
            if isinstance(decision, retry.Stop):
                raise AgentStopped(decision)
            log.log(decision.level, "operator at %s: %s", url, decision.message)
            log.info("reconnecting to %s in %.1f s", url, decision.delay)
            await self._sleep(decision.delay)

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
        spoken = websocket.response.headers.get(protocol.PROTOCOL_HEADER) if websocket.response else None
        if spoken != str(protocol.PROTOCOL_VERSION):
            await websocket.close(CloseCode.POLICY_VIOLATION, "protocol version mismatch")
            raise OperatorMismatch(
                f"the operator at {self._endpoint.url} speaks protocol version {spoken or '1 or older'}; this "
                f"agent (restic-manager {__version__}) speaks {protocol.PROTOCOL_VERSION}: run an operator and "
                "agents of the same release")
        rules = session.AgentSession(rng=self._rng, receipt_timeout=self._receipt_timeout)
        await self._send(websocket, rules.hello(self._hello()))
        async with asyncio.TaskGroup() as tasks:
            delivery = tasks.create_task(self._deliver(websocket, rules, after=established))
            abandon = tasks.create_task(self._abandon_interrupted(after=established))
            await self._receive(websocket, rules, established)
            delivery.cancel()
            abandon.cancel()

    def _hello(self) -> protocol.Hello:
        return protocol.Hello(
            agent=self._identity.agent,
            agent_version=__version__,
            restic_version=self._identity.restic_version,
            protocol_version=protocol.PROTOCOL_VERSION,
            hostname=self._identity.hostname,
            running_jobs=sorted(self._runner.running()),
            finished_jobs=self._mailbox.finished_jobs(),
            interrupted_jobs=self._runner.interrupted(),
        )

    async def _abandon_interrupted(self, *, after: asyncio.Event) -> None:
        if not self._runner.interrupted():
            return
        await after.wait()
        await asyncio.sleep(self._recovery_wait)
        await self._runner.abandon_interrupted()

    async def _receive(self, websocket: ClientConnection, rules: session.AgentSession,
                       established: asyncio.Event) -> None:
        try:
            async for message in websocket:
                await self._handle(websocket, rules, message, established)
        except ConnectionClosed:
            return  # run() logs how it closed

    async def _handle(self, websocket: ClientConnection, rules: session.AgentSession, message: str | bytes,
                      established: asyncio.Event) -> None:
        try:
            frame = protocol.decode(message)
        except protocol.ProtocolError as error:
            log.warning("invalid frame from the operator: %s", error)
            await self._send(websocket, protocol.Error(code="invalid-frame", message=str(error), ref=error.ref))
            return
        for event in rules.receive(frame, now=asyncio.get_running_loop().time()):
            match event:
                case session.Apply(schedule_set=schedule_set):
                    ack = await self._timer.apply(schedule_set)
                    for rejected in ack.rejected:
                        log.warning("schedule %s generation %d rejected: %s",
                                    rejected.id, rejected.generation, rejected.error)
                    log.info("schedule set version %d applied: %d schedule(s), %d rejected",
                             ack.version, len(ack.applied), len(ack.rejected))
                    await self._send(websocket, rules.acked(ack))
                    established.set()
                case session.Run(command=command):
                    log.info("job %s: %s requested", command.job, command.type.value)
                    await self._runner.start(command)
                case session.Cancel(job=job):
                    if not await self._runner.cancel(job):
                        log.info("job %s: cancel requested, but it is not running here", job)
                case session.Settled(number=number, receipt=receipt):
                    if isinstance(receipt, protocol.FireResult) and receipt.outcome in (
                            protocol.FireOutcome.REFUSED, protocol.FireOutcome.MISSED):
                        log.warning("fire of %s at %s %s by the operator: %s", receipt.id,
                                    receipt.scheduled_at.isoformat(), receipt.outcome.value, receipt.reason)
                    await self._mailbox.delivered([number])
                case session.Retry(reason=reason, after=after):
                    log.info("the operator asks for a message again in %.1f s: %s", after, reason)
                    self._mailbox.wake()
                case session.Reply(error=answer):
                    log.warning("invalid frame from the operator: %s", answer.message)
                    await self._send(websocket, answer)
                case session.Reported(error=reported):
                    log.warning("the operator reports %s about frame %s: %s",
                                reported.code, reported.ref, reported.message)

    async def _deliver(self, websocket: ClientConnection, rules: session.AgentSession, *,
                       after: asyncio.Event) -> None:
        """From the first ack on: send what the session says is due (new messages, and those
        whose receipt is overdue or was refused for now), then wait for a post, a receipt
        or the next resend time. A message that needs no receipt leaves the mailbox once sent."""
        await after.wait()
        loop = asyncio.get_running_loop()
        try:
            while True:
                sent = []
                for send in rules.due(self._mailbox.items(), now=loop.time()):
                    await websocket.send(protocol.encode(send.payload, frame_id=send.frame_id))
                    if send.settles:
                        sent.append(send.number)
                if sent:
                    await self._mailbox.delivered(sent)
                wake = rules.wake_at()
                await self._mailbox.wait(None if wake is None else max(0.0, wake - loop.time()))
        except ConnectionClosed:
            pass  # _receive sees the same close and ends the session

    async def _send(self, websocket: ClientConnection, payload: protocol.Payload) -> None:
        await websocket.send(protocol.encode(payload))


def _closed(received: Close | None) -> retry.Closed:
    """The end of a connection as the operator's close frame says; without one, an abnormal closure."""
    if received is None:
        return retry.Closed(CloseCode.ABNORMAL_CLOSURE)
    return retry.Closed(received.code, received.reason)
