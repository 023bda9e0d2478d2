"""The whole loop on a real control plane with real operator and agent processes and real
restic (issue 4's "Must show"): set → ack → fire → ResticJob → dispatch → status."""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from typing import Any

import pytest
from websockets.sync.client import connect

from restic_manager import protocol

from e2e.harness import World, eventually, fail_if_past, fires_ahead, parse_time

pytestmark = [pytest.mark.cluster, pytest.mark.restic]


def schedule(name: str, *, expression: str, paths: list[str], agent: str = "web-01",
             policy: str = "Forbid", extra: str = "") -> str:
    return f"""
        apiVersion: resticmanager.io/v1alpha1
        kind: Schedule
        metadata: {{name: {name}}}
        spec:
          agent: {agent}
          repository: local
          schedule: "{expression}"
          concurrencyPolicy: {policy}
          template:
            type: backup
            backup: {{paths: {json.dumps(paths)}}}
          {extra}
    """


def phases(world: World, schedule_name: str | None = None) -> dict[str, str]:
    return {j["metadata"]["name"]: j.get("status", {}).get("phase", "") for j in world.jobs(schedule_name)}


def now() -> datetime:
    return datetime.now(timezone.utc)


def test_apply_is_applied_edit_is_acked_delete_empties_the_agent_and_collects_its_jobs(world: World) -> None:
    world.repository()
    tree = world.source_tree()
    world.start_operator()
    agent = world.add_agent("web-01")
    world.apply(schedule("fast", expression="*/2 * * * * *", paths=[str(tree)]))
    world.wait("schedule/fast", "condition=Applied")
    world.wait("schedule/fast", "jsonpath={.status.agents[0].ackedGeneration}=1")

    world.kubectl("patch", "schedule/fast", "--type=merge", "-p", '{"spec":{"schedule":"*/3 * * * * *"}}')
    world.wait("schedule/fast", "jsonpath={.status.agents[0].ackedGeneration}=2")
    world.wait("schedule/fast", "condition=Applied")
    applied = world.get("schedule/fast")
    assert applied is not None
    assert applied["status"]["observedGeneration"] == 2
    assert applied["status"]["conditions"][0]["observedGeneration"] == 2
    eventually("a ResticJob of the schedule", lambda: world.jobs("fast"))
    version = world.get("agent/web-01")["status"]["appliedVersion"]  # type: ignore[index]

    world.kubectl("delete", "schedule/fast")
    eventually("the agent to ack a newer (empty) set",
               lambda: world.get("agent/web-01")["status"]["appliedVersion"] > version)  # type: ignore[index]
    assert "applied: 0 schedule(s)" in agent.output()
    eventually("the ResticJobs to be garbage-collected", lambda: not world.jobs("fast"), timeout=90)


def test_a_seconds_level_schedule_makes_real_snapshots(world: World) -> None:
    repository = world.repository()
    tree = world.source_tree()
    world.start_operator()
    world.add_agent("web-01")
    world.apply(schedule("fast", expression="*/3 * * * * *", paths=[str(tree)]))
    [first] = eventually("a Succeeded ResticJob", lambda: [
        j for j in world.jobs("fast") if j.get("status", {}).get("phase") == "Succeeded"][:1])
    snapshot = first["status"]["summary"]["snapshotId"]
    assert snapshot in world.snapshot_ids(repository)
    assert first["status"]["exitCode"] == 0 and first["status"]["logTail"]
    assert first["metadata"]["ownerReferences"][0]["kind"] == "Schedule"
    assert first["metadata"]["labels"] == {"resticmanager.io/schedule": "fast", "resticmanager.io/agent": "web-01"}
    status = world.get("schedule/fast")["status"]  # type: ignore[index]
    eventually("lastSuccessfulTime", lambda: world.get("schedule/fast")["status"].get("lastSuccessfulTime"))  # type: ignore[index]
    assert status["agents"][0]["name"] == "web-01" and status["agents"][0]["nextFireTime"]


