"""The wire protocol between the operator and its agents: the one place it is defined.

One WebSocket per agent carries JSON text frames. Every frame is an envelope::

    {"type": "schedule.fire", "id": "7f3c…", "payload": {...}}

``type`` selects the payload schema below, ``id`` is chosen by the sender (unique per
connection; an ``error`` names the ``id`` it answers in ``ref``), ``payload`` holds the
message. Field names are camelCase on the wire and snake_case in Python. Every inbound
frame is validated with :func:`decode`: an unknown type, a missing, extra or mistyped
field, or a frame over :data:`MAX_FRAME_BYTES` raises :class:`ProtocolError` with a
message that says which, so the receiver can answer with an ``error`` frame and go on.

Connection life: the agent connects; the operator's handshake response carries the
protocol version it speaks in the :data:`PROTOCOL_HEADER` header, and an agent that speaks
another refuses it. The agent sends ``hello`` first; the operator answers with
``schedule.set`` (the whole set for that agent, possibly empty), and the agent answers
every set with ``schedule.ack``. Fires and job reports follow only once this connection's
first set is acknowledged. From then on, in any order:

=================  ==========  =========================================================
type               direction   payload
=================  ==========  =========================================================
hello              agent → op  agent, agentVersion, resticVersion, protocolVersion,
                               hostname, runningJobs[], finishedJobs[] (ended, job.done
                               not yet acknowledged: it follows), interruptedJobs[] (an
                               earlier agent process died running them: command.run
                               again makes the agent report their outcome, not rerun)
schedule.set       op → agent  version, schedules[] {id, uid, generation, schedule,
                               timeZone, suspend}
schedule.ack       agent → op  version, appliedAt, applied[] {id, generation},
                               rejected[] {id, generation, error}
schedule.fire      agent → op  id, uid, generation, scheduledAt (the nominal cron time)
command.run        op → agent  job, type, args (the type's parameters), repository
                               {url, env, initialize}, timeoutSeconds
command.cancel     op → agent  job
job.started        agent → op  job, startedAt
job.progress       agent → op  job, percentDone, filesDone, totalFiles, bytesDone,
                               totalBytes, secondsElapsed, secondsRemaining
job.done           agent → op  job, outcome, exitCode, finishedAt, summary, error,
                               logTail[], interrupted (the agent died while restic ran),
                               refused (the host's agent config does not allow it),
                               timedOut (stopped after timeoutSeconds)
fire.result        op → agent  ref (the schedule.fire frame's id), id, scheduledAt,
                               outcome (created | exists | refused | missed | retry),
                               job (created, exists), reason (the others)
job.done.ack       op → agent  ref (the job.done frame's id), job
error              both        code, message, ref (the id of the frame it answers)
=================  ==========  =========================================================

Receipts: a ping's pong proves only that bytes arrived, so it is never taken for delivery.
A ``schedule.fire`` is settled by a ``fire.result`` with a final outcome, sent once that
outcome is durable (the ResticJob exists; a refusal or miss is on the Schedule's status and
in an Event); ``retry`` and silence leave it pending, to be sent again. A ``job.done`` is
settled by its ``job.done.ack``, sent once the job's final status is written. ``job.started``
and ``job.progress`` are best effort. restic_manager/session.py holds the rules both ends
follow: what may be sent when, and what each receipt settles.

Refusals: a refused handshake's response names only the refusal's reason code
(``unknown-token``, ``wrong-service-account``, …) in the :data:`REFUSAL_HEADER` header; an
open connection the operator ends carries one of the close codes below (or 1008, policy
violation, with a reason). agent/retry.py decides what each means for the agent.

Schedule ids and job names are ``namespace/name``. Times are ISO 8601 with an offset.
Repository credentials travel only in ``command.run``'s ``repository.env``; nothing else
carries them, and ``CommandRun.__repr__`` hides them so a log line cannot leak them.
"""

from __future__ import annotations

import functools
import json
import re
import uuid
from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from types import UnionType
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal, TypeAlias, Union, get_args, get_origin

import msgspec

