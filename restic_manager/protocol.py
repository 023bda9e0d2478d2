"""The wire protocol between the operator and its agents: the one place it is defined.

One WebSocket per agent carries JSON text frames. Every frame is an envelope::

    {"type": "schedule.fire", "id": "7f3c…", "payload": {...}}

``type`` selects the payload schema below, ``id`` is chosen by the sender (unique per
connection; an ``error`` names the ``id`` it answers in ``ref``), ``payload`` holds the
message. Field names are camelCase on the wire and snake_case in Python. Every inbound
frame is validated with :func:`decode`: an unknown type, a missing, extra or mistyped
field, or a frame over :data:`MAX_FRAME_BYTES` raises :class:`ProtocolError` with a
message that says which, so the receiver can answer with an ``error`` frame and go on.

Connection life: the agent connects and sends ``hello`` first; the operator answers with
``schedule.set`` (the whole set for that agent, possibly empty), and the agent answers
every set with ``schedule.ack``. From then on, in any order:

=================  ==========  =========================================================
type               direction   payload
=================  ==========  =========================================================
hello              agent → op  agent, agentVersion, resticVersion, protocolVersion,
                               hostname, runningJobs[]
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
                               logTail[]
error              both        code, message, ref (the id of the frame it answers)
=================  ==========  =========================================================

Schedule ids and job names are ``namespace/name``. Times are ISO 8601 with an offset.
Repository credentials travel only in ``command.run``'s ``repository.env``; nothing else
carries them, and ``CommandRun.__repr__`` hides them so a log line cannot leak them.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from enum import Enum
from typing import Annotated, Any, ClassVar, Literal, TypeAlias, Union

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    model_validator,
)
from pydantic.alias_generators import to_camel

PROTOCOL_VERSION = 1
MAX_FRAME_BYTES = 1024 * 1024
LOG_TAIL_LINES = 50

NamespacedName = Annotated[
    str,
    StringConstraints(
        pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?/[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", max_length=317
    ),
]
ShortText = Annotated[str, StringConstraints(max_length=4096)]


class ProtocolError(ValueError):
    """A frame that is not a valid message; ``str()`` says what is wrong with it."""

    def __init__(self, message: str, *, ref: str | None = None) -> None:
        super().__init__(message)
        self.ref = ref


class Model(BaseModel):
    """Strict wire model: camelCase aliases, no unknown fields, immutable."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )


# For the messages of running jobs and for `error`: their validators and serializers are
# built when first used instead of at import, so an agent that is only keeping schedules
# (most of the time, on most hosts) never holds them. The hello and schedule messages stay
# built at import: a fire must not wait for a schema build.
_BUILT_ON_FIRST_USE = ConfigDict(defer_build=True)


# --- job parameters: the same blocks as a ResticJob's spec -------------------------------


class JobType(str, Enum):
    BACKUP = "backup"
    FORGET = "forget"
    PRUNE = "prune"
    CHECK = "check"
    RESTORE = "restore"
    UNLOCK = "unlock"
    INIT = "init"


class BackupArgs(Model):
    model_config = _BUILT_ON_FIRST_USE

    paths: list[ShortText] = Field(min_length=1)
    exclude: list[ShortText] = []
    tags: list[ShortText] = []
    one_file_system: bool = False


class ForgetArgs(Model):
    model_config = _BUILT_ON_FIRST_USE

    keep_last: int = Field(default=0, ge=0)
    keep_hourly: int = Field(default=0, ge=0)
    keep_daily: int = Field(default=0, ge=0)
    keep_weekly: int = Field(default=0, ge=0)
    keep_monthly: int = Field(default=0, ge=0)
    keep_yearly: int = Field(default=0, ge=0)
    keep_within: Annotated[str, StringConstraints(pattern=r"^(\d+[yMwdhms])*$")] = ""
    prune: bool = False

    @model_validator(mode="after")
    def _keeps_something(self) -> ForgetArgs:
        # restic refuses a forget without a policy; say so before it is sent anywhere.
        if not any(
            (self.keep_last, self.keep_hourly, self.keep_daily, self.keep_weekly,
             self.keep_monthly, self.keep_yearly, self.keep_within)
        ):
            raise ValueError("forget needs at least one keep* rule")
        return self


