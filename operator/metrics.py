"""The operator's metrics, served as Prometheus text on /metrics by prometheus_client, with
the process's and its garbage collector's.

Counters of what the operator refused and of how jobs ended, by reason; a histogram of fire
lag; and gauges of every Schedule's health on every agent it targets, of the Agents'
connections and of Repositories' integrity checks. The gauges are read from the operator's
view at each scrape (:attr:`Metrics.view`), so a deleted object's series go with it. Every
family is listed in docs/deployment.md ("Metrics"). They are served on their own address
(``--metrics-listen``), never on the agents' port, which may face networks that should not
learn how often, and why, the operator says no.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST, CollectorRegistry, GCCollector, Histogram, PlatformCollector, ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

# (family, attribute of Metrics, help): one counter family labelled by reason each.
FAMILIES = (
    ("restic_manager_agent_handshakes_refused", "handshakes_refused",
     "Agent connections refused before a session began."),
    ("restic_manager_agent_frames_refused", "frames_refused", "Agent frames refused: invalid, rate-limited or forbidden."),
    ("restic_manager_fires_refused", "fires_refused", "schedule.fire messages not honoured (refused or missed), by reason."),
    ("restic_manager_fires_retried", "fires_retried",
     "schedule.fire messages answered with retry (not decided now; the agent sends them again)."),
)
# From a second to a day: a fire caught up after an outage is hours late, and counted so.
FIRE_LAG_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 21600.0, 86400.0)


@dataclass(frozen=True)
class ScheduleOnAgent:
    """One Schedule on one agent it targets, as the gauges show it."""

    namespace: str
    schedule: str
    agent: str
    healthy: bool
    last_success: datetime | None = None
    last_attempt: datetime | None = None
    last_duration: float | None = None
    added_bytes: int | None = None  # of the last successful backup
    files: int | None = None


@dataclass(frozen=True)
class View:
    """What the gauges show, as the operator sees it at a scrape."""

    schedules: list[ScheduleOnAgent] = field(default_factory=list)
    intervals: list[tuple[str, str, float]] = field(default_factory=list)  # namespace, Schedule, seconds
    agents: list[tuple[str, str, bool]] = field(default_factory=list)  # namespace, Agent, connected
    checks: list[tuple[str, str, bool, datetime]] = field(default_factory=list)  # namespace, Repository, passed, when


def view_families(view: View) -> Iterator[Metric]:
    """The gauge families of ``view``."""
    labels = ["namespace", "schedule", "agent"]
    per_agent = {
        name: GaugeMetricFamily(name, text, labels=labels) for name, text in (
            ("restic_manager_schedule_agent_healthy",
             "1 when the Schedule's runs on the agent are healthy (the Healthy condition), else 0."),
            ("restic_manager_schedule_last_success_timestamp_seconds",
             "When the Schedule's last successful job on the agent ended (Unix time)."),
            ("restic_manager_schedule_last_attempt_timestamp_seconds",
             "When the Schedule's last job on the agent ended, whatever its outcome (Unix time)."),
            ("restic_manager_schedule_last_duration_seconds", "How long the Schedule's last job on the agent ran."),
            ("restic_manager_backup_last_added_bytes", "Bytes the last successful backup added to the repository."),
            ("restic_manager_backup_last_files", "Files the last successful backup processed."),
        )
    }
    for row in view.schedules:
        key = [row.namespace, row.schedule, row.agent]
        values = (
            ("restic_manager_schedule_agent_healthy", float(row.healthy)),
            ("restic_manager_schedule_last_success_timestamp_seconds",
             row.last_success.timestamp() if row.last_success else None),
            ("restic_manager_schedule_last_attempt_timestamp_seconds",
             row.last_attempt.timestamp() if row.last_attempt else None),
            ("restic_manager_schedule_last_duration_seconds", row.last_duration),
            ("restic_manager_backup_last_added_bytes", row.added_bytes),
            ("restic_manager_backup_last_files", row.files),
        )
        for name, value in values:
            if value is not None:
                per_agent[name].add_metric(key, float(value))
    yield from per_agent.values()
    interval = GaugeMetricFamily("restic_manager_schedule_interval_seconds",
                                 "Seconds between the Schedule's next two fire times.", labels=["namespace", "schedule"])
    for namespace, schedule, seconds in view.intervals:
        interval.add_metric([namespace, schedule], seconds)
    yield interval
    connected = GaugeMetricFamily("restic_manager_agent_connected", "1 while the Agent is connected, else 0.",
                                  labels=["namespace", "agent"])
    for namespace, agent, up in view.agents:
        connected.add_metric([namespace, agent], float(up))
    yield connected
    passed = GaugeMetricFamily("restic_manager_repository_check_success",
                               "1 when the Repository's last check job passed, 0 when it found errors or failed.",
                               labels=["namespace", "repository"])
    checked = GaugeMetricFamily("restic_manager_repository_last_check_timestamp_seconds",
                                "When the Repository's last check job ended (Unix time).",
                                labels=["namespace", "repository"])
    for namespace, repository, ok, when in view.checks:
        passed.add_metric([namespace, repository], float(ok))
        checked.add_metric([namespace, repository], when.timestamp())
    yield passed
    yield checked


@dataclass(eq=False)
class Metrics:
    """The counters, as plain Counters the code and the tests read; the fire-lag histogram; the
    operator's ``view`` for the gauges; and a prometheus_client registry that renders them at
    each scrape, with the process and garbage-collector metrics."""

    handshakes_refused: collections.Counter[str] = field(default_factory=collections.Counter)
    frames_refused: collections.Counter[str] = field(default_factory=collections.Counter)
    fires_refused: collections.Counter[str] = field(default_factory=collections.Counter)
    fires_retried: collections.Counter[str] = field(default_factory=collections.Counter)
    # By (namespace, type, outcome, reason): ResticJobs this operator saw end.
    jobs_finished: collections.Counter[tuple[str, str, str, str]] = field(default_factory=collections.Counter)
    view: Callable[[], View] = View
    registry: CollectorRegistry = field(default_factory=CollectorRegistry, repr=False)

    def __post_init__(self) -> None:
        self.fire_lag = Histogram("restic_manager_fire_lag_seconds",
                                  "From a fire's scheduled time to its ResticJob's creation.",
                                  buckets=FIRE_LAG_BUCKETS, registry=self.registry)
        self.registry.register(self)
        ProcessCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)

    def collect(self) -> Iterator[Metric]:
        for name, attribute, text in FAMILIES:
            family = CounterMetricFamily(name, text, labels=["reason"])
            for reason, count in sorted(getattr(self, attribute).items()):
                family.add_metric([reason], count)
            yield family
        finished = CounterMetricFamily("restic_manager_jobs_finished", "ResticJobs that ended, by outcome and reason.",
                                       labels=["namespace", "type", "outcome", "reason"])
        for labels, count in sorted(self.jobs_finished.items()):
            finished.add_metric(list(labels), count)
        yield finished
        yield from view_families(self.view())

    def exposition(self) -> bytes:
        """Every metric in the Prometheus text format."""
        return generate_latest(self.registry)


async def serve(metrics: Metrics, host: str, port: int, *, started: Callable[[int], None] | None = None) -> None:
    """Serve ``GET /metrics`` until cancelled."""

    async def exposition(_: web.Request) -> web.Response:
        return web.Response(body=metrics.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/metrics", exposition)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        if started is not None:
            started(runner.addresses[0][1])
        await asyncio.Future()  # until cancelled
    finally:
        await runner.cleanup()
