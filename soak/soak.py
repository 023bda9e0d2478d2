"""The fault-injection soak: the real control plane, the operator and several agents as
processes, real restic, Schedules every few seconds, and random faults; then a verifier
that reads the apiserver, the repository and the logs and says whether anything was lost,
doubled or stuck.

    python soak/soak.py --minutes 60            # make soak: results in soak/results/
    python soak/soak.py --minutes 1.5 --agents 3 --quiet 45   # what tests/e2e/test_soak.py runs

Faults, each kind a Poisson process of its own (rates per minute, ``--rate KIND=N``):

    operator-kill   kill -9 of the operator, restarted after 0-3 s
    agent-kill      kill -9 of a random agent, restarted after 0-5 s
    agent-net       a fault on one agent's link to the operator (Toxiproxy): latency,
                    a stall that ends in a timeout, resets, a trickle of bandwidth, or a hard
                    partition, for 2-8 s
    apiserver-net   the same on the operator's link to kube-apiserver
    apiserver-stop  SIGSTOP of kube-apiserver for 1-8 s
    etcd-stop       SIGSTOP of etcd for 1-5 s
    restic-kill     kill -9 of a running restic, mid-backup
    disk-full       the first agent's state directory (a small tmpfs) filled for 5-15 s
    hostile         a rogue agent's session: malformed, out-of-order and oversized frames, a
                    fire before its set, receipts for nothing, reports on others' jobs

After the faults everything is healed and the system runs ``--quiet`` seconds undisturbed;
then the Schedule is suspended, the jobs allowed to finish, and the verifier checks:

* at most one ResticJob per (Schedule, agent, scheduledAt);
* every scheduled time has a job, or belongs to a run of times without one that a later
  job (the newest-only catch-up) closes and that a fault overlaps;
* no job is left Pending or Running;
* every Succeeded job's snapshot exists, and every snapshot belongs to a Succeeded job;
* no restic lock is left in the repository;
* no traceback in any log, and every hostile frame answered;

and measures the time from each operator start to all agents connected again. It prints a
table and writes it, with every fault, to the results directory.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import textwrap
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "testbin"))
import build  # noqa: E402
import controlplane  # noqa: E402
from toxiproxy import KINDS as NET_TOXICS, Toxiproxy  # noqa: E402

from websockets.asyncio.client import connect  # noqa: E402
from websockets.exceptions import ConnectionClosed  # noqa: E402

from restic_manager import protocol  # noqa: E402
from restic_manager.cron import Cron  # noqa: E402

RESTIC_MANAGER = Path(sys.executable).parent / "restic-manager"
NAMESPACE = "soak"
PASSWORD = "soak-repository-password"
SCHEDULE = "soak"
TRACEBACK = "Traceback (most recent call last)"
DEFAULT_RATES = {  # per minute: 60 minutes make > 100 kills of each, > 50 network faults, > 10 and > 5 stops
    "operator-kill": 2.5, "agent-kill": 2.5, "agent-net": 1.0, "apiserver-net": 0.5,
    "apiserver-stop": 0.3, "etcd-stop": 0.2, "restic-kill": 0.5, "disk-full": 0.1, "hostile": 0.5,
}
ROGUE = "rogue"
# SIGSTOP leaves a stopped process stopped even after this process dies; resumed on every path.
STOPPABLE = ("kube-apiserver", "etcd")


class SoakError(RuntimeError):
    """The soak could not set itself up or heal; the message says what."""


@dataclass
class Fault:
    kind: str
    target: str
    detail: str
    start: float  # epoch seconds
    end: float = 0.0


def now() -> float:
    return time.time()


def iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).isoformat(timespec="milliseconds")


def parse_time(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# --- processes -----------------------------------------------------------------------------


@dataclass
class Process:
    """A restic-manager process with its log, started and killed at will."""

    name: str
    argv: list[str]
    log: Path
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    popen: subprocess.Popen[bytes] | None = None
    starts: int = 0

    def start(self) -> None:
        with open(self.log, "ab") as log:
            log.write(f"--- start {datetime.now(timezone.utc).isoformat()} ---\n".encode())
            log.flush()
            self.popen = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          env=self.env, cwd=REPO)
        self.starts += 1

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def kill(self) -> None:
        if self.running:
            assert self.popen is not None
            self.popen.kill()
            self.popen.wait()

    def stop(self, timeout: float = 30.0) -> None:
        if not self.running:
            return
        assert self.popen is not None
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()
            raise SoakError(f"{self.name} did not stop within {timeout:.0f} s of SIGTERM; see {self.log}") from None


# --- the soak ------------------------------------------------------------------------------


@dataclass
class Settings:
    minutes: float = 60.0
    agents: int = 5
    schedule: str = "*/10 * * * * *"
    quiet: float = 60.0
    seed: int = 1
    rates: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_RATES))
    directory: Path = REPO / ".local" / "soak"
    results: Path | None = None


class Soak:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.rng = random.Random(settings.seed)
        self.dir = settings.directory
        self.faults: list[Fault] = []
        self.plane: controlplane.ControlPlane | None = None
        self.toxiproxy: Toxiproxy | None = None
        self.operator: Process | None = None
        self.agents: dict[str, Process] = {}
        self.restic = Path(build.ensure(["restic"])["restic"])
        self.repository = self.dir / "repo"
        self.disk: Path | None = None  # the tmpfs under the first agent's state
        self.started_at = 0.0
        self.healed_at = 0.0
        self.operator_port = 0
        self.rogue_token = ""
        self.hostile: Counter[str] = Counter()  # what the rogue sent, and how it was answered

    # --- set up and tear down -------------------------------------------------------------

    async def run(self) -> dict[str, Any]:
        if self.dir.exists():
            subprocess.run(["rm", "-rf", str(self.dir)], check=True)
        self.dir.mkdir(parents=True)
        try:
            await self._set_up()
            await self._inject()
            await self._heal_all()
            print(f"soak: faults over; {self.settings.quiet:.0f} s undisturbed", flush=True)
            await asyncio.sleep(self.settings.quiet)
            return await self._verify()
        finally:
            await self._tear_down()

    async def _set_up(self) -> None:
        self.plane = controlplane.ControlPlane(kubeconfig=self.dir / "kubeconfig", directory=self.dir / "controlplane")
        print("soak: starting the control plane", flush=True)
        await asyncio.to_thread(self.plane.start)
        self.toxiproxy = Toxiproxy(log=self.dir / "toxiproxy.log")
        await asyncio.to_thread(self.toxiproxy.start)
        api_port = int(self.plane.server.rsplit(":", 1)[1])
        proxied_api = self.toxiproxy.proxy("apiserver", api_port)
        operator_kubeconfig = self.dir / "operator.kubeconfig"
        operator_kubeconfig.write_text(self.plane.kubeconfig.read_text().replace(
            self.plane.server, f"https://127.0.0.1:{proxied_api}"))
        self._restic("init")
        tree = self.dir / "data"
        (tree / "etc").mkdir(parents=True)
        for number in range(20):
            (tree / "etc" / f"file-{number}").write_text(f"soak data {number}\n" * (number + 1))
        self.kubectl("create", "namespace", NAMESPACE)
        self.apply(f"""
            apiVersion: v1
            kind: Secret
            metadata: {{name: soak-password, namespace: {NAMESPACE}, labels: {{resticmanager.io/repository-secret: "true"}}}}
            stringData: {{password: {PASSWORD}}}
            ---
            apiVersion: resticmanager.io/v1alpha1
            kind: Repository
            metadata: {{name: soak, namespace: {NAMESPACE}}}
            spec:
              url: {self.repository}
              passwordSecretRef: {{name: soak-password, key: password}}
        """)
        operator_port = self.operator_port = free_port()
        self.operator = Process("operator", [
            str(RESTIC_MANAGER), "operator", "--kubeconfig", str(operator_kubeconfig),
            "--listen", f"127.0.0.1:{operator_port}", "--namespace", NAMESPACE, "--insecure-listen",
        ], self.dir / "operator.log")
        self.operator.start()
        for number in range(self.settings.agents):
            name = f"host-{number}"
            self.apply(f"""
                apiVersion: resticmanager.io/v1alpha1
                kind: Agent
                metadata: {{name: {name}, namespace: {NAMESPACE}, labels: {{soak: "yes"}}}}
            """)
            port = self.toxiproxy.proxy(name, operator_port)
            state = self.dir / f"{name}-state"
            state.mkdir()
            if number == 0 and self.settings.rates.get("disk-full", 0) > 0:
                self._mount_small_disk(state)
            token = self.dir / f"{name}.token"
            token.write_text(await self._token(name))
            self.agents[name] = Process(name, [
                str(RESTIC_MANAGER), "agent", "--server", f"ws://127.0.0.1:{port}/agent", "--insecure",
                "--token-file", str(token), "--state-dir", str(state), "--agent-name", name,
                "--restic", str(self.restic),
            ], self.dir / f"{name}.log")
            self.agents[name].start()
        self.apply(f"""
            apiVersion: resticmanager.io/v1alpha1
            kind: Agent
            metadata: {{name: {ROGUE}, namespace: {NAMESPACE}}}
        """)
        self.rogue_token = await self._token(ROGUE)
        self.apply(f"""
            apiVersion: resticmanager.io/v1alpha1
            kind: Schedule
            metadata: {{name: {SCHEDULE}, namespace: {NAMESPACE}}}
            spec:
              agentSelector: {{matchLabels: {{soak: "yes"}}}}
              repository: soak
              schedule: "{self.settings.schedule}"
              concurrencyPolicy: Allow
              startingDeadlineSeconds: 86400
              successfulJobsHistoryLimit: 1000000
              failedJobsHistoryLimit: 1000000
              template:
                type: backup
                backup: {{paths: [{tree}]}}
        """)
        await asyncio.to_thread(self.kubectl, "wait", "--for=condition=Applied", "--timeout=120s",
                                f"schedule/{SCHEDULE}")
        self.started_at = now()
        print(f"soak: {self.settings.agents} agent(s) applied the Schedule; faults for "
              f"{self.settings.minutes:g} min", flush=True)

    def _mount_small_disk(self, state: Path) -> None:
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m,mode=0700", "tmpfs", str(state)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise SoakError(f"the disk-full fault needs a tmpfs mount (root): {result.stderr.strip()}; "
                            "run as root, or give --rate disk-full=0")
        self.disk = state

    async def _token(self, agent: str) -> str:
        await asyncio.to_thread(self.kubectl, "wait", "--for=jsonpath={.status.tokenSecretName}", "--timeout=60s",
                                f"agent/{agent}")
        secret = json.loads(self.kubectl("get", f"secret/{agent}-agent-token", "-o", "json").stdout)
        return base64.b64decode(secret["data"]["token"]).decode()

    async def _tear_down(self) -> None:
        self._resume_stopped()
        for process in self.agents.values():
            with contextlib.suppress(SoakError):
                process.stop()
        if self.operator is not None:
            with contextlib.suppress(SoakError):
                self.operator.stop()
        if self.toxiproxy is not None:
            self.toxiproxy.stop()
        if self.plane is not None:
            await asyncio.to_thread(self.plane.stop)
        if self.disk is not None:
            subprocess.run(["umount", "-l", str(self.disk)], check=False)

    def _resume_stopped(self) -> None:
        if self.plane is None:
            return
        for name in STOPPABLE:
            process = self.plane.processes.get(name)
            if process is not None and process.poll() is None:
                os.kill(process.pid, signal.SIGCONT)

    # --- API and restic ------------------------------------------------------------------

    def kubectl(self, *args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
        assert self.plane is not None
        return self.plane.kubectl("-n", NAMESPACE, *args, input=input)

    def apply(self, manifest: str) -> None:
        self.kubectl("apply", "-f", "-", input=textwrap.dedent(manifest))

    def _restic(self, *args: str) -> str:
        env = {"PATH": os.environ.get("PATH", ""), "RESTIC_REPOSITORY": str(self.repository),
               "RESTIC_PASSWORD": PASSWORD, "RESTIC_CACHE_DIR": str(self.dir / "cli-cache")}
        result = subprocess.run([str(self.restic), *args], env=env, capture_output=True, text=True)
        if result.returncode != 0:
            raise SoakError(f"restic {' '.join(args)}: {result.stderr.strip()}")
        return result.stdout

    # --- faults ----------------------------------------------------------------------------

    async def _inject(self) -> None:
        until = time.monotonic() + self.settings.minutes * 60
        async with asyncio.TaskGroup() as tasks:
            for kind, rate in self.settings.rates.items():
                if rate > 0:
                    tasks.create_task(self._poisson(kind, rate, until))

    async def _poisson(self, kind: str, rate: float, until: float) -> None:
        rng = random.Random(f"{self.settings.seed}-{kind}")
        while True:
            wait = rng.expovariate(rate / 60.0)
            if time.monotonic() + wait >= until:
                return
            await asyncio.sleep(wait)
            await getattr(self, "_" + kind.replace("-", "_"))(rng)

    async def _held(self, fault: Fault, seconds: float) -> None:
        self.faults.append(fault)
        print(f"soak: {iso(fault.start)} {fault.kind} {fault.target} {fault.detail} ({seconds:.1f} s)", flush=True)
        await asyncio.sleep(seconds)

    async def _operator_kill(self, rng: random.Random) -> None:
        assert self.operator is not None
        fault = Fault("operator-kill", "operator", "kill -9", now())
        self.operator.kill()
        await self._held(fault, rng.uniform(0, 3))
        self.operator.start()
        fault.end = now()

    async def _agent_kill(self, rng: random.Random) -> None:
        name = rng.choice(sorted(self.agents))
        fault = Fault("agent-kill", name, "kill -9", now())
        self.agents[name].kill()
        await self._held(fault, rng.uniform(0, 5))
        self.agents[name].start()
        fault.end = now()

    async def _net(self, kind: str, proxy: str, rng: random.Random) -> None:
        assert self.toxiproxy is not None
        toxic = rng.choice(NET_TOXICS)
        fault = Fault(kind, proxy, await asyncio.to_thread(self.toxiproxy.fault, proxy, toxic, rng), now())
        await self._held(fault, rng.uniform(2, 8))
        await asyncio.to_thread(self.toxiproxy.heal, proxy)
        fault.end = now()

    async def _agent_net(self, rng: random.Random) -> None:
        await self._net("agent-net", rng.choice(sorted(self.agents)), rng)

    async def _apiserver_net(self, rng: random.Random) -> None:
        await self._net("apiserver-net", "apiserver", rng)

    async def _stop(self, kind: str, name: str, seconds: float) -> None:
        assert self.plane is not None
        process = self.plane.processes[name]
        fault = Fault(kind, name, "SIGSTOP", now())
        os.kill(process.pid, signal.SIGSTOP)
        try:
            await self._held(fault, seconds)
        finally:
            os.kill(process.pid, signal.SIGCONT)
            fault.end = now()

    async def _apiserver_stop(self, rng: random.Random) -> None:
        await self._stop("apiserver-stop", "kube-apiserver", rng.uniform(1, 8))

    async def _etcd_stop(self, rng: random.Random) -> None:
        await self._stop("etcd-stop", "etcd", rng.uniform(1, 5))

    async def _restic_kill(self, rng: random.Random) -> None:
        agents = {process.popen.pid for process in self.agents.values() if process.popen is not None}
        running = [pid for pid in _pids_of(self.restic) if "backup" in _cmdline(pid) and _parent(pid) in agents]
        if not running:
            return  # nothing mid-backup right now: try at the next draw
        pid = rng.choice(running)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        fault = Fault("restic-kill", f"pid {pid}", "kill -9 mid-backup", now(), now())
        await self._held(fault, 0)

    async def _disk_full(self, rng: random.Random) -> None:
        if self.disk is None:
            return
        filler = self.disk / "filler"
        fault = Fault("disk-full", self.disk.name, "state directory filled", now())
        await asyncio.to_thread(_fill, filler)
        try:
            await self._held(fault, rng.uniform(5, 15))
        finally:
            filler.unlink(missing_ok=True)
            fault.end = now()

    async def _hostile(self, rng: random.Random) -> None:
        """A session of a rogue agent (its own Agent, targeted by nothing): every frame it
        sends must be answered with an error or a refusal, and change nothing."""
        fault = Fault("hostile", ROGUE, "bad frames", now())
        other_job = f"{NAMESPACE}/{SCHEDULE}-host-0-1"
        at = datetime.now(timezone.utc)
        bad = [
            "{not json",
            json.dumps({"type": "schedule.fire", "id": "x", "payload": {"id": 5}}),
            protocol.encode(protocol.ScheduleFire(id=f"{NAMESPACE}/{SCHEDULE}", uid="u", generation=1,
                                                  scheduled_at=at)),  # before any set is acked
            protocol.encode(protocol.ScheduleAck(version=123456789, applied_at=at)),  # never sent
            protocol.encode(protocol.FireResult(ref="never", id=f"{NAMESPACE}/{SCHEDULE}", scheduled_at=at,
                                                outcome=protocol.FireOutcome.CREATED)),
            protocol.encode(protocol.JobDoneAck(ref="never", job=other_job)),
        ]
        try:
            async with connect(f"ws://127.0.0.1:{self.operator_port}/agent", open_timeout=10, max_size=None,
                               additional_headers={"Authorization": f"Bearer {self.rogue_token}"}) as rogue:
                await rogue.send(protocol.encode(protocol.Hello(
                    agent=ROGUE, agent_version="rogue", restic_version="0", protocol_version=protocol.PROTOCOL_VERSION)))
                pushed = protocol.decode(await asyncio.wait_for(rogue.recv(), 10)).payload
                for frame in rng.sample(bad, len(bad)):
                    await rogue.send(frame)
                    self.hostile["sent"] += 1
                if isinstance(pushed, protocol.ScheduleSet):  # now acked: a report on another's job
                    await rogue.send(protocol.encode(protocol.ScheduleAck(version=pushed.version, applied_at=at)))
                    await rogue.send(protocol.encode(protocol.JobDone(
                        job=other_job, outcome=protocol.Outcome.FAILED, finished_at=at)))
                    self.hostile["sent"] += 1
                while self.hostile["answered"] < self.hostile["sent"]:
                    answer = protocol.decode(await asyncio.wait_for(rogue.recv(), 10)).payload
                    # Errors, refusals, and the ack of a job.done about a job that does not exist
                    if isinstance(answer, (protocol.Error, protocol.FireResult, protocol.JobDoneAck)):
                        self.hostile["answered"] += 1
                await rogue.send("x" * (protocol.MAX_FRAME_BYTES + 1))  # over the limit: closed, 1009
                with contextlib.suppress(ConnectionClosed):
                    await asyncio.wait_for(rogue.recv(), 10)
                self.hostile["closed-1009"] += rogue.close_code == 1009
        except (OSError, TimeoutError, ConnectionClosed) as error:
            self.hostile["cut-short"] += 1  # the operator was down or the session cut: not a verdict
            fault.detail = f"cut short: {error}"
        fault.end = now()
        await self._held(fault, 0)

    async def _heal_all(self) -> None:
        self._resume_stopped()
        assert self.toxiproxy is not None and self.operator is not None
        for proxy in ["apiserver", *self.agents]:
            await asyncio.to_thread(self.toxiproxy.heal, proxy)
        if not self.operator.running:
            self.operator.start()
        for process in self.agents.values():
            if not process.running:
                process.start()
        self.healed_at = now()

    # --- the verdict -----------------------------------------------------------------------

    async def _verify(self) -> dict[str, Any]:
        quiet_end = now()
        self.kubectl("patch", f"schedule/{SCHEDULE}", "--type=merge", "-p", '{"spec":{"suspend":true}}')
        jobs = await self._settled_jobs(timeout=max(120.0, self.settings.quiet * 2))
        cron = Cron(self.settings.schedule, "UTC")
        first = datetime.fromtimestamp(self.started_at, timezone.utc)
        # The last scheduled times of the quiet period may still be on their way: left out.
        last = datetime.fromtimestamp(quiet_end - 20, timezone.utc)
        nominal: list[datetime] = []
        moment = cron.next_after(first)
        while moment <= last:
            nominal.append(moment)
            moment = cron.next_after(moment)

        by_fire: dict[tuple[str, float], list[dict[str, Any]]] = defaultdict(list)
        for job in jobs:
            spec = job["spec"]
            if spec.get("scheduledAt"):
                by_fire[(spec["agent"], parse_time(spec["scheduledAt"]))].append(job)
        duplicates = sum(len(found) - 1 for found in by_fire.values() if len(found) > 1)

        lost, superseded, unexplained = [], 0, []
        for agent in sorted(self.agents):
            gap: list[datetime] = []
            for moment in nominal:
                if (agent, moment.timestamp()) in by_fire:
                    if gap and not self._fault_between(gap[0].timestamp() - 1, moment.timestamp() + 1):
                        unexplained.append(f"{agent}: {gap[0].isoformat()}..{gap[-1].isoformat()}")
                    superseded += len(gap)
                    gap = []
                else:
                    gap.append(moment)
            if gap:
                lost.append(f"{agent}: {gap[0].isoformat()}..{gap[-1].isoformat()} ({len(gap)} time(s), no later job)")

        phases = Counter(job.get("status", {}).get("phase", "Pending") for job in jobs)
        stuck = [job["metadata"]["name"] for job in jobs
                 if job.get("status", {}).get("phase", "Pending") in ("Pending", "Running")]
        snapshots = {s["id"] for s in json.loads(self._restic("snapshots", "--json", "--no-lock"))}
        claimed = {job["status"]["summary"]["snapshotId"]: job["metadata"]["name"] for job in jobs
                   if job.get("status", {}).get("phase") == "Succeeded"
                   and (job["status"].get("summary") or {}).get("snapshotId")}
        missing_snapshots = sorted(name for snapshot, name in claimed.items() if snapshot not in snapshots)
        orphans = sorted(snapshots - set(claimed))
        locks = self._restic("list", "locks", "--no-lock").split()
        logs = [self.operator.log if self.operator else None, *(p.log for p in self.agents.values())]
        tracebacks = {path.name: path.read_text(errors="replace").count(TRACEBACK) for path in logs if path}
        schedule = json.loads(self.kubectl("get", f"schedule/{SCHEDULE}", "-o", "json").stdout)
        counts = Counter(fault.kind for fault in self.faults)
        reconnects = self._reconnect_times()
        report = {
            "settings": {**asdict(self.settings), "directory": str(self.settings.directory),
                         "results": str(self.settings.results)},
            "window": {"faults_from": iso(self.started_at), "healed": iso(self.healed_at), "quiet_end": iso(quiet_end)},
            "faults": dict(sorted(counts.items())),
            "network_faults": dict(sorted(Counter(f.detail.split()[0] for f in self.faults
                                                  if f.kind.endswith("-net")).items())),
            "scheduled_times": len(nominal) * len(self.agents),
            "jobs": len(jobs),
            "phases": dict(sorted(phases.items())),
            "duplicates": duplicates,
            "lost": lost,
            "superseded_by_a_catch_up": superseded,
            "gaps_without_a_fault": unexplained,
            "missed_fires": int(schedule.get("status", {}).get("missedFires", 0)),
            "refused_fires": int(schedule.get("status", {}).get("refusedFires", 0)),
            "stuck": stuck,
            "snapshots": len(snapshots),
            "snapshots_missing": missing_snapshots,
            "orphan_snapshots": orphans,
            "locks_left": locks,
            "tracebacks": {name: count for name, count in tracebacks.items() if count},
            "reconnect_seconds": reconnects,
            "fault_log": [asdict(fault) for fault in self.faults],
        }
        report["hostile"] = dict(self.hostile)
        report["rogue_jobs"] = sum(1 for job in jobs if job["spec"].get("agent") == ROGUE)
        report["ok"] = not (duplicates or lost or unexplained or stuck or missing_snapshots or orphans or locks
                            or report["tracebacks"] or report["rogue_jobs"])
        return report

    async def _settled_jobs(self, *, timeout: float) -> list[dict[str, Any]]:
        """Every ResticJob, once none is Pending or Running (or the timeout has passed)."""
        deadline = time.monotonic() + timeout
        while True:
            jobs = json.loads(self.kubectl("get", "resticjobs", "-o", "json").stdout)["items"]
            active = [j for j in jobs if j.get("status", {}).get("phase", "Pending") in ("Pending", "Running")]
            if not active or time.monotonic() > deadline:
                return jobs
            await asyncio.sleep(1)

    def _fault_between(self, start: float, end: float) -> bool:
        # A fault's effects outlast it by the agent's reconnect backoff and receipt timeouts.
        return any(fault.start <= end and (fault.end or fault.start) + 30 >= start for fault in self.faults)

    def _reconnect_times(self) -> dict[str, Any]:
        """From the operator's log: seconds from each start being primed to every agent connected."""
        assert self.operator is not None
        names = set(self.agents)
        samples: list[float] = []
        primed: float | None = None
        seen: set[str] = set()
        for line in self.operator.log.read_text(errors="replace").splitlines():
            stamp = _log_time(line)
            if stamp is None:
                continue
            if "primed:" in line:
                primed, seen = stamp, set()
            elif primed is not None and " connected from " in line:
                agent = line.split(" agent ", 1)[1].split(" ", 1)[0].rsplit("/", 1)[-1]
                seen.add(agent)
                if seen >= names:
                    samples.append(stamp - primed)
                    primed = None
        if not samples:
            return {"restarts": 0}
        ordered = sorted(samples)
        return {"restarts": len(samples), "median": round(statistics.median(ordered), 3),
                "p99": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))], 3),
                "max": round(ordered[-1], 3)}


