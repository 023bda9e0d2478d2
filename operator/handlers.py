"""kopf's side of the operator: log in, and hand every watch event to the controller.

Only ``on.event`` handlers: the controller keeps its own view and state, so kopf needs no
finalizers, annotations or retries of its own on these objects (the one finalizer, on
running ResticJobs, is the dispatcher's). Handlers are registered on a registry of their
own so that nothing depends on module import order. All are ``async``: kopf runs plain
functions on worker threads, and the controller belongs to the event loop.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import kopf
import kubernetes.client

from restic_manager.operator.controller import Controller
from restic_manager.operator.kube import connection_info
from restic_manager.operator.store import GROUP, VERSION


def registry(
    controller: Controller,
    configuration: kubernetes.client.Configuration,
    *,
    on_stop: Callable[[], Awaitable[None]],
) -> kopf.OperatorRegistry:
    """A kopf registry with the operator's handlers, bound to ``controller``.

    ``on_stop`` runs when kopf begins to stop (signal or stop flag), before kopf cancels
    whatever tasks remain in the loop, so the controller shuts down in its own order.
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

    @kopf.on.cleanup(registry=handlers)
    async def stop(**_: Any) -> None:
        await on_stop()

    @kopf.on.event(GROUP, VERSION, "agents", registry=handlers)
    async def agent_event(event: Mapping[str, Any], **_: Any) -> None:
        controller.observe("agents", event["type"], event["object"])

    @kopf.on.event(GROUP, VERSION, "schedules", registry=handlers)
    async def schedule_event(event: Mapping[str, Any], **_: Any) -> None:
        controller.observe("schedules", event["type"], event["object"])

    @kopf.on.event(GROUP, VERSION, "resticjobs", registry=handlers)
    async def job_event(event: Mapping[str, Any], **_: Any) -> None:
        controller.observe("resticjobs", event["type"], event["object"])

    return handlers