# 2: receipts (fire.result, job.done.ack) and hello's finishedJobs and interruptedJobs.
PROTOCOL_VERSION = 2
# The handshake response header in which the operator names the protocol version it speaks.
PROTOCOL_HEADER = "Restic-Manager-Protocol"
# The header of a refused handshake's response that names the refusal's reason code, and
# nothing else: which Agent, ServiceAccount or node it concerns stays in the operator's log.
REFUSAL_HEADER = "Restic-Manager-Refusal"
# Close codes the operator ends a session with (4000-4999: private use, RFC 6455 §7.4.2).
CLOSE_REPLACED = 4000     # a newer connection with the same credentials took over
CLOSE_REVOKED = 4001      # the credentials the connection was opened with no longer hold
CLOSE_WRONG_AGENT = 4002  # hello named another Agent than the one the credentials belong to
MAX_FRAME_BYTES = 1024 * 1024
LOG_TAIL_LINES = 50

# Kubernetes object names: a namespace is a DNS-1123 label, any other name a DNS-1123
# subdomain. The one check of names, on the wire, in agents' settings and in the operator,
# so ``..`` or ``%2e`` never reach an API path. Patterns end in \Z, not $: Python's $ also
# matches before a final newline.
_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
OBJECT_NAME = rf"{_LABEL}(\.{_LABEL})*"
MAX_OBJECT_NAME = 253
_OBJECT_NAME = re.compile(OBJECT_NAME)


def is_object_name(value: object) -> bool:
    """Whether ``value`` can name a Kubernetes object (a DNS-1123 subdomain)."""
    return isinstance(value, str) and len(value) <= MAX_OBJECT_NAME and _OBJECT_NAME.fullmatch(value) is not None


NamespacedName = Annotated[str, msgspec.Meta(pattern=rf"^{_LABEL}/{OBJECT_NAME}\Z", max_length=63 + 1 + MAX_OBJECT_NAME)]
ObjectName = Annotated[str, msgspec.Meta(pattern=rf"^{OBJECT_NAME}\Z", max_length=MAX_OBJECT_NAME)]
# The longest text field a message may carry; the operator refuses longer cron expressions
# in a Schedule's spec (operator/validation.py) rather than send a set its agents refuse.
MAX_TEXT = 4096
ShortText = Annotated[str, msgspec.Meta(max_length=MAX_TEXT)]
Count = Annotated[int, msgspec.Meta(ge=0)]
AwareDatetime = Annotated[datetime, msgspec.Meta(tz=True)]


class ProtocolError(ValueError):
    """A frame that is not a valid message; ``str()`` says what is wrong with it."""

    def __init__(self, message: str, *, ref: str | None = None) -> None:
        super().__init__(message)
        self.ref = ref


class Model(msgspec.Struct, rename="camel", forbid_unknown_fields=True, frozen=True):
    """Strict wire model: camelCase names, no unknown fields, immutable.

    Every subclass says ``frozen=True, kw_only=True`` again: mypy does not carry ``frozen``
    down to subclasses, and msgspec does not carry ``kw_only`` (keyword-only arguments let
    a required field follow one with a default).

    The constructor does not validate: build a message from data that came from outside
    (the wire, a Kubernetes object, restic's output) with ``msgspec.convert(data, Type)``,
    which does, and raises ``msgspec.ValidationError`` (see :func:`describe`).
    """


# --- job parameters: the same blocks as a ResticJob's spec -------------------------------


class JobType(str, Enum):
    BACKUP = "backup"
    FORGET = "forget"
    PRUNE = "prune"
    CHECK = "check"
    RESTORE = "restore"
    UNLOCK = "unlock"
    INIT = "init"


class BackupArgs(Model, frozen=True, kw_only=True):
    paths: Annotated[list[ShortText], msgspec.Meta(min_length=1)]
    exclude: list[ShortText] = []
    tags: list[ShortText] = []
    one_file_system: bool = False


