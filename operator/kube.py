"""Kubernetes API access for the operator's own writes.

kopf watches; everything the operator writes besides (ResticJobs, status, finalizers, token
Secrets, Events) and the few reads it makes go through here: JSON over keep-alive HTTP/1.1
connections (http1.py, cheaper per call than aiohttp) whose pool (:data:`POOL_SIZE`) is large
enough for a storm of fires' creates next to the dispatch and status traffic. The login is
the ``kubernetes`` client's Configuration (a kubeconfig or the in-cluster ServiceAccount), the
same one kopf's login is derived from: host, CA or no verification, client certificate,
bearer token or basic auth. A token the
Configuration can refresh (the in-cluster token file, which the kubelet rotates; a kubeconfig's
credential plugin) is asked for again every :data:`TOKEN_REFRESH_INTERVAL` and after a 401,
on a worker thread, because refreshing reads a file or runs a program. A 429 or 503 with a
Retry-After is asked again after that wait, as client-go does (the sync client's urllib3 did
too). ResticJob creates go first (:class:`Lanes`), and overlapping reads of one Secret share
one GET. :meth:`Kube.watch` streams a watch's events (watch.py keeps ResticJobs with it) on
aiohttp, with connections of its own, so long-lived watches never take the calls'
connections. Nothing here blocks the event loop.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import contextvars
import logging
import math
import os
import secrets
import ssl
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import quote, urlencode

import aiohttp
import kopf
import kubernetes.client
import kubernetes.config
import msgspec

from restic_manager.operator.http1 import HttpError, Pool
from restic_manager.operator.store import GROUP, VERSION, ObjectKey, format_time

log = logging.getLogger(__name__)

JSON = "application/json"
JSON_PATCH = "application/json-patch+json"
MERGE_PATCH = "application/merge-patch+json"
COMPONENT = "restic-manager-operator"
MANAGED_BY = {"app.kubernetes.io/managed-by": "restic-manager"}
# The operator's token Secrets: the only Secrets it lists and watches.
TOKEN_SECRETS = ",".join(f"{key}={value}" for key, value in MANAGED_BY.items())
# Connections to the apiserver at once: a fire storm's creates (one per agent firing) queue
# here, next to at most a few dozen dispatch, status and Secret requests.
POOL_SIZE = 64
# ResticJob creates in flight at once: as many as the apiserver serves fastest (32 gave a
# plain client its best create rate in bench/'s storm), and as few new TLS connections as
# that needs when a minute's fires find the pool cold.
FIRST_IN_FLIGHT = 32
# How long an idle connection is kept: opening 64 TLS connections at once costs a storm a few
# hundred milliseconds, and fires come once a minute. Below the apiserver's own idle timeout
# (90 s), so no request goes out on a connection the apiserver is closing (http1.py).
KEEPALIVE = 75.0
# How long before each whole minute Kube.keep_warm makes its round: enough for the round to
# finish first. Once a minute is within KEEPALIVE, so the pool never closes those as idle.
WARM_LEAD = 3.0
# No single call may hang a loop's worker for ever; a timeout is a KubeError like any other.
REQUEST_TIMEOUT = 60.0
# How long the apiserver keeps one watch request open (client-go asks for 5-10 minutes); the
# watch is then made again from the last version seen. Nothing read for WATCH_SILENCE longer
# than that means a dead connection: bookmarks come well within it.
WATCH_TIMEOUT = 300
WATCH_SILENCE = 60.0
TOKEN_REFRESH_INTERVAL = 60.0
FINALIZER_ATTEMPTS = 5
# The apiserver answers 429 (too many requests; storage still initializing) or 503 with a
# Retry-After when a call should simply be made again: as client-go, wait and ask again.
RETRY_AFTER_STATUSES = frozenset({429, 503})
RETRIES_AFTER = 5
MAX_RETRY_AFTER = 10.0
MAX_MESSAGE = 300  # of the apiserver's Status message, in an error


class KubeError(Exception):
    """An API call failed; the message names the call and the object."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class NotFound(KubeError):
    pass


class AlreadyExists(KubeError):
    pass


class Conflict(KubeError):
    pass


class Gone(KubeError):
    """410: a watch's version is older than the apiserver keeps; list again."""


