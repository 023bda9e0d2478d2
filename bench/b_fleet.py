"""Benchmark 4 — fleet size: the operator's memory and CPU with 1,000 / 5,000 / 10,000
connected idle agents, and apply → Applied at each size.

Every agent has its Agent object, its token Secret and one (yearly) Schedule. At each step
the fleet grows to N: objects first (RSS "objects"), then the new agents connect and ack
(RSS "connected"), then the operator is left idle for a window (CPU, RSS), then Schedules
are edited at a steady rate (apply → Applied). Per-agent memory is (RSS connected − RSS of
the operator with nothing to watch) ÷ N, in kB (1,000 bytes). Targets: ≤ 50 kB per agent; apply → Applied
p99 ≤ 1 s at 10,000.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import sys
import time
from pathlib import Path
from typing import Any

from cluster import Usage, profile, rss_bytes, settle, thread_count
from common import NAMESPACE, Context, background, elapsed, machine, stack, write_result
from kubeapi import bounded, paced
from simfleet import Fleet
from stats import check, summary
from world import AppliedWatch, agent_name, agents_with_tokens, create_schedule, edit_schedule, prepare_namespace, \
    schedule_body

NAME = "fleet"
PANELS = 2
WAIT = 60.0
STEP_TIMEOUT = 1200.0
HERE = Path(__file__).resolve().parent


def schedule_of(index: int) -> str:
    return f"yearly-{index:05d}"


class Grower:
    """Grows one stack's fleet step by step; what each step cost is returned as a dict."""

    def __init__(self, api: Any, operator: Any, fleet: Fleet, watch: AppliedWatch) -> None:
        self.api = api
        self.operator = operator
        self.fleet = fleet
        self.watch = watch
        self.size = 0
        self.minute: dict[int, int] = {}

    async def grow(self, n: int) -> dict[str, Any]:
        step: dict[str, Any] = {"agents": n}
        start = time.monotonic()
        new = range(self.size, n)
        agents = await agents_with_tokens(self.api, NAMESPACE, new, timeout=STEP_TIMEOUT)

        async def create(index: int) -> None:
            await create_schedule(self.api, NAMESPACE, schedule_body(
                schedule_of(index), agent=agent_name(index), expression="0 0 1 1 *"))
            self.minute[index] = 0

        await bounded(new, create, limit=32)
        step["objects_created_s"] = elapsed(start)
        await settle(self.operator.pid, below_percent=10, timeout=STEP_TIMEOUT)
        step["rss_objects_mib"] = round(rss_bytes(self.operator.pid) / 2**20, 1)
        start = time.monotonic()
        self.fleet.add(agents)
        await self.fleet.until(f"{n} connected and acked", lambda: self.fleet.acked() >= n, timeout=STEP_TIMEOUT)
        step["connect_s"] = elapsed(start)
        deadline = time.monotonic() + STEP_TIMEOUT
        names = [schedule_of(i) for i in range(n)]
        while self.watch.applied_count(names) < n:
            if time.monotonic() > deadline:
                missing = n - self.watch.applied_count(names)
                raise TimeoutError(f"{missing} Schedules not Applied after {STEP_TIMEOUT:.0f}s")
            await asyncio.sleep(1.0)
        step["all_applied_s"] = elapsed(start)
        step["settle_s"] = round(await settle(self.operator.pid, below_percent=10, timeout=STEP_TIMEOUT), 1)
        self.size = n
        return step

    async def idle(self, seconds: float, pids: dict[str, int]) -> dict[str, Any]:
        usage = Usage(pids)
        await asyncio.sleep(seconds)  # the measurement window itself
        return usage.read()

    async def probe(self, *, rate: float, seconds: float) -> dict[str, Any]:
        """Edit random Schedules at ``rate`` for ``seconds``; apply → Applied latencies."""
        chosen = random.Random(self.size).sample(range(self.size), min(self.size, int(rate * seconds)))
        latencies: list[float] = []
        missing = 0

        async def edit(index: int) -> None:
            nonlocal missing
            self.minute[index] += 1
            started, generation, _ = await edit_schedule(self.api, NAMESPACE, schedule_of(index),
                                                         f"{self.minute[index] % 60} 0 1 1 *")
            at = await self.watch.wait(schedule_of(index), generation, timeout=WAIT)
            if at is None:
                missing += 1
            else:
                latencies.append(at - started)

        await paced(chosen, edit, rate=rate)
        return {**summary(latencies, scale=1000), "not_applied_within_60s": missing}


