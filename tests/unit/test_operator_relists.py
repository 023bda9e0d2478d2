"""A watch that lists again after it was gone (410): the objects its listing does not bring
are read, and leave the view only if the apiserver says they are gone (operator/kube/relists.py,
Controller.on_event)."""

from __future__ import annotations

from typing import Any

import pytest

from restic_manager.operator.controller import Controller
from restic_manager.operator.controller.wiring import RELIST_SETTLE
from restic_manager.operator.kube.api import ObjectKey
from restic_manager.operator.kube.client import KubeError
from restic_manager.operator.kube.relists import Relists
from support.operator_fakes import FakeKube, complete_view


def key(name: str, namespace: str = "ns") -> ObjectKey:
    return ObjectKey(namespace, name)


def test_the_startup_listing_and_new_objects_begin_no_relisting() -> None:
    relists = Relists(namespaced=True)
    view = [key("a"), key("b")]
    assert relists.event("resticjobs", None, key("a"), view) is None  # the startup listing's
    assert relists.event("resticjobs", None, key("b"), view) is None
    assert relists.event("resticjobs", "ADDED", key("c"), view) is None  # created since
    assert relists.event("resticjobs", "MODIFIED", key("a"), view) is None
    assert relists.take(("resticjobs", "ns")) == set()


def test_a_listing_again_suspects_the_objects_of_its_watch_it_has_not_brought() -> None:
    relists = Relists(namespaced=True)
    view = [key("a"), key("b"), key("c"), key("x", "other")]
    for one in view:
        relists.event("resticjobs", None, one, view)
    assert relists.event("resticjobs", None, key("a"), view) == ("resticjobs", "ns")  # a second listing
    assert relists.event("resticjobs", None, key("b"), view) is None  # the same one, under way
    relists.observed("resticjobs", key("b"))  # brought
    # Another namespace has a watch of its own; the other kinds are not concerned.
    assert relists.take(("resticjobs", "ns")) == {key("c")}
    assert relists.take(("resticjobs", "ns")) == set()
    relists.give_back(("resticjobs", "ns"), [key("c")])
    assert relists.take(("resticjobs", "ns")) == {key("c")}


def test_a_watch_of_every_namespace_lists_them_all_again() -> None:
    relists = Relists(namespaced=False)
    view = [key("a"), key("b", "other")]
    for one in view:
        relists.event("schedules", None, one, view)
    assert relists.event("schedules", None, key("a"), view) == ("schedules", None)
    assert relists.take(("schedules", None)) == {key("b", "other")}


def test_a_deleted_object_recreated_under_its_name_is_new_again() -> None:
    relists = Relists(namespaced=True)
    relists.event("agents", None, key("a"), [key("a")])
    relists.event("agents", "DELETED", key("a"), [])
    assert relists.event("agents", None, key("a"), [key("a")]) is None


def job(name: str, uid: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "ns", "uid": uid, "resourceVersion": "1"},
            "spec": {"agent": "web-01", "repository": "offsite", "type": "prune"}}


async def test_a_job_deleted_while_the_watch_was_gone_leaves_the_view_and_the_others_stay() -> None:
    kube = FakeKube()
    controller = Controller(kube=kube, namespaces=["ns"])  # type: ignore[arg-type]
    jobs = {name: job(name, f"uid-{name}") for name in ("kept", "listed", "gone", "recreated")}
    complete_view(controller, *(("resticjobs", body) for body in jobs.values()))
    for body in jobs.values():
        controller.on_event("resticjobs", None, body)  # kopf's event handlers see the startup listing
    kube.objects["resticjobs", key("kept")] = jobs["kept"]  # there still, its listing event not in yet
    kube.objects["resticjobs", key("recreated")] = job("recreated", "uid-again")

    marked: list[tuple[Any, float]] = []
    controller.relist_checks.mark = lambda scope, delay=0.0: marked.append((scope, delay))  # type: ignore[method-assign]
    controller.on_event("resticjobs", None, jobs["listed"])  # the watch lists again
    controller.observe("resticjobs", None, jobs["listed"])
    assert marked == [(("resticjobs", "ns"), RELIST_SETTLE)]  # read once the listing has had its time
    await controller._check_relisted(("resticjobs", "ns"))
    assert {job.key.name: job.uid for job in controller.store.jobs} == {
        "kept": "uid-kept", "listed": "uid-listed", "recreated": "uid-again"}
    assert sorted(one.name for one in kube.gets) == ["gone", "kept", "recreated"]  # not the one it brought


async def test_a_read_the_apiserver_does_not_answer_is_tried_again_with_what_was_left() -> None:
    kube = FakeKube()
    controller = Controller(kube=kube, namespaces=None)  # type: ignore[arg-type]
    jobs = [job(name, f"uid-{name}") for name in ("a", "b")]
    complete_view(controller, *(("resticjobs", body) for body in jobs))
    for body in jobs:
        controller.on_event("resticjobs", None, body)
    controller.on_event("resticjobs", None, jobs[0])

    async def unanswered(plural: str, at: ObjectKey) -> dict[str, Any]:
        raise KubeError(f"get {plural} {at}: 503", status=503)

    kube.get = unanswered  # type: ignore[method-assign]
    with pytest.raises(KubeError):
        await controller._check_relisted(("resticjobs", None))
    assert controller.relists.take(("resticjobs", None)) == {key("b")}
    assert len(controller.store.jobs.objects) == 2

