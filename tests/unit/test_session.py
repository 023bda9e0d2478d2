"""The session's rules (restic_manager/session.py) as tables of events and expected sends, no socket."""

from __future__ import annotations

import random
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import pytest

from restic_manager import protocol, session
from restic_manager.session import AgentSession, AgentStage, OperatorSession, SessionError

AT = datetime(2026, 3, 2, 2, 0, tzinfo=timezone.utc)
HELLO = protocol.Hello(agent="web-01", agent_version="1", restic_version="0.19.1",
                       protocol_version=protocol.PROTOCOL_VERSION)
ACK = protocol.ScheduleAck(version=1, applied_at=AT)
FIRE = protocol.ScheduleFire(id="ns/nightly", uid="u", generation=1, scheduled_at=AT)
DONE = protocol.JobDone(job="ns/j", outcome=protocol.Outcome.SUCCEEDED, exit_code=0, finished_at=AT)
PROGRESS = protocol.JobProgress(job="ns/j", percent_done=50)


class Highest(random.Random):
    """Jitter always at its top: the tables can name exact times."""

    def uniform(self, a: float, b: float) -> float:
        return b


def ready() -> AgentSession:
    agent = AgentSession(rng=Highest())
    agent.hello(HELLO)
    agent.acked(ACK)
    return agent


def result(ref: str, outcome: protocol.FireOutcome) -> protocol.Frame:
    return protocol.Frame("r", protocol.FireResult(ref=ref, id=FIRE.id, scheduled_at=AT, outcome=outcome))


def ack_of(ref: str, job: str = "ns/j") -> protocol.Frame:
    return protocol.Frame("a", protocol.JobDoneAck(ref=ref, job=job))


# --- the agent's end --------------------------------------------------------------------------


def test_nothing_of_the_outbox_is_sent_before_hello_and_the_first_ack() -> None:
    agent = AgentSession()
    assert agent.due({1: FIRE}, now=0.0) == []
    agent.hello(HELLO)
    assert agent.stage is AgentStage.AWAITING_SET
    assert agent.due({1: FIRE}, now=0.0) == []
    agent.acked(ACK)
    assert [send.payload for send in agent.due({1: FIRE}, now=0.0)] == [FIRE]


def test_hello_is_sent_once_and_an_ack_needs_it() -> None:
    agent = AgentSession()
    with pytest.raises(SessionError, match="before hello"):
        agent.acked(ACK)
    agent.hello(HELLO)
    with pytest.raises(SessionError, match="sent once"):
        agent.hello(HELLO)


@pytest.mark.parametrize(
    ("outcome", "settles"),
    [(protocol.FireOutcome.CREATED, True), (protocol.FireOutcome.EXISTS, True), (protocol.FireOutcome.REFUSED, True),
     (protocol.FireOutcome.MISSED, True), (protocol.FireOutcome.RETRY, False)],
)
def test_a_fire_is_settled_by_a_final_outcome_only(outcome: protocol.FireOutcome, settles: bool) -> None:
    agent = ready()
    [send] = agent.due({7: FIRE}, now=0.0)
    assert not send.settles

    [event] = agent.receive(result(send.frame_id, outcome), now=1.0)

    if settles:
        assert event == session.Settled(7, result(send.frame_id, outcome).payload)  # type: ignore[arg-type]
        assert agent.wake_at() is None
        assert agent.due({}, now=100.0) == []
    else:
        assert event == session.Retry(7, "", 1.0)  # RETRY_BASE, at the top of its jitter
        assert agent.wake_at() == 2.0
        assert agent.due({7: FIRE}, now=1.5) == []            # not before its time
        [again] = agent.due({7: FIRE}, now=2.0)
        assert (again.frame_id, again.payload) == (send.frame_id, FIRE)


def test_retries_back_off_doubling_to_the_cap() -> None:
    agent = ready()
    [send] = agent.due({1: FIRE}, now=0.0)
    delays = []
    for _ in range(9):
        [retry] = agent.receive(result(send.frame_id, protocol.FireOutcome.RETRY), now=0.0)
        assert isinstance(retry, session.Retry)
        delays.append(retry.after)
    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0, 60.0]


def test_silence_sends_a_fire_again_with_a_growing_wait() -> None:
    agent = ready()
    [send] = agent.due({1: FIRE}, now=0.0)
    assert agent.wake_at() == session.RECEIPT_TIMEOUT
    assert agent.due({1: FIRE}, now=14.9) == []
    [again] = agent.due({1: FIRE}, now=15.0)
    assert again.frame_id == send.frame_id
    assert agent.wake_at() == 15.0 + 30.0
    agent.due({1: FIRE}, now=45.0)
    assert agent.wake_at() == 45.0 + session.RESEND_CAP


def test_a_job_done_is_settled_by_its_ack_and_progress_needs_none() -> None:
    agent = ready()
    sends = agent.due({1: PROGRESS, 2: DONE}, now=0.0)
    assert [(s.number, s.settles) for s in sends] == [(1, True), (2, False)]
    [event] = agent.receive(ack_of(sends[1].frame_id), now=0.0)
    assert isinstance(event, session.Settled) and event.number == 2


def test_a_new_connection_sends_everything_pending_at_once() -> None:
    first = ready()
    [send] = first.due({1: FIRE, 2: DONE}, now=0.0)[:1]
    second = ready()  # the next connection: a new session
    assert [s.number for s in second.due({1: FIRE, 2: DONE}, now=0.0)] == [1, 2]


