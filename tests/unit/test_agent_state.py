"""What the agent keeps for the operator while disconnected, and what survives a restart."""

from __future__ import annotations

import asyncio
import json
import logging
import stat
from datetime import datetime
from pathlib import Path

import pytest

from restic_manager import protocol
from restic_manager.agent.scheduler import Cursor
from restic_manager.agent.state import AgentState, Mailbox, Outbox, StateStore

T0 = datetime.fromisoformat("2026-03-02T10:00:00+00:00")


def fire(schedule_id: str, hour: int) -> protocol.ScheduleFire:
    return protocol.ScheduleFire(id=schedule_id, uid=f"uid-{schedule_id}", generation=1,
                                 scheduled_at=T0.replace(hour=hour))


def started(job: str) -> protocol.JobStarted:
    return protocol.JobStarted(job=job, started_at=T0)


def progress(job: str, percent: float) -> protocol.JobProgress:
    return protocol.JobProgress(job=job, percent_done=percent)


def done(job: str) -> protocol.JobDone:
    return protocol.JobDone(job=job, outcome=protocol.Outcome.SUCCEEDED, exit_code=0, finished_at=T0)


# --- the outbox's rules ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("posted", "kept"),
    [
        # only the newest fire per schedule: a missed backup runs once
        ([fire("ns/a", 11), fire("ns/b", 11), fire("ns/a", 12), fire("ns/a", 13)],
         [fire("ns/b", 11), fire("ns/a", 13)]),
        # only the newest progress per job, and none once it is done; started and done stay
        ([started("ns/j"), progress("ns/j", 10), progress("ns/k", 5), progress("ns/j", 20)],
         [started("ns/j"), progress("ns/k", 5), progress("ns/j", 20)]),
        ([started("ns/j"), progress("ns/j", 10), done("ns/j")], [started("ns/j"), done("ns/j")]),
        # job results are never merged
        ([done("ns/j"), done("ns/k"), fire("ns/a", 11)], [done("ns/j"), done("ns/k"), fire("ns/a", 11)]),
    ],
)
def test_the_outbox_keeps_what_is_still_worth_sending(
    posted: list[protocol.Payload], kept: list[protocol.Payload]
) -> None:
    outbox = Outbox()
    for payload in posted:
        outbox.put(payload)

    assert list(outbox) == kept


def test_only_fires_and_job_results_are_durable() -> None:
    outbox = Outbox([started("ns/j"), fire("ns/a", 11), progress("ns/j", 50), done("ns/k")])

    assert outbox.durable() == [fire("ns/a", 11), done("ns/k")]


def test_discard_removes_the_message_sent_not_a_newer_equal_one() -> None:
    sent = fire("ns/a", 11)
    outbox = Outbox([sent])
    newer = fire("ns/a", 11)  # the same schedule fired again meanwhile, an equal but new message
    outbox.put(newer)

    outbox.discard(sent)

    assert len(outbox) == 1 and outbox.first() is newer


# --- the state file --------------------------------------------------------------------------


async def test_state_survives_a_restart(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state" / "state.json")
    cursors = {"ns/a": Cursor(uid="u1", until=T0), "ns/b": Cursor(uid="u2", until=T0.replace(hour=2))}
    await store.save(AgentState(cursors=cursors, outbox=[fire("ns/a", 10), done("ns/j")]))

    loaded = StateStore(tmp_path / "state" / "state.json").load()

    assert loaded == AgentState(cursors=cursors, outbox=[fire("ns/a", 10), done("ns/j")])
    assert stat.S_IMODE((tmp_path / "state" / "state.json").stat().st_mode) == 0o600
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == ["state.json"]  # no temporary left


async def test_the_last_save_wins(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.json")
    saves = [AgentState(cursors={"ns/a": Cursor(uid="u", until=T0.replace(hour=h))}) for h in range(10, 20)]

    await asyncio.gather(*(store.save(state) for state in saves))

    assert store.load() == saves[-1]


def test_a_missing_state_file_starts_empty(tmp_path: Path) -> None:
    assert StateStore(tmp_path / "state.json").load() == AgentState()


@pytest.mark.parametrize(
    "text",
    ["{not json", "[]", '{"format": 99, "cursors": {}, "outbox": []}', '{"format": 1, "cursors": []}',
     '{"format": 1, "cursors": {"ns/a": {"uid": "u", "until": "2026-03-02T10:00:00"}}, "outbox": []}'],
)
def test_a_corrupt_state_file_is_kept_aside_and_the_agent_starts_empty(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, text: str
) -> None:
    path = tmp_path / "state.json"
    path.write_text(text)

    assert StateStore(path).load() == AgentState()
    assert "is unusable" in caplog.text
    assert (tmp_path / "state.json.corrupt").read_text() == text


def test_an_invalid_saved_message_is_dropped_and_the_rest_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "state.json"
    path.write_text(json.dumps({"format": 1, "cursors": {}, "outbox": [
        '{"type": "schedule.fire", "id": "1", "payload": {"id": "ns/a"}}', protocol.encode(done("ns/j")),
    ]}))

    assert StateStore(path).load().outbox == [done("ns/j")]
    assert "dropping an unreadable message" in caplog.text


async def test_a_failing_save_is_logged_and_does_not_stop_the_agent(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "not-a-directory").write_text("")
    store = StateStore(tmp_path / "not-a-directory" / "state.json")

    with caplog.at_level(logging.ERROR):
        await store.save(AgentState())

    assert "cannot save agent state" in caplog.text


# --- the mailbox -----------------------------------------------------------------------------


async def test_the_mailbox_hands_out_messages_in_order_and_saves_durable_changes() -> None:
    saves = 0

    async def save() -> None:
        nonlocal saves
        saves += 1

    mailbox = Mailbox(Outbox(), save=save)
    waiting = asyncio.create_task(mailbox.pending())
    await asyncio.sleep(0)  # let it wait on the empty box
    assert not waiting.done()

    await mailbox.post(progress("ns/j", 1))
    assert (await waiting, saves) == ([progress("ns/j", 1)], 0)
    await mailbox.post(fire("ns/a", 11))
    assert saves == 1

    batch = await mailbox.pending()
    assert batch == [progress("ns/j", 1), fire("ns/a", 11)]
    await mailbox.post(fire("ns/b", 12))  # while the batch is on its way
    await mailbox.delivered(batch)

    assert (await mailbox.pending(), saves) == ([fire("ns/b", 12)], 3)
    await mailbox.delivered([fire("ns/b", 12)])  # an equal message, not the one in the box
    assert (await mailbox.pending(), saves) == ([fire("ns/b", 12)], 3)
