"""The operator's process settings: kopf's (operator/handlers.py) and the garbage collector's
report (operator/main.py)."""

from __future__ import annotations

import gc

import kopf
import pytest
import kubernetes.client

from restic_manager.operator import main as operator_main
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



def test_a_slow_full_collection_is_logged(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(operator_main, "SLOW_COLLECTION", 0.0)
    observe = operator_main.report_slow_collections()
    try:
        gc.collect(1)  # a young collection says nothing
        assert not caplog.records
        gc.collect(2)
    finally:
        gc.callbacks.remove(observe)
    [record] = caplog.records
    assert record.levelname == "WARNING" and "full garbage collection held the event loop" in record.message
