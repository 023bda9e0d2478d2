"""What the operator refused, counted by reason, and served as Prometheus text on /metrics.

Every refusal is also logged with its reason; the counters are what an alert or a test
reads. They are served on their own address (``--metrics-listen``), never on the agents'
port, which may face networks that should not learn how often, and why, the operator says no.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass
class Metrics:
    handshakes_refused: collections.Counter[str] = field(default_factory=collections.Counter)
    frames_refused: collections.Counter[str] = field(default_factory=collections.Counter)
    fires_refused: collections.Counter[str] = field(default_factory=collections.Counter)
    fires_retried: collections.Counter[str] = field(default_factory=collections.Counter)

    def exposition(self) -> str:
        """The counters in the Prometheus text format."""
        families = (
            ("restic_manager_agent_handshakes_refused_total", "Agent connections refused before a session began.",
             self.handshakes_refused),
            ("restic_manager_agent_frames_refused_total", "Agent frames refused: invalid, rate-limited or forbidden.",
             self.frames_refused),
            ("restic_manager_fires_refused_total", "schedule.fire messages not honoured, by reason.",
             self.fires_refused),
            ("restic_manager_fires_retried_total",
             "schedule.fire messages answered with retry (not decided now; the agent sends them again).",
             self.fires_retried),
        )
        lines = []
        for name, text, counter in families:
            lines += [f"# HELP {name} {text}", f"# TYPE {name} counter"]
            lines += [f'{name}{{reason="{_label(reason)}"}} {count}' for reason, count in sorted(counter.items())]
        return "\n".join(lines) + "\n"


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


async def serve(metrics: Metrics, host: str, port: int, *, started: Callable[[int], None] | None = None) -> None:
    """Serve ``GET /metrics`` until cancelled."""

    async def exposition(_: web.Request) -> web.Response:
        return web.Response(body=metrics.exposition().encode(), headers={"Content-Type": CONTENT_TYPE})

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
