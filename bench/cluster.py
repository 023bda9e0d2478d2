"""The processes a benchmark runs against: the real local control plane (testbin/), the
operator as a subprocess, what /proc says about them, and py-spy profiles of the operator.

Every process started here is stopped by the same object that started it, on every path.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
# py-spy comes with the `bench` extra, next to the interpreter running the harness.
PY_SPY = Path(os.environ.get("PY_SPY", Path(sys.executable).parent / "py-spy"))
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
STARTUP_TIMEOUT = 120.0

# testbin/ is a folder of scripts, not a package; its scripts import each other the same way.
sys.path.insert(0, str(REPO / "testbin"))
import build  # noqa: E402
import controlplane  # noqa: E402


class BenchError(RuntimeError):
    """A benchmark cannot go on; the message says what did not happen in time."""


def restic_binary() -> Path:
    return Path(build.ensure(["restic"])["restic"])


def raise_nofile() -> int:
    """Raise this process's open-file limit to its hard limit (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# --- which code runs ------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """The restic-manager code that the operator and agent subprocesses (and the harness's
    own protocol imports) run: the working tree as installed, or a snapshot of one commit.

    Other engineers edit the working tree while benchmarks run; a commit's snapshot gives
    figures that belong to a known version.
    """

    label: str
    root: Path | None = None  # a PYTHONPATH root holding restic_manager/ (with operator/, agent/)

    def command(self) -> list[str]:
        return [sys.executable, "-m", "restic_manager.cli"]

    @property
    def cwd(self) -> Path:
        # `python -m` puts the working directory first on sys.path: a snapshot must be run
        # from its own root, or the checkout's restic_manager/ would win.
        return self.root if self.root is not None else REPO

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.root is not None:
            env["PYTHONPATH"] = str(self.root)
        return env

    def operator_options(self) -> list[str]:
        """Plain ws:// on 127.0.0.1, in whichever way this version of the operator spells it."""
        return ["--insecure-listen"] if "--insecure-listen" in _operator_help(self) else []


@functools.cache
def _operator_help(source: Source) -> str:
    return subprocess.run([*source.command(), "operator", "--help"], capture_output=True, text=True,
                          env=source.environment(), cwd=source.cwd, check=False).stdout


def snapshot(revision: str, work: Path) -> Source:
    """``git archive`` of ``revision``'s packages, laid out as the installed package is."""
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", revision], capture_output=True, text=True,
                            check=True).stdout.strip()
    root = work / f"source-{commit}"
    shutil.rmtree(root, ignore_errors=True)
    unpacked = root / "unpacked"
    unpacked.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", commit, "restic_manager", "operator", "agent"],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(unpacked)], input=archive, check=True)
    package = root / "restic_manager"
    (unpacked / "restic_manager").rename(package)
    (unpacked / "operator").rename(package / "operator")
    (unpacked / "agent").rename(package / "agent")
    unpacked.rmdir()
    return Source(f"commit {commit}", root)


SOURCE = Source("working tree")


def use(source: Source) -> None:
    """Run ``source`` from now on; call before anything imports restic_manager."""
    global SOURCE
    SOURCE = source
    if source.root is not None:
        sys.path.insert(0, str(source.root))


# --- /proc --------------------------------------------------------------------------------


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as statm:
        return int(statm.read().split()[1]) * PAGE_SIZE


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of the whole process (every thread)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def voluntary_switches(pid: int, tid: int | None = None) -> int:
    """How often the thread (default: the main thread) gave up the CPU to wait: its wake-ups."""
    with open(f"/proc/{pid}/task/{tid or pid}/status") as status:
        for line in status:
            if line.startswith("voluntary_ctxt_switches:"):
                return int(line.split()[1])
    raise BenchError(f"/proc/{pid}/task/{tid or pid}/status has no voluntary_ctxt_switches")


def thread_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def load_average() -> tuple[float, float, float]:
    return os.getloadavg()


def machine_ticks() -> tuple[int, int, int]:
    """The whole machine's CPU ticks so far, from /proc/stat: (all, busy, stolen). Stolen time is
    what the hypervisor gave to other guests while this one wanted the CPU."""
    with open("/proc/stat") as stat:
        user, nice, system, idle, iowait, irq, softirq, steal = (int(x) for x in stat.readline().split()[1:9])
    return user + nice + system + idle + iowait + irq + softirq + steal, user + nice + system + irq + softirq, steal


