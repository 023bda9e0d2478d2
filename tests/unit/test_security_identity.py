"""The pure security decisions, as tables: who a credential belongs to, whether a TokenReview
answer lets an in-cluster agent in, when a connection's credential is revoked, the
per-connection rate, and what makes a Schedule invalid."""

from __future__ import annotations

import base64
import dataclasses
import json
from http import HTTPStatus
from collections.abc import Callable
from typing import Any

import pytest

from restic_manager.operator.agents import identity
from restic_manager.operator.agents.identity import AuthError, Identity, Method
from restic_manager.operator.agents.limits import HandshakeGate, LogBudget, TokenBucket
from restic_manager.operator.kube.api import ObjectKey, token_secret_name
from restic_manager.operator.kube.cache import Agent, Store, TokenSecret, token_digest
from restic_manager.operator.kube.client import new_token
from restic_manager.operator.metrics import Metrics
from restic_manager.operator.validation import schedule_problems

from support.issuer import Issuer

SA = ObjectKey("backup", "restic-manager-agent")
AUDIENCE = "restic-manager"


def jwt(claims: dict[str, Any]) -> str:
    def part(value: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")
    return f"{part({'alg': 'RS256'})}.{part(claims)}.c2lnbmF0dXJl"


# --- host agents' tokens -----------------------------------------------------------------


def test_issued_tokens_carry_256_bits_and_never_look_like_a_jwt() -> None:
    tokens = {new_token() for _ in range(100)}
    assert len(tokens) == 100
    for token in tokens:
        assert len(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))) == 32
        assert not identity.is_service_account_token(token)


def test_a_token_belongs_to_the_host_agent_whose_own_secret_holds_it() -> None:
    store = Store()
    for namespace, name, uid, token, node in (("a", "web-01", "u1", "tok-1", ""), ("b", "web-01", "u2", "tok-2", ""),
                                              ("b", "stale", "u3", "tok-4", ""), ("b", "node-1", "u5", "tok-5", "n1")):
        store.agents.upsert({"metadata": {"name": name, "namespace": namespace, "uid": uid, "resourceVersion": "1"},
                             "spec": {"nodeName": node} if node else {}})
        owner = "uid-of-an-older-agent" if name == "stale" else uid
        store.token_secrets.upsert(secret_body(token=token, owner_uid=owner) | {"metadata": {
            **secret_body(token=token)["metadata"], "name": token_secret_name(name), "namespace": namespace,
            "uid": f"s-{uid}", "ownerReferences": [{"apiVersion": "resticmanager.io/v1alpha1", "kind": "Agent",
                                                    "name": name, "uid": owner}]}})

    def owner(token: str) -> ObjectKey | None:
        agent = identity.find_token_owner(store, token)
        return agent.key if agent is not None else None

    assert owner("tok-2") == ObjectKey("b", "web-01")
    assert owner(" tok-1\n") == ObjectKey("a", "web-01")  # as read from a file
    assert owner("tok-3") is None
    assert owner("tok-4") is None  # its Secret belongs to an Agent of that name that is gone
    assert owner("tok-5") is None  # a node's agent proves itself with its pod's token, not this one
    assert identity.find_token_owner(Store(), "tok-1") is None


def secret_body(*, token: str | None, owner_uid: str = "uid-web-01", data: Any = None) -> dict[str, Any]:
    encoded = {"token": base64.b64encode(token.encode()).decode()} if token is not None else {}
    return {"metadata": {"name": "web-01-agent-token", "namespace": "ns", "uid": "s1", "resourceVersion": "3",
                         "ownerReferences": [{"apiVersion": "resticmanager.io/v1alpha1", "kind": "Agent",
                                              "name": "web-01", "uid": owner_uid}]},
            "data": encoded if data is None else data}