def test_a_kubectl_created_job_runs_through_the_same_dispatcher(world: World) -> None:
    repository = world.repository()
    tree = world.source_tree()
    world.start_operator()
    world.add_agent("web-01")
    world.apply(f"""
        apiVersion: resticmanager.io/v1alpha1
        kind: ResticJob
        metadata: {{name: by-hand}}
        spec:
          agent: web-01
          repository: local
          type: backup
          backup: {{paths: [{tree}], tags: [by-hand]}}
    """)
    world.wait("resticjob/by-hand", "jsonpath={.status.phase}=Succeeded")
    job = world.get("resticjob/by-hand")
    assert job is not None
    assert job["status"]["summary"]["snapshotId"] in world.snapshot_ids(repository)
    # What the Snapshot and Progress columns show: restic's short id, and all of the work done.
    assert job["status"]["summary"]["shortId"] == job["status"]["summary"]["snapshotId"][:8]
    assert job["status"]["progress"]["percent"] == 100
    assert job["status"]["dispatchedAt"] and job["status"]["startTime"] and job["status"]["completionTime"]
    assert {c["type"]: c["status"] for c in job["status"]["conditions"]} == {"Complete": "True", "Failed": "False"}
    assert "finalizers" not in job["metadata"]
    # The job opened the repository, and the Repository says so.
    world.wait("repository/local", "condition=Initialized")
    repository_status = world.get("repository/local")["status"]  # type: ignore[index]
    assert repository_status["lastCheckResult"] == "backup by-hand: Succeeded (Completed)"


def test_the_same_fire_delivered_twice_and_after_a_reconnect_makes_one_job(world: World) -> None:
    world.repository()
    world.start_operator()
    world.apply('{"apiVersion": "resticmanager.io/v1alpha1", "kind": "Agent", "metadata": {"name": "web-01"}}')
    token = world.token("web-01")
    # Every second: a time the expression produces, and not before the Schedule was made.
    world.apply(schedule("nightly", expression="* * * * * *", paths=["/srv"]))
    nightly = world.get("schedule/nightly")
    assert nightly is not None
    fire = protocol.ScheduleFire(id=f"{world.namespace}/nightly", uid=nightly["metadata"]["uid"], generation=1,
                                 scheduled_at=now().replace(microsecond=0))

    def deliver(times: int, *, running: list[str], dispatched: bool) -> list[protocol.Payload]:
        """Connect as the agent and deliver the fire ``times`` times; returns what the operator
        sent, up to its answer to a barrier and (if ``dispatched``) the job's command.run."""
        with connect(f"ws://127.0.0.1:{world.operator_port}/agent",
                     additional_headers={"Authorization": f"Bearer {token}"}) as agent:
            agent.send(protocol.encode(protocol.Hello(
                agent="web-01", agent_version="test", restic_version="0",
                protocol_version=protocol.PROTOCOL_VERSION, running_jobs=running)))
            pushed = protocol.decode(agent.recv(timeout=30)).payload
            assert isinstance(pushed, protocol.ScheduleSet)
            agent.send(protocol.encode(protocol.ScheduleAck(
                version=pushed.version, applied_at=now(),
                applied=[protocol.AppliedEntry(id=e.id, generation=e.generation) for e in pushed.schedules])))
            for _ in range(times):
                agent.send(protocol.encode(fire))
            # The operator handles one connection's frames in order: its error about this
            # (agents may not send commands) comes after every fire above was handled.
            barrier = protocol.new_id()
            agent.send(protocol.encode(protocol.CommandCancel(job=f"{world.namespace}/x"), frame_id=barrier))
            received: list[protocol.Payload] = []

            def seen(kind: type[protocol.Payload], **fields: Any) -> bool:
                return any(isinstance(p, kind) and all(getattr(p, k) == v for k, v in fields.items())
                           for p in received)

            while not (seen(protocol.Error, ref=barrier) and (seen(protocol.CommandRun) or not dispatched)):
                received.append(protocol.decode(agent.recv(timeout=30)).payload)
            return received

    first = deliver(times=2, running=[], dispatched=True)
    [job] = world.jobs("nightly")
    job_id = f"{world.namespace}/{job['metadata']['name']}"
    assert job["spec"]["scheduledAt"] == fire.scheduled_at.strftime("%Y-%m-%dT%H:%M:%SZ")
    world.wait(f"resticjob/{job['metadata']['name']}", "jsonpath={.status.phase}=Running")
    assert job_id in [p.job for p in first if isinstance(p, protocol.CommandRun)]
    deliver(times=1, running=[job_id], dispatched=False)  # the agent reconnects, still running it, and delivers again
    assert [j["metadata"]["name"] for j in world.jobs("nightly")] == [job["metadata"]["name"]]
    status = world.get("schedule/nightly")["status"]  # type: ignore[index]
    assert status["refusedFires"] == 0 and status["missedFires"] == 0


