"""agent/runner.py against the real restic binary (the pinned 0.19.1), repositories in tmp_path.

Long runs are made with a large sparse file: restic reads it at disk-cache speed for a minute,
so a cancel or a timeout always lands mid-backup, and the file costs no disk space.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest

from restic_manager import protocol
from restic_manager.agent import restic as rules
from restic_manager.agent.policy import HostPolicy
from restic_manager.agent.runner import INTERRUPTED, JobRunner, ResticUnavailable, interrupted, restic_version
from restic_manager.agent.state import Journal
from restic_manager.protocol import Outcome

pytestmark = pytest.mark.restic

PASSWORD = "runner-test-password-7f3c9a"
HOST = "test-host"
AGENT_SECRET = "agent-only-secret-value-41d2"  # in the agent's environment; must not reach restic
EVENT_TIMEOUT = 60.0  # generous: the machine is shared; reached only when something is broken


class Recorder:
    """The runner's `send`: keeps every payload and lets a test await one."""

    def __init__(self) -> None:
        self.payloads: list[protocol.Payload] = []
        self._changed = asyncio.Event()

    async def send(self, payload: protocol.Payload) -> None:
        protocol.decode(protocol.encode(payload))  # every payload must be a valid frame
        self.payloads.append(payload)
        self._changed.set()

    async def first(self, predicate: Callable[[protocol.Payload], bool]) -> protocol.Payload:
        async with asyncio.timeout(EVENT_TIMEOUT):
            while True:
                for payload in self.payloads:
                    if predicate(payload):
                        return payload
                self._changed.clear()
                await self._changed.wait()

    def of(self, kind: type[protocol.Payload], job: str) -> list[Any]:
        return [p for p in self.payloads if isinstance(p, kind) and getattr(p, "job", None) == job]


def command(job: str, job_type: str, args: dict[str, Any], repo: Path | str, *,
            password: str = PASSWORD, timeout_seconds: int = 600, initialize: bool = False) -> protocol.CommandRun:
    return msgspec.convert({
        "job": f"backups/{job}",
        "type": job_type,
        "args": args,
        "repository": {"url": str(repo), "env": {"RESTIC_PASSWORD": password}, "initialize": initialize},
        "timeoutSeconds": timeout_seconds,
    }, protocol.CommandRun)


