"""Fold bursts of "this key needs work" into one piece of work per key.

Coalescing is on the leading edge: a key nobody is working on is served as soon as its
deadline comes (at once for a delay of 0), and marks that arrive while its work is in flight
fold into ONE follow-up run after it. A lone change waits for no window; a thousand acks
for one Schedule that arrive while its status patch is in flight make one more patch, not a
thousand; ten Schedules applied while a ``schedule.set`` is on its way make one more push.
:class:`Coalescer` is the pure bookkeeping (a deadline per key, marking again never
postpones it, so a steady stream of marks still gets served; the keys being worked on and
their follow-ups; keys marked with no delay served before delayed ones already due);
:class:`CoalescingLoop` is the one task that sleeps until the earliest deadline and runs the
work.
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


URGENT, LAZY = 0, 1  # a key marked with no delay, and one marked to wait


class Coalescer(Generic[K]):
    """Deadlines of pending keys, and the keys being worked on.

    Of the keys whose deadline has come, those marked with no delay go first: a status write
    that shows a change does not queue behind a thousand informational ones (lastSeen) that
    came due a moment earlier. Deadlines sit in two heaps of (deadline, seq, key), one for
    each kind; an entry that is no longer its key's current one is dropped when it surfaces,
    so ``mark``, ``next_deadline`` and ``pop_due`` cost O(log n) however many keys are pending.
    """

    def __init__(self) -> None:
        # Pending key → its live heap entry's (deadline, seq) and which heap holds it.
        self._due: dict[K, tuple[float, int, int]] = {}
        self._heaps: tuple[list[tuple[float, int, K]], list[tuple[float, int, K]]] = ([], [])
        self._seq = itertools.count()
        self._running: set[K] = set()
        self._follow_ups: dict[K, tuple[float, int]] = {}  # running key → (deadline, kind) of the run after

    def mark(self, key: K, *, now: float, delay: float) -> bool:
        """Ask for work on ``key`` within ``delay``; True when the earliest deadline moved earlier.

        A key being worked on gets one follow-up run after the current one (not before its
        deadline), however often it is marked meanwhile.
        """
        wanted = (now + delay, URGENT if delay <= 0 else LAZY)
        if key in self._running:
            self._follow_ups[key] = min(wanted, self._follow_ups.get(key, wanted))
            return False
        return self._push(key, *wanted)

    def next_deadline(self) -> float | None:
        tops = [top[0] for top in (self._top(URGENT), self._top(LAZY)) if top is not None]
        return min(tops) if tops else None

    def pop_due(self, now: float, *, limit: int | None = None) -> list[K]:
        """Up to ``limit`` keys whose deadline has come: those marked with no delay first,
        each kind earliest first.

        They count as being worked on until :meth:`done`.
        """
        due: list[K] = []
        while limit is None or len(due) < limit:
            kind = next((kind for kind in (URGENT, LAZY)
                         if (top := self._top(kind)) is not None and top[0] <= now), None)
            if kind is None:
                break
            _, _, key = heapq.heappop(self._heaps[kind])
            del self._due[key]
            self._running.add(key)
            due.append(key)
        return due

    def done(self, key: K) -> None:
        """Work on ``key`` has finished; a follow-up marked meanwhile is now pending."""
        self._running.discard(key)
        follow_up = self._follow_ups.pop(key, None)
        if follow_up is not None:
            self._push(key, *follow_up)

    def __len__(self) -> int:
        """Keys waiting for their deadline (not those being worked on)."""
        return len(self._due)

    def _top(self, kind: int) -> tuple[float, int, K] | None:
        heap = self._heaps[kind]
        while heap and not self._live(heap[0]):
            heapq.heappop(heap)
        return heap[0] if heap else None

    def _push(self, key: K, deadline: float, kind: int) -> bool:
        current = self._due.get(key)
        if current is not None:
            if current[0] <= deadline and current[2] <= kind:
                return False  # marking again never postpones
            deadline, kind = min(deadline, current[0]), min(kind, current[2])
        earliest = self.next_deadline()
        seq = next(self._seq)
        self._due[key] = (deadline, seq, kind)
        heapq.heappush(self._heaps[kind], (deadline, seq, key))
        if sum(map(len, self._heaps)) > 2 * len(self._due) + 64:
            # Superseded entries wait in the heaps until they surface; keep them from piling up.
            for each, heap in enumerate(self._heaps):
                heap[:] = [(when, number, pending) for pending, (when, number, held) in self._due.items()
                           if held == each]
                heapq.heapify(heap)
        return earliest is None or deadline < earliest

    def _live(self, entry: tuple[float, int, K]) -> bool:
        deadline, seq, key = entry
        current = self._due.get(key)
        return current is not None and current[:2] == (deadline, seq)


class CoalescingLoop(Generic[K]):
    """Runs ``work(key)`` for marked keys, at most ``concurrency`` at a time.

    A key is never worked on twice at once: marks that arrive while it is worked on become
    one follow-up run. Work that raises is logged and retried after ``retry_delay``: an
    exception of a ``transient`` class (the API not answering, say) as a warning with its
    message, anything else with its traceback.
    """

    def __init__(
        self,
        name: str,
        work: Callable[[K], Awaitable[None]],
        *,
        concurrency: int = 8,
        retry_delay: float = 2.0,
        transient: tuple[type[Exception], ...] = (),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._transient = transient
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
        except self._transient as error:
            log.warning("%s: work on %s failed: %s; retrying in %.0fs", self.name, key, error, self._retry_delay)
            self.mark(key, delay=self._retry_delay)  # a follow-up: the key is still being worked on
        except Exception:
            log.exception("%s: work on %s failed; retrying in %.0fs", self.name, key, self._retry_delay)
            self.mark(key, delay=self._retry_delay)
        finally:
            self._busy -= 1
            self._coalescer.done(key)
            self._wakeup.set()  # a slot is free, and maybe a follow-up is due
