"""The operator's process settings: kopf's (operator/handlers.py) and the garbage collector's
(operator/kits/gc_tuning.py)."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

from typing import Any

import kopf
import pytest
from kubernetes_asyncio import client

from restic_manager.operator.agents.authenticator import NodeAgents
from restic_manager.operator.handlers import BEACON, NoDiffBase, registry
from restic_manager.operator.kits import gc_tuning
from restic_manager.operator.kits.gc_tuning import GCTuning
from restic_manager.operator.kube.api import ObjectKey


async def nothing() -> None:
    return None


class ViewOf:
    """What the handlers tell a controller, in order."""

    def __init__(self, node_agents: NodeAgents | None = None) -> None:
        self.node_agents = node_agents
        self.told: list[tuple[str, str | None, str]] = []

    def observe(self, plural: str, event_type: str | None, body: Any) -> None:
        self.told.append((plural, event_type, body["metadata"]["name"]))

    def on_event(self, plural: str, event_type: str | None, body: Any) -> None:
        self.told.append((f"{plural} event", event_type, body["metadata"]["name"]))

    def view_complete(self) -> None:
        self.told.append(("view", "complete", ""))


def started_settings(controller: Any = None) -> kopf.OperatorSettings:
    handlers = registry(controller or ViewOf(), client.Configuration(), on_stop=nothing)
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


IN_CLUSTER = NodeAgents(service_account=ObjectKey("backup", "agent"), namespace="backup")


def resource_handlers(handlers: kopf.OperatorRegistry) -> dict[str, Any]:
    return {handler.id: handler for handler in handlers._indexing.get_all_handlers()
            + handlers._watching.get_all_handlers()}


async def test_every_kind_feeds_the_view_from_its_listing_on_and_the_schedule_crd_completes_it() -> None:
    view = ViewOf(IN_CLUSTER)
    handlers = resource_handlers(registry(view, client.Configuration(), on_stop=nothing))  # type: ignore[arg-type]
    kinds = ("agents", "schedules", "repositories", "resticjobs", "secrets", "pods")
    # Index handlers see the startup listing and every later change but deletions, which
    # the event handlers pass on with every event's type (controller.on_event).
    assert {f"{plural}-{what}" for plural in kinds for what in ("view", "events")} <= set(handlers)
    for plural in kinds:
        body = kopf.Body({"metadata": {"name": f"a-{plural}", "namespace": "backup"}})
        await handlers[f"{plural}-view"].fn(body=body)
        await handlers[f"{plural}-events"].fn(event={"type": "DELETED", "object": body})
    other_pod = kopf.Body({"metadata": {"name": "web", "namespace": "shop"}})
    await handlers["pods-view"].fn(body=other_pod)  # watched namespaces' pods, but not the agents'
    await handlers["pods-events"].fn(event={"type": None, "object": other_pod})
    [beacon] = [handler for handler in handlers.values() if handler.id not in
                {f"{plural}-{what}" for plural in kinds for what in ("view", "events")}]
    assert beacon.value == BEACON and beacon.selector.any_name == "customresourcedefinitions"
    await beacon.fn()
    assert view.told == [step for plural in kinds for step in ((plural, None, f"a-{plural}"),
                                                                (f"{plural} event", "DELETED", f"a-{plural}"))] + [
        ("view", "complete", "")]


def test_only_the_operators_token_secrets_and_its_agents_pods_are_watched() -> None:
    selected = started_settings(ViewOf(IN_CLUSTER)).watching
    assert selected.label_selectors["", "v1", "secrets"] == "app.kubernetes.io/managed-by=restic-manager"
    assert selected.field_selectors["", "v1", "pods"] == "spec.serviceAccountName=agent"
    assert ("", "v1", "pods") not in started_settings().watching.field_selectors


class Cycle:
    def __init__(self) -> None:
        self.me = self


@pytest.fixture
def tuning() -> Iterator[GCTuning]:
    tuning = GCTuning()
    tuning.install()
    yield tuning
    tuning.uninstall()


def test_what_survives_a_full_collection_is_frozen(tuning: GCTuning) -> None:
    survivor = Cycle()
    gc.collect(2)
    frozen = gc.get_freeze_count()
    assert frozen > 0 and not any(o is survivor for o in gc.get_objects())  # no generation holds it
    gc.collect(2)
    assert gc.get_freeze_count() >= frozen


def test_a_cycle_that_dies_frozen_is_freed_by_the_sweep(tuning: GCTuning) -> None:
    cycle = Cycle()
    alive = weakref.ref(cycle)
    gc.collect(2)  # the cycle survives, alive, and is frozen
    del cycle
    gc.collect(2)
    assert alive() is not None  # frozen: the automatic collections no longer see it
    tuning.sweep()
    assert alive() is None


def test_a_slow_full_collection_is_logged(tuning: GCTuning, monkeypatch: pytest.MonkeyPatch,
                                          caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(gc_tuning, "SLOW_COLLECTION", 0.0)
    gc.collect(1)  # a young collection says nothing
    assert not caplog.records
    gc.collect(2)
    [record] = caplog.records
    assert record.levelname == "WARNING" and "full garbage collection held the event loop" in record.message