@pytest.mark.parametrize(("case", "body", "counts"), [
    ("owned by the Agent", secret_body(token="tok"), True),
    ("owned by an older Agent of that name", secret_body(token="tok", owner_uid="uid-old"), False),
    ("empty", secret_body(token=""), False),
    ("no token key", secret_body(token=None), False),
    ("not base64", secret_body(token=None, data={"token": "%%%"}), False),
])
def test_only_a_token_secret_the_agent_owns_counts(case: str, body: dict[str, Any], counts: bool) -> None:
    store = Store()
    store.agents.upsert({"metadata": {"name": "web-01", "namespace": "ns", "uid": "uid-web-01",
                                      "resourceVersion": "1"}})
    store.token_secrets.upsert(body)
    [agent] = list(store.agents)
    secret = store.token_secret_of(agent)
    assert (secret is not None and secret.digest is not None) == counts, case
    if counts:
        assert secret is not None and secret.digest == token_digest("tok")


def test_the_operator_keeps_a_tokens_digest_never_the_token() -> None:
    secret = TokenSecret.from_body(secret_body(token="tok-secret"))
    assert "tok-secret" not in repr(secret) and secret.digest == token_digest("tok-secret")


# --- in-cluster agents' ServiceAccount tokens ----------------------------------------------


@pytest.mark.parametrize(("token", "is_jwt"), [
    (jwt({"aud": [AUDIENCE]}), True),
    ("eyJhbGciOiJSUzI1NiJ9.eyJhIjoxfQ.", True),
    ("abc_DEF-123", False),
    ("a.b", False),
    ("a.b.c.d", False),
    ("x" * 20000 + ".y.z", False),
])
def test_a_serviceaccount_token_is_told_apart_by_its_shape(token: str, is_jwt: bool) -> None:
    assert identity.is_service_account_token(token) is is_jwt


@pytest.mark.parametrize(("token", "audiences"), [
    (jwt({"aud": [AUDIENCE, "other"]}), [AUDIENCE, "other"]),
    (jwt({"aud": AUDIENCE}), [AUDIENCE]),
    (jwt({"aud": 7}), []),
    (jwt({}), []),
    ("eyJ.!!!.x", []),
    ("a.bm90IGpzb24.c", []),
])
def test_the_claimed_audience_is_read_without_trusting_it(token: str, audiences: list[str]) -> None:
    assert identity.claimed_audiences(token) == audiences


def test_a_token_for_another_audience_is_refused_before_any_tokenreview() -> None:
    with pytest.raises(AuthError) as refused:
        identity.check_audience(jwt({"aud": ["https://kubernetes.default.svc"]}), AUDIENCE)
    assert (refused.value.status, refused.value.reason) == (HTTPStatus.UNAUTHORIZED, "wrong-audience")
    identity.check_audience(jwt({"aud": [AUDIENCE]}), AUDIENCE)


ISSUER = Issuer()
AGENT_SA = f"system:serviceaccount:{SA.namespace}:{SA.name}"


def tampered(token: str, **claims: Any) -> str:
    """``token`` with its claims changed after it was signed."""
    header, payload, signature = token.split(".")
    changed = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))) | claims
    return ".".join((header, base64.urlsafe_b64encode(json.dumps(changed).encode()).decode().rstrip("="), signature))


