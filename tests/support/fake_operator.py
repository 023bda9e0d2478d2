"""Test stand-ins for the agent's peers: a real WebSocket server that speaks the protocol in
place of the operator, a clock for the agent's timer that moves only when told, and a job
runner that records what the connection asks of it.

    async with FakeOperator(token="t0ken") as operator:
        ...  # point an agent Connection at operator.url
        hello = await operator.expect(protocol.Hello)
        ack = await operator.apply(schedules, version=1)

Frames from every connection land in one queue, in order; `expect` takes the next one and
checks its type. Every wait is on an event (but `wait_unread`'s, which has none to wait
on), bounded by `TIMEOUT` so a missing frame fails the test instead of hanging it.
"""

from __future__ import annotations

import array
import asyncio
import fcntl
import termios
from collections.abc import Sequence
from datetime import datetime
from http import HTTPStatus
from typing import TypeVar

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from restic_manager import protocol

TIMEOUT = 5.0
P = TypeVar("P", bound=protocol.Payload)


class FakeOperator:
    """An operator's agent endpoint on 127.0.0.1 that records what agents send and sends
    what the test says. One agent at a time is enough for the agent's own tests."""

    def __init__(self, *, token: str | None = None, protocol_version: int | None = protocol.PROTOCOL_VERSION,
                 refusal: str = "unknown-token") -> None:
        self.token = token
        self.refusal = refusal  # the reason code a refused handshake names
        self.protocol_version = protocol_version  # named in the handshake response; None: not at all
        self.connections = 0
        self.closes: list[tuple[int | None, str]] = []  # (code, reason) of each finished connection
        self._frames: asyncio.Queue[protocol.Frame | protocol.ProtocolError] = asyncio.Queue()
        self._connected = asyncio.Condition()
        self._closed = asyncio.Condition()
        self._current: ServerConnection | None = None
        self._server: Server | None = None

    async def __aenter__(self) -> FakeOperator:
        self._server = await serve(self._handle, "127.0.0.1", 0, process_request=self._admit,
                                   process_response=self._name_protocol)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = next(iter(self._server.sockets)).getsockname()[:2]
        return f"ws://{host}:{port}/agent"

    # --- what the test does ---------------------------------------------------------------

    async def receive(self) -> protocol.Frame:
        """The next frame any agent sent; a frame that failed validation fails the test."""
        async with asyncio.timeout(TIMEOUT):
            item = await self._frames.get()
        if isinstance(item, protocol.ProtocolError):
            raise AssertionError(f"the agent sent an invalid frame: {item}")
        return item

    async def expect(self, kind: type[P]) -> P:
        """The next frame's payload, which must be a `kind`."""
        return (await self.expect_frame(kind)).payload  # type: ignore[return-value]

    async def expect_frame(self, kind: type[protocol.Payload]) -> protocol.Frame:
        """The next frame, whose payload must be a `kind`."""
        frame = await self.receive()
        assert isinstance(frame.payload, kind), f"expected {kind.TYPE}, got {frame.type}: {frame.payload!r}"
        return frame

    async def settle(self, frame: protocol.Frame,
                     outcome: protocol.FireOutcome = protocol.FireOutcome.CREATED) -> None:
        """Answer a schedule.fire with its fire.result, or a job.done with its job.done.ack."""
        match frame.payload:
            case protocol.ScheduleFire() as fire:
                await self.send(protocol.FireResult(ref=frame.id, id=fire.id, scheduled_at=fire.scheduled_at,
                                                    outcome=outcome, reason="" if outcome.final else "busy"))
            case protocol.JobDone(job=job):
                await self.send(protocol.JobDoneAck(ref=frame.id, job=job))
            case _:
                raise AssertionError(f"{frame.type} takes no receipt")

    async def send(self, payload: protocol.Payload, *, frame_id: str | None = None) -> str:
        """Send `payload` to the connected agent; returns the frame id."""
        frame_id = frame_id or protocol.new_id()
        await self.send_raw(protocol.encode(payload, frame_id=frame_id))
        return frame_id

    async def send_raw(self, text: str | bytes) -> None:
        await self._connection().send(text)

    async def apply(self, schedules: Sequence[protocol.ScheduleEntry], *, version: int) -> protocol.ScheduleAck:
        """Send a schedule.set and return the agent's ack, which must be the next frame."""
        await self.send(protocol.ScheduleSet(version=version, schedules=list(schedules)))
        ack = await self.expect(protocol.ScheduleAck)
        assert ack.version == version
        return ack

    async def wait_connected(self, count: int) -> None:
        """Until the `count`-th connection has been accepted."""
        async with asyncio.timeout(TIMEOUT), self._connected:
            await self._connected.wait_for(lambda: self.connections >= count)

    async def wait_closed(self, count: int) -> None:
        """Until `count` connections have ended."""
        async with asyncio.timeout(TIMEOUT), self._closed:
            await self._closed.wait_for(lambda: len(self.closes) >= count)

    async def close(self, code: int, reason: str) -> None:
        """End the current connection as the operator does, with a close code and reason."""
        connection = self._connection()
        ended = len(self.closes) + 1
        await connection.close(code, reason)
        await self.wait_closed(ended)

    async def drop(self) -> None:
        """Cut the current connection as a network failure would: no close frame."""
        connection = self._connection()
        ended = len(self.closes) + 1
        connection.transport.abort()
        await self.wait_closed(ended)

    def deafen(self) -> None:
        """Stop reading from the connected agent, as a stalled operator would: what the agent
        sends from now on stays unread (and its pings unanswered)."""
        self._connection().transport.pause_reading()

    async def wait_unread(self) -> None:
        """Until the agent has sent something a deafened operator has not read. The kernel
        offers no event for that, so this polls the socket's count of unread bytes."""
        sock = self._connection().transport.get_extra_info("socket")
        async with asyncio.timeout(TIMEOUT):
            while _unread_bytes(sock.fileno()) == 0:
                await asyncio.sleep(0.01)

    # --- the server side ------------------------------------------------------------------

    def _connection(self) -> ServerConnection:
        assert self._current is not None, "no agent is connected"
        return self._current

    def _admit(self, connection: ServerConnection, request: Request) -> Response | None:
        if self.token is not None and request.headers.get("Authorization") != f"Bearer {self.token}":
            response = connection.respond(HTTPStatus.UNAUTHORIZED, "Unauthorized\n")
            response.headers[protocol.REFUSAL_HEADER] = self.refusal
            return response
        return None

    def _name_protocol(self, connection: ServerConnection, request: Request, response: Response) -> None:
        if self.protocol_version is not None:
            response.headers[protocol.PROTOCOL_HEADER] = str(self.protocol_version)

    async def _handle(self, connection: ServerConnection) -> None:
        self._current = connection
        async with self._connected:
            self.connections += 1
            self._connected.notify_all()
        try:
            async for message in connection:
                try:
                    self._frames.put_nowait(protocol.decode(message))
                except protocol.ProtocolError as error:
                    self._frames.put_nowait(error)
        except ConnectionClosed:
            pass  # an abnormal end is recorded below like any other
        finally:
            if self._current is connection:
                self._current = None
            async with self._closed:
                self.closes.append((connection.close_code, connection.close_reason or ""))
                self._closed.notify_all()


