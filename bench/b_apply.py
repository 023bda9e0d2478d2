"""Benchmark 1 — apply → Applied.

N simulated agents with S Schedules each (one namespace). Schedules are created at a steady
rate, then edited at a steady rate (each edit bumps metadata.generation); for every create
and edit, the time from the request leaving the harness to the harness reading that
generation's ``Applied`` condition True on a watch. Targets (edits): p50 ≤ 100 ms, p99 ≤ 250 ms.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from cluster import Usage, profile, settle
from common import NAMESPACE, Context, background, elapsed, machine, stack
from kubeapi import paced, per, request_counts
from simfleet import Fleet
from stats import check, summary
from kubeapi import crd
from world import (AppliedWatch, EventCount, agent_name, agents_with_tokens, create_schedule, edit_schedule,
                   prepare_namespace, schedule_body, schedule_name)

NAME = "apply"
WAIT = 60.0  # how long one apply may take to read Applied before it counts as not applied


def expression(minute: int) -> str:
    # Yearly at 00:MM on 1 January: never fires while a benchmark runs.
    return f"{minute % 60} 0 1 1 *"


async def run(ctx: Context) -> dict[str, Any]:
    agents_n = ctx.size(quick=100, full=1000)
    per_agent = 10
    create_rate = ctx.size(quick=50.0, full=100.0)
    edit_rate = ctx.size(quick=10.0, full=20.0)
    edit_seconds = ctx.size(quick=20, full=60)
    result: dict[str, Any] = {"machine": machine(ctx), "parameters": {
        "agents": agents_n, "schedules_per_agent": per_agent, "create_rate_per_s": create_rate,
        "edit_rate_per_s": edit_rate, "edit_seconds": edit_seconds}}
    phases: dict[str, float] = {}
    async with stack(ctx, NAME) as (plane, operator, api):
        await prepare_namespace(api, NAMESPACE)
        start = time.monotonic()
        agents = await agents_with_tokens(api, NAMESPACE, range(agents_n), timeout=900)
        phases["agents_and_tokens"] = elapsed(start)
        fleet = Fleet(agents, url=operator.url)
        watch = AppliedWatch(api, NAMESPACE)
        agent_writes = EventCount(api, crd(NAMESPACE, "agents"))
        async with background(fleet.run(), watch.run(), agent_writes.run()):
            start = time.monotonic()
            await fleet.until("all connected and acked", lambda: fleet.acked() >= agents_n, timeout=600)
            await watch.ready.wait()
            phases["agents_connected"] = elapsed(start)

            # Creates, slot-major so that consecutive creates go to different agents.
            current: dict[str, int] = {}
            bodies = []
            for slot in range(per_agent):
                for index in range(agents_n):
                    name = schedule_name(index, slot)
                    current[name] = slot * 5
                    bodies.append(schedule_body(name, agent=agent_name(index), expression=expression(slot * 5)))
            created: list[float] = []
            not_applied = {"create": 0, "edit": 0, "edit_profiled": 0}

            async def create(body: dict[str, Any]) -> None:
                started, generation = await create_schedule(api, NAMESPACE, body)
                at = await watch.wait(body["metadata"]["name"], generation, timeout=WAIT)
                if at is None:
                    not_applied["create"] += 1
                else:
                    created.append(at - started)

            start = time.monotonic()
            usage = Usage({"operator": operator.pid, **plane.pids()})
            await paced(bodies, create, rate=create_rate)
            result["usage_create"] = usage.read()
            phases["creates"] = elapsed(start)
            phases["settle_after_creates"] = round(await settle(operator.pid, below_percent=10, timeout=600), 1)

            names = [body["metadata"]["name"] for body in bodies]
            cursor = 0

            round_trips: list[float] = []

            async def edits(kind: str, count: int) -> list[float]:
                nonlocal cursor
                latencies: list[float] = []
                batch = [names[(cursor + i) % len(names)] for i in range(count)]
                cursor += count

                async def edit(name: str) -> None:
                    current[name] += 1
                    started, generation, answered = await edit_schedule(api, NAMESPACE, name,
                                                                        expression(current[name]))
                    round_trips.append(answered - started)
                    at = await watch.wait(name, generation, timeout=WAIT)
                    if at is None:
                        not_applied[kind] += 1
                    else:
                        latencies.append(at - started)

                await paced(batch, edit, rate=edit_rate)
                return latencies

            usage = Usage({"operator": operator.pid, **plane.pids()})
            writes_before = (watch.modified, agent_writes.modified)
            requests_before = await request_counts(api)
            edit_count = int(edit_rate * edit_seconds)
            edited = await edits("edit", edit_count)
            result["usage_edit"] = usage.read()
            await settle(operator.pid, below_percent=10, timeout=300)
            result["apiserver_requests_per_edit"] = per((await request_counts(api)) - requests_before, edit_count)
            result["writes_per_edit"] = {
                "schedule_status": round((watch.modified - writes_before[0] - edit_count) / edit_count, 2),
                "agent_status": round((agent_writes.modified - writes_before[1]) / edit_count, 2),
                "how": "MODIFIED watch events during the edit phase and until the operator settled, "
                       "less the edits themselves, per edit"}
            result["apiserver_patch_round_trip_ms"] = summary(round_trips, scale=1000)

            edit_summary = summary(edited, scale=1000)
            result["create_ms"] = summary(created, scale=1000)
            result["edit_ms"] = edit_summary
            result["not_applied_within_s"] = WAIT
            result["not_applied"] = not_applied
            result["targets"] = [
                check("edit → Applied p50", edit_summary.get("p50"), limit=100, unit="ms"),
                check("edit → Applied p99", edit_summary.get("p99"), limit=250, unit="ms"),
            ]
            if not_applied["edit"]:
                for target in result["targets"]:
                    target["met"] = False
            result["samples_ms"] = {"create": [round(x * 1000, 1) for x in created],
                                    "edit": [round(x * 1000, 1) for x in edited],
                                    "patch_round_trip": [round(x * 1000, 1) for x in round_trips]}

            if ctx.wants_profile(result["targets"]):
                await settle(operator.pid, below_percent=10, timeout=300)
                raw = ctx.result_path(f"{NAME}-profile", "stacks.txt")
                profiled, stacks = await asyncio.gather(
                    edits("edit_profiled", int(edit_rate * edit_seconds)),
                    profile(operator.pid, seconds=edit_seconds, output=raw))
                result["profile"] = {"during": f"a second edit phase at {edit_rate}/s for {edit_seconds}s",
                                     "edit_ms_while_profiled": summary(profiled, scale=1000), **stacks}
    result["phases_s"] = phases
    return result


def plot(result: dict[str, Any], ax: Any) -> None:
    from plots import cdf
    cdf(ax, result["samples_ms"]["edit"], label=f"edit → Applied (n={result['edit_ms']['count']})")
    cdf(ax, result["samples_ms"]["create"], label=f"create → Applied (n={result['create_ms']['count']})")
    cdf(ax, result["samples_ms"].get("patch_round_trip", []), label="the harness's PATCH round trip (apiserver floor)",
        linestyle=":")
    for limit, style in ((100, ":"), (250, "--")):
        ax.axvline(limit, color="grey", linestyle=style, linewidth=1)
    p = result["parameters"]
    missing = result["not_applied"]
    edits = int(p["edit_rate_per_s"] * p["edit_seconds"])
    creates = p["agents"] * p["schedules_per_agent"]
    ax.text(0.98, 0.05, f"not Applied within {result['not_applied_within_s']:.0f} s:\n"
            f"{missing['create']} of {creates} creates, {missing['edit']} of {edits} edits\n"
            f"apiserver PATCH round trip p50 {result['apiserver_patch_round_trip_ms'].get('p50')} ms, "
            f"p99 {result['apiserver_patch_round_trip_ms'].get('p99')} ms",
            transform=ax.transAxes, ha="right", va="bottom", fontsize=9,
            bbox={"facecolor": "white", "edgecolor": "grey"})
    ax.set_title(f"apply → Applied: {p['agents']} agents × {p['schedules_per_agent']} Schedules, "
                 f"edits at {p['edit_rate_per_s']:g}/s\n(targets: p50 ≤ 100 ms dotted, p99 ≤ 250 ms dashed)")
    ax.set_xlabel("latency (ms, log scale)")
    ax.set_xscale("log")
    ax.set_xlim(10, 100_000)
