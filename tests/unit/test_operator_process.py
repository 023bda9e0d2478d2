"""operator/handlers.py: the kopf settings the operator starts with."""

from __future__ import annotations

import kopf
import kubernetes.client

from restic_manager.operator.handlers import NoDiffBase, registry


async def nothing() -> None:
    return None


def started_settings() -> kopf.OperatorSettings:
    handlers = registry(object(), kubernetes.client.Configuration(), on_stop=nothing)  # type: ignore[arg-type]
    settings = kopf.OperatorSettings()
    for handler in handlers._activities.get_all_handlers():
        if handler.activity is not None and handler.activity.value == "startup":
            handler.fn(settings=settings)
    return settings


def test_kopf_keeps_no_diff_base_of_the_watched_objects() -> None:
    # Only on.event handlers: a copy of every object's essence per event would be pure cost.
    storage = started_settings().persistence.diffbase_storage
    assert isinstance(storage, NoDiffBase)
    body = kopf.Body({"metadata": {"name": "j", "annotations": {}}, "spec": {"agent": "web-01"}})
    assert storage.build(body=body) == {} and storage.fetch(body=body) is None

