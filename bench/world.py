"""What the benchmarks put in the cluster, and the watches that time what comes back.

Objects: a namespace with a Repository and its password Secret, Agents, their token
Secrets (made by the operator), Schedules. Watches: :class:`AppliedWatch` notes when each
Schedule generation's ``Applied`` condition first reads True; :class:`CreationWatch` notes
when each object of a kind first appears. Both stamp events with the moment the harness
read them, so operator and reference are measured alike.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from kubeapi import Api, ApiError, bounded, core, crd
from simfleet import SimAgent

API_VERSION = "resticmanager.io/v1alpha1"
REPOSITORY = "bench-repo"
TOKEN_LABEL = "app.kubernetes.io/managed-by=restic-manager"
TEMPLATE = {"type": "backup", "backup": {"paths": ["/srv/data"]}}


def agent_name(index: int) -> str:
    return f"agent-{index:05d}"


def schedule_name(agent_index: int, slot: int) -> str:
    return f"s-{agent_index:05d}-{slot:02d}"


def agent_body(name: str) -> dict[str, Any]:
    return {"apiVersion": API_VERSION, "kind": "Agent", "metadata": {"name": name, "labels": {"bench": "yes"}},
            "spec": {}}


def schedule_body(name: str, *, agent: str, expression: str, policy: str = "Allow") -> dict[str, Any]:
    return {"apiVersion": API_VERSION, "kind": "Schedule", "metadata": {"name": name},
            "spec": {"agent": agent, "repository": REPOSITORY, "schedule": expression,
                     "concurrencyPolicy": policy, "successfulJobsHistoryLimit": 2, "template": TEMPLATE}}


async def prepare_namespace(api: Api, namespace: str) -> None:
    """The namespace, and a Repository (with its password Secret) that jobs can be sent with."""
    await api.ensure("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
    await api.ensure(core(namespace, "secrets"), {
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": f"{REPOSITORY}-password", "labels": {"resticmanager.io/repository-secret": "true"}},
        "stringData": {"password": "bench"}})
    await api.ensure(crd(namespace, "repositories"), {
        "apiVersion": API_VERSION, "kind": "Repository", "metadata": {"name": REPOSITORY},
        "spec": {"url": "/srv/restic-repo",
                 "passwordSecretRef": {"name": f"{REPOSITORY}-password", "key": "password"}}})


async def create_agents(api: Api, namespace: str, names: Iterable[str], *, limit: int = 32) -> None:
    async def one(name: str) -> None:
        await api.ensure(crd(namespace, "agents"), agent_body(name))

    await bounded(names, one, limit=limit)


async def tokens(api: Api, namespace: str, names: Iterable[str], *, timeout: float) -> dict[str, str]:
    """The token the operator issued for each Agent (``<agent>-agent-token``, key ``token``),
    once every one of them exists."""
    wanted = set(names)
    found: dict[str, str] = {}
    deadline = time.monotonic() + timeout
    while True:
        listing = await api.list(core(namespace, "secrets"), labelSelector=TOKEN_LABEL)
        for secret in listing["items"]:
            agent = secret["metadata"]["name"].removesuffix("-agent-token")
            if agent in wanted and "token" in (secret.get("data") or {}):
                found[agent] = base64.b64decode(secret["data"]["token"]).decode()
        if wanted <= found.keys():
            return {name: found[name] for name in wanted}
        if time.monotonic() > deadline:
            raise TimeoutError(f"the operator made {len(wanted & found.keys())} of {len(wanted)} agent token "
                               f"Secrets within {timeout:.0f}s")
        await asyncio.sleep(1.0)


async def agents_with_tokens(api: Api, namespace: str, indices: range, *, timeout: float) -> list[SimAgent]:
    names = [agent_name(i) for i in indices]
    await create_agents(api, namespace, names)
    issued = await tokens(api, namespace, names, timeout=timeout)
    return [SimAgent(name, issued[name]) for name in names]


class AppliedWatch:
    """When each (Schedule, generation) was first seen with ``Applied`` True for that generation."""

    def __init__(self, api: Api, namespace: str) -> None:
        self._api = api
        self._namespace = namespace
        self.first_seen: dict[tuple[str, int], float] = {}
        self.modified = 0  # MODIFIED events: the harness's own edits plus every status write
        self._waiters: dict[tuple[str, int], list[asyncio.Future[float]]] = {}
        self.ready = asyncio.Event()

    async def run(self) -> None:
        path = crd(self._namespace, "schedules")
        listing = await self._api.list(path)
        for item in listing["items"]:
            self._see(item, time.time())
        self.ready.set()
        async for event in self._api.watch(path, resource_version=listing["metadata"]["resourceVersion"]):
            if event.type in ("ADDED", "MODIFIED"):
                self.modified += event.type == "MODIFIED"
                self._see(event.object, event.at)

    def _see(self, schedule: Mapping[str, Any], at: float) -> None:
        status = schedule.get("status") or {}
        applied = next((c for c in status.get("conditions") or [] if c.get("type") == "Applied"), None)
        if applied is None or applied.get("status") != "True":
            return
        key = (schedule["metadata"]["name"], int(applied.get("observedGeneration", 0)))
        if key in self.first_seen:
            return
        self.first_seen[key] = at
        for waiter in self._waiters.pop(key, []):
            if not waiter.done():
                waiter.set_result(at)

    async def wait(self, name: str, generation: int, *, timeout: float) -> float | None:
        """The moment generation ``generation`` of Schedule ``name`` read Applied, or None after ``timeout``."""
        key = (name, generation)
        if key in self.first_seen:
            return self.first_seen[key]
        waiter: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(key, []).append(waiter)
        try:
            async with asyncio.timeout(timeout):
                return await waiter
        except TimeoutError:
            return None

    def applied_count(self, names: Iterable[str], generation: int = 1) -> int:
        return sum(1 for name in names if (name, generation) in self.first_seen)


class EventCount:
    """How many MODIFIED events arrive under ``path`` (for an Agent: status writes)."""

    def __init__(self, api: Api, path: str) -> None:
        self._api = api
        self._path = path
        self.modified = 0

    async def run(self) -> None:
        listing = await self._api.list(self._path)
        async for event in self._api.watch(self._path, resource_version=listing["metadata"]["resourceVersion"]):
            self.modified += event.type == "MODIFIED"


class CreationWatch:
    """When each object under ``path`` was first seen (ADDED), with ``describe(object)``."""

    def __init__(self, api: Api, path: str, describe: Callable[[Mapping[str, Any]], Any]) -> None:
        self._api = api
        self._path = path
        self._describe = describe
        self.seen: dict[str, tuple[float, Any]] = {}
        self.ready = asyncio.Event()
        self._changed = asyncio.Condition()

    async def run(self) -> None:
        listing = await self._api.list(self._path)
        for item in listing["items"]:
            self.seen.setdefault(item["metadata"]["name"], (float("nan"), self._describe(item)))
        self.ready.set()
        async for event in self._api.watch(self._path, resource_version=listing["metadata"]["resourceVersion"]):
            if event.type == "ADDED" and event.object["metadata"]["name"] not in self.seen:
                self.seen[event.object["metadata"]["name"]] = (event.at, self._describe(event.object))
                async with self._changed:
                    self._changed.notify_all()

    async def until_count(self, holds: Callable[[int], bool], *, timeout: float) -> bool:
        """Wait until ``holds(len(seen))``; False after ``timeout``."""
        try:
            async with asyncio.timeout(timeout), self._changed:
                await self._changed.wait_for(lambda: holds(len(self.seen)))
            return True
        except TimeoutError:
            return False


async def edit_schedule(api: Api, namespace: str, name: str, expression: str) -> tuple[float, int, float]:
    """Change a Schedule's expression; (when the request left, the new generation, when it was answered)."""
    started = time.time()
    body = await api.merge_patch(crd(namespace, "schedules", name), {"spec": {"schedule": expression}})
    return started, int(body["metadata"]["generation"]), time.time()


async def create_schedule(api: Api, namespace: str, body: Mapping[str, Any]) -> tuple[float, int]:
    started = time.time()
    try:
        created = await api.create(crd(namespace, "schedules"), body)
    except ApiError as error:
        if not error.already_exists:
            raise
        created = await api.get(crd(namespace, "schedules", body["metadata"]["name"]))
    return started, int(created["metadata"]["generation"])
