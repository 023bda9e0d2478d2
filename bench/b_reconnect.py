"""Benchmark 6 — recovery: after a kill -9 of the operator, how long until every agent is back.

N simulated agents (5 and 10,000; --quick: 5 and 500), each reconnecting with the real
agent's backoff (agent/retry.py ``Backoff``: full jitter, 1 s doubling to a 10 s cap),
are connected and have acknowledged their set. The operator is killed with SIGKILL and
started again at once, three times per size. Measured from the new operator's view being
primed (its "primed:" log line) to each agent's first ``schedule.ack`` of the new session:
the median and p99 over agents, and the last one (all back). The simulator opens at most 64
handshakes at a time (bench/simfleet.py), as one process must; real hosts do not queue.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from datetime import datetime
from typing import Any

from common import NAMESPACE, Context, background, machine, stack
from simfleet import Fleet
from stats import summary
from world import agents_with_tokens, prepare_namespace

from restic_manager.agent.retry import Backoff

NAME = "reconnect"
ROUNDS = 3
TIMEOUT = 600.0


def primed_after(log: str, after: float) -> float | None:
    """The time of the first "primed:" line of the operator's log written after ``after``."""
    for line in log.splitlines():
        if "primed:" not in line:
            continue
        try:
            stamp = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").astimezone().timestamp()
        except ValueError:
            continue
        if stamp >= after:
            return stamp
    return None


async def run(ctx: Context) -> dict[str, Any]:
    sizes = ctx.size(quick=[5, 500], full=[5, 10000])
    result: dict[str, Any] = {"machine": machine(ctx), "parameters": {
        "sizes": sizes, "rounds": ROUNDS, "backoff": {"base_s": Backoff().base, "cap_s": Backoff().cap}},
        "steps": []}
    async with stack(ctx, NAME) as (plane, operator, api):
        await prepare_namespace(api, NAMESPACE)
        fleet = Fleet([], url=operator.url, backoff=Backoff())
        async with background(fleet.run()):
            size = 0
            for n in sizes:
                agents = await agents_with_tokens(api, NAMESPACE, range(size, n), timeout=TIMEOUT)
                fleet.add(agents)
                size = n
                await fleet.until(f"{n} connected and acked", lambda: fleet.acked() >= n, timeout=TIMEOUT)
                step: dict[str, Any] = {"agents": n, "rounds": []}
                for _ in range(ROUNDS):
                    killed = time.time()
                    await operator.kill_and_restart()
                    deadline = time.monotonic() + TIMEOUT
                    while not all(agent.acked_at > killed for agent in fleet.agents):  # polled: O(N) per look
                        if time.monotonic() > deadline:
                            raise TimeoutError(f"not all {n} agents back within {TIMEOUT:.0f} s")
                        await asyncio.sleep(0.1)
                    primed = primed_after(operator.log.read_text(errors="replace"), killed)
                    assert primed is not None, "the restarted operator logged no 'primed:' line"
                    back = [agent.acked_at - primed for agent in fleet.agents]
                    step["rounds"].append({
                        "restart_to_primed_s": round(primed - killed, 3),
                        "primed_to_back_s": summary(back, scale=1),
                        "all_back_s": round(max(back), 3),
                    })
                step["all_back_s_median_of_rounds"] = round(statistics.median(r["all_back_s"] for r in step["rounds"]), 3)
                result["steps"].append(step)
    result["targets"] = []  # measured, no target set (issue: "within seconds, not minutes")
    return result


def plot(result: dict[str, Any], axes: Any) -> None:
    for step in result["steps"]:
        rounds = range(1, len(step["rounds"]) + 1)
        axes.plot(rounds, [r["primed_to_back_s"].get("p50") for r in step["rounds"]], "o-",
                  label=f"{step['agents']:,} agents: p50")
        axes.plot(rounds, [r["all_back_s"] for r in step["rounds"]], "s--", label=f"{step['agents']:,} agents: last")
    axes.set_xlabel("operator restart (kill -9)")
    axes.set_ylabel("seconds from primed to the agent's new ack")
    axes.grid(True, alpha=0.3)
    axes.set_title("agents back after an operator restart (backoff: full jitter, cap "
                   f"{result['parameters']['backoff']['cap_s']:g} s)")
