"""The garbage collector's tuning: when it looks at the operator's heap.

The operator's heap is its view of the cluster: tens of thousands of long-lived objects per
thousand Schedules. CPython 3.11 runs a full collection whenever the objects promoted to its
oldest generation since the last one reach a quarter of that generation, and the churn of
watch events gets there every half minute under steady edits. A full collection holds the
event loop while it walks the whole view (bench/README.md gives the figure), and frees little;
acks, fires and status writes all wait meanwhile.

So what survives a full collection is frozen (``gc.freeze``): the collector's automatic runs
look only at what was allocated since, and stay short. Frozen objects are still freed by
reference counting; only reference cycles among them wait, until the sweep that unfreezes
and collects everything once every :data:`SWEEP_INTERVAL`.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from typing import Any

log = logging.getLogger(__name__)

# A full collection this long is worth a line in the log.
SLOW_COLLECTION = 0.1
# How often the frozen objects are collected too: cycles that died frozen live that long at most.
SWEEP_INTERVAL = 3600.0
OLDEST = 2


class GCTuning:
    """Installs the collector callback (:meth:`install`), sweeps (:meth:`run`)."""

    def __init__(self) -> None:
        self._started = 0.0

    def install(self) -> None:
        gc.callbacks.append(self._observe)

    def uninstall(self) -> None:
        gc.callbacks.remove(self._observe)
        gc.unfreeze()

    def _observe(self, phase: str, info: dict[str, Any]) -> None:
        if info["generation"] != OLDEST:
            return
        if phase == "start":
            self._started = time.perf_counter()
            return
        held = time.perf_counter() - self._started
        # Everything the collection left is reachable now; it need not be looked at again.
        gc.freeze()
        if held >= SLOW_COLLECTION:
            log.warning("a full garbage collection held the event loop for %.0f ms (%d objects freed)",
                        held * 1000, info["collected"])

    def sweep(self) -> None:
        """Collect everything, the frozen objects included (and freeze what is left)."""
        gc.unfreeze()
        gc.collect()

    async def run(self) -> None:
        """Sweep every :data:`SWEEP_INTERVAL`, until cancelled."""
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            self.sweep()
