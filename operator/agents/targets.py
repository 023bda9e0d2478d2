"""Which Agents a Schedule targets, and the index from each Agent to its Schedules.

A Schedule names one Agent (``spec.agent``) or selects Agents by label
(``spec.agentSelector``, with Kubernetes label-selector semantics); either way only Agents
of the Schedule's own namespace count, because the namespace is the tenant boundary.
Pure: the operator feeds the index on every Agent and Schedule change and pushes to the
agents whose set of schedules it reports changed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple, TypeVar

from restic_manager.operator.kube.api import ObjectKey
from restic_manager.operator.kube.cache import Agent, Schedule


class SelectorError(ValueError):
    """A label selector that cannot be evaluated; ``str()`` names the field."""


def selector_matches(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    """Kubernetes label-selector semantics: every term must hold; an empty selector matches all."""
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for index, requirement in enumerate(selector.get("matchExpressions") or ()):
        key, operator = requirement.get("key"), requirement.get("operator")
        values = requirement.get("values") or []
        where = f"agentSelector.matchExpressions[{index}]"
        if operator in ("In", "NotIn") and not values:
            raise SelectorError(f"{where}: operator {operator} needs at least one value")
        if operator in ("Exists", "DoesNotExist") and values:
            raise SelectorError(f"{where}: operator {operator} takes no values")
        if operator == "In":
            ok = key in labels and labels[key] in values
        elif operator == "NotIn":
            ok = key not in labels or labels[key] not in values
        elif operator == "Exists":
            ok = key in labels
        elif operator == "DoesNotExist":
            ok = key not in labels
        else:
            raise SelectorError(f"{where}: unknown operator {operator!r}; use In, NotIn, Exists or DoesNotExist")
        if not ok:
            return False
    return True


def targets(schedule: Schedule, agent: Agent) -> bool:
    """Whether ``schedule`` runs on ``agent`` (an invalid selector targets nothing)."""
    if agent.key.namespace != schedule.key.namespace or agent.deleting or schedule.deleting:
        return False
    if schedule.agent is not None:
        return agent.key.name == schedule.agent
    if schedule.agent_selector is None:
        return False
    try:
        return selector_matches(schedule.agent_selector, agent.labels)
    except SelectorError:
        return False


def selector_problem(schedule: Schedule) -> str | None:
    """Why the Schedule's selector cannot be evaluated, or None."""
    if schedule.agent_selector is None:
        return None
    try:
        selector_matches(schedule.agent_selector, {})
    except SelectorError as error:
        return f"Schedule {schedule.key}: spec.{error}"
    return None


class Moved(NamedTuple):
    """What an Agent change did to the index: the Schedules it joined and those it left."""

    joined: set[ObjectKey]
    left: set[ObjectKey]

    def __bool__(self) -> bool:
        """Whether the Agent's set of schedules changed (so it needs a new ``schedule.set``)."""
        return bool(self.joined or self.left)


