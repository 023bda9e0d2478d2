"""restic as the agent runs it: a job's argv and environment, and what restic's output means.

Everything here is a pure decision — no subprocess, clock or file access — tested with tables
of output recorded from the pinned restic 0.19.1 and from Debian 12's restic 0.14.
agent/runner.py carries the decisions out.

Environment policy. restic gets a small, explicit environment instead of the agent's own:
:data:`PASSTHROUGH_ENV` from the agent (so it finds programs, ssh keys, proxies and CA files),
``RESTIC_CACHE_DIR`` under the agent's state directory, then the Repository's ``env`` from
``command.run`` and ``RESTIC_REPOSITORY`` from its url. Inheriting everything would let a
stray ``RESTIC_REPOSITORY``/``RESTIC_PASSWORD``/``AWS_*`` on the host silently change which
repository or credentials a job uses, and would hand the agent's own secrets (its token) to
every restic run. The Repository's env may not set the few names in :data:`RESERVED_ENV`.

Exit codes (restic >= 0.17; 0.14 exits 1 for most failures, so its stderr text is matched
instead): 0 ok, 1 failed, 2 Go runtime error, 3 backup could not read some files / forget
could not remove some snapshots, 10 no repository, 11 repository locked, 12 wrong password,
130 interrupted. A partial backup (3) is Failed: restic did write a snapshot, and the message
names it, but a backup that silently misses files is how data gets lost, so it must trip the
same alerts as any other failed backup (restic itself exits non-zero for it).
"""

from __future__ import annotations

import json
import os
import re
import signal
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from pathlib import Path
from typing import Any

from restic_manager import protocol
from restic_manager.protocol import (
    BackupArgs,
    CheckArgs,
    CommandRun,
    ForgetArgs,
    JobType,
    Outcome,
    RestoreArgs,
    Summary,
)

MAX_LINE_CHARS = 500
MAX_MESSAGE_CHARS = 1000
REDACTED = "[redacted]"
JOB_TAG_PREFIX = "restic-manager.job="

# Taken from the agent's environment when set: what restic and the programs it runs (ssh for
# sftp:, rclone) need to find binaries, keys, proxies and CA certificates.
PASSTHROUGH_ENV = (
    "PATH", "HOME", "TMPDIR", "LANG", "LC_ALL", "TZ", "SSH_AUTH_SOCK", "SSL_CERT_FILE",
    "SSL_CERT_DIR", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy",
    "no_proxy",
)
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Names a Repository's env may not set, and why.
RESERVED_ENV = {
    "RESTIC_REPOSITORY": "the repository is the Repository's spec.url",
    "RESTIC_REPOSITORY_FILE": "the repository is the Repository's spec.url",
    "RESTIC_PASSWORD_COMMAND": "it would run a command on the agent's host",
    "RESTIC_CACHE_DIR": "the cache belongs to the agent's state directory",
    "PATH": "the agent's host decides where programs are found",
    "HOME": "the agent's host decides where ssh keys and configuration are found",
    "TMPDIR": "the agent's host decides where temporary files go",
}
RESERVED_ENV_PREFIXES = ("LD_", "DYLD_")  # would load foreign code into restic
PASSWORD_ENV = ("RESTIC_PASSWORD", "RESTIC_PASSWORD_FILE")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Values of these names are redacted whatever their length; other values from 4 characters.
_SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|KEY|CREDENTIAL", re.IGNORECASE)
_MIN_REDACTED_CHARS = 4
_URL_PASSWORD = re.compile(r"://[^/:@\s]*:([^@/\s]+)@")

_CONTROL = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\r")
# restic 0.14 reports "no estimate" as 2**63 seconds remaining.
_MAX_SECONDS_REMAINING = 10 * 365 * 24 * 3600

