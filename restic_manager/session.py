"""The rules of one agent↔operator connection (SPEC §3), as state machines both ends drive.

No socket, clock, file or task here: an end tells its machine what it received and what it
is about to send, with the time where time matters, and gets back what to do. The agent
drives :class:`AgentSession`, the operator :class:`OperatorSession`; their tests are tables
of events and expected sends (tests/unit/test_session.py).

The rules:

* The agent's first frame is ``hello``, sent once. The operator's first is a
  ``schedule.set``; every set is answered by a ``schedule.ack`` of its version.
* Fires and job reports follow only once the connection's first set is acknowledged: an
  operator that has not had an ack takes no fire.
* A ``schedule.fire`` stays pending until a ``fire.result`` with a final outcome names its
  frame; ``retry`` sends it again after a backoff, and so does silence past
  :data:`RECEIPT_TIMEOUT`. A ``job.done`` stays pending until its ``job.done.ack``. A
  reconnect sends every pending message again at once (a new connection, a new machine).
  ``job.started`` and ``job.progress`` are sent once and never acknowledged.
* A receipt must name a frame of its kind that was sent on this connection; one that names
  nothing pending is refused with an ``error`` and settles nothing.

What is pending lives in the agent's outbox (agent/state.py), numbered; the machine tracks
which of those numbers are in flight on this connection, under which frame id, and when
each is due again.
"""

from __future__ import annotations

import collections
import enum
import random
import uuid
from collections.abc import Mapping
from dataclasses import dataclass

from restic_manager import protocol

# How long a fire or job.done waits for its receipt before it is sent again; later silences
# double the wait up to RESEND_CAP. A `retry` answer waits RETRY_BASE, doubling to RESEND_CAP.
RECEIPT_TIMEOUT = 15.0
RETRY_BASE = 1.0
RESEND_CAP = 60.0
# Receipts for frames already settled (the answer to a resend crossing the answer to the
# original) are ignored, not refused: the newest this many refs are remembered.
SETTLED_REMEMBERED = 1024

RECEIPTS: dict[type[protocol.Payload], type[protocol.Payload]] = {
    protocol.ScheduleFire: protocol.FireResult,
    protocol.JobDone: protocol.JobDoneAck,
}


class SessionError(Exception):
    """A frame the session's rules do not allow now; ``str()`` says why, for an ``error`` frame."""


def needs_receipt(payload: protocol.Payload) -> bool:
    return type(payload) in RECEIPTS


# --- the agent's end ---------------------------------------------------------------------


class AgentStage(enum.Enum):
    HELLO = "hello"          # nothing sent yet: hello comes first
    AWAITING_SET = "set"     # hello sent; no set acknowledged yet
    READY = "ready"          # a set is acknowledged: fires and reports may flow


@dataclass(frozen=True)
class Send:
    """Send ``payload`` as frame ``frame_id``; ``number`` is its place in the outbox.

    ``settles`` says the message leaves the outbox once sent (it needs no receipt)."""

    frame_id: str
    number: int
    payload: protocol.Payload
    settles: bool


@dataclass(frozen=True)
class Apply:
    """Apply this set with the timer, then send its ack (:meth:`AgentSession.acked`)."""

    schedule_set: protocol.ScheduleSet


@dataclass(frozen=True)
class Run:
    command: protocol.CommandRun


@dataclass(frozen=True)
class Cancel:
    job: str


@dataclass(frozen=True)
class Settled:
    """Outbox message ``number`` has its final receipt: it leaves the outbox."""

    number: int
    receipt: protocol.FireResult | protocol.JobDoneAck


@dataclass(frozen=True)
class Retry:
    """The operator asked for outbox message ``number`` again later (``fire.result`` retry)."""

    number: int
    reason: str
    after: float


@dataclass(frozen=True)
class Reply:
    """Answer the operator with this ``error``: its frame broke the rules; nothing changed."""

    error: protocol.Error


@dataclass(frozen=True)
class Reported:
    """The operator reports an ``error`` about one of this agent's frames."""

    error: protocol.Error


AgentEvent = Apply | Run | Cancel | Settled | Retry | Reply | Reported


@dataclass
class _InFlight:
    number: int
    kind: type[protocol.Payload]
    frame_id: str
    due: float      # when it is sent again, unless its receipt comes first
    silences: int = 0
    retries: int = 0


