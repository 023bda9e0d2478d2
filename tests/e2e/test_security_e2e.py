"""Security on the real control plane, with the real operator and agents as processes (issue 5's
"Must show"): who may connect, what a connected agent may do, TLS, validation at apply time,
and where the repository password never shows up."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import ssl
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from restic_manager import protocol

from e2e.harness import PASSWORD, RESTIC_MANAGER, Certificates, Process, World, eventually, free_port, make_certificates

pytestmark = [pytest.mark.cluster, pytest.mark.restic]

TIMEOUT = 30
AUDIENCE = "restic-manager"
AT = datetime(2026, 3, 2, 2, 0, tzinfo=timezone.utc)


@pytest.fixture
def certs(tmp_path: Path) -> Certificates:
    return make_certificates(tmp_path / "pki")


@dataclass
class Outcome:
    """How an attempt to connect as an agent ended."""

    status: int | None = None  # the HTTP status of a refused handshake
    error: str | None = None   # the error frame answering hello
    accepted: bool = False     # the operator sent the agent its schedule set
    closed: tuple[int | None, str | None] | None = None  # the close code and reason, if it closed at once


def dial(world: World, token: str | None) -> ClientConnection:
    """A WebSocket to the operator with ``token`` (wss, verified, when the operator has TLS)."""
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    tls = ssl.create_default_context(cafile=str(world.tls.ca)) if world.tls else None
    return connect(world.server_url, additional_headers=headers, ssl=tls, open_timeout=TIMEOUT, ping_interval=None)


def say_hello(websocket: ClientConnection, agent: str) -> Outcome:
    websocket.send(protocol.encode(protocol.Hello(agent=agent, agent_version="test", restic_version="0",
                                                  protocol_version=protocol.PROTOCOL_VERSION)))
    answer = protocol.decode(websocket.recv(timeout=TIMEOUT)).payload
    if isinstance(answer, protocol.ScheduleSet):
        websocket.send(protocol.encode(protocol.ScheduleAck(
            version=answer.version, applied_at=datetime.now(timezone.utc),
            applied=[protocol.AppliedEntry(id=e.id, generation=e.generation) for e in answer.schedules])))
        return Outcome(accepted=True)
    assert isinstance(answer, protocol.Error), answer
    return Outcome(error=answer.message)


def attempt(world: World, token: str | None, agent: str) -> Outcome:
    """Connect with ``token``, say hello as ``agent``, and report how it went."""
    try:
        websocket = dial(world, token)
    except InvalidStatus as refused:
        return Outcome(status=refused.response.status_code)
    with websocket:
        try:
            return say_hello(websocket, agent)
        except ConnectionClosed:
            return Outcome(closed=(websocket.close_code, websocket.close_reason))


@contextlib.contextmanager
def session(world: World, token: str, agent: str) -> Iterator[ClientConnection]:
    with dial(world, token) as websocket:
        assert say_hello(websocket, agent).accepted
        yield websocket


def answers(websocket: ClientConnection, barrier: str) -> list[protocol.Payload]:
    """What the operator answered before it answered ``barrier`` (it handles frames in order)."""
    websocket.send(protocol.encode(protocol.CommandCancel(job="x/barrier"), frame_id=barrier))
    received = []
    while True:
        payload = protocol.decode(websocket.recv(timeout=TIMEOUT)).payload
        if isinstance(payload, protocol.Error) and payload.ref == barrier:
            return received
        received.append(payload)


def counters(port: int) -> dict[str, float]:
    """The operator's /metrics as {'name{labels}': value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=TIMEOUT) as response:
        text = response.read().decode()
    return {line.rpartition(" ")[0]: float(line.rpartition(" ")[2])
            for line in text.splitlines() if line and not line.startswith("#")}


def refused_handshakes(port: int) -> dict[str, float]:
    prefix = 'restic_manager_agent_handshakes_refused_total{reason="'
    return {name[len(prefix):-2]: value for name, value in counters(port).items() if name.startswith(prefix)}


# --- identity ------------------------------------------------------------------------------