# What restic 0.14 prints where 0.17+ has an exit code of its own. 0.14 asks "Is there a
# repository...?" after any failure to stat the config, a network error included, so a missing
# repository also needs the backend's not-found wording (local, sftp, s3, rest).
_NO_REPOSITORY = re.compile(r"repository does not exist|Is there a repository at the following location\?")
_NOT_FOUND = re.compile(r"no such file or directory|does not exist|not found|\b404\b", re.IGNORECASE)
_NO_REPOSITORY_REASON = re.compile(r"repository does not exist|unable to open config file")
_LOCKED = re.compile(r"repository is already locked")
_WRONG_PASSWORD = re.compile(r"wrong password or no key found")
_ALREADY_INITIALIZED = re.compile(
    r"config file already exists|already initialized|config already exists"
)
_FATAL_PREFIX = re.compile(r"^(Fatal:\s*)+")
_CRASH = re.compile(r"^(panic|fatal error): ")  # Go's first line; a long stack trace follows
_NO_REPOSITORY_PREFIX = re.compile(r"^(Fatal:\s*)*(repository does not exist:\s*)?")


class InvocationError(ValueError):
    """A command.run that cannot be turned into a safe restic call; ``str()`` says why."""


class Stop(str, Enum):
    """Why the agent interrupted restic."""

    CANCELLED = "cancelled"
    TIMED_OUT = "timed out"


# --- argv and environment ---------------------------------------------------------------


@dataclass(frozen=True, repr=False)
class Invocation:
    """One restic process: argv (never holding a secret) and its complete environment."""

    argv: tuple[str, ...]
    env: Mapping[str, str]

    def __repr__(self) -> str:
        return f"Invocation(argv={list(self.argv)!r}, env=<{', '.join(sorted(self.env))}>)"


def base_environment(environ: Mapping[str, str], *, cache_dir: Path | None = None) -> dict[str, str]:
    """The agent-side part of every restic environment, picked from ``environ``."""
    env = {name: environ[name] for name in PASSTHROUGH_ENV if name in environ}
    env.setdefault("PATH", DEFAULT_PATH)
    if cache_dir is not None:
        env["RESTIC_CACHE_DIR"] = str(cache_dir)
    return env


def build_invocation(
    command: CommandRun,
    *,
    restic: str | os.PathLike[str],
    host: str,
    base_env: Mapping[str, str],
    protected: Sequence[str] = (),
) -> Invocation:
    """The restic call that carries out ``command`` on the host named ``host``; a backup
    leaves out the ``protected`` paths (the agent's own, agent/policy.py)."""
    if not host:
        raise InvocationError(f"job {command.job}: the agent's host name is empty; restic needs --host")
    argv = _backup(command, host, protected) if command.type is JobType.BACKUP else _ARGV[command.type](command, host)
    return _invocation(command, argv, restic=restic, base_env=base_env)


def job_tag(job: str) -> str:
    """The tag every backup's snapshot carries: it names the job (namespace/name) that made it."""
    return f"{JOB_TAG_PREFIX}{job}"


def lookup_invocation(
    command: CommandRun, *, restic: str | os.PathLike[str], host: str, base_env: Mapping[str, str]
) -> Invocation:
    """``restic snapshots`` of the snapshot ``command``'s backup made, if it made one (its tag)."""
    argv = ["snapshots", "--host", host, f"--tag={job_tag(command.job)}"]
    return _invocation(command, argv, restic=restic, base_env=base_env)


def unlock_invocation(
    command: CommandRun, *, restic: str | os.PathLike[str], base_env: Mapping[str, str]
) -> Invocation:
    """``restic unlock`` on ``command``'s repository: removes stale locks only, never live ones."""
    return _invocation(command, ["unlock"], restic=restic, base_env=base_env)


def probe_invocation(
    command: CommandRun, *, restic: str | os.PathLike[str], base_env: Mapping[str, str]
) -> Invocation:
    """``restic cat config``: tells whether ``command``'s repository exists (see :func:`probe_verdict`)."""
    return _invocation(command, ["cat", "config"], restic=restic, base_env=base_env)


def _invocation(
    command: CommandRun, tail: list[str], *, restic: str | os.PathLike[str], base_env: Mapping[str, str]
) -> Invocation:
    # --json is a global flag every subcommand accepts; those without JSON output print text.
    return Invocation(
        argv=(os.fspath(restic), "--json", *tail),
        env=_environment(command, base_env),
    )


