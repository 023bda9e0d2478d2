"""Kubernetes API access for the operator's own writes.

kopf watches; everything the operator writes besides (ResticJobs, status, finalizers, token
Secrets, Events) goes through here. It uses the synchronous ``kubernetes`` client on worker
threads (``asyncio.to_thread``): that client understands every kubeconfig and in-cluster
login, kopf's own login is derived from the same configuration, and the writes are few and
small, so a thread each costs nothing that matters. Nothing here blocks the event loop.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import os
import secrets
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import kopf
import kubernetes.client
import kubernetes.config
from kubernetes.client.exceptions import ApiException

from restic_manager.operator.store import GROUP, VERSION, ObjectKey, format_time

MERGE_PATCH = "application/merge-patch+json"
COMPONENT = "restic-manager-operator"
MANAGED_BY = {"app.kubernetes.io/managed-by": "restic-manager"}
# The operator's token Secrets: the only Secrets it lists and watches.
TOKEN_SECRETS = ",".join(f"{key}={value}" for key, value in MANAGED_BY.items())


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
    header = configuration.get_api_key_with_prefix("BearerToken") or configuration.get_api_key_with_prefix(
        "authorization"
    )
    scheme, _, token = (header or "").rpartition(" ")
    return kopf.ConnectionInfo(
        server=configuration.host,
        ca_path=configuration.ssl_ca_cert,
        insecure=not configuration.verify_ssl,
        username=configuration.username or None,
        password=configuration.password or None,
        scheme=scheme or None,
        token=token or None,
        certificate_path=configuration.cert_file,
        private_key_path=configuration.key_file,
    )


def new_token() -> str:
    """A random agent token: 256 bits, URL-safe."""
    return secrets.token_urlsafe(32)


class Kube:
    """Async wrappers over the API calls the operator makes."""

    def __init__(self, configuration: kubernetes.client.Configuration) -> None:
        self._client = kubernetes.client.ApiClient(configuration)
        self._custom = kubernetes.client.CustomObjectsApi(self._client)
        self._core = kubernetes.client.CoreV1Api(self._client)
        self._authentication = kubernetes.client.AuthenticationV1Api(self._client)

    def close(self) -> None:
        self._client.close()

    async def _call(self, what: str, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return await asyncio.to_thread(function, *args, **kwargs)
        except ApiException as error:
            message = f"{what}: {error.status} {error.reason}"
            kind = {404: NotFound, 409: Conflict}.get(error.status or 0, KubeError)
            if error.status == 409 and '"reason":"AlreadyExists"' in (error.body or "").replace(" ", ""):
                kind = AlreadyExists
            raise kind(message, status=error.status) from None

    # --- custom resources ---------------------------------------------------------------

    async def list_objects(self, plural: str, namespaces: list[str] | None) -> tuple[list[dict[str, Any]], str]:
        """Every object of ``plural`` (in ``namespaces``, or everywhere), and the listing's version.

        ``secrets`` lists only the operator's token Secrets (selected by label).
        """
        if plural == "secrets":
            # Callable, not partial[V1SecretList]: the custom-object branch returns another type.
            everywhere: Callable[..., object] = functools.partial(
                self._core.list_secret_for_all_namespaces, label_selector=TOKEN_SECRETS)
            in_namespace: Callable[..., object] = functools.partial(
                self._core.list_namespaced_secret, label_selector=TOKEN_SECRETS)
            what = "token Secrets"
        else:
            everywhere = functools.partial(self._custom.list_cluster_custom_object, GROUP, VERSION, plural)
            in_namespace = functools.partial(self._custom.list_namespaced_custom_object, GROUP, VERSION,
                                             plural=plural)
            what = plural
        if namespaces is None:
            result = self._plain(await self._call(f"list {what}", everywhere))
            return result["items"], result["metadata"]["resourceVersion"]
        items: list[dict[str, Any]] = []
        versions = []
        for namespace in namespaces:
            result = self._plain(await self._call(f"list {what} in {namespace}", in_namespace, namespace=namespace))
            items += result["items"]
            versions.append(result["metadata"]["resourceVersion"])
        return items, min(versions, key=lambda v: int(v) if v.isdigit() else 0, default="0")

    def _plain(self, value: Any) -> Any:
        """A client model as the API's JSON (camelCase dicts)."""
        return self._client.sanitize_for_serialization(value)

    async def get(self, plural: str, key: ObjectKey) -> dict[str, Any]:
        return await self._call(f"get {plural} {key}", self._custom.get_namespaced_custom_object,
                                GROUP, VERSION, key.namespace, plural, key.name)

    async def create(self, plural: str, body: Mapping[str, Any]) -> dict[str, Any]:
        key = ObjectKey.of(body)
        return await self._call(f"create {plural} {key}", self._custom.create_namespaced_custom_object,
                                GROUP, VERSION, key.namespace, plural, body)

    async def delete(self, plural: str, key: ObjectKey) -> None:
        with contextlib.suppress(NotFound):
            await self._call(f"delete {plural} {key}", self._custom.delete_namespaced_custom_object,
                             GROUP, VERSION, key.namespace, plural, key.name)

    async def patch_status(
        self, plural: str, key: ObjectKey, status: Mapping[str, Any], *, uid: str
    ) -> dict[str, Any]:
        """JSON-merge-patch ``status`` into the status subresource of the object with ``uid``.

        The uid in the patch is a precondition: a recreated object of the same name is not
        touched (Conflict).
        """
        return await self._call(
            f"patch {plural} {key} status", self._custom.patch_namespaced_custom_object_status,
            GROUP, VERSION, key.namespace, plural, key.name,
            {"metadata": {"uid": uid}, "status": dict(status)},
            _content_type=MERGE_PATCH,
        )

    async def set_finalizer(self, plural: str, key: ObjectKey, finalizer: str, *, present: bool) -> None:
        """Add or remove one finalizer without touching others (optimistic lock, retried on conflict)."""
        for _ in range(5):
            try:
                body = await self.get(plural, key)
            except NotFound:
                return
            current = list(body["metadata"].get("finalizers") or [])
            if (finalizer in current) == present:
                return
            wanted = current + [finalizer] if present else [f for f in current if f != finalizer]
            patch = {"metadata": {"finalizers": wanted, "resourceVersion": body["metadata"]["resourceVersion"]}}
            try:
                await self._call(f"patch {plural} {key} finalizers", self._custom.patch_namespaced_custom_object,
                                 GROUP, VERSION, key.namespace, plural, key.name, patch,
                                 _content_type=MERGE_PATCH)
                return
            except Conflict:
                continue
            except NotFound:
                return
        raise KubeError(f"patch {plural} {key} finalizers: still conflicting after 5 attempts")

    # --- Secrets and Events -------------------------------------------------------------

    async def read_secret(self, key: ObjectKey) -> dict[str, str]:
        """The Secret's data, decoded."""
        secret = await self._call(f"get Secret {key}", self._core.read_namespaced_secret, key.name, key.namespace)
        return {name: base64.b64decode(value).decode() for name, value in (secret.data or {}).items()}

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
        created = await self._call(f"create Secret {key}", self._core.create_namespaced_secret, key.namespace, body)
        return dict(self._plain(created))

    async def token_review(self, token: str, *, audiences: list[str]) -> dict[str, Any]:
        """The apiserver's verdict on ``token`` for ``audiences`` (a TokenReview's status)."""
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                "spec": {"token": token, "audiences": audiences}}
        result = await self._call("create TokenReview", self._authentication.create_token_review, body)
        return dict(self._plain(result.status) or {})

    async def post_event(
        self, involved: Mapping[str, Any], *, type: str, reason: str, message: str,
        now: datetime | None = None,
    ) -> None:
        """A core/v1 Event about ``involved`` (apiVersion, kind, name, namespace, uid)."""
        stamp = format_time(now or datetime.now(timezone.utc))
        namespace = involved["namespace"]
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": f"{involved['name']}.{secrets.token_hex(8)}", "namespace": namespace},
            "involvedObject": dict(involved),
            "type": type,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": COMPONENT},
            "reportingComponent": COMPONENT,
            "reportingInstance": COMPONENT,
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "count": 1,
        }
        await self._call(f"create Event for {involved['kind']} {namespace}/{involved['name']}",
                         self._core.create_namespaced_event, namespace, body)
