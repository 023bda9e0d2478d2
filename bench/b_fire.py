"""Benchmark 2 — fire → ResticJob, next to the CronJob controller, and on to command.run.

On the same apiserver in the same minutes: K every-minute batch/v1 CronJobs (their Jobs
suspended, so no Pods) and K every-minute Schedules on K simulated agents, which send
``schedule.fire`` at the nominal minute as the real agent does. For each Job and
ResticJob, the skew between the nominal minute and the moment the harness's watch saw the
object appear (both kinds are watched alike); for each ResticJob, also the skew to the
moment its agent received ``command.run``. Targets: ResticJob p99 ≤ 300 ms, the ResticJobs'
median skew ≤ ¼ of the CronJob controller's, command.run p99 ≤ 500 ms.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from cluster import Usage, profile
from common import NAMESPACE, Context, background, machine, stack
from kubeapi import batch, bounded, crd
from simfleet import Fleet, Firer
from stats import check, summary
from world import AppliedWatch, CreationWatch, agent_name, agents_with_tokens, create_schedule, prepare_namespace, \
    schedule_body

NAME = "fire"
EVERY_MINUTE = "* * * * *"


def cronjob_body(name: str) -> dict[str, Any]:
    return {"apiVersion": "batch/v1", "kind": "CronJob", "metadata": {"name": name},
            "spec": {"schedule": EVERY_MINUTE, "concurrencyPolicy": "Allow",
                     "successfulJobsHistoryLimit": 1, "failedJobsHistoryLimit": 1,
                     "jobTemplate": {"spec": {"suspend": True, "template": {"spec": {
                         "restartPolicy": "Never",
                         "containers": [{"name": "noop", "image": "busybox", "command": ["true"]}]}}}}}}


def job_nominal(job: Mapping[str, Any]) -> float:
    """A CronJob's Job is named <cronjob>-<minutes since the epoch of its scheduled time>."""
    return int(job["metadata"]["name"].rsplit("-", 1)[1]) * 60.0


def resticjob_nominal(job: Mapping[str, Any]) -> float:
    at = job.get("spec", {}).get("scheduledAt")
    return datetime.fromisoformat(at.replace("Z", "+00:00")).timestamp() if at else math.nan


def skews(seen: Mapping[str, tuple[float, float]], minutes: set[float]) -> list[float]:
    """Seconds from the nominal time to the moment each object was seen, for the given minutes."""
    return [at - nominal for at, nominal in seen.values() if nominal in minutes]


