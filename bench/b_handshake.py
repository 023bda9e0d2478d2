"""Benchmark 7 — handshake floods: what 500 concurrent bogus handshakes cost a legitimate agent.

The operator serves wss and in-cluster agents (``--agent-service-account``), once with an
ECDSA P-256 certificate (what the chart generates) and once with RSA 2048 (what many
certificate issuers default to). A legitimate agent connects again and again, alternately as
a host agent (its token) and as a node's in-cluster agent (a projected ServiceAccount token
bound to a pod on a node); each connect is timed from dialling to the operator's first
``schedule.set`` after ``hello``. First idle, then during each of two floods from another
process (bench/flood.py: ``concurrency`` clients for ``flood_seconds``, each opening one
handshake after another): random host tokens nobody holds, and forged ServiceAccount tokens
(a real token's claims under a random signature), from one address; and the forged tokens
again from 250 addresses. The flood runs at nice 19: on this
two-core machine it would otherwise take CPU from the legitimate agent and the apiserver,
which an attacker elsewhere does not. Also per phase: the operator's and the apiserver's
CPU, the TokenReviews the apiserver served, and the refusals the operator logged.
Target (issue 21): the legitimate p99 during a flood within ``WITHIN_IDLE_P99`` times the
idle p99, with the chart's certificate.
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import sys
import time
from pathlib import Path
from typing import Any

from cluster import CERTIFICATE_KEYS, cpu_seconds, serving_certificate, settle
from common import NAMESPACE, Context, machine, stack
from kubeapi import request_counts
from stats import check, summary
from websockets.asyncio.client import connect
from world import agents_with_tokens, prepare_namespace

from restic_manager import protocol

NAME = "handshake"
HERE = Path(__file__).resolve().parent
NODE = "bench-node"
CHART_CERTIFICATE = "ECDSA P-256"
WITHIN_IDLE_P99 = 5.0
RAMP = 3.0  # seconds of each flood before the legitimate connects are timed
# (phase, bogus credential, loopback addresses the flood comes from): one host flooding, whose
# handshakes beyond the operator's per-address bound are reset at accept, and 250 hosts with
# two clients each, under that bound.
SPREAD = 250
FLOODS = (("idle", None, 0), ("unknown host tokens", "unknown-token", 1),
          ("forged ServiceAccount tokens", "forged-token", 1),
          (f"forged ServiceAccount tokens from {SPREAD} addresses", "forged-token", SPREAD))


async def connect_once(url: str, token: str, agent: str, context: ssl.SSLContext) -> float:
    """Seconds from dialling to the operator's first schedule.set after hello."""
    started = time.monotonic()
    async with connect(url, additional_headers={"Authorization": f"Bearer {token}"}, ssl=context,
                       open_timeout=60, ping_interval=None, compression=None) as websocket:
        await websocket.send(protocol.encode(protocol.Hello(
            agent=agent, agent_version="bench", restic_version="0.19.1", protocol_version=protocol.PROTOCOL_VERSION)))
        async with asyncio.timeout(60):
            payload = protocol.decode(await websocket.recv()).payload
        assert isinstance(payload, protocol.ScheduleSet), payload
        return time.monotonic() - started


def in_cluster_token(plane: Any) -> str:
    """A Node, the agent ServiceAccount, a pod of it bound to the Node (no kubelet runs it: the
    binding is all a projected token needs), and a token for that pod, as the kubelet mints."""
    plane.kubectl("create", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "Node",
                                                         "metadata": {"name": NODE}}))
    plane.kubectl("-n", NAMESPACE, "create", "serviceaccount", "agent")
    plane.kubectl("-n", NAMESPACE, "create", "-f", "-", input=json.dumps({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "agent-pod"},
        "spec": {"serviceAccountName": "agent", "nodeName": NODE, "automountServiceAccountToken": False,
                 "containers": [{"name": "agent", "image": "restic-manager/agent"}]}}))
    return plane.kubectl("-n", NAMESPACE, "create", "token", "agent", "--audience=restic-manager", "--duration=2h",
                         "--bound-object-kind=Pod", "--bound-object-name=agent-pod").stdout.strip()


def refusals_logged(log: Path, offset: int) -> int:
    with open(log, "rb") as lines:
        lines.seek(offset)
        return sum(1 for line in lines if b" refused (" in line)