def test_only_the_right_credentials_open_a_session(world: World, certs: Certificates) -> None:
    """No token, a wrong one, another agent's, a rotated one, ServiceAccount tokens of the wrong
    audience, of another ServiceAccount, bound to no node or with a forged signature: refused. The Agent's own token, and
    a DaemonSet pod's projected token: accepted, the latter registering the node's Agent."""
    metrics_port = free_port()
    world.start_operator(tls=certs, extra=["--agent-service-account", f"{world.namespace}/agent",
                                           "--metrics-listen", f"127.0.0.1:{metrics_port}"])
    for name in ("web-01", "web-02"):
        world.apply(json.dumps({"apiVersion": "resticmanager.io/v1alpha1", "kind": "Agent", "metadata": {"name": name}}))
    web_01, web_02 = world.token("web-01"), world.token("web-02")
    node = f"node-{uuid.uuid4().hex[:8]}"
    with in_cluster_pods(world, node) as token:
        assert attempt(world, None, "web-01").status == 401
        assert attempt(world, "not-a-token-of-anyone", "web-01").status == 401
        stolen = attempt(world, web_02, "web-01")  # web-02's credentials, claiming to be web-01
        assert stolen.error is not None and "'web-01' is not the Agent these credentials belong to" in stolen.error
        assert attempt(world, web_01, "web-01").accepted

        assert attempt(world, token("agent", audience="someone-else", pod="agent-pod"), node).status == 401
        assert attempt(world, token("agent", audience=None, pod="agent-pod"), node).status == 401  # the apiserver's
        assert attempt(world, token("other", audience=AUDIENCE, pod="other-pod"), node).status == 403
        assert attempt(world, token("agent", audience=AUDIENCE, pod=None), node).status == 403  # bound to no node
        bound = token("agent", audience=AUDIENCE, pod="agent-pod")
        # Its claims under another token's signature: refused by the issuer's keys, no TokenReview.
        forged = bound.rpartition(".")[0] + "." + token("other", audience=AUDIENCE, pod="other-pod").rpartition(".")[2]
        assert attempt(world, forged, node).status == 401
        assert attempt(world, bound, node).accepted
        registered = world.get(f"agent/{node}")
        assert registered is not None and registered["spec"] == {"nodeName": node}
        assert "tokenSecretName" not in (registered.get("status") or {})  # it has no token to rotate

        # Rotation: deleting the token Secret disconnects the agent at once, its old token
        # is refused from then on, and the new one the operator issues is accepted.
        with session(world, web_01, "web-01") as connected:
            world.kubectl("delete", "secret", "web-01-agent-token")
            with pytest.raises(ConnectionClosed):
                connected.recv(timeout=TIMEOUT)
            assert (connected.close_code, connected.close_reason) == (4001, "credentials revoked")
        assert attempt(world, web_01, "web-01").status == 401
        rotated = eventually("a new token", lambda: (token_now := world.token("web-01")) != web_01 and token_now)
        assert attempt(world, rotated, "web-01").accepted

    assert refused_handshakes(metrics_port) == {
        "no-token": 1, "unknown-token": 2, "invalid-hello": 1, "wrong-audience": 2, "wrong-service-account": 1,
        "no-node-binding": 1, "unverified-token": 1}
    log = world.operator.output() if world.operator else ""
    assert "refused (wrong-service-account, HTTP 403)" in log and f"Agent {world.namespace}/{node} registered" in log
    assert "read 1 ServiceAccount issuer key(s)" in log


def test_a_deleted_pods_session_is_closed_and_its_token_refused(world: World) -> None:
    operator = world.start_operator(extra=["--agent-service-account", f"{world.namespace}/agent"])
    eventually("the operator to serve agents", lambda: "serving agents on" in operator.output())
    node = f"node-{uuid.uuid4().hex[:8]}"
    with in_cluster_pods(world, node) as token:
        bound = token("agent", audience=AUDIENCE, pod="agent-pod")
        with session(world, bound, node) as connected:
            # No kubelet runs the pod: --force removes it at once, as a kubelet's end would.
            world.kubectl("delete", "pod", "agent-pod", "--grace-period=0", "--force")
            with pytest.raises(ConnectionClosed):
                while True:
                    connected.recv(timeout=TIMEOUT)  # whatever else comes, until it is closed
            assert (connected.close_code, connected.close_reason) == (4001, "credentials revoked")
        # The apiserver may take a moment to refuse it; meanwhile the operator ends its session.
        again = attempt(world, bound, node)
        assert again.status == 401 or again.closed == (4001, "credentials revoked"), again
    assert "its ServiceAccount token is bound to was deleted" in operator.output()