KEEP_ALL = "successfulJobsHistoryLimit: 100"  # these tests count jobs: keep them all


def test_an_agent_cut_off_across_fires_delivers_one_after_reconnecting(world: World) -> None:
    world.repository()
    tree = world.source_tree()
    world.start_operator()
    relay = world.proxy()
    world.add_agent("web-01", via=relay)
    expression, times = fires_ahead(10, count=3)
    world.apply(schedule("burst", expression=expression, paths=[str(tree)], policy="Allow", extra=KEEP_ALL))
    world.wait("schedule/burst", "condition=Applied")

    relay.cut()
    world.wait("agent/web-01", "condition=Connected=False")
    fail_if_past(times[0], "applying the Schedule and cutting the agent off")
    # All three times pass while the agent cannot reach the operator: it keeps the newest.
    def fires_kept() -> list[datetime]:
        return [parse_time(frame["payload"]["scheduledAt"]) for frame in world.outbox("web-01")
                if frame["type"] == "schedule.fire"]

    eventually("the agent to keep the newest fire", lambda: times[-1] in fires_kept(), timeout=30)
    assert fires_kept() == [times[-1]]
    relay.restore()
    [job] = eventually("the job of the fire kept while cut off", lambda: world.jobs("burst"), timeout=90)
    assert parse_time(job["spec"]["scheduledAt"]) == times[-1], job["spec"]
    world.wait(f"resticjob/{job['metadata']['name']}", "jsonpath={.status.phase}=Succeeded")
    assert len(world.jobs("burst")) == 1


def test_an_agent_killed_across_fires_catches_up_once_after_restart(world: World) -> None:
    world.repository()
    tree = world.source_tree()
    world.start_operator()
    agent = world.add_agent("web-01")
    expression, times = fires_ahead(10, count=3)
    world.apply(schedule("burst", expression=expression, paths=[str(tree)], policy="Allow", extra=KEEP_ALL))
    world.wait("schedule/burst", "condition=Applied")

    agent.kill()
    fail_if_past(times[0], "applying the Schedule and killing the agent")
    time.sleep(max(0.0, (times[-1] - now()).total_seconds() + 1))  # all three times pass while it is dead
    agent.start()
    [job] = eventually("the catch-up fire", lambda: world.jobs("burst"), timeout=60)
    assert parse_time(job["spec"]["scheduledAt"]) == times[-1], job["spec"]
    world.wait(f"resticjob/{job['metadata']['name']}", "jsonpath={.status.phase}=Succeeded")
    assert len(world.jobs("burst")) == 1


def test_an_agent_killed_mid_job_leaves_the_job_failed_agent_lost(world: World) -> None:
    world.repository()
    tree = world.source_tree()
    held = world.held_restic()
    world.start_operator()
    agent = world.add_agent("web-01", restic=held)
    world.backup_job("long", tree)
    world.wait("resticjob/long", "jsonpath={.status.startTime}")
    agent.kill()
    agent.start()
    world.wait("resticjob/long", "jsonpath={.status.phase}=Failed")
    job = world.get("resticjob/long")
    assert job is not None and job["status"]["reason"] == "AgentLost"
    # the restarted agent said so itself, from its journal, once it had looked for a snapshot
    assert "the agent stopped while restic ran this job" in job["status"]["message"]
    assert "agent: restic saved no snapshot for this job" in job["status"]["logTail"]


