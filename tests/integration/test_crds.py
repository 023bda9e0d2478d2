"""The CRDs on the real apiserver: discovery, generation bookkeeping, schema and CEL
validation, garbage collection by kube-controller-manager."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.cluster

SCHEDULE = """
apiVersion: resticmanager.io/v1alpha1
kind: Schedule
metadata: {{name: {name}}}
spec:
{spec}
"""

GOOD_SPEC = """
  agent: web-01
  repository: offsite
  schedule: "0 2 * * *"
  template:
    type: backup
    backup: {paths: [/etc]}
"""


def apply(kube, namespace: str, manifest: str, *, check: bool = True):
    return kube.kubectl("-n", namespace, "apply", "-f", "-", input=manifest, check=check)


def get(kube, namespace: str, kind: str, name: str) -> dict:
    return json.loads(kube.kubectl("-n", namespace, "get", kind, name, "-o", "json").stdout)


def test_kubectl_get_restic_lists_all_four_kinds(kube) -> None:
    resources = kube.kubectl("api-resources", "--categories=restic", "-o", "name").stdout.split()
    assert sorted(resources) == sorted([
        "agents.resticmanager.io", "repositories.resticmanager.io",
        "resticjobs.resticmanager.io", "schedules.resticmanager.io",
    ])
    result = kube.kubectl("get", "restic", "-A")
    assert result.returncode == 0


def test_short_names_resolve(kube, namespace: str) -> None:
    for short in ("rrepo", "ragent", "rsched", "rjob"):
        assert kube.kubectl("-n", namespace, "get", short).returncode == 0


def test_defaults_are_applied(kube, namespace: str) -> None:
    apply(kube, namespace, SCHEDULE.format(name="nightly", spec=GOOD_SPEC))
    spec = get(kube, namespace, "schedule", "nightly")["spec"]
    assert spec["concurrencyPolicy"] == "Forbid"
    assert spec["timeZone"] == "UTC"
    assert spec["suspend"] is False
    assert spec["successfulJobsHistoryLimit"] == 3
    assert spec["failedJobsHistoryLimit"] == 1
    assert spec["template"]["timeoutSeconds"] == 14400


def test_spec_change_bumps_generation_and_status_write_does_not(kube, namespace: str) -> None:
    apply(kube, namespace, SCHEDULE.format(name="nightly", spec=GOOD_SPEC))
    assert get(kube, namespace, "schedule", "nightly")["metadata"]["generation"] == 1
    apply(kube, namespace, SCHEDULE.format(name="nightly", spec=GOOD_SPEC.replace("0 2 * * *", "0 3 * * *")))
    assert get(kube, namespace, "schedule", "nightly")["metadata"]["generation"] == 2
    kube.kubectl("-n", namespace, "patch", "schedule", "nightly", "--subresource=status", "--type=merge",
                 "-p", json.dumps({"status": {"observedGeneration": 2, "lastScheduleTime": "2026-01-01T02:00:00Z"}}))
    after = get(kube, namespace, "schedule", "nightly")
    assert after["status"]["observedGeneration"] == 2
    assert after["metadata"]["generation"] == 2


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        pytest.param(GOOD_SPEC.replace("  agent: web-01\n", "  agent: web-01\n  agentSelector: {matchLabels: {role: web}}\n"),
                     "exactly one of spec.agent and spec.agentSelector", id="both-agent-and-selector"),
        pytest.param(GOOD_SPEC.replace("  agent: web-01\n", ""),
                     "exactly one of spec.agent and spec.agentSelector", id="neither-agent-nor-selector"),
        pytest.param(GOOD_SPEC.replace("backup: {paths: [/etc]}", "backup: {paths: []}"),
                     "spec.template.backup.paths", id="backup-with-empty-paths"),
        pytest.param(GOOD_SPEC.replace("backup: {paths: [/etc]}", "backup: {tags: [x]}"),
                     "spec.template.backup.paths", id="backup-without-paths"),
        pytest.param(GOOD_SPEC.replace("    backup: {paths: [/etc]}\n", ""),
                     "spec.template.backup", id="backup-without-block"),
        pytest.param(GOOD_SPEC.replace("type: backup", "type: snapshot"),
                     "spec.template.type", id="unknown-type"),
        pytest.param(GOOD_SPEC.replace("type: backup", "type: check"),
                     "spec.template.backup", id="block-of-other-type"),
        pytest.param(GOOD_SPEC.replace("type: backup\n    backup: {paths: [/etc]}", "type: forget\n    forget: {prune: true}"),
                     "forget needs at least one keep rule", id="forget-without-policy"),
        pytest.param(GOOD_SPEC.replace("agent: web-01", "agent: Web_01"), "spec.agent", id="agent-not-a-name"),
        pytest.param(GOOD_SPEC + "  concurrencyPolicy: Sometimes\n",
                     "spec.concurrencyPolicy", id="bad-concurrency-policy"),
        pytest.param(GOOD_SPEC + "  notifications: [{type: email, urlSecretRef: {name: hooks, key: url}}]\n",
                     "spec.notifications[0].type", id="unknown-notification-type"),
        pytest.param(GOOD_SPEC + "  notifications: [{type: slack, urlSecretRef: {name: hooks}}]\n",
                     "spec.notifications[0].urlSecretRef.key", id="notification-without-key"),
        pytest.param(GOOD_SPEC + "  notifications: [{type: slack, urlSecretRef: {name: h, key: u}, when: [done]}]\n",
                     "spec.notifications[0].when[0]", id="unknown-notification-kind"),
    ],
)
def test_invalid_schedule_is_refused_naming_the_field(kube, namespace: str, spec: str, expected: str) -> None:
    result = apply(kube, namespace, SCHEDULE.format(name="bad", spec=spec), check=False)
    assert result.returncode != 0
    assert expected in result.stderr, result.stderr


def test_resticjob_spec_is_immutable(kube, namespace: str) -> None:
    job = """
