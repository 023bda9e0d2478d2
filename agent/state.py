"""What the agent must not forget: schedule cursors, the jobs it runs, and the messages the
operator has not settled yet.

`Outbox` decides what is kept for the operator while it has not answered (no I/O);
`StateStore` writes the cursors, the job journal and the durable part of the outbox to one
JSON file in the state directory, atomically; `Mailbox` is the async shell the timer and
the job runner post to and the connection delivers from.

A fire or a job.done leaves the outbox only on its receipt (restic_manager/session.py), so
one in flight when a connection drops, or when the operator fails before acting on it, is
sent again. A repeated fire is harmless because the operator derives the ResticJob's name
from it (SPEC §4, exactly-once jobs); a repeated job.done repeats a fact.

The journal names the jobs whose restic has started and not yet reported. After a restart
they are interrupted: restic died with the agent, but a backup may have saved its snapshot
first. Their repositories get `restic unlock` before the next job touches them, and their
outcome is looked up in the repository once the operator sends the command again (the agent
keeps no credentials); see agent/runner.py.

Saves are per batch, not per message: the fires due at one wake-up are posted together and
saved once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from restic_manager import protocol
from restic_manager.agent.scheduler import Cursor

log = logging.getLogger(__name__)

STATE_FORMAT = 2


class StateError(Exception):
    """The state directory cannot be read or written; ``str()`` names it, the error and the fix."""


def is_durable(payload: protocol.Payload) -> bool:
    """Whether `payload` survives a restart: fires and job results do; job.started and
    job.progress only describe a process that a restart ends, and the next hello says which
    jobs still run."""
    return isinstance(payload, (protocol.ScheduleFire, protocol.JobDone))


class Outbox:
    """Messages for the operator, oldest first, holding only what is still worth sending.

    Per schedule only the newest fire is kept (a missed backup runs once); per job only the
    newest progress, and none once the job is done. Each message is numbered when put, in
    posting order: a connection sends what is numbered after the last it sent, and discards
    by number what the operator has read, so a newer message put meanwhile is never lost.
    """

    def __init__(self, payloads: Iterable[protocol.Payload] = ()) -> None:
        self._items: dict[int, protocol.Payload] = {}  # by number; dicts keep insertion order
        self._slots: dict[tuple[str, str], int] = {}  # the number of the message holding each slot
        self._last = 0
        for payload in payloads:
            self.put(payload)

    def put(self, payload: protocol.Payload) -> int:
        """Keep `payload`, replacing what it makes stale; returns its number."""
        slot = _slot(payload)
        stale = ("progress", payload.job) if isinstance(payload, protocol.JobDone) else slot
        if stale is not None and (old := self._slots.pop(stale, None)) is not None:
            del self._items[old]
        self._last += 1
        self._items[self._last] = payload
        if slot is not None:
            self._slots[slot] = self._last
        return self._last

    def after(self, number: int) -> dict[int, protocol.Payload]:
        """The messages numbered after `number`, oldest first."""
        return {n: payload for n, payload in self._items.items() if n > number}

    def discard(self, number: int) -> protocol.Payload | None:
        """Remove message `number` (not a newer one for the same slot); None if it had gone already."""
        payload = self._items.pop(number, None)
        slot = None if payload is None else _slot(payload)
        if slot is not None and self._slots.get(slot) == number:
            del self._slots[slot]
        return payload

    def durable(self) -> list[protocol.Payload]:
        return [p for p in self._items.values() if is_durable(p)]

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[protocol.Payload]:
        return iter(list(self._items.values()))


def _slot(payload: protocol.Payload) -> tuple[str, str] | None:
    """What a message stands for in the outbox: a newer message for the same slot replaces it."""
    match payload:
        case protocol.ScheduleFire(id=schedule_id):
            return ("fire", schedule_id)
        case protocol.JobProgress(job=job):
            return ("progress", job)
    return None


@dataclass
class Journal:
    """The jobs whose restic has started and not yet reported (job → repository URL), the jobs
    an earlier agent process was running when it died (their outcome is still to be learned
    from the repository), and the repositories a restic of this agent may have left locked."""

    running: dict[str, str] = field(default_factory=dict)
    unlock: set[str] = field(default_factory=set)
    interrupted: dict[str, str] = field(default_factory=dict)


@dataclass
class AgentState:
    cursors: dict[str, Cursor] = field(default_factory=dict)
    outbox: list[protocol.Payload] = field(default_factory=list)
    journal: Journal = field(default_factory=Journal)


class StateStore:
    """The agent's state in one JSON file, replaced atomically on every save.

    Saves run in a worker thread (fsync blocks); each carries a sequence number and a
    write older than one already on disk is skipped, so the file only ever moves forward.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._sequence = 0
        self._written = 0
        self._write_lock = threading.Lock()
        self._encoded_cursors: dict[str, tuple[Cursor, str]] = {}

    def check_writable(self) -> None:
        """Create the state directory if need be and write a file in it, as every save does;
        StateError if that fails. At start: an agent that could not save would forget its
        undelivered fires and job results at its next restart, and fire again what it did."""
        probe = self.path.with_name(self.path.name + ".tmp")
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            with open(probe, "w", encoding="utf-8", opener=_private) as file:
                file.flush()
                os.fsync(file.fileno())
            probe.unlink()
        except OSError as error:
            raise StateError(f"state directory {self.path.parent}: cannot write {probe.name} there: "
                             f"{error.strerror or error}; give the agent a directory it may write (--state-dir, "
                             "stateDir)") from None

    def load(self) -> AgentState:
        """The saved state; empty when there is none yet, or when the file is unusable (logged,
        and kept aside). StateError when it cannot be read: starting empty would overwrite it."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            log.info("no agent state at %s yet; starting empty", self.path)
            return AgentState()
        except OSError as error:
            raise StateError(f"agent state {self.path}: cannot read it: {error.strerror or error}; the agent "
                             "must read and write its state directory (--state-dir, stateDir)") from None
        try:
            return _decode_state(text)
        except (ValueError, TypeError, KeyError, AttributeError) as error:
            aside = self.path.with_name(self.path.name + ".corrupt")
            log.error("agent state %s is unusable (%s); kept as %s, starting empty", self.path, error, aside)
            try:
                self.path.replace(aside)
            except OSError as move_error:
                log.error("cannot move %s aside: %s", self.path, move_error)
            return AgentState()

    async def save(self, state: AgentState) -> None:
        self._sequence += 1
        await asyncio.to_thread(self._write, self._sequence, self._encode(state))

    def _encode(self, state: AgentState) -> str:
        # A wake-up moves only the cursors that fired; the others' encodings are reused
        # (a Cursor is immutable: the same object encodes the same). Each is kept as its
        # finished JSON member, one string: with thousands of schedules a dict of fields per
        # cursor would hold several times the memory for as long as the agent runs.
        encoded: dict[str, tuple[Cursor, str]] = {}
        for schedule_id, cursor in sorted(state.cursors.items()):
            cached = self._encoded_cursors.get(schedule_id)
            encoded[schedule_id] = cached if cached and cached[0] is cursor else (cursor, _encode_cursor(schedule_id, cursor))
        self._encoded_cursors = encoded
        return _encode_state([member for _, member in encoded.values()], state.outbox, state.journal)

    def _write(self, sequence: int, text: str) -> None:
        with self._write_lock:
            if sequence <= self._written:
                return
            temporary = self.path.with_name(self.path.name + ".tmp")
            try:
                self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                with open(temporary, "w", encoding="utf-8", opener=_private) as file:
                    file.write(text)
                    file.flush()
                    os.fsync(file.fileno())
                os.replace(temporary, self.path)
                directory = os.open(self.path.parent, os.O_RDONLY)
                try:
                    os.fsync(directory)  # makes the rename itself durable
                finally:
                    os.close(directory)
            except OSError as error:
                # The state in memory is still right and the next save tries again; a full
                # disk must not stop backups from firing.
                log.error("cannot save agent state to %s: %s", self.path, error)
                return
            self._written = sequence


def _private(path: str, flags: int) -> int:
    return os.open(path, flags, 0o600)


def _encode_cursor(schedule_id: str, cursor: Cursor) -> str:
    """The cursor as one member of the state's "cursors" object: `"id":{"uid":…,"until":…}`."""
    fields = _compact({"uid": cursor.uid, "until": cursor.until.isoformat()})
    return f"{_compact(schedule_id)}:{fields}"


