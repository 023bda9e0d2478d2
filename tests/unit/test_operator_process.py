"""The operator's process settings: kopf's (operator/handlers.py) and the garbage collector's
(operator/heap.py)."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import kopf
import pytest
import kubernetes.client

from restic_manager.operator import heap as heap_module
from restic_manager.operator.handlers import NoDiffBase, registry
from restic_manager.operator.heap import Heap


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



class Cycle:
    def __init__(self) -> None:
        self.me = self


@pytest.fixture
def heap() -> Iterator[Heap]:
    heap = Heap()
    heap.install()
    yield heap
    heap.uninstall()


def test_what_survives_a_full_collection_is_frozen(heap: Heap) -> None:
    survivor = Cycle()
    gc.collect(2)
    frozen = gc.get_freeze_count()
    assert frozen > 0 and not any(o is survivor for o in gc.get_objects())  # no generation holds it
    gc.collect(2)
    assert gc.get_freeze_count() >= frozen


def test_a_cycle_that_dies_frozen_is_freed_by_the_sweep(heap: Heap) -> None:
    cycle = Cycle()
    alive = weakref.ref(cycle)
    gc.collect(2)  # the cycle survives, alive, and is frozen
    del cycle
    gc.collect(2)
    assert alive() is not None  # frozen: the automatic collections no longer see it
    heap.sweep()
    assert alive() is None


def test_a_slow_full_collection_is_logged(heap: Heap, monkeypatch: pytest.MonkeyPatch,
                                          caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(heap_module, "SLOW_COLLECTION", 0.0)
    gc.collect(1)  # a young collection says nothing
    assert not caplog.records
    gc.collect(2)
    [record] = caplog.records
    assert record.levelname == "WARNING" and "full garbage collection held the event loop" in record.message
