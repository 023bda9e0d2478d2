"""What one agent connection may cost the operator, on 127.0.0.1 with fake authentication and
handler: the frame size limit, the message-rate limit, the hello timeout, a bounded log,
revocation; the handshake saying nothing that helps an attacker; the authenticator's
decisions for in-cluster agents with a fake TokenReview; the operator's TLS options."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import ssl
from collections.abc import AsyncIterator
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidMessage, InvalidStatus

from restic_manager import protocol
from restic_manager.operator import main as operator_main
from restic_manager.operator.agents import identity
from restic_manager.operator.agents.authenticator import KEYS_REFRESH_INTERVAL, Authenticator, NodeAgents
from restic_manager.operator.agents.identity import AuthError, Identity, Method
from restic_manager.operator.agents.limits import Limits
from restic_manager.operator.agents.server import (
    LOGGED_HANDSHAKE_REFUSALS, LOGGED_REFUSALS, AgentServer, ServingCertificate, Session, TLSError,
)
from restic_manager.operator.kube.api import ObjectKey
from restic_manager.operator.kube.cache import Store
from restic_manager.operator.kube.client import AlreadyExists, KubeError

from e2e.harness import make_certificates
from support.issuer import Issuer

TOKEN = "good-token"
AGENT = ObjectKey("ns", "web-01")
TIMEOUT = 5


class Handler:
    def __init__(self) -> None:
        self.sessions: asyncio.Queue[Session] = asyncio.Queue()
        self.frames: list[protocol.Frame] = []

    async def on_connect(self, session: Session) -> None:
        await self.sessions.put(session)

    async def on_message(self, session: Session, frame: protocol.Frame) -> None:
        self.frames.append(frame)
        if isinstance(frame.payload, protocol.CommandCancel):  # a barrier: answered, like the controller does
            await session.send(protocol.Error(code="invalid-frame", ref=frame.id, message="barrier"))

    async def on_disconnect(self, session: Session) -> None:
        pass

    def on_refused(self, agent: ObjectKey, reason: str, message: str) -> None:
        pass


async def authenticate(token: str) -> Identity:
    if token != TOKEN:
        raise AuthError(HTTPStatus.UNAUTHORIZED, "unknown-token", "the token is not that of any Agent")
    return Identity(AGENT, Method.TOKEN, "digest")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Served:
    def __init__(self, url: str, handler: Handler, server: AgentServer, clock: Clock) -> None:
        self.url, self.handler, self.server, self.clock = url, handler, server, clock


@pytest.fixture
async def served(request: pytest.FixtureRequest) -> AsyncIterator[Served]:
    limits = getattr(request, "param", Limits())
    handler, clock = Handler(), Clock()
    server = AgentServer(authenticate=authenticate, handler=handler, limits=limits, clock=clock)
    port: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(server.serve("127.0.0.1", 0, started=port.set_result))
    async with asyncio.timeout(TIMEOUT):
        url = f"ws://127.0.0.1:{await port}/agent"
    yield Served(url, handler, server, clock)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def open_agent(url: str, **options: Any) -> Any:
    return connect(url, additional_headers={"Authorization": f"Bearer {TOKEN}"}, **options)


SETS = 10  # say_hello sends set versions 0 to 9, so the tests' acks name sets that were sent


async def say_hello(websocket: ClientConnection, handler: Handler) -> Session:
    await websocket.send(protocol.encode(protocol.Hello(agent=AGENT.name, agent_version="1", restic_version="0",
                                                        protocol_version=protocol.PROTOCOL_VERSION)))
    async with asyncio.timeout(TIMEOUT):
        session = await handler.sessions.get()
        for version in range(SETS):
            await session.send(protocol.ScheduleSet(version=version, schedules=[]))
            assert isinstance(protocol.decode(await websocket.recv()).payload, protocol.ScheduleSet)
    return session


async def answers_until(websocket: ClientConnection, barrier: str) -> list[protocol.Payload]:
    await websocket.send(protocol.encode(protocol.CommandCancel(job="ns/x"), frame_id=barrier))
    received = []
    async with asyncio.timeout(TIMEOUT):
        while True:
            payload = protocol.decode(await websocket.recv()).payload
            if isinstance(payload, protocol.Error) and payload.ref == barrier:
                return received
            received.append(payload)


def ack(version: int) -> str:
    return json.dumps({"type": "schedule.ack", "id": f"ack-{version}",
                       "payload": {"version": version, "appliedAt": "2026-03-02T02:00:00Z"}})


async def test_a_refused_handshake_says_only_its_status_and_reason_code(served: Served) -> None:
    for headers, reason in (({}, "no-token"), ({"Authorization": "Bearer guess"}, "unknown-token"),
                            ({"Authorization": "Basic dXNlcjpwYXNz"}, "no-token")):
        with pytest.raises(InvalidStatus) as refused:
            async with connect(served.url, additional_headers=headers):
                pass
        response = refused.value.response
        assert (response.status_code, response.body) == (401, b"Unauthorized\n")
        # The code the agent logs and decides by; the authenticator's detail stays in the log.
        assert response.headers[protocol.REFUSAL_HEADER] == reason
        assert response.headers["WWW-Authenticate"] == 'Bearer realm="restic-manager"'
        assert "Server" not in response.headers  # no product or version to look up exploits for
    assert served.server.metrics.handshakes_refused == {"no-token": 2, "unknown-token": 1}


async def test_refused_handshakes_are_counted_every_time_but_logged_a_bounded_number_of_times_a_minute(
        served: Served, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="restic_manager.operator.agents.server")

    async def refused_once() -> None:
        with pytest.raises(InvalidStatus):
            async with connect(served.url, additional_headers={"Authorization": "Bearer guess"}):
                pass

    for _ in range(3 * LOGGED_HANDSHAKE_REFUSALS):
        await refused_once()
    logged = [r.getMessage() for r in caplog.records if "refused (unknown-token" in r.getMessage()]
    assert len(logged) == LOGGED_HANDSHAKE_REFUSALS and not any("more refused" in line for line in logged)
    served.clock.now += 60.0
    await refused_once()
    assert caplog.records[-1].getMessage().endswith(
        f"({2 * LOGGED_HANDSHAKE_REFUSALS} more refused since the last one logged; the metrics count each)")
    assert served.server.metrics.handshakes_refused == {"unknown-token": 3 * LOGGED_HANDSHAKE_REFUSALS + 1}


async def test_a_handshake_with_two_authorization_headers_is_a_bad_request(served: Served) -> None:
    with pytest.raises(InvalidStatus) as refused:
        async with connect(served.url, additional_headers=[("Authorization", f"Bearer {TOKEN}"),
                                                            ("Authorization", "Bearer other")]):
            pass
    assert (refused.value.response.status_code, refused.value.response.body) == (400, b"Bad Request\n")
    assert served.server.metrics.handshakes_refused == {"duplicate-authorization": 1}
    async with open_agent(served.url) as websocket:  # and the server goes on serving
        await say_hello(websocket, served.handler)


FLOODER = "127.0.0.2"  # loopback, another address than the agents' 127.0.0.1


async def stalled(url: str, source: str = FLOODER) -> asyncio.StreamWriter:
    """A connection that never sends its upgrade request: a handshake in progress."""
    _, writer = await asyncio.open_connection("127.0.0.1", urlsplit(url).port, local_addr=(source, 0))
    return writer


async def admitted(url: str, source: str = FLOODER) -> bool:
    """Whether a handshake reaches the credential check (a wrong token: 401)."""
    try:
        async with connect(url, additional_headers={"Authorization": "Bearer guess"}, local_addr=(source, 0)):
            raise AssertionError("a wrong token was let in")
    except InvalidStatus as refused:
        assert refused.response.status_code == 401
        return True
    except (OSError, InvalidMessage):  # reset at accept
        return False


@pytest.mark.parametrize("served", [Limits(handshakes_per_address=2)], indirect=True)
async def test_an_address_with_too_many_handshakes_in_progress_is_reset_at_accept_and_others_are_served(
        served: Served) -> None:
    first, second = await stalled(served.url), await stalled(served.url)
    assert not await admitted(served.url)
    assert served.server.metrics.handshakes_refused == {"too-many-handshakes": 1}
    async with open_agent(served.url) as websocket:  # another address: served at once
        await say_hello(websocket, served.handler)
    first.close()  # its handshake ends with its connection: the address may open another
    async with asyncio.timeout(TIMEOUT):
        while not await admitted(served.url):
            pass
    second.close()


@pytest.mark.parametrize("served", [Limits(handshakes_from_new_addresses=2)], indirect=True)
async def test_new_addresses_share_a_few_handshake_places_and_the_fleets_addresses_keep_theirs(
        served: Served) -> None:
    async with open_agent(served.url) as websocket:  # 127.0.0.1: an agent connected from it
        await say_hello(websocket, served.handler)
    served.server.remember_addresses(["127.0.0.5"])  # as the Agents' status says, at the operator's start
    flood = [await stalled(served.url, f"127.0.0.{i}") for i in (2, 3)]
    assert not await admitted(served.url, "127.0.0.4")
    assert served.server.metrics.handshakes_refused == {"too-many-handshakes": 1}
    assert await admitted(served.url, "127.0.0.5")
    async with open_agent(served.url) as websocket:
        await say_hello(websocket, served.handler)
    for writer in flood:
        writer.close()


async def test_a_port_in_use_is_named_in_the_error(served: Served) -> None:
    port = urlsplit(served.url).port
    with pytest.raises(OSError, match=f"cannot listen for agents on 127.0.0.1:{port}: Address already in use"):
        await AgentServer(authenticate=authenticate, handler=Handler()).serve("127.0.0.1", port)


@pytest.mark.parametrize("served", [Limits(handshakes_per_address=1)], indirect=True)
async def test_an_authenticated_session_no_longer_counts_against_its_address(served: Served) -> None:
    async with open_agent(served.url, local_addr=(FLOODER, 0)) as websocket:
        await say_hello(websocket, served.handler)
        assert await admitted(served.url)
    assert "too-many-handshakes" not in served.server.metrics.handshakes_refused


async def test_a_frame_over_the_size_limit_closes_only_that_connection(served: Served) -> None:
    async with open_agent(served.url, max_size=None) as big:
        await say_hello(big, served.handler)
        await big.send("x" * (protocol.MAX_FRAME_BYTES + 1))
        with pytest.raises(ConnectionClosed):
            async with asyncio.timeout(TIMEOUT):
                await big.recv()
        assert big.close_code == 1009  # message too big, before it was buffered
    async with open_agent(served.url) as other:
        await say_hello(other, served.handler)
        assert await answers_until(other, "b") == []


@pytest.mark.parametrize("served", [Limits(frames_per_second=2, burst=3)], indirect=True)
async def test_frames_over_the_rate_are_refused_unhandled_until_the_rate_allows_again(served: Served) -> None:
    async with open_agent(served.url) as websocket:
        await say_hello(websocket, served.handler)
        for version in range(5):
            await websocket.send(ack(version))
        await websocket.send(protocol.encode(protocol.CommandCancel(job="ns/x"), frame_id="late"))
        async with asyncio.timeout(TIMEOUT):
            answers = [protocol.decode(await websocket.recv()).payload for _ in range(3)]
        assert all(isinstance(a, protocol.Error) and a.code == "rate-limited" for a in answers)
        assert "more than 2 frames per second" in answers[0].message  # type: ignore[union-attr]
        assert [f.id for f in served.handler.frames] == ["ack-0", "ack-1", "ack-2"]
        assert served.server.metrics.frames_refused == {"rate-limited": 3}

        served.clock.now += 1.0  # two frames' worth
        assert await answers_until(websocket, "barrier") == []
        assert served.server.metrics.frames_refused["out-of-order"] == 1  # the barrier passed the limit


@pytest.mark.parametrize("served", [Limits(hello_timeout=0.2)], indirect=True)
async def test_a_connection_that_never_says_hello_is_closed(served: Served) -> None:
    async with open_agent(served.url) as silent:
        with pytest.raises(ConnectionClosed):
            async with asyncio.timeout(TIMEOUT):
                await silent.recv()
        assert (silent.close_code, silent.close_reason) == (1008, "hello expected")
    assert served.server.metrics.handshakes_refused == {"hello-timeout": 1}
    assert served.handler.sessions.empty()


async def test_refused_frames_are_counted_every_time_but_logged_a_bounded_number_of_times(
        served: Served, caplog: pytest.LogCaptureFixture) -> None:
    async with open_agent(served.url) as websocket:
        await say_hello(websocket, served.handler)
        caplog.set_level(logging.WARNING, logger="restic_manager.operator.agents.server")
        for _ in range(3 * LOGGED_REFUSALS):
            await websocket.send("{not json")
        answers = await answers_until(websocket, "barrier")
    assert len(answers) == 3 * LOGGED_REFUSALS
    assert served.server.metrics.frames_refused["invalid-frame"] == 3 * LOGGED_REFUSALS
    logged = [r.getMessage() for r in caplog.records if "invalid frame" in r.getMessage()]
    assert len(logged) == LOGGED_REFUSALS
    assert any("counted, not logged" in r.getMessage() for r in caplog.records)


async def test_revoking_an_agent_disconnects_it_at_once(served: Served) -> None:
    async with open_agent(served.url) as websocket:
        await say_hello(websocket, served.handler)
        await served.server.revoke(AGENT, "the token of Agent ns/web-01 was rotated")
        with pytest.raises(ConnectionClosed):
            async with asyncio.timeout(TIMEOUT):
                await websocket.recv()
        assert (websocket.close_code, websocket.close_reason) == (protocol.CLOSE_REVOKED, "credentials revoked")


# --- the authenticator for in-cluster agents ---------------------------------------------


ISSUER = Issuer()
AGENT_SA = "system:serviceaccount:backup:agent"


def jwt(audience: str, **claims: Any) -> str:
    return ISSUER.token(sub=AGENT_SA, aud=audience, **claims)


class ReviewingKube:
    """The issuer's keys, TokenReview answers by token, and Agent creation."""

    def __init__(self, reviews: dict[str, dict[str, Any]]) -> None:
        self.reviews = reviews
        self.asked: list[str] = []
        self.created: list[dict[str, Any]] = []
        self.keys_read = 0
        self.keys: dict[str, Any] | None = ISSUER.jwks()  # None: reading them fails

    async def issuer_keys(self) -> dict[str, Any]:
        self.keys_read += 1
        if self.keys is None:
            raise KubeError("read the ServiceAccount issuer's keys: 403 Forbidden")
        return self.keys

    async def token_review(self, token: str, *, audiences: list[str]) -> dict[str, Any]:
        self.asked.append(token)
        if token not in self.reviews:
            raise KubeError("create TokenReview: 500 Internal Server Error")
        return self.reviews[token]

    async def create(self, plural: str, body: dict[str, Any], *, first: bool = False) -> dict[str, Any]:
        if any(c["metadata"]["name"] == body["metadata"]["name"] for c in self.created):
            raise AlreadyExists("409")
        made = {**body, "metadata": {**body["metadata"], "uid": "uid-" + body["metadata"]["name"],
                                     "resourceVersion": "5"}}
        self.created.append(made)
        return made