@contextlib.contextmanager
def in_cluster_pods(world: World, node: str) -> Iterator[Any]:
    """A Node, the ServiceAccounts `agent` and `other`, a pod of each bound to the Node (no
    kubelet runs them: a pod's binding is all a projected token needs), and a function
    minting their tokens as the kubelet would."""
    world.kube.kubectl("create", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "Node",
                                                              "metadata": {"name": node}}))
    try:
        for account in ("agent", "other"):
            world.kubectl("create", "serviceaccount", account)
            world.apply(json.dumps({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"{account}-pod"},
                                    "spec": {"serviceAccountName": account, "nodeName": node,
                                             "automountServiceAccountToken": False,
                                             "containers": [{"name": "agent", "image": "restic-manager/agent"}]}}))

        def token(account: str, *, audience: str | None, pod: str | None) -> str:
            args = ["create", "token", account, "--duration=10m"]
            args += [f"--audience={audience}"] if audience else []
            args += ["--bound-object-kind=Pod", f"--bound-object-name={pod}"] if pod else []
            return world.kubectl(*args).stdout.strip()

        yield token
    finally:
        world.kube.kubectl("delete", "node", node, "--wait=false", check=False)


# --- TLS -------------------------------------------------------------------------------------


def test_agents_verify_the_operators_certificate(world: World, certs: Certificates, tmp_path: Path) -> None:
    """An agent with the CA that signed the operator's certificate connects over wss; one with
    another CA, or with only the system's CAs, does not; plain ws to a wss endpoint fails."""
    world.start_operator(tls=certs)
    world.add_agent("trusting")
    world.wait("agent/trusting", "condition=Connected")
    impostor_ca = make_certificates(tmp_path / "other-pki", name="impostor").ca
    doubters = {"other-ca": ["--ca-file", str(impostor_ca)], "system-cas": []}
    for name, ca in doubters.items():
        world.apply(json.dumps({"apiVersion": "resticmanager.io/v1alpha1", "kind": "Agent", "metadata": {"name": name}}))
        token_file = tmp_path / f"{name}.token"
        token_file.write_text(world.token(name))
        doubter = Process(name, [str(RESTIC_MANAGER), "agent", "--server", world.server_url, *ca,
                                 "--token-file", str(token_file), "--state-dir", str(tmp_path / name),
                                 "--agent-name", name, "--restic", str(world.restic)], tmp_path / f"{name}.log")
        world.agents[name] = doubter
        doubter.start()
    for name, doubter in world.agents.items():
        if name in doubters:
            eventually(f"{name} to refuse the certificate", lambda: "CERTIFICATE_VERIFY_FAILED" in doubter.output())
            assert (world.get(f"agent/{name}") or {}).get("status", {}).get("connected") is not True
    with pytest.raises((InvalidHandshake, OSError)):  # plain HTTP to a TLS port: no WebSocket
        with connect(world.server_url.replace("wss://", "ws://"), open_timeout=TIMEOUT):
            pass


# --- authorization ---------------------------------------------------------------------------


