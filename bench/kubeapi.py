"""The harness's own Kubernetes API client: aiohttp, client-certificate login, JSON only.

The load generator must not be the bottleneck it measures, so it does not use the
synchronous ``kubernetes`` client on threads; it speaks plain HTTP/1.1 over a pool of
keep-alive connections. Only what the benchmarks need: create, merge-patch, get, list,
delete and watch (as an async iterator of events stamped with the moment they arrived).
"""

from __future__ import annotations

import asyncio
import collections
import json
import re
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import yaml

T = TypeVar("T")
GROUP_PATH = "/apis/resticmanager.io/v1alpha1"
MERGE_PATCH = "application/merge-patch+json"


class KubeconfigError(Exception):
    """The kubeconfig cannot be used by the harness; the message says which field."""


class ApiError(Exception):
    def __init__(self, what: str, status: int, body: str) -> None:
        super().__init__(f"{what}: HTTP {status}: {body[:300]}")
        self.status = status
        self.body = body

    @property
    def already_exists(self) -> bool:
        return self.status == 409 and '"AlreadyExists"' in self.body


@dataclass(frozen=True)
class Credentials:
    server: str
    ca_file: str
    cert_file: str
    key_file: str


def credentials(kubeconfig: Path) -> Credentials:
    """Server, CA and client certificate of the current context (files, as testbin writes them)."""
    config = yaml.safe_load(kubeconfig.read_text())
    context_name = config.get("current-context")
    context = next((c["context"] for c in config.get("contexts", []) if c["name"] == context_name), None)
    if context is None:
        raise KubeconfigError(f"{kubeconfig}: current-context {context_name!r} is not among contexts")
    cluster = next(c["cluster"] for c in config["clusters"] if c["name"] == context["cluster"])
    user = next(u["user"] for u in config["users"] if u["name"] == context["user"])
    for where, block, key in (("cluster", cluster, "certificate-authority"),
                              ("user", user, "client-certificate"), ("user", user, "client-key")):
        if key not in block:
            raise KubeconfigError(f"{kubeconfig}: {where}.{key} (a file path) is required by the harness")
    return Credentials(cluster["server"], cluster["certificate-authority"],
                       user["client-certificate"], user["client-key"])


def crd(namespace: str, plural: str, name: str | None = None) -> str:
    return f"{GROUP_PATH}/namespaces/{namespace}/{plural}" + (f"/{name}" if name else "")


def core(namespace: str, plural: str, name: str | None = None) -> str:
    return f"/api/v1/namespaces/{namespace}/{plural}" + (f"/{name}" if name else "")


def batch(namespace: str, plural: str, name: str | None = None) -> str:
    return f"/apis/batch/v1/namespaces/{namespace}/{plural}" + (f"/{name}" if name else "")


@dataclass(frozen=True)
class Event:
    type: str  # ADDED, MODIFIED, DELETED, BOOKMARK
    object: Mapping[str, Any]
    at: float  # wall-clock time.time() when the harness read it


