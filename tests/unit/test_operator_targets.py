"""Which Agents a Schedule targets, and the Agent → Schedules index that decides pushes."""

from __future__ import annotations

from typing import Any

import pytest

from restic_manager.operator.agents.targets import Index, Moved, SelectorError, selector_matches, targets
from restic_manager.operator.kube.api import ObjectKey
from restic_manager.operator.kube.cache import Agent, Schedule

WEB = {"role": "web", "zone": "a"}


@pytest.mark.parametrize(
    ("selector", "labels", "expected"),
    [
        ({}, WEB, True),  # an empty selector matches everything, as in Kubernetes
        ({"matchLabels": {"role": "web"}}, WEB, True),
        ({"matchLabels": {"role": "db"}}, WEB, False),
        ({"matchLabels": {"role": "web", "zone": "b"}}, WEB, False),
        ({"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a", "b"]}]}, WEB, True),
        ({"matchExpressions": [{"key": "zone", "operator": "In", "values": ["b"]}]}, WEB, False),
        ({"matchExpressions": [{"key": "tier", "operator": "In", "values": ["x"]}]}, WEB, False),
        ({"matchExpressions": [{"key": "zone", "operator": "NotIn", "values": ["b"]}]}, WEB, True),
        ({"matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["x"]}]}, WEB, True),
        ({"matchExpressions": [{"key": "zone", "operator": "NotIn", "values": ["a"]}]}, WEB, False),
        ({"matchExpressions": [{"key": "role", "operator": "Exists"}]}, WEB, True),
        ({"matchExpressions": [{"key": "tier", "operator": "Exists"}]}, WEB, False),
        ({"matchExpressions": [{"key": "tier", "operator": "DoesNotExist"}]}, WEB, True),
        ({"matchExpressions": [{"key": "role", "operator": "DoesNotExist"}]}, WEB, False),
        ({"matchLabels": {"role": "web"},
          "matchExpressions": [{"key": "zone", "operator": "In", "values": ["b"]}]}, WEB, False),
    ],
)
def test_label_selector_semantics(selector: dict[str, Any], labels: dict[str, str], expected: bool) -> None:
    assert selector_matches(selector, labels) is expected


@pytest.mark.parametrize(
    ("requirement", "complaint"),
    [
        ({"key": "zone", "operator": "In", "values": []}, "needs at least one value"),
        ({"key": "zone", "operator": "Exists", "values": ["a"]}, "takes no values"),
        ({"key": "zone", "operator": "Near"}, "unknown operator 'Near'"),
    ],
)
def test_invalid_selector_names_the_requirement(requirement: dict[str, Any], complaint: str) -> None:
    with pytest.raises(SelectorError, match=rf"matchExpressions\[0\].*{complaint}"):
        selector_matches({"matchExpressions": [requirement]}, WEB)


def agent(name: str, labels: dict[str, str] | None = None, *, namespace: str = "ns", rv: int = 1,
          deleting: bool = False) -> Agent:
    meta: dict[str, Any] = {"name": name, "namespace": namespace, "uid": f"uid-{namespace}-{name}",
                            "resourceVersion": str(rv), "labels": labels or {}}
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    return Agent.from_body({"metadata": meta})


def schedule(name: str, *, namespace: str = "ns", generation: int = 1, rv: int = 1, **spec: Any) -> Schedule:
    return Schedule.from_body({
        "metadata": {"name": name, "namespace": namespace, "uid": f"uid-{name}", "generation": generation,
                     "resourceVersion": str(rv), "creationTimestamp": "2026-01-01T00:00:00Z"},
        "spec": {"repository": "repo", "schedule": "0 2 * * *", "template": {"type": "prune"}, **spec},
    })


def test_a_named_agent_is_targeted_only_in_the_schedules_namespace() -> None:
    nightly = schedule("nightly", agent="web-01")
    assert targets(nightly, agent("web-01"))
    assert not targets(nightly, agent("web-02"))
    assert not targets(nightly, agent("web-01", namespace="other"))


def test_a_selector_never_reaches_another_namespace() -> None:
    nightly = schedule("nightly", agentSelector={"matchLabels": {"role": "web"}})
    assert targets(nightly, agent("web-01", WEB))
    assert not targets(nightly, agent("web-01", WEB, namespace="other"))


def test_an_agent_being_deleted_is_not_targeted() -> None:
    assert not targets(schedule("nightly", agent="web-01"), agent("web-01", deleting=True))


def test_an_invalid_selector_targets_nothing() -> None:
    broken = schedule("nightly", agentSelector={"matchExpressions": [{"key": "x", "operator": "In"}]})
    assert not targets(broken, agent("web-01", WEB))


def key(name: str, namespace: str = "ns") -> ObjectKey:
    return ObjectKey(namespace, name)


def fleet() -> Index:
    index = Index()
    index.put_agent(agent("web-01", WEB))
    index.put_agent(agent("web-02", {"role": "web", "zone": "b"}))
    index.put_agent(agent("db-01", {"role": "db"}))
    return index


def test_a_new_schedule_is_pushed_to_every_agent_it_targets() -> None:
    index = fleet()
    affected = index.put_schedule(schedule("web", agentSelector={"matchLabels": {"role": "web"}}))
    assert affected == {key("web-01"), key("web-02")}
    assert [s.key.name for s in index.schedules_of(key("web-01"))] == ["web"]
    assert index.agents_of(key("web")) == [key("web-01"), key("web-02")]