def test_agents_act_only_on_their_own_in_their_own_namespace(world: World) -> None:
    """Agent A firing B's Schedule, reporting on B's job; an agent of namespace Y firing X's
    Schedule; a Schedule in X naming a Repository in Y: refused, counted, and nothing changes
    (no ResticJob, no status, no Event). A job in X reaches only X's Repositories."""
    other = f"{world.namespace[:40]}-y"
    world.kube.kubectl("create", "namespace", other)
    metrics_port = free_port()
    try:
        world.start_operator(extra=["--namespace", other, "--metrics-listen", f"127.0.0.1:{metrics_port}"])
        for name in ("web-a", "web-b"):
            world.apply(json.dumps({"apiVersion": "resticmanager.io/v1alpha1", "kind": "Agent",
                                    "metadata": {"name": name}}))
        world.kube.kubectl("-n", other, "apply", "-f", "-", input=AGENT_AND_REPOSITORY_IN_Y)
        world.apply(schedules_and_jobs(other))
        world.wait("schedule/cross-repo", "jsonpath={.status.conditions[0].reason}=Invalid")
        world.wait("resticjob/b-job", "jsonpath={.status.reason}=AgentDisconnected")
        y_token = eventually("web-y's token", lambda: secret_token(world, other, "web-y-agent-token"))

        before = snapshot(world)
        with session(world, world.token("web-a"), "web-a") as web_a, session(world, y_token, "web-y") as web_y:
            uids = {s["metadata"]["name"]: s["metadata"]["uid"] for s in world.items("schedules")}
            sent = {
                web_a: [fire(f"{world.namespace}/b-only", uids["b-only"]),
                        protocol.JobStarted(job=f"{world.namespace}/b-job", started_at=AT),
                        protocol.JobDone(job=f"{world.namespace}/b-job", outcome=protocol.Outcome.SUCCEEDED,
                                         exit_code=0, finished_at=AT),
                        fire(f"{world.namespace}/cross-repo", uids["cross-repo"])],
                web_y: [fire(f"{world.namespace}/b-only", uids["b-only"]),
                        protocol.JobStarted(job=f"{world.namespace}/b-job", started_at=AT)],
            }
            for websocket, payloads in sent.items():
                for payload in payloads:
                    websocket.send(protocol.encode(payload))
                # A fire is settled with a refusal (the agent stops sending it), a report is an error.
                got = [(type(p).__name__, getattr(p, "code", getattr(p, "outcome", None)))
                       for p in answers(websocket, "done") if isinstance(p, (protocol.Error, protocol.FireResult))]
                assert got == [("FireResult", protocol.FireOutcome.REFUSED) if isinstance(p, protocol.ScheduleFire)
                               else ("Error", "forbidden") for p in payloads], got
        # A write the operator makes after handling all that (web-a's disconnect): once it
        # shows, any status write those frames had caused would show too.
        world.wait("agent/web-a", 'jsonpath={.status.conditions[?(@.type=="Connected")].reason}=Disconnected')
        assert snapshot(world) == before

        # web-a's own job names a Repository only Y has: it waits, and Y's Secret is never read.
        world.wait("resticjob/y-repo", "jsonpath={.status.reason}=RepositoryNotFound")
        job = world.get("resticjob/y-repo")
        assert job is not None and job["status"]["phase"] == "Pending" and "dispatchedAt" not in job["status"]
        assert f"no such Repository in namespace {world.namespace}" in job["status"]["message"]
        refused = counters(metrics_port)
        assert refused['restic_manager_agent_frames_refused_total{reason="forbidden-fire"}'] == 3
        assert refused['restic_manager_agent_frames_refused_total{reason="forbidden-job-of-another-agent"}'] == 3
        assert refused['restic_manager_fires_refused_total{reason="NotTargeted"}'] == 1
        assert refused['restic_manager_fires_refused_total{reason="ForeignNamespace"}'] == 1
        assert refused['restic_manager_fires_refused_total{reason="InvalidSchedule"}'] == 1
    finally:
        world.kube.kubectl("delete", "namespace", other, "--wait=false", check=False)