def _unread_bytes(fd: int) -> int:
    count = array.array("i", [0])
    fcntl.ioctl(fd, termios.FIONREAD, count)
    return count[0]


class ManualClock:
    """A `Clock` for the agent's timer (agent/scheduler.py) that moves only when the test
    says so, and records every sleep the timer takes."""

    def __init__(self, start: datetime) -> None:
        self._now = start
        self.sleeps: list[datetime] = []  # the deadline of every sleep_until call, in order
        self._sleeping = False
        self._changed = asyncio.Condition()

    def now(self) -> datetime:
        return self._now

    async def sleep_until(self, deadline: datetime) -> None:
        async with self._changed:
            self.sleeps.append(deadline)
            self._sleeping = True
            self._changed.notify_all()
            try:
                await self._changed.wait_for(lambda: self._now >= deadline)
            finally:
                self._sleeping = False
                self._changed.notify_all()

    async def asleep(self, *, after: int = 0) -> datetime:
        """Until the timer sleeps towards a deadline still ahead, in its sleep number `after`+1
        or later; returns that deadline."""

        def waiting() -> bool:
            return self._sleeping and len(self.sleeps) > after and self.sleeps[-1] > self._now

        async with asyncio.timeout(TIMEOUT), self._changed:
            await self._changed.wait_for(waiting)
            return self.sleeps[-1]

    async def set(self, instant: datetime) -> None:
        """Jump to `instant` (forwards or back), as a wall clock can."""
        async with self._changed:
            self._now = instant
            self._changed.notify_all()

    async def run_until(self, instant: datetime) -> None:
        """Let time pass until `instant`, stopping at each deadline the timer sleeps towards
        on the way (as a real clock would wake it), then leave the timer asleep."""
        while (deadline := await self.asleep()) <= instant:
            await self.set(deadline)
        await self.set(instant)


class FakeRunner:
    """Records what the connection asks of the job runner."""

    def __init__(self, running: list[str], interrupted: list[str] = ()) -> None:
        self.jobs = list(running)
        self.lost = list(interrupted)
        self.abandoned = asyncio.Event()
        self.commands: asyncio.Queue[protocol.CommandRun] = asyncio.Queue()
        self.cancelled: list[str] = []
        self.closed = False

    async def start(self, command: protocol.CommandRun) -> None:
        self.jobs.append(command.job)
        self.commands.put_nowait(command)

    async def cancel(self, job: str) -> bool:
        self.cancelled.append(job)
        return job in self.jobs

    def running(self) -> list[str]:
        return list(self.jobs)

    def interrupted(self) -> list[str]:
        return list(self.lost)

    async def abandon_interrupted(self) -> None:
        self.lost.clear()
        self.abandoned.set()

    async def aclose(self) -> None:
        self.closed = True
