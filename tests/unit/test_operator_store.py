"""The operator's view of the cluster: watch events in order, and the answers of its own creates."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from restic_manager.operator.kube.api import ObjectKey, format_time, parse_time
from restic_manager.operator.kube.cache import Collection, Repository, Schedule, Store


def body(name: str, rv: int, *, uid: str | None = None, generation: int = 1, namespace: str = "ns") -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": namespace, "uid": uid or f"uid-{name}", "resourceVersion": str(rv),
                     "generation": generation, "creationTimestamp": "2026-01-01T00:00:00Z"},
        "spec": {"agent": "web-01", "repository": "r", "schedule": "0 2 * * *", "template": {"type": "prune"}},
    }


def schedules() -> Collection[Schedule]:
    return Collection(Schedule.from_body)


def test_each_event_is_taken_as_it_comes_but_the_version_the_view_holds() -> None:
    collection = schedules()
    assert collection.upsert(body("a", 5, generation=2)) is not None
    assert collection.upsert(body("a", 5, generation=2)) is None  # the same version again: no change
    # resourceVersions are opaque: a watch stream is in order, whatever their digits say.
    change = collection.upsert(body("a", 4, generation=3))
    assert change is not None and change.old.generation == 2  # type: ignore[union-attr]
    assert collection.get(ObjectKey("ns", "a")).generation == 3  # type: ignore[union-attr]


def test_a_creates_answer_is_taken_only_if_the_watch_has_not_brought_the_object() -> None:
    collection = schedules()
    assert collection.created(body("a", 5)) is not None  # before its watch event
    assert collection.upsert(body("a", 5)) is None  # the event's echo of it
    collection.upsert(body("b", 7, generation=2))  # the watch was first, with a later version...
    assert collection.created(body("b", 6)) is None  # ...which the create's answer does not undo
    assert collection.get(ObjectKey("ns", "b")).generation == 2  # type: ignore[union-attr]
    collection.upsert(body("c", 3, uid="before"))
    assert collection.created(body("c", 8, uid="made")) is not None  # another object of that name


def test_a_recreated_object_replaces_the_old_one_whatever_its_version() -> None:
    collection = schedules()
    collection.upsert(body("a", 9, uid="first"))
    change = collection.upsert(body("a", 3, uid="second"))
    assert change is not None and change.old.uid == "first" and change.new.uid == "second"  # type: ignore[union-attr]


def test_a_delete_of_another_incarnation_is_ignored() -> None:
    collection = schedules()
    collection.upsert(body("a", 9, uid="second"))
    assert collection.delete(body("a", 10, uid="first")) is None
    assert collection.get(ObjectKey("ns", "a")) is not None


def test_jobs_are_found_by_schedule_uid_and_agent() -> None:
    store = Store()
    for name, agent, uid in (("j1", "web-01", "s1"), ("j2", "web-02", "s1"), ("j3", "web-01", "s2")):
        store.jobs.upsert({"metadata": {"name": name, "namespace": "ns", "uid": f"u-{name}", "resourceVersion": "1"},
                           "spec": {"agent": agent, "repository": "r", "type": "prune",
                                    "scheduleRef": {"name": "s", "uid": uid}, "scheduledAt": "2026-01-01T00:00:00Z"}})
    assert sorted(j.key.name for j in store.jobs_of_schedule("s1")) == ["j1", "j2"]
    assert [j.key.name for j in store.jobs_of_schedule("s1", agent="web-01")] == ["j1"]
    assert sorted(j.key.name for j in store.jobs_on_agent(ObjectKey("ns", "web-01"))) == ["j1", "j3"]
    assert store.jobs.get(ObjectKey("ns", "j1")).scheduled_at == parse_time("2026-01-01T00:00:00Z")  # type: ignore[union-attr]


def job_body(name: str, rv: int, *, schedule_uid: str | None, uid: str | None = None,
             agent: str = "web-01") -> dict[str, Any]:
    spec: dict[str, Any] = {"agent": agent, "repository": "r", "type": "prune"}
    if schedule_uid is not None:
        spec.update(scheduleRef={"name": "s", "uid": schedule_uid}, scheduledAt="2026-01-01T00:00:00Z")
    return {"metadata": {"name": name, "namespace": "ns", "uid": uid or f"u-{name}", "resourceVersion": str(rv)},
            "spec": spec}


def test_a_schedules_jobs_are_listed_in_the_order_they_were_first_seen() -> None:
    store = Store()
    for rv, name in enumerate(("c", "a", "b"), start=1):
        store.jobs.upsert(job_body(name, rv, schedule_uid="s1"))
    store.jobs.upsert(job_body("a", 9, schedule_uid="s1"))  # a newer version keeps its place
    assert [j.key.name for j in store.jobs_of_schedule("s1")] == ["c", "a", "b"]


def test_a_job_leaves_its_schedules_list_when_deleted() -> None:
    store = Store()
    store.jobs.upsert(job_body("deleted", 1, schedule_uid="s1"))
    store.jobs.upsert(job_body("kept", 3, schedule_uid="s1"))
    store.jobs.delete(job_body("deleted", 4, schedule_uid="s1"))
    assert [j.key.name for j in store.jobs_of_schedule("s1")] == ["kept"]


def test_a_recreated_job_of_another_schedule_moves_to_that_schedules_list() -> None:
    store = Store()
    store.jobs.upsert(job_body("j", 5, schedule_uid="s1", uid="first"))
    store.jobs.upsert(job_body("j", 2, schedule_uid="s2", uid="second"))
    assert store.jobs_of_schedule("s1") == []
    assert [j.uid for j in store.jobs_of_schedule("s2")] == ["second"]


# Operations on one jobs collection: (upsert | delete | created, name, resourceVersion, schedule uid, agent).
OPERATIONS = st.lists(st.tuples(
    st.sampled_from(["upsert", "delete", "created"]), st.sampled_from(["a", "b", "c", "d"]),
    st.integers(1, 30), st.sampled_from(["s1", "s2", None]), st.sampled_from(["web-01", "web-02"]),
), max_size=30)


@settings(max_examples=200, deadline=None)
@given(OPERATIONS)
def test_jobs_of_a_schedule_are_always_those_a_full_scan_finds(operations: list[tuple[Any, ...]]) -> None:
    store = Store()
    for operation, name, rv, schedule_uid, agent in operations:
        body_ = job_body(name, rv, schedule_uid=schedule_uid, uid=f"u-{name}-{schedule_uid}", agent=agent)
        if operation == "upsert":
            store.jobs.upsert(body_)
        elif operation == "delete":
            store.jobs.delete(body_)
        else:
            store.jobs.created(body_)
    for uid in ("s1", "s2"):
        for agent in (None, "web-01", "web-02"):
            scanned = [job for job in store.jobs if job.schedule_ref is not None and job.schedule_ref.uid == uid
                       and agent in (None, job.agent)]
            assert sorted(store.jobs_of_schedule(uid, agent=agent), key=str) == sorted(scanned, key=str)


def test_a_repository_is_kept_as_its_spec_says() -> None:
    store = Store()
    spec = {"url": "s3:host/bucket", "passwordSecretRef": {"name": "pw", "key": "password"}}
    store.repositories.upsert({"metadata": {"name": "offsite", "namespace": "ns", "uid": "u", "resourceVersion": "2"},
                               "spec": spec})
    spec["url"] = "changed"  # the stored copy is its own
    repository = store.repositories.get(ObjectKey("ns", "offsite"))
    assert repository == Repository(ObjectKey("ns", "offsite"), "u", "2", {
        "url": "s3:host/bucket", "passwordSecretRef": {"name": "pw", "key": "password"}})


@given(st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30),
                    timezones=st.sampled_from([timezone.utc, timezone(timedelta(hours=-7, minutes=-30))])))
def test_times_are_written_in_utc_to_the_second_as_kubernetes_writes_them(moment: datetime) -> None:
    text = format_time(moment)
    assert len(text) == 20 and text.endswith("Z")
    assert parse_time(text) == moment.astimezone(timezone.utc).replace(microsecond=0)