class Api:
    """``async with Api(credentials) as api:`` — a pooled client for one benchmark."""

    def __init__(self, creds: Credentials, *, connections: int = 32) -> None:
        self._creds = creds
        self._connections = connections
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Api:
        context = ssl.create_default_context(cafile=self._creds.ca_file)
        context.load_cert_chain(self._creds.cert_file, self._creds.key_file)
        connector = aiohttp.TCPConnector(ssl=context, limit=self._connections)
        self._session = aiohttp.ClientSession(base_url=self._creds.server, connector=connector,
                                              timeout=aiohttp.ClientTimeout(total=120))
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._session is not None
        await self._session.close()

    async def call(self, method: str, path: str, *, body: Any = None, params: Mapping[str, str] | None = None,
                   content_type: str = "application/json") -> dict[str, Any]:
        assert self._session is not None, "use Api as an async context manager"
        data = None if body is None else json.dumps(body)
        headers = {"Content-Type": content_type, "Accept": "application/json"}
        async with self._session.request(method, path, data=data, params=params, headers=headers) as response:
            text = await response.text()
            if response.status >= 300:
                raise ApiError(f"{method} {path}", response.status, text)
            return json.loads(text) if text else {}

    async def create(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        return await self.call("POST", path, body=body)

    async def merge_patch(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        return await self.call("PATCH", path, body=body, content_type=MERGE_PATCH)

    async def get(self, path: str) -> dict[str, Any]:
        return await self.call("GET", path)

    async def list(self, path: str, **params: str) -> dict[str, Any]:
        return await self.call("GET", path, params=params)

    async def delete(self, path: str) -> None:
        try:
            await self.call("DELETE", path)
        except ApiError as error:
            if error.status != 404:
                raise

    async def ensure(self, path: str, body: Mapping[str, Any]) -> None:
        """Create ``body`` unless an object of that name exists."""
        try:
            await self.create(path, body)
        except ApiError as error:
            if not error.already_exists:
                raise

    async def watch(self, path: str, *, resource_version: str, params: Mapping[str, str] | None = None
                    ) -> AsyncIterator[Event]:
        """Every event under ``path`` after ``resource_version``, until the caller stops.

        The server ends a watch after a while; it is resumed from the last version seen.
        """
        assert self._session is not None
        version = resource_version
        while True:
            query = {"watch": "1", "resourceVersion": version, "allowWatchBookmarks": "true",
                     "timeoutSeconds": "600", **(params or {})}
            async with self._session.get(path, params=query,
                                         timeout=aiohttp.ClientTimeout(total=None, sock_read=None)) as response:
                if response.status >= 300:
                    raise ApiError(f"WATCH {path}", response.status, await response.text())
                buffer = b""
                async for chunk in response.content.iter_any():
                    at = time.time()
                    buffer += chunk
                    *lines, buffer = buffer.split(b"\n")
                    for line in lines:
                        if not line.strip():
                            continue
                        raw = json.loads(line)
                        if raw["type"] == "ERROR":
                            raise ApiError(f"WATCH {path}", int(raw["object"].get("code", 0)),
                                           json.dumps(raw["object"]))
                        version = raw["object"]["metadata"].get("resourceVersion", version)
                        yield Event(raw["type"], raw["object"], at)


_REQUEST_LINE = re.compile(r'^apiserver_request_total\{(?P<labels>[^}]*)\} (?P<value>[0-9.e+]+)$')
_LABEL = re.compile(r'(\w+)="([^"]*)"')


async def request_counts(api: Api) -> collections.Counter[str]:
    """The apiserver's own count of requests served, by "VERB resource[/subresource]"."""
    assert api._session is not None
    async with api._session.get("/metrics") as response:
        text = await response.text()
    counts: collections.Counter[str] = collections.Counter()
    for line in text.splitlines():
        match = _REQUEST_LINE.match(line)
        if match:
            labels = dict(_LABEL.findall(match["labels"]))
            resource = labels.get("resource", "") + (f"/{labels['subresource']}" if labels.get("subresource") else "")
            counts[f"{labels.get('verb')} {resource}"] += int(float(match["value"]))
    return counts


def per(delta: collections.Counter[str], count: int, *, at_least: float = 0.05) -> dict[str, float]:
    """Requests per unit of work (per fire, per edit), the frequent ones first."""
    return {key: round(value / count, 2) for key, value in delta.most_common() if value / count >= at_least}


async def bounded(items: Iterable[T], work: Callable[[T], Awaitable[Any]], *, limit: int) -> None:
    """``work(item)`` for every item, at most ``limit`` at a time; the first failure ends it."""
    gate = asyncio.Semaphore(limit)

    async def one(item: T) -> None:
        try:
            await work(item)
        finally:
            gate.release()

    async with asyncio.TaskGroup() as group:
        for item in items:
            await gate.acquire()  # bounds the tasks that exist, not only those running
            group.create_task(one(item))


async def paced(items: Iterable[T], work: Callable[[T], Awaitable[Any]], *, rate: float) -> None:
    """Start ``work(item)`` for the items at a steady ``rate`` per second (open loop: a slow
    call does not delay the next start), and wait for all of them."""
    start = time.monotonic()
    async with asyncio.TaskGroup() as group:
        for index, item in enumerate(items):
            delay = start + index / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            group.create_task(work(item))
