"""The wire schemas: every message round-trips, every bad frame gets a clear, field-naming
ProtocolError, and credentials never show in a repr."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime, timezone

import pytest

from restic_manager import protocol as p

NOW = datetime(2026, 11, 26, 2, 0, tzinfo=timezone.utc)

MESSAGES = [
    p.Hello(agent="web-01", agent_version="0.1.0", restic_version="0.19.1", protocol_version=p.PROTOCOL_VERSION,
            hostname="web-01.example", running_jobs=["backups/nightly-web-01-29012345"]),
    p.ScheduleSet(version=3, schedules=[p.ScheduleEntry(id="backups/nightly", uid="u-1", generation=4,
                                                        schedule="0 2 * * *", time_zone="Europe/London")]),
    p.ScheduleSet(version=4, schedules=[]),
    p.ScheduleAck(version=3, applied_at=NOW, applied=[p.AppliedEntry(id="backups/nightly", generation=4)],
                  rejected=[p.RejectedEntry(id="backups/bad", generation=1, error="minute must be 0-59")]),
    p.ScheduleFire(id="backups/nightly", uid="u-1", generation=4, scheduled_at=NOW),
    p.CommandRun(job="backups/nightly-web-01-29012345", type=p.JobType.BACKUP,
                 args=p.BackupArgs(paths=["/etc"], exclude=["*.tmp"], tags=["nightly"], one_file_system=True),
                 repository=p.Repository(url="s3:s3.example/bucket", env={"RESTIC_PASSWORD": "hunter2"}),
                 timeout_seconds=600),
    p.CommandRun(job="backups/f", type=p.JobType.FORGET, args=p.ForgetArgs(keep_daily=7, prune=True),
                 repository=p.Repository(url="/srv/repo")),
    p.CommandRun(job="backups/c", type=p.JobType.CHECK, args=p.CheckArgs(read_data_subset="5%"),
                 repository=p.Repository(url="/srv/repo")),
    p.CommandRun(job="backups/r", type=p.JobType.RESTORE, args=p.RestoreArgs(target="/tmp/r", include=["/etc"]),
                 repository=p.Repository(url="/srv/repo")),
    p.CommandRun(job="backups/u", type=p.JobType.UNLOCK, args=p.NoArgs(), repository=p.Repository(url="/srv/repo")),
    p.CommandCancel(job="backups/nightly-web-01-29012345"),
    p.JobStarted(job="backups/j", started_at=NOW),
    p.JobProgress(job="backups/j", percent_done=42.5, files_done=10, total_files=20, bytes_done=1, total_bytes=2,
                  seconds_elapsed=3.0, seconds_remaining=4.0),
    p.JobDone(job="backups/j", outcome=p.Outcome.SUCCEEDED, exit_code=0, finished_at=NOW,
              summary=p.Summary(snapshot_id="abcdef12", files_new=3, data_added=1024), log_tail=["done"]),
    p.Error(code="invalid-frame", message="unknown message type 'x'", ref="42"),
]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: m.TYPE)
def test_every_message_round_trips(message: p.Payload) -> None:
    frame = p.decode(p.encode(message, frame_id="f-1"))
    assert frame.id == "f-1"
    assert frame.type == message.TYPE
    assert frame.payload == message


def test_wire_fields_are_camel_case() -> None:
    raw = json.loads(p.encode(MESSAGES[4]))
    assert raw["type"] == "schedule.fire"
    assert set(raw["payload"]) == {"id", "uid", "generation", "scheduledAt"}
    assert set(json.loads(p.encode(MESSAGES[0]))["payload"]) == {
        "agent", "agentVersion", "resticVersion", "protocolVersion", "hostname", "runningJobs", "finishedJobs",
        "interruptedJobs"}


def frame(kind: str, payload: object, frame_id: object = "f-9") -> str:
    return json.dumps({"type": kind, "id": frame_id, "payload": payload})


FIRE = {"id": "backups/nightly", "uid": "u", "generation": 1, "scheduledAt": "2026-01-01T02:00:00Z"}
SECRET = "s3cr3t-value"


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ("not json", "frame is not valid JSON"),
        ("[1, 2]", "frame must be a JSON object"),
        (json.dumps({"type": "hello", "id": "1", "payload": {}, "extra": 1}), "unknown envelope field(s) ['extra']"),
        (frame("schedule.explode", {}), "unknown message type 'schedule.explode'"),
        (frame(None, {}), "unknown message type None"),
        (frame("schedule.fire", [1]), "schedule.fire: payload must be a JSON object"),
        (frame("schedule.fire", {**FIRE, "scheduledAt": "2026-01-01T02:00:00"}),
         "schedule.fire: scheduledAt: Expected `datetime` with a timezone component"),
        (frame("schedule.fire", {**FIRE, "id": "no-namespace"}), "schedule.fire: id: Expected `str` matching regex"),
        (frame("schedule.fire", {**FIRE, "id": "backups/nightly\n"}),
         "schedule.fire: id: Expected `str` matching regex"),
        (frame("schedule.fire", {**FIRE, "surprise": True}), "schedule.fire: Object contains unknown field `surprise`"),
        (frame("schedule.fire", {k: v for k, v in FIRE.items() if k != "uid"}),
         "schedule.fire: Object missing required field `uid`"),
        (frame("schedule.fire", {**FIRE, "generation": "four"}),
         "schedule.fire: generation: Expected `int`, got `str`"),
        (frame("schedule.ack", {"version": 1, "appliedAt": "2026-01-01T02:00:00Z", "applied": [{"id": "a/b"}]}),
         "schedule.ack: applied[0]: Object missing required field `generation`"),
        (frame("schedule.fire", FIRE, frame_id=""), "schedule.fire: id must be a string of 1 to 128 characters"),
        (frame("schedule.fire", FIRE, frame_id=7), "schedule.fire: id must be a string of 1 to 128 characters"),
        (frame("command.run", {"job": "a/b", "type": "backup", "args": {"paths": []}, "repository": {"url": "/r"}}),
         "command.run: args for backup: paths: Expected `array` of length >= 1"),
        (frame("command.run", {"job": "a/b", "type": "forget", "args": {"prune": True}, "repository": {"url": "/r"}}),
         "command.run: args for forget: forget needs at least one keep* rule"),
        (frame("command.run", {"job": "a/b", "type": "format-disk", "args": {}, "repository": {"url": "/r"}}),
         "command.run: type: Expected one of 'backup', 'forget', 'prune', 'check', 'restore', 'unlock', 'init'"),
        (frame("command.run", {"job": "a/b", "type": "prune", "args": {"paths": ["/"]}, "repository": {"url": "/r"}}),
         "command.run: args for prune: Object contains unknown field `paths`"),
        (frame("job.done", {"job": "a/b", "outcome": "Exploded", "finishedAt": "2026-01-01T00:00:00Z"}),
         "job.done: outcome: Expected one of 'Succeeded', 'Failed', 'Cancelled'"),
        (frame("job.progress", {"job": "a/b", "percentDone": 250}),
         "job.progress: percentDone: Expected `float` <= 100.0"),
        (b'{"type": "hello"}', "binary frames are not part of the protocol"),
        ("[" * 100_000 + "]" * 100_000, "frame is not valid JSON"),
    ],
)
def test_bad_frames_raise_a_clear_protocol_error(data: str | bytes, expected: str) -> None:
    with pytest.raises(p.ProtocolError) as caught:
        p.decode(data)
    assert expected in str(caught.value)


def test_error_refers_to_the_frame_it_answers() -> None:
    with pytest.raises(p.ProtocolError) as caught:
        p.decode(frame("schedule.fire", {}, frame_id="abc"))
    assert caught.value.ref == "abc"


def test_oversized_frame_is_refused_before_parsing() -> None:
    big = frame("job.progress", {"job": "a/b", "pad": "x" * p.MAX_FRAME_BYTES})
    with pytest.raises(p.ProtocolError, match="over the limit"):
        p.decode(big)


@pytest.mark.parametrize(
    "payload",
    [
        {"job": "a/b", "type": "prune", "args": {}, "repository": {"url": "/r", "x": SECRET}},
        {"job": "a/b", "type": "prune", "args": {}, "repository": {"url": "/r", "env": {"RESTIC_PASSWORD": [SECRET]}}},
        {"job": "a/b", "type": "prune", "args": {}, "repository": {"url": SECRET * 1000}},
        {"job": "a/b", "type": SECRET, "args": {}, "repository": {"url": "/r"}},
        {"job": SECRET, "type": "prune", "args": {}, "repository": {"url": "/r"}},
        {"job": "a/b", "type": "restore", "args": {"target": "/t", "snapshot": SECRET}, "repository": {"url": "/r"}},
    ],
)
def test_validation_errors_do_not_echo_input_values(payload: dict[str, object]) -> None:
    with pytest.raises(p.ProtocolError) as caught:
        p.decode(frame("command.run", payload))
    assert SECRET not in str(caught.value)
    assert str(caught.value).startswith("command.run: ")


def test_an_error_code_outside_the_list_is_named_not_echoed() -> None:
    with pytest.raises(p.ProtocolError) as caught:
        p.decode(frame("error", {"code": SECRET, "message": "m"}))
    assert str(caught.value) == "error: code: Expected one of 'invalid-frame', 'forbidden', 'rate-limited', 'internal'"


def test_repository_credentials_never_show_in_repr() -> None:
    run = MESSAGES[5]
    assert "hunter2" not in repr(run)
    assert "hunter2" not in str(run)
    assert "RESTIC_PASSWORD" not in repr(run)
    assert "hunter2" in p.encode(run)  # but they do travel on the wire, inside command.run only


def test_none_is_left_out_and_defaults_are_written() -> None:
    done = p.JobDone(job="a/b", outcome=p.Outcome.FAILED, finished_at=NOW, summary=p.Summary(files_new=0))
    assert p.to_wire(done) == {"job": "a/b", "outcome": "Failed", "finishedAt": "2026-11-26T02:00:00Z",
                               "summary": {"filesNew": 0}, "error": "", "logTail": [], "interrupted": False,
                               "refused": False, "timedOut": False}


def test_a_command_built_with_args_as_data_checks_them_against_its_type() -> None:
    repository = p.Repository(url="/r")
    run = p.CommandRun(job="a/b", type=p.JobType.FORGET, args={"keepDaily": 7},  # type: ignore[arg-type]
                       repository=repository)
    assert run.args == p.ForgetArgs(keep_daily=7)
    with pytest.raises(ValueError, match="args for forget: forget needs at least one keep"):
        p.CommandRun(job="a/b", type=p.JobType.FORGET, args={}, repository=repository)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="args for prune: expected NoArgs"):
        p.CommandRun(job="a/b", type=p.JobType.PRUNE, args=p.ForgetArgs(keep_daily=7), repository=repository)


def test_the_agent_does_not_load_pydantic() -> None:
    # The wire models are msgspec Structs: pydantic's import alone cost the agent ~7 MB of RSS.
    loaded = "import sys, restic_manager.agent.main; print(*sorted(name for name in sys.modules if 'pydantic' in name))"
    result = subprocess.run([sys.executable, "-c", loaded], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""



@pytest.mark.parametrize(("name", "valid"), [
    ("web-01", True), ("web-01.example.com", True), ("a" * 253, True), ("0", True),
    ("a" * 254, False), ("Web", False), ("web_01", False), ("-web", False), ("web-", False),
    ("a..b", False), ("a.-b", False), (".", False), ("..", False), ("%2e", False), ("web\n", False), ("", False),
])
def test_one_check_of_object_names_on_the_wire_and_off_it(name: str, valid: bool) -> None:
    assert p.is_object_name(name) is valid
    hello = p.Hello(agent=name, agent_version="1", restic_version="1", protocol_version=p.PROTOCOL_VERSION)
    if valid:
        assert p.decode(p.encode(hello)).payload == hello
    else:
        with pytest.raises(p.ProtocolError):
            p.decode(p.encode(hello))
