"""agent/restic.py: the restic argv/environment of a job and the meaning of restic's output.

The output lines below were recorded from the pinned restic 0.19.1 and from Debian 12's
restic 0.14.0 (bookworm package 0.14.0-1+b5) running the same scenarios, except where a
comment says a line's shape is taken from restic's source.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import msgspec
import pytest

from restic_manager import protocol
from restic_manager.agent import restic as rules
from restic_manager.agent.restic import Kind, Progress, Stop
from restic_manager.protocol import JobType, Outcome, Summary

PASSWORD = "correct horse battery staple"
BASE_ENV = {"PATH": "/usr/bin:/bin", "HOME": "/var/lib/restic-manager", "RESTIC_CACHE_DIR": "/var/lib/restic-manager/cache"}


def command(job_type: str, args: dict[str, Any] | None = None, *, env: dict[str, str] | None = None,
            url: str = "s3:https://s3.example.com/backups") -> protocol.CommandRun:
    return msgspec.convert({
        "job": "backups/nightly-web-01-29012345",
        "type": job_type,
        "args": args or {},
        "repository": {"url": url, "env": {"RESTIC_PASSWORD": PASSWORD, **(env or {})}},
    }, protocol.CommandRun)


def invocation(job_type: str, args: dict[str, Any] | None = None, **kwargs: Any) -> rules.Invocation:
    return rules.build_invocation(command(job_type, args, **kwargs), restic="/usr/bin/restic", host="web-01", base_env=BASE_ENV)


# --- argv ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("job_type", "args", "expected"),
    [
        ("backup", {"paths": ["/etc"]}, ["backup", "--host", "web-01", "--tag=restic-manager.job=backups/nightly-web-01-29012345", "--", "/etc"]),
        (
            "backup",
            {"paths": ["/etc", "/home", "-odd"], "exclude": ["*.tmp", "/home/*/.cache"], "tags": ["nightly", "web"],
             "oneFileSystem": True},
            ["backup", "--host", "web-01", "--tag=restic-manager.job=backups/nightly-web-01-29012345", "--one-file-system", "--exclude=*.tmp", "--exclude=/home/*/.cache",
             "--tag=nightly", "--tag=web", "--", "/etc", "/home", "-odd"],
        ),
        ("forget", {"keepDaily": 7}, ["forget", "--host", "web-01", "--keep-daily=7"]),
        (
            "forget",
            {"keepLast": 2, "keepHourly": 24, "keepDaily": 7, "keepWeekly": 4, "keepMonthly": 12, "keepYearly": 3,
             "keepWithin": "1y2m", "prune": True},
            ["forget", "--host", "web-01", "--keep-last=2", "--keep-hourly=24", "--keep-daily=7", "--keep-weekly=4",
             "--keep-monthly=12", "--keep-yearly=3", "--keep-within=1y2m", "--prune"],
        ),
        ("forget", {"keepWithin": "30d"}, ["forget", "--host", "web-01", "--keep-within=30d"]),
        ("prune", {}, ["prune"]),
        ("check", {}, ["check"]),
        ("check", {"readDataSubset": "5%"}, ["check", "--read-data-subset=5%"]),
        ("check", {"readDataSubset": "1/10"}, ["check", "--read-data-subset=1/10"]),
        ("restore", {"target": "/srv/restore"}, ["restore", "--host", "web-01", "--target=/srv/restore", "--", "latest"]),
        (
            "restore",
            {"snapshot": "ed85855b", "target": "/srv/restore", "include": ["/etc"], "exclude": ["/etc/shadow"]},
            ["restore", "--host", "web-01", "--target=/srv/restore", "--include=/etc", "--exclude=/etc/shadow",
             "--", "ed85855b"],
        ),
        ("unlock", {}, ["unlock"]),
        ("init", {}, ["init"]),
    ],
)
def test_argv_for_each_job_type(job_type: str, args: dict[str, Any], expected: list[str]) -> None:
    assert invocation(job_type, args).argv == ("/usr/bin/restic", "--json", *expected)


def test_the_lookup_of_a_jobs_snapshot_names_its_tag_and_host() -> None:
    lookup = rules.lookup_invocation(command("backup", {"paths": ["/etc"]}), restic="/opt/restic", host="web-01",
                                     base_env=BASE_ENV)
    assert lookup.argv == ("/opt/restic", "--json", "snapshots", "--host", "web-01",
                           "--tag=restic-manager.job=backups/nightly-web-01-29012345")
    assert lookup.env["RESTIC_PASSWORD"] == PASSWORD


def test_probe_and_unlock_invocations() -> None:
    run = command("init")
    probe = rules.probe_invocation(run, restic=Path("/opt/restic"), base_env=BASE_ENV)
    unlock = rules.unlock_invocation(run, restic="/opt/restic", base_env=BASE_ENV)
    assert probe.argv == ("/opt/restic", "--json", "cat", "config")
    assert unlock.argv == ("/opt/restic", "--json", "unlock")
    assert probe.env["RESTIC_PASSWORD"] == unlock.env["RESTIC_PASSWORD"] == PASSWORD


# --- environment -----------------------------------------------------------------------------


@pytest.mark.parametrize("job_type", [t.value for t in JobType])
def test_repository_and_password_travel_only_in_the_environment(job_type: str) -> None:
    required: dict[str, dict[str, Any]] = {
        "backup": {"paths": ["/etc"]}, "forget": {"keepLast": 1}, "restore": {"target": "/tmp/r"},
    }
    args = required.get(job_type, {})
    url = "rest:https://user:rest-secret@backup.example.com/web"
    call = invocation(job_type, args, url=url, env={"AWS_SECRET_ACCESS_KEY": "aws-secret-value"})
    assert call.env["RESTIC_REPOSITORY"] == url
    assert call.env["RESTIC_PASSWORD"] == PASSWORD
    assert call.env["AWS_SECRET_ACCESS_KEY"] == "aws-secret-value"
    argv = " ".join(call.argv)
    for secret in (PASSWORD, "rest-secret", "aws-secret-value", "backup.example.com"):
        assert secret not in argv
    assert PASSWORD not in repr(call) and "aws-secret-value" not in repr(call)


def test_environment_is_the_base_plus_the_repository_and_nothing_else() -> None:
    call = invocation("backup", {"paths": ["/etc"]}, env={"B2_ACCOUNT_ID": "id", "B2_ACCOUNT_KEY": "key"})
    assert call.env == {
        **BASE_ENV,
        "RESTIC_PASSWORD": PASSWORD,
        "B2_ACCOUNT_ID": "id",
        "B2_ACCOUNT_KEY": "key",
        "RESTIC_REPOSITORY": "s3:https://s3.example.com/backups",
    }


def test_base_environment_keeps_what_restic_needs_and_drops_the_agents_secrets() -> None:
    agent_environ = {
        "PATH": "/usr/local/bin:/usr/bin", "HOME": "/root", "HTTPS_PROXY": "http://proxy:3128",
        "SSL_CERT_FILE": "/etc/ssl/ca.pem",
        # a host-wide restic setup and the agent's own credentials must not reach a job
        "RESTIC_PASSWORD": "host-password", "RESTIC_REPOSITORY": "/srv/other-repo",
        "AWS_SECRET_ACCESS_KEY": "host-aws", "RESTIC_MANAGER_TOKEN": "agent-token", "LD_PRELOAD": "/x.so",
    }
    assert rules.base_environment(agent_environ, cache_dir=Path("/var/lib/rm/cache")) == {
        "PATH": "/usr/local/bin:/usr/bin", "HOME": "/root", "HTTPS_PROXY": "http://proxy:3128",
        "SSL_CERT_FILE": "/etc/ssl/ca.pem", "RESTIC_CACHE_DIR": "/var/lib/rm/cache",
    }


def test_base_environment_without_path_or_cache_dir() -> None:
    assert rules.base_environment({}) == {"PATH": rules.DEFAULT_PATH}


@pytest.mark.parametrize(
    ("name", "value", "problem"),
    [
        ("RESTIC_REPOSITORY", "/elsewhere", "repository.env 'RESTIC_REPOSITORY': not allowed, the repository is the Repository's spec.url"),
        ("RESTIC_REPOSITORY_FILE", "/x", "not allowed, the repository is the Repository's spec.url"),
        ("RESTIC_PASSWORD_COMMAND", "curl evil", "not allowed, it would run a command on the agent's host"),
        ("RESTIC_CACHE_DIR", "/tmp", "not allowed, the cache belongs to the agent's state directory"),
        ("PATH", "/tmp/bin", "not allowed, the agent's host decides where programs are found"),
        ("HOME", "/tmp", "not allowed"),
        ("LD_PRELOAD", "/tmp/x.so", "not allowed, it would load foreign code into restic"),
        ("BAD=NAME", "x", "repository.env 'BAD=NAME': not a valid environment variable name"),
        ("1ABC", "x", "not a valid environment variable name"),
        ("AWS_SECRET_ACCESS_KEY", "a\0b", "the value contains a NUL byte"),
    ],
)
def test_repository_env_cannot_take_over_the_host(name: str, value: str, problem: str) -> None:
    with pytest.raises(rules.InvocationError) as raised:
        invocation("backup", {"paths": ["/etc"]}, env={name: value})
    assert str(raised.value).startswith("job backups/nightly-web-01-29012345: ")
    assert problem in str(raised.value)


def test_a_repository_without_password_is_refused_before_restic_runs() -> None:
    run = msgspec.convert({
        "job": "backups/x", "type": "prune", "args": {}, "repository": {"url": "/srv/repo", "env": {}},
    }, protocol.CommandRun)
    with pytest.raises(rules.InvocationError, match="repository.env has no RESTIC_PASSWORD"):
        rules.build_invocation(run, restic="restic", host="h", base_env={})


def test_an_empty_host_is_refused() -> None:
    with pytest.raises(rules.InvocationError, match="host name is empty"):
        rules.build_invocation(command("prune"), restic="restic", host="", base_env={})


# --- redaction and the log tail ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "url", "text", "expected"),
    [
        ({"RESTIC_PASSWORD": "hunter22"}, "/r", "Fatal: password hunter22 is wrong", "Fatal: password [redacted] is wrong"),
        # a short secret-named value is still a secret; a short other value is left alone
        ({"RESTIC_PASSWORD": "abc", "RESTIC_COMPRESSION": "max", "AWS_DEFAULT_REGION": "eu"}, "/r",
         "abc max eu", "[redacted] max eu"),
        ({"RESTIC_PASSWORD": "x", "AWS_ACCESS_KEY_ID": "AKIAEXAMPLE"}, "/r", "key AKIAEXAMPLE denied", "key [redacted] denied"),
        ({"RESTIC_PASSWORD": "pw-1"}, "rest:https://joe:p%40ss@host/repo", "GET https://joe:p%40ss@host/repo",
         "GET https://joe:[redacted]@host/repo"),
        ({"RESTIC_PASSWORD": "long-secret", "OTHER": "long-secret-2"}, "/r", "long-secret-2", "[redacted]"),
    ],
)
def test_redactor_hides_repository_secrets(env: dict[str, str], url: str, text: str, expected: str) -> None:
    redact = rules.Redactor.for_repository(protocol.Repository(url=url, env=env))
    assert redact(text) == expected


def test_a_secret_inside_a_json_line_is_redacted_in_its_escaped_form() -> None:
    secret = 'pa"ss\\word'
    tail = rules.LogTail()
    transcript = rules.Transcript(redactor=rules.Redactor([secret]), tail=tail)
    line = json.dumps({"message_type": "exit_error", "code": 1, "message": f"Fatal: bad {secret}"})
    assert secret not in line  # it is escaped in the JSON text
    transcript.feed(line)
    assert tail.lines() == ["Fatal: bad [redacted]"]
    assert secret not in transcript.exit_error


def test_log_tail_is_bounded_in_lines_and_characters() -> None:
    tail = rules.LogTail()
    transcript = rules.Transcript(redactor=rules.Redactor([PASSWORD]), tail=tail)
    for number in range(200):
        transcript.feed(f"line {number} " + "x" * 2000 + f" {PASSWORD}\n")
    lines = tail.lines()
    assert len(lines) == protocol.LOG_TAIL_LINES
    assert lines[-1].startswith("line 199 ")
    assert all(len(line) <= rules.MAX_LINE_CHARS for line in lines)
    assert all(PASSWORD not in line for line in lines)
    protocol.JobDone(job="a/b", outcome=Outcome.FAILED, finished_at=datetime.now(timezone.utc), log_tail=lines)


# --- parsing --------------------------------------------------------------------------------

V19_BACKUP_STATUS = '{"message_type":"status","seconds_remaining":36,"percent_done":0.002734375,"total_files":1,"total_bytes":21474836480,"bytes_done":58720256,"current_files":["/tmp/r019/sparse"]}'
V19_BACKUP_SUMMARY = '{"message_type":"summary","files_new":2,"files_changed":0,"files_unmodified":0,"dirs_new":2,"dirs_changed":0,"dirs_unmodified":0,"data_blobs":4,"tree_blobs":3,"data_added":3001543,"data_added_packed":3001446,"total_files_processed":2,"total_bytes_processed":3000003,"total_duration":0.664685543,"backup_start":"2026-11-26T14:53:16.740414708Z","backup_end":"2026-11-26T14:53:17.405100292Z","snapshot_id":"ed85855b221dd42d86abfe89c3090f854d7ae6cf17b8b96d561691e8427430d0"}'
V19_PARTIAL_SUMMARY = '{"message_type":"summary","files_new":2,"files_changed":0,"files_unmodified":0,"dirs_new":4,"dirs_changed":0,"dirs_unmodified":0,"data_blobs":0,"tree_blobs":3,"data_added":1045,"data_added_packed":755,"total_files_processed":2,"total_bytes_processed":3000003,"total_duration":0.790108188,"backup_start":"2026-11-26T14:53:17.478926706Z","backup_end":"2026-11-26T14:53:18.269034893Z","snapshot_id":"6ccfde48819e51419902e1302bd2e326f8b1c9d5eee1d88d305d62f4601de835"}'
V19_READ_ERROR = '{"message_type":"error","error":{"message":"failed to save /proc/self/mem: read /proc/self/mem: input/output error"},"during":"archival","item":"/proc/self/mem"}'
V19_EXIT_PARTIAL = '{"message_type":"exit_error","code":3,"message":"Warning: at least one source file could not be read"}'
V19_EXIT_WRONG_PASSWORD = '{"message_type":"exit_error","code":12,"message":"Fatal: wrong password or no key found"}'
V19_EXIT_NO_REPOSITORY = '{"message_type":"exit_error","code":10,"message":"Fatal: repository does not exist: unable to open config file: stat /tmp/r019/nope/config: no such file or directory\\nIs there a repository at the following location?\\n/tmp/r019/nope"}'
V19_EXIT_LOCKED = '{"message_type":"exit_error","code":11,"message":"unable to create lock in backend: repository is already locked by PID 22719 on vm by root (UID 0, GID 0)\\nlock was created at 2026-11-26 14:53:25 (2.06609946s ago)\\nstorage ID 31249732\\nthe `unlock` command can be used to remove stale locks"}'
V19_EXIT_ALREADY_INITIALIZED = '{"message_type":"exit_error","code":1,"message":"Fatal: Fatal: create repository at /tmp/r019/repo failed: config file already exists"}'
V19_EXIT_INTERRUPTED = '{"message_type":"exit_error","code":130,"message":"Fatal: unable to save snapshot: context canceled"}'
V19_EXIT_EMPTY_PASSWORD = '{"message_type":"exit_error","code":1,"message":"Fatal: an empty password is not allowed by default. Pass the flag `--insecure-no-password` to restic to disable this check"}'
V19_INITIALIZED = '{"message_type":"initialized","id":"7a57fd8cfc9b83891c04049fd42623dfa9c332b7865d70f3f9cbab685e50b913","repository":"/tmp/r019/repo"}'
V19_CHECK_OK = '{"message_type":"summary","num_errors":0,"broken_packs":null,"suggest_repair_index":false,"suggest_prune":false}'
V19_CHECK_LOCKED = '{"message_type":"summary","num_errors":1,"broken_packs":null,"suggest_repair_index":false,"suggest_prune":false}'
# check's error and a damaged repository's summary: shapes from restic 0.19.1's cmd/restic/cmd_check.go
V19_CHECK_ERROR = '{"message_type":"error","message":"pack 5a9c: does not exist"}'
V19_CHECK_BROKEN = '{"message_type":"summary","num_errors":2,"broken_packs":["5a9c1e"],"suggest_repair_index":true,"suggest_prune":true}'
V19_RESTORE_SUMMARY = '{"message_type":"summary","total_files":6,"files_restored":6,"total_bytes":3000003,"bytes_restored":3000003}'
# restore's status line: shape from restic 0.19.1's internal/ui/restore/json.go
V19_RESTORE_STATUS = '{"message_type":"status","seconds_elapsed":4,"percent_done":0.5,"total_files":6,"files_restored":3,"total_bytes":3000000,"bytes_restored":1500000}'
V19_FORGET = '[{"tags":null,"host":"h1","paths":["/tmp/r019/src"],"keep":[{"time":"2026-11-26T14:53:16.740414708Z","paths":["/tmp/r019/src"],"hostname":"h1","id":"ed85855b221dd42d86abfe89c3090f854d7ae6cf17b8b96d561691e8427430d0","short_id":"ed85855b"}],"remove":null,"reasons":[]},{"tags":null,"host":"h1","paths":["/x"],"keep":[{"id":"6ccfde48"}],"remove":[{"id":"aa"},{"id":"bb"}],"reasons":[]}]'
V19_VERBOSE = '{"message_type":"verbose_status","action":"new","item":"/etc/hosts","duration":0.01,"data_size":200,"data_size_in_repo":150,"metadata_size":0,"metadata_size_in_repo":0,"total_files":0}'
V19_SIGNAL = "\rsignal interrupt received, cleaning up \n"

V14_STATUS = '{"message_type":"status","percent_done":0.686121189798017,"total_files":3,"files_done":2,"total_bytes":3000005,"bytes_done":2058367,"current_files":["/src/a.bin"]}'
V14_STATUS_NO_ESTIMATE = '{"message_type":"status","seconds_elapsed":1,"seconds_remaining":9223372036854775808,"percent_done":0,"total_files":1,"current_files":["/x"]}'
V14_SUMMARY = '{"message_type":"summary","files_new":3,"files_changed":0,"files_unmodified":0,"dirs_new":2,"dirs_changed":0,"dirs_unmodified":0,"data_blobs":4,"tree_blobs":3,"data_added":3001813,"total_files_processed":3,"total_bytes_processed":3000005,"total_duration":0.27378325,"snapshot_id":"da484c04"}'
V14_READ_ERROR = '{"message_type":"error","error":{"Op":"read","Path":"/proc/self/mem","Err":5},"during":"archival","item":"/proc/self/mem"}'
V14_OPAQUE_ERROR = '{"message_type":"error","error":{},"during":"scan","item":"/x"}'
V14_PARTIAL_SUMMARY = '{"message_type":"summary","files_new":3,"files_changed":0,"files_unmodified":0,"dirs_new":4,"dirs_changed":0,"dirs_unmodified":0,"data_blobs":0,"tree_blobs":3,"data_added":1045,"total_files_processed":3,"total_bytes_processed":3000005,"total_duration":0.235904272,"snapshot_id":"89d65745"}'
V14_PARTIAL_WARNING = "Warning: at least one source file could not be read"
V14_WRONG_PASSWORD = "Fatal: wrong password or no key found"
V14_NO_REPOSITORY = [
    "Fatal: unable to open config file: stat /tmp/r014/nope/config: no such file or directory",
    "Is there a repository at the following location?",
    "/tmp/r014/nope",
]
V14_LOCKED = [
    "unable to create lock in backend: repository is already locked by PID 17766 on vm by root (UID 0, GID 0)",
    "lock was created at 2026-11-26 14:50:58 (2.976219485s ago)",
    "storage ID bac028f5",
    "the `unlock` command can be used to remove stale locks",
]
V14_ALREADY_INITIALIZED = "Fatal: create repository at /tmp/r014/repo failed: config file already exists"
V14_INIT_TEXT = "created restic repository 3b9b9847af at /tmp/r014/repo"
V14_SIGNAL = "\x1b[2Ksignal interrupt received, cleaning up"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (V19_BACKUP_STATUS, Progress(percent_done=0.2734375, total_files=1, total_bytes=21474836480,
                                     bytes_done=58720256, seconds_remaining=36.0)),
        (V19_RESTORE_STATUS, Progress(percent_done=50.0, files_done=3, total_files=6, bytes_done=1500000,
                                      total_bytes=3000000, seconds_elapsed=4.0)),
        (V14_STATUS, Progress(percent_done=68.6121189798017, files_done=2, total_files=3, bytes_done=2058367,
                              total_bytes=3000005)),
        # restic 0.14 says 2**63 seconds when it has no estimate
        (V14_STATUS_NO_ESTIMATE, Progress(total_files=1, seconds_elapsed=1.0, seconds_remaining=None)),
    ],
)
def test_status_lines_become_progress(raw: str, expected: Progress) -> None:
    line = rules.parse_line(raw)
    assert line.kind is Kind.STATUS
    assert line.progress is not None
    assert asdict(line.progress) == pytest.approx(asdict(expected))
    assert line.progress.payload("a/b").percent_done == pytest.approx(expected.percent_done)


@pytest.mark.parametrize(
    ("raw", "summary", "text"),
    [
        (V19_BACKUP_SUMMARY,
         Summary(snapshot_id="ed85855b221dd42d86abfe89c3090f854d7ae6cf17b8b96d561691e8427430d0", files_new=2,
                 files_changed=0, files_unmodified=0, data_added=3001543, total_files_processed=2,
                 total_bytes_processed=3000003, duration_seconds=0.664685543),
         "snapshot ed85855b saved: 2 new, 0 changed, 0 unmodified files, 2.9 MiB added"),
        # 0.14 prints the short id
        (V14_SUMMARY,
         Summary(snapshot_id="da484c04", files_new=3, files_changed=0, files_unmodified=0, data_added=3001813,
                 total_files_processed=3, total_bytes_processed=3000005, duration_seconds=0.27378325),
         "snapshot da484c04 saved: 3 new, 0 changed, 0 unmodified files, 2.9 MiB added"),
        # a summary without snapshot id (older restic, or a dry run)
        ('{"message_type":"summary","files_new":1,"files_changed":0,"files_unmodified":0,"data_added":10,'
         '"total_files_processed":1,"total_bytes_processed":10,"total_duration":0.5}',
         Summary(files_new=1, files_changed=0, files_unmodified=0, data_added=10, total_files_processed=1,
                 total_bytes_processed=10, duration_seconds=0.5),
         "backup finished: 1 new, 0 changed, 0 unmodified files, 10 B added"),
        (V19_RESTORE_SUMMARY, Summary(total_files_processed=6, total_bytes_processed=3000003),
         "restored 6 of 6 files, 2.9 MiB"),
    ],
)
def test_summary_lines_become_a_summary(raw: str, summary: Summary, text: str) -> None:
    assert rules.parse_line(raw) == rules.Line(Kind.SUMMARY, (text,), summary=summary)


_SNAPSHOT_019 = (
    '{"time":"2026-12-02T14:00:01.5+00:00","tree":"9f1c","paths":["/etc"],"hostname":"web-01",'
    '"tags":["restic-manager.job=a/b"],"program_version":"restic 0.19.1","summary":{'
    '"backup_start":"2026-12-02T14:00:01.5+00:00","backup_end":"2026-12-02T14:00:04+00:00","files_new":3,'
    '"files_changed":1,"files_unmodified":7,"data_added":4096,"total_files_processed":11,'
    '"total_bytes_processed":9000},"id":"ID2","short_id":"ID2"}'
)


@pytest.mark.parametrize(
    ("raw", "summary", "text"),
    [
        (f"[{_SNAPSHOT_019}]",
         Summary(snapshot_id="ID2", files_new=3, files_changed=1, files_unmodified=7, data_added=4096,
                 total_files_processed=11, total_bytes_processed=9000, duration_seconds=2.5),
         "snapshot ID2 of 2026-12-02T14:00:01.5+00:00"),
        # several match: the newest; restic before 0.17 stored no figures in the snapshot
        ('[{"time":"2026-12-02T13:00:00Z","tree":"1","paths":["/"],"id":"older"},'
         '{"time":"2026-12-02T14:00:00Z","tree":"2","paths":["/"],"id":"newer"}]',
         Summary(snapshot_id="newer"), "snapshot newer of 2026-12-02T14:00:00Z"),
    ],
)
def test_a_snapshot_listing_becomes_the_summary_of_its_newest(raw: str, summary: Summary, text: str) -> None:
    assert rules.parse_line(raw) == rules.Line(Kind.SUMMARY, (text,), summary=summary)


def test_an_empty_listing_has_no_summary() -> None:
    assert rules.parse_line("[]").summary is None


# Python's json reads NaN, Infinity, 1e999 and integers of any size; restic prints none of them.
@pytest.mark.parametrize(
    ("raw", "progress", "summary"),
    [
        ('{"message_type":"status","percent_done":NaN,"files_done":1e999,"total_files":99999999999999999999,'
         '"bytes_done":-1e999,"total_bytes":NaN,"seconds_elapsed":Infinity,"seconds_remaining":NaN}', Progress(), None),
        ('{"message_type":"status","files_done":-99999999999999999999,"files_restored":3}',
         Progress(files_done=3), None),
        ('{"message_type":"summary","files_new":99999999999999999999,"files_changed":NaN,"files_unmodified":1e999,'
         '"data_added":1,"total_duration":Infinity,"snapshot_id":"abcdef12"}', None,
         Summary(snapshot_id="abcdef12", data_added=1)),
        ('{"message_type":"summary","total_files":-99999999999999999999,"total_bytes":NaN,"seconds_elapsed":1e999,'
         '"files_restored":1}', None, Summary()),
    ],
)
def test_numbers_restic_cannot_mean_count_as_absent_so_the_operator_takes_the_report(
    raw: str, progress: Progress | None, summary: Summary | None
) -> None:
    line = rules.parse_line(raw)
    assert (line.progress, line.summary) == (progress, summary)
    payload: protocol.Payload = (
        line.progress.payload("a/b") if line.progress is not None else
        protocol.JobDone(job="a/b", outcome=Outcome.SUCCEEDED, finished_at=datetime.now(timezone.utc),
                         summary=line.summary)
    )
    assert protocol.decode(protocol.encode(payload)).payload == payload  # as the operator reads it


@pytest.mark.parametrize(
    ("raw", "kind", "texts"),
    [
        (V19_READ_ERROR, Kind.ERROR, ("error: failed to save /proc/self/mem: read /proc/self/mem: input/output error",)),
        (V14_READ_ERROR, Kind.ERROR, ("error: read /proc/self/mem: Input/output error",)),
        (V14_OPAQUE_ERROR, Kind.ERROR, ("error: /x: failed",)),
        (V19_CHECK_ERROR, Kind.ERROR, ("error: pack 5a9c: does not exist",)),
        (V19_CHECK_BROKEN, Kind.ERROR, ("check found 2 error(s); run `restic repair index`; run `restic prune`; "
                                        "broken packs: 5a9c1e",)),
        (V19_CHECK_OK, Kind.TEXT, ("check: no errors were found",)),
        (V19_EXIT_WRONG_PASSWORD, Kind.EXIT_ERROR, ("Fatal: wrong password or no key found",)),
        (V19_EXIT_NO_REPOSITORY, Kind.EXIT_ERROR, (
            "Fatal: repository does not exist: unable to open config file: stat /tmp/r019/nope/config: "
            "no such file or directory",
            "Is there a repository at the following location?",
            "/tmp/r019/nope",
        )),
        (V19_INITIALIZED, Kind.TEXT, ("created restic repository 7a57fd8cfc at /tmp/r019/repo",)),
        (V19_FORGET, Kind.TEXT, ("forget: kept 2, removed 2 snapshot(s) in 2 group(s)",)),
        (V19_VERBOSE, Kind.QUIET, ()),
        (V19_SIGNAL, Kind.TEXT, ("signal interrupt received, cleaning up",)),
        (V14_SIGNAL, Kind.TEXT, ("signal interrupt received, cleaning up",)),
        (V14_INIT_TEXT, Kind.TEXT, (V14_INIT_TEXT,)),
        ("   \n", Kind.QUIET, ()),
        ("{not json", Kind.TEXT, ("{not json",)),
        ('{"version": 2, "id": "3b9b"}', Kind.TEXT, ('{"version": 2, "id": "3b9b"}',)),  # cat config
        ('{"message_type":"something_new","x":1}', Kind.TEXT, ('{"message_type":"something_new","x":1}',)),
        ('{"message_type":"summary","copied":3}', Kind.TEXT, ('{"message_type":"summary","copied":3}',)),
        ('{"message_type":"status","percent_done":"lots"}', Kind.STATUS, ()),  # bad values read as zero
    ],
)
def test_other_lines(raw: str, kind: Kind, texts: tuple[str, ...]) -> None:
    line = rules.parse_line(raw)
    assert (line.kind, line.texts) == (kind, texts)


# --- outcomes -------------------------------------------------------------------------------


def transcript_of(*lines: str | list[str]) -> rules.Transcript:
    transcript = rules.Transcript(redactor=rules.Redactor([]))
    for item in lines:
        for line in [item] if isinstance(item, str) else item:
            transcript.feed(line)
    return transcript


@pytest.mark.parametrize(
    ("job_type", "exit_code", "lines", "outcome", "message"),
    [
        (JobType.BACKUP, 0, [V19_BACKUP_SUMMARY], Outcome.SUCCEEDED, ""),
        (JobType.BACKUP, 0, [V14_SUMMARY], Outcome.SUCCEEDED, ""),
        (JobType.BACKUP, 3, [V19_PARTIAL_SUMMARY, V19_READ_ERROR, V19_EXIT_PARTIAL], Outcome.FAILED,
         "backup incomplete: 1 source file(s) could not be read (first: failed to save /proc/self/mem: read "
         "/proc/self/mem: input/output error); snapshot 6ccfde48 was saved without them"),
        (JobType.BACKUP, 3, [V14_READ_ERROR, V14_PARTIAL_SUMMARY, V14_PARTIAL_WARNING], Outcome.FAILED,
         "backup incomplete: 1 source file(s) could not be read (first: read /proc/self/mem: Input/output "
         "error); snapshot 89d65745 was saved without them"),
        (JobType.BACKUP, 12, [V19_EXIT_WRONG_PASSWORD], Outcome.FAILED,
         "wrong password or no key found for repository: check the Repository's passwordSecretRef"),
        (JobType.CHECK, 1, [V14_WRONG_PASSWORD], Outcome.FAILED,
         "wrong password or no key found for repository: check the Repository's passwordSecretRef"),
        (JobType.BACKUP, 10, [V19_EXIT_NO_REPOSITORY], Outcome.FAILED,
         "repository does not exist (unable to open config file: stat /tmp/r019/nope/config: no such file or "
         "directory); create it with an init job or spec.initialize on the Repository"),
        (JobType.BACKUP, 1, [V14_NO_REPOSITORY], Outcome.FAILED,
         "repository does not exist (unable to open config file: stat /tmp/r014/nope/config: no such file or "
         "directory); create it with an init job or spec.initialize on the Repository"),
        (JobType.INIT, 1, [V19_EXIT_ALREADY_INITIALIZED], Outcome.SUCCEEDED,
         "repository is already initialized; nothing to do"),
        (JobType.INIT, 1, [V14_ALREADY_INITIALIZED], Outcome.SUCCEEDED,
         "repository is already initialized; nothing to do"),
        (JobType.BACKUP, 1, [V19_EXIT_EMPTY_PASSWORD], Outcome.FAILED,
         "backup failed (exit code 1): an empty password is not allowed by default. Pass the flag "
         "`--insecure-no-password` to restic to disable this check"),
        (JobType.PRUNE, 1, [], Outcome.FAILED, "prune failed (exit code 1): restic printed no error"),
        (JobType.FORGET, 3, ['{"message_type":"exit_error","code":3,"message":"failed to remove one or more snapshots"}'],
         Outcome.FAILED, "forget failed to remove one or more snapshots: failed to remove one or more snapshots"),
        (JobType.CHECK, 2, ["panic: runtime error: index out of range", *["goroutine 1 [running]:"] * 100], Outcome.FAILED,
         "restic crashed (Go runtime error): panic: runtime error: index out of range"),
        (JobType.BACKUP, 130, [V19_SIGNAL, V19_EXIT_INTERRUPTED], Outcome.FAILED,
         "backup failed: restic was interrupted (SIGINT) by something other than the agent"),
        (JobType.BACKUP, 137, [], Outcome.FAILED, "backup failed: restic was killed by SIGKILL"),
    ],
)
def test_outcome_of_a_run(job_type: JobType, exit_code: int, lines: list[Any], outcome: Outcome, message: str) -> None:
    verdict = rules.decide(job_type, exit_code, transcript_of(*lines))
    assert verdict == rules.Verdict(outcome, message)


@pytest.mark.parametrize(
    ("exit_code", "lines"), [(11, [V19_CHECK_LOCKED, V19_EXIT_LOCKED]), (1, [V14_LOCKED])], ids=["0.19", "0.14"]
)
def test_a_lock_conflict_is_retried_once_after_unlock(exit_code: int, lines: list[Any]) -> None:
    first = rules.decide(JobType.CHECK, exit_code, transcript_of(*lines))
    assert first.retry_after_unlock
    assert first.outcome is Outcome.FAILED
    assert "repository is already locked by PID" in first.message
    again = rules.decide(JobType.CHECK, exit_code, transcript_of(*lines), retried=True)
    assert not again.retry_after_unlock
    assert again.message.startswith("check failed: unable to create lock in backend: repository is already locked by PID")
    assert again.message.endswith("still locked after `restic unlock` removed stale locks, so another restic process holds it")


@pytest.mark.parametrize(
    ("stop", "exit_code", "outcome", "message"),
    [
        (Stop.CANCELLED, 130, Outcome.CANCELLED, "backup cancelled: restic was interrupted"),
        (Stop.CANCELLED, 137, Outcome.CANCELLED, "backup cancelled: restic was interrupted"),
        (Stop.TIMED_OUT, 130, Outcome.FAILED, "backup timed out after 3600 s: restic was interrupted"),
        (Stop.TIMED_OUT, 137, Outcome.FAILED, "backup timed out after 3600 s: restic was interrupted"),
        # restic finished before the interrupt took effect: the backup is done
        (Stop.CANCELLED, 0, Outcome.SUCCEEDED, ""),
        (Stop.TIMED_OUT, 0, Outcome.SUCCEEDED, ""),
    ],
)
def test_outcome_when_the_agent_stopped_restic(stop: Stop, exit_code: int, outcome: Outcome, message: str) -> None:
    verdict = rules.decide(JobType.BACKUP, exit_code, transcript_of(V19_SIGNAL, V19_EXIT_INTERRUPTED),
                           stop=stop, timeout_seconds=3600)
    # A timeout that took effect is reported as one: the ResticJob's reason is Timeout.
    timed_out = stop is Stop.TIMED_OUT and outcome is Outcome.FAILED
    assert verdict == rules.Verdict(outcome, message, timed_out=timed_out)


@pytest.mark.parametrize(
    ("exit_code", "lines", "expected"),
    [
        (0, ['{', '  "version": 2,', '}'], rules.Verdict(Outcome.SUCCEEDED, "repository is already initialized; nothing to do")),
        (10, [V19_EXIT_NO_REPOSITORY], None),
        (1, [V14_NO_REPOSITORY], None),
        (12, [V19_EXIT_WRONG_PASSWORD], rules.Verdict(
            Outcome.FAILED, "wrong password or no key found for repository: check the Repository's passwordSecretRef")),
        (1, [V14_WRONG_PASSWORD], rules.Verdict(
            Outcome.FAILED, "wrong password or no key found for repository: check the Repository's passwordSecretRef")),
    ],
)
def test_init_probe(exit_code: int, lines: list[str], expected: rules.Verdict | None) -> None:
    assert rules.probe_verdict(exit_code, transcript_of(*lines)) == expected


def test_init_probe_interrupted_by_a_cancel_does_not_go_on_to_init() -> None:
    verdict = rules.probe_verdict(130, transcript_of(V19_EXIT_INTERRUPTED), stop=Stop.CANCELLED)
    assert verdict == rules.Verdict(Outcome.CANCELLED, "init cancelled: restic was interrupted")


def test_transcript_keeps_summary_errors_and_exit_error() -> None:
    tail = rules.LogTail()
    transcript = rules.Transcript(redactor=rules.Redactor([]), tail=tail)
    progress = [transcript.feed(line) for line in (V19_BACKUP_STATUS, V19_READ_ERROR, V19_PARTIAL_SUMMARY, V19_EXIT_PARTIAL)]
    assert progress[0] is not None and progress[1:] == [None, None, None]
    assert transcript.summary is not None and transcript.summary.snapshot_id is not None
    assert transcript.error_count == 1
    assert transcript.exit_error == "Warning: at least one source file could not be read"
    assert tail.lines() == [
        "error: failed to save /proc/self/mem: read /proc/self/mem: input/output error",
        "snapshot 6ccfde48 saved: 2 new, 0 changed, 0 unmodified files, 1.0 KiB added",
        "Warning: at least one source file could not be read",
    ]


@pytest.mark.parametrize(
    ("exit_code", "text", "expected"),
    [
        (1, V14_WRONG_PASSWORD, 12),
        (1, "\n".join(V14_LOCKED), 11),
        (1, "\n".join(V14_NO_REPOSITORY), 10),
        (1, "Fatal: something else", 1),
        # 0.14 on s3: not found, and the same question after a network error, which is not "missing"
        (1, "Fatal: unable to open config file: Stat: The specified key does not exist.\n"
            "Is there a repository at the following location?\ns3:s3.example.com/bucket", 10),
        (1, 'Fatal: unable to open config file: Stat: Get "https://s3.example.com/bucket/config": dial tcp: '
            "connection refused\nIs there a repository at the following location?\ns3:s3.example.com/bucket", 1),
        # 0.19 after a network error: exit 1, no question asked
        (1, 'Fatal: unable to open config file: Get "https://backup.example.com/config": dial tcp: connection '
            "refused\nrest:https://backup.example.com/", 1),
        (3, V14_WRONG_PASSWORD, 3),  # only 0.14's catch-all 1 is reinterpreted
        (12, "", 12),
    ],
)
def test_effective_exit_code(exit_code: int, text: str, expected: int) -> None:
    assert rules.effective_exit_code(exit_code, text) == expected


@pytest.mark.parametrize(("returncode", "status"), [(0, 0), (3, 3), (130, 130), (-2, 130), (-9, 137), (-15, 143)])
def test_exit_status(returncode: int, status: int) -> None:
    assert rules.exit_status(returncode) == status


@pytest.mark.parametrize(
    ("output", "version"),
    [
        ("restic 0.19.1 compiled with go1.26.8 on linux/amd64\n", "0.19.1"),
        ("restic 0.14.0 compiled with go1.19.8 on linux/amd64\n", "0.14.0"),
        ("something unexpected\n", "something unexpected"),
    ],
)
def test_parse_version(output: str, version: str) -> None:
    assert rules.parse_version(output) == version
