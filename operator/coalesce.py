"""Fold bursts of "this key needs work" into one piece of work per key.

A thousand acks in a second become one status patch per Schedule; ten Schedule applies in
a few milliseconds become one ``schedule.set`` per agent. :class:`Coalescer` is the pure
bookkeeping (a deadline per key; marking again never postpones it, so a steady stream of
marks still gets served); :class:`CoalescingLoop` is the one task that sleeps until the
earliest deadline and runs the work.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
log = logging.getLogger(__name__)


class Coalescer(Generic[K]):
    def __init__(self) -> None:
        self._due: dict[K, float] = {}

    def mark(self, key: K, *, now: float, delay: float) -> bool:
        """Ask for work on ``key`` within ``delay``; True when the earliest deadline moved earlier."""
        deadline = now + delay
        earliest = self.next_deadline()
        if key not in self._due or deadline < self._due[key]:
            self._due[key] = deadline
        return earliest is None or deadline < earliest

    def next_deadline(self) -> float | None:
        return min(self._due.values(), default=None)

    def pop_due(self, now: float) -> list[K]:
        """Keys whose deadline has come, earliest first; they are forgotten until marked again."""
        due = sorted((deadline, index, key) for index, (key, deadline) in enumerate(self._due.items())
                     if deadline <= now)
        for _, _, key in due:
            del self._due[key]
        return [key for _, _, key in due]

    def __len__(self) -> int:
        return len(self._due)


class CoalescingLoop(Generic[K]):
    """Runs ``work(key)`` for marked keys, at most ``concurrency`` at a time.

    A key is never worked on twice at once: keys marked while a batch runs wait for the next
    batch. Work that raises is logged and retried after ``retry_delay``.
    """

    def __init__(
        self,
        name: str,
        work: Callable[[K], Awaitable[None]],
        *,
        concurrency: int = 8,
        retry_delay: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self._work = work
        self._coalescer: Coalescer[K] = Coalescer()
        self._wakeup = asyncio.Event()
        self._limit = asyncio.Semaphore(concurrency)
        self._retry_delay = retry_delay
        self._clock = clock

    def mark(self, key: K, *, delay: float = 0.0) -> None:
        if self._coalescer.mark(key, now=self._clock(), delay=delay):
            self._wakeup.set()

    async def run(self) -> None:
        while True:
            deadline = self._coalescer.next_deadline()
            timeout = None if deadline is None else max(0.0, deadline - self._clock())
            if timeout != 0.0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), timeout)
            self._wakeup.clear()
            due = self._coalescer.pop_due(self._clock())
            if due:
                async with asyncio.TaskGroup() as group:
                    for key in due:
                        group.create_task(self._run_one(key))

    async def _run_one(self, key: K) -> None:
        async with self._limit:
            try:
                await self._work(key)
            except Exception:
                log.exception("%s: work on %s failed; retrying in %.0fs", self.name, key, self._retry_delay)
                self.mark(key, delay=self._retry_delay)
