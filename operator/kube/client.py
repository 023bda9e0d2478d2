"""Kubernetes API access for the operator's own calls.

kopf watches every kind the operator reacts to (handlers.py); the operator's writes
(ResticJobs, status, finalizers, token Secrets, Events) and its few reads go through
:class:`Kube`, a thin typed layer over ``kubernetes_asyncio``. That client, the async twin of
the ``kubernetes`` package, was chosen over bare aiohttp because its Configuration logs in
and keeps the login fresh by itself (a kubeconfig's credential plugin, the in-cluster token
the kubelet rotates), and its transport is aiohttp, which kopf uses too. Responses are taken
raw and decoded here: the operator reads JSON, never the generated models.

Retries follow HTTP semantics (:func:`retryable`). A 429 or 503 with a Retry-After was not
served, so any call is made again after that wait, as client-go does. A call whose connection
failed may have reached the apiserver; it is made again because every call here is
idempotent (reads, deletes, patches that set values, reviews) or has its outcome checked: a
create that finds its object existing on a later attempt compares it with what it sent
(:func:`landed`). A call that timed out is not retried here; the loop that made it tries
again later.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import math
import os
import secrets
import urllib.parse
import urllib.request
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, NamedTuple

import aiohttp
import kopf
import msgspec
import tenacity
from kubernetes_asyncio import client, config

from restic_manager.operator.kube.api import GROUP, VERSION, ObjectKey, format_time

log = logging.getLogger(__name__)

JSON_PATCH = "application/json-patch+json"
MERGE_PATCH = "application/merge-patch+json"
COMPONENT = "restic-manager-operator"
MANAGED_BY = {"app.kubernetes.io/managed-by": "restic-manager"}
# The operator's token Secrets: the only Secrets it watches.
TOKEN_SECRETS = ",".join(f"{key}={value}" for key, value in MANAGED_BY.items())
# No single call may hang a loop's worker for ever; a timeout is a KubeError like any other.
REQUEST_TIMEOUT = 60.0
# Seconds an idle apiserver connection is kept: over a minute, under the apiserver's own 90 s,
# so that the operator, not the apiserver, closes one (a request on a connection the server
# closed at that moment would fail).
KEEPALIVE = 75.0
# How often kopf asks again for the login of a Configuration that can refresh it.
LOGIN_REFRESH = timedelta(minutes=1)
FINALIZER_ATTEMPTS = 5
# Attempts of one call, and the wait between attempts when the apiserver names none.
ATTEMPTS = 4
RETRY_WAIT = (0.1, 2.0)
RETRY_AFTER_STATUSES = frozenset({429, 503})
MAX_RETRY_AFTER = 10.0
MAX_MESSAGE = 300  # of the apiserver's Status message, in an error


class KubeError(Exception):
    """An API call failed; the message names the call and the object.

    ``retry_after``: the apiserver did not serve the call and asked for it again after that
    many seconds."""

    def __init__(self, message: str, *, status: int | None = None, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


class NotFound(KubeError):
    pass


class AlreadyExists(KubeError):
    pass


class Conflict(KubeError):
    pass


class ConnectionFailed(KubeError):
    """The connection failed before a response came: the apiserver may have served the call."""


async def load_configuration(kubeconfig: Path | None) -> client.Configuration:
    """The API configuration: ``kubeconfig`` if given, else in-cluster, else $KUBECONFIG/~/.kube/config."""
    configuration = client.Configuration()
    if kubeconfig is not None:
        await config.load_kube_config(config_file=str(kubeconfig), client_configuration=configuration)
    elif os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_incluster_config(client_configuration=configuration)
    else:
        await config.load_kube_config(client_configuration=configuration)
    return configuration


async def connection_info(configuration: client.Configuration) -> kopf.ConnectionInfo:
    """kopf's login from the same configuration, so kopf and :class:`Kube` log in alike.

    A configuration that refreshes its token gives kopf an expiring login: kopf then asks
    again, and the configuration reads the rotated token or runs its credential plugin."""
    authorization = await configuration.get_api_key_with_prefix("BearerToken") or ""
    scheme, _, token = str(authorization).rpartition(" ")
    renewable = configuration.refresh_api_key_hook is not None
    return kopf.ConnectionInfo(
        server=str(configuration.host),
        ca_path=configuration.ssl_ca_cert,
        insecure=not configuration.verify_ssl,
        scheme=scheme or None if token else None,
        token=token or None,
        certificate_path=configuration.cert_file,
        private_key_path=configuration.key_file,
        expiration=datetime.now(timezone.utc) + LOGIN_REFRESH if renewable else None,
    )


def status_error(what: str, status: int, body: bytes, *, retry_after_header: str | None = None) -> KubeError:
    """The exception for an error response to ``what``: its class from the status code and
    the reason in the apiserver's Status, its message with the Status's own message."""
    try:
        reported = msgspec.json.decode(body)
    except msgspec.DecodeError:
        reported = None
    if not isinstance(reported, dict):
        reported = {}
    reason = str(reported.get("reason") or "")
    message = str(reported.get("message") or "")[:MAX_MESSAGE]
    kind: type[KubeError] = {404: NotFound, 409: Conflict}.get(status, KubeError)
    if status == 409 and reason == "AlreadyExists":
        kind = AlreadyExists
    text = f"{what}: {status}" + (f" {reason}" if reason else "") + (f": {message}" if message else "")
    return kind(text, status=status, retry_after=retry_after(status, retry_after_header))


def retry_after(status: int, header: str | None) -> float | None:
    """Seconds to wait before making a call again, when the response says so (None: do not)."""
    if status not in RETRY_AFTER_STATUSES or header is None:
        return None
    try:
        seconds = float(header)
    except ValueError:
        return None  # an HTTP date: the apiserver never sends one
    return min(max(seconds, 0.0), MAX_RETRY_AFTER) if math.isfinite(seconds) else None


def retryable(error: BaseException) -> bool:
    """Whether a call that failed with ``error`` is made again: every call :class:`Kube`
    makes is idempotent or, a create, checked (:meth:`Kube._create`)."""
    if isinstance(error, KubeError) and error.retry_after is not None:
        return True  # the apiserver said it did not serve it
    return isinstance(error, ConnectionFailed)


_BACKOFF = tenacity.wait_exponential_jitter(multiplier=RETRY_WAIT[0], max=RETRY_WAIT[1], jitter=RETRY_WAIT[0])


def _retrying() -> tenacity.AsyncRetrying:
    return tenacity.AsyncRetrying(retry=tenacity.retry_if_exception(retryable), wait=_wait,
                                  stop=tenacity.stop_after_attempt(ATTEMPTS), reraise=True, sleep=asyncio.sleep)


def _wait(state: tenacity.RetryCallState) -> float:
    error = state.outcome.exception() if state.outcome is not None else None
    if isinstance(error, KubeError) and error.retry_after is not None:
        return error.retry_after
    return float(_BACKOFF(state))


def landed(sent: Any, existing: Any) -> bool:
    """Whether ``existing`` is the object ``sent`` made: everything sent is there as sent.

    The apiserver adds to what it stores (metadata, defaults), never changes what it was
    given; a Secret's stringData is stored base64-encoded in its data."""
    if isinstance(sent, Mapping):
        if not isinstance(existing, Mapping):
            return False
        for key, value in sent.items():
            if key == "stringData" and isinstance(value, Mapping):
                encoded = {name: base64.b64encode(str(text).encode()).decode() for name, text in value.items()}
                if not landed(encoded, existing.get("data")):
                    return False
            elif key not in existing or not landed(value, existing[key]):
                return False
        return True
    if isinstance(sent, list):
        return (isinstance(existing, list) and len(existing) == len(sent)
                and all(landed(one, other) for one, other in zip(sent, existing)))
    return bool(sent == existing)


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