class Index:
    """Agent → Schedules and Schedule → Agents, kept in step with the objects.

    ``put_schedule`` and ``remove_schedule`` return the Agents whose schedule sets may have
    changed, i.e. the agents a new ``schedule.set`` must go to; ``put_agent`` and
    ``remove_agent`` return the Schedules the Agent joined or left (whose status lists their
    agents). A change looks only at its candidates: for an Agent, the Schedules naming it
    and the selecting Schedules of its namespace; for a Schedule, the Agent it names or the
    Agents of its namespace.
    """

    def __init__(self) -> None:
        self._agents: dict[str, dict[ObjectKey, Agent]] = {}  # by namespace
        self._schedules: dict[ObjectKey, Schedule] = {}
        self._naming: dict[ObjectKey, set[ObjectKey]] = {}  # Agent key → Schedules whose spec.agent names it
        self._selecting: dict[str, set[ObjectKey]] = {}  # namespace → Schedules with spec.agentSelector
        self._by_agent: dict[ObjectKey, set[ObjectKey]] = {}
        self._by_schedule: dict[ObjectKey, set[ObjectKey]] = {}

    def schedules_of(self, agent: ObjectKey) -> list[Schedule]:
        return sorted(
            (self._schedules[key] for key in self._by_agent.get(agent, ())), key=lambda s: s.key
        )

    def agents_of(self, schedule: ObjectKey) -> list[ObjectKey]:
        return sorted(self._by_schedule.get(schedule, ()))

    def put_schedule(self, schedule: Schedule) -> set[ObjectKey]:
        old = self._schedules.get(schedule.key)
        if old is not None:
            self._unregister(old)
        old_targets = self._by_schedule.get(schedule.key, set())
        self._schedules[schedule.key] = schedule
        self._register(schedule)
        new_targets = {agent.key for agent in self._candidate_agents(schedule) if targets(schedule, agent)}
        self._link(schedule.key, new_targets)
        if old is not None and _same_wire_entry(old, schedule):
            return old_targets ^ new_targets
        return old_targets | new_targets

    def remove_schedule(self, key: ObjectKey) -> set[ObjectKey]:
        old = self._schedules.pop(key, None)
        if old is not None:
            self._unregister(old)
        old_targets = self._by_schedule.get(key, set())
        self._link(key, set())
        self._by_schedule.pop(key, None)
        return old_targets

    def put_agent(self, agent: Agent) -> Moved:
        self._agents.setdefault(agent.key.namespace, {})[agent.key] = agent
        before = self._by_agent.get(agent.key, set())
        after = {schedule.key for schedule in self._candidate_schedules(agent) if targets(schedule, agent)}
        for key in before - after:
            self._by_schedule[key].discard(agent.key)
        for key in after - before:
            self._by_schedule.setdefault(key, set()).add(agent.key)
        self._by_agent[agent.key] = after
        return Moved(joined=after - before, left=before - after)

    def remove_agent(self, key: ObjectKey) -> Moved:
        in_namespace = self._agents.get(key.namespace, {})
        in_namespace.pop(key, None)
        if not in_namespace:
            self._agents.pop(key.namespace, None)
        left = self._by_agent.pop(key, set())
        for schedule in left:
            self._by_schedule[schedule].discard(key)
        return Moved(joined=set(), left=left)

    def _link(self, schedule: ObjectKey, agents: set[ObjectKey]) -> None:
        for agent in self._by_schedule.get(schedule, set()) - agents:
            self._by_agent[agent].discard(schedule)
        for agent in agents:
            self._by_agent.setdefault(agent, set()).add(schedule)
        self._by_schedule[schedule] = set(agents)

    def _candidate_agents(self, schedule: Schedule) -> Iterable[Agent]:
        in_namespace = self._agents.get(schedule.key.namespace, {})
        if schedule.agent is not None:
            named = in_namespace.get(ObjectKey(schedule.key.namespace, schedule.agent))
            return [named] if named is not None else []
        return in_namespace.values() if schedule.agent_selector is not None else []

    def _candidate_schedules(self, agent: Agent) -> Iterable[Schedule]:
        keys = self._naming.get(agent.key, set()) | self._selecting.get(agent.key.namespace, set())
        return [self._schedules[key] for key in keys]

    def _register(self, schedule: Schedule) -> None:
        namespace = schedule.key.namespace
        if schedule.agent is not None:
            self._naming.setdefault(ObjectKey(namespace, schedule.agent), set()).add(schedule.key)
        elif schedule.agent_selector is not None:
            self._selecting.setdefault(namespace, set()).add(schedule.key)

    def _unregister(self, schedule: Schedule) -> None:
        namespace = schedule.key.namespace
        if schedule.agent is not None:
            _discard(self._naming, ObjectKey(namespace, schedule.agent), schedule.key)
        elif schedule.agent_selector is not None:
            _discard(self._selecting, namespace, schedule.key)


G = TypeVar("G", str, ObjectKey)


def _discard(groups: dict[G, set[ObjectKey]], group: G, key: ObjectKey) -> None:
    members = groups.get(group)
    if members is not None:
        members.discard(key)
        if not members:
            del groups[group]


def _same_wire_entry(old: Schedule, new: Schedule) -> bool:
    """Whether the agents' view of the Schedule (its schedule.set entry) is unchanged."""
    return (old.uid, old.generation, old.expression, old.time_zone, old.suspend) == (
        new.uid, new.generation, new.expression, new.time_zone, new.suspend
    )