def test_an_agent_killed_after_restic_saved_its_snapshot_ends_the_job_with_that_snapshot(world: World) -> None:
    repository = world.repository()
    tree = world.source_tree()
    slow_to_exit = world.held_restic(after_backup=True)
    world.start_operator()
    agent = world.add_agent("web-01", restic=slow_to_exit)
    world.backup_job("saved", tree)
    [snapshot] = eventually("restic's snapshot in the repository", lambda: sorted(world.snapshot_ids(repository)))
    agent.kill()  # restic has saved it; the agent never saw restic end
    agent.start()

    world.wait("resticjob/saved", "jsonpath={.status.phase}=Succeeded")
    job = world.get("resticjob/saved")
    assert job is not None and job["status"]["reason"] == "Completed"
    assert job["status"]["summary"]["snapshotId"] == snapshot
    assert job["status"]["summary"]["filesNew"] == 2
    assert any(line.startswith(f"agent: restic saved snapshot {snapshot[:8]} before it was stopped")
               for line in job["status"]["logTail"])
    assert world.snapshot_ids(repository) == {snapshot}  # not backed up a second time


@pytest.mark.parametrize("policy", ["Forbid", "Replace", "Allow"])
def test_concurrency_policy(world: World, policy: str) -> None:
    world.repository()
    tree = world.source_tree()
    held = world.held_restic()
    world.start_operator()
    world.add_agent("web-01", restic=held)
    world.apply(schedule("busy", expression="*/2 * * * * *", paths=[str(tree)], policy=policy))
    [first] = eventually("a first job running", lambda: [
        j for j in world.jobs("busy") if j.get("status", {}).get("startTime")][:1])
    first_name = first["metadata"]["name"]

    if policy == "Forbid":
        eventually("a skipped fire", lambda: world.get("schedule/busy")["status"].get("refusedFires"))  # type: ignore[index]
        [event] = eventually("a ConcurrencyForbid Event", lambda: world.events("ConcurrencyForbid")[:1])
        assert event["involvedObject"]["name"] == "busy" and first_name in event["message"]
        assert list(phases(world, "busy")) == [first_name]
    elif policy == "Replace":
        world.wait(f"resticjob/{first_name}", "jsonpath={.status.phase}=Cancelled")
        eventually("the replacing job", lambda: [n for n in phases(world, "busy") if n != first_name])
    else:
        both = eventually("two jobs running at once", lambda: [
            n for n, phase in phases(world, "busy").items() if phase == "Running"][1:])
        assert both


def test_an_operator_restart_loses_nothing(world: World) -> None:
    repository = world.repository()
    tree = world.source_tree()
    operator = world.start_operator()
    world.add_agent("web-01")
    # One fire time, a little ahead, and then none for a day: the fire made while the operator
    # is down is the only one, so no later fire can take its place in the agent's outbox
    # (newest only) while the restarted operator is still pushing the set.
    expression, [fire_at] = fires_ahead(20)
    world.apply(schedule("daily", expression=expression, paths=[str(tree)], policy="Allow", extra=KEEP_ALL))
    world.wait("schedule/daily", "condition=Applied")
    version = world.get("agent/web-01")["status"]["appliedVersion"]  # type: ignore[index]

    operator.stop()
    fail_if_past(fire_at, "applying the Schedule and stopping the operator")
    world.apply(f"""
        apiVersion: resticmanager.io/v1alpha1
        kind: ResticJob
        metadata: {{name: while-down}}
        spec: {{agent: web-01, repository: local, type: backup, backup: {{paths: [{tree}]}}}}
    """)
    eventually("the agent to keep the fire made while the operator is down", lambda: [
        frame for frame in world.outbox("web-01") if frame["type"] == "schedule.fire"], timeout=40)
    operator.start()

    world.wait("resticjob/while-down", "jsonpath={.status.phase}=Succeeded")
    eventually("the set to be pushed again",
               lambda: world.get("agent/web-01")["status"]["appliedVersion"] > version)  # type: ignore[index]
    [fired] = eventually("the job of the fire made while the operator was down", lambda: world.jobs("daily"))
    assert parse_time(fired["spec"]["scheduledAt"]) == fire_at, fired["spec"]
    world.wait(f"resticjob/{fired['metadata']['name']}", "jsonpath={.status.phase}=Succeeded")
    world.wait("schedule/daily", "condition=Applied")
    job = world.get("resticjob/while-down")
    assert job is not None and job["status"]["summary"]["snapshotId"] in world.snapshot_ids(repository)
