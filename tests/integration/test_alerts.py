"""The chart's alerts (prometheusRule, podMonitor) and dashboard, checked by the pinned
promtool: the rendered PrometheusRule passes `promtool check rules`, every alert fires on
input series where it should and stays silent where it should not (`promtool test rules`),
and every query of the Grafana dashboard parses and names a metric the operator exposes.

The series are the operator's metrics as docs/monitoring.md lists them; promtool's clock
starts at 0, so a timestamp gauge's value is the minute it stands for × 60.
"""

from __future__ import annotations

import json
import re
import subprocess
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from restic_manager.operator.metrics import Metrics, ScheduleOnAgent, View
from restic_manager.operator.notify import Notifier
from support.operator_fakes import FakeEvents, FakeSecrets

from integration.test_deploy import CHART, Helm, documents, helm  # noqa: F401 (helm is a fixture)

pytestmark = pytest.mark.promtool

# What the operator exposes (docs/monitoring.md); a query naming anything else has a typo.
OPERATOR_METRICS = {
    "restic_manager_schedule_last_success_timestamp_seconds",
    "restic_manager_schedule_last_attempt_timestamp_seconds",
    "restic_manager_schedule_last_duration_seconds",
    "restic_manager_backup_last_added_bytes",
    "restic_manager_backup_last_files",
    "restic_manager_schedule_agent_healthy",
    "restic_manager_schedule_interval_seconds",
    "restic_manager_jobs_finished_total",
    "restic_manager_fire_lag_seconds_bucket",
    "restic_manager_fire_lag_seconds_sum",
    "restic_manager_fire_lag_seconds_count",
    "restic_manager_fires_refused_total",
    "restic_manager_agent_connected",
    "restic_manager_repository_check_success",
    "restic_manager_repository_last_check_timestamp_seconds",
    "restic_manager_notifications_total",
}


def test_the_operator_exposes_the_metrics_the_alerts_and_the_dashboard_read() -> None:
    now = datetime.now(UTC)
    view = View(schedules=[ScheduleOnAgent("backups", "nightly", "web-1", True, now, now, 1.0, 2, 3)],
                intervals=[("backups", "nightly", 86400.0)], agents=[("backups", "web-1", True)],
                checks=[("backups", "s3", True, now)])
    metrics = Metrics(view=lambda: view)
    # The notifier registers its counter on the operator's registry (Controller does the same).
    Notifier(FakeSecrets(), clock=lambda: now, registry=metrics.registry, events=FakeEvents())
    metrics.fire_lag.observe(0.2)
    metrics.fires_refused["MissedSchedule"] += 1
    metrics.jobs_finished["backups", "backup", "Succeeded", "Completed"] += 1
    exposed = {sample.name for family in text_string_to_metric_families(metrics.exposition().decode())
               for sample in family.samples}
    assert OPERATOR_METRICS <= exposed, sorted(OPERATOR_METRICS - exposed)


def promtool(binary: Path, *args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(binary), *map(str, args)], capture_output=True, text=True)


def render(helm: Helm, *settings: str) -> list[dict[str, Any]]:
    args = [arg for setting in settings for arg in ("--set", setting)]
    return documents(helm("template", "r", CHART, "--namespace", "backup", *args).stdout)


def rule_groups(helm: Helm, *settings: str) -> list[dict[str, Any]]:
    """The rule groups of the chart's PrometheusRule, rendered with prometheusRule.enabled."""
    (rule,) = [doc for doc in render(helm, "prometheusRule.enabled=true", *settings)
               if doc["kind"] == "PrometheusRule"]
    groups: list[dict[str, Any]] = rule["spec"]["groups"]
    return groups