Receipt = Callable[[str], protocol.Frame]
BAD_RECEIPTS: list[tuple[str, Receipt, str]] = [
    ("a fire.result naming a frame never sent", lambda ref: result("nope", protocol.FireOutcome.CREATED),
     "ref 'nope' names no schedule.fire awaiting a receipt"),
    ("a job.done.ack naming a fire", lambda ref: ack_of(ref), "names no job.done awaiting a receipt"),
]


@pytest.mark.parametrize(("case", "receipt", "message"), BAD_RECEIPTS, ids=[c[0] for c in BAD_RECEIPTS])
def test_a_receipt_for_nothing_pending_is_refused_and_settles_nothing(case: str, receipt: Receipt, message: str) -> None:
    agent = ready()
    [send] = agent.due({1: FIRE}, now=0.0)
    [event] = agent.receive(receipt(send.frame_id), now=0.0)
    assert isinstance(event, session.Reply) and message in event.error.message
    assert agent.wake_at() == session.RECEIPT_TIMEOUT  # still pending


def test_the_answer_to_a_resend_after_the_answer_to_the_original_is_ignored() -> None:
    agent = ready()
    [send] = agent.due({1: FIRE}, now=0.0)
    agent.receive(result(send.frame_id, protocol.FireOutcome.CREATED), now=0.0)
    assert agent.receive(result(send.frame_id, protocol.FireOutcome.EXISTS), now=0.0) == []


def test_a_fire_replaced_by_a_newer_one_is_no_longer_sent_and_its_receipt_settles_nothing() -> None:
    agent = ready()
    [old] = agent.due({1: FIRE}, now=0.0)
    newer = protocol.ScheduleFire(id=FIRE.id, uid="u", generation=1, scheduled_at=AT.replace(hour=3))
    [new] = agent.due({2: newer}, now=1.0)  # the outbox kept the newest only
    assert new.payload == newer and agent.wake_at() == 1.0 + session.RECEIPT_TIMEOUT
    assert agent.receive(result(old.frame_id, protocol.FireOutcome.CREATED), now=2.0) == []


OPERATOR_FRAMES: list[tuple[str, protocol.Payload, type[Any]]] = [
    ("a set", protocol.ScheduleSet(version=1, schedules=[]), session.Apply),
    ("a command", protocol.CommandRun(job="ns/j", type=protocol.JobType.PRUNE, args=protocol.NoArgs(),
                                      repository=protocol.Repository(url="/r")), session.Run),
    ("a cancel", protocol.CommandCancel(job="ns/j"), session.Cancel),
    ("an error", protocol.Error(code="internal", message="x"), session.Reported),
    ("a frame agents send", FIRE, session.Reply),
]


@pytest.mark.parametrize(("case", "payload", "event"), OPERATOR_FRAMES, ids=[c[0] for c in OPERATOR_FRAMES])
def test_what_the_operator_sends_becomes_one_event(case: str, payload: protocol.Payload, event: type[Any]) -> None:
    [got] = ready().receive(protocol.Frame("f", payload), now=0.0)  # type: ignore[arg-type]
    assert isinstance(got, event)


# --- the operator's end -----------------------------------------------------------------------


def frames(*payloads: protocol.Payload) -> list[protocol.Frame]:
    return [protocol.Frame(f"f{n}", payload) for n, payload in enumerate(payloads)]  # type: ignore[arg-type]


ORDER: list[tuple[str, list[protocol.Payload], list[int], str | None]] = [
    # (case, frames from the agent, set versions sent after hello, the refusal of the last frame)
    ("hello, then the ack of a set sent, then a fire", [HELLO, ACK, FIRE], [1], None),
    ("a fire first", [FIRE], [], "the first frame must be hello"),
    ("a fire before any ack", [HELLO, FIRE], [1], "before this connection's schedule set was acknowledged"),
    ("a job.done before any ack", [HELLO, DONE], [1], "before this connection's schedule set was acknowledged"),
    ("an ack of a set never sent", [HELLO, protocol.ScheduleAck(version=9, applied_at=AT)], [1],
     "version 9 was never sent"),
    ("hello twice", [HELLO, ACK, HELLO], [1], "already received"),
    ("a frame the operator sends", [HELLO, protocol.CommandCancel(job="ns/j")], [], "sent by the operator"),
    ("a receipt from the agent", [HELLO, ACK, protocol.JobDoneAck(ref="x", job="ns/j")], [1], "sent by the operator"),
    ("an error is always allowed", [HELLO, protocol.Error(code="internal", message="x")], [], None),
]


@pytest.mark.parametrize(("case", "payloads", "sets", "refusal"), ORDER, ids=[c[0] for c in ORDER])
def test_the_operator_takes_frames_in_the_sessions_order(
        case: str, payloads: list[protocol.Payload], sets: list[int], refusal: str | None) -> None:
    operator = OperatorSession()
    *before, last = frames(*payloads)
    for frame in before:
        operator.receive(frame)
        if isinstance(frame.payload, protocol.Hello):
            for version in sets:
                operator.sending(protocol.ScheduleSet(version=version, schedules=[]))
    if refusal is None:
        operator.receive(last)
    else:
        with pytest.raises(SessionError, match=refusal):
            operator.receive(last)


def test_the_operator_sends_nothing_before_hello() -> None:
    with pytest.raises(SessionError, match="before the agent's hello"):
        OperatorSession().sending(protocol.ScheduleSet(version=1, schedules=[]))
