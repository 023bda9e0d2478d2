"""Status writes: one merge patch per object per burst of changes.

Whoever changes what the operator knows about an object marks it here; the writer renders
the object's whole status when its turn comes and patches only the difference from what it
last wrote (or, the first time, from what the API showed). A mark is written at once unless
a patch of that object is in flight; then every mark made meanwhile (a thousand acks for one
Schedule) becomes one more patch after it (coalesce.py). What is only informational waits:
a job's progress is written at most every :data:`PROGRESS_INTERVAL`, an Agent's lastSeen
every :data:`LAST_SEEN_INTERVAL`; a job's phase changes are written at once. Whoever must
know that a status is in the API before it answers (a receipt) awaits :meth:`StatusWriter.flushed`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from restic_manager.operator.kits.coalesce import CoalescingLoop
from restic_manager.operator.kube.api import ObjectKey
from restic_manager.operator.kube.client import Conflict, Kube, KubeError, NotFound

log = logging.getLogger(__name__)

PROGRESS_INTERVAL = 2.0
LAST_SEEN_INTERVAL = 30.0
FLUSH_TIMEOUT = 10.0


class Target(NamedTuple):
    plural: str  # schedules, resticjobs or agents
    key: ObjectKey


class Rendered(NamedTuple):
    uid: str
    seen: Mapping[str, Any]  # the status as the API last showed it
    desired: Mapping[str, Any]


Render = Callable[[Target], Rendered | None]


def merge_patch(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """The RFC 7386 merge patch that turns ``old`` into ``new`` (lists are replaced whole)."""
    patch: dict[str, Any] = {}
    for key, value in new.items():
        before = old.get(key)
        if isinstance(value, Mapping) and isinstance(before, Mapping):
            inner = merge_patch(before, value)
            if inner:
                patch[key] = inner
        elif key not in old or before != value:
            patch[key] = value
    for key in old:
        if key not in new:
            patch[key] = None
    return patch


class StatusWriter:
    def __init__(self, kube: Kube, *, render: Render, flush_timeout: float = FLUSH_TIMEOUT) -> None:
        self._kube = kube
        self._render = render
        self._flush_timeout = flush_timeout
        # By object: the uid it had and the status last written to it. A recreated object (a new
        # uid) is patched from what the API shows, not from what its namesake was given.
        self._written: dict[Target, tuple[str, Mapping[str, Any]]] = {}
        self._loop: CoalescingLoop[Target] = CoalescingLoop("status write", self._write, transient=(KubeError,))
        self._waiters: dict[Target, list[asyncio.Future[None]]] = {}

    def mark(self, plural: str, key: ObjectKey, *, delay: float = 0.0) -> None:
        self._loop.mark(Target(plural, key), delay=delay)

    async def flushed(self, plural: str, key: ObjectKey) -> bool:
        """Write the object's status at once (after the write in flight, if one is) and wait:
        True once what is known now is in the API or the object is gone, False when that
        did not happen within the flush timeout (the write is still retried)."""
        target = Target(plural, key)
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(target, []).append(waiter)
        self._loop.mark(target)
        try:
            async with asyncio.timeout(self._flush_timeout):
                await waiter
            return True
        except TimeoutError:
            return False
        finally:
            waiting = self._waiters.get(target, [])
            if waiter in waiting:
                waiting.remove(waiter)

    def forget(self, plural: str, key: ObjectKey) -> None:
        """Drop what was written for a deleted object."""
        self._written.pop(Target(plural, key), None)

    async def run(self) -> None:
        await self._loop.run()

    async def _write(self, target: Target) -> None:
        # Those who waited before this render are answered by this write; later ones by the next.
        waiters = self._waiters.pop(target, [])
        try:
            await self._write_now(target)
        except BaseException:
            self._waiters.setdefault(target, [])[:0] = waiters
            raise
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def _write_now(self, target: Target) -> None:
        rendered = self._render(target)
        if rendered is None:
            return
        uid, written = self._written.get(target, (None, None))
        base = written if uid == rendered.uid and written is not None else rendered.seen
        patch = merge_patch(base, rendered.desired)
        if not patch:
            return
        try:
            await self._kube.patch_status(target.plural, target.key, patch, uid=rendered.uid)
        except (NotFound, Conflict):
            log.debug("%s %s (uid %s) is gone; status not written", target.plural, target.key, rendered.uid)
            return
        self._written[target] = (rendered.uid, rendered.desired)
