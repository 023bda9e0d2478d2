"""Fold bursts of "this key needs work" into one piece of work per key.

Coalescing is on the leading edge: a key nobody is working on is served as soon as its
deadline comes (at once for a delay of 0), and marks that arrive while its work is in flight
fold into ONE follow-up run after it. A lone change waits for no window; a thousand acks
for one Schedule that arrive while its status patch is in flight make one more patch, not a
thousand; ten Schedules applied while a ``schedule.set`` is on its way make one more push.
:class:`Coalescer` is the pure bookkeeping (a deadline per key, marking again never
postpones it, so a steady stream of marks still gets served; the keys being worked on and
their follow-ups); :class:`CoalescingLoop` is the one task that sleeps until the earliest
deadline and runs the work.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
log = logging.getLogger(__name__)


class Coalescer(Generic[K]):
    """Deadlines of pending keys, and the keys being worked on.

    Deadlines sit in a heap of (deadline, seq, key); an entry that is no longer its key's
    current one is dropped when it surfaces, so ``mark``, ``next_deadline`` and ``pop_due``
    cost O(log n) however many keys are pending.
    """

    def __init__(self) -> None:
        self._due: dict[K, tuple[float, int]] = {}  # pending key → its live heap entry's (deadline, seq)
        self._heap: list[tuple[float, int, K]] = []
        self._seq = itertools.count()
        self._running: set[K] = set()
        self._follow_ups: dict[K, float] = {}  # running key → deadline of the run after this one

    def mark(self, key: K, *, now: float, delay: float) -> bool:
        """Ask for work on ``key`` within ``delay``; True when the earliest deadline moved earlier.

        A key being worked on gets one follow-up run after the current one (not before its
        deadline), however often it is marked meanwhile.
        """
        deadline = now + delay
        if key in self._running:
            self._follow_ups[key] = min(deadline, self._follow_ups.get(key, deadline))
            return False
        return self._push(key, deadline)

    def next_deadline(self) -> float | None:
        while self._heap and not self._live(self._heap[0]):
            heapq.heappop(self._heap)
        return self._heap[0][0] if self._heap else None

    def pop_due(self, now: float, *, limit: int | None = None) -> list[K]:
        """Up to ``limit`` keys whose deadline has come, earliest first.

        They count as being worked on until :meth:`done`.
        """
        due: list[K] = []
        while limit is None or len(due) < limit:
            deadline = self.next_deadline()
            if deadline is None or deadline > now:
                break
            _, _, key = heapq.heappop(self._heap)
            del self._due[key]
            self._running.add(key)
            due.append(key)
        return due

    def done(self, key: K) -> None:
        """Work on ``key`` has finished; a follow-up marked meanwhile is now pending."""
        self._running.discard(key)
        follow_up = self._follow_ups.pop(key, None)
        if follow_up is not None:
            self._push(key, follow_up)

    def __len__(self) -> int:
        """Keys waiting for their deadline (not those being worked on)."""
        return len(self._due)

    def _push(self, key: K, deadline: float) -> bool:
        current = self._due.get(key)
        if current is not None and current[0] <= deadline:
            return False  # marking again never postpones
        earliest = self.next_deadline()
        seq = next(self._seq)
        self._due[key] = (deadline, seq)
        heapq.heappush(self._heap, (deadline, seq, key))
        if len(self._heap) > 2 * len(self._due) + 64:
            # Superseded entries wait in the heap until they surface; keep them from piling up.
            self._heap = [(when, number, pending) for pending, (when, number) in self._due.items()]
            heapq.heapify(self._heap)
        return earliest is None or deadline < earliest

    def _live(self, entry: tuple[float, int, K]) -> bool:
        deadline, seq, key = entry
        return self._due.get(key) == (deadline, seq)


class CoalescingLoop(Generic[K]):
    """Runs ``work(key)`` for marked keys, at most ``concurrency`` at a time.

    A key is never worked on twice at once: marks that arrive while it is worked on become
    one follow-up run. Work that raises is logged and retried after ``retry_delay``.
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
        self._concurrency = concurrency
        self._busy = 0
        self._retry_delay = retry_delay
        self._clock = clock

    def mark(self, key: K, *, delay: float = 0.0) -> None:
        if self._coalescer.mark(key, now=self._clock(), delay=delay):
            self._wakeup.set()

    async def run(self) -> None:
        """Start due work while there are free slots; sleep until a deadline, a mark or a free slot."""
        async with asyncio.TaskGroup() as group:
            while True:
                self._wakeup.clear()
                for key in self._coalescer.pop_due(self._clock(), limit=self._concurrency - self._busy):
                    self._busy += 1
                    group.create_task(self._run_one(key))
                deadline = self._coalescer.next_deadline() if self._busy < self._concurrency else None
                try:
                    async with asyncio.timeout(None if deadline is None else max(0.0, deadline - self._clock())):
                        await self._wakeup.wait()
                except TimeoutError:
                    pass

    async def _run_one(self, key: K) -> None:
        try:
            await self._work(key)
        except Exception:
            log.exception("%s: work on %s failed; retrying in %.0fs", self.name, key, self._retry_delay)
            self.mark(key, delay=self._retry_delay)  # a follow-up: the key is still being worked on
        finally:
            self._busy -= 1
            self._coalescer.done(key)
            self._wakeup.set()  # a slot is free, and maybe a follow-up is due
