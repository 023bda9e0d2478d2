"""The operator's own list-and-watch of ResticJobs, in place of kopf's, and of the in-cluster
agents' pods (in the agent ServiceAccount's namespace, which kopf may not watch at all).

A fire storm creates one ResticJob per firing agent within a second or two, and each job is
written twice more (its status, its finalizer). kopf's processing of one watch event (a
worker per object, its causes, the handler's arguments) cost the operator more CPU than the
fire that made the job, and on the apiserver's machine that CPU is the apiserver's
(bench/README.md, the fire storm). Here an event costs a JSON decode and a store update.

As client-go's reflector: watch from the version of the startup listing (controller.py's
``_prime``); when a watch ends (the apiserver closes it after ``WATCH_TIMEOUT``) or breaks,
watch again from the last version seen, which bookmarks keep recent; when that version is
Gone (410), list again, and whatever the new listing lacks is deleted
(:meth:`Collection.reconcile_listing`). One watch per namespace, or one for the cluster.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, Generic

from restic_manager.operator.kube import Gone, Kube, KubeError
from restic_manager.operator.store import Change, Collection, T

log = logging.getLogger(__name__)

# A watch that fails (or ends at once) is made again after a wait growing from the first to
# the last; a watch that delivered or lasted resets it.
BACKOFF = (0.5, 30.0)
SHORT = 1.0  # seconds: a watch that ended sooner without an event counts as failed


class Watch(Generic[T]):
    """Keeps ``collection`` current with the apiserver's ``plural`` in ``namespaces`` (None:
    every namespace), calling ``changed`` for every change, until cancelled."""

    def __init__(self, kube: Kube, plural: str, namespaces: Sequence[str] | None, *,
                 collection: Collection[T], changed: Callable[[Change[T]], None], field_selector: str = "",
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._kube = kube
        self._plural = plural
        self._scopes: list[str | None] = list(namespaces) if namespaces is not None else [None]
        self._collection = collection
        self._changed = changed
        self._field_selector = field_selector
        self._clock = clock

    async def run(self, version: str | None = None) -> None:
        """Watch from collection version ``version``, which the collection was listed at
        (None: list first)."""
        async with asyncio.TaskGroup() as tasks:
            for scope in self._scopes:
                tasks.create_task(self._follow(scope, version), name=f"watch {self._plural} in {scope or 'all'}")

    async def _follow(self, scope: str | None, version: str | None) -> None:
        delay = BACKOFF[0]
        while True:
            started, delivered = self._clock(), False
            try:
                if version is None:
                    version = await self._list(scope)
                async for kind, obj in self._kube.watch(self._plural, scope, version,
                                                        field_selector=self._field_selector):
                    version = obj["metadata"].get("resourceVersion") or version
                    delivered = True
                    self._apply(kind, obj)
            except Gone:
                log.info("watch of %s in %s: version %s is gone; listing again", self._plural, scope or "all", version)
                version = None
            except KubeError as error:
                log.warning("watch of %s in %s failed: %s", self._plural, scope or "all", error)
                delivered = False
            if delivered or (version is not None and self._clock() - started >= SHORT):
                delay = BACKOFF[0]
                continue
            await asyncio.sleep(delay)
            delay = min(delay * 2, BACKOFF[1])

    async def _list(self, scope: str | None) -> str:
        bodies, version = await self._kube.list_objects(self._plural, None if scope is None else [scope],
                                                        field_selector=self._field_selector)
        for change in self._collection.reconcile_listing(bodies, version,
                                                         namespaces=None if scope is None else {scope}):
            self._changed(change)
        return version

    def _apply(self, kind: str, obj: dict[str, Any]) -> None:
        if kind == "BOOKMARK":
            return
        change = self._collection.delete(obj) if kind == "DELETED" else self._collection.upsert(obj)
        if change is not None:
            self._changed(change)
