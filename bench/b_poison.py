"""Benchmark 8 — poison ResticJobs: 200 jobs whose references can never resolve cost nothing
after their first failure.

ResticJobs naming a repository ``..``, ``.``, ``%2e%2e`` or ``Offsite`` (the CRD's schema
accepts them; no object can have such a name) are created at once. Measured: how long until
every one reads Failed/Invalid; then, over ``WINDOW`` seconds after that, the operator's CPU,
its log and the apiserver requests on ResticJobs, each beside the same window measured before
the jobs were created (an idle operator's own cost).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from cluster import cpu_seconds, settle
from common import NAMESPACE, Context, machine, stack
from kubeapi import bounded, crd, request_counts
from stats import check
from world import API_VERSION, TEMPLATE, create_agents, prepare_namespace

NAME = "poison"
POISONS = ({"repository": ".."}, {"repository": "."}, {"repository": "%2e%2e"}, {"repository": "Offsite"})


def poison_body(index: int) -> dict[str, Any]:
    return {"apiVersion": API_VERSION, "kind": "ResticJob", "metadata": {"name": f"poison-{index:03d}"},
            "spec": {"agent": "agent-00000", "repository": "bench-repo", **TEMPLATE, **POISONS[index % len(POISONS)]}}


async def window(api: Any, operator: Any, seconds: float) -> dict[str, Any]:
    """What the operator cost over ``seconds`` of doing nothing new."""
    requests, cpu, log = await request_counts(api), cpu_seconds(operator.pid), operator.log.stat().st_size
    await asyncio.sleep(seconds)
    delta = (await request_counts(api)) - requests
    return {"seconds": seconds, "operator_cpu_percent": round(100 * (cpu_seconds(operator.pid) - cpu) / seconds, 2),
            "operator_log_bytes": operator.log.stat().st_size - log,
            "resticjob_requests": {key: value for key, value in delta.items() if "resticjobs" in key}}


async def run(ctx: Context) -> dict[str, Any]:
    count = ctx.size(quick=20, full=200)
    seconds = ctx.size(quick=10.0, full=60.0)
    result: dict[str, Any] = {"machine": machine(ctx), "parameters": {"jobs": count, "window_s": seconds,
                                                                   "poisons": list(POISONS)}}
    async with stack(ctx, NAME) as (plane, operator, api):
        await prepare_namespace(api, NAMESPACE)
        await create_agents(api, NAMESPACE, ["agent-00000"])
        await settle(operator.pid, below_percent=5, timeout=120)
        result["before"] = await window(api, operator, seconds)
        created = time.monotonic()
        await bounded(range(count), lambda i: api.create(crd(NAMESPACE, "resticjobs"), poison_body(i)), limit=16)
        while True:
            items = (await api.list(crd(NAMESPACE, "resticjobs")))["items"]
            failed = [job for job in items
                      if (job.get("status") or {}).get("phase") == "Failed"
                      and job["status"].get("reason") == "Invalid"]
            if len(failed) == count:
                break
            if time.monotonic() - created > 300:
                raise TimeoutError(f"{len(failed)} of {count} poison jobs Failed/Invalid within 300 s")
            await asyncio.sleep(0.5)
        result["all_failed_s"] = round(time.monotonic() - created, 1)
        result["after"] = await window(api, operator, seconds)
    after = result["after"]
    result["targets"] = [
        check("ResticJob requests after the first failure", sum(after["resticjob_requests"].values()), limit=0,
              unit="requests"),
        check("operator log after the first failure", after["operator_log_bytes"], limit=0, unit="bytes"),
        check("operator CPU after ÷ before", round(after["operator_cpu_percent"]
                                                   / max(result["before"]["operator_cpu_percent"], 0.01), 2),
              limit=2.0, unit="ratio"),
    ]
    return result


def plot(result: dict[str, Any], axes: Any) -> None:
    windows = ("before", "after")
    axes.bar(windows, [result[w]["operator_cpu_percent"] for w in windows])
    axes.set_ylabel("operator CPU, % of a core")
    axes.grid(True, axis="y", alpha=0.3)
    axes.set_title(f"{result['parameters']['jobs']} poison ResticJobs: the operator over "
                   f"{result['parameters']['window_s']:g} s before they exist and after they all failed "
                   f"({result['all_failed_s']} s)")