def _log_time(line: str) -> float | None:
    try:
        return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").replace(tzinfo=timezone.utc).timestamp()
    except ValueError:
        return None


def _pids_of(binary: Path) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if os.readlink(entry / "exe") == str(binary):
                    found.append(int(entry.name))
    return found


def _parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _fill(path: Path) -> None:
    with contextlib.suppress(OSError), open(path, "wb") as filler:
        while True:
            filler.write(b"\0" * 65536)
            filler.flush()


def table(report: dict[str, Any]) -> str:
    rows = [
        ("faults injected", ", ".join(f"{kind} {count}" for kind, count in report["faults"].items()) or "none"),
        ("network faults by kind", ", ".join(f"{k} {v}" for k, v in report["network_faults"].items()) or "none"),
        ("scheduled times (agents × times)", report["scheduled_times"]),
        ("ResticJobs", f"{report['jobs']} ({', '.join(f'{p} {n}' for p, n in report['phases'].items())})"),
        ("duplicates", report["duplicates"]),
        ("lost (a run of times no later job closed)", len(report["lost"])),
        ("times superseded by a newest-only catch-up", report["superseded_by_a_catch_up"]),
        ("runs without a job and without a fault", len(report["gaps_without_a_fault"])),
        ("missed / refused fires (Schedule status)", f"{report['missed_fires']} / {report['refused_fires']}"),
        ("stuck (Pending or Running at the end)", len(report["stuck"])),
        ("snapshots", report["snapshots"]),
        ("Succeeded jobs whose snapshot is missing", len(report["snapshots_missing"])),
        ("orphan snapshots (no Succeeded job names them)", len(report["orphan_snapshots"])),
        ("restic locks left", len(report["locks_left"])),
        ("tracebacks in logs", sum(report["tracebacks"].values())),
        ("hostile frames sent / answered; oversized closed 1009", "{} / {}; {}".format(
            report["hostile"].get("sent", 0), report["hostile"].get("answered", 0),
            report["hostile"].get("closed-1009", 0))),
        ("jobs made for the rogue agent", report["rogue_jobs"]),
        ("operator ready → all agents connected",
         ", ".join(f"{k} {v}" for k, v in report["reconnect_seconds"].items())),
        ("verdict", "OK" if report["ok"] else "FAILED"),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"| {name.ljust(width)} | {value} |" for name, value in rows)