class CheckArgs(Model):
    model_config = _BUILT_ON_FIRST_USE

    read_data_subset: Annotated[
        str, StringConstraints(pattern=r"^(\d+(\.\d+)?%|\d+/\d+|\d+[KMGT]?)?$")
    ] = ""


class RestoreArgs(Model):
    model_config = _BUILT_ON_FIRST_USE

    snapshot: Annotated[str, StringConstraints(pattern=r"^(latest|[0-9a-f]{8,64})$")] = "latest"
    target: ShortText = Field(min_length=1)
    include: list[ShortText] = []
    exclude: list[ShortText] = []


class NoArgs(Model):
    """prune, unlock and init take no parameters."""

    model_config = _BUILT_ON_FIRST_USE


JobArgs: TypeAlias = BackupArgs | ForgetArgs | CheckArgs | RestoreArgs | NoArgs
ARGS_BY_TYPE: dict[JobType, type[Model]] = {
    JobType.BACKUP: BackupArgs,
    JobType.FORGET: ForgetArgs,
    JobType.CHECK: CheckArgs,
    JobType.RESTORE: RestoreArgs,
    JobType.PRUNE: NoArgs,
    JobType.UNLOCK: NoArgs,
    JobType.INIT: NoArgs,
}


# --- payloads ----------------------------------------------------------------------------


class Payload(Model):
    TYPE: ClassVar[str]


