"""The agent's connection over a real WebSocket on 127.0.0.1 (SPEC §3, §4).

A real `Connection`, `Timer` and `Mailbox` run in-process against tests/support's
FakeOperator; the job runner is a fake (the restic runner has its own tests). The timer
runs on a ManualClock where time must pass without waiting, and on the real clock for the
seconds-level schedule.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from pathlib import Path

import pytest
from support.fake_operator import TIMEOUT, FakeOperator, FakeRunner, ManualClock

import restic_manager
from restic_manager import protocol
from restic_manager.agent.connection import SHUTDOWN_REASON, AgentStopped, Connection, Endpoint, Identity
from restic_manager.agent.main import run_agent
from restic_manager.agent.retry import SLOWLY, ExitCode
from restic_manager.agent.scheduler import Clock, Scheduler, SystemClock, Timer
from restic_manager.agent.state import Mailbox, Outbox, StateStore, state_saver

TOKEN = "s3cret-agent-token"
T0 = datetime.fromisoformat("2026-03-02T10:30:00+00:00")


def at(text: str) -> datetime:
    return datetime.fromisoformat(text)


def entry(schedule_id: str, schedule: str, *, generation: int = 1) -> protocol.ScheduleEntry:
    return protocol.ScheduleEntry(id=schedule_id, uid=f"uid-{schedule_id}", generation=generation, schedule=schedule)


class Retries:
    """The connection's backoff sleep: records each delay, and returns at once unless held."""

    def __init__(self) -> None:
        self.delays: list[float] = []
        self._passes = math.inf
        self._waiting = False
        self._changed = asyncio.Condition()

    async def sleep(self, delay: float) -> None:
        async with self._changed:
            self.delays.append(delay)
            self._waiting = True
            self._changed.notify_all()
            try:
                await self._changed.wait_for(lambda: self._passes > 0)
            finally:
                self._waiting = False
            self._passes -= 1

    def hold(self) -> None:
        """Keep the agent from reconnecting, from its next retry on."""
        self._passes = 0

    async def release(self, passes: float = math.inf) -> None:
        """Let `passes` more retries through (all, by default)."""
        async with self._changed:
            self._passes = passes
            self._changed.notify_all()

    async def held(self, *, retries: int = 1) -> None:
        """Until the agent waits in its `retries`-th retry: it has noticed its connection is gone."""
        async with asyncio.timeout(TIMEOUT), self._changed:
            await self._changed.wait_for(lambda: self._waiting and len(self.delays) >= retries)


class HighestDelay(random.Random):
    """Full jitter picks a delay in [0, limit]; this always picks the limit, so tests see it."""

    def uniform(self, a: float, b: float) -> float:
        return b


class SaveGate:
    """Stands in front of the agent's state saves: once closed, the saves it still lets pass
    go through and the next waits at it until it opens."""

    def __init__(self) -> None:
        self._passes = math.inf
        self._open = asyncio.Event()
        self.waiting = asyncio.Event()  # a save has come to the closed gate

    def close(self, *, passes: int = 0) -> None:
        self._passes = passes

    def open(self) -> None:
        self._passes = math.inf
        self._open.set()

    def guard(self, save: Callable[[], Awaitable[None]]) -> Callable[[], Awaitable[None]]:
        async def guarded() -> None:
            if self._passes > 0:
                self._passes -= 1
            else:
                self.waiting.set()
                await self._open.wait()
            await save()

        return guarded


class Agent:
    """One agent assembled as agent/main.py assembles it, apart from the runner and the clock."""

    def __init__(
        self, operator: FakeOperator, state_dir: Path, *, clock: Clock, running: list[str] = (),
        gate: SaveGate | None = None, receipt_timeout: float = 30.0, interrupted: list[str] = (),
        recovery_wait: float = 30.0,
    ) -> None:
        self.token_file = state_dir / "token"
        self.token_file.write_text(TOKEN + "\n")
        store = StateStore(state_dir / "state.json")
        saved = store.load()
        self.scheduler = Scheduler(saved.cursors)
        self.outbox = Outbox(saved.outbox)
        save = state_saver(store, cursors=self.scheduler.cursors, outbox=self.outbox, journal=saved.journal)
        if gate is not None:
            save = gate.guard(save)
        self.mailbox = Mailbox(self.outbox, save=save)
        self.timer = Timer(self.scheduler, clock=clock, deliver=self.mailbox.post_many, save=save)
        self.runner = FakeRunner(list(running), list(interrupted))
        self.retries = Retries()
        self.connection = Connection(
            endpoint=Endpoint(operator.url, token_file=self.token_file),
            identity=Identity(agent="web-01", restic_version="0.19.1", hostname="web-01.example.com"),
            timer=self.timer, runner=self.runner, mailbox=self.mailbox,
            rng=HighestDelay(), sleep=self.retries.sleep, receipt_timeout=receipt_timeout,
            recovery_wait=recovery_wait,
        )

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Agent]:
        stop = asyncio.Event()
        task = asyncio.create_task(
            run_agent(timer=self.timer, connection=self.connection, runner=self.runner, stop=stop)
        )
        try:
            yield self
        finally:
            stop.set()
            async with asyncio.timeout(TIMEOUT):
                await task