apiVersion: resticmanager.io/v1alpha1
kind: ResticJob
metadata: {name: once}
spec: {agent: web-01, repository: offsite, type: backup, backup: {paths: [%s]}}
"""
    apply(kube, namespace, job % "/etc")
    result = apply(kube, namespace, job % "/home", check=False)
    assert result.returncode != 0
    assert "spec is immutable" in result.stderr


def test_deleting_a_schedule_garbage_collects_its_resticjobs(kube, namespace: str) -> None:
    apply(kube, namespace, SCHEDULE.format(name="nightly", spec=GOOD_SPEC))
    owner = get(kube, namespace, "schedule", "nightly")["metadata"]
    apply(kube, namespace, f"""
apiVersion: resticmanager.io/v1alpha1
kind: ResticJob
metadata:
  name: nightly-web-01-29012345
  ownerReferences:
  - {{apiVersion: resticmanager.io/v1alpha1, kind: Schedule, name: nightly, uid: {owner['uid']}, controller: true, blockOwnerDeletion: true}}
spec:
  agent: web-01
  repository: offsite
  type: backup
  backup: {{paths: [/etc]}}
  scheduleRef: {{name: nightly, uid: {owner['uid']}}}
  scheduledAt: "2025-02-28T02:00:00Z"
""")
    kube.kubectl("-n", namespace, "delete", "schedule", "nightly")
    # The garbage collector works asynchronously; wait for the dependent to go.
    result = kube.kubectl("-n", namespace, "wait", "--for=delete", "resticjob/nightly-web-01-29012345",
                          "--timeout=60s", check=False)
    assert result.returncode == 0, result.stderr
    assert kube.kubectl("-n", namespace, "get", "resticjob", "nightly-web-01-29012345", check=False).returncode != 0


def test_printer_columns_show_schedule_state(kube, namespace: str) -> None:
    apply(kube, namespace, SCHEDULE.format(name="nightly", spec=GOOD_SPEC))
    kube.kubectl("-n", namespace, "patch", "schedule", "nightly", "--subresource=status", "--type=merge", "-p",
                 json.dumps({"status": {
                     "conditions": [{"type": "Applied", "status": "True", "reason": "AllAgentsAcked",
                                     "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"},
                                    {"type": "Healthy", "status": "False", "reason": "Overdue",
                                     "message": "web-02: ...", "lastTransitionTime": "2026-01-01T00:00:00Z"}],
                     "nextFireTime": "2026-01-02T02:00:00Z", "healthyAgents": "1/2"}}))
    header, row = kube.kubectl("-n", namespace, "get", "rsched", "nightly").stdout.splitlines()
    assert header.split() == ["NAME", "SCHEDULE", "SUSPEND", "APPLIED", "HEALTHY", "LAST", "SCHEDULE", "LAST",
                              "SUCCESS", "AGE"]
    assert row.split()[:7] == ["nightly", "0", "2", "*", "*", "*", "false"]
    assert row.split()[7:9] == ["True", "False"]
    header, row = kube.kubectl("-n", namespace, "get", "rsched", "nightly", "-o", "wide").stdout.splitlines()
    assert header.split()[-7:] == ["AGE", "TIME", "ZONE", "NEXT", "FIRE", "HEALTHY", "AGENTS"]
    assert row.split()[-3:] == ["UTC", "2026-01-02T02:00:00Z", "1/2"]


def test_printer_columns_show_a_jobs_progress_as_a_whole_percent_and_its_snapshot_by_short_id(
        kube, namespace: str) -> None:
    apply(kube, namespace, """