def environment_proxy(server: str) -> str | None:
    """The proxy the environment (``HTTPS_PROXY``, ``NO_PROXY``, …) names for ``server``."""
    url = urllib.parse.urlsplit(server)
    if not url.hostname or urllib.request.proxy_bypass(url.hostname):
        return None
    return urllib.request.getproxies().get(url.scheme)


def _session_for_the_apiserver(rest: Any, configuration: client.Configuration) -> None:
    """kubernetes_asyncio's session, with two settings of aiohttp's changed:

    * Idle connections are kept :data:`KEEPALIVE` s, not aiohttp's 15 s: fires come on whole
      minutes, and with the pool emptied between them each fire of a minute waited for a TLS
      handshake of its own (bench/README.md gives the figures).
    * It does not trust the environment, which makes aiohttp look up the proxy variables and
      ``~/.netrc`` on a worker thread for every request; the proxy is looked up here once,
      and the credentials are the configuration's, never netrc's.
    """
    if not rest.proxy:
        rest.proxy = environment_proxy(str(configuration.host))
    made = rest.pool_manager
    connector = aiohttp.TCPConnector(limit=made.connector.limit, ssl=made.connector._ssl, keepalive_timeout=KEEPALIVE)
    made.detach()  # it has opened no connection yet
    rest.pool_manager = aiohttp.ClientSession(connector=connector, trust_env=False,
                                              read_bufsize=2**21)  # as kubernetes_asyncio makes it