# Tokens are made when the test runs, not when it is collected: they expire.
@pytest.mark.parametrize(("token", "status", "reason"), [
    (lambda: ISSUER.token(sub=AGENT_SA), None, None),
    (lambda: Issuer().token(sub=AGENT_SA), HTTPStatus.UNAUTHORIZED, "unverified-token"),  # another key, the same kid
    (lambda: ISSUER.token(sub=AGENT_SA, kid="made-up"), HTTPStatus.UNAUTHORIZED, "unverified-token"),
    (lambda: tampered(ISSUER.token(sub="system:serviceaccount:backup:other"), sub=AGENT_SA),
     HTTPStatus.UNAUTHORIZED, "unverified-token"),
    (lambda: jwt({"sub": AGENT_SA, "aud": [AUDIENCE], "exp": 4102444800}), HTTPStatus.UNAUTHORIZED,
     "unverified-token"),
    (lambda: "eyJhbGciOiJub25lIiwia2lkIjoiaXNzdWVyLWtleS0xIn0.e30.", HTTPStatus.UNAUTHORIZED, "unverified-token"),
    (lambda: "not.a.jwt", HTTPStatus.UNAUTHORIZED, "unverified-token"),
    (lambda: ISSUER.token(sub=AGENT_SA, expires_in=-120), HTTPStatus.UNAUTHORIZED, "token-expired"),
    (lambda: ISSUER.token(sub=AGENT_SA, aud="someone-else"), HTTPStatus.UNAUTHORIZED, "wrong-audience"),
    (lambda: ISSUER.token(sub="system:serviceaccount:backup:other"), HTTPStatus.FORBIDDEN, "wrong-service-account"),
])
def test_only_a_token_the_cluster_signed_for_the_agent_serviceaccount_verifies(
        token: Callable[[], str], status: HTTPStatus | None, reason: str | None) -> None:
    keys = identity.IssuerKeys(ISSUER.jwks())
    if status is None:
        assert identity.verified_claims(token(), keys, audience=AUDIENCE, service_account=SA)["sub"] == AGENT_SA
        return
    with pytest.raises(AuthError) as refused:
        identity.verified_claims(token(), keys, audience=AUDIENCE, service_account=SA)
    assert (refused.value.status, refused.value.reason) == (status, reason)


def test_a_token_naming_a_key_the_issuer_lacks_says_so() -> None:
    """So the authenticator knows to read the keys again (they may have rotated)."""
    with pytest.raises(identity.UnknownSigningKey):
        identity.verified_claims(ISSUER.token(sub=AGENT_SA, kid="made-up"), identity.IssuerKeys(ISSUER.jwks()),
                                 audience=AUDIENCE, service_account=SA)


@pytest.mark.parametrize("jwks", [{}, {"keys": []}, {"keys": [{"kty": "nope"}]}, {"keys": "x"}, []])
def test_issuer_keys_that_hold_no_usable_key_are_refused(jwks: Any) -> None:
    with pytest.raises(ValueError, match="holds no usable key"):
        identity.IssuerKeys(jwks)


def review(*, authenticated: bool = True, audiences: tuple[str, ...] = (AUDIENCE,),
           username: str = f"system:serviceaccount:{SA.namespace}:{SA.name}",
           node: list[str] | None = None, pod: str = "pod-uid") -> dict[str, Any]:
    extra = {"authentication.kubernetes.io/pod-uid": [pod]}
    if node is not None:
        extra["authentication.kubernetes.io/node-name"] = node
    status: dict[str, Any] = {"authenticated": authenticated, "audiences": list(audiences),
                              "user": {"username": username, "extra": extra}}
    if not authenticated:
        status = {"error": "token has expired", "user": {}}
    return status


@pytest.mark.parametrize(("case", "status", "expected"), [
    ("a DaemonSet pod's token", review(node=["node-a"]), ("node-a", "pod-uid")),
    ("not authenticated", review(authenticated=False), (HTTPStatus.UNAUTHORIZED, "token-invalid")),
    ("for another audience", review(audiences=("other",), node=["node-a"]), (HTTPStatus.UNAUTHORIZED, "wrong-audience")),
    ("another ServiceAccount", review(username="system:serviceaccount:backup:default", node=["node-a"]),
     (HTTPStatus.FORBIDDEN, "wrong-service-account")),
    ("the same name in another namespace", review(username=f"system:serviceaccount:other:{SA.name}", node=["node-a"]),
     (HTTPStatus.FORBIDDEN, "wrong-service-account")),
    ("a user, not a ServiceAccount", review(username="admin", node=["node-a"]),
     (HTTPStatus.FORBIDDEN, "wrong-service-account")),
    ("not bound to a pod on a node", review(), (HTTPStatus.FORBIDDEN, "no-node-binding")),
    ("a node name that is no Agent name", review(node=["Node_A"]), (HTTPStatus.FORBIDDEN, "no-node-binding")),
    ("two node names", review(node=["a", "b"]), (HTTPStatus.FORBIDDEN, "no-node-binding")),
])
def test_a_tokenreview_answer_names_the_node_or_says_no(case: str, status: dict[str, Any],
                                                         expected: tuple[Any, Any]) -> None:
    if isinstance(expected[0], str):
        assert identity.node_of_review(status, audience=AUDIENCE, service_account=SA) == expected, case
        return
    with pytest.raises(AuthError) as refused:
        identity.node_of_review(status, audience=AUDIENCE, service_account=SA)
    assert (refused.value.status, refused.value.reason) == expected, case


