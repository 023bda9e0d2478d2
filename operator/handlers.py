"""kopf's side of the operator: log in, feed the controller's view from kopf's watches of
every kind the operator reacts to, and answer the validating admission webhook.

Each kind has an index handler and an event handler. kopf calls index handlers for every
event but a deletion, the startup listing's included, and calls no other handler before
every indexed kind's listing has gone through them: so the view is complete when the first
event handler runs. The Schedule CRD, which exists wherever the operator can work, brings
that first event whatever else exists (:func:`registry`, ``view_complete``). The index
handlers keep nothing in kopf's indexes (they return None); the event handlers pass on
deletions, which index handlers never see, and the signs of a watch listing again
(relists.py).

kopf needs no finalizers, annotations or retries of its own on these objects (the one
finalizer, on unfinished ResticJobs, is the dispatcher's). Token Secrets and agent pods are
selected by the apiserver (a label, a field), so no other Secret or pod reaches the
operator. Handlers are registered on a registry of their own so that nothing depends on
module import order. All are ``async``: kopf runs plain functions on worker threads, and the
controller belongs to the event loop.

With a webhook server, ``validate-schedule`` rejects a Schedule that validation.py finds
wrong, naming every field; the ValidatingWebhookConfiguration (the chart's, or a test's)
must point at the path ``/validate-schedule``.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import kopf
from kubernetes_asyncio import client

from restic_manager.operator import validation
from restic_manager.operator.controller import Controller
from restic_manager.operator.kube.api import GROUP, VERSION
from restic_manager.operator.kube.client import TOKEN_SECRETS, connection_info

VALIDATE_SCHEDULE = "validate-schedule"  # the webhook's id, and so its URL path


# The kinds of the operator's own group it watches, by plural.
OWN_KINDS = ("agents", "schedules", "repositories", "resticjobs")
# The object whose event says that the view is complete (see the module's docstring).
BEACON = f"schedules.{GROUP}"


class NoDiffBase(kopf.DiffBaseStorage):
    """Keeps nothing. kopf deep-copies every event's object into a diff base for on.create
    and on.update handlers, which the operator has none of (bench/README.md names what
    that copy cost)."""

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> kopf.BodyEssence:
        return kopf.BodyEssence()

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        return None

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        pass


def registry(
    controller: Controller,
    configuration: client.Configuration,
    *,
    on_stop: Callable[[], Awaitable[None]],
    webhook: kopf.WebhookServer | None = None,
) -> kopf.OperatorRegistry:
    """A kopf registry with the operator's handlers, bound to ``controller``.

    ``on_stop`` runs when kopf begins to stop (signal or stop flag), before kopf cancels
    whatever tasks remain in the loop, so the controller shuts down in its own order.
    ``webhook`` serves the validating admission webhook (kopf does not manage its
    configuration: the chart registers it).
    """
    handlers = kopf.OperatorRegistry()
    pods = controller.node_agents.service_account if controller.node_agents is not None else None

    @kopf.on.login(registry=handlers)
    async def login(**_: Any) -> kopf.ConnectionInfo:
        return await connection_info(configuration)

    @kopf.on.startup(registry=handlers)
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        # The operator reports through its own Events and status; kopf's per-handler
        # Events would only echo the log.
        settings.posting.level = logging.WARNING
        settings.watching.server_timeout = 300
        settings.watching.label_selectors["", "v1", "secrets"] = TOKEN_SECRETS
        if pods is not None:
            settings.watching.field_selectors["", "v1", "pods"] = f"spec.serviceAccountName={pods.name}"
        settings.admission.server = webhook
        settings.persistence.diffbase_storage = NoDiffBase()

    @kopf.on.cleanup(registry=handlers)
    async def stop(**_: Any) -> None:
        await on_stop()

    def watch(group: str, version: str, plural: str, *, namespace: str | None = None) -> None:
        """Feed the view with ``plural`` (only those in ``namespace``, if given)."""
        def wanted(body: Mapping[str, Any]) -> bool:
            return namespace is None or body["metadata"].get("namespace") == namespace

        @kopf.index(group, version, plural, id=f"{plural}-view", registry=handlers)
        async def index(body: kopf.Body, **_: Any) -> None:
            if wanted(body):
                controller.observe(plural, None, body)

        @kopf.on.event(group, version, plural, id=f"{plural}-events", registry=handlers)
        async def events(event: Mapping[str, Any], **_: Any) -> None:
            if wanted(event["object"]):
                controller.on_event(plural, event["type"], event["object"])

    for plural in OWN_KINDS:
        watch(GROUP, VERSION, plural)
    watch("", "v1", "secrets")
    if pods is not None:
        # Pods are watched in every watched namespace; the agents' run in one.
        watch("", "v1", "pods", namespace=pods.namespace)

    @kopf.on.event("apiextensions.k8s.io", "v1", "customresourcedefinitions", field="metadata.name", value=BEACON,
                   registry=handlers)
    async def view_complete(**_: Any) -> None:
        controller.view_complete()

    if webhook is not None:
        @kopf.on.validate(GROUP, VERSION, "schedules", id=VALIDATE_SCHEDULE, operations=["CREATE", "UPDATE"],
                          registry=handlers)
        async def validate_schedule(*, body: kopf.Body, old: kopf.Body | None = None, **_: Any) -> None:
            if old is not None and (old.get("spec") == body.get("spec") or body.meta.get("deletionTimestamp")):
                return  # metadata-only updates (labels, finalizers, deletion) of a stored Schedule pass
            schedule_id = f"{body.meta.get('namespace')}/{body.meta.get('name') or body.meta.get('generateName')}"
            problems = validation.schedule_problems(body.get("spec") or {}, schedule_id=schedule_id)
            if problems:
                raise kopf.AdmissionError(f"Schedule {schedule_id}: " + "; ".join(problems), code=422)

    return handlers
