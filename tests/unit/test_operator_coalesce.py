"""Coalescing on the leading edge: a key nobody works on is served at once; marks made while
it is worked on fold into one follow-up; deadlines come out earliest first, cheaply."""

from __future__ import annotations

import asyncio
import random

import pytest

from restic_manager.operator.kits.coalesce import Coalescer, CoalescingLoop


def test_marking_again_never_postpones_a_deadline() -> None:
    pending: Coalescer[str] = Coalescer()
    assert pending.mark("a", now=0.0, delay=1.0)       # first deadline: wake the loop
    assert not pending.mark("a", now=0.5, delay=1.0)   # later mark: deadline stays 1.0
    assert pending.next_deadline() == 1.0
    assert pending.mark("a", now=0.5, delay=0.0)       # an urgent mark moves it earlier
    assert pending.next_deadline() == 0.5


def test_due_keys_come_out_once_earliest_first() -> None:
    pending: Coalescer[str] = Coalescer()
    pending.mark("late", now=0.0, delay=3.0)
    pending.mark("early", now=0.0, delay=1.0)
    pending.mark("middle", now=0.0, delay=2.0)
    assert pending.pop_due(2.0) == ["early", "middle"]
    assert pending.pop_due(2.5) == []
    assert pending.pop_due(3.0) == ["late"]
    assert len(pending) == 0 and pending.next_deadline() is None


def test_a_coalescer_with_10000_pending_keys_returns_the_earliest_deadline() -> None:
    pending: Coalescer[int] = Coalescer()
    shuffled = random.Random(7)
    deadlines = {key: shuffled.uniform(1.0, 100.0) for key in range(10_000)}
    for key, deadline in deadlines.items():
        pending.mark(key, now=0.0, delay=deadline)
    for key in range(0, 10_000, 10):  # a tenth become urgent; the rest marked again, later
        deadlines[key] = deadlines[key] / 2
        pending.mark(key, now=0.0, delay=deadlines[key])
    for key in range(5, 10_000, 10):
        pending.mark(key, now=50.0, delay=60.0)
    assert pending.next_deadline() == min(deadlines.values())
    assert len(pending) == 10_000
    assert pending.pop_due(10.0, limit=3) == sorted(deadlines, key=deadlines.__getitem__)[:3]
    due = pending.pop_due(30.0)
    assert due == sorted((key for key in deadlines if deadlines[key] <= 30.0), key=deadlines.__getitem__)[3:]
    assert len(pending) == 10_000 - 3 - len(due)


def test_superseded_deadlines_do_not_pile_up() -> None:
    pending: Coalescer[str] = Coalescer()
    for step in range(10_000):  # each mark moves the same deadline earlier
        pending.mark("a", now=0.0, delay=10_000.0 - step)
    assert pending.next_deadline() == 1.0
    assert sum(map(len, pending._heaps)) <= 64 + 2  # the superseded entries were dropped


def test_keys_marked_with_no_delay_go_before_others_already_due() -> None:
    pending: Coalescer[str] = Coalescer()
    for index in range(100):
        pending.mark(f"last-seen-{index}", now=0.0, delay=30.0)  # informational, due at 30
    pending.mark("applied", now=31.0, delay=0.0)  # a change to show, marked a second after
    assert pending.next_deadline() == 30.0
    assert pending.pop_due(31.0, limit=2) == ["applied", "last-seen-0"]
    pending.mark("last-seen-50", now=31.0, delay=0.0)  # waiting to be informational, now a change
    assert pending.pop_due(31.0, limit=2) == ["last-seen-50", "last-seen-1"]
    assert len(pending) == 97


def test_marks_made_while_a_key_is_worked_on_become_one_follow_up() -> None:
    pending: Coalescer[str] = Coalescer()
    pending.mark("a", now=0.0, delay=0.0)
    assert pending.pop_due(0.0) == ["a"]
    for step in range(100):
        assert not pending.mark("a", now=step / 100, delay=0.0)  # nothing to wake up for yet
    assert pending.pop_due(5.0) == [] and pending.next_deadline() is None
    pending.done("a")
    assert pending.next_deadline() == 0.0  # the first of the marks made meanwhile: due at once
    assert pending.pop_due(5.0) == ["a"]
    pending.done("a")
    assert pending.next_deadline() is None and pending.pop_due(5.0) == []


def test_a_follow_up_keeps_the_delay_it_was_asked_with() -> None:
    pending: Coalescer[str] = Coalescer()
    pending.mark("a", now=0.0, delay=0.0)
    pending.pop_due(0.0)
    pending.mark("a", now=1.0, delay=30.0)  # e.g. lastSeen, while a write is in flight
    pending.done("a")
    assert pending.next_deadline() == 31.0
    assert pending.mark("a", now=2.0, delay=0.0)  # and is served earlier if asked to be
    assert pending.pop_due(2.0) == ["a"]