def _encode_state(cursors: Iterable[str], outbox: Iterable[protocol.Payload], journal: Journal) -> str:
    """The state file's text from the cursors' members (see `_encode_cursor`), the outbox and the journal."""
    # Whole wire frames in the outbox, so loading validates them exactly as a receiver would.
    outbox_text = _compact([protocol.encode(payload) for payload in outbox])
    journal_text = _compact({"running": journal.running, "unlock": sorted(journal.unlock),
                             "interrupted": journal.interrupted})
    return (f'{{"format":{STATE_FORMAT},"cursors":{{{",".join(cursors)}}},"outbox":{outbox_text},'
            f'"journal":{journal_text}}}')


def _compact(value: object) -> str:
    # Without indent json uses its C encoder.
    return json.dumps(value, separators=(",", ":"))


def _decode_state(text: str) -> AgentState:
    raw = json.loads(text)
    if not isinstance(raw, dict) or raw.get("format") not in (1, STATE_FORMAT):
        raise ValueError(f"expected a JSON object with format {STATE_FORMAT}")
    cursors = {}
    for schedule_id, cursor in raw["cursors"].items():
        until = datetime.fromisoformat(cursor["until"])
        if until.tzinfo is None:
            raise ValueError(f"cursor of {schedule_id}: until has no UTC offset")
        cursors[schedule_id] = Cursor(uid=str(cursor["uid"]), until=until)
    outbox: list[protocol.Payload] = []
    for text_frame in raw["outbox"]:
        try:
            outbox.append(protocol.decode(text_frame).payload)
        except protocol.ProtocolError as error:
            log.error("dropping an unreadable message from the saved outbox: %s", error)
    saved = raw.get("journal", {})  # format 1 had none
    journal = Journal(running={str(job): str(url) for job, url in saved.get("running", {}).items()},
                      unlock={str(url) for url in saved.get("unlock", [])},
                      interrupted={str(job): str(url) for job, url in saved.get("interrupted", {}).items()})
    return AgentState(cursors=cursors, outbox=outbox, journal=journal)