class ForgetArgs(Model, frozen=True, kw_only=True):
    keep_last: Count = 0
    keep_hourly: Count = 0
    keep_daily: Count = 0
    keep_weekly: Count = 0
    keep_monthly: Count = 0
    keep_yearly: Count = 0
    keep_within: Annotated[str, msgspec.Meta(pattern=r"^(\d+[yMwdhms])*\Z")] = ""
    prune: bool = False

    def __post_init__(self) -> None:
        # restic refuses a forget without a policy; say so before it is sent anywhere.
        if not any(
            (self.keep_last, self.keep_hourly, self.keep_daily, self.keep_weekly,
             self.keep_monthly, self.keep_yearly, self.keep_within)
        ):
            raise ValueError("forget needs at least one keep* rule")


class CheckArgs(Model, frozen=True, kw_only=True):
    read_data_subset: Annotated[
        str, msgspec.Meta(pattern=r"^(\d+(\.\d+)?%|\d+/\d+|\d+[KMGT]?)?\Z")
    ] = ""


class RestoreArgs(Model, frozen=True, kw_only=True):
    snapshot: Annotated[str, msgspec.Meta(pattern=r"^(latest|[0-9a-f]{8,64})\Z")] = "latest"
    target: Annotated[ShortText, msgspec.Meta(min_length=1)]
    include: list[ShortText] = []
    exclude: list[ShortText] = []


class NoArgs(Model, frozen=True, kw_only=True):
    """prune, unlock and init take no parameters."""


JobArgs: TypeAlias = BackupArgs | ForgetArgs | CheckArgs | RestoreArgs | NoArgs
ARGS_BY_TYPE: dict[JobType, type[JobArgs]] = {
    JobType.BACKUP: BackupArgs,
    JobType.FORGET: ForgetArgs,
    JobType.CHECK: CheckArgs,
    JobType.RESTORE: RestoreArgs,
    JobType.PRUNE: NoArgs,
    JobType.UNLOCK: NoArgs,
    JobType.INIT: NoArgs,
}


# --- payloads ----------------------------------------------------------------------------


class Payload(Model, frozen=True, kw_only=True):
    TYPE: ClassVar[str]


class Hello(Payload, frozen=True, kw_only=True):
    TYPE: ClassVar[str] = "hello"
    agent: ObjectName
    agent_version: ShortText
    restic_version: ShortText
    protocol_version: int
    hostname: ShortText = ""
    running_jobs: list[NamespacedName] = []
    # Jobs that ended while their job.done waits for its ack: it follows hello, so the
    # operator does not take them for lost.
    finished_jobs: list[NamespacedName] = []
    # Jobs an earlier process of the agent was running when it died: the operator sends their
    # command.run again, and the agent answers with their outcome (their snapshot, if restic
    # saved one) instead of running them a second time.
    interrupted_jobs: list[NamespacedName] = []


class ScheduleEntry(Model, frozen=True, kw_only=True):
    id: NamespacedName
    uid: ShortText
    generation: Annotated[int, msgspec.Meta(ge=1)]
    schedule: ShortText
    time_zone: ShortText = "UTC"
    suspend: bool = False


class ScheduleSet(Payload, frozen=True, kw_only=True):
    TYPE: ClassVar[str] = "schedule.set"
    version: Annotated[int, msgspec.Meta(ge=0)]
    schedules: list[ScheduleEntry]


class AppliedEntry(Model, frozen=True, kw_only=True):
    id: NamespacedName
    generation: int


class RejectedEntry(Model, frozen=True, kw_only=True):
    id: NamespacedName
    generation: int
    error: ShortText


class ScheduleAck(Payload, frozen=True, kw_only=True):
    TYPE: ClassVar[str] = "schedule.ack"
    version: int
    applied_at: AwareDatetime
    applied: list[AppliedEntry] = []
    rejected: list[RejectedEntry] = []


class ScheduleFire(Payload, frozen=True, kw_only=True):
    TYPE: ClassVar[str] = "schedule.fire"
    id: NamespacedName
    uid: ShortText
    generation: int
    scheduled_at: AwareDatetime