SENTINEL = "sentinel"


class Recorder:
    """Work that records its keys; a ``sentinel`` key marks the end of a test's burst."""

    def __init__(self, fail_first: int = 0) -> None:
        self.calls: list[str] = []
        self.fail_first = fail_first
        self.finished = asyncio.Event()

    async def __call__(self, key: str) -> None:
        if key == SENTINEL:
            self.finished.set()
            return
        self.calls.append(key)
        if len(self.calls) <= self.fail_first:
            raise RuntimeError("transient")


async def run_until_sentinel(loop: CoalescingLoop[str], recorder: Recorder, *, after: float) -> None:
    """Run the loop until a sentinel marked ``after`` seconds out has been worked on: the
    burst's deadlines are all earlier, so everything it caused has run by then."""
    loop.mark(SENTINEL, delay=after)
    task = asyncio.create_task(loop.run())
    try:
        async with asyncio.timeout(5):
            await recorder.finished.wait()
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_a_burst_on_one_key_is_one_piece_of_work() -> None:
    recorder = Recorder()
    loop = CoalescingLoop("test", recorder)
    for _ in range(1000):
        loop.mark("schedule", delay=0.02)
    await run_until_sentinel(loop, recorder, after=0.1)
    assert recorder.calls == ["schedule"]


async def test_a_burst_on_many_keys_is_one_piece_of_work_each() -> None:
    recorder = Recorder()
    loop = CoalescingLoop("test", recorder)
    for _ in range(3):
        for index in range(50):
            loop.mark(f"agent-{index}", delay=0.02)
    await run_until_sentinel(loop, recorder, after=0.1)
    assert sorted(recorder.calls) == sorted(f"agent-{index}" for index in range(50))


@pytest.mark.parametrize(("transient", "traceback"), [((), True), ((RuntimeError,), False)])
async def test_failed_work_is_retried_and_only_unexpected_errors_log_a_traceback(
        transient: tuple[type[Exception], ...], traceback: bool, caplog: pytest.LogCaptureFixture) -> None:
    recorder = Recorder(fail_first=1)
    loop = CoalescingLoop("test", recorder, retry_delay=0.01, transient=transient)
    loop.mark("schedule")
    await run_until_sentinel(loop, recorder, after=0.2)
    assert recorder.calls == ["schedule", "schedule"]
    [record] = [r for r in caplog.records if "work on schedule failed" in r.getMessage()]
    assert (record.exc_info is not None) is traceback


async def test_a_mark_without_delay_is_served_without_waiting_for_the_clock() -> None:
    served = asyncio.Event()

    async def work(key: str) -> None:
        served.set()

    loop = CoalescingLoop("test", work, clock=lambda: 0.0)  # time stands still
    task = asyncio.create_task(loop.run())
    try:
        loop.mark("a")
        async with asyncio.timeout(5):
            await served.wait()
    finally:
        task.cancel()


async def test_marks_during_work_run_it_exactly_once_more_afterwards() -> None:
    started, release = asyncio.Queue[str](), asyncio.Event()
    runs: list[str] = []

    async def work(key: str) -> None:
        runs.append(key)
        await started.put(key)
        if len(runs) == 1:
            await release.wait()

    loop = CoalescingLoop("test", work, clock=lambda: 0.0)
    task = asyncio.create_task(loop.run())
    try:
        loop.mark("a")
        async with asyncio.timeout(5):
            assert await started.get() == "a"
            for _ in range(100):  # a burst while the first run is in flight
                loop.mark("a")
            loop.mark("b")  # another key is not held up by it
            assert await started.get() == "b"
            release.set()
            assert await started.get() == "a"
            loop.mark("c")  # runs after the follow-up: nothing else of "a" is left to run
            assert await started.get() == "c"
    finally:
        task.cancel()
    assert runs == ["a", "b", "a", "c"]


async def test_no_more_than_concurrency_keys_run_at_once() -> None:
    running, most, release = 0, 0, asyncio.Event()
    started, done = asyncio.Queue[str](), asyncio.Queue[str]()

    async def work(key: str) -> None:
        nonlocal running, most
        running += 1
        most = max(most, running)
        await started.put(key)
        await release.wait()
        running -= 1
        await done.put(key)

    loop = CoalescingLoop("test", work, concurrency=3, clock=lambda: 0.0)
    for index in range(10):
        loop.mark(f"k{index}")
    task = asyncio.create_task(loop.run())
    try:
        async with asyncio.timeout(5):
            first = [await started.get() for _ in range(3)]
            assert started.empty() and running == 3  # the other seven wait for a free slot
            release.set()
            finished = {await done.get() for _ in range(10)}
    finally:
        task.cancel()
    assert first == ["k0", "k1", "k2"]
    assert most == 3 and finished == {f"k{index}" for index in range(10)}
