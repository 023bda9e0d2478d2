"""Benchmark 3 — fire storm: ResticJob creation throughput against the raw apiserver.

N simulated agents each hold one every-minute Schedule and fire it in the same second.
Throughput = N ÷ (time from the nominal second to the harness seeing the last ResticJob).
Right after, on the same apiserver, a plain client creates the same N ResticJobs as fast as
it can (aiohttp, 32 in flight), in a namespace the operator does not watch; its throughput is
measured the same way. "The same" is the operator's own ``fires.job_body``: each job owned by
a Schedule of its namespace (N inert Schedules are made there for that), with the finalizer.
The same N are also created with the client the operator uses
(``restic_manager.operator.kube.client.Kube``, on kubernetes_asyncio); "raw" is the
faster of the two plain clients. That makes one round; a full run makes
:data:`ROUNDS` of them, a minute apart, because a create rate measured on these shared cores
swings by half from one minute to the next: the figure is the median round's ratio, and
every round is in the results. Each round also counts the operator's CPU for the whole storm,
until every job's ``command.run`` reached its agent and the status writes of its ``job.done``
are done: the CPU per fired job. Targets: operator ≥ 80% of raw; ≤ 2 ms of operator CPU per
fired job (median round).
"""

from __future__ import annotations

import asyncio
import collections
import math
import os
import time
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone
from typing import Any

from restic_manager.operator.jobs.fires import job_body
from restic_manager.operator.kube.cache import Schedule
from restic_manager.operator.kube.client import Kube, load_configuration

from cluster import Usage, profile, settle
from common import NAMESPACE, Context, background, machine, stack
from kubeapi import bounded, crd, per, request_counts
from simfleet import Fleet, Firer
from stats import check, summary
from world import AppliedWatch, CreationWatch, agent_name, agents_with_tokens, \
    create_schedule, prepare_namespace, schedule_body

NAME = "storm"
RAW = "bench-raw"
RAW_OWN = "bench-raw-operator-client"
RAW_CONCURRENCY = 32
ROUNDS = 3
STORM_LEAD = 0.5  # the storm's CPU and requests are counted from this long before its nominal second


def throughput(seen: list[float], start: float) -> float | None:
    return round(len(seen) / (max(seen) - start), 1) if seen and max(seen) > start else None


async def timed_creates(watch: CreationWatch, names: list[str], create: Callable[[int], Awaitable[Any]], *,
                        limit: int) -> tuple[float, list[float]]:
    """Create the objects ``names`` (``create(index)``); (start, the moments the watch saw them)."""
    await watch.ready.wait()
    start = time.time()
    await bounded(range(len(names)), create, limit=limit)
    wanted = set(names)
    await watch.until_count(lambda _: wanted <= watch.seen.keys(), timeout=300)
    return start, sorted(watch.seen[name][0] for name in names if name in watch.seen)


Storm = Callable[..., Awaitable[tuple[list[float], Firer]]]


async def owners(api: Any, namespace: str, names: list[str]) -> list[Schedule]:
    """The Schedules ``names`` in ``namespace``, which no operator watches: the plain clients'
    jobs are owned by them as the fired ones are by theirs."""
    made: dict[int, Schedule] = {}

    async def create(index: int) -> None:
        await create_schedule(api, namespace, schedule_body(names[index], agent=agent_name(index),
                                                            expression="* * * * *"))
        made[index] = Schedule.from_body(await api.get(crd(namespace, "schedules", names[index])))

    await bounded(range(len(names)), create, limit=32)
    return [made[index] for index in range(len(names))]


