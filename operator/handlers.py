"""kopf's side of the operator: log in, hand the watch events of Agents, Schedules,
Repositories and token Secrets to the controller, and answer the validating admission webhook.
ResticJobs, which a fire storm creates by the thousand, are watched by watch.py instead, at a
fraction of kopf's cost per event.

Only ``on.event`` handlers: the controller keeps its own view and state, so kopf needs no
finalizers, annotations or retries of its own on these objects (the one finalizer, on
unfinished ResticJobs, is the dispatcher's). Secrets are watched with a server-side label
selector, so only the operator's token Secrets ever reach it. Handlers are registered on a
registry of their own so that nothing depends on module import order. All are ``async``: kopf runs plain functions on worker threads, and the
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
import kubernetes.client

from restic_manager.operator import validation
from restic_manager.operator.controller import Controller
from restic_manager.operator.kube import TOKEN_SECRETS, connection_info
from restic_manager.operator.store import GROUP, VERSION

VALIDATE_SCHEDULE = "validate-schedule"  # the webhook's id, and so its URL path


class NoDiffBase(kopf.DiffBaseStorage):
    """Keeps nothing. kopf deep-copies every event's object into a diff base for on.create
    and on.update handlers; with on.event handlers only, nothing reads it, and building it
    was most of kopf's cost per event (a third of the operator's CPU in a fire storm)."""

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> kopf.BodyEssence:
        return kopf.BodyEssence()

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        return None

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        pass


def registry(
    controller: Controller,
    configuration: kubernetes.client.Configuration,
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

    @kopf.on.login(registry=handlers)
    def login(**_: Any) -> kopf.ConnectionInfo:
        return connection_info(configuration)

    @kopf.on.startup(registry=handlers)
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        # The operator reports through its own Events and status; kopf's per-handler
        # Events would only echo the log.
        settings.posting.level = logging.WARNING
        settings.watching.server_timeout = 300
        settings.watching.label_selectors["", "v1", "secrets"] = TOKEN_SECRETS
        settings.admission.server = webhook
        settings.persistence.diffbase_storage = NoDiffBase()

    @kopf.on.cleanup(registry=handlers)
    async def stop(**_: Any) -> None:
        await on_stop()

    @kopf.on.event(GROUP, VERSION, "agents", registry=handlers)
    async def agent_event(event: Mapping[str, Any], **_: Any) -> None:
        controller.observe("agents", event["type"], event["object"])

    @kopf.on.event(GROUP, VERSION, "schedules", registry=handlers)
    async def schedule_event(event: Mapping[str, Any], **_: Any) -> None:
        controller.observe("schedules", event["type"], event["object"])

    @kopf.on.event(GROUP, VERSION, "repositories", registry=handlers)
    async def repository_event(event: Mapping[str, Any], **_: Any) -> None:
        controller.observe("repositories", event["type"], event["object"])

    @kopf.on.event("", "v1", "secrets", registry=handlers)
    async def token_secret_event(event: Mapping[str, Any], **_: Any) -> None:
        controller.observe("secrets", event["type"], event["object"])

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
