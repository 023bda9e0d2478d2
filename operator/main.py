"""`restic-manager operator`: command-line options and the process's top-level lifecycle.

kopf and the agents' WebSocket server share one event loop. kopf owns SIGINT/SIGTERM; its
cleanup handler stops the controller (server and loops) first, because kopf afterwards
cancels every task it finds in the loop. When the controller fails (say the port is
taken), kopf is told to stop through its stop flag.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

import kopf
import kubernetes.client

from restic_manager.operator import handlers
from restic_manager.operator.controller import Controller
from restic_manager.operator.kube import Kube, load_configuration

log = logging.getLogger("restic_manager.operator")

DEFAULT_LISTEN = "0.0.0.0:8765"


def _host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT, e.g. 0.0.0.0:8765")
    return host.strip("[]"), int(port)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `restic-manager operator`."""
    parser.add_argument("--listen", type=_host_port, default=_host_port(DEFAULT_LISTEN), metavar="HOST:PORT",
                        help=f"where agents connect (WebSocket; default: {DEFAULT_LISTEN})")
    parser.add_argument("--kubeconfig", type=Path, metavar="PATH",
                        help="kubeconfig to use (default: in-cluster, else $KUBECONFIG or ~/.kube/config)")
    parser.add_argument("--namespace", action="append", metavar="NS", dest="namespaces",
                        help="watch only this namespace (repeatable; default: all namespaces)")
    parser.add_argument("--liveness", metavar="URL",
                        help="serve kopf's liveness probe here, e.g. http://0.0.0.0:8080/healthz")
    parser.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                        help="default: INFO")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.log_level != "DEBUG":
        # kopf logs every handler call, websockets every connection, aiohttp every probe:
        # the operator's own log says what matters.
        for noisy in ("kopf", "websockets", "aiohttp.access"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        configuration = load_configuration(args.kubeconfig)
    except Exception as error:  # the kubernetes client raises several unrelated types here
        print(f"restic-manager operator: cannot load the Kubernetes configuration: {error}", file=sys.stderr)
        return 2
    return asyncio.run(_main(args, configuration))


async def _main(args: argparse.Namespace, configuration: kubernetes.client.Configuration) -> int:
    kube = Kube(configuration)
    controller = Controller(kube=kube, namespaces=args.namespaces)
    host, port = args.listen
    listening: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    def started(bound: int) -> None:
        log.info("serving agents on ws://%s:%d", host, bound)
        listening.set_result(bound)

    served = asyncio.create_task(controller.run(host=host, port=port, started=started), name="controller")

    async def stop_controller() -> None:
        served.cancel()
        await asyncio.wait([served])

    try:
        await asyncio.wait([served, listening], return_when=asyncio.FIRST_COMPLETED)
        if not served.done():
            # No stop_flag: after a signal kopf leaves its waiter on that flag pending and
            # then waits for it as a hung task. A failing controller cancels kopf instead.
            operator = asyncio.create_task(kopf.operator(
                registry=handlers.registry(controller, configuration, on_stop=stop_controller),
                standalone=True,
                clusterwide=not args.namespaces,
                namespaces=args.namespaces or (),
                liveness_endpoint=args.liveness,
            ), name="kopf")
            await asyncio.wait([served, operator], return_when=asyncio.FIRST_COMPLETED)
            if not served.cancelled() and served.done():
                operator.cancel()
            await asyncio.wait([operator])
    finally:
        await stop_controller()
        kube.close()
    if not served.cancelled() and served.exception() is not None:
        log.error("the agent server or a controller loop failed", exc_info=served.exception())
        return 1
    log.info("operator stopped")
    return 0
