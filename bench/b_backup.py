"""Benchmark 9 — a real backup through the agent, next to the same restic backup by hand.

A generated tree (full: 1 GiB in 51,200 files, incompressible) is backed up into a fresh
repository each time, alternately by ``restic backup`` run by hand and by the real agent
answering a ``command.run`` from a stand-in operator (benchmark 5's). By hand, the wall time
is restic's process from start to exit; through the agent, from ``command.run`` sent to
``job.done`` received, so it holds everything the agent adds: starting restic, reading its
JSON progress and sending it, the summary. The repository is made before each timed run by
``restic init`` (not timed), and one untimed backup by hand first warms the page cache.
Target: the median run through the agent at most 3% longer than the median run by hand.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from b_agent import real_agent
from cluster import cpu_seconds, restic_binary
from common import Context, machine
from restic_manager import protocol
from stats import check, summary

NAME = "backup"
PASSWORD = "bench-backup-password"
FILE_BYTES = 21_504  # 51,200 of them make 1.03 GiB
FILES_PER_DIRECTORY = 200


def make_tree(root: Path, files: int) -> int:
    """``files`` files of :data:`FILE_BYTES` random bytes under ``root`` (kept between runs: a
    marker names what is there); the total bytes."""
    marker = root / ".made"
    wanted = f"{files} files of {FILE_BYTES} bytes\n"
    if marker.exists() and marker.read_text() == wanted:
        return files * FILE_BYTES
    shutil.rmtree(root, ignore_errors=True)
    rng = random.Random(9)  # the same tree on every machine
    for index in range(files):
        directory = root / f"d{index // FILES_PER_DIRECTORY:04d}"
        if index % FILES_PER_DIRECTORY == 0:
            directory.mkdir(parents=True)
        (directory / f"f{index:06d}.bin").write_bytes(rng.randbytes(FILE_BYTES))
    marker.write_text(wanted)
    return files * FILE_BYTES


def restic(binary: Path, *args: str, repository: Path) -> subprocess.CompletedProcess[str]:
    env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/root"),
           "RESTIC_PASSWORD": PASSWORD, "RESTIC_REPOSITORY": str(repository),
           "RESTIC_CACHE_DIR": str(repository.parent / "cache")}
    return subprocess.run([str(binary), *args], env=env, capture_output=True, text=True, check=True)


async def fresh_repository(binary: Path, work: Path) -> Path:
    repository = work / "repository"
    for stale in (repository, work / "cache"):
        await asyncio.to_thread(shutil.rmtree, stale, ignore_errors=True)
    await asyncio.to_thread(restic, binary, "init", repository=repository)
    return repository


async def by_hand(binary: Path, work: Path, tree: Path) -> float:
    repository = await fresh_repository(binary, work)
    start = time.monotonic()
    await asyncio.to_thread(restic, binary, "backup", "--host", "bench", "--tag=bench", "--", str(tree),
                            repository=repository)
    return time.monotonic() - start


def command(tree: Path, repository: Path, index: int) -> protocol.CommandRun:
    return protocol.CommandRun(
        job=f"bench/backup-{index:02d}", type=protocol.JobType.BACKUP, args={"paths": [str(tree)]},
        repository=protocol.Repository(url=str(repository), env={"RESTIC_PASSWORD": PASSWORD}))


async def run(ctx: Context) -> dict[str, Any]:
    files = ctx.size(quick=5_120, full=51_200)
    pairs = ctx.size(quick=2, full=3)
    work = ctx.work / NAME
    tree = work / "tree"
    result: dict[str, Any] = {"machine": machine(ctx), "parameters": {
        "files": files, "file_bytes": FILE_BYTES, "pairs": pairs,
        "order": "by hand, then through the agent, in each pair; one untimed backup by hand first"}}
    result["parameters"]["tree_bytes"] = await asyncio.to_thread(make_tree, tree, files)
    hand: list[float] = []
    agent: list[float] = []
    agent_cpu: list[float] = []
    restic_reported: list[float] = []
    binary = restic_binary()  # resolved once: finding it is not part of a run
    async with real_agent(work, "--backup-path", str(tree)) as (stand_in, pid):
        await by_hand(binary, work, tree)  # warms the page cache; not counted
        for index in range(pairs):
            hand.append(await by_hand(binary, work, tree))
            repository = await fresh_repository(binary, work)
            cpu = cpu_seconds(pid)
            sent, done_at, done = await stand_in.run(command(tree, repository, index), timeout=3600)
            if done.outcome is not protocol.Outcome.SUCCEEDED:
                raise RuntimeError(f"the agent's backup {done.job} ended {done.outcome.value}: {done.error}")
            agent.append(done_at - sent)
            agent_cpu.append(cpu_seconds(pid) - cpu)
            if done.summary is not None and done.summary.duration_seconds is not None:
                restic_reported.append(done.summary.duration_seconds)
    median_hand, median_agent = sorted(hand)[len(hand) // 2], sorted(agent)[len(agent) // 2]
    result["by_hand_s"] = summary(hand, digits=2)
    result["through_agent_s"] = summary(agent, digits=2)
    result["restic_reported_duration_s"] = summary(restic_reported, digits=2)
    result["agent_process_cpu_s"] = summary(agent_cpu, digits=3)
    result["samples_s"] = {"by_hand": [round(x, 2) for x in hand], "through_agent": [round(x, 2) for x in agent]}
    result["overhead_percent"] = round(100 * (median_agent / median_hand - 1), 2)
    result["targets"] = [check("agent wall-time overhead on a real backup (medians)", result["overhead_percent"],
                               limit=3, unit="%")]
    return result


def plot(result: dict[str, Any], ax: Any) -> None:
    samples = result["samples_s"]
    ax.boxplot([samples["by_hand"], samples["through_agent"]], positions=[1, 2])
    ax.set_xticks([1, 2], ["restic backup by hand", "through the agent\n(command.run → job.done)"])
    ax.set_ylabel("wall time (s)")
    p = result["parameters"]
    ax.set_title(f"a first backup of {p['files']:,} files, {p['tree_bytes'] / 2**30:.2f} GiB, into a fresh "
                 f"repository\nagent overhead {result['overhead_percent']}% of the median (target ≤ 3%)")