def test_a_new_generation_is_pushed_to_all_its_agents() -> None:
    index = fleet()
    index.put_schedule(schedule("web", agentSelector={"matchLabels": {"role": "web"}}))
    edited = schedule("web", generation=2, rv=2, agentSelector={"matchLabels": {"role": "web"}})
    assert index.put_schedule(edited) == {key("web-01"), key("web-02")}


def test_a_status_only_update_pushes_nothing() -> None:
    index = fleet()
    index.put_schedule(schedule("web", agentSelector={"matchLabels": {"role": "web"}}))
    again = schedule("web", rv=7, agentSelector={"matchLabels": {"role": "web"}})
    assert index.put_schedule(again) == set()


def test_narrowing_a_selector_pushes_to_the_agents_that_lost_it() -> None:
    index = fleet()
    index.put_schedule(schedule("web", agentSelector={"matchLabels": {"role": "web"}}))
    narrowed = schedule("web", generation=2, agentSelector={"matchLabels": {"zone": "a"}})
    assert index.put_schedule(narrowed) == {key("web-01"), key("web-02")}
    assert index.schedules_of(key("web-02")) == []


def test_relabelling_an_agent_moves_it_between_schedules() -> None:
    index = fleet()
    index.put_schedule(schedule("web", agentSelector={"matchLabels": {"role": "web"}}))
    assert index.put_agent(agent("db-01", {"role": "web"}, rv=2)) == Moved(joined={key("web")}, left=set())
    assert key("db-01") in index.agents_of(key("web"))
    assert index.put_agent(agent("db-01", {"role": "db"}, rv=3)) == Moved(joined=set(), left={key("web")})
    assert key("db-01") not in index.agents_of(key("web"))


def test_a_label_change_that_keeps_membership_pushes_nothing() -> None:
    index = fleet()
    index.put_schedule(schedule("web", agentSelector={"matchLabels": {"role": "web"}}))
    moved = index.put_agent(agent("web-01", {**WEB, "owner": "ops"}, rv=2))
    assert moved == Moved(joined=set(), left=set()) and not moved


def test_an_agent_created_after_its_schedule_is_indexed() -> None:
    index = Index()
    index.put_schedule(schedule("nightly", agent="web-01"))
    assert index.agents_of(key("nightly")) == []
    assert index.put_agent(agent("web-01")) == Moved(joined={key("nightly")}, left=set())
    assert [s.key.name for s in index.schedules_of(key("web-01"))] == ["nightly"]


def test_deleting_a_schedule_pushes_to_its_former_agents() -> None:
    index = fleet()
    index.put_schedule(schedule("web", agentSelector={"matchLabels": {"role": "web"}}))
    assert index.remove_schedule(key("web")) == {key("web-01"), key("web-02")}
    assert index.schedules_of(key("web-01")) == []


def test_a_schedule_being_deleted_is_dropped_from_its_agents_sets() -> None:
    index = fleet()
    index.put_schedule(schedule("nightly", agent="web-01"))
    going = Schedule.from_body({
        "metadata": {"name": "nightly", "namespace": "ns", "uid": "uid-nightly", "generation": 1,
                     "resourceVersion": "9", "creationTimestamp": "2026-01-01T00:00:00Z",
                     "deletionTimestamp": "2026-01-02T00:00:00Z"},
        "spec": {"agent": "web-01", "repository": "repo", "schedule": "0 2 * * *", "template": {"type": "prune"}},
    })
    assert index.put_schedule(going) == {key("web-01")}
    assert index.schedules_of(key("web-01")) == []


def test_removing_an_agent_unlinks_it() -> None:
    index = fleet()
    index.put_schedule(schedule("web", agentSelector={"matchLabels": {"role": "web"}}))
    assert index.remove_agent(key("web-01")) == Moved(joined=set(), left={key("web")})
    assert index.agents_of(key("web")) == [key("web-02")]


def test_an_agent_change_reports_only_the_schedules_it_joined_or_left() -> None:
    index = fleet()
    index.put_schedule(schedule("web", agentSelector={"matchLabels": {"role": "web"}}))
    index.put_schedule(schedule("db", agentSelector={"matchLabels": {"role": "db"}}))
    index.put_schedule(schedule("db-01-only", agent="db-01"))
    index.put_schedule(schedule("nobodys", agent="gone"))
    moved = index.put_agent(agent("db-01", {"role": "web"}, rv=2))
    assert moved == Moved(joined={key("web")}, left={key("db")})
    assert [s.key.name for s in index.schedules_of(key("db-01"))] == ["db-01-only", "web"]


def test_a_schedule_renamed_to_another_agent_is_no_candidate_of_the_first() -> None:
    index = fleet()
    index.put_schedule(schedule("nightly", agent="web-01"))
    assert index.put_schedule(schedule("nightly", generation=2, agent="web-02")) == {key("web-01"), key("web-02")}
    assert not index.put_agent(agent("web-01", WEB, rv=2))
    assert index.schedules_of(key("web-01")) == []
    assert index.put_schedule(schedule("nightly", generation=3, agentSelector={"matchLabels": {"zone": "a"}})) == {
        key("web-01"), key("web-02")}
    assert index.agents_of(key("nightly")) == [key("web-01")]
    index.remove_schedule(key("nightly"))
    assert not index.put_agent(agent("web-01", WEB, rv=3))  # gone from every candidate group
    assert index.schedules_of(key("web-01")) == []
