"""Whether a Schedule's spec can run, with one message per problem naming the field.

The same function answers the validating admission webhook (so ``kubectl apply`` of a bad
Schedule fails with these messages) and the controller (so a Schedule that got past an
unreachable webhook is marked ``Applied=False`` with reason ``Invalid`` and never reaches
an agent). The CRD's schema and CEL rules check shapes; this checks meaning: the cron
expression, the time zone, the job parameters as the agent will read them, that names
are names of objects in the Schedule's own namespace, and the notifications (notify.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import re

import msgspec

from restic_manager import cron, protocol
from restic_manager.operator import notify
from restic_manager.operator.agents.targets import SelectorError, selector_matches

_TYPES = ", ".join(t.value for t in protocol.JobType)
_SECRET_KEY = re.compile(r"[-._a-zA-Z0-9]{1,253}")
_VIAS = [via.value for via in notify.Via]    # lists: a JSON value need not be hashable
_KINDS = [kind.value for kind in notify.Kind]


def schedule_problems(spec: Mapping[str, Any], *, schedule_id: str) -> list[str]:
    """Everything wrong with the Schedule ``schedule_id`` (namespace/name), or nothing."""
    problems: list[str] = []
    agent, selector = spec.get("agent"), spec.get("agentSelector")
    if (agent is None) == (selector is None):
        problems.append("spec: exactly one of agent and agentSelector must be set")
    if agent is not None:
        problems += _name_problems("spec.agent", agent, kind="Agent")
    if isinstance(selector, Mapping):
        try:
            selector_matches(selector, {})
        except SelectorError as error:
            problems.append(f"spec.{error}")
    problems += _name_problems("spec.repository", spec.get("repository"), kind="Repository")
    problems += _cron_problems(spec.get("schedule"), schedule_id)
    problems += _zone_problems(spec.get("timeZone", "UTC"))
    problems += _template_problems(spec.get("template"))
    problems += _notification_problems(spec.get("notifications"))
    return problems


def job_problems(spec: Mapping[str, Any]) -> list[str]:
    """What makes a ResticJob's references unresolvable, for ever: its agent or repository is
    not a name an object can have."""
    return (_name_problems("spec.agent", spec.get("agent"), kind="Agent", owner="ResticJob")
            + _name_problems("spec.repository", spec.get("repository"), kind="Repository", owner="ResticJob"))


def _name_problems(field: str, value: object, *, kind: str, owner: str = "Schedule") -> list[str]:
    if not protocol.is_object_name(value):
        return [f"{field} {value!r}: must be the name of a {kind} in the {owner}'s own namespace "
                "(lowercase letters, digits, '-' and '.'; no namespace part)"]
    return []


def _cron_problems(expression: object, schedule_id: str) -> list[str]:
    if not isinstance(expression, str):
        return [f"spec.schedule: must be a cron expression, not {type(expression).__name__}"]
    if len(expression) > protocol.MAX_TEXT:
        # An agent refuses a whole set holding a longer one: every Schedule of it would stop.
        return [f"spec.schedule: {len(expression)} characters, more than the {protocol.MAX_TEXT} an agent accepts"]
    try:
        cron.Cron(expression, "UTC", name=schedule_id)
    except cron.CronError as error:
        return [f"spec.schedule: {error}"]
    return []


def _zone_problems(zone: object) -> list[str]:
    try:
        ZoneInfo(zone)  # type: ignore[arg-type]  # any JSON value; a non-string raises TypeError
    except (ZoneInfoNotFoundError, ValueError, TypeError, OSError):
        return [f"spec.timeZone {zone!r}: not a known IANA time zone, e.g. UTC or Europe/London"]
    return []


def _notification_problems(entries: object) -> list[str]:
    if entries is None:
        return []
    if not isinstance(entries, list) or len(entries) > notify.MAX_NOTIFICATIONS:
        return [f"spec.notifications: must be a list of at most {notify.MAX_NOTIFICATIONS} entries"]
    problems: list[str] = []
    for index, entry in enumerate(entries):
        at = f"spec.notifications[{index}]"
        if not isinstance(entry, Mapping):
            problems.append(f"{at}: must be an object with type and urlSecretRef")
            continue
        via = entry.get("type")
        if via not in _VIAS:
            problems.append(f"{at}.type {via!r}: must be one of {', '.join(_VIAS)}")
        ref = entry.get("urlSecretRef")
        if not isinstance(ref, Mapping):
            problems.append(f"{at}.urlSecretRef: must be an object with the name and key of a Secret "
                            "that holds the URL")
        else:
            problems += _name_problems(f"{at}.urlSecretRef.name", ref.get("name"), kind="Secret")
            key = ref.get("key")
            if not isinstance(key, str) or _SECRET_KEY.fullmatch(key) is None:
                problems.append(f"{at}.urlSecretRef.key {key!r}: must be a key of the Secret (letters, digits, "
                                "'-', '_' and '.')")
        when = entry.get("when")
        if when is None:
            continue
        if not isinstance(when, list):
            problems.append(f"{at}.when: must be a list of {', '.join(_KINDS)}")
        elif not when:
            problems.append(f"{at}.when: empty, so nothing would be sent; leave it out for its type's default")
        else:
            problems += [f"{at}.when[{place}] {kind!r}: must be one of {', '.join(_KINDS)}"
                         for place, kind in enumerate(when) if kind not in _KINDS]
    return problems


def _template_problems(template: object) -> list[str]:
    if not isinstance(template, Mapping):
        return ["spec.template: must be an object with at least a type"]
    try:
        job_type = protocol.JobType(template.get("type"))
    except ValueError:
        return [f"spec.template.type {template.get('type')!r}: must be one of {_TYPES}"]
    problems = [f"spec.template.{other.value}: only allowed when type is {other.value}"
                for other in protocol.JobType if other is not job_type and other.value in template]
    block = template.get(job_type.value, {})
    if not isinstance(block, Mapping):
        return problems + [f"spec.template.{job_type.value}: must be an object"]
    schema = protocol.ARGS_BY_TYPE[job_type]
    try:
        msgspec.convert(block, schema)
    except msgspec.ValidationError as error:
        # The first problem, named by its whole path (no input values echoed).
        problems.append(protocol.describe(error, schema, at=f"spec.template.{job_type.value}"))
    return problems