class Kube:
    """Async wrappers over the API calls the operator makes.

    Made on the running loop (its connection pool belongs to it); closed by :meth:`close`.
    """

    def __init__(self, configuration: client.Configuration) -> None:
        self._client = client.ApiClient(configuration)
        _session_for_the_apiserver(self._client.rest_client, configuration)
        self._objects = client.CustomObjectsApi(self._client)
        self._core = client.CoreV1Api(self._client)
        self._authentication = client.AuthenticationV1Api(self._client)
        self._openid = client.OpenidApi(self._client)
        self._secret_reads: dict[ObjectKey, asyncio.Task[SecretRead]] = {}

    async def close(self) -> None:
        await self._client.close()

    async def _call(self, what: str, call: Callable[..., Awaitable[Any]], *args: Any, **kwargs: Any) -> Any:
        """One idempotent API call, retried as :func:`retryable` says; the response's JSON."""
        return await _retrying()(self._once, what, call, *args, **kwargs)

    async def _once(self, what: str, call: Callable[..., Awaitable[Any]], *args: Any, **kwargs: Any) -> Any:
        try:
            response = await call(*args, _preload_content=False, _request_timeout=REQUEST_TIMEOUT, **kwargs)
            try:
                body = await response.read()
            finally:
                response.release()
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as error:
            raise ConnectionFailed(f"{what}: {type(error).__name__}: {error}") from error
        except (aiohttp.ClientError, TimeoutError) as error:  # ssl.SSLError is a ClientConnectionError
            raise KubeError(f"{what}: {type(error).__name__}: {error}") from error
        if response.status >= 400:
            raise status_error(what, response.status, body, retry_after_header=response.headers.get("Retry-After"))
        return msgspec.json.decode(body) if body else None

    async def _create(self, what: str, call: Callable[..., Awaitable[Any]], *args: Any, body: Mapping[str, Any],
                      read: Callable[[], Awaitable[Any]]) -> dict[str, Any]:
        """A create, made again after a failed connection: an object found existing then is
        taken as this create's own if it is what was sent (:func:`landed`)."""
        attempts = 0

        async def post() -> Any:
            nonlocal attempts
            attempts += 1
            try:
                return await self._once(what, call, *args, body=dict(body))
            except AlreadyExists:
                if attempts == 1:
                    raise
                existing = await read()
                if not landed(body, existing):
                    raise
                return existing

        return dict(await _retrying()(post))

    # --- custom resources ---------------------------------------------------------------

    async def get(self, plural: str, key: ObjectKey) -> dict[str, Any]:
        return dict(await self._call(f"get {plural} {key}", self._objects.get_namespaced_custom_object,
                                     GROUP, VERSION, key.namespace, plural, key.name))

    async def create(self, plural: str, body: Mapping[str, Any]) -> dict[str, Any]:
        key = ObjectKey.of(body)
        return await self._create(f"create {plural} {key}", self._objects.create_namespaced_custom_object,
                                  GROUP, VERSION, key.namespace, plural, body=body,
                                  read=lambda: self.get(plural, key))

    async def delete(self, plural: str, key: ObjectKey) -> None:
        with contextlib.suppress(NotFound):
            await self._call(f"delete {plural} {key}", self._objects.delete_namespaced_custom_object,
                             GROUP, VERSION, key.namespace, plural, key.name)

    async def patch_status(
        self, plural: str, key: ObjectKey, status: Mapping[str, Any], *, uid: str
    ) -> dict[str, Any]:
        """JSON-merge-patch ``status`` into the status subresource of the object ``key``.

        ``uid`` goes along in the patch's metadata, but the apiserver drops metadata from a
        status patch before it compares anything: it is no precondition, and a recreated
        object of the same name gets the patch too (tests/integration/test_operator_kube.py).
        """
        return dict(await self._call(
            f"patch {plural} {key} status", self._objects.patch_namespaced_custom_object_status,
            GROUP, VERSION, key.namespace, plural, key.name, {"metadata": {"uid": uid}, "status": dict(status)},
            _content_type=MERGE_PATCH))

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
                await self._call(what, self._objects.patch_namespaced_custom_object, GROUP, VERSION, key.namespace,
                                 plural, key.name, patch, _content_type=JSON_PATCH)
                return
            except NotFound:
                return
            except KubeError as error:
                if error.status not in (409, 422):  # 422: a test failed, the object changed meanwhile
                    raise
            seen = None
        raise KubeError(f"{what}: the object kept changing; gave up after {FINALIZER_ATTEMPTS} attempts")

    # --- Secrets, reviews and Events ----------------------------------------------------

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
        secret = await self.get_secret(key)
        return SecretRead(
            data={name: base64.b64decode(value).decode() for name, value in (secret.get("data") or {}).items()},
            labels=dict((secret.get("metadata") or {}).get("labels") or {}),
        )

    async def get_secret(self, key: ObjectKey) -> dict[str, Any]:
        """The Secret as the API returns it."""
        return dict(await self._call(f"get Secret {key}", self._core.read_namespaced_secret, key.name, key.namespace))

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
        return await self._create(f"create Secret {key}", self._core.create_namespaced_secret, key.namespace,
                                  body=body, read=lambda: self.get_secret(key))

    async def token_review(self, token: str, *, audiences: list[str]) -> dict[str, Any]:
        """The apiserver's verdict on ``token`` for ``audiences`` (a TokenReview's status).

        A review changes nothing, so it is made again like a read."""
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                "spec": {"token": token, "audiences": audiences}}
        result = await self._call("create TokenReview", self._authentication.create_token_review, body)
        return dict(result.get("status") or {})

    async def issuer_keys(self) -> dict[str, Any]:
        """The public keys ServiceAccount tokens are signed with (the issuer's JWKS)."""
        return dict(await self._call("read the ServiceAccount issuer's keys",
                                     self._openid.get_service_account_issuer_open_id_keyset))

    async def post_event(
        self, involved: Mapping[str, Any], *, type: str, reason: str, message: str,
        now: datetime | None = None, name: str | None = None, count: int = 1,
    ) -> None:
        """A core/v1 Event about ``involved`` (apiVersion, kind, name, namespace, uid).

        ``name`` makes it the one Event of that name: posting it again raises AlreadyExists."""
        stamp = format_time(now or datetime.now(timezone.utc))
        namespace = involved["namespace"]
        key = ObjectKey(namespace, name or f"{involved['name']}.{secrets.token_hex(8)}")
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": key.name, "namespace": namespace},
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
        await self._create(f"create Event for {involved['kind']} {namespace}/{involved['name']}",
                           self._core.create_namespaced_event, namespace, body=body, read=lambda: self._event(key))

    async def _event(self, key: ObjectKey) -> Any:
        return await self._call(f"get Event {key}", self._core.read_namespaced_event, key.name, key.namespace)

    async def event_count(self, key: ObjectKey) -> int:
        return int((await self._event(key)).get("count") or 1)

    async def bump_event(self, key: ObjectKey, *, count: int, now: datetime) -> None:
        """Raise an Event's count and lastTimestamp: it happened again."""
        await self._call(f"patch Event {key}", self._core.patch_namespaced_event, key.name, key.namespace,
                         {"count": count, "lastTimestamp": format_time(now)}, _content_type=MERGE_PATCH)
