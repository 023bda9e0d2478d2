"""Nothing lost, nothing doubled (SPEC §3 receipts, §4): each failure between an agent's
message and the operator's record of it, made to happen on purpose, on the real control plane
with real operator and agent processes and real restic. The operator reaches the apiserver
through a fault proxy (Toxiproxy) that a test stops answering."""

from __future__ import annotations

import collections
import json
import time
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from restic_manager.cron import Cron

from e2e.harness import World, eventually, fail_if_past, fires_ahead, parse_time

pytestmark = [pytest.mark.cluster, pytest.mark.restic]

EVERY = "*/3 * * * * *"
SLOW = "*/20 * * * * *"  # room to fail and recover between two fires: a lost fire shows as a missing job
SILENT = {"timeout": 0}  # the proxy passes nothing and closes nothing: an apiserver that never answers


def fast_schedule(paths: list[str], *, every: str = EVERY) -> str:
    return f"""
        apiVersion: resticmanager.io/v1alpha1
        kind: Schedule
        metadata: {{name: fast}}
        spec:
          agent: web-01
          repository: local
          schedule: "{every}"
          concurrencyPolicy: Allow
          successfulJobsHistoryLimit: 1000
          failedJobsHistoryLimit: 1000
          template:
            type: backup
            backup: {{paths: {json.dumps(paths)}}}
    """


def fired_at(world: World) -> list[datetime]:
    return sorted(parse_time(job["spec"]["scheduledAt"]) for job in world.jobs("fast"))


def no_duplicates(world: World) -> None:
    times = collections.Counter(fired_at(world))
    assert [t for t, n in times.items() if n > 1] == [], "two ResticJobs for one scheduled time"


def wait_past_next_fire(after: datetime, *, every: str = EVERY, margin: float = 1.5) -> datetime:
    """Let the clock pass the Schedule's next fire time after ``after`` (and ``margin``): the
    agent has fired by then. Returns that time."""
    fire = Cron(every, "UTC").next_after(after)
    time.sleep(max(0.0, (fire - datetime.now(timezone.utc)).total_seconds() + margin))
    return fire


def settled(world: World) -> dict[str, str]:
    """Suspend the Schedule, then every job's final phase once none is Pending or Running."""
    world.kubectl("patch", "schedule/fast", "--type=merge", "-p", '{"spec":{"suspend":true}}')

    def final() -> dict[str, str] | None:
        phases = {j["metadata"]["name"]: j.get("status", {}).get("phase", "") for j in world.jobs("fast")}
        return phases if all(p in ("Succeeded", "Failed", "Cancelled") for p in phases.values()) else None

    return eventually("every job final", final)


def start(world: World, faults: Any, *, every: str = EVERY) -> None:
    world.repository()
    tree = world.source_tree()
    world.start_operator(kubeconfig=world.apiserver_through(faults))
    world.add_agent("web-01")
    world.apply(fast_schedule([str(tree)], every=every))
    world.wait("schedule/fast", "condition=Applied")


def the_job_of(world: World, fire: datetime, *, before: datetime) -> None:
    """The fire at ``fire`` became its own ResticJob, made before the next fire time."""
    eventually(f"the job of the fire at {fire}", lambda: fire in fired_at(world), timeout=40)
    [job] = [j for j in world.jobs("fast") if parse_time(j["spec"]["scheduledAt"]) == fire]
    assert parse_time(job["metadata"]["creationTimestamp"]) < before


def test_a_fire_while_the_apiserver_does_not_answer_becomes_one_job_once_it_does(world: World, faults: Any) -> None:
    start(world, faults, every=SLOW)
    faults.fault("apiserver", "timeout", attributes=SILENT)
    fire = wait_past_next_fire(datetime.now(timezone.utc), every=SLOW, margin=4)
    assert fire not in fired_at(world)  # nothing could be created meanwhile
    faults.heal("apiserver")

    # The operator gives up on the silent apiserver, answers retry, and the agent sends the fire again.
    the_job_of(world, fire, before=fire + timedelta(seconds=20))
    assert set(settled(world).values()) == {"Succeeded"}
    no_duplicates(world)