NODES = NodeAgents(service_account=ObjectKey("backup", "agent"), namespace="backup")


def reviewed(node: str) -> dict[str, Any]:
    return {"authenticated": True, "audiences": ["restic-manager"],
            "user": {"username": AGENT_SA,
                     "extra": {"authentication.kubernetes.io/node-name": [node],
                               "authentication.kubernetes.io/pod-uid": [f"pod-on-{node}"]}}}


async def authenticator(kube: ReviewingKube, store: Store, *, nodes: NodeAgents | None = NODES,
                        clock: Clock | None = None) -> Authenticator:
    primed = asyncio.Event()
    primed.set()
    return Authenticator(store=store, kube=kube, primed=primed, node_agents=nodes,  # type: ignore[arg-type]
                         register=lambda body: store.agents.upsert(body), clock=clock or Clock())


async def refusal(auth: Authenticator, token: str) -> tuple[HTTPStatus, str]:
    with pytest.raises(AuthError) as refused:
        await auth.authenticate(token)
    return refused.value.status, refused.value.reason


async def test_a_node_agent_is_registered_on_its_first_connection_and_known_after() -> None:
    token = jwt("restic-manager")
    kube, store = ReviewingKube({token: reviewed("node-a")}), Store()
    auth = await authenticator(kube, store)
    first = await auth.authenticate(token)
    assert first == Identity(ObjectKey("backup", "node-a"), Method.SERVICE_ACCOUNT, "pod-on-node-a",
                             expires_at=identity.claimed_expiry(token))
    [body] = kube.created
    assert body["spec"] == {"nodeName": "node-a"} and body["metadata"]["namespace"] == "backup"
    assert await auth.authenticate(token) == first and len(kube.created) == 1
    assert kube.keys_read == 1