def test_an_agent_may_only_fire_times_its_schedule_produces(world: World) -> None:
    """An agent's fires at a time the expression does not produce, or ahead of the operator's
    clock, are refused in their receipts, counted, and change nothing."""
    metrics_port = free_port()
    world.start_operator(extra=["--metrics-listen", f"127.0.0.1:{metrics_port}"])
    world.repository("offsite")
    world.apply(json.dumps({"apiVersion": "resticmanager.io/v1alpha1", "kind": "Agent", "metadata": {"name": "web-a"}}))
    world.apply("""
        apiVersion: resticmanager.io/v1alpha1
        kind: Schedule
        metadata: {name: nightly}
        spec:
          agent: web-a
          repository: offsite
          schedule: "0 2 * * *"
          template: {type: backup, backup: {paths: [/etc]}}
    """)
    uid = world.get("schedule/nightly")["metadata"]["uid"]  # type: ignore[index]
    soon = datetime.now(timezone.utc).replace(microsecond=0) + timedelta(seconds=5)
    if (soon.hour, soon.minute, soon.second) == (2, 0, 0):
        soon += timedelta(seconds=1)
    later = soon.replace(year=soon.year + 10, hour=2, minute=0, second=0)
    made_up = [soon, later]  # after the Schedule was made; 0 2 * * * fires at neither of them now
    with session(world, world.token("web-a"), "web-a") as web_a:
        for at in made_up:
            web_a.send(protocol.encode(protocol.ScheduleFire(
                id=f"{world.namespace}/nightly", uid=uid, generation=1, scheduled_at=at)))
        results = [p for p in answers(web_a, "done") if isinstance(p, protocol.FireResult)]
    assert [(r.outcome, r.reason.split(":")[0]) for r in results] == [
        (protocol.FireOutcome.REFUSED, "NotProduced"), (protocol.FireOutcome.REFUSED, "InTheFuture")]
    world.wait("agent/web-a", 'jsonpath={.status.conditions[?(@.type=="Connected")].reason}=Disconnected')
    status = world.get("schedule/nightly")["status"]  # type: ignore[index]
    assert (status.get("refusedFires", 0), status.get("missedFires", 0), status.get("lastScheduleTime")) == (0, 0, None)
    assert world.items("resticjobs") == []
    assert [e for e in world.items("events") if e["involvedObject"]["kind"] != "Agent"] == []  # web-a's connection has its own
    refused = counters(metrics_port)
    assert refused['restic_manager_fires_refused_total{reason="NotProduced"}'] == 1
    assert refused['restic_manager_fires_refused_total{reason="InTheFuture"}'] == 1


def secret_token(world: World, namespace: str, name: str) -> str | None:
    result = world.kube.kubectl("-n", namespace, "get", "secret", name, "-o", "json", check=False)
    return base64.b64decode(json.loads(result.stdout)["data"]["token"]).decode() if result.returncode == 0 else None


def fire(schedule_id: str, uid: str) -> protocol.ScheduleFire:
    return protocol.ScheduleFire(id=schedule_id, uid=uid, generation=1, scheduled_at=datetime.now(timezone.utc))


def snapshot(world: World) -> dict[str, Any]:
    """The namespace's Events and ResticJob names, the Schedules' status and B's job's version and
    status. (A Schedule's status is rewritten as the agents it targets connect and disconnect,
    and Agents get Events for it; neither is what the frames did.)"""
    job = world.get("resticjob/b-job")
    return {
        "schedules": {s["metadata"]["name"]: s.get("status") for s in world.items("schedules")},
        "job": job and (job["metadata"]["resourceVersion"], job.get("status")),
        "jobs": sorted(j["metadata"]["name"] for j in world.items("resticjobs")),
        "events": sorted(e["metadata"]["name"] for e in world.items("events") if e["involvedObject"]["kind"] != "Agent"),
    }


AGENT_AND_REPOSITORY_IN_Y = """
apiVersion: resticmanager.io/v1alpha1
kind: Agent
metadata: {name: web-y}
---
apiVersion: v1
kind: Secret
metadata: {name: offsite-password}
stringData: {password: y-tenant-password}
---
apiVersion: resticmanager.io/v1alpha1
kind: Repository
metadata: {name: offsite}
spec: {url: /nowhere, passwordSecretRef: {name: offsite-password, key: password}}
"""