def test_an_operator_killed_between_a_fire_and_its_create_loses_nothing(world: World, faults: Any) -> None:
    start(world, faults, every=SLOW)
    faults.fault("apiserver", "timeout", attributes=SILENT)
    fire = wait_past_next_fire(datetime.now(timezone.utc), every=SLOW)  # received; its create hangs
    assert world.operator is not None
    world.operator.kill()
    faults.heal("apiserver")
    world.start_operator()

    # A pong was never a receipt: the agent still holds the fire and sends it to the new operator.
    the_job_of(world, fire, before=fire + timedelta(seconds=20))
    assert set(settled(world).values()) == {"Succeeded"}
    no_duplicates(world)


def test_an_operator_killed_before_writing_a_jobs_end_still_shows_its_real_end(world: World, faults: Any) -> None:
    repository = world.repository()
    tree = world.source_tree()
    held = world.held_restic()
    world.start_operator(kubeconfig=world.apiserver_through(faults))
    agent = world.add_agent("web-01", restic=held)
    world.backup_job("manual", tree)
    world.wait("resticjob/manual", "jsonpath={.status.startTime}")
    faults.fault("apiserver", "timeout", attributes=SILENT)
    for hold in world.holds:
        hold.unlink()  # restic runs to its end; the operator gets job.done and cannot write it
    eventually("restic's end on the agent", lambda: "manual: Succeeded" in agent.output())
    assert world.operator is not None
    world.operator.kill()
    faults.heal("apiserver")
    world.start_operator()

    world.wait("resticjob/manual", "jsonpath={.status.phase}=Succeeded")
    job = world.get("resticjob/manual")
    assert job is not None
    assert job["status"]["summary"]["snapshotId"] in world.snapshot_ids(repository)


def test_an_operator_restarted_while_a_job_runs_never_runs_it_again(world: World) -> None:
    repository = world.repository()
    tree = world.source_tree()
    held = world.held_restic()
    world.start_operator()
    agent = world.add_agent("web-01", restic=held)
    world.backup_job("once", tree)
    world.wait("resticjob/once", "jsonpath={.status.startTime}")
    assert world.operator is not None
    world.operator.kill()
    world.start_operator()
    eventually("the agent back", lambda: agent.output().count("connected to the operator") >= 2)
    for hold in world.holds:
        hold.unlink()

    world.wait("resticjob/once", "jsonpath={.status.phase}=Succeeded")
    assert len(world.snapshot_ids(repository)) == 1
    assert agent.output().count("once: backup requested") == 1


def test_a_fire_the_operator_dropped_over_its_rate_limit_is_sent_again_and_made(world: World) -> None:
    """Three Schedules fire at once on an agent allowed two frames at a time: fires are
    dropped unread (answered rate-limited), and the agent, never getting their receipts,
    sends them again until each is made."""
    world.repository()
    tree = world.source_tree()
    world.start_operator(extra=["--agent-frame-rate", "0.5", "--agent-frame-burst", "2"])
    world.add_agent("web-01")
    # One fire time a little ahead, then none for a day: a resend that is dropped again and
    # waits for the next (longer) resend cannot be replaced by a newer fire of its Schedule.
    once, [fire] = fires_ahead(15)
    for name in ("one", "two", "three"):
        world.apply(fast_schedule([str(tree)], every=once).replace("name: fast", f"name: {name}"))
    for name in ("one", "two", "three"):
        world.wait(f"schedule/{name}", "condition=Applied")
    fail_if_past(fire, "applying the Schedules")
    wait_past_next_fire(datetime.now(timezone.utc), every=once)

    def made() -> list[str] | None:
        names = [j["spec"]["scheduleRef"]["name"] for j in world.items("resticjobs")
                 if parse_time(j["spec"]["scheduledAt"]) == fire]
        return names if len(names) == 3 else None

    # Resent after about 15 s of silence, then 30 s more, then 60: room for a fire dropped twice.
    assert sorted(eventually("a job for each of the three fires", made, timeout=120)) == ["one", "three", "two"]
    assert "frame dropped: over 0.5 frames per second" in (world.operator.output() if world.operator else "")