apiVersion: resticmanager.io/v1alpha1
kind: ResticJob
metadata: {name: by-hand}
spec: {agent: web-01, repository: offsite, type: backup, backup: {paths: [/etc]}}
""")
    snapshot = "4e2a7c1f" + "9b" * 28
    kube.kubectl("-n", namespace, "patch", "resticjob", "by-hand", "--subresource=status", "--type=merge", "-p",
                 json.dumps({"status": {"phase": "Running", "progress": {"percentDone": 42.73, "percent": 42},
                                        "summary": {"snapshotId": snapshot, "shortId": snapshot[:8]}}}))
    header, row = kube.kubectl("-n", namespace, "get", "rjob", "by-hand", "-o", "wide").stdout.splitlines()
    assert header.split() == ["NAME", "AGENT", "TYPE", "PHASE", "PROGRESS", "SNAPSHOT", "SCHEDULED", "AGE"]
    assert row.split()[:6] == ["by-hand", "web-01", "backup", "Running", "42", "4e2a7c1f"]
    assert get(kube, namespace, "resticjob", "by-hand")["status"]["summary"]["snapshotId"] == snapshot


def test_explain_documents_fields(kube) -> None:
    out = kube.kubectl("explain", "schedules.spec.concurrencyPolicy").stdout
    assert "Forbid skips the new one" in out
    out = kube.kubectl("explain", "resticjobs.status.summary.snapshotId").stdout
    assert "snapshot written" in out
    # How a job that ran too long ends, where a user looks for it.
    for field in ("resticjobs.spec.timeoutSeconds", "resticjobs.status.reason"):
        assert "Timeout" in " ".join(kube.kubectl("explain", field).stdout.split()), field


def test_wait_for_condition_works_on_schedules(kube, namespace: str) -> None:
    apply(kube, namespace, SCHEDULE.format(name="nightly", spec=GOOD_SPEC))
    kube.kubectl("-n", namespace, "patch", "schedule", "nightly", "--subresource=status", "--type=merge", "-p",
                 json.dumps({"status": {"conditions": [{"type": "Applied", "status": "True", "reason": "AllAgentsAcked",
                                                        "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}}))
    result = kube.kubectl("-n", namespace, "wait", "--for=condition=Applied", "schedule/nightly", "--timeout=30s", check=False)
    assert result.returncode == 0, result.stderr


def test_the_examples_are_accepted(kube, namespace: str) -> None:
    examples = REPO / "deploy" / "examples"
    result = kube.kubectl("-n", namespace, "apply", "--dry-run=server", "-f", str(examples))
    assert sorted(line.split()[0] for line in result.stdout.splitlines()) == [
        "agent.resticmanager.io/demo-host", "repository.resticmanager.io/local",
        "schedule.resticmanager.io/every-20s", "secret/demo-repo-password",
    ]