@pytest.fixture
async def operator() -> AsyncIterator[FakeOperator]:
    async with FakeOperator(token=TOKEN) as fake:
        yield fake


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(T0)


async def test_hello_comes_first_and_names_the_agent_and_its_running_jobs(
    operator: FakeOperator, clock: ManualClock, tmp_path: Path
) -> None:
    async with Agent(operator, tmp_path, clock=clock, running=["backups/nightly-web-01-29012345"]).running():
        hello = await operator.expect(protocol.Hello)

    assert hello == protocol.Hello(
        agent="web-01", agent_version=restic_manager.__version__, restic_version="0.19.1",
        protocol_version=protocol.PROTOCOL_VERSION, hostname="web-01.example.com",
        running_jobs=["backups/nightly-web-01-29012345"],
    )


async def test_a_refused_agent_retries_slowly_and_gets_in_once_its_token_file_is_fixed(
    operator: FakeOperator, clock: ManualClock, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    agent = Agent(operator, tmp_path, clock=clock)
    agent.token_file.write_text("an-old-token\n")
    agent.retries.hold()
    async with agent.running():
        await agent.retries.held(retries=1)
        await agent.retries.release(2)
        await agent.retries.held(retries=3)
        agent.token_file.write_text(TOKEN + "\n")  # read again on the next attempt: no restart
        await agent.retries.release()
        await operator.expect(protocol.Hello)

    assert agent.retries.delays == [SLOWLY.delay(n, HighestDelay()) for n in range(3)]
    assert f"(HTTP 401 unknown-token): no Agent has the token in {agent.token_file}" in caplog.text


async def test_credentials_of_another_agent_stop_the_agent(
    operator: FakeOperator, clock: ManualClock, tmp_path: Path
) -> None:
    agent = Agent(operator, tmp_path, clock=clock)
    life = asyncio.create_task(
        run_agent(timer=agent.timer, connection=agent.connection, runner=agent.runner, stop=asyncio.Event()))
    await operator.expect(protocol.Hello)
    await operator.close(protocol.CLOSE_WRONG_AGENT,
                         "hello: agent 'web-01' is not the Agent these credentials belong to ('db-01')")
    with pytest.raises(ExceptionGroup) as ended:
        async with asyncio.timeout(TIMEOUT):
            await life

    [stopped] = ended.value.exceptions
    assert isinstance(stopped, AgentStopped) and stopped.stop.exit_code is ExitCode.REFUSED
    assert "belong to ('db-01'); set agentName to the Agent the token in" in stopped.stop.message
    assert agent.retries.delays == [] and operator.connections == 1  # no second attempt
    assert agent.runner.closed


async def test_jobs_a_dead_agent_left_are_named_in_hello_and_ended_if_nobody_asks_for_them(
    operator: FakeOperator, clock: ManualClock, tmp_path: Path
) -> None:
    agent = Agent(operator, tmp_path, clock=clock, interrupted=["backups/lost"], recovery_wait=0.2)
    async with agent.running():
        hello = await operator.expect(protocol.Hello)
        assert hello.interrupted_jobs == ["backups/lost"]
        assert not agent.runner.abandoned.is_set()  # no wait starts before the first ack
        await operator.apply([], version=1)
        async with asyncio.timeout(TIMEOUT):
            await agent.runner.abandoned.wait()
    assert agent.runner.interrupted() == []


async def test_a_set_is_answered_with_applied_and_rejected(
    operator: FakeOperator, clock: ManualClock, tmp_path: Path
) -> None:
    async with Agent(operator, tmp_path, clock=clock).running():
        await operator.expect(protocol.Hello)
        ack = await operator.apply(
            [entry("ns/good", "0 2 * * *", generation=4), entry("ns/bad", "0 25 * * *")], version=9
        )

    assert ack.applied_at == T0
    assert ack.applied == [protocol.AppliedEntry(id="ns/good", generation=4)]
    assert [(r.id, r.generation) for r in ack.rejected] == [("ns/bad", 1)]
    assert "hour must be 0-23" in ack.rejected[0].error


async def test_a_seconds_level_schedule_fires_on_the_second(operator: FakeOperator, tmp_path: Path) -> None:
    async with Agent(operator, tmp_path, clock=SystemClock()).running():
        await operator.expect(protocol.Hello)
        ack = await operator.apply([entry("ns/every-second", "* * * * * *")], version=1)
        fire = await operator.expect(protocol.ScheduleFire)

    assert (fire.id, fire.uid, fire.generation) == ("ns/every-second", "uid-ns/every-second", 1)
    assert fire.scheduled_at.microsecond == 0
    assert fire.scheduled_at > ack.applied_at


async def test_after_a_dropped_connection_the_agent_reconnects_and_says_hello_again(
    operator: FakeOperator, clock: ManualClock, tmp_path: Path
) -> None:
    agent = Agent(operator, tmp_path, clock=clock, running=["ns/job-1"])
    async with agent.running():
        for connection in (1, 2, 3):
            hello = await operator.expect(protocol.Hello)
            assert hello.running_jobs == ["ns/job-1"]
            await operator.apply([entry("ns/hourly", "0 * * * *")], version=connection)
            if connection < 3:
                await operator.drop()
                await operator.wait_connected(connection + 1)

    # the backoff starts again after every session that got as far as an ack
    assert agent.retries.delays == [1.0, 1.0]


async def test_a_fire_due_while_disconnected_is_delivered_once_after_the_ack(
    operator: FakeOperator, clock: ManualClock, tmp_path: Path
) -> None:
    schedules = [entry("ns/hourly", "0 * * * *")]
    agent = Agent(operator, tmp_path, clock=clock)
    async with agent.running():
        await operator.expect(protocol.Hello)
        await operator.apply(schedules, version=1)
        agent.retries.hold()
        await operator.drop()
        await agent.retries.held()

        await clock.run_until(at("2026-03-02T13:30:00+00:00"))  # 11:00, 12:00 and 13:00 pass
        await agent.retries.release()
        await operator.expect(protocol.Hello)
        await operator.apply(schedules, version=1)  # apply() checks the ack comes first
        fire = await operator.expect_frame(protocol.ScheduleFire)
        assert len(agent.outbox) == 1  # kept until its receipt
        await operator.settle(fire)
        await operator.apply(schedules, version=2)  # the next frame is this ack: no second fire

        assert fire.payload.scheduled_at == at("2026-03-02T13:00:00+00:00")  # type: ignore[attr-defined]
        assert len(agent.outbox) == 0


@pytest.mark.parametrize("outcome", [protocol.FireOutcome.REFUSED, protocol.FireOutcome.MISSED,
                                     protocol.FireOutcome.EXISTS])
async def test_a_final_fire_result_settles_the_fire(
    operator: FakeOperator, clock: ManualClock, tmp_path: Path, outcome: protocol.FireOutcome
) -> None:
    agent = Agent(operator, tmp_path, clock=clock)
    async with agent.running():
        await operator.expect(protocol.Hello)
        await operator.apply([], version=1)
        await agent.mailbox.post(protocol.ScheduleFire(id="ns/a", uid="u", generation=1, scheduled_at=T0))
        await operator.settle(await operator.expect_frame(protocol.ScheduleFire), outcome)
        await operator.apply([], version=2)
        assert len(agent.outbox) == 0


async def test_a_fire_answered_retry_is_sent_again_and_kept_until_settled(
    operator: FakeOperator, clock: ManualClock, tmp_path: Path
) -> None:
    agent = Agent(operator, tmp_path, clock=clock)
    fire = protocol.ScheduleFire(id="ns/a", uid="u", generation=1, scheduled_at=T0)
    async with agent.running():
        await operator.expect(protocol.Hello)
        await operator.apply([], version=1)
        await agent.mailbox.post(fire)
        first = await operator.expect_frame(protocol.ScheduleFire)
        await operator.settle(first, protocol.FireOutcome.RETRY)
        again = await operator.expect_frame(protocol.ScheduleFire)  # after RETRY_BASE, at most a second
        assert (again.id, again.payload) == (first.id, fire)
        assert len(agent.outbox) == 1
        await operator.settle(again)
        await operator.apply([], version=2)
        assert len(agent.outbox) == 0


async def test_a_fire_without_a_receipt_is_sent_again_on_the_same_connection(
    operator: FakeOperator, clock: ManualClock, tmp_path: Path
) -> None:
    agent = Agent(operator, tmp_path, clock=clock, receipt_timeout=0.2)
    async with agent.running():
        await operator.expect(protocol.Hello)
        await operator.apply([], version=1)
        done = protocol.JobDone(job="ns/j", outcome=protocol.Outcome.SUCCEEDED, exit_code=0, finished_at=T0)
        await agent.mailbox.post(done)
        first = await operator.expect_frame(protocol.JobDone)  # unanswered: the operator died with it
        again = await operator.expect_frame(protocol.JobDone)
        assert again.id == first.id and operator.connections == 1
        await operator.settle(again)
        await operator.apply([], version=2)
        assert len(agent.outbox) == 0


async def test_a_job_done_while_disconnected_is_delivered_after_reconnect(
    operator: FakeOperator, clock: ManualClock, tmp_path: Path
) -> None:
    agent = Agent(operator, tmp_path, clock=clock)
    done = protocol.JobDone(job="ns/job-1", outcome=protocol.Outcome.SUCCEEDED, exit_code=0, finished_at=T0)
    async with agent.running():
        await operator.expect(protocol.Hello)
        await operator.apply([], version=1)
        agent.retries.hold()
        await operator.drop()
        await agent.retries.held()

        await agent.mailbox.post(done)  # as the runner reports a job that ended meanwhile
        await agent.retries.release()
        hello = await operator.expect(protocol.Hello)
        await operator.apply([], version=1)

        assert hello.finished_jobs == ["ns/job-1"]  # so the operator does not take it for lost
        assert await operator.expect(protocol.JobDone) == done


async def test_a_message_the_operator_never_read_is_sent_again_after_reconnect(
    operator: FakeOperator, clock: ManualClock, tmp_path: Path
) -> None:
    agent = Agent(operator, tmp_path, clock=clock)
    done = protocol.JobDone(job="ns/job-1", outcome=protocol.Outcome.FAILED, exit_code=1, finished_at=T0)
    async with agent.running():
        await operator.expect(protocol.Hello)
        await operator.apply([], version=1)
        operator.deafen()
        await agent.mailbox.post(done)
        await operator.wait_unread()  # sent, but stuck in a socket nobody reads
        await operator.drop()

        await operator.expect(protocol.Hello)
        await operator.apply([], version=1)
        assert await operator.expect(protocol.JobDone) == done


async def test_a_message_the_operator_read_but_did_not_settle_is_sent_again_after_reconnect(
    operator: FakeOperator, clock: ManualClock, tmp_path: Path
) -> None:
    agent = Agent(operator, tmp_path, clock=clock)
    fire = protocol.ScheduleFire(id="ns/a", uid="u", generation=1, scheduled_at=T0)
    async with agent.running():
        await operator.expect(protocol.Hello)
        await operator.apply([], version=1)
        await agent.mailbox.post(fire)
        assert await operator.expect(protocol.ScheduleFire) == fire  # read (and its pong answered)
        await operator.drop()  # as an operator killed before the create

        await operator.expect(protocol.Hello)
        await operator.apply([], version=1)
        assert await operator.expect(protocol.ScheduleFire) == fire


async def test_a_new_message_is_sent_while_the_last_one_is_still_being_settled(
    operator: FakeOperator, clock: ManualClock, tmp_path: Path
) -> None:
    gate = SaveGate()
    agent = Agent(operator, tmp_path, clock=clock, gate=gate)
    done = protocol.JobDone(job="ns/job-1", outcome=protocol.Outcome.SUCCEEDED, exit_code=0, finished_at=T0)
    started = protocol.JobStarted(job="ns/job-2", started_at=T0)
    async with agent.running():
        await operator.expect(protocol.Hello)
        await operator.apply([], version=1)
        gate.close(passes=1)  # posting `done` saves; settling it (after its ack) will hang
        await agent.mailbox.post(done)
        await operator.settle(await operator.expect_frame(protocol.JobDone))
        async with asyncio.timeout(TIMEOUT):
            await gate.waiting.wait()

        await agent.mailbox.post(started)

        assert await operator.expect(protocol.JobStarted) == started
        gate.open()


@pytest.mark.parametrize(("restarted", "fired"), [
    # the 11:00 fire, undelivered, survives the restart
    ("2026-03-02T11:20:00+00:00", "2026-03-02T11:00:00+00:00"),
    # down over 12:00 too: the saved 11:00 fire and the catch-up for 12:00 are one fire, the newest
    ("2026-03-02T12:20:00+00:00", "2026-03-02T12:00:00+00:00"),
])
async def test_undelivered_fires_survive_an_agent_restart_newest_only(
    operator: FakeOperator, clock: ManualClock, tmp_path: Path, restarted: str, fired: str
) -> None:
    schedules = [entry("ns/hourly", "0 * * * *")]
    first = Agent(operator, tmp_path, clock=clock)
    async with first.running():
        await operator.expect(protocol.Hello)
        await operator.apply(schedules, version=1)
        first.retries.hold()
        await operator.drop()
        await first.retries.held()
        await clock.run_until(at("2026-03-02T11:10:00+00:00"))  # 11:00 fires, undeliverable

    async with Agent(operator, tmp_path, clock=ManualClock(at(restarted))).running():
        await operator.expect(protocol.Hello)
        await operator.apply(schedules, version=1)
        fire = await operator.expect(protocol.ScheduleFire)
        await operator.apply(schedules, version=2)  # the next frame: no second fire

    assert fire.scheduled_at == at(fired)


async def test_an_operator_of_another_protocol_version_is_refused(clock: ManualClock, tmp_path: Path) -> None:
    async with FakeOperator(token=TOKEN, protocol_version=None) as old:
        agent = Agent(old, tmp_path, clock=clock)
        agent.retries.hold()
        async with agent.running():
            await agent.retries.held()
        assert old.connections >= 1 and old.closes[0][0] == 1008
        assert old._frames.empty()  # no hello was sent to it


async def test_an_invalid_frame_is_answered_with_an_error_and_the_agent_keeps_working(
    operator: FakeOperator, clock: ManualClock, tmp_path: Path
) -> None:
    async with Agent(operator, tmp_path, clock=clock).running():
        await operator.expect(protocol.Hello)
        await operator.send_raw('{"type": "schedule.set", "id": "f-1", "payload": {"version": -1, "schedules": []}}')
        error = await operator.expect(protocol.Error)
        await operator.send_raw(b"\x00binary")
        binary_error = await operator.expect(protocol.Error)
        await operator.send(protocol.ScheduleFire(id="ns/a", uid="u", generation=1, scheduled_at=T0), frame_id="f-3")
        wrong_way = await operator.expect(protocol.Error)

        ack = await operator.apply([entry("ns/a", "0 * * * *")], version=1)

    assert (error.code, error.ref) == ("invalid-frame", "f-1")
    assert "schedule.set: version" in error.message
    assert "binary frames" in binary_error.message
    assert (wrong_way.code, wrong_way.ref) == ("invalid-frame", "f-3")
    assert [a.id for a in ack.applied] == ["ns/a"]
    assert operator.connections == 1


async def test_commands_reach_the_runner(operator: FakeOperator, clock: ManualClock, tmp_path: Path) -> None:
    command = protocol.CommandRun(
        job="backups/nightly-web-01-29012345", type=protocol.JobType.BACKUP,
        args=protocol.BackupArgs(paths=["/etc"]),
        repository=protocol.Repository(url="/srv/restic", env={"RESTIC_PASSWORD": "pw"}),
    )
    agent = Agent(operator, tmp_path, clock=clock)
    async with agent.running():
        await operator.expect(protocol.Hello)
        await operator.apply([], version=1)
        await operator.send(command)
        async with asyncio.timeout(TIMEOUT):
            received = await agent.runner.commands.get()
        await operator.send(protocol.CommandCancel(job=command.job))
        await operator.apply([], version=2)  # frames are handled in order: the cancel came first

    assert received == command
    assert agent.runner.cancelled == [command.job]


async def test_shutdown_closes_the_socket_with_a_reason_and_ends_the_jobs(
    operator: FakeOperator, clock: ManualClock, tmp_path: Path
) -> None:
    agent = Agent(operator, tmp_path, clock=clock)
    async with agent.running():
        await operator.expect(protocol.Hello)
        await operator.apply([], version=1)

    await operator.wait_closed(1)
    assert operator.closes == [(1001, SHUTDOWN_REASON)]
    assert agent.runner.closed
