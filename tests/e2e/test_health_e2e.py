"""A failing host is never hidden (issue 19): three agents under one Schedule, one stopped
past its deadline, one whose backups fail, one fine; the Schedule's Healthy condition, its
Events and the operator's metrics name exactly the first two, until both recover. A Schedule
whose Repository does not exist runs nowhere and blocks nothing."""

from __future__ import annotations

import json
import urllib.request
from typing import Any

import pytest

from e2e.harness import Receiver, World, eventually, free_port

pytestmark = [pytest.mark.cluster, pytest.mark.restic]

FLEET = ("fine", "stopped", "failing")


def fleet_schedule(tree: str, *, repository: str = "local", notifications: str = "") -> str:
    return f"""
        apiVersion: resticmanager.io/v1alpha1
        kind: Schedule
        metadata: {{name: fleet}}
        spec:
          agentSelector: {{matchLabels: {{fleet: "yes"}}}}
          repository: {repository}
          schedule: "*/4 * * * * *"
          startingDeadlineSeconds: 2
          template:
            type: backup
            backup: {{paths: [{tree}]}}
          {notifications}
    """


def condition(world: World, kind: str) -> dict[str, Any]:
    schedule = world.get("schedule/fleet") or {}
    found = [c for c in schedule.get("status", {}).get("conditions", []) if c["type"] == kind]
    return found[0] if found else {}