class Repository(Model, frozen=True, kw_only=True):
    url: ShortText
    env: dict[str, str] = {}
    # Repository.spec.initialize: run `restic init` first when the repository does not exist.
    initialize: bool = False

    def __repr__(self) -> str:
        return f"Repository(url={self.url!r}, env=<{len(self.env)} hidden>, initialize={self.initialize})"

    __str__ = __repr__


class CommandRun(Payload, frozen=True, kw_only=True):
    TYPE: ClassVar[str] = "command.run"
    job: NamespacedName
    type: JobType
    # On the wire an object, checked against the schema `type` names in __post_init__ (a
    # Struct field cannot be an untagged union of Structs); in Python that schema's Struct.
    if TYPE_CHECKING:
        args: JobArgs
    else:
        args: dict[str, Any]
    repository: Repository
    timeout_seconds: Annotated[int, msgspec.Meta(ge=1)] = 14400

    def __post_init__(self) -> None:
        schema = ARGS_BY_TYPE[self.type]
        if isinstance(self.args, schema):
            return
        if not isinstance(self.args, dict):
            raise TypeError(f"args for {self.type.value}: expected {schema.__name__}")
        try:
            args = msgspec.convert(self.args, schema)
        except msgspec.ValidationError as error:
            raise ValueError(f"args for {self.type.value}: {describe(error, schema)}") from None
        msgspec.structs.force_setattr(self, "args", args)


class CommandCancel(Payload, frozen=True, kw_only=True):
    TYPE: ClassVar[str] = "command.cancel"
    job: NamespacedName


class JobStarted(Payload, frozen=True, kw_only=True):
    TYPE: ClassVar[str] = "job.started"
    job: NamespacedName
    started_at: AwareDatetime


class JobProgress(Payload, frozen=True, kw_only=True):
    TYPE: ClassVar[str] = "job.progress"
    job: NamespacedName
    percent_done: Annotated[float, msgspec.Meta(ge=0, le=100)] = 0.0
    files_done: Count = 0
    total_files: Count = 0
    bytes_done: Count = 0
    total_bytes: Count = 0
    seconds_elapsed: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    seconds_remaining: float | None = None


class Outcome(str, Enum):
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    CANCELLED = "Cancelled"


class Summary(Model, frozen=True, kw_only=True):
    """restic's summary of a backup; fields restic 0.14 does not print stay None."""

    snapshot_id: str | None = None
    files_new: int | None = None
    files_changed: int | None = None
    files_unmodified: int | None = None
    data_added: int | None = None
    total_files_processed: int | None = None
    total_bytes_processed: int | None = None
    duration_seconds: float | None = None


class JobDone(Payload, frozen=True, kw_only=True):
    TYPE: ClassVar[str] = "job.done"
    job: NamespacedName
    outcome: Outcome
    exit_code: int | None = None
    finished_at: AwareDatetime
    summary: Summary | None = None
    error: ShortText = ""
    log_tail: Annotated[list[ShortText], msgspec.Meta(max_length=LOG_TAIL_LINES)] = []
    # The agent stopped (was killed, restarted) while restic ran, and restic was stopped with it.
    interrupted: bool = False
    # The host's agent config does not allow the job (a path, target or repository); restic never ran.
    refused: bool = False
    # restic ran longer than the command's timeoutSeconds and the agent stopped it.
    timed_out: bool = False


class FireOutcome(str, Enum):
    CREATED = "created"    # the ResticJob exists now
    EXISTS = "exists"      # it existed already: this fire was delivered before
    REFUSED = "refused"    # not honoured; the reason is recorded
    MISSED = "missed"      # past startingDeadlineSeconds; recorded as missed
    RETRY = "retry"        # not decided now (API error, overload): send it again later

    @property
    def final(self) -> bool:
        return self is not FireOutcome.RETRY


FrameId = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]


class FireResult(Payload, frozen=True, kw_only=True):
    TYPE: ClassVar[str] = "fire.result"
    ref: FrameId
    id: NamespacedName
    scheduled_at: AwareDatetime
    outcome: FireOutcome
    job: NamespacedName | None = None
    reason: ShortText = ""


class JobDoneAck(Payload, frozen=True, kw_only=True):
    TYPE: ClassVar[str] = "job.done.ack"
    ref: FrameId
    job: NamespacedName