async def run(ctx: Context) -> dict[str, Any]:
    steps_n = ctx.size(quick=[200, 1000], full=[1000, 5000, 10000])
    idle_seconds = ctx.size(quick=20, full=60)
    rate, probe_seconds = ctx.size(quick=(5.0, 10), full=(10.0, 30))
    result: dict[str, Any] = {"machine": machine(ctx), "parameters": {
        "steps": steps_n, "idle_window_s": idle_seconds, "edit_rate_per_s": rate, "edit_seconds": probe_seconds,
        "schedules_per_agent": 1}, "steps": []}
    async with stack(ctx, NAME) as (plane, operator, api):
        await prepare_namespace(api, NAMESPACE)
        fleet = Fleet([], url=operator.url)
        watch = AppliedWatch(api, NAMESPACE)
        grower = Grower(api, operator, fleet, watch)
        pids = {"operator": operator.pid, **plane.pids()}
        async with background(fleet.run(), watch.run()):
            await settle(operator.pid, below_percent=5, timeout=120)
            baseline = await grower.idle(idle_seconds, pids)
            result["baseline"] = baseline
            rss0 = baseline["operator"]["rss_mib"]
            for n in steps_n:
                try:
                    step = await grower.grow(n)
                except TimeoutError as error:
                    result["steps"].append({"agents": n, "error": str(error)})
                    break
                step["idle"] = await grower.idle(idle_seconds, pids)
                step["operator_threads"] = thread_count(operator.pid)
                rss = step["idle"]["operator"]["rss_mib"]
                step["rss_connected_mib"] = rss
                step["kb_per_agent"] = round((rss - rss0) * 2**20 / 1000 / n, 1)
                previous = result["steps"][-1]["agents"] if result["steps"] else 0
                # What connecting the step's new agents added, beyond their objects.
                step["kb_per_connection"] = round((rss - step["rss_objects_mib"]) * 2**20 / 1000 / (n - previous), 1)
                step["apply_ms"] = await grower.probe(rate=rate, seconds=probe_seconds)
                step["drops"] = sum(agent.drops for agent in fleet.agents)
                result["steps"].append(step)
                # Written after every step, so a run stopped early still leaves what it measured.
                write_result(ctx, NAME, {**result, "partial": f"after the step to {n} agents"})
            done = [s for s in result["steps"] if "error" not in s]
            largest = done[-1] if done else None
            result["targets"] = [
                check(f"operator memory per agent at {largest['agents'] if largest else '?'}",
                      largest["kb_per_agent"] if largest else None, limit=50, unit="kB"),
                check(f"apply → Applied p99 at {largest['agents'] if largest else '?'}",
                      largest["apply_ms"].get("p99") if largest else None, limit=1000, unit="ms"),
            ]
            if largest is not None and largest["agents"] != steps_n[-1]:
                for target in result["targets"]:
                    target["met"] = False
            if largest is not None and ctx.wants_profile(result["targets"][1:]):
                stacks = ctx.result_path(f"{NAME}-profile", "stacks.txt")
                probe, cpu = await asyncio.gather(grower.probe(rate=rate, seconds=probe_seconds),
                                                  profile(operator.pid, seconds=probe_seconds, output=stacks))
                result["profile_cpu"] = {"during": f"a second apply probe at {largest['agents']} agents",
                                         "apply_ms_while_profiled": probe, **cpu}
                idle_stacks = ctx.result_path(f"{NAME}-idle-profile", "stacks.txt")
                result["profile_idle"] = {"during": f"{idle_seconds}s idle at {largest['agents']} agents",
                                          **await profile(operator.pid, seconds=idle_seconds, output=idle_stacks)}
    if ctx.wants_profile(result["targets"][:1]):
        try:
            result["profile_memory"] = await memory_profile(ctx, n=ctx.size(quick=200, full=1000))
        except Exception as error:  # noqa: BLE001  (the main figures stand without the profile)
            result["profile_memory"] = {"error": f"{type(error).__name__}: {error}"}
    return result