async def measured_round(storm: Storm, *, plane: Any, operator: Any, api: Any, kube: Kube, fleet: Fleet,
                         names: list[str], raw_watches: dict[str, CreationWatch],
                         raw_owners: dict[str, list[Schedule]]) -> dict[str, Any]:
    """One storm at the next whole minute, then the same N creates by each plain client."""
    n = len(names)
    minute = math.ceil((time.time() + 8) / 60) * 60
    requests_before = await request_counts(api)
    commands_before = fleet.commands_received()

    async def storm_start() -> tuple[Usage, Usage, collections.Counter[str]]:
        await asyncio.sleep(max(0.0, minute - STORM_LEAD - time.time()))
        return (Usage({"operator": operator.pid, **plane.pids(), "harness": os.getpid()}),
                Usage({"operator": operator.pid}), await request_counts(api))

    started = asyncio.create_task(storm_start())
    seen, firer = await storm(minute, timeout=600)
    usage, whole, requests_at_start = await started
    one: dict[str, Any] = {"minute": datetime.fromtimestamp(minute, timezone.utc).strftime("%H:%M"),
                           "usage_storm": usage.read()}
    # What the apiserver served besides the creates while they ran, until the last ResticJob was seen.
    one["apiserver_requests_per_fire_in_storm"] = per((await request_counts(api)) - requests_at_start, n)
    operator_rate = throughput(seen, minute)
    one["operator"] = {"created": len(seen), "per_second": operator_rate,
                       "first_ms": round((seen[0] - minute) * 1000, 1) if seen else None,
                       "last_ms": round((seen[-1] - minute) * 1000, 1) if seen else None,
                       "fire_send_lateness_ms": summary([f.sent_at - f.scheduled_at for f in firer.sent], scale=1000)}
    # A fired job's whole cost to the operator: its create, its dispatch (command.run), the
    # job.started and job.done its agent answers at once, and the status writes they make.
    jobs = {f"{NAMESPACE}/{names[index]}-{agent_name(index)}-{minute // 60}" for index in range(n)}
    await fleet.until("received every fired job's command.run",
                      lambda: fleet.commands_received() >= commands_before + n and jobs <= fleet.commands().keys(),
                      timeout=600)
    await settle(operator.pid, below_percent=10, timeout=600)
    whole_usage = whole.read()
    one["operator_per_fired_job"] = {
        "cpu_ms": round(1000 * whole_usage["operator"]["cpu_seconds"] / n, 3),
        "window_s": whole_usage["seconds"],
        "window": "from half a second before the nominal second until every command.run was received and the "
                  "operator used under 10% of a core for 3 s (its job.done status writes done)"}
    one["apiserver_requests_per_fire"] = per((await request_counts(api)) - requests_before, n)

    at = datetime.fromtimestamp(minute, timezone.utc)
    raw_names = [f"{names[index]}-{agent_name(index)}-{minute // 60}" for index in range(n)]

    def raw_body(index: int, namespace: str) -> dict[str, Any]:
        return job_body(raw_owners[namespace][index], agent=agent_name(index), name=raw_names[index], scheduled_at=at)

    async def plain(index: int) -> None:
        await api.create(crd(RAW, "resticjobs"), raw_body(index, RAW))

    async def operator_client(index: int) -> None:
        await kube.create("resticjobs", raw_body(index, RAW_OWN))

    usage = Usage({**plane.pids(), "harness": os.getpid()})
    raw_start, raw_seen = await timed_creates(raw_watches[RAW], raw_names, plain, limit=RAW_CONCURRENCY)
    raw_usage, usage = usage.read(), Usage({**plane.pids(), "harness": os.getpid()})
    own_start, own_seen = await timed_creates(raw_watches[RAW_OWN], raw_names, operator_client,
                                              limit=RAW_CONCURRENCY)
    own_usage = usage.read()
    raw_rate, own_rate = throughput(raw_seen, raw_start), throughput(own_seen, own_start)
    one["raw"] = {"client": f"aiohttp, {RAW_CONCURRENCY} requests in flight", "created": len(raw_seen),
                  "per_second": raw_rate, "usage": raw_usage}
    one["raw_operator_client"] = {"client": f"operator/kube/client.py's Kube, {RAW_CONCURRENCY} requests in flight",
                                  "created": len(own_seen), "per_second": own_rate, "usage": own_usage}
    # The apiserver's create capacity is what the faster of the two plain clients reached.
    best = max(filter(None, (raw_rate, own_rate)), default=None)
    one["raw_best_per_second"] = best
    one["ratio"] = round(operator_rate / best, 3) if operator_rate and best else None
    one["curves_s"] = {"operator": [round(x - minute, 3) for x in seen],
                       "raw": [round(x - raw_start, 3) for x in raw_seen],
                       "raw_operator_client": [round(x - own_start, 3) for x in own_seen]}
    return one


