"""Hostile input against a running operator: the real Controller and AgentServer on 127.0.0.1
(in a thread of their own, with a fake API behind them), real WebSocket clients in front.

* More than 10,000 random and mutated frames from an authenticated agent: every frame that
  is not a valid message gets an ``invalid-frame`` error naming what is wrong (checked
  against :func:`protocol.decode` as the oracle, in order), nothing ever gets ``internal``,
  the connection stays open, and another agent's fires keep becoming ResticJobs throughout.
* Random bytes on raw TCP, before the handshake and after it: the operator drops that
  connection and goes on serving.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import json
import socket
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from websockets.sync.client import ClientConnection, connect

from restic_manager import protocol
from restic_manager.operator.agents.limits import Limits
from restic_manager.operator.controller import Controller
from support.operator_fakes import FakeKube, complete_view

NS = "ns"
TOKENS = {"fuzzer": "fuzzer-token-0123456789", "honest": "honest-token-0123456789"}
CREATED = "2026-01-01T00:00:00Z"
FRAMES_PER_BATCH = 50
BATCHES = 210  # 10,500 frames
TIMEOUT = 30


# Two Agents with token Secrets, and one Schedule whose jobs never wait for another.
VIEW = [
    *[("agents", {"metadata": {"name": name, "namespace": NS, "uid": f"uid-{name}", "resourceVersion": "1"}})
      for name in TOKENS],
    *[("secrets", {"metadata": {"name": f"{name}-agent-token", "namespace": NS, "uid": f"s-{name}",
                                "resourceVersion": "2",
                                "ownerReferences": [{"apiVersion": "resticmanager.io/v1alpha1", "kind": "Agent",
                                                     "name": name, "uid": f"uid-{name}"}]},
                   "data": {"token": base64.b64encode(token.encode()).decode()}})
      for name, token in TOKENS.items()],
    ("schedules", {"metadata": {"name": "nightly", "namespace": NS, "uid": "uid-nightly", "generation": 1,
                                "resourceVersion": "3", "creationTimestamp": CREATED},
                   "spec": {"agent": "honest", "repository": "offsite", "schedule": "0 2 * * *",
                            "concurrencyPolicy": "Allow", "successfulJobsHistoryLimit": 1000,
                            "template": {"type": "backup", "backup": {"paths": ["/etc"]}}}}),
    # Never read from the API (no Repository there): jobs wait, which is fine here.
    ("repositories", {"metadata": {"name": "offsite", "namespace": NS, "uid": "uid-offsite",
                                   "resourceVersion": "4"}, "spec": {}}),
]


class RunningOperator:
    """The controller's run() on its own event loop in a thread, until stop()."""

    def __init__(self) -> None:
        self.kube = FakeKube()
        # No keepalive pings: they draw from `random`, which hypothesis wants left alone.
        self.controller = Controller(kube=self.kube, namespaces=None,  # type: ignore[arg-type]
                                     limits=Limits(frames_per_second=1e9, burst=10**9, ping_interval=None))
        self.loop = asyncio.new_event_loop()
        self.port = 0
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, name="operator", daemon=True)
        self._task: asyncio.Task[None] | None = None

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)

        def started(port: int) -> None:
            self.port = port
            self._started.set()

        self._task = self.loop.create_task(self.controller.run(host="127.0.0.1", port=0, started=started))
        self.loop.call_soon(complete_view, self.controller, *VIEW)
        try:
            self.loop.run_until_complete(self._task)
        except asyncio.CancelledError:
            pass
        finally:
            self.loop.close()

    def start(self) -> None:
        self._thread.start()
        assert self._started.wait(TIMEOUT), "the operator did not start serving"

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    def stop(self) -> None:
        if self._task is not None:
            self.loop.call_soon_threadsafe(self._task.cancel)
        self._thread.join(TIMEOUT)


@pytest.fixture(scope="module")
def operator() -> Iterator[RunningOperator]:
    running = RunningOperator()
    running.start()
    yield running
    running.stop()


@contextlib.contextmanager
def agent(operator: RunningOperator, name: str) -> Iterator[ClientConnection]:
    """A connected agent that said hello and acknowledged its first schedule set."""
    with connect(f"ws://127.0.0.1:{operator.port}/agent", open_timeout=TIMEOUT, ping_interval=None,
                 additional_headers={"Authorization": f"Bearer {TOKENS[name]}"}) as websocket:
        greet(websocket, name)
        yield websocket


PUSHED: dict[str, set[int]] = {}  # by agent: the set versions its connection was sent


