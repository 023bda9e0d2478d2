"""Benchmark 5 — the agent's idle cost with 1,000 schedules.

The real agent (`restic-manager agent`, a subprocess with the real restic for its version
check) connects to a stand-in operator on 127.0.0.1 that records every frame with the
moment it arrived. Two phases:

* idle: 1,000 daily schedules that do not fire during the window — RSS, CPU, and the main
  thread's wake-ups (voluntary context switches in /proc) per minute: no per-second polling;
* firing: 1,000 schedules with seconds that fire every minute at D distinct seconds — how
  late each ``schedule.fire`` reaches the operator after its nominal time, RSS, and
  wake-ups per distinct fire time.

Beside the subprocess, the agent's own Scheduler and Timer run in-process on a clock that
counts the timer's sleeps, on the same 1,000 schedules and window: that count is the
timer's wake-ups, without the socket and disk work that delivering a fire adds.
Targets: RSS ≤ 40 MB; at most one timer wake-up per distinct fire time; fire sent within
50 ms of nominal p99.
"""

from __future__ import annotations

import asyncio
import math
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

import cluster
from cluster import cpu_seconds, profile, restic_binary, rss_bytes, voluntary_switches
from common import Context, background, machine
from restic_manager import protocol
from restic_manager.agent.scheduler import Scheduler, SystemClock, Timer
from stats import check, summary

NAME = "agent"
PANELS = 2
SCHEDULES = 1000
DISTINCT = 20  # distinct fire seconds per minute in the firing phase
TOKEN = "bench-agent-token"
MB = 1_000_000


class StandInOperator:
    """Serves one agent: records what it sends, with arrival times; sends sets and commands
    when told."""

    def __init__(self) -> None:
        self.frames: list[tuple[float, protocol.Frame]] = []
        self.connected = asyncio.Event()
        self._acks: asyncio.Queue[protocol.ScheduleAck] = asyncio.Queue()
        self._done: dict[str, asyncio.Future[tuple[float, protocol.JobDone]]] = {}
        self._connection: ServerConnection | None = None
        self.port = 0

    async def serve(self, started: asyncio.Event) -> None:
        # No server pings: the agent's wake-ups are then its own (its keepalive included).
        async with serve(self._handle, "127.0.0.1", 0, ping_interval=None, max_size=protocol.MAX_FRAME_BYTES,
                         process_response=_name_protocol) as server:
            self.port = next(iter(server.sockets)).getsockname()[1]
            started.set()
            await asyncio.Future()

    async def _handle(self, connection: ServerConnection) -> None:
        if connection.request is None or connection.request.headers.get("Authorization") != f"Bearer {TOKEN}":
            await connection.close(1008, "wrong token")
            return
        self._connection = connection
        self.connected.set()
        try:
            async for message in connection:
                at = time.time()
                frame = protocol.decode(message)
                self.frames.append((at, frame))
                if isinstance(frame.payload, protocol.ScheduleAck):
                    self._acks.put_nowait(frame.payload)
                elif isinstance(frame.payload, protocol.ScheduleFire):  # settled, as the operator would
                    fire = frame.payload
                    await connection.send(protocol.encode(protocol.FireResult(
                        ref=frame.id, id=fire.id, scheduled_at=fire.scheduled_at, outcome=protocol.FireOutcome.CREATED)))
                elif isinstance(frame.payload, protocol.JobDone):  # recorded, as the operator would
                    done = frame.payload
                    await connection.send(protocol.encode(protocol.JobDoneAck(ref=frame.id, job=done.job)))
                    waiting = self._done.get(done.job)
                    if waiting is not None and not waiting.done():
                        waiting.set_result((at, done))
        except ConnectionClosed:
            pass

    async def apply(self, entries: list[protocol.ScheduleEntry], *, version: int) -> protocol.ScheduleAck:
        assert self._connection is not None
        await self._connection.send(protocol.encode(protocol.ScheduleSet(version=version, schedules=entries)))
        async with asyncio.timeout(60):
            while True:
                ack = await self._acks.get()
                if ack.version == version:
                    return ack

    async def run(self, command: protocol.CommandRun, *, timeout: float) -> tuple[float, float, protocol.JobDone]:
        """Send ``command``; (when it was sent, when its job.done came, the job.done)."""
        assert self._connection is not None
        waiting = self._done[command.job] = asyncio.get_running_loop().create_future()
        try:
            sent = time.time()
            await self._connection.send(protocol.encode(command))
            async with asyncio.timeout(timeout):
                at, done = await waiting
        finally:
            del self._done[command.job]
        return sent, at, done

    def fires(self, since: float) -> list[tuple[float, protocol.ScheduleFire]]:
        return [(at, f.payload) for at, f in self.frames
                if isinstance(f.payload, protocol.ScheduleFire) and f.payload.scheduled_at.timestamp() >= since]


def _name_protocol(connection: ServerConnection, request: Any, response: Any) -> None:
    response.headers[protocol.PROTOCOL_HEADER] = str(protocol.PROTOCOL_VERSION)