class Hello(Payload):
    TYPE: ClassVar[str] = "hello"
    agent: Annotated[str, StringConstraints(pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", max_length=253)]
    agent_version: ShortText
    restic_version: ShortText
    protocol_version: int
    hostname: ShortText = ""
    running_jobs: list[NamespacedName] = []


class ScheduleEntry(Model):
    id: NamespacedName
    uid: ShortText
    generation: int = Field(ge=1)
    schedule: ShortText
    time_zone: ShortText = "UTC"
    suspend: bool = False


class ScheduleSet(Payload):
    TYPE: ClassVar[str] = "schedule.set"
    version: int = Field(ge=0)
    schedules: list[ScheduleEntry]


class AppliedEntry(Model):
    id: NamespacedName
    generation: int


class RejectedEntry(Model):
    id: NamespacedName
    generation: int
    error: ShortText


class ScheduleAck(Payload):
    TYPE: ClassVar[str] = "schedule.ack"
    version: int
    applied_at: AwareDatetime
    applied: list[AppliedEntry] = []
    rejected: list[RejectedEntry] = []


class ScheduleFire(Payload):
    TYPE: ClassVar[str] = "schedule.fire"
    id: NamespacedName
    uid: ShortText
    generation: int
    scheduled_at: AwareDatetime


class Repository(Model):
    model_config = _BUILT_ON_FIRST_USE

    url: ShortText
    env: dict[str, str] = {}
    # Repository.spec.initialize: run `restic init` first when the repository does not exist.
    initialize: bool = False

    def __repr__(self) -> str:
        return f"Repository(url={self.url!r}, env=<{len(self.env)} hidden>, initialize={self.initialize})"

    __str__ = __repr__


class CommandRun(Payload):
    model_config = _BUILT_ON_FIRST_USE

    TYPE: ClassVar[str] = "command.run"
    job: NamespacedName
    type: JobType
    args: JobArgs
    repository: Repository
    timeout_seconds: int = Field(default=14400, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _args_match_type(cls, data: Any) -> Any:
        # Pick the args schema from `type` so a backup's args are checked as backup args.
        if isinstance(data, dict):
            job_type = data.get("type")
            args = data.get("args", {})
            try:
                model = ARGS_BY_TYPE[JobType(job_type)]
            except ValueError:
                return data  # the `type` field reports the bad value
            if isinstance(args, dict):
                try:
                    data = {**data, "args": model.model_validate(args)}
                except ValidationError as error:
                    raise ValueError(f"args for {job_type}: {describe(error)}") from None
        return data


class CommandCancel(Payload):
    model_config = _BUILT_ON_FIRST_USE

    TYPE: ClassVar[str] = "command.cancel"
    job: NamespacedName


class JobStarted(Payload):
    model_config = _BUILT_ON_FIRST_USE

    TYPE: ClassVar[str] = "job.started"
    job: NamespacedName
    started_at: AwareDatetime


class JobProgress(Payload):
    model_config = _BUILT_ON_FIRST_USE

    TYPE: ClassVar[str] = "job.progress"
    job: NamespacedName
    percent_done: float = Field(default=0.0, ge=0, le=100)
    files_done: int = Field(default=0, ge=0)
    total_files: int = Field(default=0, ge=0)
    bytes_done: int = Field(default=0, ge=0)
    total_bytes: int = Field(default=0, ge=0)
    seconds_elapsed: float = Field(default=0.0, ge=0)
    seconds_remaining: float | None = None


class Outcome(str, Enum):
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    CANCELLED = "Cancelled"


class Summary(Model):
    """restic's summary of a backup; fields restic 0.14 does not print stay None."""

    model_config = _BUILT_ON_FIRST_USE

    snapshot_id: str | None = None
    files_new: int | None = None
    files_changed: int | None = None
    files_unmodified: int | None = None
    data_added: int | None = None
    total_files_processed: int | None = None
    total_bytes_processed: int | None = None
    duration_seconds: float | None = None


class JobDone(Payload):
    model_config = _BUILT_ON_FIRST_USE

    TYPE: ClassVar[str] = "job.done"
    job: NamespacedName
    outcome: Outcome
    exit_code: int | None = None
    finished_at: AwareDatetime
    summary: Summary | None = None
    error: ShortText = ""
    log_tail: list[ShortText] = Field(default=[], max_length=LOG_TAIL_LINES)


class Error(Payload):
    model_config = _BUILT_ON_FIRST_USE

    TYPE: ClassVar[str] = "error"
    code: Literal["invalid-frame", "forbidden", "rate-limited", "internal"]
    message: ShortText
    ref: str | None = None


AnyPayload: TypeAlias = Union[
    Hello, ScheduleSet, ScheduleAck, ScheduleFire, CommandRun, CommandCancel,
    JobStarted, JobProgress, JobDone, Error,
]
PAYLOADS: dict[str, type[Payload]] = {
    model.TYPE: model
    for model in (Hello, ScheduleSet, ScheduleAck, ScheduleFire, CommandRun, CommandCancel,
                  JobStarted, JobProgress, JobDone, Error)
}


@dataclass(frozen=True)
class Frame:
    """One envelope with its payload, as :func:`decode` returns it once both are validated.

    A plain class, not a model: validating it would only repeat the payload's own
    validation, and its validator would hold a copy of every payload's.
    """

    id: str
    payload: AnyPayload

    @property
    def type(self) -> str:
        return self.payload.TYPE


def new_id() -> str:
    return uuid.uuid4().hex


def encode(payload: Payload, *, frame_id: str | None = None) -> str:
    """The JSON text frame for ``payload``."""
    return json.dumps(
        {
            "type": payload.TYPE,
            "id": frame_id or new_id(),
            "payload": payload.model_dump(mode="json", by_alias=True, exclude_none=True),
        },
        separators=(",", ":"),
    )


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
        payload = model.model_validate(raw["payload"])
    except ValidationError as error:
        raise ProtocolError(f"{kind}: {describe(error)}", ref=ref) from None
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


def describe(error: ValidationError) -> str:
    """A one-line, field-naming account of a validation error (no input values echoed)."""
    parts = []
    for item in error.errors(include_url=False, include_input=False)[:5]:
        location = ".".join(str(part) for part in item["loc"]) or "(frame)"
        parts.append(f"{location}: {item['msg']}")
    more = error.error_count() - len(parts)
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")