class Error(Payload, frozen=True, kw_only=True):
    TYPE: ClassVar[str] = "error"
    code: Literal["invalid-frame", "forbidden", "rate-limited", "internal"]
    message: ShortText
    ref: str | None = None


AnyPayload: TypeAlias = Union[
    Hello, ScheduleSet, ScheduleAck, ScheduleFire, CommandRun, CommandCancel,
    JobStarted, JobProgress, JobDone, FireResult, JobDoneAck, Error,
]
PAYLOADS: dict[str, type[Payload]] = {
    model.TYPE: model
    for model in (Hello, ScheduleSet, ScheduleAck, ScheduleFire, CommandRun, CommandCancel,
                  JobStarted, JobProgress, JobDone, FireResult, JobDoneAck, Error)
}


@dataclass(frozen=True)
class Frame:
    """One envelope with its payload, as :func:`decode` returns it once both are validated.

    A plain class, not a model: it is never converted from data as a whole; :func:`decode`
    checks the envelope itself and converts only the payload.
    """

    id: str
    payload: AnyPayload

    @property
    def type(self) -> str:
        return self.payload.TYPE


def new_id() -> str:
    return uuid.uuid4().hex


def to_wire(message: Model) -> dict[str, Any]:
    """``message`` as JSON data: camelCase names, times as ISO 8601, enums as their values,
    and every field whose value is None left out (all others written, defaults included)."""
    return _without_none(message, msgspec.to_builtins(message))


def _without_none(message: Model, data: dict[str, Any]) -> dict[str, Any]:
    for name, wire_name, inner in _optional_fields(type(message)):
        value = getattr(message, name)
        if value is None:
            del data[wire_name]
        elif inner is not None:
            items = zip(value, data[wire_name]) if isinstance(value, list) else [(value, data[wire_name])]
            for item, item_data in items:
                _without_none(item, item_data)
    return data


@functools.cache
def _optional_fields(model: type[Model]) -> tuple[tuple[str, str, type[Model] | None], ...]:
    """Where a ``model`` message may hold None: (attribute, wire name, inner) for each field
    that is optional or holds messages (alone or in a list) of a class ``inner`` that may.

    Worked out once per class from the types, so the 1,000 entries of a schedule set, which
    have no optional field, are never looked at one by one.
    """
    found = []
    for field in msgspec.structs.fields(model):
        optional = type(None) in _alternatives(field.type)
        inner = next((kind for kind in _held(field.type)
                      if isinstance(kind, type) and issubclass(kind, Model) and _optional_fields(kind)), None)
        if optional or inner is not None:
            found.append((field.name, field.encode_name, inner))
    return tuple(found)


def _alternatives(kind: Any) -> list[Any]:
    """The types a value of type ``kind`` may have: Annotated unwrapped, unions split."""
    if get_origin(kind) is Annotated:
        return _alternatives(get_args(kind)[0])
    if get_origin(kind) in (Union, UnionType):
        return [alternative for arg in get_args(kind) for alternative in _alternatives(arg)]
    return [kind]


def _held(kind: Any) -> list[Any]:
    """The types a value of type ``kind`` may have or, if it is a list, its items may have."""
    return [held for alternative in _alternatives(kind)
            for held in (_alternatives(get_args(alternative)[0]) if get_origin(alternative) is list else [alternative])]


_JSON = json.JSONEncoder(separators=(",", ":"))  # made once: json.dumps with options makes one per call


def encode(payload: Payload, *, frame_id: str | None = None) -> str:
    """The JSON text frame for ``payload``."""
    return _JSON.encode({"type": payload.TYPE, "id": frame_id or new_id(), "payload": to_wire(payload)})