async def run(ctx: Context) -> dict[str, Any]:
    n = ctx.size(quick=200, full=1000)
    result: dict[str, Any] = {"machine": machine(ctx), "parameters": {"n": n, "raw_concurrency": RAW_CONCURRENCY,
                                                                   "rounds": ctx.size(quick=1, full=ROUNDS)}}
    async with stack(ctx, NAME) as (plane, operator, api):
        await prepare_namespace(api, NAMESPACE)
        names = [f"storm-{i:05d}" for i in range(n)]
        raw_owners = {}
        for namespace in (RAW, RAW_OWN):
            await api.ensure("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace",
                                                    "metadata": {"name": namespace}})
            raw_owners[namespace] = await owners(api, namespace, names)
        agents = await agents_with_tokens(api, NAMESPACE, range(n), timeout=900)
        fleet = Fleet(agents, url=operator.url)
        applied = AppliedWatch(api, NAMESPACE)
        fired = CreationWatch(api, crd(NAMESPACE, "resticjobs"), lambda job: job["spec"].get("scheduledAt"))
        raw = CreationWatch(api, crd(RAW, "resticjobs"), lambda job: None)
        raw_own = CreationWatch(api, crd(RAW_OWN, "resticjobs"), lambda job: None)
        async with background(fleet.run(), applied.run(), fired.run(), raw.run(), raw_own.run()):
            await fleet.until("all connected and acked", lambda: fleet.acked() >= n, timeout=900)

            async def create(index: int) -> None:
                await create_schedule(api, NAMESPACE, schedule_body(names[index], agent=agent_name(index),
                                                                    expression="* * * * *"))

            await bounded(range(n), create, limit=32)
            for name in names:
                if await applied.wait(name, 1, timeout=600) is None:
                    raise TimeoutError(f"Schedule {name} was not Applied within 600s")
            await settle(operator.pid, below_percent=10, timeout=600)
            await fired.ready.wait()

            async def storm(minute: int, *, timeout: float) -> tuple[list[float], Firer]:
                firer = Firer(fleet, after=minute - 1, until=minute)
                stamp = datetime.fromtimestamp(minute, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")

                def of_storm() -> list[float]:
                    return sorted(at for at, scheduled in fired.seen.values() if scheduled == stamp)

                await firer.run()
                await fired.until_count(lambda _: len(of_storm()) >= n, timeout=timeout)
                return of_storm(), firer

            kube = Kube(await load_configuration(plane.kubeconfig))
            rounds = []
            try:
                for _ in range(result["parameters"]["rounds"]):
                    rounds.append(await measured_round(storm, plane=plane, operator=operator, api=api, kube=kube,
                                                       fleet=fleet, names=names,
                                                       raw_watches={RAW: raw, RAW_OWN: raw_own},
                                                       raw_owners=raw_owners))
            finally:
                await kube.close()
            result["rounds"] = rounds
            # The median round (an odd count): its ratio is the figure, and its details stand beside it.
            middle = sorted(rounds, key=lambda one: one["ratio"] if one["ratio"] is not None else -1)[len(rounds) // 2]
            result.update({key: middle[key] for key in ("operator", "usage_storm", "apiserver_requests_per_fire",
                                                       "raw", "raw_operator_client", "raw_best_per_second", "ratio",
                                                       "curves_s")})
            result["median_round"] = rounds.index(middle) + 1
            cpu_per_job = sorted(one["operator_per_fired_job"]["cpu_ms"] for one in rounds)
            result["operator_cpu_ms_per_fired_job"] = {"rounds": cpu_per_job,
                                                       "median": cpu_per_job[len(cpu_per_job) // 2]}
            result["targets"] = [check("storm throughput ÷ raw create throughput (median round)", result["ratio"],
                                       limit=0.8, unit="ratio", at_most=False),
                                 check("operator CPU per fired job (median round)",
                                       result["operator_cpu_ms_per_fired_job"]["median"], limit=2, unit="ms")]

            if ctx.wants_profile(result["targets"]):
                minute = math.ceil((time.time() + 8) / 60) * 60
                stacks_file = ctx.result_path(f"{NAME}-profile", "stacks.txt")

                # As long as the median round's whole storm took: the creates, and the dispatch
                # and status writes each fired job costs after them.
                seconds = max(5, math.ceil(middle["operator_per_fired_job"]["window_s"]))

                async def profile_storm() -> dict[str, Any]:
                    await asyncio.sleep(max(0.0, minute - 1 - time.time()))
                    return await profile(operator.pid, seconds=seconds, output=stacks_file)

                (again, _), stacks = await asyncio.gather(storm(minute, timeout=600), profile_storm())
                result["profile"] = {"during": f"one more storm of the same N fires, after the rounds, from 1 s "
                                               f"before it for {seconds} s",
                                     "operator_per_second_while_profiled": throughput(again, minute), **stacks}
    return result


def plot(result: dict[str, Any], ax: Any) -> None:
    curves = result["curves_s"]
    labels = {"operator": f"fires → ResticJobs (operator): {result['operator']['per_second']}/s",
              "raw": f"raw creates, {result['raw']['client']}: {result['raw']['per_second']}/s",
              "raw_operator_client": f"raw creates, operator's client: {result['raw_operator_client']['per_second']}/s"}
    for key, label in labels.items():
        xs = curves[key]
        ax.step(xs, range(1, len(xs) + 1), where="post", label=label)
    ax.set_xlabel("seconds from the storm's nominal time (operator) or from the first request (raw)")
    ax.set_ylabel("ResticJobs seen on a watch")
    ax.grid(True, alpha=0.3)
    ratios = ", ".join(str(one["ratio"]) for one in result.get("rounds", ()))
    ax.set_title(f"fire storm: {result['parameters']['n']} agents fire in the same second; the median round\n"
                 f"operator ÷ faster raw client = {result['ratio']} (target ≥ 0.8); rounds: {ratios}")