async def test_serviceaccount_tokens_that_cannot_be_let_in_are_refused() -> None:
    wrong_audience, broken_api = jwt("https://kubernetes.default.svc"), jwt("restic-manager")
    hijack = jwt("restic-manager", jti="another")
    store = Store()
    # A host Agent that happens to carry a node's name must not become that node's.
    store.agents.upsert({"metadata": {"name": "node-b", "namespace": "backup", "uid": "u", "resourceVersion": "1"}})
    kube = ReviewingKube({hijack: reviewed("node-b")})
    auth = await authenticator(kube, store)
    assert await refusal(auth, wrong_audience) == (HTTPStatus.UNAUTHORIZED, "wrong-audience")
    assert await refusal(auth, broken_api) == (HTTPStatus.SERVICE_UNAVAILABLE, "tokenreview-failed")
    assert await refusal(auth, hijack) == (HTTPStatus.FORBIDDEN, "not-a-node-agent")
    assert kube.asked == [broken_api, hijack]  # the wrong audience cost no API call
    without = await authenticator(kube, store, nodes=None)
    assert await refusal(without, jwt("restic-manager")) == (HTTPStatus.UNAUTHORIZED, "service-account-token")


async def test_forged_serviceaccount_tokens_cost_no_tokenreview_and_made_up_keys_one_read_a_period() -> None:
    """A flood of tokens the cluster did not sign, each naming a key of its own, costs one
    read of the issuer's keys per KEYS_REFRESH_INTERVAL and no TokenReview at all; a key
    the issuer has since added is found at the next read."""
    clock = Clock()
    kube, store = ReviewingKube({}), Store()
    auth = await authenticator(kube, store, clock=clock)
    forged = [Issuer().token(sub=AGENT_SA), jwt("restic-manager", expires_in=-300),
              *(jwt("restic-manager", kid=f"made-up-{n}") for n in range(50))]
    for token in forged:
        assert (await refusal(auth, token))[0] == HTTPStatus.UNAUTHORIZED
    assert kube.asked == [] and kube.keys_read == 1

    rotated = Issuer(kid="issuer-key-2")
    kube.keys = {"keys": ISSUER.jwks()["keys"] + rotated.jwks()["keys"]}
    fresh = rotated.token(sub=AGENT_SA)
    kube.reviews[fresh] = reviewed("node-c")
    assert await refusal(auth, fresh) == (HTTPStatus.UNAUTHORIZED, "unverified-token")  # not read again yet
    clock.now += KEYS_REFRESH_INTERVAL
    assert (await auth.authenticate(fresh)).agent == ObjectKey("backup", "node-c")
    assert kube.keys_read == 2 and kube.asked == [fresh]


