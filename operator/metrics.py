"""What the operator refused, counted by reason, and served as Prometheus text on /metrics
by prometheus_client, with the process's and its garbage collector's metrics.

Every refusal is also logged with its reason; the counters are what an alert or a test
reads. They are served on their own address (``--metrics-listen``), never on the agents'
port, which may face networks that should not learn how often, and why, the operator says no.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST, CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector, generate_latest,
)
from prometheus_client.core import CounterMetricFamily, Metric

# (family, attribute of Metrics, help): one counter family labelled by reason each.
FAMILIES = (
    ("restic_manager_agent_handshakes_refused", "handshakes_refused",
     "Agent connections refused before a session began."),
    ("restic_manager_agent_frames_refused", "frames_refused", "Agent frames refused: invalid, rate-limited or forbidden."),
    ("restic_manager_fires_refused", "fires_refused", "schedule.fire messages not honoured, by reason."),
    ("restic_manager_fires_retried", "fires_retried",
     "schedule.fire messages answered with retry (not decided now; the agent sends them again)."),
)


@dataclass(eq=False)
class Metrics:
    """The counters, as plain Counters the code and the tests read, and a prometheus_client
    registry that renders them at each scrape, with the process and garbage-collector metrics."""

    handshakes_refused: collections.Counter[str] = field(default_factory=collections.Counter)
    frames_refused: collections.Counter[str] = field(default_factory=collections.Counter)
    fires_refused: collections.Counter[str] = field(default_factory=collections.Counter)
    fires_retried: collections.Counter[str] = field(default_factory=collections.Counter)
    registry: CollectorRegistry = field(default_factory=CollectorRegistry, repr=False)

    def __post_init__(self) -> None:
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