TOKEN_IDENTITY = Identity(ObjectKey("ns", "web-01"), Method.TOKEN, token_digest("tok").hex())
NODE_IDENTITY = Identity(ObjectKey("backup", "node-a"), Method.SERVICE_ACCOUNT, "pod-uid", expires_at=1000.0)


@pytest.mark.parametrize(("case", "who", "node_name", "digest", "now", "pod_gone", "revoked"), [
    ("token unchanged", TOKEN_IDENTITY, "", token_digest("tok"), 999.0, False, None),
    ("token rotated", TOKEN_IDENTITY, "", token_digest("new"), 999.0, False, "was rotated"),
    ("token Secret deleted", TOKEN_IDENTITY, "", None, 999.0, False, "was rotated"),
    ("Agent became a node's", TOKEN_IDENTITY, "web-01", token_digest("tok"), 999.0, False, "tokens no longer apply"),
    ("host tokens do not expire", TOKEN_IDENTITY, "", token_digest("tok"), 10.0**10, False, None),
    ("node agent unchanged", NODE_IDENTITY, "node-a", None, 999.0, False, None),
    ("Agent no longer the node's", NODE_IDENTITY, "", None, 999.0, False, "no longer the Agent of node node-a"),
    ("its pod deleted", NODE_IDENTITY, "node-a", None, 999.0, True,
     "the pod (uid pod-uid) its ServiceAccount token is bound to was deleted"),
    ("its token expired", NODE_IDENTITY, "node-a", None, 1000.0, False, "its ServiceAccount token expired"),
    ("a token without exp", dataclasses.replace(NODE_IDENTITY, expires_at=None), "node-a", None, 10.0**10, False,
     None),
])
def test_a_connection_whose_credential_no_longer_holds_is_revoked(
        case: str, who: Identity, node_name: str, digest: bytes | None, now: float, pod_gone: bool,
        revoked: str | None) -> None:
    why = identity.revoked(who, node_name=node_name, digest=digest, now=now, pod_gone=pod_gone)
    assert (why is None) == (revoked is None), case
    assert revoked is None or (why is not None and revoked in why), (case, why)


@pytest.mark.parametrize(("claims", "expiry"), [
    ({"aud": ["restic-manager"], "exp": 1790000000}, 1790000000.0),
    ({"exp": 1790000000.5}, 1790000000.5),
    ({"exp": "1790000000"}, None),
    ({"exp": True}, None),
    ({}, None),
    (["not", "an", "object"], None),
])
def test_the_expiry_of_a_service_account_token_is_its_exp_claim(claims: object, expiry: float | None) -> None:
    payload = base64.urlsafe_b64encode(json.dumps(claims).encode()).decode().rstrip("=")
    assert identity.claimed_expiry(f"eyJhbGciOiJSUzI1NiJ9.{payload}.c2ln") == expiry
    assert identity.claimed_expiry("not-a-jwt") is None


def test_agents_parse_their_node_name_from_the_spec() -> None:
    body = {"metadata": {"name": "node-a", "namespace": "backup", "uid": "u", "resourceVersion": "1"},
            "spec": {"nodeName": "node-a"}}
    assert Agent.from_body(body).node_name == "node-a"
    assert Agent.from_body({**body, "spec": {}}).node_name == ""


# --- message rate --------------------------------------------------------------------------


