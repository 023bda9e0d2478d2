"""The operator's in-memory view of Agents, Schedules, ResticJobs, Repositories, token
Secrets and in-cluster agents' pods.

Fed by kopf's watch events (handlers.py) and by the objects the operator's own creates
return, so a job it created is in the view before its watch event comes. Each watch stream
is in order, so its events are taken as they come, but for the echo of the very version the
view holds; a create's answer is taken only if the watch has not brought that object first.
Pure: no API calls; the I/O shells feed it.
"""

from __future__ import annotations

import base64
import binascii
import copy
import hashlib
from collections.abc import Callable, Hashable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Generic, NamedTuple, TypeVar

from restic_manager.operator.kube.api import API_VERSION, TOKEN_KEY, Body, ObjectKey, parse_time, token_secret_name


def token_digest(token: str) -> bytes:
    """What the operator keeps of an agent token: its SHA-256 (surrounding whitespace
    dropped, as the agent drops it from its token file)."""
    return hashlib.sha256(token.strip().encode()).digest()


@dataclass(frozen=True)
class Stored:
    """What every stored kind has: its key, uid and resourceVersion."""

    key: ObjectKey
    uid: str
    resource_version: str


def _identity(body: Body) -> dict[str, Any]:
    """:class:`Stored`'s fields, from an object's body."""
    meta = body["metadata"]
    return {"key": ObjectKey.of(body), "uid": meta["uid"], "resource_version": meta.get("resourceVersion", "")}


@dataclass(frozen=True)
class Agent(Stored):
    labels: Mapping[str, str]
    deleting: bool
    status: Mapping[str, Any]
    node_name: str = ""  # set for an in-cluster agent: it authenticates as that node

    @classmethod
    def from_body(cls, body: Body) -> Agent:
        meta = body["metadata"]
        return cls(
            **_identity(body),
            labels=dict(meta.get("labels") or {}),
            deleting=bool(meta.get("deletionTimestamp")),
            status=copy.deepcopy(dict(body.get("status") or {})),
            node_name=str((body.get("spec") or {}).get("nodeName") or ""),
        )


@dataclass(frozen=True)
class Schedule(Stored):
    generation: int
    created: datetime
    deleting: bool
    agent: str | None
    agent_selector: Mapping[str, Any] | None
    repository: str
    expression: str
    time_zone: str
    suspend: bool
    concurrency_policy: str
    starting_deadline_seconds: int | None
    successful_jobs_history_limit: int
    failed_jobs_history_limit: int
    template: Mapping[str, Any]
    status: Mapping[str, Any]
    spec: Mapping[str, Any] = field(default_factory=dict)  # as applied, for validation

    @property
    def id(self) -> str:
        """The schedule's id on the wire: namespace/name."""
        return str(self.key)

    @classmethod
    def from_body(cls, body: Body) -> Schedule:
        meta, spec = body["metadata"], body.get("spec") or {}
        created = parse_time(meta.get("creationTimestamp"))
        assert created is not None, "the API server always sets creationTimestamp"
        return cls(
            **_identity(body),
            generation=int(meta.get("generation", 1)),
            created=created,
            deleting=bool(meta.get("deletionTimestamp")),
            agent=spec.get("agent"),
            agent_selector=spec.get("agentSelector"),
            repository=spec.get("repository", ""),
            expression=spec.get("schedule", ""),
            time_zone=spec.get("timeZone") or "UTC",
            suspend=bool(spec.get("suspend", False)),
            concurrency_policy=spec.get("concurrencyPolicy") or "Forbid",
            starting_deadline_seconds=spec.get("startingDeadlineSeconds"),
            successful_jobs_history_limit=int(spec.get("successfulJobsHistoryLimit", 3)),
            failed_jobs_history_limit=int(spec.get("failedJobsHistoryLimit", 1)),
            template=copy.deepcopy(dict(spec.get("template") or {})),
            status=copy.deepcopy(dict(body.get("status") or {})),
            spec=copy.deepcopy(dict(spec)),
        )


@dataclass(frozen=True)
class ScheduleRef:
    name: str
    uid: str


