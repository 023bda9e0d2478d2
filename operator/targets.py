"""Which Agents a Schedule targets, and the index from each Agent to its Schedules.

A Schedule names one Agent (``spec.agent``) or selects Agents by label
(``spec.agentSelector``, with Kubernetes label-selector semantics); either way only Agents
of the Schedule's own namespace count, because the namespace is the tenant boundary.
Pure: the operator feeds the index on every Agent and Schedule change and pushes to the
agents whose set of schedules it reports changed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from restic_manager.operator.store import Agent, ObjectKey, Schedule


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


class Index:
    """Agent → Schedules and Schedule → Agents, kept in step with the objects.

    ``put_*`` and ``remove_*`` return the Agents whose schedule sets may have changed, i.e.
    the agents a new ``schedule.set`` must go to.
    """

    def __init__(self) -> None:
        self._agents: dict[ObjectKey, Agent] = {}
        self._schedules: dict[ObjectKey, Schedule] = {}
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
        old_targets = self._by_schedule.get(schedule.key, set())
        self._schedules[schedule.key] = schedule
        new_targets = {
            agent.key for agent in self._agents_in(schedule.key.namespace) if targets(schedule, agent)
        }
        self._link(schedule.key, new_targets)
        if old is not None and _same_wire_entry(old, schedule):
            return old_targets ^ new_targets
        return old_targets | new_targets

    def remove_schedule(self, key: ObjectKey) -> set[ObjectKey]:
        self._schedules.pop(key, None)
        old_targets = self._by_schedule.get(key, set())
        self._link(key, set())
        self._by_schedule.pop(key, None)
        return old_targets

    def put_agent(self, agent: Agent) -> set[ObjectKey]:
        self._agents[agent.key] = agent
        before = set(self._by_agent.get(agent.key, ()))
        after = {
            schedule.key for schedule in self._schedules_in(agent.key.namespace) if targets(schedule, agent)
        }
        for key in before - after:
            self._by_schedule[key].discard(agent.key)
        for key in after - before:
            self._by_schedule.setdefault(key, set()).add(agent.key)
        self._by_agent[agent.key] = after
        return {agent.key} if before != after else set()

    def remove_agent(self, key: ObjectKey) -> set[ObjectKey]:
        self._agents.pop(key, None)
        for schedule in self._by_agent.pop(key, set()):
            self._by_schedule[schedule].discard(key)
        return set()

    def _link(self, schedule: ObjectKey, agents: set[ObjectKey]) -> None:
        for agent in self._by_schedule.get(schedule, set()) - agents:
            self._by_agent[agent].discard(schedule)
        for agent in agents:
            self._by_agent.setdefault(agent, set()).add(schedule)
        self._by_schedule[schedule] = set(agents)

    def _agents_in(self, namespace: str) -> Iterable[Agent]:
        return (agent for key, agent in self._agents.items() if key.namespace == namespace)

    def _schedules_in(self, namespace: str) -> Iterable[Schedule]:
        return (s for key, s in self._schedules.items() if key.namespace == namespace)


def _same_wire_entry(old: Schedule, new: Schedule) -> bool:
    """Whether the agents' view of the Schedule (its schedule.set entry) is unchanged."""
    return (old.uid, old.generation, old.expression, old.time_zone, old.suspend) == (
        new.uid, new.generation, new.expression, new.time_zone, new.suspend
    )