async def test_while_the_issuer_keys_cannot_be_read_the_tokenreview_alone_decides() -> None:
    clock = Clock()
    kube, store = ReviewingKube({}), Store()
    kube.keys = None
    token = jwt("restic-manager")
    kube.reviews[token] = reviewed("node-d")
    auth = await authenticator(kube, store, clock=clock)
    assert (await auth.authenticate(token)).agent == ObjectKey("backup", "node-d")
    forged = Issuer().token(sub=AGENT_SA)
    assert await refusal(auth, forged) == (HTTPStatus.SERVICE_UNAVAILABLE, "tokenreview-failed")
    assert kube.asked == [token, forged] and kube.keys_read == 1  # not read again within the period
    kube.keys = ISSUER.jwks()
    clock.now += KEYS_REFRESH_INTERVAL
    assert await refusal(auth, forged) == (HTTPStatus.UNAUTHORIZED, "unverified-token")
    assert kube.keys_read == 2 and kube.asked == [token, forged]


# --- the operator's TLS options ----------------------------------------------------------


def options(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    operator_main.add_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.mark.parametrize(("argv", "message"), [
    ((), "agents connect over TLS: give --tls-cert-file and --tls-key-file"),
    (("--tls-cert-file", "c.pem"), "agents connect over TLS"),
    (("--insecure-listen", "--tls-key-file", "k.pem"), "exclude each other"),
    (("--insecure-listen", "--webhook-listen", "127.0.0.1:9443"), "--webhook-listen needs a certificate"),
    (("--insecure-listen", "--node-agent-namespace", "x"), "needs --agent-service-account"),
    (("--insecure-listen", "--namespace", "team-a", "--agent-service-account", "backup/agent"),
     "Agents go to namespace backup, which is not watched"),
])
def test_the_operator_serves_plain_ws_only_when_told_to(argv: tuple[str, ...], message: str,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    assert operator_main.run(options(*argv)) == 2
    assert message in capsys.readouterr().err


def test_an_unreadable_certificate_is_named(tmp_path: Path) -> None:
    (tmp_path / "cert.pem").write_text("not a certificate")
    with pytest.raises(TLSError, match=f"certificate {tmp_path / 'cert.pem'}"):
        ServingCertificate(tmp_path / "cert.pem", tmp_path / "key.pem")


async def test_the_tls_endpoint_sends_no_session_tickets(tmp_path: Path) -> None:
    """TLS 1.3 tickets reach the client after the handshake, while it sends its HTTP upgrade;
    a client that reads and writes on two threads (websockets' sync client) can lose the
    request to that race, and its handshake times out. Agents never resume sessions, so the
    operator sends none."""
    certificates = make_certificates(tmp_path / "pki")
    certificate = ServingCertificate(certificates.cert, certificates.key)
    server = AgentServer(authenticate=authenticate, handler=Handler())
    port: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    serving = asyncio.create_task(server.serve("127.0.0.1", 0, tls=certificate, started=port.set_result))
    try:
        async with asyncio.timeout(TIMEOUT):
            url = f"wss://127.0.0.1:{await port}/agent"
            # The upgrade's answer comes after any ticket, so the client has seen them all.
            async with open_agent(url, ssl=ssl.create_default_context(cafile=str(certificates.ca))) as websocket:
                tls = websocket.transport.get_extra_info("ssl_object")
                assert tls.version() == "TLSv1.3"
                assert tls.session is not None and not tls.session.has_ticket
    finally:
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)