@dataclass(frozen=True)
class Job(Stored):
    created: datetime | None
    deleting: bool
    finalizers: tuple[str, ...]
    agent: str
    repository: str
    type: str
    spec: Mapping[str, Any]
    schedule_ref: ScheduleRef | None
    scheduled_at: datetime | None
    status: Mapping[str, Any]

    @property
    def agent_key(self) -> ObjectKey:
        return ObjectKey(self.key.namespace, self.agent)

    @property
    def schedule_key(self) -> ObjectKey | None:
        return ObjectKey(self.key.namespace, self.schedule_ref.name) if self.schedule_ref else None

    @classmethod
    def from_body(cls, body: Body) -> Job:
        meta, spec = body["metadata"], copy.deepcopy(dict(body.get("spec") or {}))
        ref = spec.get("scheduleRef")
        return cls(
            **_identity(body),
            created=parse_time(meta.get("creationTimestamp")),
            deleting=bool(meta.get("deletionTimestamp")),
            finalizers=tuple(meta.get("finalizers") or ()),
            agent=spec.get("agent", ""),
            repository=spec.get("repository", ""),
            type=spec.get("type", ""),
            spec=spec,
            schedule_ref=ScheduleRef(ref["name"], ref["uid"]) if ref else None,
            scheduled_at=parse_time(spec.get("scheduledAt")),
            status=copy.deepcopy(dict(body.get("status") or {})),
        )


@dataclass(frozen=True)
class TokenSecret(Stored):
    """An Agent's token Secret as the operator keeps it: the token's digest, never the token."""

    agent: str       # the name of the Agent that owns it ("" if no Agent does)
    agent_uid: str
    digest: bytes | None  # None when the Secret holds no readable token

    @classmethod
    def from_body(cls, body: Body) -> TokenSecret:
        meta = body["metadata"]
        owner: Mapping[str, Any] = next((ref for ref in meta.get("ownerReferences") or ()
                      if ref.get("kind") == "Agent" and ref.get("apiVersion") == API_VERSION), {})
        encoded = (body.get("data") or {}).get(TOKEN_KEY)
        try:
            token = base64.b64decode(encoded, validate=True).decode() if isinstance(encoded, str) else ""
        except (binascii.Error, UnicodeDecodeError):
            token = ""
        return cls(
            **_identity(body),
            agent=owner.get("name", ""),
            agent_uid=owner.get("uid", ""),
            digest=token_digest(token) if token.strip() else None,
        )


@dataclass(frozen=True)
class Repository(Stored):
    spec: Mapping[str, Any]
    status: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_body(cls, body: Body) -> Repository:
        return cls(**_identity(body), spec=copy.deepcopy(dict(body.get("spec") or {})),
                   status=copy.deepcopy(dict(body.get("status") or {})))


@dataclass(frozen=True)
class AgentPod(Stored):
    """A pod of the in-cluster agents' ServiceAccount: its projected token holds while the pod exists."""

    node_name: str

    @classmethod
    def from_body(cls, body: Body) -> AgentPod:
        return cls(**_identity(body), node_name=str((body.get("spec") or {}).get("nodeName") or ""))


T = TypeVar("T", bound=Stored)


class Change(NamedTuple, Generic[T]):
    old: T | None
    new: T | None