class AgentSession:
    """The agent's end of one connection.

    The shell sends :meth:`hello`, hands each :class:`Apply` to its timer and sends what
    :meth:`acked` returns, and asks :meth:`due` what of the outbox to send, again at
    :meth:`wake_at` or whenever the outbox changes or a receipt arrives.
    """

    def __init__(self, *, rng: random.Random | None = None, receipt_timeout: float = RECEIPT_TIMEOUT,
                 retry_base: float = RETRY_BASE, resend_cap: float = RESEND_CAP) -> None:
        self.stage = AgentStage.HELLO
        self._rng = rng or random.Random()
        self._receipt_timeout = receipt_timeout
        self._retry_base = retry_base
        self._resend_cap = resend_cap
        self._in_flight: dict[int, _InFlight] = {}   # by outbox number
        self._by_frame: dict[str, _InFlight] = {}    # the same, by frame id
        self._settled: collections.deque[str] = collections.deque(maxlen=SETTLED_REMEMBERED)

    # --- what the agent sends ------------------------------------------------------------

    def hello(self, hello: protocol.Hello) -> protocol.Hello:
        if self.stage is not AgentStage.HELLO:
            raise SessionError("hello is sent once, as the first frame")
        self.stage = AgentStage.AWAITING_SET
        return hello

    def acked(self, ack: protocol.ScheduleAck) -> protocol.ScheduleAck:
        """The ack of an applied set, to send; the first one opens the connection for fires."""
        if self.stage is AgentStage.HELLO:
            raise SessionError("schedule.ack before hello")
        self.stage = AgentStage.READY
        return ack

    def due(self, outbox: Mapping[int, protocol.Payload], *, now: float) -> list[Send]:
        """What of ``outbox`` (by number, oldest first) to send now: each message not yet in
        flight on this connection, and each whose receipt is overdue or that was asked for
        again. Nothing before the first ack."""
        if self.stage is not AgentStage.READY:
            return []
        for number in [number for number in self._in_flight if number not in outbox]:
            self._drop(number)  # replaced by a newer fire (newest only): its receipt settles nothing
        sends = []
        for number, payload in outbox.items():
            if not needs_receipt(payload):
                sends.append(Send(protocol.new_id(), number, payload, settles=True))
                continue
            flight = self._in_flight.get(number)
            if flight is None:
                flight = _InFlight(number, type(payload), uuid.uuid4().hex, due=now + self._receipt_timeout)
                self._in_flight[number] = self._by_frame[flight.frame_id] = flight
            elif flight.due <= now:
                flight.silences += 1
                flight.due = now + self._jitter(self._receipt_timeout * 2.0 ** min(flight.silences, 16))
            else:
                continue
            sends.append(Send(flight.frame_id, number, payload, settles=False))
        return sends

    def wake_at(self) -> float | None:
        """When something in flight is due again, if anything is."""
        return min((flight.due for flight in self._in_flight.values()), default=None)

    def _drop(self, number: int) -> None:
        flight = self._in_flight.pop(number)
        del self._by_frame[flight.frame_id]
        self._settled.append(flight.frame_id)

    # --- what the agent receives ---------------------------------------------------------

    def receive(self, frame: protocol.Frame, *, now: float) -> list[AgentEvent]:
        match frame.payload:
            case protocol.ScheduleSet() as schedule_set:
                return [Apply(schedule_set)]
            case protocol.CommandRun() as command:
                return [Run(command)]
            case protocol.CommandCancel(job=job):
                return [Cancel(job)]
            case protocol.FireResult() | protocol.JobDoneAck() as receipt:
                return self._receipt(frame, receipt, now=now)
            case protocol.Error() as error:
                return [Reported(error)]
        return [Reply(protocol.Error(code="invalid-frame", ref=frame.id,
                                     message=f"{frame.type} is sent by agents, not to them"))]

    def _receipt(self, frame: protocol.Frame, receipt: protocol.FireResult | protocol.JobDoneAck, *,
                 now: float) -> list[AgentEvent]:
        flight = self._by_frame.get(receipt.ref)
        if flight is None or RECEIPTS[flight.kind] is not type(receipt):
            if receipt.ref in self._settled:
                return []  # the answer to a resend, after the answer to the original
            return [Reply(protocol.Error(
                code="invalid-frame", ref=frame.id,
                message=f"{frame.type}: ref {receipt.ref!r} names no "
                        f"{'schedule.fire' if isinstance(receipt, protocol.FireResult) else 'job.done'} "
                        "awaiting a receipt on this connection"))]
        if isinstance(receipt, protocol.FireResult) and not receipt.outcome.final:
            flight.retries += 1
            delay = self._jitter(min(self._resend_cap, self._retry_base * 2.0 ** min(flight.retries - 1, 16)))
            flight.due = now + delay
            return [Retry(flight.number, receipt.reason, delay)]
        self._drop(flight.number)
        return [Settled(flight.number, receipt)]

    def _jitter(self, delay: float) -> float:
        # Between half and all of the delay: agents that lost the same operator spread out.
        return min(self._resend_cap, delay) * self._rng.uniform(0.5, 1.0)


# --- the operator's end ------------------------------------------------------------------


class OperatorStage(enum.Enum):
    HELLO = "hello"        # waiting for hello
    AWAITING_ACK = "ack"   # hello received; no set acknowledged yet
    READY = "ready"


AGENT_SENDS = frozenset({"hello", "schedule.ack", "schedule.fire", "job.started", "job.progress", "job.done",
                         "error"})


class OperatorSession:
    """The operator's end of one connection: which of the agent's frames may come now.

    :meth:`receive` raises :class:`SessionError` for a frame out of order; the operator
    answers it (a fire with a ``refused`` receipt, anything else with an ``error``) and
    changes nothing. :meth:`sending` is told of every set sent, so an ack is checked
    against the versions this connection was given.
    """

    def __init__(self) -> None:
        self.stage = OperatorStage.HELLO
        self._sets_sent: set[int] = set()

    def sending(self, payload: protocol.Payload) -> None:
        if self.stage is OperatorStage.HELLO:
            raise SessionError(f"{payload.TYPE} before the agent's hello")
        if isinstance(payload, protocol.ScheduleSet):
            self._sets_sent.add(payload.version)

    def receive(self, frame: protocol.Frame) -> None:
        kind = frame.type
        if kind not in AGENT_SENDS:
            raise SessionError(f"{kind} is sent by the operator, not by agents")
        if self.stage is OperatorStage.HELLO:
            if kind != "hello":
                raise SessionError(f"the first frame must be hello, not {kind}")
            self.stage = OperatorStage.AWAITING_ACK
            return
        if kind == "hello":
            raise SessionError("hello: already received; send it once, as the first frame")
        if isinstance(frame.payload, protocol.ScheduleAck):
            if frame.payload.version not in self._sets_sent:
                raise SessionError(f"schedule.ack: version {frame.payload.version} was never sent on this connection")
            self.stage = OperatorStage.READY
            return
        if kind == "error":
            return
        if self.stage is not OperatorStage.READY:
            raise SessionError(f"{kind} before this connection's schedule set was acknowledged")