def alerts(groups: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {rule["alert"]: rule for group in groups for rule in group["rules"] if "alert" in rule}


def write_rules(path: Path, groups: list[dict[str, Any]]) -> Path:
    path.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    return path


# --- what each alert must do -------------------------------------------------------------


def series(name: str, values: str, **labels: str) -> dict[str, str]:
    selector = ", ".join(f'{key}="{value}"' for key, value in labels.items())
    return {"series": f"{name}{{{selector}}}", "values": values}


def fired(severity: str, **labels: str) -> dict[str, str]:
    return {"severity": severity, **labels}


@dataclass(frozen=True)
class Case:
    """Input series and, at each evaluation time, the alerts (their labels) firing then:
    an empty list is a time at which the alert must be silent."""

    alert: str
    behaviour: str
    input_series: list[dict[str, str]]
    expected: dict[str, list[dict[str, str]]] = field(default_factory=dict)

    def promtool_group(self) -> dict[str, Any]:
        return {
            "name": f"{self.alert}: {self.behaviour}",
            "interval": "1m",
            "input_series": self.input_series,
            "alert_rule_test": [
                {"eval_time": at, "alertname": self.alert,
                 "exp_alerts": [{"exp_labels": labels} for labels in firing]}
                for at, firing in self.expected.items()
            ],
        }


HOURLY = {"namespace": "backups", "schedule": "hourly"}
NIGHTLY = {"namespace": "backups", "schedule": "nightly"}

CASES = [
    Case("ResticManagerScheduleNoRecentSuccess",
         "a host that stopped backing up is alerted after three intervals; the host beside it on the "
         "same Schedule, and the stopped host on a daily Schedule, are not",
         [series("restic_manager_schedule_interval_seconds", "3600x600", **HOURLY),
          # web-1 succeeds all the time; db-1's last success was at 2h.
          series("restic_manager_schedule_last_success_timestamp_seconds", "0+60x600", **HOURLY, agent="web-1"),
          series("restic_manager_schedule_last_success_timestamp_seconds", "0+60x120 7200x480", **HOURLY, agent="db-1"),
          series("restic_manager_schedule_interval_seconds", "86400x600", namespace="backups", schedule="daily"),
          series("restic_manager_schedule_last_success_timestamp_seconds", "0x600",
                 namespace="backups", schedule="daily", agent="db-1")],
         {"4h": [],  # two hours without a success: less than three intervals
          "5h5m": [],  # past three intervals, not yet for 10m
          "5h15m": [fired("critical", **HOURLY, agent="db-1")],
          "10h": [fired("critical", **HOURLY, agent="db-1")]}),
    Case("ResticManagerScheduleUnhealthy",
         "an agent the operator counts unhealthy for 15 minutes; the healthy one beside it is not",
         [series("restic_manager_schedule_agent_healthy", "1x60", **NIGHTLY, agent="web-1"),
          series("restic_manager_schedule_agent_healthy", "1x10 0x50", **NIGHTLY, agent="db-1")],
         {"20m": [],  # unhealthy for 9 minutes only
          "40m": [fired("warning", **NIGHTLY, agent="db-1")]}),
    Case("ResticManagerScheduleLastRunFailed",
         "a last run newer than the last success, and runs without any success, are alerted",
         [series("restic_manager_schedule_last_attempt_timestamp_seconds", "600x30", **NIGHTLY, agent="web-1"),
          series("restic_manager_schedule_last_success_timestamp_seconds", "600x30", **NIGHTLY, agent="web-1"),
          series("restic_manager_schedule_last_attempt_timestamp_seconds", "1200x30", **NIGHTLY, agent="db-1"),
          series("restic_manager_schedule_last_success_timestamp_seconds", "600x30", **NIGHTLY, agent="db-1"),
          series("restic_manager_schedule_last_attempt_timestamp_seconds", "900x30", **NIGHTLY, agent="new-1")],
         {"25m": [fired("warning", **NIGHTLY, agent="db-1"), fired("warning", **NIGHTLY, agent="new-1")]}),
    Case("ResticManagerScheduleLastRunFailed",
         "the alert ends when the next run succeeds",
         [series("restic_manager_schedule_last_attempt_timestamp_seconds", "1200x10 1800x20", **NIGHTLY, agent="db-1"),
          series("restic_manager_schedule_last_success_timestamp_seconds", "600x10 1800x20", **NIGHTLY, agent="db-1")],
         {"5m": [fired("warning", **NIGHTLY, agent="db-1")],
          "20m": []}),
    Case("ResticManagerAgentDisconnected",
         "an agent disconnected for 10 minutes; the connected one is not",
         [series("restic_manager_agent_connected", "1x60", namespace="backups", agent="web-1"),
          series("restic_manager_agent_connected", "1x5 0x55", namespace="backups", agent="db-1")],
         {"10m": [],  # gone for 4 minutes: a restart, not yet an alert
          "30m": [fired("warning", namespace="backups", agent="db-1")]}),
    Case("ResticManagerRepositoryCheckFailed",
         "a repository whose last check failed; the one whose check passed is not",
         [series("restic_manager_repository_check_success", "1x30", namespace="backups", repository="s3"),
          series("restic_manager_repository_check_success", "1x10 0x20", namespace="backups", repository="local")],
         {"5m": [],
          "20m": [fired("critical", namespace="backups", repository="local")]}),
    Case("ResticManagerNotificationsFailing",
         "a notification type failing once every 5 minutes for 15 minutes; the type whose notifications "
         "are sent is not",
         [series("restic_manager_notifications_total", "0+2x90", type="webhook", result="sent"),
          series("restic_manager_notifications_total", "0x90", type="webhook", result="failed"),
          series("restic_manager_notifications_total", "0x90", type="email", result="sent"),
          series("restic_manager_notifications_total", "0x10 " + " ".join(f"{n}x4" for n in range(1, 17)),
                 type="email", result="failed")],
         {"20m": [],  # failing for 9 minutes
          "40m": [fired("warning", type="email")]}),
    Case("ResticManagerFireLagHigh",
         "fires 31 seconds late on average for 15 minutes",
         [series("restic_manager_fire_lag_seconds_sum", "0+62x60"),
          series("restic_manager_fire_lag_seconds_count", "0+2x60")],
         {"10m": [], "40m": [fired("warning")]}),
    Case("ResticManagerFireLagHigh",
         "fires 29 seconds late on average are not alerted",
         [series("restic_manager_fire_lag_seconds_sum", "0+58x60"),
          series("restic_manager_fire_lag_seconds_count", "0+2x60")],
         {"40m": []}),
]


def unit_tests(path: Path, rules: Path, cases: list[Case]) -> Path:
    path.write_text(yaml.safe_dump({
        "rule_files": [str(rules)],
        "evaluation_interval": "1m",
        "tests": [case.promtool_group() for case in cases],
    }, sort_keys=False))
    return path


def without_annotations(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rules with their annotations dropped: promtool compares an alert's annotations
    whole, and the cases check expressions, durations and labels."""
    return [{**group, "rules": [{key: value for key, value in rule.items() if key != "annotations"}
                                for rule in group["rules"]]} for group in groups]


# --- the rules -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def groups(helm: Helm) -> list[dict[str, Any]]:
    return rule_groups(helm)


def test_prometheus_rule_podmonitor_and_dashboard_are_off_by_default(helm: Helm) -> None:
    kinds = {(doc["kind"], doc["metadata"]["name"]) for doc in render(helm)}
    assert not {kind for kind, _ in kinds} & {"PrometheusRule", "PodMonitor", "ConfigMap"}


def test_the_rendered_rules_pass_promtool_check(promtool_bin: Path, groups: list[dict[str, Any]],
                                                tmp_path: Path) -> None:
    result = promtool(promtool_bin, "check", "rules", write_rules(tmp_path / "rules.yaml", groups))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alerts(groups))} rules found" in result.stdout
    for name, rule in alerts(groups).items():
        named = set(re.findall(r"\brestic_manager_\w+", rule["expr"]))
        assert named <= OPERATOR_METRICS, f"{name}: {sorted(named - OPERATOR_METRICS)} is not exposed"


def test_every_alert_fires_when_it_should_and_stays_silent_when_it_should_not(
        promtool_bin: Path, groups: list[dict[str, Any]], tmp_path: Path) -> None:
    names = set(alerts(groups))
    assert {case.alert for case in CASES} == names
    for name in names:
        outcomes = [firing for case in CASES if case.alert == name for firing in case.expected.values()]
        assert any(outcomes) and not all(outcomes), f"{name} needs a case where it fires and one where it is silent"
    rules = write_rules(tmp_path / "rules.yaml", without_annotations(groups))
    result = promtool(promtool_bin, "test", "rules", unit_tests(tmp_path / "tests.yaml", rules, CASES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_missed_intervals_and_durations_are_values(promtool_bin: Path, helm: Helm, tmp_path: Path) -> None:
    """With missedIntervals 2 and no `for`, the host whose last success was at 2h is alerted from 4h on."""
    groups = rule_groups(helm, "prometheusRule.missedIntervals=2", "prometheusRule.for.noRecentSuccess=0m")
    assert alerts(groups)["ResticManagerScheduleNoRecentSuccess"]["for"] == "0m"
    (stopped,) = [case for case in CASES if case.alert == "ResticManagerScheduleNoRecentSuccess"]
    case = Case(stopped.alert, "earlier with missedIntervals=2", stopped.input_series,
                {"3h59m": [], "4h1m": [fired("critical", **HOURLY, agent="db-1")]})
    rules = write_rules(tmp_path / "rules.yaml", without_annotations(groups))
    result = promtool(promtool_bin, "test", "rules", unit_tests(tmp_path / "tests.yaml", rules, [case]))
    assert result.returncode == 0, result.stdout + result.stderr


def test_an_alert_says_what_failed_where_and_what_to_run_first(
        promtool_bin: Path, groups: list[dict[str, Any]], tmp_path: Path) -> None:
    for name, rule in alerts(groups).items():
        annotations = rule["annotations"]
        assert set(annotations) == {"summary", "description"}, name
        assert "kubectl" in annotations["description"], f"{name}: the description names no first command"
        # Every label an annotation names is one the alert carries.
        carried = {label for case in CASES if case.alert == name
                   for firing in case.expected.values() for labels in firing for label in labels}
        named = set(re.findall(r"\$labels\.(\w+)", annotations["summary"] + annotations["description"]))
        assert named <= carried, f"{name} names labels it does not carry: {sorted(named - carried)}"

    stopped = Case("ResticManagerScheduleNoRecentSuccess", "as the on-call engineer reads it",
                   CASES[0].input_series, {"10h": []})
    group = stopped.promtool_group()
    group["alert_rule_test"][0]["exp_alerts"] = [{
        "exp_labels": fired("critical", **HOURLY, agent="db-1"),
        "exp_annotations": {
            "summary": "Schedule backups/hourly last succeeded on agent db-1 8h 0m 0s ago",
            "description": (
                "The last successful ResticJob of Schedule backups/hourly on agent db-1 ended 8h 0m 0s ago, "
                "more than 3 times the Schedule's interval: its runs on that host stopped succeeding, or "
                "stopped happening. First look at the Schedule and the agent: "
                "kubectl -n backups describe rsched hourly; kubectl -n backups get ragent db-1 (is it Connected?); "
                "then its jobs, newest last: kubectl -n backups get rjob -l "
                "resticmanager.io/schedule=hourly,resticmanager.io/agent=db-1 --sort-by=.metadata.creationTimestamp, "
                "and kubectl -n backups describe rjob NAME for the newest one's reason, message and log tail."),
        },
    }]
    rules = write_rules(tmp_path / "rules.yaml", groups)
    tests = tmp_path / "tests.yaml"
    tests.write_text(yaml.safe_dump({"rule_files": [str(rules)], "evaluation_interval": "1m", "tests": [group]}))
    result = promtool(promtool_bin, "test", "rules", tests)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_prometheus_rule_carries_the_labels_its_prometheus_selects(helm: Helm) -> None:
    (rule,) = [doc for doc in render(helm, "prometheusRule.enabled=true", "prometheusRule.labels.release=kps")
               if doc["kind"] == "PrometheusRule"]
    assert rule["metadata"]["labels"]["release"] == "kps"
    assert rule["metadata"]["namespace"] == "backup"


def test_the_pod_monitor_scrapes_the_operator_and_keeps_the_metrics_namespace_label(helm: Helm) -> None:
    objects = render(helm, "podMonitor.enabled=true", "podMonitor.interval=30s")
    (monitor,) = [doc for doc in objects if doc["kind"] == "PodMonitor"]
    (deployment,) = [doc for doc in objects if doc["kind"] == "Deployment"]
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint == {"port": "metrics", "path": "/metrics", "honorLabels": True, "interval": "30s"}
    pod = deployment["spec"]["template"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    (container,) = pod["spec"]["containers"]
    assert "metrics" in {port["name"] for port in container["ports"]}
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["backup"]}


# --- the dashboard -------------------------------------------------------------------------

DASHBOARD = CHART / "dashboards" / "restic-manager.json"


def dashboard_panels(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [p for panel in panels for p in (panel, *dashboard_panels(panel.get("panels", [])))]


def dashboard_queries(dashboard: dict[str, Any]) -> dict[str, str]:
    """Every PromQL expression of the dashboard, by where it is: panel targets and the
    templating variables' label_values() selectors."""
    queries = {f"panel {panel['title']!r} {target['refId']}": target["expr"]
               for panel in dashboard_panels(dashboard["panels"]) for target in panel.get("targets", [])}
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            match = re.fullmatch(r"label_values\((.*), *(\w+)\)", variable["query"]["query"])
            assert match, f"variable {variable['name']}: not a label_values() query"
            queries[f"variable {variable['name']}"] = match[1]
    return queries


# What Grafana puts in place of its variables before the query reaches Prometheus.
GRAFANA_BUILTINS = {"__rate_interval": "4m", "__interval": "1m", "__range": "1d"}


def test_every_dashboard_query_parses_and_names_an_operator_metric(promtool_bin: Path, tmp_path: Path) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {variable["name"] for variable in dashboard["templating"]["list"]}
    assert {"namespace", "schedule", "agent"} <= variables
    queries = dashboard_queries(dashboard)
    rules = []
    for where, expr in queries.items():
        used = set(re.findall(r"\$(\w+)", expr))
        assert used <= variables | set(GRAFANA_BUILTINS), f"{where}: undefined variables {used - variables}"
        substituted = re.sub(r"\$(\w+)", lambda m: GRAFANA_BUILTINS.get(m[1], ".*"), expr)
        names = set(re.findall(r"\brestic_manager_\w+", substituted))
        assert names and names <= OPERATOR_METRICS, f"{where}: {sorted(names - OPERATOR_METRICS)} is not exposed"
        rules.append({"record": f"dashboard:query_{len(rules)}", "expr": substituted})
    path = write_rules(tmp_path / "dashboard.yaml", [{"name": "dashboard", "rules": rules}])
    result = promtool(promtool_bin, "check", "rules", path)
    where = [f"dashboard:query_{n} is {place}" for n, place in enumerate(queries)]
    assert result.returncode == 0, "\n".join([result.stdout, result.stderr, *where])
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout


# Metrics with a namespace label, and those of them with a schedule label too.
NAMESPACED = OPERATOR_METRICS - {"restic_manager_fire_lag_seconds_bucket", "restic_manager_fire_lag_seconds_sum",
                                 "restic_manager_fire_lag_seconds_count", "restic_manager_fires_refused_total",
                                 "restic_manager_notifications_total"}
PER_SCHEDULE = {name for name in NAMESPACED if name.startswith(("restic_manager_schedule_", "restic_manager_backup_"))}


def test_every_dashboard_panel_follows_the_data_source_namespace_and_schedule_chosen() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard_panels(dashboard["panels"]):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"], panel["title"]
            for name, selector in re.findall(r"\b(restic_manager_\w+)(?:\{([^}]*)\})?", target["expr"]):
                if name in NAMESPACED:
                    assert 'namespace=~"$namespace"' in selector, f"{panel['title']}: {name}"
                if name in PER_SCHEDULE:
                    assert 'schedule=~"$schedule"' in selector, f"{panel['title']}: {name}"


def test_the_dashboard_configmap_holds_the_dashboard_for_grafanas_sidecar(helm: Helm) -> None:
    objects = render(helm, "dashboard.enabled=true", "dashboard.annotations.grafana_folder=Backups")
    (configmap,) = [doc for doc in objects if doc["kind"] == "ConfigMap"]
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert configmap["metadata"]["annotations"] == {"grafana_folder": "Backups"}
    assert json.loads(configmap["data"]["restic-manager.json"]) == json.loads(DASHBOARD.read_text())