async def memory_profile(ctx: Context, *, n: int) -> dict[str, Any]:
    """tracemalloc's largest live allocation sites in an operator holding ``n`` connected agents."""
    out = ctx.work / f"{NAME}-tracemalloc.json"
    out.unlink(missing_ok=True)
    os.environ["BENCH_TRACEMALLOC_OUT"] = str(out)  # inherited by the operator subprocess
    wrapper = [sys.executable, str(HERE / "traced_operator.py")]
    async with stack(ctx, f"{NAME}-memory", wrapper=wrapper) as (plane, operator, api):
        await prepare_namespace(api, NAMESPACE)
        fleet = Fleet([], url=operator.url)
        watch = AppliedWatch(api, NAMESPACE)
        async with background(fleet.run(), watch.run()):
            step = await Grower(api, operator, fleet, watch).grow(n)
            operator.signal(signal.SIGUSR1)
            deadline = time.monotonic() + 300
            while not out.exists() and time.monotonic() < deadline:
                await asyncio.sleep(1.0)
            if not out.exists():
                return {"error": "the traced operator wrote no tracemalloc snapshot within 300s"}
            await asyncio.sleep(2.0)  # let the write finish
            snapshot = json.loads(out.read_text())
    path = ctx.result_path(f"{NAME}-tracemalloc", "json")
    path.write_text(json.dumps(snapshot, indent=1) + "\n")
    return {"agents": n, "rss_mib_with_tracemalloc": step.get("rss_objects_mib"), "file": path.name,
            "traced_mib": snapshot["traced_mib"], "by_file": snapshot["by_file"][:15],
            "by_line": snapshot["by_line"][:20]}


def plot(result: dict[str, Any], axes: Any) -> None:
    steps = [s for s in result["steps"] if "error" not in s]
    ns = [s["agents"] for s in steps]
    left, right = axes
    left.plot(ns, [s["rss_connected_mib"] for s in steps], "o-", label="operator RSS, connected and idle (MiB)")
    left.plot(ns, [s["rss_objects_mib"] for s in steps], "s--", label="operator RSS, objects only (MiB)")
    left.plot(ns, [result["baseline"]["operator"]["rss_mib"] + n * 50_000 / 2**20 for n in ns], ":", color="grey",
              label="target: baseline + 50 kB per agent")
    twin = left.twinx()
    twin.plot(ns, [s["idle"]["operator"]["cpu_percent"] for s in steps], "^-", color="tab:red",
              label="operator CPU while idle (% of a core)")
    twin.set_ylabel("CPU % of one core", color="tab:red")
    left.set_xlabel("connected idle agents")
    left.set_ylabel("MiB")
    left.grid(True, alpha=0.3)
    left.set_title("operator memory and idle CPU by fleet size")
    twin.legend(loc="lower right", fontsize=8)
    right.plot(ns, [s["apply_ms"].get("p50") for s in steps], "o-", label="p50")
    right.plot(ns, [s["apply_ms"].get("p99") for s in steps], "s-", label="p99")
    right.axhline(1000, color="grey", linestyle="--", linewidth=1, label="p99 target at 10,000: 1 s")
    right.set_xlabel("connected idle agents")
    right.set_ylabel("apply → Applied (ms, log scale)")
    right.set_yscale("log")
    right.grid(True, which="both", alpha=0.3)
    for failed in (s for s in result["steps"] if "error" in s):
        left.text(0.02, 0.6, f"step to {failed['agents']:,} agents did not finish:\n{failed['error']}",
                  transform=left.transAxes, fontsize=8, color="tab:red")
    right.set_title(f"apply → Applied while the fleet is connected "
                    f"({result['parameters']['edit_rate_per_s']:g} edits/s)")