def test_the_rate_limit_allows_a_burst_then_the_sustained_rate() -> None:
    bucket = TokenBucket(rate=10, burst=3, now=0.0)
    assert [bucket.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.take(0.05) is False   # half a token back
    assert bucket.take(0.1) is True     # one token back
    assert [bucket.take(10.0) for _ in range(4)] == [True, True, True, False]  # never above the burst


def test_the_log_budget_lets_a_few_lines_through_a_window_and_tells_how_many_it_held_back() -> None:
    budget = LogBudget(lines=2, window=60.0)
    assert [budget.take(t) for t in (0.0, 1.0, 2.0, 59.0)] == [0, 0, None, None]
    assert [budget.take(t) for t in (60.0, 61.0, 62.0)] == [2, 0, None]  # a new window: two were held back
    assert budget.take(500.0) == 1


def test_the_handshake_gate_admits_a_few_handshakes_per_address_until_they_settle() -> None:
    gate = HandshakeGate(per_address=2, from_new=10)
    a1, a2, a3, b1 = ("10.0.0.1", 1001), ("10.0.0.1", 1002), ("10.0.0.1", 1003), ("10.0.0.2", 1001)
    assert [gate.admit(p) for p in (a1, a2, a3, b1)] == [
        None, None, "2 handshakes from this address are in progress", None]
    gate.settle(a1)  # its credential decided
    gate.settle(a1)  # then it closed: settled once only
    assert (gate.admit(a3), gate.in_progress("10.0.0.1"), gate.admit(("10.0.0.1", 1004)) is None) == (None, 2, False)
    for peer in (a2, a3, b1):
        gate.settle(peer)
    gate.settle(("10.0.0.3", 1))  # never admitted
    assert [gate.in_progress(a) for a in ("10.0.0.1", "10.0.0.2", "10.0.0.3")] == [0, 0, 0]
    assert (gate.new_in_progress, gate._pending) == (0, {})  # nothing kept once all are settled


def test_new_addresses_share_a_few_places_and_known_ones_keep_theirs() -> None:
    gate = HandshakeGate(per_address=5, from_new=2, known_addresses=2)
    gate.remember(["10.0.0.9"])  # an address an agent connected from before
    flood = [(f"192.0.2.{i}", 1000) for i in range(3)]
    assert [gate.admit(p) for p in flood] == [
        None, None, "2 handshakes from addresses no agent has connected from are in progress"]
    assert gate.admit(("10.0.0.9", 1)) is None  # the fleet's addresses are not crowded out
    gate.settle(flood[0], authenticated=True)  # an agent's first connection from a new address
    assert (gate.new_in_progress, gate.admit(("192.0.2.0", 1001)), gate.admit(flood[2])) == (1, None, None)
    assert gate.admit(("192.0.2.7", 1)) is not None  # the new addresses' places are taken again
    # Only the most recent known_addresses are kept: 10.0.0.9 was the oldest of three.
    gate.settle(flood[1], authenticated=True)
    assert (gate.new_in_progress, gate.admit(("192.0.2.8", 1))) == (1, None)
    assert gate.admit(("10.0.0.9", 2)) is not None and gate.admit(("192.0.2.1", 2)) is None


# --- metrics -------------------------------------------------------------------------------


def test_the_counters_are_served_as_prometheus_text() -> None:
    metrics = Metrics()
    metrics.handshakes_refused["unknown-token"] += 2
    metrics.fires_refused['we"ird'] += 1
    text = metrics.exposition().decode()
    assert 'restic_manager_agent_handshakes_refused_total{reason="unknown-token"} 2.0\n' in text
    assert 'restic_manager_fires_refused_total{reason="we\\"ird"} 1.0\n' in text
    assert "# TYPE restic_manager_agent_frames_refused_total counter\n" in text
    # The library's own: the process and its garbage collector.
    assert "# TYPE process_resident_memory_bytes gauge\n" in text and "python_gc_collections_total" in text


# --- Schedule validation -------------------------------------------------------------------


GOOD = {"agent": "web-01", "repository": "offsite", "schedule": "0 2 * * *", "timeZone": "Europe/London",
        "template": {"type": "backup", "backup": {"paths": ["/etc"]}}}


@pytest.mark.parametrize(("case", "change", "expected"), [
    ("valid", {}, []),
    ("valid with H and seconds", {"schedule": "*/30 H * * * *"}, []),
    ("minute out of range", {"schedule": "61 * * * *"}, ["spec.schedule: '61 * * * *': minute must be 0-59"]),
    ("croniter's L is refused", {"schedule": "0 2 L * *"},
     ["spec.schedule: '0 2 L * *': day-of-month has 'L': L (the last day of the month) is not supported"]),
    ("too few fields", {"schedule": "* *"}, ["spec.schedule: '* *': expected 5 fields (or 6 with seconds first), got 2"]),
    ("unknown zone", {"timeZone": "Mars/Olympus"},
     ["spec.timeZone 'Mars/Olympus': not a known IANA time zone, e.g. UTC or Europe/London"]),
    ("a path as zone", {"timeZone": "../../etc/passwd"},
     ["spec.timeZone '../../etc/passwd': not a known IANA time zone, e.g. UTC or Europe/London"]),
    ("another namespace's Agent", {"agent": "team-b/web-01"},
     ["spec.agent 'team-b/web-01': must be the name of a Agent in the Schedule's own namespace "
      "(lowercase letters, digits, '-' and '.'; no namespace part)"]),
    ("a name ending in a newline", {"agent": "web-01\n"},
     ["spec.agent 'web-01\\n': must be the name of a Agent in the Schedule's own namespace "
      "(lowercase letters, digits, '-' and '.'; no namespace part)"]),
    ("an expression longer than an agent accepts", {"schedule": ",".join(["0"] * 2100) + " 2 * * *"},
     ["spec.schedule: 4207 characters, more than the 4096 an agent accepts"]),
    ("another namespace's Repository", {"repository": "team-b/offsite"},
     ["spec.repository 'team-b/offsite': must be the name of a Repository in the Schedule's own namespace "
      "(lowercase letters, digits, '-' and '.'; no namespace part)"]),
    ("no paths", {"template": {"type": "backup", "backup": {"paths": []}}},
     ["spec.template.backup.paths: Expected `array` of length >= 1"]),
    ("forget without a rule", {"template": {"type": "forget", "forget": {"prune": True}}},
     ["spec.template.forget: forget needs at least one keep* rule"]),
    ("a bad retention duration", {"template": {"type": "forget", "forget": {"keepWithin": "7x"}}},
     ["spec.template.forget.keepWithin: Expected `str` matching regex '^(\\d+[yMwdhms])*\\Z'"]),
    ("an unknown parameter", {"template": {"type": "check", "check": {"readData": True}}},
     ["spec.template.check: Object contains unknown field `readData`"]),
    ("a block of another type", {"template": {"type": "prune", "backup": {"paths": ["/"]}}},
     ["spec.template.backup: only allowed when type is backup"]),
    ("unknown type", {"template": {"type": "rm"}},
     ["spec.template.type 'rm': must be one of backup, forget, prune, check, restore, unlock, init"]),
    ("both agent and selector", {"agentSelector": {"matchLabels": {"a": "b"}}},
     ["spec: exactly one of agent and agentSelector must be set"]),
    ("a selector that cannot be evaluated", {"agent": None, "agentSelector": {"matchExpressions": [
        {"key": "role", "operator": "In"}]}},
     ["spec.agentSelector.matchExpressions[0]: operator In needs at least one value"]),
])
def test_schedule_validation_names_the_field_and_the_problem(case: str, change: dict[str, Any],
                                                              expected: list[str]) -> None:
    spec = {key: value for key, value in {**GOOD, **change}.items() if value is not None}
    assert schedule_problems(spec, schedule_id="backups/nightly") == expected, case


def test_every_problem_is_reported_at_once() -> None:
    spec = {**GOOD, "schedule": "0 25 * * *", "timeZone": "Nowhere", "repository": "a/b"}
    problems = schedule_problems(spec, schedule_id="backups/nightly")
    assert [problem.split(" ")[0].rstrip(":") for problem in problems] == [
        "spec.repository", "spec.schedule", "spec.timeZone"]