def _environment(command: CommandRun, base_env: Mapping[str, str]) -> dict[str, str]:
    repository = command.repository
    for name, value in repository.env.items():
        where = f"job {command.job}: repository.env {name!r}"
        if not _ENV_NAME.fullmatch(name):
            raise InvocationError(f"{where}: not a valid environment variable name")
        if name in RESERVED_ENV:
            raise InvocationError(f"{where}: not allowed, {RESERVED_ENV[name]}")
        if name.startswith(RESERVED_ENV_PREFIXES):
            raise InvocationError(f"{where}: not allowed, it would load foreign code into restic")
        if "\0" in value:
            raise InvocationError(f"{where}: the value contains a NUL byte")
    if not any(repository.env.get(name) for name in PASSWORD_ENV):
        raise InvocationError(
            f"job {command.job}: repository.env has no RESTIC_PASSWORD; "
            "the Repository's passwordSecretRef must provide it"
        )
    if not repository.url:
        raise InvocationError(f"job {command.job}: repository.url is empty")
    return {**base_env, **repository.env, "RESTIC_REPOSITORY": repository.url}


def _backup(command: CommandRun, host: str, protected: Sequence[str]) -> list[str]:
    args = command.args
    assert isinstance(args, BackupArgs)
    return [
        "backup", "--host", host, f"--tag={job_tag(command.job)}",
        *(["--one-file-system"] if args.one_file_system else []),
        *(f"--exclude={pattern}" for pattern in args.exclude),
        *(f"--exclude={path}" for path in protected),
        *(f"--tag={tag}" for tag in args.tags),
        "--", *args.paths,  # a path starting with "-" stays a path
    ]


_KEEP_FLAGS = (
    ("keep_last", "--keep-last"), ("keep_hourly", "--keep-hourly"), ("keep_daily", "--keep-daily"),
    ("keep_weekly", "--keep-weekly"), ("keep_monthly", "--keep-monthly"),
    ("keep_yearly", "--keep-yearly"), ("keep_within", "--keep-within"),
)


def _forget(command: CommandRun, host: str) -> list[str]:
    args = command.args
    assert isinstance(args, ForgetArgs)
    # --host: one agent's policy never removes another host's snapshots from a shared repository.
    keeps = [f"{flag}={getattr(args, field)}" for field, flag in _KEEP_FLAGS if getattr(args, field)]
    return ["forget", "--host", host, *keeps, *(["--prune"] if args.prune else [])]


def _check(command: CommandRun, host: str) -> list[str]:
    args = command.args
    assert isinstance(args, CheckArgs)
    return ["check", *([f"--read-data-subset={args.read_data_subset}"] if args.read_data_subset else [])]


def _restore(command: CommandRun, host: str) -> list[str]:
    args = command.args
    assert isinstance(args, RestoreArgs)
    # --host makes "latest" this host's latest snapshot; restic ignores it for an explicit id.
    return [
        "restore", "--host", host, f"--target={args.target}",
        *(f"--include={pattern}" for pattern in args.include),
        *(f"--exclude={pattern}" for pattern in args.exclude),
        "--", args.snapshot,
    ]


_ARGV: dict[JobType, Callable[[CommandRun, str], list[str]]] = {
    JobType.FORGET: _forget,
    JobType.PRUNE: lambda command, host: ["prune"],
    JobType.CHECK: _check,
    JobType.RESTORE: _restore,
    JobType.UNLOCK: lambda command, host: ["unlock"],
    JobType.INIT: lambda command, host: ["init"],
}


# --- secrets out of logs ---------------------------------------------------------------


class Redactor:
    """Replaces secret values in text; applied to every restic line before it is kept."""

    def __init__(self, secrets: Iterable[str]) -> None:
        variants = set()
        for secret in secrets:
            if secret:
                variants.add(secret)
                variants.add(json.dumps(secret)[1:-1])  # as it appears inside a JSON string
        # Longest first so a secret containing another is replaced whole.
        self._pattern = (
            re.compile("|".join(re.escape(v) for v in sorted(variants, key=len, reverse=True)))
            if variants else None
        )

    @classmethod
    def for_repository(cls, repository: protocol.Repository) -> Redactor:
        """Every secret-named env value, every other value from 4 characters (redacting "2" or
        "us" would garble every line and hides nothing), and the url's password."""
        secrets = [
            value for name, value in repository.env.items()
            if _SECRET_NAME.search(name) or len(value) >= _MIN_REDACTED_CHARS
        ]
        secrets += _URL_PASSWORD.findall(repository.url)
        return cls(secrets)

    def __call__(self, text: str) -> str:
        return self._pattern.sub(REDACTED, text) if self._pattern else text


