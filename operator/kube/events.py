"""Kubernetes Events about the operator's objects, posted in the background and aggregated.

``kubectl describe`` shows an Event once with its count, as for the kubelet's: the same
Event again (same object, type, reason and message) raises the count and lastTimestamp of
the one Event instead of adding another. That is what client-go's recorder does; kopf's
``kopf.event`` posts a new Event every time and only from inside its handlers, where the
operator's loops do not run, so the operator keeps this small recorder of its own.

Recording never waits for the API: :meth:`Recorder.record` only queues, and one task posts.
A burst for the same Event folds into one call; past :data:`QUEUE_LIMIT` distinct Events
waiting, the oldest are dropped, each with a log line, so a storm of Events costs bounded
memory and never holds up jobs.
"""

from __future__ import annotations

import collections
import hashlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime

from restic_manager.operator.kits.coalesce import CoalescingLoop
from restic_manager.operator.kube.api import API_VERSION, ObjectKey
from restic_manager.operator.kube.client import AlreadyExists, Kube, KubeError, NotFound

log = logging.getLogger(__name__)

QUEUE_LIMIT = 4096
COUNTS_KEPT = 4096  # Events whose count is remembered, so a repeat needs no read first
NAME_ROOM = 253 - 17  # an Event's name: the object's, a dot, 16 hex digits


def involved(kind: str, key: ObjectKey, uid: str, *, api_version: str = API_VERSION) -> dict[str, str]:
    """The ``involvedObject`` of an Event about one of the operator's objects."""
    return {"apiVersion": api_version, "kind": kind, "name": key.name, "namespace": key.namespace, "uid": uid}


def event_name(about: Mapping[str, str], *, type: str, reason: str, message: str) -> str:
    """One name per object, type, reason and message: the same Event again finds its own."""
    digest = hashlib.sha256("\0".join((about["uid"], type, reason, message)).encode()).hexdigest()[:16]
    return f"{about['name'][:NAME_ROOM]}.{digest}"


@dataclass
class _Pending:
    about: Mapping[str, str]
    type: str
    reason: str
    message: str
    times: int
    at: datetime


class Recorder:
    def __init__(self, kube: Kube, *, clock: Callable[[], datetime]) -> None:
        self._kube = kube
        self._clock = clock
        self._pending: collections.OrderedDict[str, _Pending] = collections.OrderedDict()
        self._counts: collections.OrderedDict[str, int] = collections.OrderedDict()
        self._loop: CoalescingLoop[str] = CoalescingLoop("events", self._post, transient=(KubeError,))

    def record(self, about: Mapping[str, str], *, type: str, reason: str, message: str) -> None:
        """Queue an Event (``type`` Normal or Warning, ``reason`` CamelCase) about ``about``."""
        message = message[:1024]
        name = event_name(about, type=type, reason=reason, message=message)
        pending = self._pending.get(name)
        if pending is not None:
            pending.times += 1
            pending.at = self._clock()
        else:
            self._pending[name] = _Pending(about, type, reason, message, 1, self._clock())
            while len(self._pending) > QUEUE_LIMIT:
                dropped, _ = self._pending.popitem(last=False)
                log.warning("too many Events waiting to be posted; dropped %s", dropped)
        self._loop.mark(name)

    async def run(self) -> None:
        await self._loop.run()

    async def _post(self, name: str) -> None:
        pending = self._pending.pop(name, None)
        if pending is None:
            return
        try:
            await self._write(name, pending)
        except KubeError:
            # Put back (merged with any that came meanwhile) for the loop's retry.
            later = self._pending.get(name)
            if later is not None:
                pending.times += later.times
                pending.at = later.at
            self._pending[name] = pending
            raise

    async def _write(self, name: str, pending: _Pending) -> None:
        key = ObjectKey(pending.about["namespace"], name)
        count = self._counts.get(name)
        if count is None:
            try:
                await self._create(name, pending)
                self._remember(name, pending.times)
                return
            except AlreadyExists:
                count = await self._kube.event_count(key)
        try:
            await self._kube.bump_event(key, count=count + pending.times, now=pending.at)
        except NotFound:  # expired (the apiserver keeps Events an hour) since it was counted
            await self._create(name, pending)
            count = 0
        self._remember(name, count + pending.times)

    async def _create(self, name: str, pending: _Pending) -> None:
        await self._kube.post_event(pending.about, type=pending.type, reason=pending.reason, message=pending.message,
                                    now=pending.at, name=name, count=pending.times)

    def _remember(self, name: str, count: int) -> None:
        self._counts[name] = count
        self._counts.move_to_end(name)
        while len(self._counts) > COUNTS_KEPT:
            self._counts.popitem(last=False)
