"""What every benchmark shares: its settings, the stack it runs against, background tasks
with one owner, and where results go."""

from __future__ import annotations

import asyncio
import json
import os
import platform
import subprocess
import time
from collections.abc import AsyncIterator, Coroutine, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import cluster
from cluster import REPO, ControlPlane, Operator, load_average
from kubeapi import Api, credentials

NAMESPACE = "bench"


@dataclass(frozen=True)
class Context:
    quick: bool
    results: Path  # JSON and PNG files
    work: Path  # logs, control-plane data, raw profiles
    profile: str  # "auto": profile where a target is missed; "always"; "never"
    command: str  # the command line that produced the results
    # Where the control plane runs; the harness, the operator and the reference clients have the
    # other CPUs (bench/run.py pins them). Empty: nothing is pinned.
    plane_cpus: tuple[int, ...] = ()

    def size(self, *, quick: Any, full: Any) -> Any:
        return quick if self.quick else full

    def wants_profile(self, targets: list[dict[str, Any]]) -> bool:
        return self.profile == "always" or (self.profile == "auto" and not all(t["met"] for t in targets))

    def result_path(self, name: str, suffix: str) -> Path:
        return self.results / f"{name}{'.quick' if self.quick else ''}.{suffix}"


def machine(ctx: Context) -> dict[str, Any]:
    with open("/proc/meminfo") as meminfo:
        total_kib = int(next(line for line in meminfo if line.startswith("MemTotal")).split()[1])
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True, check=False).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "operator", "agent",
                            "restic_manager"], capture_output=True, text=True, check=False).stdout.strip()
    return {"cpus": os.cpu_count(), "memory_gib": round(total_kib / 2**20, 1), "python": platform.python_version(),
            "kernel": platform.release(), "code_under_test": cluster.SOURCE.label, "head": commit,
            "working_tree_has_uncommitted_operator_or_agent_changes": bool(dirty),
            "loadavg_at_start": [round(x, 2) for x in load_average()],
            "cpus_of": {"control_plane": list(ctx.plane_cpus) or "all",
                        "operator_harness_and_reference_clients": sorted(os.sched_getaffinity(0))},
            "note": "other engineers' test runs may share these cores too (see loadavg)"}


@asynccontextmanager
async def stack(ctx: Context, name: str, *, wrapper: list[str] | None = None, tls: tuple[Path, Path] | None = None,
                extra: Sequence[str] = ()) -> AsyncIterator[tuple[ControlPlane, Operator, Api]]:
    """A fresh control plane, the operator watching :data:`NAMESPACE` (``tls``, ``extra``:
    as :class:`~cluster.Operator` takes them), and an API client."""
    directory = ctx.work / name
    async with ControlPlane(directory, cpus=ctx.plane_cpus) as plane:
        async with Api(credentials(plane.kubeconfig), connections=64) as api:
            await api.ensure("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace",
                                                    "metadata": {"name": NAMESPACE}})
            async with Operator(kubeconfig=plane.kubeconfig, namespace=NAMESPACE, log=directory / "operator.log",
                                wrapper=wrapper, tls=tls, extra=extra) as operator:
                yield plane, operator, api


@asynccontextmanager
async def background(*coroutines: Coroutine[Any, Any, Any]) -> AsyncIterator[list[asyncio.Task[Any]]]:
    """Run ``coroutines`` while the block runs; they are cancelled when it ends, and a
    failure of one of them ends the block."""
    async with asyncio.TaskGroup() as group:
        tasks = [group.create_task(coroutine) for coroutine in coroutines]
        try:
            yield tasks
        finally:
            for task in tasks:
                task.cancel()


def write_result(ctx: Context, name: str, result: dict[str, Any]) -> dict[str, Any]:
    """Write the result file; returns what was written."""
    result = {"benchmark": name, "quick": ctx.quick, "command": ctx.command,
              "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"), **result}
    result.setdefault("machine", {})["loadavg_at_end"] = [round(x, 2) for x in load_average()]
    path = ctx.result_path(name, "json")
    path.write_text(json.dumps(result, indent=1) + "\n")
    return result


def elapsed(start: float) -> float:
    return round(time.monotonic() - start, 1)