@dataclass
class Collection(Generic[T]):
    """All objects of one kind, keyed by namespace/name.

    With ``group_by``, the keys of the objects are also kept by group (None: in none), so
    :meth:`in_group` costs the group's size, not the collection's. ``objects`` is read-only
    outside this class: every change goes through :meth:`_put` / :meth:`_drop`, which keep
    the groups.
    """

    parse: Callable[[Body], T]
    group_by: Callable[[T], Hashable | None] | None = None
    objects: dict[ObjectKey, T] = field(default_factory=dict)
    # Insertion-ordered (a dict as an ordered set), so a group lists alike every time.
    _groups: dict[Hashable, dict[ObjectKey, None]] = field(default_factory=dict)

    def get(self, key: ObjectKey) -> T | None:
        return self.objects.get(key)

    def __iter__(self) -> Iterator[T]:
        return iter(list(self.objects.values()))

    def in_namespace(self, namespace: str) -> list[T]:
        return [obj for key, obj in self.objects.items() if key.namespace == namespace]

    def in_group(self, group: Hashable) -> list[T]:
        """The objects ``group_by`` puts in ``group``, in the order they were first seen."""
        return [self.objects[key] for key in self._groups.get(group, ())]

    def _put(self, obj: T) -> None:
        old = self.objects.get(obj.key)
        self.objects[obj.key] = obj
        group = self._group(obj)
        if old is not None and self._group(old) != group:
            self._ungroup(old)
        if group is not None:
            self._groups.setdefault(group, {})[obj.key] = None  # a key already there keeps its place

    def _drop(self, key: ObjectKey) -> None:
        self._ungroup(self.objects.pop(key))

    def _group(self, obj: T) -> Hashable | None:
        return self.group_by(obj) if self.group_by is not None else None

    def _ungroup(self, obj: T) -> None:
        group = self._group(obj)
        members = self._groups.get(group) if group is not None else None
        if members is not None:
            members.pop(obj.key, None)
            if not members:
                del self._groups[group]

    def upsert(self, body: Body) -> Change[T] | None:
        """Take this version of an object; None when the view holds that very version.

        resourceVersions are opaque: only their equality means anything."""
        meta = body["metadata"]
        old = self.objects.get(ObjectKey.of(body))
        # Compared before parsing: a watch brings back each object the operator just created.
        if old is not None and old.uid == meta.get("uid", "") and old.resource_version == meta.get("resourceVersion"):
            return None
        new = self.parse(body)
        self._put(new)
        return Change(old, new)

    def created(self, body: Body) -> Change[T] | None:
        """Take an object the operator has just created, as its create returned it, unless the
        view has it already: the watch may have brought it first, and later versions with it."""
        old = self.objects.get(ObjectKey.of(body))
        if old is not None and old.uid == body["metadata"].get("uid"):
            return None
        return self.upsert(body)

    def delete(self, body: Body) -> Change[T] | None:
        key = ObjectKey.of(body)
        old = self.objects.get(key)
        if old is None or old.uid != body["metadata"].get("uid", old.uid):
            return None
        self._drop(key)
        return Change(old, None)


def _schedule_uid(job: Job) -> str | None:
    return job.schedule_ref.uid if job.schedule_ref is not None else None


@dataclass
class Store:
    agents: Collection[Agent] = field(default_factory=lambda: Collection(Agent.from_body))
    schedules: Collection[Schedule] = field(default_factory=lambda: Collection(Schedule.from_body))
    jobs: Collection[Job] = field(default_factory=lambda: Collection(Job.from_body, group_by=_schedule_uid))
    # By digest: a handshake finds its token's Secret without looking at every Agent's.
    token_secrets: Collection[TokenSecret] = field(
        default_factory=lambda: Collection(TokenSecret.from_body, group_by=lambda secret: secret.digest))
    repositories: Collection[Repository] = field(default_factory=lambda: Collection(Repository.from_body))
    agent_pods: Collection[AgentPod] = field(default_factory=lambda: Collection(AgentPod.from_body))

    def token_secret_of(self, agent: Agent) -> TokenSecret | None:
        """The Agent's token Secret, if there is one that this very Agent (uid) owns."""
        secret = self.token_secrets.get(ObjectKey(agent.key.namespace, token_secret_name(agent.key.name)))
        if secret is None or secret.agent_uid != agent.uid:
            return None
        return secret

    def jobs_of_schedule(self, uid: str, *, agent: str | None = None) -> list[Job]:
        """The ResticJobs fired from the Schedule with ``uid`` (on ``agent`` only, if given)."""
        return [job for job in self.jobs.in_group(uid) if agent is None or job.agent == agent]

    def jobs_on_agent(self, key: ObjectKey) -> list[Job]:
        return [job for job in self.jobs.in_namespace(key.namespace) if job.agent == key.name]