@dataclass
class Usage:
    """CPU and memory of a set of processes over one window, from /proc."""

    pids: dict[str, int]
    started: float = field(default_factory=time.monotonic)
    cpu0: dict[str, float] = field(default_factory=dict)
    ticks0: tuple[int, int, int] = field(default_factory=machine_ticks)

    def __post_init__(self) -> None:
        self.cpu0 = {name: cpu_seconds(pid) for name, pid in self.pids.items()}

    def read(self) -> dict[str, Any]:
        wall = time.monotonic() - self.started
        out: dict[str, Any] = {"seconds": round(wall, 1), "loadavg_1m": round(load_average()[0], 2)}
        # The machine as a whole over the window: how busy every process made it, and how much
        # CPU the hypervisor withheld (both as a share of all cores' time).
        total, busy, stolen = (now - then for now, then in zip(machine_ticks(), self.ticks0))
        out["machine_busy_percent"] = round(100 * busy / max(total, 1), 1)
        out["machine_steal_percent"] = round(100 * stolen / max(total, 1), 1)
        for name, pid in self.pids.items():
            used = cpu_seconds(pid) - self.cpu0[name]
            out[name] = {"cpu_seconds": round(used, 2), "cpu_percent": round(100 * used / max(wall, 1e-9), 1),
                         "rss_mib": round(rss_bytes(pid) / 2**20, 1)}
        return out


