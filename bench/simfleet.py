"""Simulated agents: many lightweight clients of the real wire protocol in one process.

A :class:`SimAgent` does what a real agent does on the wire and nothing else: it connects
with its bearer token, says ``hello``, acknowledges every ``schedule.set`` with
``schedule.ack`` (applying everything), and answers ``command.run`` with ``job.started`` and
``job.done`` at once (no restic). A :class:`Firer` sends each agent's ``schedule.fire`` at
the nominal times of the schedules the operator gave it, computed with the project's own
cron (restic_manager.cron), and records when each one left.

:class:`Fleet` owns every agent's task; a benchmark owns the fleet's ``run``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from restic_manager import cron, protocol
from restic_manager.agent.retry import Backoff

log = logging.getLogger(__name__)

PING_INTERVAL = 20.0  # as the real agent's keepalive (agent/connection.py Endpoint)
RECONNECTS = 3
CONNECT_TIMEOUT = 60.0


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


@dataclass
class SimAgent:
    name: str
    token: str
    entries: tuple[protocol.ScheduleEntry, ...] = ()
    acked_version: int = -1
    sets: int = 0
    jobs: int = 0
    drops: int = 0
    acked_at: float = 0.0  # when it last acknowledged a set (epoch seconds)
    commands: dict[str, float] = field(default_factory=dict)  # by job (namespace/name): when its command.run came
    errors: list[str] = field(default_factory=list)
    connection: ClientConnection | None = None

    async def send(self, text: str) -> bool:
        if self.connection is None:
            return False
        try:
            await self.connection.send(text)
            return True
        except ConnectionClosed:
            return False

    def hello(self) -> str:
        return protocol.encode(protocol.Hello(
            agent=self.name, agent_version="bench", restic_version="0.19.1",
            protocol_version=protocol.PROTOCOL_VERSION, hostname=f"{self.name}.bench"))

    def handle(self, message: str | bytes) -> list[str]:
        """The frames to send back for one frame from the operator."""
        frame = protocol.decode(message)
        match frame.payload:
            case protocol.ScheduleSet() as schedule_set:
                self.entries = tuple(schedule_set.schedules)
                self.sets += 1
                self.acked_version = schedule_set.version
                self.acked_at = time.time()
                return [protocol.encode(protocol.ScheduleAck(
                    version=schedule_set.version, applied_at=utcnow(),
                    applied=[protocol.AppliedEntry(id=e.id, generation=e.generation) for e in schedule_set.schedules]))]
            case protocol.CommandRun(job=job):
                self.jobs += 1
                self.commands[job] = time.time()
                now = utcnow()
                return [protocol.encode(protocol.JobStarted(job=job, started_at=now)),
                        protocol.encode(protocol.JobDone(job=job, outcome=protocol.Outcome.SUCCEEDED, exit_code=0,
                                                         finished_at=utcnow()))]
            case protocol.Error() as error:
                self.errors.append(f"{error.code}: {error.message}")
                return []
            case _:
                return []


class Fleet:
    """Runs ``agents`` against the operator at ``url`` until cancelled.

    At most ``handshakes`` connections are being opened at a time, as a real fleet coming
    up is spread out by its jittered backoff rather than arriving in one instant. With a
    ``backoff`` (the real agent's, agent/connection.py), an agent reconnects for as long as
    the fleet runs, waiting as the real agent does; without, it gives up after a few tries.
    """

    def __init__(self, agents: Sequence[SimAgent], *, url: str, handshakes: int = 64,
                 backoff: Backoff | None = None) -> None:
        self._backoff = backoff
        self._rng = random.Random(0)
        self.agents: list[SimAgent] = []
        self.by_name: dict[str, SimAgent] = {}
        self._additions: asyncio.Queue[list[SimAgent]] = asyncio.Queue()
        self._url = url
        self._gate = asyncio.Semaphore(handshakes)
        self._changed = asyncio.Condition()
        # Counters, so that a waiter's condition costs O(1) however large the fleet.
        self._connected = 0
        self._acked = 0
        self._commands = 0
        self.add(agents)

    async def run(self) -> None:
        """Every agent's connection, including those added later, until cancelled."""
        async with asyncio.TaskGroup() as group:
            while True:
                for agent in await self._additions.get():
                    group.create_task(self._run_agent(agent))

    def add(self, agents: Iterable[SimAgent]) -> None:
        """More agents, started by :meth:`run`."""
        batch = list(agents)
        self.agents += batch
        self.by_name.update((agent.name, agent) for agent in batch)
        self._additions.put_nowait(batch)

    async def until(self, what: str, holds: Callable[[], bool], *, timeout: float) -> float:
        """Wait until ``holds()`` (re-checked whenever an agent's state changes); seconds taken."""
        start = time.monotonic()
        try:
            async with asyncio.timeout(timeout), self._changed:
                await self._changed.wait_for(holds)
        except TimeoutError:
            raise TimeoutError(f"simulated fleet: not {what} within {timeout:.0f}s") from None
        return time.monotonic() - start

    def connected(self) -> int:
        return self._connected

    def acked(self) -> int:
        """Agents that have acknowledged at least one set."""
        return self._acked

    def commands_received(self) -> int:
        """``command.run`` frames the agents have received."""
        return self._commands

    def commands(self) -> dict[str, float]:
        """When each job's ``command.run`` reached its agent; reads every agent, so a waiter
        checks :meth:`commands_received` first."""
        return {job: at for agent in self.agents for job, at in agent.commands.items()}

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def _run_agent(self, agent: SimAgent) -> None:
        if self._backoff is not None:
            await self._reconnect_forever(agent, self._backoff)
            return
        for attempt in range(RECONNECTS + 1):
            try:
                await self._session(agent)
            except (OSError, TimeoutError, InvalidHandshake, ConnectionClosed) as error:
                agent.errors.append(f"connection {attempt + 1}: {type(error).__name__}: {error}")
            finally:
                await self._dropped(agent)
            await asyncio.sleep(1.0 + attempt)
        log.warning("agent %s gave up after %d connections: %s", agent.name, RECONNECTS + 1, agent.errors[-1:])

    async def _dropped(self, agent: SimAgent) -> None:
        """A session of ``agent`` ended: count it, if it had got as far as connecting."""
        if agent.connection is not None:
            agent.connection = None
            agent.drops += 1
            self._connected -= 1
            await self._notify()

    async def _reconnect_forever(self, agent: SimAgent, backoff: Backoff) -> None:
        retry = 0
        while True:
            sets = agent.sets
            try:
                await self._session(agent)
            except (OSError, TimeoutError, InvalidHandshake, ConnectionClosed):
                pass
            finally:
                await self._dropped(agent)
            retry = 0 if agent.sets != sets else retry  # a session that got an ack was a success
            await asyncio.sleep(backoff.delay(retry, self._rng))
            retry += 1

    async def _session(self, agent: SimAgent) -> None:
        async with self._gate:
            websocket = await connect(self._url, additional_headers={"Authorization": f"Bearer {agent.token}"},
                                      ping_interval=PING_INTERVAL, open_timeout=CONNECT_TIMEOUT,
                                      max_size=protocol.MAX_FRAME_BYTES)
            await websocket.send(agent.hello())
        async with websocket:
            agent.connection = websocket
            self._connected += 1
            await self._notify()
            async for message in websocket:
                sets, jobs = agent.sets, agent.jobs
                for reply in agent.handle(message):
                    await websocket.send(reply)
                if agent.sets != sets:
                    self._acked += sets == 0
                self._commands += agent.jobs - jobs
                if (agent.sets, agent.jobs) != (sets, jobs):
                    await self._notify()


# --- fires ----------------------------------------------------------------------------------


@functools.lru_cache(maxsize=65536)
def _cron(expression: str, time_zone: str, name: str) -> cron.Cron:
    return cron.Cron(expression, time_zone, name=name)


Due = list[tuple[SimAgent, protocol.ScheduleEntry]]


def next_fires(agents: Iterable[SimAgent], after: datetime) -> tuple[datetime | None, Due]:
    """The earliest fire time strictly after ``after`` over every agent's applied schedules,
    and the (agent, schedule) pairs that fire then."""
    earliest: datetime | None = None
    due: Due = []
    for agent in agents:
        for entry in agent.entries:
            if entry.suspend:
                continue
            when = _cron(entry.schedule, entry.time_zone, entry.id).next_after(after)
            if earliest is None or when < earliest:
                earliest, due = when, [(agent, entry)]
            elif when == earliest:
                due.append((agent, entry))
    return earliest, due


@dataclass(frozen=True)
class SentFire:
    agent: str
    schedule: str
    scheduled_at: float  # epoch seconds
    sent_at: float


class Firer:
    """Sends the fleet's fires at their nominal times until ``until`` (epoch seconds)."""

    def __init__(self, fleet: Fleet, *, after: float, until: float) -> None:
        self._fleet = fleet
        self._after = datetime.fromtimestamp(after, timezone.utc)
        self._until = until
        self.sent: list[SentFire] = []

    async def run(self) -> None:
        after = self._after
        while True:
            when, due = next_fires(self._fleet.agents, after)
            if when is None or when.timestamp() > self._until:
                return
            # Frames are encoded before the nominal time so that sending them costs little.
            frames = [(agent, entry, protocol.encode(protocol.ScheduleFire(
                id=entry.id, uid=entry.uid, generation=entry.generation, scheduled_at=when))) for agent, entry in due]
            while (remaining := when.timestamp() - time.time()) > 0:
                await asyncio.sleep(remaining)
            for agent, entry, text in frames:
                if await agent.send(text):
                    self.sent.append(SentFire(agent.name, entry.id, when.timestamp(), time.time()))
            after = when
