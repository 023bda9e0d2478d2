"""The I/O shell around :mod:`~restic_manager.operator.agents.identity`: the credential an agent
presents at the handshake becomes an :class:`~restic_manager.operator.agents.identity.Identity`.

A host agent's token is checked against the token Secrets the operator watches, in memory:
an unauthenticated handshake never costs an API call. An in-cluster agent's ServiceAccount
token is verified against the cluster's issuer keys first, in memory, so a flood of forged
tokens costs a signature check each and never a TokenReview; one that verifies is then
checked by TokenReview (a few at a time). The keys are read at the first such handshake and
again when a token names a key they lack, at most every :data:`KEYS_REFRESH_INTERVAL`; while
they cannot be read, TokenReview alone decides. The Agent named after its node is created
the first time that node's agent connects.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from restic_manager.operator.agents import identity
from restic_manager.operator.agents.identity import AuthError, Identity, Method
from restic_manager.operator.kube.api import API_VERSION, ObjectKey
from restic_manager.operator.kube.cache import Store, token_digest
from restic_manager.operator.kube.client import MANAGED_BY, AlreadyExists, Kube, KubeError

log = logging.getLogger(__name__)

CONCURRENT_REVIEWS = 4  # TokenReviews in flight at once; more handshakes wait their turn
KEYS_REFRESH_INTERVAL = 30.0  # seconds between reads of the issuer's keys, whatever tokens arrive


@dataclass(frozen=True)
class NodeAgents:
    """The in-cluster agents: the one ServiceAccount they run as, the audience their
    projected tokens carry, and the namespace their per-node Agents live in."""

    service_account: ObjectKey
    namespace: str
    audience: str = identity.DEFAULT_AUDIENCE


def node_agent_body(node: str, namespace: str) -> dict[str, Any]:
    return {"apiVersion": API_VERSION, "kind": "Agent",
            "metadata": {"name": node, "namespace": namespace, "labels": dict(MANAGED_BY)},
            "spec": {"nodeName": node}}


class Authenticator:
    def __init__(
        self,
        *,
        store: Store,
        kube: Kube,
        primed: asyncio.Event,
        node_agents: NodeAgents | None,
        register: Callable[[Mapping[str, Any]], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._kube = kube
        self._primed = primed
        self._node_agents = node_agents
        self._register = register  # takes an Agent the authenticator created into the view
        self._reviews = asyncio.Semaphore(CONCURRENT_REVIEWS)
        self._clock = clock
        self._keys: identity.IssuerKeys | None = None
        self._keys_lock = asyncio.Lock()
        self._keys_next_read = float("-inf")

    async def authenticate(self, token: str) -> Identity:
        """Who presents ``token``; raises AuthError saying why nobody does."""
        await self._primed.wait()
        if identity.is_service_account_token(token):
            return await self._service_account(token)
        return self._host_token(token)

    def _host_token(self, token: str) -> Identity:
        owner = identity.find_token_owner(self._store, token)
        if owner is None:
            raise AuthError(HTTPStatus.UNAUTHORIZED, "unknown-token", "the token is not that of any Agent")
        if owner.deleting:
            raise AuthError(HTTPStatus.FORBIDDEN, "agent-deleting", f"Agent {owner.key} is being deleted")
        return Identity(owner.key, Method.TOKEN, token_digest(token).hex())

    async def _service_account(self, token: str) -> Identity:
        config = self._node_agents
        if config is None:
            raise AuthError(HTTPStatus.UNAUTHORIZED, "service-account-token",
                            "a ServiceAccount token, but no agent ServiceAccount is configured "
                            "(--agent-service-account)")
        identity.check_audience(token, config.audience)
        await self._verify(token, config)
        async with self._reviews:
            try:
                review = await self._kube.token_review(token, audiences=[config.audience])
            except KubeError as error:
                raise AuthError(HTTPStatus.SERVICE_UNAVAILABLE, "tokenreview-failed", str(error)) from None
        node, pod = identity.node_of_review(review, audience=config.audience,
                                            service_account=config.service_account)
        key = ObjectKey(config.namespace, node)
        agent = self._store.agents.get(key)
        if agent is None:
            await self._create_node_agent(key)
            agent = self._store.agents.get(key)
        if agent is None or agent.deleting:
            raise AuthError(HTTPStatus.FORBIDDEN, "agent-deleting", f"Agent {key} is being deleted")
        if agent.node_name != node:
            raise AuthError(HTTPStatus.FORBIDDEN, "not-a-node-agent",
                            f"Agent {key} exists but is not the Agent of node {node} "
                            f"(spec.nodeName {agent.node_name!r})")
        return Identity(key, Method.SERVICE_ACCOUNT, pod, expires_at=identity.claimed_expiry(token))

    async def _verify(self, token: str, config: NodeAgents) -> None:
        """Refuse a token the cluster did not sign for the agent ServiceAccount; pass it
        unverified when the issuer's keys cannot be read (the TokenReview still decides)."""
        keys = await self._issuer_keys(refresh=False)
        if keys is None:
            return
        try:
            identity.verified_claims(token, keys, audience=config.audience, service_account=config.service_account)
        except identity.UnknownSigningKey:
            keys = await self._issuer_keys(refresh=True)  # the issuer may have a new key since
            if keys is not None:
                identity.verified_claims(token, keys, audience=config.audience,
                                         service_account=config.service_account)

    async def _issuer_keys(self, *, refresh: bool) -> identity.IssuerKeys | None:
        """The issuer's keys, read again when ``refresh`` (or never read yet) and the last read
        is :data:`KEYS_REFRESH_INTERVAL` old: tokens naming made-up keys cost one read a period."""
        async with self._keys_lock:
            if (self._keys is None or refresh) and self._clock() >= self._keys_next_read:
                self._keys_next_read = self._clock() + KEYS_REFRESH_INTERVAL
                try:
                    self._keys = identity.IssuerKeys(await self._kube.issuer_keys())
                    log.info("read %d ServiceAccount issuer key(s)", len(self._keys))
                except (KubeError, ValueError) as error:
                    log.warning("cannot read the ServiceAccount issuer's keys (%s); %s", error,
                                "keeping the ones read before" if self._keys else
                                "TokenReview alone decides until they can be read")
            return self._keys

    async def _create_node_agent(self, key: ObjectKey) -> None:
        try:
            try:
                created = await self._kube.create("agents", node_agent_body(key.name, key.namespace))
                log.info("Agent %s registered for node %s", key, key.name)
            except AlreadyExists:
                created = await self._kube.get("agents", key)  # another connection of the node was first
        except KubeError as error:
            raise AuthError(HTTPStatus.SERVICE_UNAVAILABLE, "agent-registration-failed", str(error)) from None
        self._register(created)