def healthy_gauges(port: int) -> dict[str, float]:
    """restic_manager_schedule_agent_healthy of the Schedule fleet, by agent, as /metrics serves it."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    gauges = {}
    for line in text.splitlines():
        if line.startswith("restic_manager_schedule_agent_healthy{") and 'schedule="fleet"' in line:
            labels, value = line.rsplit(" ", 1)
            agent = labels.split('agent="', 1)[1].split('"', 1)[0]
            gauges[agent] = float(value)
    return gauges


def notices(receiver: Receiver) -> list[dict[str, Any]]:
    return [json.loads(body) for _, path, _, body in list(receiver.hits) if path == "/health"]


def test_a_stopped_host_and_a_failing_host_are_named_until_both_recover(world: World, receiver: Receiver) -> None:
    world.repository()
    world.apply(f"""
        apiVersion: v1
        kind: Secret
        metadata: {{name: hooks, labels: {{resticmanager.io/notification-secret: "true"}}}}
        stringData: {{webhook: {receiver.url}/health}}
    """)
    tree = world.source_tree()
    metrics = free_port()
    world.start_operator(extra=["--metrics-listen", f"127.0.0.1:{metrics}"])
    broken, failing_flag = world.failing_restic()
    agents = {name: world.add_agent(name, labels={"fleet": "yes"}, restic=broken if name == "failing" else None)
              for name in FLEET}
    world.apply(fleet_schedule(str(tree), notifications="notifications: [{type: webhook, urlSecretRef: "
                                                         "{name: hooks, key: webhook}, when: [unhealthy, healthy]}]"))
    world.wait("schedule/fleet", "condition=Applied")
    eventually("a successful backup on the stopped agent before it stops", lambda: [
        j for j in world.jobs("fleet")
        if j["spec"]["agent"] == "stopped" and j.get("status", {}).get("phase") == "Succeeded"])
    agents["stopped"].stop()

    unhealthy = eventually("Healthy=False naming the stopped and the failing agent", lambda: (
        found if (found := condition(world, "Healthy")).get("status") == "False"
        and "stopped: " in found["message"] and "failing: " in found["message"] else None), timeout=90)
    assert "fine: " not in unhealthy["message"], unhealthy
    assert unhealthy["reason"] == "AgentsUnhealthy"
    parts = dict(part.split(": ", 1) for part in unhealthy["message"].split("; "))
    assert parts["failing"].startswith("its last run fleet-failing-") and "(ResticFailed)" in parts["failing"]
    assert "the agent is not connected" in parts["stopped"]
    status = world.get("schedule/fleet")["status"]  # type: ignore[index]
    assert status["healthyAgents"] == "1/3"
    entries = {entry["name"]: entry for entry in status["agents"]}
    assert entries["stopped"]["connected"] is False and entries["fine"]["connected"] is True
    assert entries["failing"]["lastJob"]["phase"] == "Failed" and "lastSuccessfulTime" not in entries["failing"]
    assert entries["fine"]["lastJob"]["phase"] == "Succeeded" and entries["fine"]["lastSuccessfulTime"]
    assert eventually("the healthy gauges to agree", lambda: (
        gauges if (gauges := healthy_gauges(metrics)) == {"fine": 1.0, "stopped": 0.0, "failing": 0.0} else None))
    warnings = {(e["reason"], e["message"].split(":", 1)[0]) for e in world.items("events")
                if e["involvedObject"]["kind"] == "Schedule" and e["type"] == "Warning"}
    assert {("LastRunFailed", "agent failing"), ("Overdue", "agent stopped")} <= warnings, warnings
    failed_jobs = [e for e in world.events("ResticFailed") if e["involvedObject"]["kind"] == "ResticJob"]
    assert failed_jobs and all("on agent failing" in e["message"] for e in failed_jobs)
    def told_both() -> list[dict[str, Any]] | None:
        found = notices(receiver)
        said = {(n["agent"], n["reason"]) for n in found}
        return found if said >= {("failing", "LastRunFailed"), ("stopped", "Overdue")} else None

    told = eventually("unhealthy notices for both", told_both)
    assert {n["agent"] for n in told if n["event"] == "unhealthy"} == {"failing", "stopped"}, told

    failing_flag.unlink()
    agents["stopped"].start()
    recovered = eventually("Healthy=True once both recovered", lambda: (
        found if (found := condition(world, "Healthy")).get("status") == "True" else None), timeout=90)
    assert recovered["reason"] == "AllAgentsHealthy"
    assert world.get("schedule/fleet")["status"]["healthyAgents"] == "3/3"  # type: ignore[index]
    assert eventually("the healthy gauges to agree", lambda: (
        gauges if (gauges := healthy_gauges(metrics)) == dict.fromkeys(FLEET, 1.0) else None))
    assert eventually("a Normal Healthy Event", lambda: [
        e for e in world.events("Healthy") if e["involvedObject"]["name"] == "fleet" and e["type"] == "Normal"])
    [recovery] = eventually("the healthy notice", lambda: [n for n in notices(receiver) if n["event"] == "healthy"])
    assert (recovery["agent"], recovery["reason"]) == (None, "Healthy")


def test_a_schedule_whose_repository_is_missing_runs_nowhere_and_blocks_nothing(world: World) -> None:
    tree = world.source_tree()
    world.start_operator()
    world.add_agent("web-01", labels={"fleet": "yes"})
    world.apply(fleet_schedule(str(tree)))
    applied = eventually("Applied=False with reason RepositoryNotFound", lambda: (
        found if (found := condition(world, "Applied")).get("reason") == "RepositoryNotFound" else None))
    assert applied["status"] == "False" and "there is no Repository local" in applied["message"]
    healthy = condition(world, "Healthy")
    assert (healthy.get("status"), healthy.get("reason")) == ("False", "RepositoryNotFound")
    assert eventually("a Warning RepositoryNotFound Event on the Schedule", lambda: [
        e for e in world.events("RepositoryNotFound") if e["involvedObject"]["kind"] == "Schedule"])
    assert not world.jobs("fleet")  # given to no agent: nothing fires, nothing waits

    world.repository()
    world.wait("schedule/fleet", "condition=Applied")
    eventually("a Succeeded ResticJob once the Repository exists", lambda: [
        j for j in world.jobs("fleet") if j.get("status", {}).get("phase") == "Succeeded"])
