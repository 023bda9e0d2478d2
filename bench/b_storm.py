"""Benchmark 3 — fire storm: ResticJob creation throughput against the raw apiserver.

N simulated agents each hold one every-minute Schedule and fire it in the same second.
Throughput = N ÷ (time from the nominal second to the harness seeing the last ResticJob).
In the same run, on the same apiserver, a plain client creates N ResticJobs of the same
shape as fast as it can (aiohttp, 32 in flight), in a namespace the operator does not watch;
its throughput is measured the same way. The same N are also created with the client the
operator uses (``restic_manager.operator.kube.Kube``, aiohttp with its own connection pool);
"raw" is the faster of the two plain clients. Target: operator ≥ 80% of raw.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone
from typing import Any

import kubernetes.client
import kubernetes.config

from restic_manager.operator.kube import Kube

from cluster import Usage, profile, settle
from common import NAMESPACE, Context, background, machine, stack
from kubeapi import bounded, crd, per, request_counts
from simfleet import Fleet, Firer
from stats import check, summary
from world import API_VERSION, REPOSITORY, TEMPLATE, AppliedWatch, CreationWatch, agent_name, agents_with_tokens, \
    create_schedule, prepare_namespace, schedule_body

NAME = "storm"
RAW = "bench-raw"
RAW_OWN = "bench-raw-operator-client"
RAW_CONCURRENCY = 32


def resticjob_body(name: str, *, agent: str, schedule: str, uid: str, scheduled_at: datetime) -> dict[str, Any]:
    """The shape of a fired ResticJob (operator/fires.py job_body), without the ownerReference:
    a reference into another namespace would only feed the garbage collector."""
    return {"apiVersion": API_VERSION, "kind": "ResticJob",
            "metadata": {"name": name, "labels": {"resticmanager.io/schedule": schedule,
                                                  "resticmanager.io/agent": agent}},
            "spec": {**TEMPLATE, "agent": agent, "repository": REPOSITORY,
                     "scheduleRef": {"name": schedule, "uid": uid},
                     "scheduledAt": scheduled_at.strftime("%Y-%m-%dT%H:%M:%SZ")}}


def throughput(seen: list[float], start: float) -> float | None:
    return round(len(seen) / (max(seen) - start), 1) if seen and max(seen) > start else None


async def timed_creates(watch: CreationWatch, n: int, create: Callable[[int], Awaitable[Any]], *,
                        limit: int) -> tuple[float, list[float]]:
    """Create n objects; (start, the moments the watch saw them)."""
    await watch.ready.wait()
    start = time.time()
    await bounded(range(n), create, limit=limit)
    await watch.until_count(lambda count: count >= n, timeout=300)
    return start, sorted(at for at, _ in watch.seen.values())


async def run(ctx: Context) -> dict[str, Any]:
    n = ctx.size(quick=200, full=1000)
    result: dict[str, Any] = {"machine": machine(), "parameters": {"n": n, "raw_concurrency": RAW_CONCURRENCY}}
    async with stack(ctx, NAME) as (plane, operator, api):
        await prepare_namespace(api, NAMESPACE)
        for namespace in (RAW, RAW_OWN):
            await api.ensure("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace",
                                                    "metadata": {"name": namespace}})
        agents = await agents_with_tokens(api, NAMESPACE, range(n), timeout=900)
        fleet = Fleet(agents, url=operator.url)
        applied = AppliedWatch(api, NAMESPACE)
        fired = CreationWatch(api, crd(NAMESPACE, "resticjobs"), lambda job: job["spec"].get("scheduledAt"))
        raw = CreationWatch(api, crd(RAW, "resticjobs"), lambda job: None)
        raw_own = CreationWatch(api, crd(RAW_OWN, "resticjobs"), lambda job: None)
        async with background(fleet.run(), applied.run(), fired.run(), raw.run(), raw_own.run()):
            await fleet.until("all connected and acked", lambda: fleet.acked() >= n, timeout=900)
            names = [f"storm-{i:05d}" for i in range(n)]

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

            minute = math.ceil((time.time() + 8) / 60) * 60
            usage = Usage({"operator": operator.pid, **plane.pids()})
            requests_before = await request_counts(api)
            seen, firer = await storm(minute, timeout=600)
            result["usage_storm"] = usage.read()
            operator_rate = throughput(seen, minute)
            result["operator"] = {"created": len(seen), "per_second": operator_rate,
                                  "first_ms": round((seen[0] - minute) * 1000, 1) if seen else None,
                                  "last_ms": round((seen[-1] - minute) * 1000, 1) if seen else None,
                                  "fire_send_lateness_ms": summary([f.sent_at - f.scheduled_at for f in firer.sent],
                                                                   scale=1000)}
            await settle(operator.pid, below_percent=10, timeout=600)
            result["apiserver_requests_per_fire"] = per((await request_counts(api)) - requests_before, n)

            at = datetime.fromtimestamp(minute, timezone.utc)

            def raw_body(index: int) -> dict[str, Any]:
                return resticjob_body(f"{names[index]}-{agent_name(index)}-{minute // 60}", agent=agent_name(index),
                                      schedule=names[index], uid=f"00000000-0000-0000-0000-{index:012d}",
                                      scheduled_at=at)

            async def plain(index: int) -> None:
                await api.create(crd(RAW, "resticjobs"), raw_body(index))

            raw_start, raw_seen = await timed_creates(raw, n, plain, limit=RAW_CONCURRENCY)
            raw_rate = throughput(raw_seen, raw_start)
            result["raw"] = {"client": f"aiohttp, {RAW_CONCURRENCY} requests in flight", "created": len(raw_seen),
                             "per_second": raw_rate}

            configuration = kubernetes.client.Configuration()
            kubernetes.config.load_kube_config(config_file=str(plane.kubeconfig), client_configuration=configuration)
            kube = Kube(configuration)

            async def operator_client(index: int) -> None:
                body = raw_body(index)
                body["metadata"]["namespace"] = RAW_OWN
                await kube.create("resticjobs", body)

            try:
                own_start, own_seen = await timed_creates(raw_own, n, operator_client, limit=RAW_CONCURRENCY)
            finally:
                await kube.close()
            result["raw_operator_client"] = {
                "client": f"operator/kube.py's Kube, {RAW_CONCURRENCY} requests in flight",
                "created": len(own_seen), "per_second": throughput(own_seen, own_start)}
            # The apiserver's create capacity is what the faster of the two plain clients reached.
            best = max(filter(None, (raw_rate, result["raw_operator_client"]["per_second"])), default=None)
            result["raw_best_per_second"] = best
            result["ratio"] = round(operator_rate / best, 3) if operator_rate and best else None
            result["targets"] = [check("storm throughput ÷ raw create throughput", result["ratio"], limit=0.8,
                                       unit="ratio", at_most=False)]
            result["curves_s"] = {"operator": [round(x - minute, 3) for x in seen],
                                  "raw": [round(x - raw_start, 3) for x in raw_seen],
                                  "raw_operator_client": [round(x - own_start, 3) for x in own_seen]}

            if ctx.wants_profile(result["targets"]):
                minute = math.ceil((time.time() + 8) / 60) * 60
                stacks_file = ctx.result_path(f"{NAME}-profile", "stacks.txt")

                async def profile_storm() -> dict[str, Any]:
                    await asyncio.sleep(max(0.0, minute - 1 - time.time()))
                    last = result["operator"]["last_ms"] or 10_000
                    return await profile(operator.pid, seconds=max(5, math.ceil(last / 1000) + 2), output=stacks_file)

                (again, _), stacks = await asyncio.gather(storm(minute, timeout=600), profile_storm())
                result["profile"] = {"during": "a second storm of the same N fires, a minute later",
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
    ax.set_title(f"fire storm: {result['parameters']['n']} agents fire in the same second\n"
                 f"operator ÷ faster raw client = {result['ratio']} (target ≥ 0.8)")
