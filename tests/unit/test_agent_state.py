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
from restic_manager.agent.state import AgentState, Journal, Mailbox, Outbox, StateStore

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
    outbox = Outbox()
    sent = outbox.put(fire("ns/a", 11))
    newer = outbox.put(fire("ns/a", 11))  # the same schedule fired again meanwhile: equal, but new

    assert outbox.discard(sent) is None  # already replaced
    assert outbox.after(0) == {newer: fire("ns/a", 11)}
    assert outbox.discard(newer) == fire("ns/a", 11)
    assert len(outbox) == 0


def test_after_a_fire_is_discarded_the_next_fire_of_its_schedule_is_kept_beside_others() -> None:
    outbox = Outbox()
    first = outbox.put(fire("ns/a", 11))
    outbox.put(fire("ns/b", 11))
    outbox.discard(first)
    later = outbox.put(fire("ns/a", 12))

    assert list(outbox.after(first).values()) == [fire("ns/b", 11), fire("ns/a", 12)]
    assert list(outbox.after(later)) == []


def test_messages_are_numbered_in_posting_order() -> None:
    outbox = Outbox()
    numbers = [outbox.put(payload) for payload in (started("ns/j"), fire("ns/a", 11), done("ns/j"))]

    assert numbers == sorted(numbers)
    assert outbox.after(numbers[0]) == {numbers[1]: fire("ns/a", 11), numbers[2]: done("ns/j")}


# --- the state file --------------------------------------------------------------------------


async def test_state_survives_a_restart(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state" / "state.json")
    cursors = {"ns/a": Cursor(uid="u1", until=T0), "ns/b": Cursor(uid="u2", until=T0.replace(hour=2))}
    journal = Journal(running={"ns/k": "/srv/restic"}, unlock={"s3:host/bucket"})
    await store.save(AgentState(cursors=cursors, outbox=[fire("ns/a", 10), done("ns/j")], journal=journal))

    loaded = StateStore(tmp_path / "state" / "state.json").load()

    assert loaded == AgentState(cursors=cursors, outbox=[fire("ns/a", 10), done("ns/j")], journal=journal)
    assert stat.S_IMODE((tmp_path / "state" / "state.json").stat().st_mode) == 0o600
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == ["state.json"]  # no temporary left


def test_a_state_file_of_format_1_loads_with_an_empty_journal(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_text(json.dumps({"format": 1, "cursors": {"ns/a": {"uid": "u", "until": T0.isoformat()}},
                                "outbox": [protocol.encode(fire("ns/a", 10))]}))

    assert StateStore(path).load() == AgentState(cursors={"ns/a": Cursor(uid="u", until=T0)},
                                                 outbox=[fire("ns/a", 10)])


async def test_state_keeps_any_uid_text(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.json")
    cursors = {"ns/a": Cursor(uid='quote" back\\slash \u00e9 \n', until=T0)}
    await store.save(AgentState(cursors=cursors))

    assert StateStore(tmp_path / "state.json").load() == AgentState(cursors=cursors)


async def test_the_last_save_wins(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.json")
    saves = [AgentState(cursors={"ns/a": Cursor(uid="u", until=T0.replace(hour=h))}) for h in range(10, 20)]

    await asyncio.gather(*(store.save(state) for state in saves))

    assert store.load() == saves[-1]


async def test_each_save_writes_the_cursors_as_they_are_then(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.json")
    cursors = {f"ns/s{n}": Cursor(uid=f"u{n}", until=T0) for n in range(3)}
    await store.save(AgentState(cursors=cursors))
    moved = {**cursors, "ns/s1": Cursor(uid="u1", until=T0.replace(hour=11))}  # it fired
    del moved["ns/s2"]  # its schedule was deleted

    await store.save(AgentState(cursors=moved))

    assert store.load() == AgentState(cursors=moved)


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


class CountingSave:
    """The mailbox's save, counting its calls instead of writing."""

    def __init__(self) -> None:
        self.count = 0

    async def __call__(self) -> None:
        self.count += 1


async def test_the_mailbox_hands_out_messages_in_order_and_saves_durable_changes() -> None:
    save = CountingSave()
    mailbox = Mailbox(Outbox(), save=save)
    waiting = asyncio.create_task(mailbox.wait(None))
    await asyncio.sleep(0)  # let it wait on the empty box
    assert not waiting.done()

    await mailbox.post(progress("ns/j", 1))
    await waiting  # a post wakes the waiter
    assert (list(mailbox.items().values()), save.count) == ([progress("ns/j", 1)], 0)
    await mailbox.post(fire("ns/a", 11))
    assert save.count == 1

    batch = mailbox.items()
    assert list(batch.values()) == [progress("ns/j", 1), fire("ns/a", 11)]
    await mailbox.post(fire("ns/b", 12))  # while the batch is on its way
    await mailbox.delivered(batch)

    left = mailbox.items()
    assert (list(left.values()), save.count) == ([fire("ns/b", 12)], 3)
    await mailbox.delivered(batch)  # again: nothing left to remove, nothing saved
    assert (mailbox.items(), save.count) == (left, 3)


async def test_a_wait_returns_after_its_timeout_when_nothing_is_posted() -> None:
    mailbox = Mailbox(Outbox(), save=CountingSave())
    await mailbox.post(fire("ns/a", 11))
    await mailbox.wait(None)  # the post before the wait counts
    async with asyncio.timeout(5):
        await mailbox.wait(0.01)
    assert list(mailbox.items().values()) == [fire("ns/a", 11)]


async def test_the_mailbox_names_the_jobs_whose_job_done_waits_for_its_receipt() -> None:
    mailbox = Mailbox(Outbox(), save=CountingSave())
    await mailbox.post_many([done("ns/b"), started("ns/c"), done("ns/a")])
    assert mailbox.finished_jobs() == ["ns/a", "ns/b"]


async def test_posted_messages_can_be_sent_while_their_save_is_still_writing() -> None:
    writing, landed = asyncio.Event(), asyncio.Event()

    async def save() -> None:
        writing.set()
        await landed.wait()

    mailbox = Mailbox(Outbox(), save=save)
    posting = asyncio.create_task(mailbox.post(fire("ns/a", 11)))
    await writing.wait()

    assert list(mailbox.items().values()) == [fire("ns/a", 11)]
    assert not posting.done()
    landed.set()
    await posting


async def test_fires_posted_together_are_saved_once_and_delivered_with_one_save() -> None:
    save = CountingSave()
    mailbox = Mailbox(Outbox(), save=save)
    await mailbox.post_many([fire(f"ns/s{n}", 11) for n in range(50)])
    assert save.count == 1

    await mailbox.delivered(mailbox.items())
    assert save.count == 2


async def test_a_batch_without_durable_messages_is_not_saved() -> None:
    save = CountingSave()
    mailbox = Mailbox(Outbox(), save=save)
    await mailbox.post_many([started("ns/j"), progress("ns/j", 5)])
    await mailbox.delivered(mailbox.items())

    assert save.count == 0