def clip(text: str, limit: int = MAX_LINE_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


class LogTail:
    """The last :data:`protocol.LOG_TAIL_LINES` lines of a job, each at most MAX_LINE_CHARS."""

    def __init__(self, limit: int = protocol.LOG_TAIL_LINES) -> None:
        self._lines: deque[str] = deque(maxlen=limit)

    def add(self, line: str) -> None:
        self._lines.append(clip(line))

    def lines(self) -> list[str]:
        return list(self._lines)


# --- parsing restic's output --------------------------------------------------------------


@dataclass(frozen=True)
class Progress:
    """A restic status line, in job.progress terms (percent 0-100)."""

    percent_done: float = 0.0
    files_done: int = 0
    total_files: int = 0
    bytes_done: int = 0
    total_bytes: int = 0
    seconds_elapsed: float = 0.0
    seconds_remaining: float | None = None

    def payload(self, job: str) -> protocol.JobProgress:
        return protocol.JobProgress(
            job=job, percent_done=self.percent_done, files_done=self.files_done,
            total_files=self.total_files, bytes_done=self.bytes_done, total_bytes=self.total_bytes,
            seconds_elapsed=self.seconds_elapsed, seconds_remaining=self.seconds_remaining,
        )


class Kind(Enum):
    STATUS = "status"
    SUMMARY = "summary"
    ERROR = "error"
    EXIT_ERROR = "exit_error"
    TEXT = "text"
    QUIET = "quiet"  # nothing worth keeping (verbose_status, blank lines)


@dataclass(frozen=True)
class Line:
    """One parsed line of restic output; ``texts`` is what it adds to the log tail."""

    kind: Kind
    texts: tuple[str, ...] = ()
    progress: Progress | None = None
    summary: Summary | None = None


def parse_line(raw: str) -> Line:
    """Parse one line of restic output (stdout or stderr, any version from 0.14 on)."""
    line = _CONTROL.sub("", raw).strip()
    if not line:
        return Line(Kind.QUIET)
    if line[0] in "{[":
        try:
            message = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            message = None
        if isinstance(message, dict) and isinstance(message.get("message_type"), str):
            return _parse_message(message, line)
        if isinstance(message, list) and message and all(_is_snapshot(item) for item in message):
            return _parse_snapshots(message)
        if isinstance(message, list) and all(isinstance(group, dict) for group in message):
            return Line(Kind.TEXT, (_forget_text(message),))
    return Line(Kind.TEXT, (line,))


def _parse_message(message: dict[str, Any], line: str) -> Line:
    kind = message["message_type"]
    if kind == "status":
        return Line(Kind.STATUS, progress=_progress(message))
    if kind == "summary":
        return _parse_summary(message, line)
    if kind == "error":
        return Line(Kind.ERROR, (f"error: {_error_text(message)}",))
    if kind == "exit_error":
        text = str(message.get("message", "")) or f"restic exited with code {message.get('code')}"
        return Line(Kind.EXIT_ERROR, tuple(part for part in text.splitlines() if part.strip()))
    if kind == "verbose_status":
        return Line(Kind.QUIET)
    if kind == "initialized":
        return Line(Kind.TEXT, (f"created restic repository {str(message.get('id', ''))[:10]} "
                                f"at {message.get('repository', '')}",))
    return Line(Kind.TEXT, (line,))


def _number(message: Mapping[str, Any], *keys: str) -> float | None:
    """The first of ``keys`` holding a number (restic omits zero values).

    A number past 64 bits, infinite or NaN (Python's json reads them all) counts as absent:
    no counter of restic's holds one, and a message carrying it would be refused by the
    operator (protocol.decode).
    """
    for key in keys:
        value = message.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and -(2**63) <= value < 2**63:
            return value
    return None


def _count(message: Mapping[str, Any], *keys: str) -> int:
    return max(0, int(_number(message, *keys) or 0))


def _progress(message: Mapping[str, Any]) -> Progress:
    remaining = _number(message, "seconds_remaining")
    return Progress(
        percent_done=min(100.0, max(0.0, (_number(message, "percent_done") or 0.0) * 100)),
        # restore (0.16+) says files_restored/bytes_restored where backup says files_done/bytes_done
        files_done=_count(message, "files_done", "files_restored"),
        total_files=_count(message, "total_files"),
        bytes_done=_count(message, "bytes_done", "bytes_restored"),
        total_bytes=_count(message, "total_bytes"),
        seconds_elapsed=max(0.0, float(_number(message, "seconds_elapsed") or 0)),
        seconds_remaining=(
            float(remaining) if remaining is not None and 0 <= remaining <= _MAX_SECONDS_REMAINING
            else None
        ),
    )


def _optional_int(message: Mapping[str, Any], key: str) -> int | None:
    value = _number(message, key)
    return None if value is None else int(value)


_RESTORE_SUMMARY_KEYS = {"total_files", "files_restored", "bytes_restored", "files_skipped", "bytes_skipped"}


def _parse_summary(message: dict[str, Any], line: str) -> Line:
    if "files_new" in message:  # backup
        summary = _backup_summary(message, snapshot_id=str(message["snapshot_id"]) if message.get("snapshot_id")
                                  else None, duration=_number(message, "total_duration"))
        saved = f"snapshot {summary.snapshot_id[:8]} saved" if summary.snapshot_id else "backup finished"
        return Line(Kind.SUMMARY, (
            f"{saved}: {summary.files_new or 0} new, {summary.files_changed or 0} changed, "
            f"{summary.files_unmodified or 0} unmodified files, {_size(summary.data_added or 0)} added",
        ), summary=summary)
    if "num_errors" in message:  # check
        errors = _count(message, "num_errors")
        if not errors:
            return Line(Kind.TEXT, ("check: no errors were found",))
        hints = [
            hint for key, hint in (("suggest_repair_index", "run `restic repair index`"),
                                   ("suggest_prune", "run `restic prune`"))
            if message.get(key)
        ]
        broken = message.get("broken_packs") or []
        if broken:
            hints.append(f"broken packs: {', '.join(map(str, broken[:5]))}")
        return Line(Kind.ERROR, (f"check found {errors} error(s)" + "".join(f"; {h}" for h in hints),))
    if not _RESTORE_SUMMARY_KEYS & message.keys():
        return Line(Kind.TEXT, (line,))
    # restore (0.16+): no snapshot, so the summary carries what was processed.
    summary = Summary(
        total_files_processed=_optional_int(message, "total_files"),
        total_bytes_processed=_optional_int(message, "total_bytes"),
        duration_seconds=_number(message, "seconds_elapsed"),
    )
    return Line(Kind.SUMMARY, (
        f"restored {_count(message, 'files_restored')} of {summary.total_files_processed or 0} files, "
        f"{_size(_count(message, 'bytes_restored'))}",
    ), summary=summary)


def _backup_summary(figures: Mapping[str, Any], *, snapshot_id: str | None, duration: float | None) -> Summary:
    """A backup's figures as restic names them, in its summary line and in a snapshot alike."""
    return Summary(
        snapshot_id=snapshot_id,
        files_new=_optional_int(figures, "files_new"),
        files_changed=_optional_int(figures, "files_changed"),
        files_unmodified=_optional_int(figures, "files_unmodified"),
        data_added=_optional_int(figures, "data_added"),
        total_files_processed=_optional_int(figures, "total_files_processed"),
        total_bytes_processed=_optional_int(figures, "total_bytes_processed"),
        duration_seconds=duration,
    )


def _is_snapshot(item: object) -> bool:
    return isinstance(item, dict) and isinstance(item.get("id"), str) and "tree" in item


def _parse_snapshots(snapshots: list[dict[str, Any]]) -> Line:
    """`restic snapshots --json`: the newest one as a backup's summary (restic 0.17+ stores the
    backup's figures in the snapshot; older ones give its id only)."""
    newest = max(snapshots, key=lambda snapshot: str(snapshot.get("time", "")))
    stored = newest.get("summary")
    figures: dict[str, Any] = stored if isinstance(stored, dict) else {}
    duration = None
    try:
        duration = (datetime.fromisoformat(figures["backup_end"])
                    - datetime.fromisoformat(figures["backup_start"])).total_seconds()
    except (KeyError, TypeError, ValueError):
        pass
    summary = _backup_summary(figures, snapshot_id=newest["id"], duration=duration)
    return Line(Kind.SUMMARY, (f"snapshot {newest['id'][:8]} of {newest.get('time', 'an unknown time')}",),
                summary=summary)


def _error_text(message: Mapping[str, Any]) -> str:
    error = message.get("error")
    item = str(message.get("item") or "")
    if isinstance(error, dict) and error.get("message"):  # backup/restore, 0.17+
        text = str(error["message"])
    elif message.get("message"):  # check, 0.17+
        text = str(message["message"])
    elif isinstance(error, dict) and error.get("Op"):
        # 0.14 marshals Go's *PathError field by field: {"Op":"read","Path":"/x","Err":5}
        errno = error.get("Err")
        reason = os.strerror(errno) if isinstance(errno, int) and errno > 0 else "failed"
        text = f"{error['Op']} {error.get('Path') or item}: {reason}"
    else:
        text = "failed"
    return text if not item or item in text else f"{item}: {text}"


def _forget_text(groups: list[dict[str, Any]]) -> str:
    kept = sum(len(group.get("keep") or []) for group in groups)
    removed = sum(len(group.get("remove") or []) for group in groups)
    return f"forget: kept {kept}, removed {removed} snapshot(s) in {len(groups)} group(s)"


def _size(count: int) -> str:
    if count < 1024:
        return f"{count} B"
    size = count / 1024
    for unit in ("KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


class Transcript:
    """What one restic process said, kept in bounded memory, secrets redacted.

    Feeds every line it keeps to ``tail`` (the job's log tail) when given.
    """

    _RECENT_LINES = 40
    _KEPT_ERRORS = 3

    def __init__(self, *, redactor: Redactor, tail: LogTail | None = None) -> None:
        self._redact = redactor
        self._tail = tail
        self._recent: deque[str] = deque(maxlen=self._RECENT_LINES)
        self.summary: Summary | None = None
        self.exit_error = ""
        self.errors: list[str] = []
        self.error_count = 0
        self.crash = ""

    def feed(self, raw: str) -> Progress | None:
        """Take one output line; returns its progress if it was a status line."""
        line = parse_line(self._redact(raw))
        if line.kind is Kind.STATUS:
            return line.progress
        texts = [clip(text, MAX_MESSAGE_CHARS) for text in line.texts]
        if line.kind is Kind.SUMMARY:
            self.summary = line.summary
        elif line.kind is Kind.ERROR:
            self.error_count += 1
            if len(self.errors) < self._KEPT_ERRORS:
                self.errors.append(texts[0].removeprefix("error: "))
        elif line.kind is Kind.EXIT_ERROR:
            self.exit_error = "\n".join(texts)
        for text in texts:
            if not self.crash and _CRASH.match(text):
                self.crash = text
            if line.kind is not Kind.SUMMARY:
                self._recent.append(text)
            if self._tail is not None:
                self._tail.add(text)
        return None

    def text(self) -> str:
        """Recent non-status output, for recognising what went wrong."""
        return "\n".join(self._recent)

    def line_matching(self, pattern: re.Pattern[str]) -> str:
        """The first recent line matching ``pattern`` (restic's multi-line errors lead with it)."""
        return next((line for line in self._recent if pattern.search(line)), "")

    def detail(self) -> str:
        """The one line that best says why restic failed."""
        fatal = [line for line in self._recent if line.startswith("Fatal:")]
        if self.exit_error:
            best = self.exit_error.splitlines()[0]
        elif fatal:
            best = fatal[-1]
        elif self.errors:
            best = self.errors[0]
        else:
            best = self._recent[-1] if self._recent else ""
        return _FATAL_PREFIX.sub("", best)


# --- outcomes -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """How a job ended and the message for job.done's ``error`` (also the note on a success)."""

    outcome: Outcome
    message: str = ""
    retry_after_unlock: bool = False
    timed_out: bool = False  # stopped after the command's timeoutSeconds


def exit_status(returncode: int) -> int:
    """A process's exit status the shell way: killed by signal N is 128+N (SIGKILL: 137)."""
    return 128 - returncode if returncode < 0 else returncode


def effective_exit_code(exit_code: int, text: str) -> int:
    """restic 0.17+'s exit code for what restic 0.14 reported as a plain 1 with a message."""
    if exit_code != 1:
        return exit_code
    if _WRONG_PASSWORD.search(text):
        return 12
    if _LOCKED.search(text):
        return 11
    if _NO_REPOSITORY.search(text) and _NOT_FOUND.search(text):
        return 10
    return exit_code


def decide(
    job_type: JobType,
    exit_code: int,
    transcript: Transcript,
    *,
    stop: Stop | None = None,
    timeout_seconds: int = 0,
    retried: bool = False,
) -> Verdict:
    """The outcome of one restic run of a ``job_type`` job that exited with ``exit_code``.

    ``stop`` says the agent interrupted it; ``retried`` that this run already followed a
    ``restic unlock`` after a lock conflict, so another conflict is final.
    """
    name = job_type.value
    if exit_code == 0:  # finished before an interrupt took effect: the work is done
        return Verdict(Outcome.SUCCEEDED)
    if stop is Stop.CANCELLED:
        return Verdict(Outcome.CANCELLED, f"{name} cancelled: restic was interrupted")
    if stop is Stop.TIMED_OUT:
        return Verdict(Outcome.FAILED, f"{name} timed out after {timeout_seconds} s: restic was interrupted",
                       timed_out=True)
    code = effective_exit_code(exit_code, transcript.text())
    detail = transcript.detail()
    if job_type is JobType.INIT and code == 1 and transcript.line_matching(_ALREADY_INITIALIZED):
        return Verdict(Outcome.SUCCEEDED, "repository is already initialized; nothing to do")
    if code == 10:
        reason = _NO_REPOSITORY_PREFIX.sub("", transcript.line_matching(_NO_REPOSITORY_REASON) or detail)
        message = (f"repository does not exist ({reason}); "
                   "create it with an init job or spec.initialize on the Repository")
    elif code == 11:
        lock = transcript.line_matching(_LOCKED) or detail
        if not retried:
            return Verdict(Outcome.FAILED, f"{name} failed: {lock}", retry_after_unlock=True)
        message = (f"{name} failed: {lock}; still locked after `restic unlock` removed stale locks, "
                   "so another restic process holds it")
    elif code == 12:
        message = "wrong password or no key found for repository: check the Repository's passwordSecretRef"
    elif code == 3 and job_type is JobType.BACKUP:
        snapshot = transcript.summary.snapshot_id if transcript.summary else None
        first = f" (first: {transcript.errors[0]})" if transcript.errors else ""
        saved = (f"snapshot {snapshot[:8]} was saved without them" if snapshot
                 else "a snapshot was saved without them")
        count = transcript.error_count or "some"
        message = f"backup incomplete: {count} source file(s) could not be read{first}; {saved}"
    elif code == 3 and job_type is JobType.FORGET:
        message = f"forget failed to remove one or more snapshots: {detail}"
    elif code == 2:
        message = f"restic crashed (Go runtime error): {transcript.crash or detail}"
    elif code == 130:
        message = f"{name} failed: restic was interrupted (SIGINT) by something other than the agent"
    elif code > 128:
        message = f"{name} failed: restic was killed by {_signal_name(code - 128)}"
    else:
        message = f"{name} failed (exit code {code}): {detail or 'restic printed no error'}"
    return Verdict(Outcome.FAILED, clip(message, MAX_MESSAGE_CHARS))


def probe_verdict(
    exit_code: int, transcript: Transcript, *, stop: Stop | None = None, timeout_seconds: int = 0
) -> Verdict | None:
    """After ``restic cat config`` for an init job: the job's verdict, or None to run init."""
    if exit_code == 0:
        return Verdict(Outcome.SUCCEEDED, "repository is already initialized; nothing to do")
    if stop is None and effective_exit_code(exit_code, transcript.text()) == 10:
        return None
    return decide(JobType.INIT, exit_code, transcript, stop=stop, timeout_seconds=timeout_seconds)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def parse_version(output: str) -> str:
    """"restic 0.19.1 compiled with go1.25 on linux/amd64" → "0.19.1"."""
    match = re.search(r"restic (\S+)", output)
    return match[1] if match else clip(output.strip(), 100)