async def run(ctx: Context) -> dict[str, Any]:
    k = ctx.size(quick=20, full=100)
    minutes_n = ctx.size(quick=2, full=5)
    result: dict[str, Any] = {"machine": machine(ctx), "parameters": {"k": k, "minutes": minutes_n}}
    async with stack(ctx, NAME) as (plane, operator, api):
        await prepare_namespace(api, NAMESPACE)
        agents = await agents_with_tokens(api, NAMESPACE, range(k), timeout=600)
        fleet = Fleet(agents, url=operator.url)
        applied = AppliedWatch(api, NAMESPACE)
        resticjobs = CreationWatch(api, crd(NAMESPACE, "resticjobs"), resticjob_nominal)
        jobs = CreationWatch(api, batch(NAMESPACE, "jobs"), job_nominal)
        async with background(fleet.run(), applied.run(), resticjobs.run(), jobs.run()):
            await fleet.until("all connected and acked", lambda: fleet.acked() >= k, timeout=300)
            names = [f"every-minute-{i:04d}" for i in range(k)]

            async def create(index: int) -> None:
                await create_schedule(api, NAMESPACE, schedule_body(names[index], agent=agent_name(index),
                                                                    expression=EVERY_MINUTE))
                await api.ensure(batch(NAMESPACE, "cronjobs"), cronjob_body(f"cron-{index:04d}"))

            await bounded(range(k), create, limit=16)
            for name in names:
                if await applied.wait(name, 1, timeout=120) is None:
                    raise TimeoutError(f"Schedule {name} was not Applied within 120s")
            await asyncio.gather(resticjobs.ready.wait(), jobs.ready.wait())

            first = math.ceil((time.time() + 10) / 60) * 60
            last = first + (minutes_n - 1) * 60
            measured = {float(first + 60 * i) for i in range(minutes_n)}
            firer = Firer(fleet, after=first - 1, until=last)
            usage = Usage({"operator": operator.pid, **plane.pids()})
            commands_before = fleet.commands_received()
            await firer.run()
            expected = k * minutes_n

            def count(watch: CreationWatch) -> int:
                return sum(1 for _, nominal in watch.seen.values() if nominal in measured)

            got = await asyncio.gather(
                resticjobs.until_count(lambda _: count(resticjobs) >= expected, timeout=120),
                jobs.until_count(lambda _: count(jobs) >= expected, timeout=120))
            fired = {f"{NAMESPACE}/{name}": nominal for name, (_, nominal) in resticjobs.seen.items()
                     if nominal in measured}
            try:
                await fleet.until("sent every fired job's command.run",
                                  lambda: fleet.commands_received() >= commands_before + len(fired)
                                  and fired.keys() <= fleet.commands().keys(), timeout=120)
            except TimeoutError:
                got.append(False)
            result["usage"] = usage.read()
            restic_skew = skews(resticjobs.seen, measured)
            cron_skew = skews(jobs.seen, measured)
            received = fleet.commands()
            command_skew = [received[job] - nominal for job, nominal in fired.items() if job in received]
            result["complete"] = {"resticjobs": count(resticjobs), "cronjob_jobs": count(jobs),
                                  "command_runs": len(command_skew), "expected_each": expected,
                                  "all_in_time": all(got)}
            result["resticjob_skew_ms"] = summary(restic_skew, scale=1000)
            result["cronjob_skew_ms"] = summary(cron_skew, scale=1000)
            result["command_run_skew_ms"] = summary(command_skew, scale=1000)
            result["fire_send_lateness_ms"] = summary([f.sent_at - f.scheduled_at for f in firer.sent], scale=1000)
            result["samples_ms"] = {"resticjob": [round(x * 1000, 1) for x in restic_skew],
                                    "cronjob": [round(x * 1000, 1) for x in cron_skew],
                                    "command_run": [round(x * 1000, 1) for x in command_skew]}
            restic_p50 = result["resticjob_skew_ms"].get("p50")
            cron_p50 = result["cronjob_skew_ms"].get("p50")
            result["targets"] = [
                check("fire → ResticJob p99", result["resticjob_skew_ms"].get("p99"), limit=300, unit="ms"),
                check("ResticJob median ÷ CronJob median", None if not (restic_p50 and cron_p50)
                      else round(restic_p50 / cron_p50, 3), limit=0.25, unit="ratio"),
                check("nominal → command.run p99", result["command_run_skew_ms"].get("p99"), limit=500, unit="ms"),
            ]
            if result["complete"]["resticjobs"] < expected:
                result["targets"][0]["met"] = False
            if len(command_skew) < expected:
                result["targets"][2]["met"] = False

            if ctx.wants_profile(result["targets"]):
                extra = last + 60
                if extra - time.time() < 8:
                    extra += 60
                firer = Firer(fleet, after=extra - 1, until=extra)
                raw = ctx.result_path(f"{NAME}-profile", "stacks.txt")

                async def profile_fire() -> dict[str, Any]:
                    await asyncio.sleep(max(0.0, extra - 3 - time.time()))
                    return await profile(operator.pid, seconds=15, output=raw)

                _, stacks = await asyncio.gather(firer.run(), profile_fire())
                result["profile"] = {"during": f"one more minute of {k} fires, from 3 s before to 12 s after it",
                                     **stacks}
    return result


def plot(result: dict[str, Any], ax: Any) -> None:
    from plots import cdf
    samples = result["samples_ms"]
    cdf(ax, samples["resticjob"], label=f"fire → ResticJob (operator), p50 {result['resticjob_skew_ms'].get('p50')} ms")
    cdf(ax, samples["cronjob"],
        label=f"CronJob → Job (kube-controller-manager), p50 {result['cronjob_skew_ms'].get('p50')} ms")
    if samples.get("command_run"):
        cdf(ax, samples["command_run"],
            label=f"fire → command.run at the agent, p50 {result['command_run_skew_ms'].get('p50')} ms")
    ax.axvline(300, color="grey", linestyle="--", linewidth=1)
    p = result["parameters"]
    ax.set_title(f"skew from the nominal minute to the object's creation\n{p['k']} every-minute Schedules and "
                 f"{p['k']} CronJobs, {p['minutes']} minutes (dashed: ResticJob p99 target 300 ms)")
    ax.set_xlabel("skew (ms, log scale)")
    ax.set_xscale("log")