async def settle(pid: int, *, below_percent: float, window: float = 3.0, timeout: float) -> float:
    """Wait until the process uses less than ``below_percent`` CPU over ``window`` seconds
    (its backlog is done); returns how long that took. Bounded by ``timeout``."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        before = cpu_seconds(pid)
        await asyncio.sleep(window)
        if 100 * (cpu_seconds(pid) - before) / window < below_percent:
            break
    return time.monotonic() - start


# --- the control plane ---------------------------------------------------------------------


class ControlPlane:
    """etcd, kube-apiserver and kube-controller-manager (with the cronjob controller) from
    testbin/, in ``directory``; ``kubeconfig`` is where the admin kubeconfig goes."""

    def __init__(self, directory: Path, *, cpus: tuple[int, ...] = ()) -> None:
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
        self.directory = directory
        self.kubeconfig = directory / "kubeconfig"
        self._plane = controlplane.ControlPlane(directory=directory / "plane", kubeconfig=self.kubeconfig, cpus=cpus)

    def kubectl(self, *args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
        return self._plane.kubectl(*args, input=input)

    def pids(self) -> dict[str, int]:
        return {name: process.pid for name, process in self._plane.processes.items()}

    async def __aenter__(self) -> ControlPlane:
        try:
            await asyncio.to_thread(self._plane.start)
        except BaseException:
            await asyncio.to_thread(self._plane.stop)
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await asyncio.to_thread(self._plane.stop)


# --- the operator --------------------------------------------------------------------------


# openssl's -newkey for each kind of serving certificate a benchmark may give the operator.
CERTIFICATE_KEYS = {"ECDSA P-256": ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"],
                    "RSA 2048": ["-newkey", "rsa:2048"]}


def serving_certificate(directory: Path, kind: str) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key, of ``kind`` (:data:`CERTIFICATE_KEYS`):
    what a TLS handshake costs the operator depends on it."""
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / "operator.crt", directory / "operator.key"
    subprocess.run(["openssl", "req", "-x509", *CERTIFICATE_KEYS[kind], "-nodes", "-days", "2", "-subj", "/CN=bench",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert, key


class Operator:
    """``restic-manager operator`` as a subprocess with the open-file limit raised, serving
    agents on 127.0.0.1:``port`` (plain ws, or wss with ``tls``: certificate and key) and
    watching ``namespace``; ``extra``: more of its options."""

    def __init__(self, *, kubeconfig: Path, namespace: str, log: Path, wrapper: list[str] | None = None,
                 tls: tuple[Path, Path] | None = None, extra: Sequence[str] = ()) -> None:
        self.port = free_port()
        self.log = log
        self.tls = tls
        command = SOURCE.command() if wrapper is None else wrapper
        listen = (["--tls-cert-file", str(tls[0]), "--tls-key-file", str(tls[1])] if tls
                  else SOURCE.operator_options())
        self.argv = [*command, "operator", "--kubeconfig", str(kubeconfig), "--listen", f"127.0.0.1:{self.port}",
                     *listen, "--namespace", namespace, *extra]
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{'wss' if self.tls else 'ws'}://127.0.0.1:{self.port}/agent"

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    def alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    async def __aenter__(self) -> Operator:
        await self.start()
        return self

    async def kill_and_restart(self) -> None:
        """kill -9, then the same command again, listening on the same port."""
        assert self._process is not None
        self._process.kill()
        await asyncio.to_thread(self._process.wait)
        await self.start()

    async def start(self) -> None:
        with open(self.log, "ab") as log:
            log.write(f"--- {SOURCE.label}: {' '.join(self.argv)}\n".encode())
            log.flush()
            self._process = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                             cwd=SOURCE.cwd, env=SOURCE.environment(), preexec_fn=raise_nofile)
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            if not self.alive():
                raise BenchError(f"the operator exited with {self._process.returncode}; see {self.log}")
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
                writer.close()
                await writer.wait_closed()
                return
            except OSError:
                await asyncio.sleep(0.2)
        await self.__aexit__()
        raise BenchError(f"the operator did not listen on port {self.port} within {STARTUP_TIMEOUT:.0f}s; "
                         f"see {self.log}")

    async def __aexit__(self, *exc_info: object) -> None:
        process = self._process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(process.wait, 30)
        except subprocess.TimeoutExpired:
            process.kill()
            await asyncio.to_thread(process.wait)

    def signal(self, signum: int) -> None:
        assert self._process is not None
        self._process.send_signal(signum)


# --- profiles -------------------------------------------------------------------------------


async def profile(pid: int, *, seconds: int, output: Path, rate: int = 100) -> dict[str, Any]:
    """Sample ``pid`` with py-spy for ``seconds`` (without stopping it) and summarise where
    its time goes; the collapsed stacks stay in ``output``."""
    if not PY_SPY.exists():
        return {"error": f"py-spy not found at {PY_SPY}; `make bench` installs it (the `bench` extra), or set PY_SPY"}
    process = await asyncio.create_subprocess_exec(
        str(PY_SPY), "record", "--pid", str(pid), "--duration", str(seconds), "--rate", str(rate),
        "--format", "raw", "--nonblocking", "--output", str(output),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    try:
        async with asyncio.timeout(seconds + 60):
            _, stderr = await process.communicate()
    except TimeoutError:
        process.kill()
        await process.wait()
        return {"error": "py-spy did not finish"}
    if process.returncode != 0 or not output.exists():
        return {"error": f"py-spy exited with {process.returncode}: {stderr.decode(errors='replace')[-500:]}"}
    return {"seconds": seconds, "rate": rate, "raw": output.name,
            **summarise_stacks(output.read_text().splitlines(), possible=seconds * rate)}


def summarise_stacks(lines: list[str], *, possible: int, top: int = 25) -> dict[str, Any]:
    """From py-spy's collapsed stacks (active samples only): for the busiest functions, the
    share of wall-clock time they were on a stack (inclusive) and on top of it (self).

    ``possible`` is how many samples one always-busy thread would have given; 100% is one
    core's worth of time.
    """
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in lines:
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_short(frame) for frame in stack.split(";")]
        total += count
        for function in {frame.rsplit(":", 1)[0] + ")" for frame in frames}:
            inclusive[function] += count
        own[frames[-1]] += count

    def share(counter: collections.Counter[str]) -> list[dict[str, Any]]:
        return [{"frame": frame, "percent_of_core": round(100 * count / max(possible, 1), 1)}
                for frame, count in counter.most_common(top)]

    ours = collections.Counter({frame: count for frame, count in inclusive.items()
                                if frame.split(" (", 1)[-1].startswith(OUR_CODE)})
    return {"active_samples": total, "busy_percent_of_core": round(100 * total / max(possible, 1), 1),
            "inclusive_ours": share(ours), "inclusive": share(inclusive), "self": share(own)}


OUR_CODE = ("operator/", "agent/", "restic_manager/")


def _short(frame: str) -> str:
    """``name (/long/path/site-packages/pkg/mod.py:12)`` as ``name (pkg/mod.py:12)``."""
    for marker in ("site-packages/", f"{REPO}/", "/lib/python3.11/"):
        if marker in frame:
            name, _, path = frame.partition(" (")
            return f"{name} ({path.split(marker, 1)[1]}"
    return frame