def entries(prefix: str, expression: Any) -> list[protocol.ScheduleEntry]:
    return [protocol.ScheduleEntry(id=f"bench/{prefix}-{i:04d}", uid=str(uuid.uuid4()), generation=1,
                                   schedule=expression(i)) for i in range(SCHEDULES)]


class CountingClock(SystemClock):
    """The agent's own wall clock, counting the timer's sleeps that ran to their deadline:
    each is one wake-up of the timer."""

    def __init__(self) -> None:
        super().__init__()
        self.wakes = 0

    async def sleep_until(self, deadline: datetime) -> None:
        await super().sleep_until(deadline)
        self.wakes += 1


class Sampler:
    """The agent process's RSS every second (its peak matters, not one reading)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.rss: list[int] = []

    async def run(self) -> None:
        while True:
            self.rss.append(rss_bytes(self.pid))
            await asyncio.sleep(1.0)


async def window(pid: int, sampler: Sampler, seconds: float) -> dict[str, Any]:
    """The agent's CPU, main-thread wake-ups and peak RSS over the next ``seconds``."""
    cpu, wakes, first = cpu_seconds(pid), voluntary_switches(pid), len(sampler.rss)
    await asyncio.sleep(seconds)  # the measurement window itself
    samples = sampler.rss[first:] or [rss_bytes(pid)]
    return {"seconds": seconds, "cpu_seconds": round(cpu_seconds(pid) - cpu, 3),
            "main_thread_wakeups": voluntary_switches(pid) - wakes,
            "rss_peak_mb": round(max(samples) / MB, 1), "rss_last_mb": round(samples[-1] / MB, 1)}


def import_rss_mb() -> dict[str, float]:
    """RSS of a bare interpreter after importing each module: what the agent pays for its imports."""
    out = {}
    for module in ("restic_manager.agent.main", "restic_manager.cli"):
        code = (f"import {module}, os; "
                "print(int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE'))")
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                env=cluster.SOURCE.environment(), cwd=cluster.SOURCE.cwd)
        out[module] = round(int(result.stdout) / MB, 1)
    return out


async def run(ctx: Context) -> dict[str, Any]:
    idle_seconds = ctx.size(quick=30, full=180)
    firing_minutes = ctx.size(quick=1, full=3)
    result: dict[str, Any] = {"machine": machine(ctx), "parameters": {
        "schedules": SCHEDULES, "idle_window_s": idle_seconds, "firing_minutes": firing_minutes,
        "distinct_fire_seconds_per_minute": DISTINCT}}
    async with real_agent(ctx.work / NAME) as (stand_in, pid):
        await _measure(ctx, result, stand_in, pid, idle_seconds, firing_minutes)
    result["import_rss_mb"] = import_rss_mb()
    return result


@asynccontextmanager
async def real_agent(work: Path, *options: str) -> AsyncIterator[tuple[StandInOperator, int]]:
    """The real agent (a subprocess, its log in ``work``) connected to a stand-in operator:
    (the stand-in, the agent's pid). ``options``: more of the agent's flags."""
    work.mkdir(parents=True, exist_ok=True)
    (work / "token").write_text(TOKEN)
    stand_in = StandInOperator()
    listening = asyncio.Event()
    async with background(stand_in.serve(listening)):
        await listening.wait()
        argv = [*cluster.SOURCE.command(), "agent", "--server", f"ws://127.0.0.1:{stand_in.port}/agent", "--insecure",
                "--token-file", str(work / "token"), "--state-dir", str(work / f"state-{uuid.uuid4().hex[:6]}"),
                "--agent-name", "bench-agent", "--restic", str(restic_binary()), *options]
        with open(work / "agent.log", "ab") as log:
            process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       env=cluster.SOURCE.environment(), cwd=cluster.SOURCE.cwd)
        try:
            async with asyncio.timeout(60):
                await stand_in.connected.wait()
            await stand_in.apply([], version=1)  # the agent's first set, as an operator sends on connect
            yield stand_in, process.pid
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(process.wait, 20)
            except subprocess.TimeoutExpired:
                process.kill()
                await asyncio.to_thread(process.wait)