def greet(websocket: ClientConnection, name: str) -> None:
    websocket.send(protocol.encode(protocol.Hello(agent=name, agent_version="fuzz", restic_version="0",
                                                  protocol_version=protocol.PROTOCOL_VERSION)))
    pushed = protocol.decode(websocket.recv(timeout=TIMEOUT)).payload
    assert isinstance(pushed, protocol.ScheduleSet)
    PUSHED[name] = {pushed.version}
    websocket.send(protocol.encode(protocol.ScheduleAck(
        version=pushed.version, applied_at=datetime.now(timezone.utc),
        applied=[protocol.AppliedEntry(id=e.id, generation=e.generation) for e in pushed.schedules])))


def until_barrier(websocket: ClientConnection, barrier: str) -> list[protocol.Payload]:
    """Everything the operator sent up to its answer to the ``barrier`` frame (a command.cancel,
    which agents may not send): the operator handles one connection's frames in order."""
    websocket.send(protocol.encode(protocol.CommandCancel(job=f"{NS}/barrier"), frame_id=barrier))
    received = []
    while True:
        payload = protocol.decode(websocket.recv(timeout=TIMEOUT)).payload
        if isinstance(payload, protocol.Error) and payload.ref == barrier:
            return received
        received.append(payload)


# --- what the fuzzer sends ------------------------------------------------------------------

AT = "2026-03-02T02:00:00+00:00"
VALID = [json.loads(protocol.encode(payload, frame_id="seed")) for payload in (
    protocol.ScheduleAck(version=1, applied_at=datetime.fromisoformat(AT),
                         applied=[protocol.AppliedEntry(id=f"{NS}/nightly", generation=1)]),
    protocol.ScheduleFire(id=f"{NS}/nightly", uid="uid-nightly", generation=1, scheduled_at=datetime.fromisoformat(AT)),
    protocol.JobStarted(job=f"{NS}/some-job", started_at=datetime.fromisoformat(AT)),
    protocol.JobProgress(job=f"{NS}/some-job", percent_done=12.5, files_done=3, seconds_remaining=9.0),
    protocol.JobDone(job=f"{NS}/some-job", outcome=protocol.Outcome.FAILED, exit_code=1,
                     finished_at=datetime.fromisoformat(AT), error="boom", log_tail=["a", "b"]),
    protocol.Error(code="internal", message="agent-side trouble", ref="x"),
    protocol.Hello(agent="fuzzer", agent_version="1", restic_version="0", protocol_version=1),
    protocol.CommandRun(job=f"{NS}/j", type=protocol.JobType.PRUNE, args=protocol.NoArgs(),
                        repository=protocol.Repository(url="/r", env={"RESTIC_PASSWORD": "x"})),
)]

scalars = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
           | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=16))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=12), inner, max_size=4), max_leaves=10)
names = st.sampled_from(["type", "id", "payload", "job", "id", "uid", "generation", "scheduledAt", "version",
                         "appliedAt", "applied", "rejected", "outcome", "exitCode", "finishedAt", "logTail",
                         "percentDone", "agent", "code", "message", "ref"]) | st.text(max_size=8)


@st.composite
def mutated(draw: st.DrawFn) -> str:
    """A valid frame with one thing changed: a field dropped, replaced, added or retyped."""
    frame = copy.deepcopy(draw(st.sampled_from(VALID)))
    target = frame if draw(st.booleans()) else frame["payload"]
    action = draw(st.sampled_from(["drop", "replace", "add", "type", "id"]))
    keys = sorted(target)
    if action == "drop" and keys:
        del target[draw(st.sampled_from(keys))]
    elif action == "replace" and keys:
        target[draw(st.sampled_from(keys))] = draw(json_values)
    elif action == "add":
        target[draw(names)] = draw(json_values)
    elif action == "type":
        frame["type"] = draw(st.sampled_from(sorted(protocol.PAYLOADS)) | st.text(max_size=12))
    else:
        frame["id"] = draw(st.text(max_size=200) | st.integers() | st.none())
    text = json.dumps(frame)
    if draw(st.booleans()):  # and sometimes a byte-level edit on top: a cut, a splice
        cut = draw(st.integers(min_value=0, max_value=len(text)))
        text = text[:cut] + draw(st.text(max_size=4)) + text[cut + draw(st.integers(0, 3)):]
    return text


frames = st.one_of(
    mutated(),
    mutated(),
    st.builds(json.dumps, json_values),
    st.text(max_size=200),
    st.binary(max_size=200),
    st.sampled_from([json.dumps(v) for v in VALID]),
)

# Found the hard way or by thinking: numbers Python parses but the API would refuse to store.
REGRESSIONS = [
    '{"type":"job.progress","id":"n","payload":{"job":"ns/x","secondsRemaining":NaN}}',
    '{"type":"job.progress","id":"i","payload":{"job":"ns/x","secondsRemaining":1e999}}',
    '{"type":"schedule.ack","id":"v","payload":{"version":' + "9" * 5000 + ',"appliedAt":"' + AT + '"}}',
    '{"type":"schedule.ack","id":"b","payload":{"version":99999999999999999999,"appliedAt":"' + AT + '"}}',
    "[" * 100_000,
]


