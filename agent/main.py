"""`restic-manager agent`: command-line options and the process's top-level lifecycle."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import signal
import socket
import ssl
import sys
from typing import Protocol

from restic_manager.agent import config
from restic_manager.agent.connection import Connection, Endpoint, Identity
from restic_manager.agent.runner import JobRunner, ResticUnavailable, interrupted, restic_version
from restic_manager.agent.scheduler import Scheduler, SystemClock, Timer
from restic_manager.agent.state import Mailbox, Outbox, StateStore, state_saver

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `restic-manager agent`."""
    config.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    try:
        settings = config.load(args)
        tls = settings.ssl_context()
    except config.ConfigError as error:
        print(f"restic-manager agent: {error}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if settings.insecure:
        log.warning("--insecure: talking plain ws:// to %s; the token and repository credentials cross "
                    "the network unencrypted", settings.server)
    return asyncio.run(_main(settings, tls))


async def _main(settings: config.AgentConfig, tls: ssl.SSLContext | None) -> int:
    try:
        version = await restic_version(settings.restic)
    except ResticUnavailable as error:
        log.error("%s; set --restic to the restic binary", error)
        return 1
    store = StateStore(settings.state_dir / "state.json")
    saved = await asyncio.to_thread(store.load)
    scheduler = Scheduler(saved.cursors)
    outbox = Outbox(saved.outbox)
    journal = saved.journal
    save = state_saver(store, cursors=scheduler.cursors, outbox=outbox, journal=journal)
    mailbox = Mailbox(outbox, save=save)
    if lost := interrupted(journal):
        log.warning("%d job(s) were running when the agent last stopped; their outcome is looked up in the "
                    "repository when the operator asks for them: %s", len(lost), ", ".join(lost))
        await save()
    timer = Timer(scheduler, clock=SystemClock(), deliver=mailbox.post_many, save=save)
    runner = JobRunner(restic=settings.restic, host=settings.agent_name, send=mailbox.post,
                       journal=journal, save=save, unsettled=mailbox.finished_jobs,
                       cache_dir=settings.state_dir / "restic-cache", host_policy=settings.policy)
    connection = Connection(
        endpoint=Endpoint(settings.server, token_file=settings.token_file, ssl=tls),
        identity=Identity(agent=settings.agent_name, restic_version=version, hostname=socket.gethostname()),
        timer=timer,
        runner=runner,
        mailbox=mailbox,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    log.info("agent %s (restic %s) starting; state in %s", settings.agent_name, version, settings.state_dir)
    # What exists by now (the imported modules: most of the heap) lives as long as the
    # process: a full garbage collection then skips it instead of holding up a fire by
    # tens of milliseconds.
    gc.freeze()
    await run_agent(timer=timer, connection=connection, runner=runner, stop=stop)
    log.info("agent %s stopped", settings.agent_name)
    return 0


class _Closable(Protocol):
    async def aclose(self) -> None: ...


async def run_agent(*, timer: Timer, connection: Connection, runner: _Closable, stop: asyncio.Event) -> None:
    """The agent's life: the timer and the connection run until `stop` is set; then the timer
    stops, the socket closes with a reason, and running jobs are ended (their job.done stays
    in the saved outbox for the next start)."""
    try:
        async with asyncio.TaskGroup() as tasks:
            timer_task = tasks.create_task(timer.run(), name="timer")
            connection_task = tasks.create_task(connection.run(), name="connection")
            await stop.wait()
            log.info("shutting down")
            timer_task.cancel()
            connection_task.cancel()
    finally:
        await runner.aclose()
