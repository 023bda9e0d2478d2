"""What the agent must not forget: schedule cursors and the messages the operator has not had yet.

`Outbox` decides what is kept for the operator while it cannot be told (no I/O);
`StateStore` writes the cursors and the durable part of the outbox to one JSON file in
the state directory, atomically; `Mailbox` is the async shell the timer and the job runner
post to and the connection delivers from.

Delivery is at least once: a message leaves the outbox only when the operator's end has
read it (see `Connection._deliver`), so one in flight when a connection drops is sent again
on the next. A repeated fire is harmless because the operator derives the ResticJob's name
from it (SPEC §4, exactly-once jobs); a repeated job message repeats a fact.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from restic_manager import protocol
from restic_manager.agent.scheduler import Cursor

log = logging.getLogger(__name__)

STATE_FORMAT = 1


def is_durable(payload: protocol.Payload) -> bool:
    """Whether `payload` survives a restart: fires and job results do; job.started and
    job.progress only describe a process that a restart ends, and the next hello says which
    jobs still run."""
    return isinstance(payload, (protocol.ScheduleFire, protocol.JobDone))


class Outbox:
    """Messages for the operator, oldest first, holding only what is still worth sending.

    Per schedule only the newest fire is kept (a missed backup runs once); per job only the
    newest progress, and none once the job is done.
    """

    def __init__(self, payloads: Iterable[protocol.Payload] = ()) -> None:
        self._items: list[protocol.Payload] = []
        for payload in payloads:
            self.put(payload)

    def put(self, payload: protocol.Payload) -> None:
        match payload:
            case protocol.ScheduleFire(id=schedule_id):
                self._drop(lambda p: isinstance(p, protocol.ScheduleFire) and p.id == schedule_id)
            case protocol.JobProgress(job=job) | protocol.JobDone(job=job):
                self._drop(lambda p: isinstance(p, protocol.JobProgress) and p.job == job)
        self._items.append(payload)

    def first(self) -> protocol.Payload | None:
        return self._items[0] if self._items else None

    def discard(self, payload: protocol.Payload) -> bool:
        """Remove this very message (not an equal one posted since); False if it had gone already."""
        before = len(self._items)
        self._drop(lambda p: p is payload)
        return len(self._items) < before

    def durable(self) -> list[protocol.Payload]:
        return [p for p in self._items if is_durable(p)]

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[protocol.Payload]:
        return iter(list(self._items))

    def _drop(self, matches: Callable[[protocol.Payload], bool]) -> None:
        self._items = [p for p in self._items if not matches(p)]


@dataclass
class AgentState:
    cursors: dict[str, Cursor] = field(default_factory=dict)
    outbox: list[protocol.Payload] = field(default_factory=list)


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

    def load(self) -> AgentState:
        """The saved state; empty, with the reason logged, when the file is missing or unusable."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            log.info("no agent state at %s yet; starting empty", self.path)
            return AgentState()
        except OSError as error:
            log.error("cannot read agent state %s (%s); starting empty", self.path, error)
            return AgentState()
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
        await asyncio.to_thread(self._write, self._sequence, _encode_state(state))

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


def _encode_state(state: AgentState) -> str:
    return json.dumps(
        {
            "format": STATE_FORMAT,
            "cursors": {
                schedule_id: {"uid": cursor.uid, "until": cursor.until.isoformat()}
                for schedule_id, cursor in sorted(state.cursors.items())
            },
            # Whole wire frames, so loading validates them exactly as a receiver would.
            "outbox": [protocol.encode(payload) for payload in state.outbox],
        },
        indent=1,
    )


def _decode_state(text: str) -> AgentState:
    raw = json.loads(text)
    if not isinstance(raw, dict) or raw.get("format") != STATE_FORMAT:
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
    return AgentState(cursors=cursors, outbox=outbox)


class Mailbox:
    """Where the timer and the job runner post messages for the operator and the connection
    picks them up; every change to the durable part is saved before it is acted on."""

    def __init__(self, outbox: Outbox, *, save: Callable[[], Awaitable[None]]) -> None:
        self._outbox = outbox
        self._save = save
        self._posted = asyncio.Event()

    async def post(self, payload: protocol.Payload) -> None:
        self._outbox.put(payload)
        if is_durable(payload):
            await self._save()
        self._posted.set()

    async def pending(self) -> list[protocol.Payload]:
        """The messages waiting, oldest first, once there are any; they stay in the box until
        `delivered`."""
        while not self._outbox:
            self._posted.clear()
            await self._posted.wait()
        return list(self._outbox)

    async def delivered(self, payloads: Iterable[protocol.Payload]) -> None:
        removed = [payload for payload in payloads if self._outbox.discard(payload)]
        if any(is_durable(payload) for payload in removed):
            await self._save()


def state_saver(
    store: StateStore, *, cursors: Callable[[], Mapping[str, Cursor]], outbox: Outbox
) -> Callable[[], Awaitable[None]]:
    """The one way the agent saves: the scheduler's cursors and the outbox's durable part together."""

    async def save() -> None:
        await store.save(AgentState(cursors=dict(cursors()), outbox=outbox.durable()))

    return save