def schedules_and_jobs(other: str) -> str:
    return f"""
        apiVersion: resticmanager.io/v1alpha1
        kind: Schedule
        metadata: {{name: b-only}}
        spec: {{agent: web-b, repository: offsite, schedule: "0 2 * * *", template: {{type: prune}}}}
        ---
        apiVersion: resticmanager.io/v1alpha1
        kind: Schedule
        metadata: {{name: cross-repo}}
        spec: {{agent: web-a, repository: {other}/offsite, schedule: "0 2 * * *", template: {{type: prune}}}}
        ---
        apiVersion: resticmanager.io/v1alpha1
        kind: ResticJob
        metadata: {{name: b-job}}
        spec: {{agent: web-b, repository: offsite, type: prune}}
        ---
        apiVersion: resticmanager.io/v1alpha1
        kind: ResticJob
        metadata: {{name: y-repo}}
        spec: {{agent: web-a, repository: offsite, type: prune}}
    """


# --- validation at apply time ------------------------------------------------------------------


BAD_SCHEDULE = """
apiVersion: resticmanager.io/v1alpha1
kind: Schedule
metadata: {name: bad}
spec:
  agent: web-01
  repository: local
  schedule: "61 * * * *"
  timeZone: Mars/Olympus
  template: {type: backup, backup: {paths: ["/srv"]}}
"""
GOOD_SCHEDULE = BAD_SCHEDULE.replace("name: bad", "name: good").replace('"61 * * * *"', '"*/2 * * * * *"') \
    .replace("Mars/Olympus", "Europe/London")


@contextlib.contextmanager
def webhook_registered(world: World, certs: Certificates, port: int) -> Iterator[None]:
    """A ValidatingWebhookConfiguration sending this test namespace's Schedules to the
    operator's webhook on 127.0.0.1 (url and caBundle: the test apiserver runs no Service)."""
    name = f"restic-manager-{world.namespace}"
    world.kube.kubectl("apply", "-f", "-", input=json.dumps({
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingWebhookConfiguration",
        "metadata": {"name": name},
        "webhooks": [{
            "name": "schedules.resticmanager.io", "admissionReviewVersions": ["v1"], "sideEffects": "None",
            "failurePolicy": "Fail", "timeoutSeconds": 10,
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": world.namespace}},
            "rules": [{"apiGroups": ["resticmanager.io"], "apiVersions": ["v1alpha1"], "resources": ["schedules"],
                       "operations": ["CREATE", "UPDATE"], "scope": "Namespaced"}],
            "clientConfig": {"url": f"https://127.0.0.1:{port}/validate-schedule",
                             "caBundle": base64.b64encode(certs.ca.read_bytes()).decode()},
        }],
    }))
    try:
        yield
    finally:
        world.kube.kubectl("delete", "validatingwebhookconfiguration", name, check=False)


def test_kubectl_apply_of_a_bad_schedule_fails_with_the_webhooks_message(world: World, certs: Certificates) -> None:
    port = free_port()
    world.start_operator(tls=certs, extra=["--webhook-listen", f"127.0.0.1:{port}"])
    expected = (f'admission webhook "schedules.resticmanager.io" denied the request: Schedule {world.namespace}/bad: '
                "spec.schedule: '61 * * * *': minute must be 0-59; "
                "spec.timeZone 'Mars/Olympus': not a known IANA time zone, e.g. UTC or Europe/London")
    with webhook_registered(world, certs, port):
        # The apiserver and the operator's webhook server both take a moment to be ready.
        eventually("the webhook to answer", lambda: expected in world.kubectl(
            "apply", "--dry-run=server", "-f", "-", input=BAD_SCHEDULE, check=False).stderr)
        applied = world.kubectl("apply", "-f", "-", input=BAD_SCHEDULE, check=False)
        assert applied.returncode != 0 and expected in applied.stderr, applied.stderr
        assert world.get("schedule/bad", check=False) is None

        world.apply(GOOD_SCHEDULE)
        edited = world.kubectl("patch", "schedule/good", "--type=merge", "-p",
                               json.dumps({"spec": {"repository": "other-namespace/local"}}), check=False)
        assert edited.returncode != 0
        assert ("spec.repository 'other-namespace/local': must be the name of a Repository in the Schedule's "
                "own namespace") in edited.stderr
        world.kubectl("label", "schedule/good", "team=backup")  # metadata-only changes pass


