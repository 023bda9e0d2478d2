"""The operator's wiring: what happens when an object changes or an agent says something.

kopf's watch events come in through :meth:`Controller.observe` (handlers.py), which says
when the view is complete through :meth:`Controller.view_complete`; agents' frames through the
:class:`~restic_manager.operator.server.SessionHandler` methods. Both only update the
in-memory view and ask the loops for work (pushes, dispatch, status writes, token
Secrets, history pruning); each loop is one task that :meth:`Controller.run` owns.

Authorization lives here too: an agent acts only on what is its own. Its fires count only
for Schedules of its namespace that target it, its job reports only for its own jobs, its
acks only for the Schedules it was given; anything else is refused with an ``error``,
counted in :attr:`Controller.metrics` and changes nothing. An Agent's token Secret is
watched: deleting it (or changing the token) rotates the token and disconnects at once an
agent still connected with the old one.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timedelta, timezone
from typing import Any, NamedTuple, TypeVar

from restic_manager import cron, protocol
from restic_manager.operator import fires, health, identity, metrics, notify, validation
from restic_manager.operator import status as statuses
from restic_manager.operator.authenticator import Authenticator, NodeAgents
from restic_manager.operator.coalesce import CoalescingLoop
from restic_manager.operator.dispatch import Dispatcher, history_to_delete
from restic_manager.operator.events import Recorder, involved
from restic_manager.operator.kube import AlreadyExists, Kube, KubeError, NotFound, new_token
from restic_manager.operator.limits import Limits
from restic_manager.operator.pushes import Pusher, compile_schedule
from restic_manager.operator.relists import Relists, Scope
from restic_manager.operator.repositories import RepositoryReporter
from restic_manager.operator.server import AgentServer, ServingCertificate, Session
from restic_manager.operator.store import (
    TOKEN_KEY, Agent, AgentPod, Change, Job, ObjectKey, Repository, Schedule, Store, TokenSecret,
    format_time, owner_reference, parse_time, token_secret_name,
)
from restic_manager.operator.targets import Index, Moved, selector_problem
from restic_manager.operator.writer import LAST_SEEN_INTERVAL, Rendered, StatusWriter, Target

log = logging.getLogger(__name__)

# After a start, how long an Agent the last operator saw connected may take to reconnect
# before its status says it is not.
RECONNECT_GRACE = 60.0
# How long a Schedule's status write after an apply waits for the acks of its connected agents.
ACK_WAIT = 1.0
# How many recent generations of a Schedule have their expression remembered for checking fires.
EXPRESSIONS_KEPT = 8
# How long a fire's decision may take before it is answered with retry: the agent's frames
# are handled in order, so one fire waiting on an apiserver that does not answer must not
# hold up the connection for the client's whole request timeout.
FIRE_TIMEOUT = 10.0
# What fires change on a Schedule's status (lastFireTime, lastScheduleTime, active) waits this
# long, so a burst of fires and the jobs they create cost one status write, not three each.
FIRE_STATUS_DELAY = 1.0
# The soonest a Schedule's status is looked at again for a fire whose deadline may pass unmet:
# an every-second Schedule is not rendered every second for it (its fires render it anyway).
HEALTH_RECHECK_MIN = 30.0
# The uids of agent pods last seen deleted. A connection whose TokenReview was answered just
# before its pod went, and that registers after the deletion was seen, is still ended.
GONE_PODS_KEPT = 1024
# How long a watch's listing again (relists.py) has to come through before the objects it did
# not bring are read.
RELIST_SETTLE = 30.0
# The kinds whose objects a listing again is checked for: every kind but pods, which the
# operator may not read (a missed pod deletion ends that agent's session at its token's expiry).
RELIST_CHECKED = ("agents", "schedules", "resticjobs", "secrets", "repositories")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


Watched = TypeVar("Watched", Agent, Schedule, Job, Repository)


def only_status_changed(old: Watched, new: Watched) -> bool:
    """Whether ``new`` differs from ``old`` in nothing but status and resourceVersion: most
    often the operator's own status write coming back through the watch."""
    return dataclasses.replace(old, status=new.status, resource_version=new.resource_version) == new


# A fire's receipt: its outcome, the job it names (created, exists), the reason (the others).
FireAnswer = tuple[protocol.FireOutcome, str | None, str]


# Reasons of a Healthy=False that are the Schedule's own, not one agent's.
SCHEDULE_WIDE = frozenset({"Invalid", "RepositoryNotFound", "NoAgents"})


class HistoryKey(NamedTuple):
    schedule: ObjectKey
    agent: str