async def _measure(ctx: Context, result: dict[str, Any], stand_in: StandInOperator, pid: int,
                   idle_seconds: int, firing_minutes: int) -> None:
    sampler = Sampler(pid)
    async with background(sampler.run()):
        # Idle: daily times twelve hours away, so nothing fires in the window.
        hour = (datetime.now(timezone.utc).hour + 12) % 24
        ack = await stand_in.apply(entries("idle", lambda i: f"{i % 60} {hour} * * *"), version=2)
        assert len(ack.applied) == SCHEDULES, f"the agent rejected idle schedules: {ack.rejected[:3]}"
        await asyncio.sleep(2.0)  # let the apply's own work finish before measuring
        idle = await window(pid, sampler, idle_seconds)
        idle["main_thread_wakeups_per_minute"] = round(idle["main_thread_wakeups"] * 60 / idle_seconds, 1)
        result["idle"] = idle

        # Firing: the same number of schedules, at DISTINCT seconds of every minute.
        step = 60 // DISTINCT
        firing = entries("fire", lambda i: f"{(i % DISTINCT) * step} * * * * *")
        start = math.ceil((time.time() + 5) / 60) * 60
        ack = await stand_in.apply(firing, version=3)
        assert len(ack.applied) == SCHEDULES, f"the agent rejected firing schedules: {ack.rejected[:3]}"
        scheduler = Scheduler()
        clock = CountingClock()
        async def deliver(fires: list[protocol.ScheduleFire]) -> None:
            return None  # the subprocess's fires are the ones measured; here only wake-ups count

        async def nothing() -> None:
            return None

        timer = Timer(scheduler, clock=clock, deliver=deliver, save=nothing)
        await timer.apply(protocol.ScheduleSet(version=1, schedules=firing))
        seconds = firing_minutes * 60
        # The window starts and ends half a step before a fire time, so it holds exactly
        # DISTINCT fire times a minute however the wake-ups fall.
        async with background(timer.run()):
            await asyncio.sleep(start - step / 2 - time.time())
            wakes_before = clock.wakes
            fired = await window(pid, sampler, seconds)
            timer_wakes = clock.wakes - wakes_before
        await asyncio.sleep(5.0)  # the last fires' delivery
        distinct = DISTINCT * firing_minutes
        arrivals = [(at - fire.scheduled_at.timestamp()) for at, fire in stand_in.fires(start)
                    if fire.scheduled_at.timestamp() < start + seconds]
        fired.update({
            "distinct_fire_times": distinct,
            "fires_expected": SCHEDULES * firing_minutes,
            "fires_received": len(arrivals),
            "timer_wakeups_in_process": timer_wakes,
            "timer_wakeups_per_distinct_fire_time": round(timer_wakes / distinct, 2),
            "main_thread_wakeups_per_distinct_fire_time": round(fired["main_thread_wakeups"] / distinct, 1),
            "fire_lateness_ms": summary(arrivals, scale=1000),
            "within_50ms": round(sum(1 for a in arrivals if a <= 0.05) / max(len(arrivals), 1), 3),
        })
        result["firing"] = fired
        result["samples_ms"] = [round(a * 1000, 1) for a in arrivals]
        result["rss_mb_series"] = [round(r / MB, 1) for r in sampler.rss]
    peak = max(result["idle"]["rss_peak_mb"], result["firing"]["rss_peak_mb"])
    result["targets"] = [
        check("agent RSS with 1,000 schedules (peak)", peak, limit=40, unit="MB"),
        check("timer wake-ups per distinct fire time", result["firing"]["timer_wakeups_per_distinct_fire_time"],
              limit=1.0, unit="wake-ups"),
        check("fire sent within 50 ms of nominal, p99", result["firing"]["fire_lateness_ms"].get("p99"),
              limit=50, unit="ms"),
    ]
    if result["firing"]["fires_received"] < result["firing"]["fires_expected"]:
        result["targets"][2]["met"] = False
    if ctx.wants_profile(result["targets"]):
        # The firing set stays applied: 30 s hold ten fire times of fifty schedules each.
        stacks = await profile(pid, seconds=30, output=ctx.result_path(f"{NAME}-profile", "stacks.txt"))
        result["profile"] = {"during": "30 s of the firing phase (the agent subprocess)", **stacks}


def plot(result: dict[str, Any], axes: Any) -> None:
    from plots import cdf
    left, right = axes
    fired = result["firing"]
    cdf(left, result["samples_ms"], label=f"schedule.fire arrival − nominal (n={fired['fires_received']})")
    left.axvline(50, color="grey", linestyle="--", linewidth=1, label="target p99 ≤ 50 ms")
    left.set_xlabel("lateness (ms)")
    left.set_title(f"real agent, {result['parameters']['schedules']} schedules firing at "
                   f"{result['parameters']['distinct_fire_seconds_per_minute']} distinct seconds a minute\n"
                   f"p99 {fired['fire_lateness_ms'].get('p99')} ms; timer wake-ups per fire time "
                   f"{fired['timer_wakeups_per_distinct_fire_time']}")
    right.plot(range(len(result["rss_mb_series"])), result["rss_mb_series"], label="agent RSS (MB)")
    right.axhline(40, color="grey", linestyle="--", linewidth=1, label="target 40 MB")
    right.set_xlabel("seconds since the agent connected (idle phase, then firing)")
    right.set_ylabel("MB")
    right.set_ylim(bottom=0)
    right.grid(True, alpha=0.3)
    idle = result["idle"]
    right.set_title(f"RSS; idle: {idle['main_thread_wakeups_per_minute']} main-thread wake-ups/min, "
                    f"{idle['cpu_seconds']} CPU s in {idle['seconds']} s")