def load_configuration(kubeconfig: Path | None) -> kubernetes.client.Configuration:
    """The API configuration: ``kubeconfig`` if given, else in-cluster, else $KUBECONFIG/~/.kube/config."""
    configuration = kubernetes.client.Configuration()
    if kubeconfig is not None:
        kubernetes.config.load_kube_config(config_file=str(kubeconfig), client_configuration=configuration)
    elif os.environ.get("KUBERNETES_SERVICE_HOST"):
        kubernetes.config.load_incluster_config(client_configuration=configuration)
    else:
        kubernetes.config.load_kube_config(client_configuration=configuration)
    return configuration


def connection_info(configuration: kubernetes.client.Configuration) -> kopf.ConnectionInfo:
    """kopf's credentials from the same configuration, so kopf and the writes log in alike."""
    scheme, _, token = (authorization_of(configuration) or "").rpartition(" ")
    basic = scheme.lower() == "basic"
    return kopf.ConnectionInfo(
        server=configuration.host,
        ca_path=configuration.ssl_ca_cert,
        insecure=not configuration.verify_ssl,
        username=configuration.username or None,
        password=configuration.password or None,
        scheme=None if basic else scheme or None,
        token=None if basic else token or None,
        certificate_path=configuration.cert_file,
        private_key_path=configuration.key_file,
    )


def authorization_of(configuration: kubernetes.client.Configuration) -> str | None:
    """The Authorization header the configuration gives: its bearer token, else basic auth.

    Runs the configuration's refresh hook, if it has one (which may read a file or run a
    credential plugin).
    """
    token = configuration.get_api_key_with_prefix("BearerToken", alias="authorization")
    if token:
        return str(token)
    if configuration.username:
        return str(configuration.get_basic_auth_token())
    return None


def ssl_context(configuration: kubernetes.client.Configuration) -> ssl.SSLContext:
    """TLS as the configuration says: its CA (else the system's) or no verification, and its
    client certificate."""
    if configuration.verify_ssl:
        context = ssl.create_default_context(cafile=configuration.ssl_ca_cert)
    else:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if configuration.cert_file:
        context.load_cert_chain(configuration.cert_file, configuration.key_file)
    return context


def api_error(what: str, status: int, body: bytes) -> KubeError:
    """The exception for an error response to ``what``: its class from the status code and
    the reason in the apiserver's Status, its message with the Status's own message."""
    try:
        parsed = msgspec.json.decode(body)
    except msgspec.DecodeError:
        parsed = None
    return status_error(what, status, parsed if isinstance(parsed, dict) else {})


def status_error(what: str, status: int, reported: Mapping[str, Any]) -> KubeError:
    """The exception for a Status the apiserver ``reported`` with code ``status``."""
    reason = str(reported.get("reason") or "")
    message = str(reported.get("message") or "")[:MAX_MESSAGE]
    kind: type[KubeError] = {404: NotFound, 409: Conflict, 410: Gone}.get(status, KubeError)
    if status == 409 and reason == "AlreadyExists":
        kind = AlreadyExists
    text = f"{what}: {status}" + (f" {reason}" if reason else "") + (f": {message}" if message else "")
    return kind(text, status=status)


def request_headers(authorization: str | None, *, content_type: str | None = None, accept: str = JSON
                    ) -> dict[str, str]:
    """A call's headers: JSON back (or ``accept``), the body's type if it has one, the login if there is one."""
    headers = {"Accept": accept}
    if content_type is not None:
        headers["Content-Type"] = content_type
    if authorization:
        headers["Authorization"] = authorization
    return headers


def watch_event(what: str, line: bytes) -> tuple[str, dict[str, Any]]:
    """One line of a watch stream: (type, object); an ERROR event raises its Status."""
    try:
        event = msgspec.json.decode(line)
        kind, obj = event["type"], event["object"]
    except (msgspec.DecodeError, TypeError, KeyError) as error:
        raise KubeError(f"{what}: not a watch event: {line[:MAX_MESSAGE]!r}") from error
    if kind == "ERROR":
        reported = obj if isinstance(obj, dict) else {}
        code = reported.get("code")
        raise status_error(what, code if isinstance(code, int) else 500, reported)
    if not isinstance(obj, dict) or not isinstance(obj.get("metadata"), dict):
        raise KubeError(f"{what}: an event of type {kind} without an object: {line[:MAX_MESSAGE]!r}")
    return str(kind), obj


def until_warming(now: float) -> float:
    """Seconds from ``now`` (epoch seconds) to the next round of :meth:`Kube.keep_warm`."""
    return 60.0 - (now + WARM_LEAD) % 60.0