async def restic_json(restic_bin: Path, repo: Path, *args: str) -> Any:
    """Ask restic itself about the repository (without taking a lock)."""
    process = await asyncio.create_subprocess_exec(
        str(restic_bin), "--json", "--no-lock", *args,
        env={"PATH": os.environ.get("PATH", ""), "RESTIC_REPOSITORY": str(repo), "RESTIC_PASSWORD": PASSWORD,
             "RESTIC_CACHE_DIR": str(repo.parent / "cli-cache")},
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await process.communicate()
    assert process.returncode == 0, stderr.decode()
    return json.loads(stdout) if args[0] != "list" else stdout.decode().split()


@pytest.fixture(scope="module")
def template_repo(restic_bin: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One initialised repository per module; each test gets a copy (init costs a key derivation)."""
    repo = tmp_path_factory.mktemp("template") / "repo"
    subprocess.run(
        [str(restic_bin), "init"], check=True, capture_output=True,
        env={"PATH": os.environ.get("PATH", ""), "RESTIC_REPOSITORY": str(repo), "RESTIC_PASSWORD": PASSWORD,
             "RESTIC_CACHE_DIR": str(repo.parent / "cache")},
    )
    return repo


@pytest.fixture
def repo(template_repo: Path, tmp_path: Path) -> Path:
    target = tmp_path / "repo"
    shutil.copytree(template_repo, target)
    return target


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """Random data big enough for restic to report progress, plus small files and a subdirectory."""
    root = tmp_path / "src"
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "big.bin").write_bytes(os.urandom(40 * 1024 * 1024))
    for number in range(50):
        (root / "sub" / f"file-{number}.txt").write_text(f"file {number}\n" * number)
    (root / "sub" / "deeper" / "empty").write_bytes(b"")
    return root


@pytest.fixture
def slow_tree(tmp_path: Path) -> Path:
    """A backup source restic needs about a minute for: one 64 GiB sparse file."""
    root = tmp_path / "slow"
    root.mkdir()
    with open(root / "sparse.img", "wb") as handle:
        handle.truncate(64 * 1024**3)
    return root


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
async def runner(restic_bin: Path, recorder: Recorder, tmp_path: Path,
                 monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[JobRunner]:
    monkeypatch.setenv("RESTIC_MANAGER_TOKEN", AGENT_SECRET)
    runner = JobRunner(restic=restic_bin, host=HOST, send=recorder.send, cache_dir=tmp_path / "cache",
                       host_policy=HostPolicy(restore_targets=(str(tmp_path / "restored"),)),
                       progress_interval=0.2, kill_grace=10.0)
    try:
        yield runner
    finally:
        await runner.aclose()


async def run(runner: JobRunner, run_command: protocol.CommandRun) -> protocol.JobDone:
    await runner.start(run_command)
    done = await runner.wait(run_command.job)
    assert done is not None
    return done


def tree_bytes(root: Path) -> int:
    return sum(path.stat().st_size for path in root.rglob("*") if path.is_file())


def is_progress(job: str) -> Callable[[protocol.Payload], bool]:
    return lambda p: isinstance(p, protocol.JobProgress) and p.job == job and p.bytes_done > 0


async def test_restic_version(restic_bin: Path) -> None:
    assert await restic_version(restic_bin) == "0.19.1"
    with pytest.raises(ResticUnavailable, match="restic binary /nonexistent/restic"):
        await restic_version("/nonexistent/restic")


async def test_init_creates_the_repository_and_init_on_an_existing_one_is_not_an_error(
    runner: JobRunner, recorder: Recorder, tmp_path: Path
) -> None:
    repo = tmp_path / "fresh"
    created = await run(runner, command("init-1", "init", {}, repo))
    assert (created.outcome, created.exit_code, created.error) == (Outcome.SUCCEEDED, 0, "")
    assert (repo / "config").is_file()
    assert any(line.startswith("created restic repository") for line in created.log_tail)

    again = await run(runner, command("init-2", "init", {}, repo))
    assert (again.outcome, again.error) == (Outcome.SUCCEEDED, "repository is already initialized; nothing to do")
    assert len(recorder.of(protocol.JobStarted, "backups/init-2")) == 1
    assert len(recorder.of(protocol.JobDone, "backups/init-2")) == 1


async def test_initialize_creates_a_missing_repository_before_the_job_and_only_then(
    runner: JobRunner, tree: Path, tmp_path: Path, restic_bin: Path
) -> None:
    repo = tmp_path / "to-create"
    first = await run(runner, command("first", "backup", {"paths": [str(tree)]}, repo, initialize=True))
    assert (first.outcome, first.exit_code) == (Outcome.SUCCEEDED, 0), first.error
    assert any("running `restic init` (Repository spec.initialize)" in line for line in first.log_tail)
    assert first.summary is not None and first.summary.snapshot_id
    second = await run(runner, command("second", "backup", {"paths": [str(tree)]}, repo, initialize=True))
    assert second.outcome is Outcome.SUCCEEDED
    assert not any("restic init" in line for line in second.log_tail)
    snapshots = await restic_json(restic_bin, repo, "snapshots")
    assert sorted(s["short_id"] for s in snapshots) == sorted([first.summary.snapshot_id[:8], second.summary.snapshot_id[:8]])


async def test_backup_reports_progress_and_the_summary_of_a_real_snapshot(
    runner: JobRunner, recorder: Recorder, repo: Path, tree: Path, restic_bin: Path
) -> None:
    job = command("backup", "backup", {"paths": [str(tree)], "tags": ["nightly"], "exclude": ["*.tmp"]}, repo)
    (tree / "skip.tmp").write_text("excluded")
    done = await run(runner, job)

    assert (done.outcome, done.exit_code, done.error) == (Outcome.SUCCEEDED, 0, "")
    assert done.summary is not None and done.summary.snapshot_id
    assert done.summary.files_new == 52  # big.bin, 50 small files, the empty one; not skip.tmp
    assert done.summary.total_bytes_processed == tree_bytes(tree) - len("excluded")
    started = recorder.of(protocol.JobStarted, job.job)
    progress = recorder.of(protocol.JobProgress, job.job)
    assert len(started) == 1 and recorder.payloads.index(started[0]) < recorder.payloads.index(progress[0])
    assert any(p.bytes_done > 0 and p.total_bytes > 0 for p in progress)
    assert recorder.payloads[-1] == done and len(recorder.of(protocol.JobDone, job.job)) == 1

    snapshots = await restic_json(restic_bin, repo, "snapshots")
    assert [(s["id"], s["hostname"], sorted(s["tags"])) for s in snapshots] == [
        (done.summary.snapshot_id, HOST, ["nightly", "restic-manager.job=backups/backup"])]


async def test_forget_applies_the_policy_to_this_host_only(
    runner: JobRunner, repo: Path, tree: Path, restic_bin: Path
) -> None:
    for number in range(3):
        (tree / "changing.txt").write_text(f"version {number}")
        assert (await run(runner, command(f"backup-{number}", "backup", {"paths": [str(tree)]}, repo))).outcome is Outcome.SUCCEEDED
    other_host = await asyncio.create_subprocess_exec(
        str(restic_bin), "backup", "--host", "other-host", str(tree / "sub"),
        env={"RESTIC_REPOSITORY": str(repo), "RESTIC_PASSWORD": PASSWORD, "RESTIC_CACHE_DIR": str(repo.parent / "cli-cache")},
        stdout=asyncio.subprocess.DEVNULL,
    )
    assert await other_host.wait() == 0

    done = await run(runner, command("forget", "forget", {"keepLast": 1, "prune": True}, repo))

    assert (done.outcome, done.error) == (Outcome.SUCCEEDED, "")
    assert "forget: kept 1, removed 2 snapshot(s) in 1 group(s)" in done.log_tail
    remaining = await restic_json(restic_bin, repo, "snapshots")
    assert sorted(s["hostname"] for s in remaining) == ["other-host", HOST]


async def test_check_reads_a_subset_of_the_data(runner: JobRunner, repo: Path, tree: Path) -> None:
    assert (await run(runner, command("backup", "backup", {"paths": [str(tree)]}, repo))).outcome is Outcome.SUCCEEDED
    done = await run(runner, command("check", "check", {"readDataSubset": "50%"}, repo))
    assert (done.outcome, done.exit_code, done.error) == (Outcome.SUCCEEDED, 0, "")
    assert "check: no errors were found" in done.log_tail


async def test_restore_gives_back_the_same_bytes(runner: JobRunner, repo: Path, tree: Path, tmp_path: Path) -> None:
    assert (await run(runner, command("backup", "backup", {"paths": [str(tree)]}, repo))).outcome is Outcome.SUCCEEDED
    target = tmp_path / "restored"
    done = await run(runner, command("restore", "restore", {"target": str(target)}, repo))

    assert (done.outcome, done.error) == (Outcome.SUCCEEDED, "")
    restored_root = target / tree.relative_to("/")
    originals = sorted(p.relative_to(tree) for p in tree.rglob("*"))
    assert sorted(p.relative_to(restored_root) for p in restored_root.rglob("*")) == originals
    for relative in originals:
        if (tree / relative).is_file():
            assert (restored_root / relative).read_bytes() == (tree / relative).read_bytes(), relative
    # restore counts directories (those above the backed-up path too) among its files
    assert done.summary is not None and done.summary.total_bytes_processed == tree_bytes(tree)


@pytest.mark.parametrize(("case", "job_type", "args", "allowed", "refusal"), [
    ("a backup outside backupPaths", "backup", {"paths": ["{tree}"]}, {"backup_paths": ("{tree}/sub",)},
     "refused by this host: backup of {tree}: {tree} is not at or under a path this host's agent config allows "
     "(backupPaths: {tree}/sub)"),
    ("a restore to /", "restore", {"target": "/"}, {},
     "refused by this host: restore to /: / is not at or under a path this host's agent config allows "
     "(restoreTargets: /var/lib/restic-manager-restore)"),
    ("a repository outside repositories", "check", {}, {"repositories": ("s3:*",)},
     "refused by this host: this host's agent config does not allow the repository {repo} (repositories: s3:*)"),
])
async def test_a_job_the_host_does_not_allow_fails_before_restic_runs(
    restic_bin: Path, recorder: Recorder, repo: Path, tree: Path, case: str, job_type: str, args: dict[str, Any],
    allowed: dict[str, tuple[str, ...]], refusal: str,
) -> None:
    def fill(text: str) -> str:
        return text.format(tree=tree, repo=repo)

    host_policy = HostPolicy(**{name: tuple(map(fill, values)) for name, values in allowed.items()})
    runner = JobRunner(restic=restic_bin, host=HOST, send=recorder.send, host_policy=host_policy)
    job = command("refused", job_type, {name: fill(v) if isinstance(v, str) else [fill(p) for p in v]
                                        for name, v in args.items()}, repo)
    try:
        done = await run(runner, job)
    finally:
        await runner.aclose()

    assert (done.outcome, done.refused, done.interrupted, done.error) == (Outcome.FAILED, True, False, fill(refusal))
    assert done.log_tail == [f"agent: {fill(refusal)}"]
    assert recorder.of(protocol.JobStarted, job.job) == []  # restic never ran
    assert await restic_json(restic_bin, repo, "snapshots") == []


async def test_a_backup_that_covers_the_agents_own_files_leaves_them_out(
    restic_bin: Path, recorder: Recorder, repo: Path, tree: Path
) -> None:
    own = tree / "sub" / "deeper"  # stands for the agent's state directory
    runner = JobRunner(restic=restic_bin, host=HOST, send=recorder.send, host_policy=HostPolicy(protected=(str(own),)))
    try:
        done = await run(runner, command("covers", "backup", {"paths": [str(tree)]}, repo))
    finally:
        await runner.aclose()

    assert done.outcome is Outcome.SUCCEEDED and done.summary is not None
    listing = subprocess.run(
        [str(restic_bin), "--json", "--no-lock", "ls", done.summary.snapshot_id or "latest"],
        check=True, capture_output=True, text=True,
        env={"RESTIC_REPOSITORY": str(repo), "RESTIC_PASSWORD": PASSWORD, "RESTIC_CACHE_DIR": str(repo.parent / "cli-cache")})
    paths = {entry["path"] for entry in map(json.loads, listing.stdout.splitlines()) if "path" in entry}
    assert str(tree / "sub" / "file-3.txt") in paths
    assert not any(path == str(own) or path.startswith(f"{own}/") for path in paths)


async def test_cancel_interrupts_restic_and_leaves_no_lock(
    runner: JobRunner, recorder: Recorder, repo: Path, slow_tree: Path, restic_bin: Path
) -> None:
    job = command("long-backup", "backup", {"paths": [str(slow_tree)]}, repo)
    await runner.start(job)
    await runner.start(job)  # a repeated command.run does not start a second restic
    await recorder.first(is_progress(job.job))
    assert runner.running() == [job.job]

    assert await runner.cancel(job.job)
    done = await runner.wait(job.job)

    assert done is not None
    assert (done.outcome, done.error) == (Outcome.CANCELLED, "backup cancelled: restic was interrupted")
    assert done.exit_code == 130  # restic handled the SIGINT itself
    assert runner.running() == []
    assert await runner.cancel(job.job) is False
    assert len(recorder.of(protocol.JobStarted, job.job)) == 1
    assert len(recorder.of(protocol.JobDone, job.job)) == 1
    assert await restic_json(restic_bin, repo, "list", "locks") == []


async def test_timeout_stops_restic_and_fails_the_job(
    runner: JobRunner, repo: Path, slow_tree: Path, restic_bin: Path
) -> None:
    done = await run(runner, command("too-slow", "backup", {"paths": [str(slow_tree)]}, repo, timeout_seconds=2))
    assert (done.outcome, done.error) == (Outcome.FAILED, "backup timed out after 2 s: restic was interrupted")
    assert done.timed_out  # the ResticJob's reason becomes Timeout
    assert await restic_json(restic_bin, repo, "list", "locks") == []


async def test_a_stale_lock_is_removed_and_the_job_retried_once(
    runner: JobRunner, repo: Path, slow_tree: Path, restic_bin: Path
) -> None:
    await leave_a_stale_lock(restic_bin, repo, slow_tree)  # check needs an exclusive lock

    done = await run(runner, command("check", "check", {}, repo))

    assert (done.outcome, done.error) == (Outcome.SUCCEEDED, "")
    assert any("repository is already locked" in line for line in done.log_tail)
    assert "agent: repository is locked; removing stale locks with `restic unlock`, then retrying once" in done.log_tail
    assert await restic_json(restic_bin, repo, "list", "locks") == []


async def test_wrong_password_fails_with_a_clear_message(runner: JobRunner, repo: Path, tree: Path) -> None:
    done = await run(runner, command("backup", "backup", {"paths": [str(tree)]}, repo, password="not-the-password"))
    assert (done.outcome, done.exit_code) == (Outcome.FAILED, 12)
    assert done.error == "wrong password or no key found for repository: check the Repository's passwordSecretRef"
    assert not any("not-the-password" in line for line in done.log_tail)


async def test_missing_repository_fails_with_a_clear_message(runner: JobRunner, tmp_path: Path, tree: Path) -> None:
    done = await run(runner, command("backup", "backup", {"paths": [str(tree)]}, tmp_path / "nothing-here"))
    assert (done.outcome, done.exit_code) == (Outcome.FAILED, 10)
    assert done.error.startswith("repository does not exist (unable to open config file: stat ")
    assert done.error.endswith("; create it with an init job or spec.initialize on the Repository")


async def test_a_backup_that_could_not_read_some_files_fails_but_names_its_snapshot(
    runner: JobRunner, repo: Path, tree: Path, restic_bin: Path
) -> None:
    # /proc/self/mem cannot be read from the start: restic saves the rest and exits 3.
    done = await run(runner, command("partial", "backup", {"paths": [str(tree / "sub"), "/proc/self/mem"]}, repo))
    assert (done.outcome, done.exit_code) == (Outcome.FAILED, 3)
    assert done.summary is not None and done.summary.snapshot_id
    assert done.error.startswith("backup incomplete: 1 source file(s) could not be read (first: ")
    assert done.error.endswith(f"snapshot {done.summary.snapshot_id[:8]} was saved without them")
    assert [s["id"] for s in await restic_json(restic_bin, repo, "snapshots")] == [done.summary.snapshot_id]


async def test_a_missing_restic_binary_fails_the_job(recorder: Recorder, repo: Path) -> None:
    runner = JobRunner(restic="/nonexistent/restic", host=HOST, send=recorder.send)
    try:
        done = await run(runner, command("prune", "prune", {}, repo))
    finally:
        await runner.aclose()
    assert (done.outcome, done.exit_code) == (Outcome.FAILED, None)
    assert done.error == "cannot run restic /nonexistent/restic: No such file or directory"
    assert recorder.payloads == [done]


async def test_a_refused_repository_env_fails_the_job_without_running_restic(
    runner: JobRunner, recorder: Recorder, repo: Path
) -> None:
    job = msgspec.convert({
        "job": "backups/evil", "type": "prune", "args": {},
        "repository": {"url": str(repo), "env": {"RESTIC_PASSWORD": PASSWORD, "RESTIC_PASSWORD_COMMAND": "id"}},
    }, protocol.CommandRun)
    done = await run(runner, job)
    assert done.outcome is Outcome.FAILED
    assert "RESTIC_PASSWORD_COMMAND': not allowed, it would run a command on the agent's host" in done.error
    assert recorder.of(protocol.JobStarted, job.job) == []


async def test_the_password_reaches_restic_only_through_its_environment(
    runner: JobRunner, recorder: Recorder, repo: Path, slow_tree: Path, restic_bin: Path
) -> None:
    job = command("watched", "backup", {"paths": [str(slow_tree)]}, repo)
    planned = rules.build_invocation(job, restic=restic_bin, host=HOST, base_env={})
    assert PASSWORD not in " ".join(planned.argv) and planned.env["RESTIC_PASSWORD"] == PASSWORD

    await runner.start(job)
    await recorder.first(is_progress(job.job))
    live = [pid for pid in os.listdir("/proc") if pid.isdigit() and _cmdline(pid)[:1] == [str(restic_bin)]
            and str(slow_tree) in _cmdline(pid)]
    assert len(live) == 1
    (pid,) = live
    assert _cmdline(pid) == list(planned.argv)
    assert PASSWORD.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    assert f"RESTIC_PASSWORD={PASSWORD}".encode() in environ
    assert not any(AGENT_SECRET.encode() in entry for entry in environ)
    assert await runner.cancel(job.job)
    await runner.wait(job.job)


def _cmdline(pid: str) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
    except OSError:  # exited meanwhile
        return []


async def test_a_restic_that_ignores_sigint_is_killed_and_its_lock_removed(
    recorder: Recorder, tmp_path: Path
) -> None:
    """restic cannot be made to ignore SIGINT, so a stand-in that does plays it here."""
    calls = tmp_path / "calls.log"
    stand_in = tmp_path / "stubborn-restic"
    stand_in.write_text(
        f"#!{sys.executable}\n"
        "import signal, sys, time\n"
        "signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
        f"open({str(calls)!r}, 'a').write(' '.join(sys.argv[1:]) + '\\n')\n"
        "if 'unlock' in sys.argv: sys.exit(0)\n"
        "print('{\"message_type\":\"status\",\"percent_done\":0.5,\"bytes_done\":1,\"total_bytes\":2}', flush=True)\n"
        "time.sleep(600)\n"
    )
    stand_in.chmod(0o755)
    runner = JobRunner(restic=stand_in, host=HOST, send=recorder.send, kill_grace=0.5)
    job = command("stubborn", "backup", {"paths": ["/etc"]}, tmp_path / "repo")
    try:
        await runner.start(job)
        await recorder.first(is_progress(job.job))
        await runner.cancel(job.job)
        done = await runner.wait(job.job)
    finally:
        await runner.aclose()

    assert done is not None
    assert (done.outcome, done.exit_code) == (Outcome.CANCELLED, 137)
    assert "agent: restic did not stop within 0.5 s of SIGINT; sent SIGKILL" in done.log_tail
    assert calls.read_text().splitlines() == [
        f"--json backup --host {HOST} --tag=restic-manager.job=backups/stubborn -- /etc",
        "--json unlock",
    ]


async def test_aclose_cancels_every_running_job(
    runner: JobRunner, recorder: Recorder, repo: Path, slow_tree: Path
) -> None:
    job = command("at-shutdown", "backup", {"paths": [str(slow_tree)]}, repo)
    await runner.start(job)
    await recorder.first(is_progress(job.job))
    await runner.aclose()
    (done,) = recorder.of(protocol.JobDone, job.job)
    assert done.outcome is Outcome.CANCELLED
    assert runner.running() == []


# --- a job runs once, and restic never outlives its agent -------------------------------------


async def test_a_job_that_ran_is_not_run_again(runner: JobRunner, recorder: Recorder, repo: Path, tree: Path) -> None:
    job = command("once", "backup", {"paths": [str(tree)]}, repo)
    assert (await run(runner, job)).outcome is Outcome.SUCCEEDED

    await runner.start(job)  # command.run again, e.g. from an operator that restarted

    assert runner.running() == []
    assert (len(recorder.of(protocol.JobStarted, job.job)), len(recorder.of(protocol.JobDone, job.job))) == (1, 1)


async def test_a_job_whose_job_done_waits_for_its_receipt_is_not_run_again(
    restic_bin: Path, recorder: Recorder, repo: Path, tree: Path
) -> None:
    job = command("unsettled", "backup", {"paths": [str(tree)]}, repo)
    runner = JobRunner(restic=restic_bin, host=HOST, send=recorder.send, unsettled=lambda: [job.job])
    try:
        await runner.start(job)
        assert runner.running() == [] and recorder.payloads == []
    finally:
        await runner.aclose()


async def test_a_job_is_journaled_while_it_runs(restic_bin: Path, recorder: Recorder, repo: Path, tree: Path) -> None:
    journal, saved = Journal(), []

    async def save() -> None:
        saved.append(dict(journal.running))

    runner = JobRunner(restic=restic_bin, host=HOST, send=recorder.send, journal=journal, save=save)
    try:
        await run(runner, command("journaled", "backup", {"paths": [str(tree)]}, repo))
    finally:
        await runner.aclose()
    assert saved == [{"backups/journaled": str(repo)}]  # saved before restic started
    assert journal.running == {}  # and gone when its job.done was posted


async def test_a_job_a_dead_agent_left_is_looked_up_not_rerun_and_its_repository_unlocked_first(
    restic_bin: Path, recorder: Recorder, repo: Path, slow_tree: Path
) -> None:
    await leave_a_stale_lock(restic_bin, repo, slow_tree)
    journal = Journal(running={"backups/killed": str(repo)})

    assert interrupted(journal) == ["backups/killed"]
    assert (journal.running, journal.unlock) == ({}, {str(repo)})
    runner = JobRunner(restic=restic_bin, host=HOST, send=recorder.send, journal=journal)
    try:
        assert runner.interrupted() == ["backups/killed"]
        done = await run(runner, command("killed", "backup", {"paths": [str(slow_tree)]}, repo))
    finally:
        await runner.aclose()

    assert (done.outcome, done.error, done.interrupted, done.summary) == (Outcome.FAILED, INTERRUPTED, True, None)
    assert ("agent: a restic of this agent was killed while it used the repository; removing stale locks "
            "with `restic unlock`") in done.log_tail
    assert "agent: restic saved no snapshot for this job" in done.log_tail
    assert recorder.of(protocol.JobStarted, "backups/killed") == []  # restic's backup did not run again
    assert (journal.unlock, journal.interrupted, runner.interrupted()) == (set(), {}, [])
    assert await restic_json(restic_bin, repo, "list", "locks") == []
    assert await restic_json(restic_bin, repo, "snapshots") == []


async def test_a_backup_whose_snapshot_was_saved_before_its_agent_died_ends_succeeded_with_it(
    restic_bin: Path, recorder: Recorder, repo: Path, tree: Path
) -> None:
    # What the dead agent's restic left: the snapshot, tagged with the job, and no report.
    saved = subprocess.run(
        [str(restic_bin), "--json", "backup", "--host", HOST, "--tag=restic-manager.job=backups/saved", str(tree)],
        check=True, capture_output=True, text=True,
        env={"RESTIC_REPOSITORY": str(repo), "RESTIC_PASSWORD": PASSWORD, "RESTIC_CACHE_DIR": str(repo.parent / "cli-cache")})
    [snapshot] = [json.loads(line)["snapshot_id"] for line in saved.stdout.splitlines() if '"summary"' in line]
    journal = Journal(running={"backups/saved": str(repo)})
    interrupted(journal)
    runner = JobRunner(restic=restic_bin, host=HOST, send=recorder.send, journal=journal)
    try:
        done = await run(runner, command("saved", "backup", {"paths": [str(tree)]}, repo))
    finally:
        await runner.aclose()

    assert (done.outcome, done.interrupted) == (Outcome.SUCCEEDED, False)
    assert done.summary is not None
    assert (done.summary.snapshot_id, done.summary.files_new, done.summary.total_bytes_processed) == (
        snapshot, 52, tree_bytes(tree))
    assert any(line.startswith(f"agent: restic saved snapshot {snapshot[:8]} before it was stopped")
               for line in done.log_tail)
    assert [s["id"] for s in await restic_json(restic_bin, repo, "snapshots")] == [snapshot]  # no second backup
    assert journal.interrupted == {}


async def test_an_interrupted_job_nobody_asks_for_ends_failed_without_restic(
    restic_bin: Path, recorder: Recorder, repo: Path
) -> None:
    journal = Journal(running={"backups/gone": str(repo)})
    interrupted(journal)
    runner = JobRunner(restic=restic_bin, host=HOST, send=recorder.send, journal=journal)
    try:
        await runner.abandon_interrupted()
    finally:
        await runner.aclose()

    [done] = recorder.payloads
    assert isinstance(done, protocol.JobDone)
    assert (done.job, done.outcome, done.error, done.interrupted) == ("backups/gone", Outcome.FAILED, INTERRUPTED, True)
    assert (journal.interrupted, runner.interrupted()) == ({}, [])
    assert journal.unlock == {str(repo)}  # still unlocked before the next job touches the repository


async def test_a_restic_killed_from_outside_mid_backup_leaves_no_lock(
    runner: JobRunner, recorder: Recorder, repo: Path, slow_tree: Path, restic_bin: Path
) -> None:
    job = command("killed", "backup", {"paths": [str(slow_tree)]}, repo)
    await runner.start(job)
    await recorder.first(is_progress(job.job))
    [pid] = restic_children(os.getpid(), running=str(slow_tree))
    os.kill(pid, signal.SIGKILL)

    done = await runner.wait(job.job)

    assert done is not None and (done.outcome, done.exit_code) == (Outcome.FAILED, 137)
    assert "agent: restic was killed by signal 9; removing stale locks with `restic unlock`" in done.log_tail
    assert await restic_json(restic_bin, repo, "list", "locks") == []


AGENT_SCRIPT = """
import asyncio, msgspec, sys
from restic_manager import protocol
from restic_manager.agent.runner import JobRunner

async def main():
    async def send(payload):
        if isinstance(payload, protocol.JobProgress):
            print("progress", flush=True)
    runner = JobRunner(restic=sys.argv[1], host="test-host", send=send)
    await runner.start(msgspec.json.decode(sys.argv[2].encode(), type=protocol.CommandRun))
    await asyncio.Event().wait()

asyncio.run(main())
"""


async def test_restic_dies_with_its_agent(tmp_path: Path) -> None:
    """A stand-in restic that only sleeps: nothing but the parent-death signal can end it
    (real restic may also die of SIGPIPE on its next status line; its lock is then the
    journal's to remove, see above)."""
    stand_in = tmp_path / "sleepy-restic"
    stand_in.write_text(
        f"#!{sys.executable}\n"
        "import signal, time\n"
        # SIGINT's default action, whatever this process inherited (a shell's background
        # job starts with SIGINT ignored)
        "signal.signal(signal.SIGINT, signal.SIG_DFL)\n"
        "print('{\"message_type\":\"status\",\"percent_done\":0.5,\"bytes_done\":1,\"total_bytes\":2}', flush=True)\n"
        "time.sleep(600)\n"
    )
    stand_in.chmod(0o755)
    job = command("orphan", "backup", {"paths": ["/etc"]}, tmp_path / "repo")
    wire = json.dumps(protocol.to_wire(job))
    agent = await asyncio.create_subprocess_exec(
        sys.executable, "-c", AGENT_SCRIPT, str(stand_in), wire, stdout=asyncio.subprocess.PIPE)
    assert agent.stdout is not None
    async with asyncio.timeout(EVENT_TIMEOUT):
        assert await agent.stdout.readline() == b"progress\n"
    [restic] = restic_children(agent.pid)

    agent.kill()  # kill -9: the agent gets no chance to stop restic itself
    await agent.wait()

    async with asyncio.timeout(EVENT_TIMEOUT):  # bounded poll: a process's end has no event to await
        while process_state(restic) not in ("gone", "Z"):
            await asyncio.sleep(0.05)


def restic_children(parent: int, *, running: str = "restic") -> list[int]:
    """The pids of ``parent``'s child processes whose command line holds ``running``."""
    children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    return [int(pid) for pid in children if running in Path(f"/proc/{pid}/cmdline").read_bytes().decode()]


def process_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return "gone"


async def leave_a_stale_lock(restic_bin: Path, repo: Path, source: Path) -> None:
    """A restic killed with SIGKILL mid-backup leaves its lock behind."""
    crashed = await asyncio.create_subprocess_exec(
        str(restic_bin), "--json", "backup", str(source),
        env={"RESTIC_REPOSITORY": str(repo), "RESTIC_PASSWORD": PASSWORD, "RESTIC_CACHE_DIR": str(repo.parent / "cli-cache")},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )
    assert crashed.stdout is not None
    await crashed.stdout.readline()  # a status line: it holds its lock now
    crashed.kill()
    await crashed.wait()
    assert len(await restic_json(restic_bin, repo, "list", "locks")) == 1