def expected_invalid(data: str | bytes) -> tuple[str | None, str] | None:
    """The (ref, message) of the invalid-frame error ``data`` must get, if it must get one."""
    try:
        frame = protocol.decode(data)
    except protocol.ProtocolError as error:
        return error.ref, str(error)
    if isinstance(frame.payload, protocol.ScheduleAck) and frame.payload.version not in PUSHED["fuzzer"]:
        return frame.id, f"schedule.ack: version {frame.payload.version} was never sent on this connection"
    if isinstance(frame.payload, protocol.Hello):
        return frame.id, "hello: already received; send it once, as the first frame"
    if isinstance(frame.payload, (protocol.ScheduleSet, protocol.CommandRun, protocol.CommandCancel,
                                  protocol.FireResult, protocol.JobDoneAck)):
        return frame.id, f"{frame.type} is sent by the operator, not by agents"
    return None


def test_ten_thousand_hostile_frames_get_clear_errors_and_harm_no_one(operator: RunningOperator) -> None:
    with agent(operator, "fuzzer") as fuzzer, agent(operator, "honest") as honest:
        run_fuzz(operator, fuzzer, honest)


def run_fuzz(operator: RunningOperator, fuzzer: ClientConnection, honest: ClientConnection) -> None:
    sent: list[int] = []
    fires = datetime(2026, 1, 2, 2, tzinfo=timezone.utc)  # 02:00, when the Schedule (0 2 * * *) fires

    @settings(max_examples=BATCHES, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(st.lists(frames, min_size=FRAMES_PER_BATCH, max_size=FRAMES_PER_BATCH))
    @example(REGRESSIONS)
    def batch(datas: list[str | bytes]) -> None:
        expected = [e for e in map(expected_invalid, datas) if e is not None]
        for data in datas:
            fuzzer.send(data)
        barrier = f"barrier-{len(sent)}"
        answers = [p for p in until_barrier(fuzzer, barrier) if isinstance(p, protocol.Error)]
        assert [e.code for e in answers if e.code not in ("invalid-frame", "forbidden")] == []
        assert [(e.ref, e.message) for e in answers if e.code == "invalid-frame"] == expected
        sent.append(len(datas))

        # Meanwhile another agent's fire still becomes a ResticJob.
        jobs = operator.kube.jobs()
        fire = protocol.ScheduleFire(id=f"{NS}/nightly", uid="uid-nightly", generation=1,
                                     scheduled_at=fires + timedelta(days=len(sent)))
        honest.send(protocol.encode(fire, frame_id="fire"))
        assert [p for p in until_barrier(honest, f"honest-{len(sent)}") if isinstance(p, protocol.Error)] == []
        assert operator.kube.jobs() == jobs + 1

    batch()
    assert sum(sent) >= 10_000
    assert operator.alive and fuzzer.close_code is None and honest.close_code is None
    assert operator.controller.metrics.frames_refused["invalid-frame"] > 0


UPGRADE = (b"GET /agent HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
           b"Authorization: Bearer " + TOKENS["fuzzer"].encode() + b"\r\n\r\n")


def raw_exchange(port: int, data: bytes, *, upgrade: bool) -> None:
    """Send ``data`` on a raw TCP connection (after a real upgrade if asked), then hang up."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        if upgrade:
            sock.sendall(UPGRADE)
            response = b""
            while b"\r\n\r\n" not in response:
                chunk = sock.recv(4096)
                assert chunk, "the operator closed the connection during the upgrade"
                response += chunk
            assert response.startswith(b"HTTP/1.1 101"), response
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            while sock.recv(65536):  # whatever it answers, until it closes
                pass
        except OSError:
            pass  # it may reset the connection: that is an answer too


def test_any_bytes_on_the_socket_leave_the_operator_serving(operator: RunningOperator) -> None:
    @settings(max_examples=150, deadline=None, derandomize=True, database=None)
    @given(st.binary(max_size=512), st.booleans())
    @example(b"\x88\x80\x00\x00\x00\x00", True)    # a masked close frame with no payload
    @example(b"\x81\xff" + b"\xff" * 8, True)        # a frame claiming 2**64 - 1 bytes
    @example(b"GET / HTTP/1.1\r\n" + b"X: " + b"y" * 70000 + b"\r\n\r\n", False)
    def garbage(data: bytes, upgrade: bool) -> None:
        raw_exchange(operator.port, data, upgrade=upgrade)

    garbage()
    assert operator.alive
    with agent(operator, "honest") as honest:
        until_barrier(honest, "still-there")
