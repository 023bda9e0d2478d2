"""The operator's wiring: what happens when an object changes or an agent says something.

kopf's watch events come in through :meth:`Controller.observe` (handlers.py), which says
when the view is complete through :meth:`Controller.view_complete`; agents' frames through the
:class:`~restic_manager.operator.agents.server.SessionHandler` methods. Both only update the
in-memory view and hand the change to its use case: the Agents (fleet.py), the Schedules'
status (schedules.py), fires (firing.py), jobs ending (history.py), dispatch. Each loop is
one task that :meth:`Controller.run` owns.

An agent acts only on what is its own: its job reports only for its own jobs, its acks only
for the Schedules it was given, its fires as firing.py says; anything else is refused with an
``error``, counted in :attr:`Controller.metrics` and changes nothing.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from typing import Any, TypeVar

from restic_manager import cron, protocol
from restic_manager.operator import metrics, notify
from restic_manager.operator.agents.authenticator import Authenticator, NodeAgents
from restic_manager.operator.agents.limits import Limits
from restic_manager.operator.agents.pushes import Pusher, compile_schedule
from restic_manager.operator.agents.server import AgentServer, ServingCertificate, Session
from restic_manager.operator.agents.targets import Index
from restic_manager.operator.controller.firing import Firing
from restic_manager.operator.controller.fleet import Fleet
from restic_manager.operator.controller.history import History
from restic_manager.operator.controller.schedules import FIRE_STATUS_DELAY, Schedules
from restic_manager.operator.jobs.dispatch import Dispatcher
from restic_manager.operator.kits.coalesce import CoalescingLoop
from restic_manager.operator.kube.api import ObjectKey, parse_time
from restic_manager.operator.kube.cache import Agent, Change, Job, Repository, Schedule, Store
from restic_manager.operator.kube.client import Kube, KubeError, NotFound
from restic_manager.operator.kube.events import Recorder
from restic_manager.operator.kube.relists import Relists, Scope
from restic_manager.operator.status.repositories import RepositoryReporter
from restic_manager.operator.status.writer import Rendered, StatusWriter, Target

log = logging.getLogger(__name__)

# How long a Schedule's status write after an apply waits for the acks of its connected agents.
ACK_WAIT = 1.0
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


class Controller:
    def __init__(self, *, kube: Kube, namespaces: list[str] | None,
                 clock: Callable[[], datetime] = utcnow, node_agents: NodeAgents | None = None,
                 limits: Limits = Limits()) -> None:
        self._kube = kube
        self._clock = clock
        self.store = Store()
        self.index = Index()
        self.metrics = metrics.Metrics(view=self._metrics_view)
        self.events = Recorder(kube, clock=clock)
        self.primed = asyncio.Event()
        self.node_agents = node_agents
        self.authenticator = Authenticator(store=self.store, kube=kube, primed=self.primed, node_agents=node_agents,
                                           register=lambda body: self._created("agents", body))
        self.server = AgentServer(authenticate=self.authenticator.authenticate, handler=self, limits=limits,
                                  metrics=self.metrics)
        self.writer = StatusWriter(kube, render=self._render)
        self.notifier = notify.Notifier(kube, clock=clock, registry=self.metrics.registry, events=self.events)
        self.dispatcher = Dispatcher(store=self.store, kube=kube, writer=self.writer,
                                     session_of=self.server.session,
                                     on_phase_change=lambda job, status: self.history.phase_changed(job, status),
                                     clock=clock, events=self.events)
        self.repositories = RepositoryReporter(kube, clock=clock, events=self.events,
                                               known=self.store.repositories)
        self.schedules = Schedules(store=self.store, index=self.index, server=self.server,
                                   dispatcher=self.dispatcher, writer=self.writer, events=self.events,
                                   notifier=self.notifier, clock=clock)
        self.pusher = Pusher(schedules_of=self.schedules.runnable_of, session_of=self.server.session)
        self.fleet = Fleet(kube=kube, store=self.store, server=self.server, writer=self.writer, events=self.events,
                           clock=clock, node_agents=node_agents, created=self._created)
        self.firing = Firing(kube=kube, store=self.store, index=self.index, schedules=self.schedules,
                             dispatcher=self.dispatcher, writer=self.writer, metrics=self.metrics, clock=clock,
                             created=self._created)
        self.history = History(kube=kube, store=self.store, schedules=self.schedules, dispatcher=self.dispatcher,
                               writer=self.writer, repositories=self.repositories, notifier=self.notifier,
                               metrics=self.metrics, clock=clock)
        self.relists = Relists(namespaced=namespaces is not None)
        self.relist_checks: CoalescingLoop[Scope] = CoalescingLoop("relist check", self._check_relisted,
                                                                   transient=(KubeError,))

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
                                    ("dispatch", self.dispatcher.run()), ("agents", self.fleet.reconciles.run()),
                                    ("history", self.history.prunes.run()),
                                    ("repositories", self.repositories.run()), ("events", self.events.run()),
                                    ("relist checks", self.relist_checks.run())):
                tasks.create_task(coroutine, name=name)

    def view_complete(self) -> None:
        """kopf has fed the view every object of every kind: serve agents from it.

        Called again (kopf's later events of the same object), it changes nothing."""
        if self.primed.is_set():
            return
        self.primed.set()
        self.fleet.primed()
        # The fleet's addresses keep their places at accept while new ones flood (server.py).
        self.server.remember_addresses(self.fleet.addresses())
        log.info("primed: %d agent(s), %d schedule(s), %d job(s)", len(self.store.agents.objects),
                 len(self.store.schedules.objects), len(self.store.jobs.objects))

    # --- watch events (kopf's) ---------------------------------------------------------------

    def observe(self, plural: str, event_type: str | None, body: Mapping[str, Any]) -> None:
        collection = self._collection(plural)
        self.relists.observed(plural, ObjectKey.of(body))
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
        scope = self.relists.event(plural, event_type, ObjectKey.of(body), self._collection(plural).objects)
        if scope is not None:
            log.info("%s %s: the watch listed them again (it was gone); objects the listing does not bring are "
                     "read in %.0f s", plural, scope[1] or "in every namespace", RELIST_SETTLE)
            self.relist_checks.mark(scope, delay=RELIST_SETTLE)

    async def _check_relisted(self, scope: Scope) -> None:
        """Read each object of the view a listing again did not bring: gone, it leaves the view;
        there, it is taken as read."""
        plural = scope[0]
        suspects = list(self.relists.take(scope))
        for index, key in enumerate(suspects):
            held = self._collection(plural).get(key)
            if held is None:
                continue
            try:
                body = await (self._kube.get_secret(key) if plural == "secrets" else self._kube.get(plural, key))
            except NotFound:
                body = None
            except KubeError:
                self.relists.give_back(scope, suspects[index:])
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
            self.fleet.token_secret_changed(change.old, change.new)
        elif plural == "repositories":
            self._repository_changed(change.old, change.new)
        elif plural == "pods":
            self.fleet.pod_changed(change)
        else:
            self._job_changed(change.old, change.new)

    def _agent_changed(self, old: Agent | None, new: Agent | None) -> None:
        if new is None:
            assert old is not None
            self.fleet.forget(old)
            self.writer.forget("agents", old.key)
            self.schedules.moved(old.key, self.index.remove_agent(old.key))
            self.fleet.reconciles.mark(old.key)  # ends its connection
            return
        if old is not None and only_status_changed(old, new):
            return
        if old is not None and old.uid != new.uid:
            self.fleet.forget(old)
        moved = self.index.put_agent(new)
        if moved:
            self.pusher.request([new.key])
        self.schedules.moved(new.key, moved)
        self.fleet.reconciles.mark(new.key)

    def _schedule_changed(self, old: Schedule | None, new: Schedule | None) -> None:
        if new is None:
            assert old is not None
            self.pusher.request(self.index.remove_schedule(old.key))
            self.schedules.forget(old)
            self.firing.forget(old, deleted=True)
            self.writer.forget("schedules", old.key)
            return
        if old is not None and only_status_changed(old, new):
            return
        if old is not None and old.uid != new.uid:
            self.schedules.forget(old)
            self.firing.forget(old, deleted=False)
        self.firing.remember(new)
        pushed = self.index.put_schedule(new)
        self.pusher.request(pushed)
        # An agent given a new generation acks it in moments, and its ack writes the status at
        # once; until then the write waits, so an apply costs one status write, not two.
        acking = pushed & set(self.index.agents_of(new.key)) if self.schedules.cannot_run(new) is None else set()
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

    # --- agents: the session handler --------------------------------------------------------

    async def on_connect(self, session: Session) -> None:
        self.fleet.connected(session)
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
        self.fleet.disconnected(session)
        for schedule in self.index.schedules_of(session.agent):
            self.writer.mark("schedules", schedule.key)

    def on_refused(self, agent: ObjectKey, reason: str, message: str) -> None:
        self.fleet.refused(agent, reason, message)

    async def on_message(self, session: Session, frame: protocol.Frame) -> None:
        self.fleet.seen(session)
        match frame.payload:
            case protocol.ScheduleAck() as ack:
                self.schedules.acked(session.agent, ack)
                self.fleet.acked(session, ack.version)
            case protocol.ScheduleFire() as fire:
                await self.firing.on_fire(session, fire, frame_id=frame.id)
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

    # --- status rendering -------------------------------------------------------------------

    def _render(self, target: Target) -> Rendered | None:
        if target.plural == "schedules":
            schedule = self.store.schedules.get(target.key)
            return None if schedule is None or schedule.deleting else self.schedules.render(schedule)
        if target.plural == "resticjobs":
            job = self.store.jobs.get(target.key)
            return None if job is None else Rendered(job.uid, job.status, self.dispatcher.status_of(job))
        agent = self.store.agents.get(target.key)
        return None if agent is None else Rendered(agent.uid, agent.status, self.fleet.status(agent))

    def _metrics_view(self) -> metrics.View:
        """The gauges' view of the Schedules, Agents and Repositories (metrics.py)."""
        now = self._clock()
        view = metrics.View()
        for schedule in self.store.schedules:
            compiled = compile_schedule(schedule)
            if isinstance(compiled, cron.Cron):
                first, second = compiled.iter_after(now, count=2)
                view.intervals.append((schedule.key.namespace, schedule.key.name, (second - first).total_seconds()))
            book = self.schedules.books.get(schedule.uid)
            if book is None:
                continue
            runs = self.schedules.cannot_run(schedule) is None
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