def decode(data: str | bytes) -> Frame:
    """Parse and validate one inbound frame, or raise :class:`ProtocolError` saying why."""
    size = len(data.encode() if isinstance(data, str) else data)
    if size > MAX_FRAME_BYTES:
        raise ProtocolError(f"frame of {size} bytes is over the limit of {MAX_FRAME_BYTES} bytes")
    if isinstance(data, bytes):
        raise ProtocolError("binary frames are not part of the protocol; send JSON text frames")
    try:
        raw = json.loads(data, parse_constant=_no_constant, parse_float=_finite_float, parse_int=_int64)
    except (ValueError, RecursionError) as error:  # json.JSONDecodeError is a ValueError
        raise ProtocolError(f"frame is not valid JSON: {error}") from None
    if not isinstance(raw, dict):
        raise ProtocolError("frame must be a JSON object with type, id and payload")
    frame_id = raw.get("id")
    ref = frame_id if isinstance(frame_id, str) and len(frame_id) <= 128 else None
    extra = set(raw) - {"type", "id", "payload"}
    if extra:
        raise ProtocolError(f"unknown envelope field(s) {sorted(extra)}", ref=ref)
    kind = raw.get("type")
    model = PAYLOADS.get(kind) if isinstance(kind, str) else None
    if model is None:
        raise ProtocolError(f"unknown message type {kind!r}; known types: {sorted(PAYLOADS)}", ref=ref)
    if not isinstance(raw.get("payload"), dict):
        raise ProtocolError(f"{kind}: payload must be a JSON object", ref=ref)
    if not isinstance(frame_id, str) or not 1 <= len(frame_id) <= 128:
        raise ProtocolError(f"{kind}: id must be a string of 1 to 128 characters", ref=ref)
    try:
        payload = msgspec.convert(raw["payload"], model)
    except msgspec.ValidationError as error:
        raise ProtocolError(f"{kind}: {describe(error, model)}", ref=ref) from None
    # PAYLOADS maps each type to its class, so `payload` is one of AnyPayload.
    return Frame(id=frame_id, payload=payload)  # type: ignore[arg-type]


# Numbers a frame may hold: what JSON and the Kubernetes API (int64, finite floats) accept,
# so no value an agent sends can make a status the API refuses to store.
_INT64 = range(-(2**63), 2**63)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"a number of {len(text)} characters is out of range")
    return value


def _int64(text: str) -> int:
    if len(text) > 20:  # int() of a very long digit string is slow, and refused past 4300 digits
        raise ValueError(f"an integer of {len(text)} digits is out of range (64 bits)")
    value = int(text)
    if value not in _INT64:
        raise ValueError(f"integer {value} is out of range (64 bits)")
    return value


# msgspec's text: "<what is wrong>[ - at `$<path>`]", e.g. "Expected `int` >= 1 - at `$.generation`".
_AT = re.compile(r" - at `\$((?:\.\w+|\[[^\]`]*\])*)`\Z")
# The two texts that quote the input's value, e.g. "Invalid enum value 'format-disk'".
_QUOTES_VALUE = re.compile(r"\AInvalid (enum )?value ")


def describe(error: msgspec.ValidationError, schema: type[Model], *, at: str = "") -> str:
    """A one-line, field-naming account of ``error``, raised converting data to ``schema``:
    "generation: Expected `int` >= 1". ``at`` is prefixed to the field's path (the path of
    the converted data in a larger document). No input value is echoed."""
    text = str(error)
    found = _AT.search(text)
    path = found[1] if found else ""
    if found:
        text = text[:found.start()]
    if _QUOTES_VALUE.match(text):
        text = f"Expected one of {_choices(schema, path.lstrip('.'))}"
    elif text.startswith("Expected `str` matching regex "):
        text = text.replace("\\\\", "\\")  # msgspec quotes our pattern with repr(): show it as written
    where = f"{at}{path}" if at else path.lstrip(".")
    return f"{where}: {text}" if where else text


def _choices(schema: type[Model], name: str) -> str:
    """The values the enum or Literal field ``name`` (its wire name) of ``schema`` allows."""
    for field in msgspec.structs.fields(schema):
        if field.encode_name == name:
            kind = field.type
            if isinstance(kind, type) and issubclass(kind, Enum):
                return ", ".join(repr(member.value) for member in kind)
            return ", ".join(repr(value) for value in get_args(kind))  # a Literal
    return "the values this field allows"
