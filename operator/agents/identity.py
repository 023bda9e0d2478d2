"""Who an agent is, decided from the credential it presents at the WebSocket handshake.

Two kinds of credential, told apart by their shape:

* a host agent's **token**: random (256 bits, URL-safe, no dots), issued in its Agent's
  token Secret. The operator keeps only SHA-256 digests and finds the presented token's
  digest among them by lookup (:func:`find_token_owner`).
* an in-cluster agent's **projected ServiceAccount token**: a JWT (three dot-separated
  parts). Before anything is asked of the API it must carry our audience, verify against
  the cluster's ServiceAccount issuer keys (:func:`verified_claims`: signed by the cluster,
  not expired, of the agent ServiceAccount), so a forged or foreign token never costs a
  TokenReview; then the apiserver's TokenReview answer decides (:func:`node_of_review`):
  still valid (its pod exists), for our audience, by the one agent ServiceAccount, bound to
  a pod on a node. The node name comes from that binding, not
  from what the agent says in ``hello``: the apiserver attests where the pod runs, so one
  node's agent cannot pose as another's.

Everything here is pure; :mod:`~restic_manager.operator.agents.authenticator` does the I/O.
A refusal is an :class:`AuthError` carrying the HTTP status the handshake gets, a short
reason (the metrics label) and a detail for the operator's log only.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hmac
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import jwt

from restic_manager import protocol
from restic_manager.operator.kube.api import ObjectKey
from restic_manager.operator.kube.cache import Agent, Store, token_digest

DEFAULT_AUDIENCE = "restic-manager"
NODE_NAME_EXTRA = "authentication.kubernetes.io/node-name"
POD_UID_EXTRA = "authentication.kubernetes.io/pod-uid"
MAX_TOKEN_LENGTH = 16 * 1024  # far above any real token; bounds the work on junk
_JWT = re.compile(r"^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*$")


class AuthError(Exception):
    """An agent may not connect. ``str()`` is for the operator's log, never for the agent."""

    def __init__(self, status: HTTPStatus, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.reason = reason


class Method(enum.Enum):
    TOKEN = "token"
    SERVICE_ACCOUNT = "serviceaccount"


@dataclass(frozen=True)
class Identity:
    """An authenticated agent: its Agent, how it proved it, and the credential to revoke by
    (the token's SHA-256 in hex, or the pod uid the ServiceAccount token is bound to)."""

    agent: ObjectKey
    method: Method
    credential: str
    # When a ServiceAccount token stops being valid (its ``exp``, seconds since the epoch).
    expires_at: float | None = None


def is_service_account_token(token: str) -> bool:
    """Whether ``token`` has a JWT's shape (agent tokens never contain dots)."""
    return len(token) <= MAX_TOKEN_LENGTH and _JWT.match(token) is not None


def find_token_owner(store: Store, token: str) -> Agent | None:
    """The host Agent (not a node's) whose own token Secret holds ``token``.

    Looked up by the token's digest, not compared with every Agent's: what a lookup's timing
    can reveal is about the SHA-256 of a 256-bit random token, which tells nothing about the
    token, and a handshake costs the same at 10 or 10,000 Agents.
    """
    for secret in store.token_secrets.in_group(token_digest(token)):
        agent = store.agents.get(ObjectKey(secret.key.namespace, secret.agent))
        if agent is not None and not agent.node_name and store.token_secret_of(agent) is secret:
            return agent
    return None


def _claims(token: str) -> dict[str, Any]:
    """A JWT's claims, unverified: whether they hold is the TokenReview's to say."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError, binascii.Error, UnicodeDecodeError, RecursionError):
        return {}
    return claims if isinstance(claims, dict) else {}


def claimed_audiences(token: str) -> list[str]:
    """The ``aud`` claim of a JWT, unverified: only to skip a TokenReview that cannot succeed."""
    audience = _claims(token).get("aud")
    if isinstance(audience, str):
        return [audience]
    return [a for a in audience if isinstance(a, str)] if isinstance(audience, list) else []


def claimed_expiry(token: str) -> float | None:
    """The ``exp`` claim of a JWT the TokenReview accepted (so the apiserver signed it), if any."""
    expiry = _claims(token).get("exp")
    return float(expiry) if isinstance(expiry, (int, float)) and not isinstance(expiry, bool) else None


def check_audience(token: str, audience: str) -> None:
    if audience not in claimed_audiences(token):
        raise AuthError(HTTPStatus.UNAUTHORIZED, "wrong-audience",
                        f"a ServiceAccount token whose audience is not {audience!r}")


class UnknownSigningKey(AuthError):
    """The token names a signing key the issuer's keys do not hold (they may have rotated)."""

    def __init__(self, kid: object) -> None:
        super().__init__(HTTPStatus.UNAUTHORIZED, "unverified-token",
                         f"a ServiceAccount token signed with key {kid!r}, which the cluster's issuer does not hold")


class IssuerKeys:
    """The public keys the cluster's ServiceAccount issuer signs tokens with: its JWKS
    (``/openid/v1/jwks``). Raises ValueError for a document that holds no usable key."""

    def __init__(self, jwks: Mapping[str, Any]) -> None:
        try:
            keys = jwt.PyJWKSet.from_dict(dict(jwks)).keys
        except (jwt.PyJWTError, KeyError, TypeError, AttributeError) as error:
            raise ValueError(f"the issuer's JWKS holds no usable key: {error}") from None
        self._by_id = {key.key_id: key for key in keys}

    def __len__(self) -> int:
        return len(self._by_id)

    def get(self, kid: object) -> jwt.PyJWK | None:
        return self._by_id.get(kid) if isinstance(kid, str) else None


def verified_claims(token: str, keys: IssuerKeys, *, audience: str, service_account: ObjectKey) -> dict[str, Any]:
    """The claims of a ServiceAccount token the cluster signed, for ``audience``, not
    expired, of ``service_account``; an AuthError (:class:`UnknownSigningKey` for a key
    ``keys`` lacks) otherwise. Only a signature check: whether the token still holds (its
    pod exists) is the TokenReview's to say."""
    try:
        kid = jwt.get_unverified_header(token).get("kid")
    except jwt.PyJWTError as error:
        raise AuthError(HTTPStatus.UNAUTHORIZED, "unverified-token", f"a malformed ServiceAccount token: {error}") from None
    key = keys.get(kid)
    if key is None:
        raise UnknownSigningKey(kid)
    try:
        claims = jwt.decode(token, key, algorithms=[key.algorithm_name], audience=audience,
                            options={"require": ["exp", "sub"]})
    except jwt.ExpiredSignatureError:
        raise AuthError(HTTPStatus.UNAUTHORIZED, "token-expired", "the ServiceAccount token has expired") from None
    except jwt.InvalidAudienceError:
        raise AuthError(HTTPStatus.UNAUTHORIZED, "wrong-audience",
                        f"a ServiceAccount token whose audience is not {audience!r}") from None
    except jwt.PyJWTError as error:
        raise AuthError(HTTPStatus.UNAUTHORIZED, "unverified-token",
                        f"a ServiceAccount token that does not verify against the cluster's issuer keys: {error}"
                        ) from None
    expected = f"system:serviceaccount:{service_account.namespace}:{service_account.name}"
    if claims["sub"] != expected:
        raise AuthError(HTTPStatus.FORBIDDEN, "wrong-service-account",
                        f"the token of {claims['sub']!r}, not of the agent ServiceAccount {service_account}")
    return claims


def node_of_review(status: Mapping[str, Any], *, audience: str, service_account: ObjectKey) -> tuple[str, str]:
    """(node name, pod uid) from a TokenReview's ``status``, or why the token is refused."""
    if not status.get("authenticated"):
        raise AuthError(HTTPStatus.UNAUTHORIZED, "token-invalid",
                        f"TokenReview: not authenticated ({status.get('error') or 'no reason given'})")
    if audience not in (status.get("audiences") or ()):
        raise AuthError(HTTPStatus.UNAUTHORIZED, "wrong-audience",
                        f"TokenReview: the token is not valid for audience {audience!r}")
    user = status.get("user") or {}
    expected = f"system:serviceaccount:{service_account.namespace}:{service_account.name}"
    if user.get("username") != expected:
        raise AuthError(HTTPStatus.FORBIDDEN, "wrong-service-account",
                        f"TokenReview: {user.get('username')!r} is not the agent ServiceAccount {service_account}")
    extra = user.get("extra") or {}
    nodes = extra.get(NODE_NAME_EXTRA) or []
    if len(nodes) != 1 or not isinstance(nodes[0], str):
        raise AuthError(HTTPStatus.FORBIDDEN, "no-node-binding",
                        "the ServiceAccount token is not bound to a pod on a node "
                        "(a projected token of a DaemonSet pod is; Kubernetes 1.30 or newer)")
    node = nodes[0]
    if not protocol.is_object_name(node):
        raise AuthError(HTTPStatus.FORBIDDEN, "no-node-binding", f"node name {node!r} is not a valid Agent name")
    pods = extra.get(POD_UID_EXTRA) or [""]
    return node, str(pods[0])


def revoked(identity: Identity, *, node_name: str, digest: bytes | None, now: float,
            pod_gone: bool = False) -> str | None:
    """Why a connected agent's credential no longer holds for its Agent, or None.

    ``node_name`` is the Agent's spec.nodeName; ``digest`` its token Secret's digest now;
    ``now`` seconds since the epoch; ``pod_gone`` whether the pod a ServiceAccount token is
    bound to is deleted or being deleted.
    """
    if identity.method is Method.TOKEN:
        if node_name:
            return f"Agent {identity.agent} is now the Agent of node {node_name}; tokens no longer apply"
        if digest is None or not hmac.compare_digest(digest.hex(), identity.credential):
            return f"the token of Agent {identity.agent} was rotated"
        return None
    if node_name != identity.agent.name:
        return f"Agent {identity.agent} is no longer the Agent of node {identity.agent.name}"
    if pod_gone:
        return f"the pod (uid {identity.credential}) its ServiceAccount token is bound to was deleted"
    if identity.expires_at is not None and now >= identity.expires_at:
        return "its ServiceAccount token expired"
    return None