class Mailbox:
    """Where the timer and the job runner post messages for the operator and the connection
    picks them up.

    Every change to the durable part is saved. A post's messages go out while its save is
    on its way to disk: the save has captured the state before they are sent, but they do
    not wait for the fsync. Should the agent die before the write lands, nothing is lost
    that waiting would have kept, and a fire the operator did act on is fired again after
    the restart, which yields no second job (SPEC §4).
    """

    def __init__(self, outbox: Outbox, *, save: Callable[[], Awaitable[None]]) -> None:
        self._outbox = outbox
        self._save = save
        self._changed = asyncio.Event()

    async def post(self, payload: protocol.Payload) -> None:
        await self.post_many([payload])

    async def post_many(self, payloads: Sequence[protocol.Payload]) -> None:
        """Post several messages with one save: the fires due at one wake-up are one write."""
        for payload in payloads:
            self._outbox.put(payload)
        # Set first: the connection runs only once the save has captured the state and waits
        # on its write (see the class docstring).
        self.wake()
        if any(is_durable(payload) for payload in payloads):
            await self._save()

    def items(self) -> dict[int, protocol.Payload]:
        """Every message in the box by number, oldest first."""
        return self._outbox.after(0)

    def finished_jobs(self) -> list[str]:
        """The jobs whose job.done waits in the box for its receipt."""
        return sorted(payload.job for payload in self._outbox if isinstance(payload, protocol.JobDone))

    def wake(self) -> None:
        """Wake :meth:`wait`: a post, or something else that changes what is due (a receipt)."""
        self._changed.set()

    async def wait(self, timeout: float | None) -> None:
        """Until the next :meth:`wake` (one since the last wait counts) or ``timeout`` seconds."""
        try:
            async with asyncio.timeout(timeout):
                await self._changed.wait()
        except TimeoutError:
            pass
        self._changed.clear()

    async def delivered(self, numbers: Iterable[int]) -> None:
        """These messages are settled: they leave the box, with one save if any was durable."""
        removed = [payload for number in numbers if (payload := self._outbox.discard(number)) is not None]
        if any(is_durable(payload) for payload in removed):
            await self._save()


def state_saver(
    store: StateStore, *, cursors: Callable[[], Mapping[str, Cursor]], outbox: Outbox, journal: Journal
) -> Callable[[], Awaitable[None]]:
    """The one way the agent saves: the scheduler's cursors, the outbox's durable part and
    the journal together."""

    async def save() -> None:
        await store.save(AgentState(cursors=dict(cursors()), outbox=outbox.durable(),
                                    journal=Journal(dict(journal.running), set(journal.unlock),
                                                    dict(journal.interrupted))))

    return save