async def _until_signalled(work: Any) -> Any:
    """Run ``work``; SIGTERM or SIGINT cancels it, so its clean-up (processes, the tmpfs) runs."""
    task = asyncio.ensure_future(work)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, task.cancel)
    return await task


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=60.0, help="how long faults are injected (default 60)")
    parser.add_argument("--agents", type=int, default=5, help="agent processes (default 5)")
    parser.add_argument("--schedule", default="*/10 * * * * *", help="the Schedule's cron (default every 10 s)")
    parser.add_argument("--quiet", type=float, default=60.0, help="undisturbed seconds after the faults (default 60)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the fault draws (default 1)")
    parser.add_argument("--rate", action="append", default=[], metavar="KIND=PER_MINUTE",
                        help=f"a fault kind's rate; kinds and defaults: {DEFAULT_RATES}")
    parser.add_argument("--results", type=Path, default=REPO / "soak" / "results",
                        help="where the report goes (default soak/results)")
    parser.add_argument("--directory", type=Path, default=REPO / ".local" / "soak",
                        help="scratch directory, emptied first (default .local/soak)")
    args = parser.parse_args()
    rates = dict(DEFAULT_RATES)
    for item in args.rate:
        kind, _, value = item.partition("=")
        if kind not in rates or not value:
            parser.error(f"--rate {item!r}: expected KIND=PER_MINUTE with KIND one of {sorted(rates)}")
        rates[kind] = float(value)
    settings = Settings(minutes=args.minutes, agents=args.agents, schedule=args.schedule, quiet=args.quiet,
                        seed=args.seed, rates=rates, directory=args.directory.resolve(), results=args.results)
    try:
        report = asyncio.run(_until_signalled(Soak(settings).run()))
    except asyncio.CancelledError:
        print("soak: interrupted; what it started is stopped", file=sys.stderr)
        return 130
    print(table(report))
    args.results.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    (args.results / f"soak-{stamp}.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.results / f"soak-{stamp}.md").write_text(table(report) + "\n")
    print(f"soak: report in {args.results / f'soak-{stamp}.json'}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