def retry_after(status: int, header: str | None) -> float | None:
    """Seconds to wait before making a call again, when the response says so (None: do not)."""
    if status not in RETRY_AFTER_STATUSES or header is None:
        return None
    try:
        seconds = float(header)
    except ValueError:
        return None  # an HTTP date: the apiserver never sends one
    return min(max(seconds, 0.0), MAX_RETRY_AFTER) if math.isfinite(seconds) else None


class SecretRead(NamedTuple):
    """A Secret as a dispatch reads it: its data, decoded, and its labels (the opt-in)."""

    data: Mapping[str, str]
    labels: Mapping[str, str]


def opt_in_refusal(name: str, secret: SecretRead, *, label: str, use: str) -> str | None:
    """Why Secret ``name`` may not be ``use``d (say "handed to agents"), or None: it must carry
    ``label``=true, and is never one of the operator's own agent token Secrets.

    Labelling a Secret takes the right to change it, so someone kept from reading a Secret
    cannot make the operator use it on their behalf (dispatch.py, notify.py).
    """
    if all(secret.labels.get(key) == value for key, value in MANAGED_BY.items()):
        return f"Secret {name} is an agent token Secret of the operator's, which is never {use}"
    if secret.labels.get(label) != "true":
        return (f"Secret {name} is not labelled {label}=true, and only Secrets so labelled are "
                f"{use} (kubectl label secret {name} {label}=true, by someone who may change the Secret)")
    return None


class FinalizersSeen(NamedTuple):
    """An object as its owner last saw it, as far as its finalizers go."""

    uid: str
    finalizers: Sequence[str]


def finalizer_patch(seen: FinalizersSeen, finalizer: str, *, present: bool) -> list[dict[str, Any]] | None:
    """The JSON patch that adds or removes ``finalizer`` on the object ``seen`` (None: nothing to do).

    Its tests hold only for that very object (uid) with exactly those finalizers (an absent
    list tests as null), so a concurrent change of either fails the patch (422) instead of
    being overwritten; a change of anything else (status, labels) does not get in the way.
    """
    current = list(seen.finalizers)
    if (finalizer in current) == present:
        return None
    wanted = current + [finalizer] if present else [name for name in current if name != finalizer]
    return [
        {"op": "test", "path": "/metadata/uid", "value": seen.uid},
        {"op": "test", "path": "/metadata/finalizers", "value": current or None},
        {"op": "add", "path": "/metadata/finalizers", "value": wanted},
    ]


def new_token() -> str:
    """A random agent token: 256 bits, URL-safe."""
    return secrets.token_urlsafe(32)


# The API groups the operator calls: its own resources, and the core group's.
OWN_API = f"/apis/{GROUP}/{VERSION}"
CORE_API = "/api/v1"
CORE_PLURALS = frozenset({"secrets", "pods"})  # listed and watched from CORE_API


def _collection_path(plural: str, namespace: str | None) -> str:
    return _path(plural, namespace, api=CORE_API if plural in CORE_PLURALS else OWN_API)


def _selection(plural: str, field_selector: str) -> dict[str, str]:
    """The selectors of a list or watch of ``plural``: Secrets are only ever the token Secrets."""
    query = {"labelSelector": TOKEN_SECRETS} if plural == "secrets" else {}
    return {**query, "fieldSelector": field_selector} if field_selector else query


def _path(plural: str, namespace: str | None = None, name: str | None = None, subresource: str | None = None,
          *, api: str = OWN_API) -> str:
    """The URL path of a collection or object of ``api`` (names quoted: they come from objects)."""
    path = api
    if namespace is not None:
        path += f"/namespaces/{quote(namespace, safe='')}"
    path += f"/{plural}"
    if name is not None:
        path += f"/{quote(name, safe='')}"
    if subresource is not None:
        path += f"/{subresource}"
    return path