async def one_certificate(ctx: Context, certificate: str, *, concurrency: int, seconds: float,
                          idle_connects: int) -> dict[str, Any]:
    tls = serving_certificate(ctx.work / f"{NAME}-pki", certificate)  # the control plane clears its own directory
    context = ssl.create_default_context(cafile=str(tls[0]))
    phases = []
    async with stack(ctx, NAME, tls=tls, extra=["--agent-service-account", f"{NAMESPACE}/agent"]) as (
            plane, operator, api):
        await prepare_namespace(api, NAMESPACE)
        [host] = await agents_with_tokens(api, NAMESPACE, range(1), timeout=120)
        sa_token = in_cluster_token(plane)
        legit = {"host token": (host.token, host.name), "serviceaccount token": (sa_token, NODE)}
        apiserver = plane.pids()["kube-apiserver"]
        await connect_once(operator.url, *legit["serviceaccount token"], context)  # registers the node's Agent
        await settle(apiserver, below_percent=15, timeout=120)

        for name, flood_kind, sources in FLOODS:
            times: dict[str, list[float]] = {kind: [] for kind in legit}
            failures: list[str] = []
            flood, log_offset = None, operator.log.stat().st_size
            if flood_kind is not None:
                flood = await asyncio.create_subprocess_exec(
                    "nice", "-n", "19", sys.executable, str(HERE / "flood.py"), operator.url, "--kind", flood_kind,
                    "--concurrency", str(concurrency), "--seconds", str(seconds), "--sources", str(sources),
                    env={**os.environ, "FLOOD_TOKEN": sa_token}, stdout=asyncio.subprocess.PIPE)
                await asyncio.sleep(RAMP)
            before = (await request_counts(api), cpu_seconds(operator.pid), cpu_seconds(apiserver))
            started = time.monotonic()
            count = 0
            while flood.returncode is None if flood is not None else count < 2 * idle_connects:
                kind = list(legit)[count % 2]
                count += 1
                try:
                    times[kind].append(await connect_once(operator.url, *legit[kind], context))
                except Exception as error:  # noqa: BLE001  (a failed connect is a result, not a crash)
                    failures.append(f"{kind}: {type(error).__name__}: {error}")
            elapsed = time.monotonic() - started
            after = (await request_counts(api), cpu_seconds(operator.pid), cpu_seconds(apiserver))
            flooded = json.loads((await flood.communicate())[0]) if flood is not None else None
            phases.append({
                "phase": name, "flood": flooded, "timed_s": round(elapsed, 1),
                "connect_ms": {kind: summary(values, scale=1000) for kind, values in times.items()},
                "failed_connects": failures[:10], "failed_connect_count": len(failures),
                "tokenreviews": after[0]["POST tokenreviews"] - before[0]["POST tokenreviews"],
                "operator_cpu_percent": round(100 * (after[1] - before[1]) / elapsed, 1),
                "apiserver_cpu_percent": round(100 * (after[2] - before[2]) / elapsed, 1),
                "refusals_logged": refusals_logged(operator.log, log_offset),  # from the flood's start
            })
    return {"certificate": certificate, "phases": phases}


async def run(ctx: Context) -> dict[str, Any]:
    sizes = {"concurrency": ctx.size(quick=100, full=500), "seconds": ctx.size(quick=10.0, full=30.0),
             "idle_connects": ctx.size(quick=20, full=100)}
    result: dict[str, Any] = {"machine": machine(ctx), "parameters": {
        **sizes, "timed_after_s": RAMP, "flood_nice": 19, "certificates": list(CERTIFICATE_KEYS)}, "runs": []}
    for certificate in CERTIFICATE_KEYS:
        result["runs"].append(await one_certificate(ctx, certificate, concurrency=sizes["concurrency"],
                                                    seconds=sizes["seconds"], idle_connects=sizes["idle_connects"]))
    [chart] = [run for run in result["runs"] if run["certificate"] == CHART_CERTIFICATE]
    idle = chart["phases"][0]["connect_ms"]
    result["targets"] = [
        check(f"{phase['phase']}: {kind} connect p99 ÷ idle p99", None if not idle[kind].get("p99") else
              round(phase["connect_ms"][kind].get("p99", float("inf")) / idle[kind]["p99"], 2),
              limit=WITHIN_IDLE_P99, unit="ratio")
        for phase in chart["phases"][1:] for kind in idle]
    return result


def plot(result: dict[str, Any], axes: Any) -> None:
    labels, p50s, p99s = [], [], []
    for run in result["runs"]:
        for phase in run["phases"]:
            for kind, connects in phase["connect_ms"].items():
                labels.append(f"{run['certificate']}\n{phase['phase']}\n{kind}")
                p50s.append(connects.get("p50", 0))
                p99s.append(connects.get("p99", 0))
    positions = range(len(labels))
    axes.bar([p - 0.2 for p in positions], p50s, 0.4, label="p50")
    axes.bar([p + 0.2 for p in positions], p99s, 0.4, label="p99")
    axes.set_xticks(positions, labels, fontsize=6, rotation=90)
    axes.set_yscale("log")
    axes.set_ylabel("connect → first schedule.set, ms")
    axes.grid(True, axis="y", alpha=0.3)
    axes.set_title(f"a legitimate agent's connect, idle and during {result['parameters']['concurrency']} "
                   "concurrent bogus handshakes")