class Controller:
    def __init__(self, *, kube: Kube, namespaces: list[str] | None,
                 clock: Callable[[], datetime] = utcnow, node_agents: NodeAgents | None = None,
                 limits: Limits = Limits()) -> None:
        self._kube = kube
        self._namespaces = namespaces
        self._clock = clock
        self.store = Store()
        self.index = Index()
        self.metrics = metrics.Metrics(view=self._metrics_view)
        self.events = Recorder(kube, clock=clock)
        self.primed = asyncio.Event()
        self.authenticator = Authenticator(store=self.store, kube=kube, primed=self.primed, node_agents=node_agents,
                                           register=lambda body: self._created("agents", body))
        self.server = AgentServer(authenticate=self.authenticator.authenticate, handler=self, limits=limits,
                                  metrics=self.metrics)
        self.writer = StatusWriter(kube, render=self._render)
        self.pusher = Pusher(schedules_of=self._runnable_schedules_of, session_of=self.server.session)
        self.notifier = notify.Notifier(kube, clock=clock, registry=self.metrics.registry, events=self.events)
        self.dispatcher = Dispatcher(store=self.store, kube=kube, writer=self.writer,
                                     session_of=self.server.session, on_phase_change=self._job_phase_changed,
                                     clock=clock, events=self.events)
        self._books: dict[str, statuses.ScheduleBook] = {}   # by Schedule uid
        self._agent_status: dict[str, dict[str, Any]] = {}  # by Agent uid: the status the operator owns
        # By Schedule, then agent: a fire's decision reads only that agent's jobs of the Schedule,
        # so the agents of one Schedule are decided, and their jobs created, side by side.
        self._fire_locks: dict[ObjectKey, dict[str, asyncio.Lock]] = collections.defaultdict(
            lambda: collections.defaultdict(asyncio.Lock))
        self._agents: CoalescingLoop[ObjectKey] = CoalescingLoop("agent", self._reconcile_agent, transient=(KubeError,))
        self._history: CoalescingLoop[HistoryKey] = CoalescingLoop("history", self._prune, transient=(KubeError,))
        self._relists = Relists(namespaced=namespaces is not None)
        self._relist_checks: CoalescingLoop[Scope] = CoalescingLoop("relist check", self._check_relisted,
                                                                    transient=(KubeError,))
        self.repositories = RepositoryReporter(kube, clock=clock, events=self.events,
                                               known=self.store.repositories)
        self.refused = self.metrics.fires_refused  # fire refusals by reason
        self._problems: dict[str, tuple[int, tuple[str, ...]]] = {}  # by Schedule uid: (generation, problems)
        # By Schedule uid, then generation: the expression each recent generation had, so a
        # fire an agent sent before an edit is checked against the expression it fired by.
        self._expressions: dict[str, dict[int, cron.Cron | cron.CronError]] = {}
        self._primed_at: datetime | None = None
        # An in-cluster agent's credential is its pod's: when the pod goes, so does its session.
        self.node_agents = node_agents
        self._gone_pods: collections.OrderedDict[str, None] = collections.OrderedDict()

    # --- lifecycle --------------------------------------------------------------------------

    async def run(self, *, host: str, port: int, tls: ServingCertificate | None = None,
                  started: Callable[[int], None] | None = None,
                  metrics_listen: tuple[str, int] | None = None) -> None:
        """Serve agents (``wss`` with ``tls``) and run every loop until cancelled.

        The port is bound first, so a taken port fails at once; agents are authenticated,
        and the loops run, only once the view is complete (:meth:`view_complete`).
        """
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self.server.serve(host, port, tls=tls, started=started), name="agent server")
            if metrics_listen is not None:
                tasks.create_task(metrics.serve(self.metrics, *metrics_listen), name="metrics")
            tasks.create_task(self.notifier.run(), name="notifications")
            await self.primed.wait()
            for name, coroutine in (("status writer", self.writer.run()), ("pushes", self.pusher.run()),
                                    ("dispatch", self.dispatcher.run()), ("agents", self._agents.run()),
                                    ("history", self._history.run()), ("repositories", self.repositories.run()),
                                    ("events", self.events.run()), ("relist checks", self._relist_checks.run())):
                tasks.create_task(coroutine, name=name)

    def view_complete(self) -> None:
        """kopf has fed the view every object of every kind: serve agents from it.

        Called again (kopf's later events of the same object), it changes nothing."""
        if self.primed.is_set():
            return
        self.primed.set()
        self._primed_at = self._clock()
        for agent in self.store.agents:
            self._agents.mark(agent.key, delay=RECONNECT_GRACE)
        # The fleet's addresses keep their places at accept while new ones flood (server.py).
        self.server.remember_addresses(agent.status["address"] for agent in self.store.agents
                                       if isinstance(agent.status.get("address"), str))
        log.info("primed: %d agent(s), %d schedule(s), %d job(s)", len(self.store.agents.objects),
                 len(self.store.schedules.objects), len(self.store.jobs.objects))

    # --- watch events (kopf's) ---------------------------------------------------------------

    def observe(self, plural: str, event_type: str | None, body: Mapping[str, Any]) -> None:
        collection = self._collection(plural)
        self._relists.observed(plural, ObjectKey.of(body))
        change = collection.delete(body) if event_type == "DELETED" else collection.upsert(body)
        if change is not None:
            self._changed(plural, change)

    def on_event(self, plural: str, event_type: str | None, body: Mapping[str, Any]) -> None:
        """kopf's event handlers' event (the index handlers have passed it on already, but a
        deletion): a deletion, or maybe the first sign of a watch listing again."""
        if event_type == "DELETED":
            self.observe(plural, event_type, body)
        if plural not in RELIST_CHECKED:
            return
        scope = self._relists.event(plural, event_type, ObjectKey.of(body), self._collection(plural).objects)
        if scope is not None:
            log.info("%s %s: the watch listed them again (it was gone); objects the listing does not bring are "
                     "read in %.0f s", plural, scope[1] or "in every namespace", RELIST_SETTLE)
            self._relist_checks.mark(scope, delay=RELIST_SETTLE)

    async def _check_relisted(self, scope: Scope) -> None:
        """Read each object of the view a listing again did not bring: gone, it leaves the view;
        there, it is taken as read."""
        plural = scope[0]
        suspects = list(self._relists.take(scope))
        for index, key in enumerate(suspects):
            held = self._collection(plural).get(key)
            if held is None:
                continue
            try:
                body = await (self._kube.get_secret(key) if plural == "secrets" else self._kube.get(plural, key))
            except NotFound:
                body = None
            except KubeError:
                self._relists.give_back(scope, suspects[index:])
                raise
            if body is None or body["metadata"].get("uid") != held.uid:
                log.info("%s %s was deleted while the watch was gone", plural, key)
                self.observe(plural, "DELETED", {"metadata": {"name": key.name, "namespace": key.namespace,
                                                              "uid": held.uid}})
            if body is not None:
                self.observe(plural, None, body)

    def _created(self, plural: str, body: Mapping[str, Any]) -> None:
        """An object this operator created: in the view before its watch event comes."""
        change = self._collection(plural).created(body)
        if change is not None:
            self._changed(plural, change)

    def _collection(self, plural: str) -> Any:
        return {"agents": self.store.agents, "schedules": self.store.schedules, "resticjobs": self.store.jobs,
                "secrets": self.store.token_secrets, "repositories": self.store.repositories,
                "pods": self.store.agent_pods}[plural]

    def _changed(self, plural: str, change: Change[Any]) -> None:
        if plural == "agents":
            self._agent_changed(change.old, change.new)
        elif plural == "schedules":
            self._schedule_changed(change.old, change.new)
        elif plural == "secrets":
            self._token_secret_changed(change.old, change.new)
        elif plural == "repositories":
            self._repository_changed(change.old, change.new)
        elif plural == "pods":
            self._agent_pod_changed(change)
        else:
            self._job_changed(change.old, change.new)

    def _agent_changed(self, old: Agent | None, new: Agent | None) -> None:
        if new is None:
            assert old is not None
            self._agent_status.pop(old.uid, None)
            self.writer.forget("agents", old.key)
            self._moved(old.key, self.index.remove_agent(old.key))
            self._agents.mark(old.key)  # ends its connection
            return
        if old is not None and only_status_changed(old, new):
            return
        if old is not None and old.uid != new.uid:
            self._agent_status.pop(old.uid, None)
        moved = self.index.put_agent(new)
        if moved:
            self.pusher.request([new.key])
        self._moved(new.key, moved)
        self._agents.mark(new.key)

    def _moved(self, agent: ObjectKey, moved: Moved) -> None:
        """The Schedules an Agent joined or left list it in their status. A Schedule it left
        forgets its ack: should it target the agent again, it is applied there only once
        the agent says so anew."""
        for key in moved.left:
            schedule = self.store.schedules.get(key)
            book = self._books.get(schedule.uid) if schedule is not None else None
            if book is not None:
                book.acks.pop(agent.name, None)
        for key in moved.joined | moved.left:
            self.writer.mark("schedules", key)

    def _schedule_changed(self, old: Schedule | None, new: Schedule | None) -> None:
        if new is None:
            assert old is not None
            self.pusher.request(self.index.remove_schedule(old.key))
            self._books.pop(old.uid, None)
            self._problems.pop(old.uid, None)
            self._expressions.pop(old.uid, None)
            self._fire_locks.pop(old.key, None)
            self.writer.forget("schedules", old.key)
            return
        if old is not None and only_status_changed(old, new):
            return
        if old is not None and old.uid != new.uid:
            self._books.pop(old.uid, None)
            self._problems.pop(old.uid, None)
            self._expressions.pop(old.uid, None)
        remembered = self._expressions.setdefault(new.uid, {})
        remembered[new.generation] = compile_schedule(new)
        for generation in sorted(remembered)[:-EXPRESSIONS_KEPT]:
            del remembered[generation]
        pushed = self.index.put_schedule(new)
        self.pusher.request(pushed)
        # An agent given a new generation acks it in moments, and its ack writes the status at
        # once; until then the write waits, so an apply costs one status write, not two.
        acking = pushed & set(self.index.agents_of(new.key)) if self.cannot_run(new) is None else set()
        connected = any(self.server.session(agent) is not None for agent in acking)
        self.writer.mark("schedules", new.key, delay=ACK_WAIT if connected else 0.0)

    def _job_changed(self, old: Job | None, new: Job | None) -> None:
        job = new or old
        assert job is not None
        if new is None or (old is not None and old.uid != new.uid):
            assert old is not None
            self.dispatcher.forget(old)
        if new is not None:
            self.dispatcher.request(new.key)
        # A job's status is the dispatcher's own: only a job coming, going or being deleted
        # changes the Schedule's status (its active list).
        if job.schedule_key is not None and (old is None or new is None or not only_status_changed(old, new)):
            self.writer.mark("schedules", job.schedule_key, delay=FIRE_STATUS_DELAY)

    def _repository_changed(self, old: Repository | None, new: Repository | None) -> None:
        """A Repository coming or going makes the Schedules that name it runnable or not."""
        if old is not None and new is not None and old.uid == new.uid:
            return  # it existed before and still does: nothing a Schedule's status shows changes
        repository = new or old
        assert repository is not None
        for schedule in self.store.schedules.in_namespace(repository.key.namespace):
            if schedule.repository == repository.key.name:
                self.pusher.request(self.index.agents_of(schedule.key))
                self.writer.mark("schedules", schedule.key)

    def _token_secret_changed(self, old: TokenSecret | None, new: TokenSecret | None) -> None:
        secret = new or old
        assert secret is not None
        if secret.agent:
            self._agents.mark(ObjectKey(secret.key.namespace, secret.agent))  # recreate it, revoke the old token

    # --- agents: tokens and credentials -----------------------------------------------------

    def agent_status(self, agent: Agent) -> dict[str, Any]:
        if agent.uid not in self._agent_status:
            self._agent_status[agent.uid] = dict(agent.status)
        return self._agent_status[agent.uid]

    def _set_agent_status(self, agent: Agent, new: dict[str, Any], *, delay: float = 0.0) -> None:
        if new != self.agent_status(agent):
            self._agent_status[agent.uid] = new
            self.writer.mark("agents", agent.key, delay=delay)

    async def _reconcile_agent(self, key: ObjectKey) -> None:
        """A host Agent has its token Secret; a connection whose credential no longer holds
        (rotated token, Agent changed, its pod deleted, its ServiceAccount token expired) is
        ended; a deleted Agent has no connection; one that has not come back since the
        operator started is not shown as connected."""
        agent = self.store.agents.get(key)
        session = self.server.session(key)
        if agent is None or agent.deleting:
            if session is not None:
                await self.server.close_agent(key, "the Agent resource was deleted")
            return
        secret = None
        if not agent.node_name:  # an in-cluster agent authenticates as its node, not by token
            secret = self.store.token_secret_of(agent) or await self._create_token(agent)
        if session is not None:
            now = self._clock().timestamp()
            credential = session.identity
            why = identity.revoked(credential, node_name=agent.node_name,
                                   digest=secret.digest if secret is not None else None, now=now,
                                   pod_gone=credential.credential in self._gone_pods)
            if why is not None:
                await self.server.revoke(key, why)
            elif credential.expires_at is not None:
                self._agents.mark(key, delay=credential.expires_at - now)  # to end it when its token expires
        status = self.agent_status(agent)
        if session is None and status.get("connected") and self._reconnect_grace_over():
            self._set_agent_status(agent, statuses.agent_disconnected(
                status, why="not reconnected since the operator restarted", now=self._clock()))

    def _reconnect_grace_over(self) -> bool:
        if self._primed_at is None:
            return False
        return (self._clock() - self._primed_at).total_seconds() >= RECONNECT_GRACE

    async def _create_token(self, agent: Agent) -> TokenSecret | None:
        """Issue the Agent a new token in its token Secret and name the Secret in its status."""
        key = ObjectKey(agent.key.namespace, token_secret_name(agent.key.name))
        try:
            body = await self._kube.create_secret(key, {TOKEN_KEY: new_token()},
                                                  owner=owner_reference("Agent", agent.key, agent.uid))
        except AlreadyExists:
            # Not in the watched view, so not this Agent's: another Agent's of the same name
            # awaiting garbage collection, or a Secret someone made. Its deletion brings us back.
            log.warning("Agent %s: Secret %s exists but is not this Agent's token Secret; a token is issued "
                        "once it is gone", agent.key, key.name)
            return None
        log.info("Agent %s: issued a new token in Secret %s", agent.key, key.name)
        self._set_agent_status(agent, {**self.agent_status(agent), "tokenSecretName": key.name})
        self._created("secrets", body)
        return self.store.token_secret_of(agent)

    # --- agents: the session handler --------------------------------------------------------

    def _agent_pod_changed(self, change: Change[AgentPod]) -> None:
        if change.new is not None or change.old is None or self.node_agents is None:
            return
        self._gone_pods[change.old.uid] = None
        while len(self._gone_pods) > GONE_PODS_KEPT:
            self._gone_pods.popitem(last=False)
        if change.old.node_name:
            self._agents.mark(ObjectKey(self.node_agents.namespace, change.old.node_name))

    async def on_connect(self, session: Session) -> None:
        if session.identity.method is identity.Method.SERVICE_ACCOUNT:
            self._agents.mark(session.agent)  # its pod may be gone already; its token expires
        agent = self.store.agents.get(session.agent)
        if agent is not None:
            status = self.agent_status(agent)
            # An agent coming back to a restarted operator is not news: the operator's start is.
            if not (status.get("connected") and not self._reconnect_grace_over()):
                self.events.record(involved("Agent", agent.key, agent.uid), type="Normal", reason="Connected",
                                   message=f"connected from {session.peer} (host {session.hello.hostname}, "
                                           f"agent {session.hello.agent_version}, restic {session.hello.restic_version})")
            if session.replaced:
                self.events.record(involved("Agent", agent.key, agent.uid), type="Warning", reason="Replaced",
                                   message=statuses.REPLACED.format(new=session.peer, old=session.replaced))
            self._set_agent_status(agent, statuses.agent_connected(
                status, session.hello, peer=session.peer, now=self._clock(), replaced=session.replaced))
        self.pusher.request([session.agent])  # the agent waits for its set
        self.dispatcher.request_agent(session.agent)
        for schedule in self.index.schedules_of(session.agent):
            self.writer.mark("schedules", schedule.key)
        for job_id in session.hello.running_jobs:
            job = self.store.jobs.get(ObjectKey.parse(job_id))
            if job is None or job.deleting or job.agent_key != session.agent:
                log.info("agent %s runs job %s, which no longer exists: cancelling it", session.agent, job_id)
                await session.send(protocol.CommandCancel(job=job_id))

    async def on_disconnect(self, session: Session) -> None:
        agent = self.store.agents.get(session.agent)
        if agent is not None:
            why = f"connection from {session.peer} closed (code {session.connection.close_code})"
            self.events.record(involved("Agent", agent.key, agent.uid), type="Normal", reason="Disconnected",
                               message=why)
            self._set_agent_status(agent, statuses.agent_disconnected(self.agent_status(agent), why=why,
                                                                      now=self._clock()))
        for schedule in self.index.schedules_of(session.agent):
            self.writer.mark("schedules", schedule.key)

    def on_refused(self, agent: ObjectKey, reason: str, message: str) -> None:
        known = self.store.agents.get(agent)
        if known is not None:
            self.events.record(involved("Agent", known.key, known.uid), type="Warning", reason=reason,
                               message=f"refused: {message}")

    async def on_message(self, session: Session, frame: protocol.Frame) -> None:
        self._seen(session)
        match frame.payload:
            case protocol.ScheduleAck() as ack:
                self._on_ack(session, ack)
            case protocol.ScheduleFire() as fire:
                await self._on_fire(session, fire, frame_id=frame.id)
            case protocol.JobStarted() | protocol.JobProgress() | protocol.JobDone() as report:
                if not self._owns(session, report.job):
                    message = f"{frame.type}: job {report.job} is not a job of agent {session.agent.name}"
                    await self._forbid(session, frame.id, "job-of-another-agent", message)
                    return
                await self.dispatcher.on_report(session, report, frame_id=frame.id)
            case protocol.Error() as error:
                log.warning("agent %s reports %s about frame %s: %s",
                            session.agent, error.code, error.ref, error.message)
            case protocol.Hello():
                await self._reject(session, frame.id, "hello: already received; send it once, as the first frame")
            case _:
                await self._reject(session, frame.id, f"{frame.type} is sent by the operator, not by agents")

    async def _forbid(self, session: Session, frame_id: str, reason: str, message: str) -> None:
        """Refuse a frame the agent may not send: counted, logged, answered; nothing else."""
        self.metrics.frames_refused[f"forbidden-{reason}"] += 1
        session.log_refusal("forbidden: %s", message)
        await session.send(protocol.Error(code="forbidden", ref=frame_id, message=message))

    async def _reject(self, session: Session, frame_id: str, message: str) -> None:
        self.metrics.frames_refused["unexpected-type"] += 1
        session.log_refusal("invalid frame: %s", message)
        await session.send(protocol.Error(code="invalid-frame", ref=frame_id, message=message))

    def _owns(self, session: Session, job_id: str) -> bool:
        """An agent reports only on jobs of its own namespace that name it (or that are gone)."""
        key = ObjectKey.parse(job_id)
        job = self.store.jobs.get(key)
        return key.namespace == session.agent.namespace and (job is None or job.agent == session.agent.name)

    def _seen(self, session: Session) -> None:
        agent = self.store.agents.get(session.agent)
        if agent is not None:
            status = self.agent_status(agent)
            self._agent_status[agent.uid] = {**status, "lastSeen": format_time(self._clock())}
            self.writer.mark("agents", agent.key, delay=LAST_SEEN_INTERVAL)

    def _on_ack(self, session: Session, ack: protocol.ScheduleAck) -> None:
        """Record the ack on the Schedules the agent was given; it says nothing about others."""
        applied = {entry.id: entry.generation for entry in ack.applied}
        rejected = {entry.id: (entry.generation, entry.error) for entry in ack.rejected}
        for schedule in self.index.schedules_of(session.agent):
            book = self._book(schedule)
            if book.record_ack(session.agent.name, applied=applied, rejected=rejected,
                               schedule_id=schedule.id, at=ack.applied_at):
                self.writer.mark("schedules", schedule.key)
        agent = self.store.agents.get(session.agent)
        if agent is not None:
            status = self.agent_status(agent)
            # Informational, like lastSeen: written with it, not once per ack. Only an Agent's
            # first (that it has applied a set at all) is written at once.
            delay = LAST_SEEN_INTERVAL if "appliedVersion" in status else 0.0
            self._set_agent_status(agent, {**status, "appliedVersion": ack.version}, delay=delay)

    # --- fires ------------------------------------------------------------------------------

    async def _on_fire(self, session: Session, fire: protocol.ScheduleFire, *, frame_id: str) -> None:
        """Decide the fire, carry the decision out, and answer with its receipt once the outcome
        is durable; whatever stands in the way now (an API error, a timeout) answers ``retry``,
        and the agent sends the fire again."""
        try:
            async with asyncio.timeout(FIRE_TIMEOUT):
                result = await self._fire(session, fire)
        except TimeoutError:
            self.metrics.fires_retried["Timeout"] += 1
            result = (protocol.FireOutcome.RETRY, None,
                      f"the apiserver did not answer within {FIRE_TIMEOUT:g} s; send the fire again")
        except Exception as error:  # KubeError above all, but a bug must not lose the fire either
            if not isinstance(error, KubeError):
                log.exception("agent %s: handling the fire of %s at %s failed", session.agent, fire.id,
                              format_time(fire.scheduled_at))
            self.metrics.fires_retried[type(error).__name__] += 1
            result = (protocol.FireOutcome.RETRY, None, f"the operator could not decide now: {error}")
        outcome, job, reason = result
        await session.send(protocol.FireResult(ref=frame_id, id=fire.id, scheduled_at=fire.scheduled_at,
                                               outcome=outcome, job=job, reason=reason))

    async def _fire(self, session: Session, fire: protocol.ScheduleFire) -> FireAnswer:
        key = ObjectKey.parse(fire.id)
        schedule = self.store.schedules.get(key) if key.namespace == session.agent.namespace else None
        if schedule is None:
            # No lock: the key is the agent's to choose, and nothing is written.
            return await self._decided(session, fire, fires.decide(
                fire=fire, agent=session.agent, schedule=None, targeted=False, jobs={}, now=self._clock(),
                produced=False, acked=None))
        async with self._fire_locks[key][session.agent.name]:
            jobs = {job.key.name: statuses.phase_of(self.dispatcher.status_of(job))
                    for job in self.store.jobs_of_schedule(schedule.uid, agent=session.agent.name)}
            expression = self._expressions.get(schedule.uid, {}).get(fire.generation) or compile_schedule(schedule)
            ack = self._book(schedule).acks.get(session.agent.name)
            decision = fires.decide(
                fire=fire, agent=session.agent, schedule=schedule,
                targeted=session.agent in self.index.agents_of(schedule.key),
                jobs=jobs, now=self._clock(), problems=self.problems(schedule),
                repository_missing=self._repository_missing(schedule),
                produced=isinstance(expression, cron.Cron) and fires.produces(expression, fire.scheduled_at),
                acked=ack.generation if ack is not None and not ack.error else None,
            )
            if decision.verdict is fires.Verdict.CREATE:
                return await self._decided(session, fire, decision, schedule)
        # Anything else is recorded outside the lock: its receipt waits for a status write.
        return await self._decided(session, fire, decision, schedule)

    async def _decided(self, session: Session, fire: protocol.ScheduleFire,
                       decision: fires.Decision, schedule: Schedule | None = None) -> FireAnswer:
        """Carry out a fire's decision; only a Schedule that targets the agent is touched."""
        namespace = session.agent.namespace
        if decision.verdict is fires.Verdict.FORBIDDEN:
            self.refused[decision.reason] += 1
            self.metrics.frames_refused["forbidden-fire"] += 1
            session.log_refusal("forbidden: %s", decision.message)
            return protocol.FireOutcome.REFUSED, None, f"{decision.reason}: {decision.message}"
        book = self._book(schedule) if schedule is not None and schedule.uid == fire.uid else None
        if book is not None:
            assert schedule is not None
            previous = book.last_fire.get(session.agent.name)
            if previous is None or fire.scheduled_at > previous:
                book.last_fire[session.agent.name] = fire.scheduled_at
                self.writer.mark("schedules", schedule.key, delay=FIRE_STATUS_DELAY)
        if decision.verdict is fires.Verdict.DUPLICATE:
            log.info("Schedule %s: %s", fire.id, decision.message)
            return protocol.FireOutcome.EXISTS, f"{namespace}/{decision.job_name}", ""
        if book is None:
            # A Schedule gone or recreated since the agent got its set: nothing to record.
            self.refused[decision.reason] += 1
            session.log_refusal("fire refused: %s", decision.message)
            return protocol.FireOutcome.REFUSED, None, f"{decision.reason}: {decision.message}"
        assert schedule is not None
        if decision.verdict is fires.Verdict.CREATE:
            return await self._create_job(schedule, book, session.agent.name, decision, fire)
        await self._refuse(schedule, book, decision, session.agent.name, fire)
        outcome = protocol.FireOutcome.MISSED if decision.verdict is fires.Verdict.MISSED else protocol.FireOutcome.REFUSED
        return outcome, None, f"{decision.reason}: {decision.message}"

    async def _create_job(self, schedule: Schedule, book: statuses.ScheduleBook, agent: str,
                          decision: fires.Decision, fire: protocol.ScheduleFire) -> FireAnswer:
        for name in decision.replace:
            await self.dispatcher.cancel_for_replace(ObjectKey(schedule.key.namespace, name), by=decision.job_name)
        created = None
        for name in (decision.job_name, fires.job_name(schedule.key.name, agent, fire.scheduled_at, hashed=True)):
            body = fires.job_body(schedule, agent=agent, name=name, scheduled_at=fire.scheduled_at)
            try:
                created = await self._kube.create("resticjobs", body)
                break
            except AlreadyExists:
                existing = await self._kube.get("resticjobs", ObjectKey(schedule.key.namespace, name))
                if fires.same_fire(existing, schedule_uid=schedule.uid, agent=agent, scheduled_at=fire.scheduled_at):
                    log.info("Schedule %s: ResticJob %s exists already (fire delivered twice)", schedule.key, name)
                    return protocol.FireOutcome.EXISTS, f"{schedule.key.namespace}/{name}", ""
                # Another Schedule/agent pair's job has this name: the hashed name is ours.
        if created is None:
            raise KubeError(f"Schedule {schedule.key}: no free ResticJob name for the fire at {fire.scheduled_at}")
        log.info("Schedule %s: %s → ResticJob %s", schedule.key, decision.message, created["metadata"]["name"])
        self.metrics.fire_lag.observe(max(0.0, (self._clock() - fire.scheduled_at).total_seconds()))
        self._created("resticjobs", created)
        if book.last_schedule_time is None or fire.scheduled_at > book.last_schedule_time:
            book.last_schedule_time = fire.scheduled_at
        self.writer.mark("schedules", schedule.key, delay=FIRE_STATUS_DELAY)
        return protocol.FireOutcome.CREATED, f"{schedule.key.namespace}/{created['metadata']['name']}", ""

    async def _refuse(self, schedule: Schedule, book: statuses.ScheduleBook, decision: fires.Decision,
                      agent: str, fire: protocol.ScheduleFire) -> None:
        """A fire of a Schedule that targets the agent, not honoured: an Event, counted on the
        status; returns once both are written.

        The Event is named after the fire, so a fire refused again (its receipt was lost, or
        the operator restarted before sending it) finds its Event and is not counted twice."""
        self.refused[decision.reason] += 1
        log.warning("Schedule %s: %s", schedule.key, decision.message)
        try:
            await self._kube.post_event(
                involved("Schedule", schedule.key, schedule.uid),
                type="Warning", reason=decision.reason, message=decision.message, now=self._clock(),
                name=fires.event_name(schedule, agent=agent, scheduled_at=fire.scheduled_at, reason=decision.reason))
        except AlreadyExists:
            pass  # recorded before
        else:
            if decision.verdict is fires.Verdict.MISSED:
                book.missed += 1
            else:
                book.refused += 1
        if not await self.writer.flushed("schedules", schedule.key):
            raise KubeError(f"Schedule {schedule.key}: the status with the {decision.reason} fire is not written yet")

    # --- jobs finishing ---------------------------------------------------------------------

    def _job_phase_changed(self, job: Job, status: Mapping[str, Any]) -> None:
        ended = statuses.is_terminal(status)
        if ended:
            self.metrics.jobs_finished[(job.key.namespace, job.type, statuses.phase_of(status),
                                        status.get("reason", ""))] += 1
            self.repositories.job_ended(job, status)
        schedule_key = job.schedule_key
        if schedule_key is None:
            return
        if ended:  # it leaves active (and may be the last success): at once
            self.writer.mark("schedules", schedule_key)
        schedule = self.store.schedules.get(schedule_key)
        if schedule is None or job.schedule_ref is None or schedule.uid != job.schedule_ref.uid:
            return
        if ended:
            self._book(schedule).record_end(job.agent, statuses.last_job(job, status, now=self._clock()))
            self._history.mark(HistoryKey(schedule_key, job.agent))
        if (notice := notify.job_notice(job, status, at=self._clock())) is not None:
            self.notifier.notify(schedule, notice)

    async def _prune(self, key: HistoryKey) -> None:
        schedule = self.store.schedules.get(key.schedule)
        if schedule is None:
            return
        jobs = [(job, self.dispatcher.status_of(job))
                for job in self.store.jobs_of_schedule(schedule.uid, agent=key.agent)]
        for job_key in history_to_delete(jobs, succeeded=schedule.successful_jobs_history_limit,
                                         failed=schedule.failed_jobs_history_limit):
            log.info("Schedule %s: deleting ResticJob %s (beyond the history limit)", schedule.key, job_key.name)
            await self._kube.delete("resticjobs", job_key)

    # --- status rendering -------------------------------------------------------------------

    def problems(self, schedule: Schedule) -> tuple[str, ...]:
        """What makes the Schedule invalid (validation.py), computed once per generation."""
        known = self._problems.get(schedule.uid)
        if known is None or known[0] != schedule.generation:
            found = tuple(validation.schedule_problems(schedule.spec, schedule_id=schedule.id))
            known = self._problems[schedule.uid] = (schedule.generation, found)
        return known[1]

    def cannot_run(self, schedule: Schedule) -> tuple[str, str] | None:
        """(reason, message) when the Schedule can run nowhere: it is invalid, or its Repository
        does not exist. It is then in no agent's set, so it holds no job Pending for ever."""
        if problems := self.problems(schedule):
            return "Invalid", "; ".join(problems)
        if missing := self._repository_missing(schedule):
            return "RepositoryNotFound", missing
        return None

    def _repository_missing(self, schedule: Schedule) -> str:
        if self.store.repositories.get(ObjectKey(schedule.key.namespace, schedule.repository)) is not None:
            return ""
        return (f"spec.repository: there is no Repository {schedule.repository} in namespace "
                f"{schedule.key.namespace}; the Schedule runs on no agent until there is")

    def _runnable_schedules_of(self, agent: ObjectKey) -> Sequence[Schedule]:
        """An agent's schedule set: the Schedules that target it and can run."""
        return [schedule for schedule in self.index.schedules_of(agent) if self.cannot_run(schedule) is None]

    def _book(self, schedule: Schedule) -> statuses.ScheduleBook:
        if schedule.uid not in self._books:
            self._books[schedule.uid] = statuses.ScheduleBook.from_status(schedule.status)
        return self._books[schedule.uid]

    def _render(self, target: Target) -> Rendered | None:
        if target.plural == "schedules":
            schedule = self.store.schedules.get(target.key)
            return None if schedule is None or schedule.deleting else self._render_schedule(schedule)
        if target.plural == "resticjobs":
            job = self.store.jobs.get(target.key)
            return None if job is None else Rendered(job.uid, job.status, self.dispatcher.status_of(job))
        agent = self.store.agents.get(target.key)
        return None if agent is None else Rendered(agent.uid, agent.status, self.agent_status(agent))

    def _render_schedule(self, schedule: Schedule) -> Rendered:
        now = self._clock()
        book = self._book(schedule)
        targets = [key.name for key in self.index.agents_of(schedule.key)]
        connected = [name for name in targets if self.server.session(ObjectKey(schedule.key.namespace, name))]
        compiled = compile_schedule(schedule)
        resolved = next_fire = None
        grace = health.grace_of(schedule.starting_deadline_seconds)
        due = health.NOTHING_DUE
        if isinstance(compiled, cron.Cron):
            resolved = compiled.resolved
            next_fire = compiled.next_after(now)
            if not schedule.suspend:
                due = health.due_fires(compiled, created=schedule.created, grace=grace, now=now)
        active: dict[str, list[health.ActiveJob]] = collections.defaultdict(list)
        for job in self.store.jobs_of_schedule(schedule.uid):
            status = self.dispatcher.status_of(job)
            if not statuses.is_terminal(status) and not job.deleting:
                active[job.agent].append(health.ActiveJob(job.key.name, statuses.phase_of(status),
                                                          status.get("reason", ""), status.get("message", "")))
        cannot_run = self.cannot_run(schedule)
        was, before = book.health, statuses.condition_of(book.conditions, "Healthy")
        book.health = {name: self._agent_health(schedule, book, name, due=due.latest, grace=grace,
                                                active=active.get(name, ()), connected=name in connected)
                       for name in targets}
        desired = statuses.schedule_status(
            schedule, book=book, targets=targets, connected=connected, resolved=resolved,
            next_fire=next_fire, active=[job.name for jobs in active.values() for job in jobs],
            no_agents=self._no_agents(schedule), now=now, cannot_run=cannot_run)
        book.conditions = desired["conditions"]
        after = statuses.condition_of(book.conditions, "Healthy")
        assert after is not None
        self._health_changed(schedule, was, before, after)
        if due.next is not None and any(state.healthy for state in book.health.values()):
            # Nothing may happen when a fire's deadline passes unmet: look again then. A deadline
            # in whole minutes ends on a fire time, so the look waits as long as the fires' own
            # status write does, and folds into it instead of competing with their creates.
            wait = max((due.next - now).total_seconds() + FIRE_STATUS_DELAY, HEALTH_RECHECK_MIN)
            self.writer.mark("schedules", schedule.key, delay=wait)
        return Rendered(schedule.uid, schedule.status, desired)

    def _agent_health(self, schedule: Schedule, book: statuses.ScheduleBook, agent: str, *,
                      due: datetime | None, grace: timedelta, active: Sequence[health.ActiveJob],
                      connected: bool) -> health.AgentHealth:
        ack = book.acks.get(agent)
        applied = ack is not None and ack.generation == schedule.generation and not ack.error
        succeeded = book.last_success.get(agent)
        since = succeeded.time if succeeded is not None else max(schedule.created, ack.at if ack else schedule.created)
        return health.agent_health(due=due, grace=grace, since=since, last_job=book.last_job.get(agent),
                                   active=active, connected=connected, applied=applied,
                                   last_fire=book.last_fire.get(agent))

    def _health_changed(self, schedule: Schedule, was: Mapping[str, health.AgentHealth],
                        before: Mapping[str, Any] | None, after: Mapping[str, Any]) -> None:
        """An Event and a notice for each agent that became unhealthy (or for another reason),
        for a Schedule that cannot run, and for one that is healthy again.

        ``was`` is empty at the first look after a start: then ``before``, the condition as
        the status showed it, tells what was reported already."""
        about = involved("Schedule", schedule.key, schedule.uid)

        def tell(agent: str | None, healthy: bool, reason: str, message: str) -> None:
            self.events.record(about, type="Normal" if healthy else "Warning", reason=reason, message=message)
            self.notifier.notify(schedule, notify.health_notice(schedule.key, agent=agent, healthy=healthy,
                                                                reason=reason, message=message, at=self._clock()))

        shown = before is not None and before.get("status") == "False"
        named = str(before.get("message", "")) if shown and before is not None else ""
        for name, state in sorted(self._books[schedule.uid].health.items()):
            earlier = was.get(name)
            if state.healthy or (earlier is not None and not earlier.healthy and earlier.reason == state.reason):
                continue
            if earlier is None and f"{name}: " in named:
                continue
            tell(name, False, state.reason, f"agent {name}: {state.message}")
        if after["status"] == "False" and after["reason"] in SCHEDULE_WIDE and not (
                shown and before is not None and before.get("reason") == after["reason"]):
            tell(None, False, after["reason"], after["message"])
        if after["status"] == "True" and shown:
            tell(None, True, "Healthy", after["message"])

    def _metrics_view(self) -> metrics.View:
        """The gauges' view of the Schedules, Agents and Repositories (metrics.py)."""
        now = self._clock()
        view = metrics.View()
        for schedule in self.store.schedules:
            compiled = compile_schedule(schedule)
            if isinstance(compiled, cron.Cron):
                first, second = compiled.iter_after(now, count=2)
                view.intervals.append((schedule.key.namespace, schedule.key.name, (second - first).total_seconds()))
            book = self._books.get(schedule.uid)
            if book is None:
                continue
            runs = self.cannot_run(schedule) is None
            for name, state in book.health.items():
                last, success = book.last_job.get(name), book.last_success.get(name)
                view.schedules.append(metrics.ScheduleOnAgent(
                    schedule.key.namespace, schedule.key.name, name, healthy=runs and state.healthy,
                    last_success=success.time if success else None, last_attempt=last.time if last else None,
                    last_duration=last.duration if last else None,
                    added_bytes=success.added_bytes if success else None, files=success.files if success else None))
        for agent in self.store.agents:
            view.agents.append((agent.key.namespace, agent.key.name, self.server.session(agent.key) is not None))
        for repository in self.store.repositories:
            check = repository.status.get("integrityCheck") or {}
            if (when := parse_time(check.get("time"))) is not None:
                view.checks.append((repository.key.namespace, repository.key.name, check.get("result") == "Passed",
                                    when))
        return view

    def _no_agents(self, schedule: Schedule) -> str:
        problem = selector_problem(schedule)
        if problem is not None:
            return problem
        if schedule.agent is not None:
            return f"spec.agent: there is no Agent {schedule.agent} in namespace {schedule.key.namespace}"
        return f"spec.agentSelector matches no Agent in namespace {schedule.key.namespace}"