class _Authorization:
    """The Authorization header, refreshed when the configuration can refresh it.

    Each value read has a generation, so that after a 401 many requests in flight with the
    same refused header cause one refresh, not one each.
    """

    def __init__(self, configuration: kubernetes.client.Configuration, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._configuration = configuration
        self._clock = clock
        self.renewable = configuration.refresh_api_key_hook is not None
        # Without a refresh hook, asking the configuration costs nothing and never changes.
        self._header = None if self.renewable else authorization_of(configuration)
        self._generation = 0
        self._fetched_at = -math.inf
        self._lock = asyncio.Lock()

    async def header(self) -> tuple[int, str | None]:
        """The header to send, and its generation (to name it in :meth:`renew`)."""
        if self.renewable and self._clock() - self._fetched_at >= TOKEN_REFRESH_INTERVAL:
            await self.renew(self._generation)
        return self._generation, self._header

    async def renew(self, refused: int) -> None:
        """Ask the configuration again, unless that happened since generation ``refused``."""
        async with self._lock:
            if self._generation == refused:
                self._header = await asyncio.to_thread(authorization_of, self._configuration)
                self._generation += 1
                self._fetched_at = self._clock()


class Lanes:
    """Calls marked first (the creates of fired ResticJobs) go ahead of all others.

    An agent's fire is answered once its job exists, and a fire storm is recorded fastest
    when the apiserver spends itself on the creates: while any such call waits or runs, no
    other call starts (those already sent go on), and :meth:`clear` holds back the work that
    the new jobs cause (dispatch, status writes), which would take the same CPU. At most
    :data:`FIRST_IN_FLIGHT` of these calls are sent at once; the rest wait their turn here.
    """

    def __init__(self) -> None:
        self._first = 0
        self._clear = asyncio.Event()
        self._clear.set()
        self._slots = asyncio.Semaphore(FIRST_IN_FLIGHT)
        # True within hold(): the task's calls take the place it holds, whether marked first
        # or not (a refused fire's Event, the read after an AlreadyExists), as nothing else can.
        self._holding: contextvars.ContextVar[bool] = contextvars.ContextVar("holding a first place", default=False)

    @contextlib.asynccontextmanager
    async def hold(self) -> AsyncIterator[None]:
        """A place in the first lane for a whole piece of work that ends in calls marked first;
        every call the work makes meanwhile goes in that place."""
        async with self.enter(first=True):
            token = self._holding.set(True)
            try:
                yield
            finally:
                self._holding.reset(token)

    async def clear(self) -> None:
        """Return once no call marked first waits or runs."""
        await self._clear.wait()

    @contextlib.asynccontextmanager
    async def enter(self, *, first: bool) -> AsyncIterator[None]:
        if self._holding.get():
            yield
            return
        if not first:
            await self._clear.wait()
            yield
            return
        self._first += 1
        self._clear.clear()
        try:
            async with self._slots:
                yield
        finally:
            self._first -= 1
            if not self._first:
                self._clear.set()


class Kube:
    """Async wrappers over the API calls the operator makes.

    Built before the loop runs (it reads the CA and client certificate files then); its
    connections are opened by the calls, on the running loop, and closed by :meth:`close`.
    """

    def __init__(self, configuration: kubernetes.client.Configuration) -> None:
        self._host = configuration.host.rstrip("/")
        self._ssl = ssl_context(configuration) if self._host.startswith("https:") else None
        self._options: dict[str, Any] = {}
        if configuration.tls_server_name:
            self._options["server_hostname"] = configuration.tls_server_name
        if configuration.proxy:
            self._options["proxy"] = configuration.proxy
        self._authorization = _Authorization(configuration)
        # Made now, so that a host or proxy it cannot serve is refused at start.
        self._pool = Pool(self._host, ssl_context=self._ssl, server_hostname=self._options.get("server_hostname"),
                          proxy=self._options.get("proxy"), limit=POOL_SIZE, keepalive=KEEPALIVE)
        self._watch_session: aiohttp.ClientSession | None = None
        self._lanes = Lanes()
        self._secret_reads: dict[ObjectKey, asyncio.Task[SecretRead]] = {}

    async def close(self) -> None:
        await self._pool.close()
        if self._watch_session is not None:
            await self._watch_session.close()
        self._watch_session = None

    async def _request(
        self, what: str, method: str, path: str, *, body: Any = None, content_type: str = JSON,
        query: Mapping[str, str] | None = None, first: bool = False, accept: str = JSON,
    ) -> Any:
        """One API call; the response's JSON. ``what`` names the call in errors; ``first``
        puts it ahead of the others (:class:`Lanes`); ``accept``: a JSON type other than the
        usual one, where a path serves only that."""
        async with self._lanes.enter(first=first):
            return await self._call(what, method, path, body=body, content_type=content_type, query=query,
                                    accept=accept)

    async def _call(self, what: str, method: str, path: str, *, body: Any, content_type: str,
                    query: Mapping[str, str] | None, accept: str) -> Any:
        data = None if body is None else msgspec.json.encode(body)
        renewed, waits = False, 0
        while True:
            generation, authorization = await self._authorization.header()
            status, delay, payload = await self._send(what, method, path, data=data, content_type=content_type,
                                                      query=query, authorization=authorization, accept=accept)
            if status == 401 and self._authorization.renewable and not renewed:
                # The token may have rotated since it was read: read it again, and try once more.
                await self._authorization.renew(generation)
                renewed = True
            elif delay is not None and waits < RETRIES_AFTER:
                waits += 1
                await asyncio.sleep(delay)
            elif status >= 400:
                raise api_error(what, status, payload)
            else:
                return msgspec.json.decode(payload) if payload else None

    async def _send(self, what: str, method: str, path: str, *, data: bytes | None, content_type: str,
                    query: Mapping[str, str] | None, authorization: str | None,
                    accept: str) -> tuple[int, float | None, bytes]:
        """The response's status, how long it asks to wait before a retry (if it does), its body."""
        headers = request_headers(authorization, content_type=None if data is None else content_type, accept=accept)
        target = f"{path}?{urlencode(query)}" if query else path
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                response = await self._pool.request(method, target, headers, data)
        except (HttpError, OSError, TimeoutError) as error:  # ssl.SSLError is an OSError
            raise KubeError(f"{what}: {type(error).__name__}: {error}") from error
        return response.status, retry_after(response.status, response.headers.get("retry-after")), response.body

    def first_lane(self) -> contextlib.AbstractAsyncContextManager[None]:
        """Hold a place in the first lane (:class:`Lanes`) for work that ends in a ResticJob
        create: the work waits its turn before it starts, and its calls use the place."""
        return self._lanes.hold()

    async def creates_done(self) -> None:
        """Return once no ResticJob create (``first``) waits or runs: work that the new jobs
        cause waits for this, so a fire storm's creates have the machine to themselves."""
        await self._lanes.clear()

    async def watch(self, plural: str, namespace: str | None, version: str, *,
                    field_selector: str = "") -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """The changes to ``plural`` (in ``namespace``, or everywhere; only those
        ``field_selector`` selects) after collection version ``version``, as
        (ADDED|MODIFIED|DELETED|BOOKMARK, object), until the apiserver ends
        the watch (after :data:`WATCH_TIMEOUT`). A bookmark's object carries only the version
        reached. A version the apiserver no longer keeps raises :class:`Gone`.
        """
        what = f"watch {plural}" + (f" in {namespace}" if namespace is not None else "")
        query = {"watch": "true", "resourceVersion": version, "allowWatchBookmarks": "true",
                 "timeoutSeconds": str(WATCH_TIMEOUT), **_selection(plural, field_selector)}
        if self._watch_session is None:
            # Unlimited: one connection per watched namespace, each open for minutes.
            self._watch_session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, ssl=self._ssl or True))
        generation, authorization = await self._authorization.header()
        headers = request_headers(authorization)
        timeout = aiohttp.ClientTimeout(total=None, connect=REQUEST_TIMEOUT, sock_read=WATCH_TIMEOUT + WATCH_SILENCE)
        try:
            async with self._watch_session.get(self._host + _collection_path(plural, namespace), params=query,
                                               headers=headers, timeout=timeout, **self._options) as response:
                if response.status == 401 and self._authorization.renewable:
                    await self._authorization.renew(generation)  # for the next attempt
                if response.status >= 400:
                    raise api_error(what, response.status, await response.read())
                pending = b""
                async for chunk in response.content.iter_any():
                    *lines, pending = (pending + chunk).split(b"\n")
                    for line in lines:
                        if line.strip():
                            yield watch_event(what, line)
        except (aiohttp.ClientError, TimeoutError) as error:
            raise KubeError(f"{what}: {type(error).__name__}: {error}") from error

    async def keep_warm(self, wanted: Callable[[], int]) -> None:
        """Keep ``wanted()`` connections (at most :data:`FIRST_IN_FLIGHT`) open, until cancelled.

        Agents whose Schedules share a minute fire together, and each of that burst's job
        creates that finds no idle connection pays for a TLS handshake before its request is
        sent: on bench/'s apiserver, the median of 100 creates came 54-159 ms later from a
        cold pool than from a warm one. So shortly before every whole minute, when cron's
        bursts come, :meth:`warm` opens or reuses that many connections; they then stay open
        (KEEPALIVE) until the next round has used them again.
        """
        while True:
            await asyncio.sleep(until_warming(time.time()))
            await self.warm(min(wanted(), FIRST_IN_FLIGHT))

    async def warm(self, count: int) -> None:
        """``count`` GETs of ``/version`` at once, so each takes a connection of its own."""
        results = await asyncio.gather(
            *(self._request("keep a connection warm", "GET", "/version") for _ in range(count)),
            return_exceptions=True)
        failed = [result for result in results if isinstance(result, BaseException)]
        for error in failed:
            if not isinstance(error, KubeError):
                raise error
        if failed:
            # The next fires open their own connections then; nothing else depends on these.
            log.debug("keeping %d apiserver connections warm: %d failed, first: %s", count, len(failed), failed[0])

    # --- custom resources ---------------------------------------------------------------

    async def list_objects(self, plural: str, namespaces: list[str] | None, *,
                           field_selector: str = "") -> tuple[list[dict[str, Any]], str]:
        """Every object of ``plural`` (in ``namespaces``, or everywhere; only those
        ``field_selector`` selects), and the listing's version.

        ``secrets`` lists only the operator's token Secrets (selected by label).
        """
        query = _selection(plural, field_selector)
        what = "token Secrets" if plural == "secrets" else plural
        if namespaces is None:
            result = await self._request(f"list {what}", "GET", _collection_path(plural, None), query=query)
            return result["items"], result["metadata"]["resourceVersion"]
        items: list[dict[str, Any]] = []
        versions = []
        for namespace in namespaces:
            result = await self._request(f"list {what} in {namespace}", "GET", _collection_path(plural, namespace),
                                         query=query)
            items += result["items"]
            versions.append(result["metadata"]["resourceVersion"])
        return items, min(versions, key=lambda v: int(v) if v.isdigit() else 0, default="0")

    async def get(self, plural: str, key: ObjectKey) -> dict[str, Any]:
        return dict(await self._request(f"get {plural} {key}", "GET", _path(plural, key.namespace, key.name)))

    async def create(self, plural: str, body: Mapping[str, Any], *, first: bool = False) -> dict[str, Any]:
        """Create the object; ``first`` puts the call ahead of all others (:class:`Lanes`)."""
        key = ObjectKey.of(body)
        return dict(await self._request(f"create {plural} {key}", "POST", _path(plural, key.namespace),
                                        body=dict(body), first=first))

    async def delete(self, plural: str, key: ObjectKey) -> None:
        with contextlib.suppress(NotFound):
            await self._request(f"delete {plural} {key}", "DELETE", _path(plural, key.namespace, key.name))

    async def patch_status(
        self, plural: str, key: ObjectKey, status: Mapping[str, Any], *, uid: str
    ) -> dict[str, Any]:
        """JSON-merge-patch ``status`` into the status subresource of the object ``key``.

        ``uid`` goes along in the patch's metadata, but the apiserver drops metadata from a
        status patch before it compares anything: it is no precondition, and a recreated
        object of the same name gets the patch too (tests/integration/test_operator_kube.py).
        """
        return dict(await self._request(
            f"patch {plural} {key} status", "PATCH", _path(plural, key.namespace, key.name, "status"),
            body={"metadata": {"uid": uid}, "status": dict(status)}, content_type=MERGE_PATCH))

    async def set_finalizer(self, plural: str, key: ObjectKey, finalizer: str, *, present: bool,
                            seen: FinalizersSeen | None = None) -> None:
        """Add or remove one finalizer without touching others.

        ``seen`` is the object as the caller's watch last showed it: the first attempt patches
        from it without a GET, and only that object (uid) is ever changed. A stale view fails
        the patch's tests; then the object is read and the patch tried again.
        """
        what = f"patch {plural} {key} finalizers"
        uid = seen.uid if seen is not None else None
        for _ in range(FINALIZER_ATTEMPTS):
            if seen is None:
                try:
                    meta = (await self.get(plural, key))["metadata"]
                except NotFound:
                    return
                if uid is not None and meta["uid"] != uid:
                    return  # the object seen is gone; another of its name is none of this call's business
                seen = FinalizersSeen(meta["uid"], tuple(meta.get("finalizers") or ()))
            patch = finalizer_patch(seen, finalizer, present=present)
            if patch is None:
                return
            try:
                await self._request(what, "PATCH", _path(plural, key.namespace, key.name), body=patch,
                                    content_type=JSON_PATCH)
                return
            except NotFound:
                return
            except KubeError as error:
                if error.status not in (409, 422):  # 422: a test failed, the object changed meanwhile
                    raise
            seen = None
        raise KubeError(f"{what}: the object kept changing; gave up after {FINALIZER_ATTEMPTS} attempts")

    # --- Secrets and Events -------------------------------------------------------------

    async def read_secret(self, key: ObjectKey) -> SecretRead:
        """The Secret's data, decoded, and its labels.

        Reads of one Secret while a GET of it is on its way share that GET: a storm of jobs
        on one Repository reads its password once, and no answer is older than the call it
        joined. Nothing is kept once the answer is in.
        """
        read = self._secret_reads.get(key)
        if read is None:
            read = asyncio.ensure_future(self._read_secret(key))
            self._secret_reads[key] = read
            read.add_done_callback(lambda done: self._secret_read_done(key, done))
        # Shielded: one caller's cancellation must not cancel the others' read.
        return await asyncio.shield(read)

    def _secret_read_done(self, key: ObjectKey, read: asyncio.Task[SecretRead]) -> None:
        if self._secret_reads.get(key) is read:
            del self._secret_reads[key]
        if not read.cancelled():
            read.exception()  # retrieved here, so a read every caller left is not reported as lost

    async def _read_secret(self, key: ObjectKey) -> SecretRead:
        secret = await self._request(f"get Secret {key}", "GET",
                                     _path("secrets", key.namespace, key.name, api=CORE_API))
        return SecretRead(
            data={name: base64.b64decode(value).decode() for name, value in (secret.get("data") or {}).items()},
            labels=dict((secret.get("metadata") or {}).get("labels") or {}),
        )

    async def create_secret(self, key: ObjectKey, data: Mapping[str, str], *,
                            owner: Mapping[str, Any]) -> dict[str, Any]:
        body = {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "Opaque",
            "metadata": {"name": key.name, "namespace": key.namespace, "labels": dict(MANAGED_BY),
                         "ownerReferences": [dict(owner)]},
            "stringData": dict(data),
        }
        return dict(await self._request(f"create Secret {key}", "POST",
                                        _path("secrets", key.namespace, api=CORE_API), body=body))

    async def token_review(self, token: str, *, audiences: list[str]) -> dict[str, Any]:
        """The apiserver's verdict on ``token`` for ``audiences`` (a TokenReview's status)."""
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                "spec": {"token": token, "audiences": audiences}}
        result = await self._request("create TokenReview", "POST", "/apis/authentication.k8s.io/v1/tokenreviews",
                                     body=body)
        return dict(result.get("status") or {})

    async def issuer_keys(self) -> dict[str, Any]:
        """The public keys ServiceAccount tokens are signed with (the issuer's JWKS)."""
        return dict(await self._request("read the ServiceAccount issuer's keys", "GET", "/openid/v1/jwks",
                                        accept="application/jwk-set+json"))

    async def post_event(
        self, involved: Mapping[str, Any], *, type: str, reason: str, message: str,
        now: datetime | None = None, name: str | None = None, count: int = 1,
    ) -> None:
        """A core/v1 Event about ``involved`` (apiVersion, kind, name, namespace, uid).

        ``name`` makes it the one Event of that name: posting it again raises AlreadyExists."""
        stamp = format_time(now or datetime.now(timezone.utc))
        namespace = involved["namespace"]
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": name or f"{involved['name']}.{secrets.token_hex(8)}", "namespace": namespace},
            "involvedObject": dict(involved),
            "type": type,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": COMPONENT},
            "reportingComponent": COMPONENT,
            "reportingInstance": COMPONENT,
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "count": count,
        }
        await self._request(f"create Event for {involved['kind']} {namespace}/{involved['name']}", "POST",
                            _path("events", namespace, api=CORE_API), body=body)

    async def event_count(self, key: ObjectKey) -> int:
        event = await self._request(f"get Event {key}", "GET", _path("events", key.namespace, key.name, api=CORE_API))
        return int(event.get("count") or 1)

    async def bump_event(self, key: ObjectKey, *, count: int, now: datetime) -> None:
        """Raise an Event's count and lastTimestamp: it happened again."""
        await self._request(f"patch Event {key}", "PATCH", _path("events", key.namespace, key.name, api=CORE_API),
                            body={"count": count, "lastTimestamp": format_time(now)}, content_type=MERGE_PATCH)
