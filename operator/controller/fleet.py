"""The Agents: the status the operator owns for each one, its token Secret, and the end of a
connection whose credential no longer holds.

An Agent's token Secret is watched: deleting it (or changing the token) rotates the token and
disconnects at once an agent still connected with the old one. An in-cluster agent's
credential is its pod's: when the pod goes, so does its session.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from typing import Any

from restic_manager.operator.agents import identity
from restic_manager.operator.agents.authenticator import NodeAgents
from restic_manager.operator.agents.server import AgentServer, Session
from restic_manager.operator.kits.coalesce import CoalescingLoop
from restic_manager.operator.kube.api import TOKEN_KEY, ObjectKey, format_time, owner_reference, token_secret_name
from restic_manager.operator.kube.cache import Agent, AgentPod, Change, Store, TokenSecret
from restic_manager.operator.kube.client import AlreadyExists, Kube, KubeError, new_token
from restic_manager.operator.kube.events import Recorder, involved
from restic_manager.operator.status import rendering as statuses
from restic_manager.operator.status.writer import LAST_SEEN_INTERVAL, StatusWriter

log = logging.getLogger(__name__)

# After a start, how long an Agent the last operator saw connected may take to reconnect
# before its status says it is not.
RECONNECT_GRACE = 60.0
# The uids of agent pods last seen deleted. A connection whose TokenReview was answered just
# before its pod went, and that registers after the deletion was seen, is still ended.
GONE_PODS_KEPT = 1024


@dataclasses.dataclass(kw_only=True, eq=False)
class Fleet:
    kube: Kube
    store: Store
    server: AgentServer
    writer: StatusWriter
    events: Recorder
    clock: Callable[[], datetime]
    node_agents: NodeAgents | None
    created: Callable[[str, Mapping[str, Any]], None]  # puts an object the operator created into the view
    # By Agent uid: the status the operator owns.
    _status: dict[str, dict[str, Any]] = dataclasses.field(init=False, default_factory=dict)
    _gone_pods: collections.OrderedDict[str, None] = dataclasses.field(init=False,
                                                                       default_factory=collections.OrderedDict)
    _primed_at: datetime | None = dataclasses.field(init=False, default=None)

    def __post_init__(self) -> None:
        self.reconciles = CoalescingLoop[ObjectKey]("agent", self._reconcile, transient=(KubeError,))

    def primed(self) -> None:
        """The view is complete: every Agent is looked at once the reconnect grace is over."""
        self._primed_at = self.clock()
        for agent in self.store.agents:
            self.reconciles.mark(agent.key, delay=RECONNECT_GRACE)

    def addresses(self) -> Iterable[str]:
        """Where the Agents last connected from."""
        return (agent.status["address"] for agent in self.store.agents
                if isinstance(agent.status.get("address"), str))

    # --- the view ---------------------------------------------------------------------------

    def forget(self, agent: Agent) -> None:
        """The Agent is gone, or another Agent of its name took its place."""
        self._status.pop(agent.uid, None)

    def token_secret_changed(self, old: TokenSecret | None, new: TokenSecret | None) -> None:
        secret = new or old
        assert secret is not None
        if secret.agent:
            self.reconciles.mark(ObjectKey(secret.key.namespace, secret.agent))  # recreate it, revoke the old token

    def pod_changed(self, change: Change[AgentPod]) -> None:
        if change.new is not None or change.old is None or self.node_agents is None:
            return
        self._gone_pods[change.old.uid] = None
        while len(self._gone_pods) > GONE_PODS_KEPT:
            self._gone_pods.popitem(last=False)
        if change.old.node_name:
            self.reconciles.mark(ObjectKey(self.node_agents.namespace, change.old.node_name))

    # --- status -----------------------------------------------------------------------------

    def status(self, agent: Agent) -> dict[str, Any]:
        if agent.uid not in self._status:
            self._status[agent.uid] = dict(agent.status)
        return self._status[agent.uid]

    def _set_status(self, agent: Agent, new: dict[str, Any], *, delay: float = 0.0) -> None:
        if new != self.status(agent):
            self._status[agent.uid] = new
            self.writer.mark("agents", agent.key, delay=delay)

    def reconnect_grace_over(self) -> bool:
        if self._primed_at is None:
            return False
        return (self.clock() - self._primed_at).total_seconds() >= RECONNECT_GRACE

    # --- tokens and credentials -------------------------------------------------------------

    async def _reconcile(self, key: ObjectKey) -> None:
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
            now = self.clock().timestamp()
            credential = session.identity
            why = identity.revoked(credential, node_name=agent.node_name,
                                   digest=secret.digest if secret is not None else None, now=now,
                                   pod_gone=credential.credential in self._gone_pods)
            if why is not None:
                await self.server.revoke(key, why)
            elif credential.expires_at is not None:
                self.reconciles.mark(key, delay=credential.expires_at - now)  # to end it when its token expires
        status = self.status(agent)
        if session is None and status.get("connected") and self.reconnect_grace_over():
            self._set_status(agent, statuses.agent_disconnected(
                status, why="not reconnected since the operator restarted", now=self.clock()))

    async def _create_token(self, agent: Agent) -> TokenSecret | None:
        """Issue the Agent a new token in its token Secret and name the Secret in its status."""
        key = ObjectKey(agent.key.namespace, token_secret_name(agent.key.name))
        try:
            body = await self.kube.create_secret(key, {TOKEN_KEY: new_token()},
                                                  owner=owner_reference("Agent", agent.key, agent.uid))
        except AlreadyExists:
            # Not in the watched view, so not this Agent's: another Agent's of the same name
            # awaiting garbage collection, or a Secret someone made. Its deletion brings us back.
            log.warning("Agent %s: Secret %s exists but is not this Agent's token Secret; a token is issued "
                        "once it is gone", agent.key, key.name)
            return None
        log.info("Agent %s: issued a new token in Secret %s", agent.key, key.name)
        self._set_status(agent, {**self.status(agent), "tokenSecretName": key.name})
        self.created("secrets", body)
        return self.store.token_secret_of(agent)

    # --- sessions ---------------------------------------------------------------------------

    def connected(self, session: Session) -> None:
        if session.identity.method is identity.Method.SERVICE_ACCOUNT:
            self.reconciles.mark(session.agent)  # its pod may be gone already; its token expires
        agent = self.store.agents.get(session.agent)
        if agent is None:
            return
        status = self.status(agent)
        about = involved("Agent", agent.key, agent.uid)
        # An agent coming back to a restarted operator is not news: the operator's start is.
        if not (status.get("connected") and not self.reconnect_grace_over()):
            self.events.record(about, type="Normal", reason="Connected",
                                message=f"connected from {session.peer} (host {session.hello.hostname}, "
                                        f"agent {session.hello.agent_version}, restic {session.hello.restic_version})")
        if session.replaced:
            self.events.record(about, type="Warning", reason="Replaced",
                                message=statuses.REPLACED.format(new=session.peer, old=session.replaced))
        self._set_status(agent, statuses.agent_connected(
            status, session.hello, peer=session.peer, now=self.clock(), replaced=session.replaced))

    def disconnected(self, session: Session) -> None:
        agent = self.store.agents.get(session.agent)
        if agent is None:
            return
        why = f"connection from {session.peer} closed (code {session.connection.close_code})"
        self.events.record(involved("Agent", agent.key, agent.uid), type="Normal", reason="Disconnected",
                            message=why)
        self._set_status(agent, statuses.agent_disconnected(self.status(agent), why=why, now=self.clock()))

    def refused(self, agent: ObjectKey, reason: str, message: str) -> None:
        known = self.store.agents.get(agent)
        if known is not None:
            self.events.record(involved("Agent", known.key, known.uid), type="Warning", reason=reason,
                                message=f"refused: {message}")

    def seen(self, session: Session) -> None:
        agent = self.store.agents.get(session.agent)
        if agent is not None:
            self._status[agent.uid] = {**self.status(agent), "lastSeen": format_time(self.clock())}
            self.writer.mark("agents", agent.key, delay=LAST_SEEN_INTERVAL)

    def acked(self, session: Session, version: int) -> None:
        agent = self.store.agents.get(session.agent)
        if agent is not None:
            status = self.status(agent)
            # Informational, like lastSeen: written with it, not once per ack. Only an Agent's
            # first (that it has applied a set at all) is written at once.
            delay = LAST_SEEN_INTERVAL if "appliedVersion" in status else 0.0
            self._set_status(agent, {**status, "appliedVersion": version}, delay=delay)