def test_a_bad_schedule_past_an_unreachable_webhook_is_invalid_and_runs_nowhere(world: World) -> None:
    """No webhook (as when it is down and failurePolicy is Ignore): the Schedule is stored,
    marked Applied=False with reason Invalid naming the fields, and never reaches an agent."""
    world.repository()
    tree = world.source_tree()
    world.start_operator()
    agent = world.add_agent("web-01")
    world.apply(BAD_SCHEDULE)
    world.wait("schedule/bad", "jsonpath={.status.conditions[0].reason}=Invalid")
    condition, healthy = world.get("schedule/bad")["status"]["conditions"]  # type: ignore[index]
    assert condition["status"] == "False" and (healthy["type"], healthy["reason"]) == ("Healthy", "Invalid")
    assert condition["message"] == ("spec.schedule: '61 * * * *': minute must be 0-59; "
                                    "spec.timeZone 'Mars/Olympus': not a known IANA time zone, e.g. UTC or "
                                    "Europe/London")
    world.apply(GOOD_SCHEDULE.replace('"/srv"', f'"{tree}"'))
    world.wait("schedule/good", "condition=Applied")
    eventually("a job of the good Schedule", lambda: world.jobs("good"))
    assert world.jobs("bad") == []
    assert "applied: 1 schedule(s), 0 rejected" in agent.output()
    assert f"{world.namespace}/bad" not in agent.output()  # never sent, so never rejected there either


# --- secrets hygiene ---------------------------------------------------------------------------


def test_the_repository_password_appears_in_no_argv_log_event_or_status(world: World, certs: Certificates) -> None:
    """During a real backup (held while it runs, then let go): every process's argv, the
    operator's and agent's DEBUG logs, the namespace's Events and every restic resource's
    status. Positive controls show the searches would find it: restic's environment has it."""
    world.repository()
    tree = world.source_tree()
    held = world.held_restic()
    world.start_operator(tls=certs, extra=["--log-level", "DEBUG"])
    agent = world.add_agent("web-01", restic=held, extra=["--log-level", "DEBUG"])
    token = world.token("web-01")
    world.apply(f"""
        apiVersion: resticmanager.io/v1alpha1
        kind: ResticJob
        metadata: {{name: hygiene}}
        spec: {{agent: web-01, repository: local, type: backup, backup: {{paths: [{tree}]}}}}
    """)
    world.wait("resticjob/hygiene", "jsonpath={.status.startTime}")
    secrets = {"the password": PASSWORD.encode(), "the password in base64": base64.b64encode(PASSWORD.encode()),
               "the agent token": token.encode()}

    argvs = {pid: argv for pid, argv in processes("cmdline")}
    restic = [pid for pid, argv in argvs.items() if str(held).encode() in argv and b"backup" in argv]
    assert restic, "the held restic is running"
    assert f"RESTIC_PASSWORD={PASSWORD}".encode() in dict(processes("environ"))[restic[0]].split(b"\0")
    assert [(pid, what) for pid, argv in argvs.items() for what, secret in secrets.items() if secret in argv] == []

    world.holds[0].unlink()  # let restic run
    world.wait("resticjob/hygiene", "jsonpath={.status.phase}=Succeeded")
    password_secret = world.get("secret/local-password")
    assert password_secret is not None and password_secret["data"]["password"] == secrets["the password in base64"].decode()

    world.close()  # every line logged
    places = {
        "operator log": world.operator.output().encode() if world.operator else b"",
        "agent log": agent.output().encode(),
        "Events": world.kubectl("get", "events", "-o", "json").stdout.encode(),
        **{f"{kind} status": json.dumps([o.get("status") for o in world.items(kind)]).encode()
           for kind in ("agents", "schedules", "resticjobs", "repositories")},
    }
    assert b"DEBUG" in places["operator log"] and b"DEBUG" in places["agent log"]
    assert b"Succeeded" in places["resticjobs status"] and b"logTail" in places["resticjobs status"]
    assert [(place, what) for place, text in places.items() for what, secret in secrets.items() if secret in text] == []


def processes(kind: str) -> Iterator[tuple[int, bytes]]:
    """(pid, /proc/<pid>/<kind>) of every process this test may read."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/{kind}", "rb") as file:
                    yield int(entry), file.read()
            except OSError:
                continue
