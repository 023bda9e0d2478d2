"""`restic-manager agent`: command-line options and the process's top-level lifecycle.

It exits with an :class:`~restic_manager.agent.retry.ExitCode` saying why: 0 when told to
stop, and one of the permanent ones (no restart can help until someone fixes it) for a
setting it cannot work with, a state directory it cannot write, or an operator that
refuses it for good; everything that may heal by itself is retried instead.
"""

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
from restic_manager.agent.connection import AgentStopped, Connection, Endpoint, Identity
from restic_manager.agent.retry import PERMANENT, ExitCode
from restic_manager.agent.runner import JobRunner, ResticUnavailable, interrupted, restic_version
from restic_manager.agent.scheduler import Scheduler, SystemClock, Timer
from restic_manager.agent.state import Mailbox, Outbox, StateError, StateStore, state_saver

log = logging.getLogger(__name__)

EXIT_CODES = f"""exit status:
  {ExitCode.STOPPED:d}  stopped by SIGTERM or SIGINT
  1  an unexpected error (the log has its traceback)
  {ExitCode.CONFIG:d}  a setting it cannot work with, or a restic binary that does not run
  {ExitCode.STATE:d}  the state directory cannot be read or written
  {ExitCode.REFUSED:d}  the operator refuses it for good: its credentials belong to another Agent,
     two agents share them, or an in-cluster agent is deployed unlike the operator expects
  {", ".join(str(int(code)) for code in sorted(PERMANENT))} are permanent: deploy/systemd's unit does not restart the agent after them.
  Everything else (no operator, refused credentials such as an unknown token, revoked ones)
  is retried, and the token file is read again on every attempt."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `restic-manager agent`."""
    config.add_arguments(parser)
    parser.epilog = f"{parser.epilog}\n{EXIT_CODES}\n"


def run(args: argparse.Namespace) -> int:
    try:
        settings = config.load(args)
        tls = settings.ssl_context()
    except config.ConfigError as error:
        print(f"restic-manager agent: {error}", file=sys.stderr)
        return ExitCode.CONFIG
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if settings.insecure:
        log.warning("--insecure: talking plain ws:// to %s; the token and repository credentials cross "
                    "the network unencrypted", settings.server)
    return asyncio.run(_main(settings, tls))


async def _main(settings: config.AgentConfig, tls: ssl.SSLContext | None) -> int:
    store = StateStore(settings.state_dir / "state.json")
    try:
        await asyncio.to_thread(store.check_writable)
        saved = await asyncio.to_thread(store.load)
    except StateError as error:
        log.error("%s", error)
        return ExitCode.STATE
    try:
        version = await restic_version(settings.restic)
    except ResticUnavailable as error:
        log.error("%s; set --restic to the restic binary", error)
        return ExitCode.CONFIG
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
    refusals: list[AgentStopped] = []
    try:
        await run_agent(timer=timer, connection=connection, runner=runner, stop=stop)
    except* AgentStopped as stopped:  # a return is not allowed inside except*
        refusals = [error for error in stopped.exceptions if isinstance(error, AgentStopped)]
    if refusals:
        log.error("agent %s stops: %s", settings.agent_name, refusals[0].stop.message)
        return refusals[0].stop.exit_code
    log.info("agent %s stopped", settings.agent_name)
    return ExitCode.STOPPED


class _Closable(Protocol):
    async def aclose(self) -> None: ...


async def run_agent(*, timer: Timer, connection: Connection, runner: _Closable, stop: asyncio.Event) -> None:
    """The agent's life: the timer and the connection run until `stop` is set, or until the
    connection raises AgentStopped (in an ExceptionGroup); then the timer stops, the socket
    closes with a reason, and running jobs are ended (their job.done stays in the saved
    outbox for the next start)."""
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
