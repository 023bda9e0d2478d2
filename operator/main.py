"""`restic-manager operator`: command-line options and the process's top-level lifecycle.

kopf and the agents' WebSocket server share one event loop. kopf owns SIGINT/SIGTERM; its
cleanup handler stops the controller (server and loops) first, because kopf afterwards
cancels every task it finds in the loop. When the controller fails (say the port is
taken), kopf is told to stop through its stop flag.

Agents connect over ``wss`` (``--tls-cert-file``/``--tls-key-file``); plain ``ws`` only
with ``--insecure-listen``, which logs a warning. ``--agent-service-account`` lets
in-cluster agents in with their projected ServiceAccount tokens; ``--webhook-listen``
serves the validating admission webhook; ``--metrics-listen`` the refusal counters.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

import kopf

from restic_manager.operator import handlers
from restic_manager.operator.agents.authenticator import NodeAgents
from restic_manager.operator.agents.identity import DEFAULT_AUDIENCE
from restic_manager.operator.agents.limits import Limits
from restic_manager.operator.agents.server import ServingCertificate, TLSError
from restic_manager.operator.controller import Controller
from restic_manager.operator.kits.gc_tuning import GCTuning
from restic_manager.operator.kube.api import ObjectKey
from restic_manager.operator.kube.client import Kube, load_configuration

log = logging.getLogger("restic_manager.operator")

DEFAULT_LISTEN = "0.0.0.0:8765"
# At DEBUG these print what crosses the wire: Secrets' data as the API returns it, frames
# holding repository credentials. They never log below INFO, whatever --log-level says.
WIRE_LOGGERS = ("kubernetes_asyncio.client.rest", "websockets", "aiohttp.client")


class UsageError(Exception):
    """A combination of options the operator cannot start with."""


def _host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT, e.g. 0.0.0.0:8765")
    return host.strip("[]"), int(port)


def _namespaced_name(text: str) -> ObjectKey:
    namespace, _, name = text.partition("/")
    if not namespace or not name or "/" in name:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAMESPACE/NAME, e.g. backup/restic-manager-agent")
    return ObjectKey(namespace, name)


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be more than 0")
    return value


def _whole(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be a whole number of at least 1")
    return int(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `restic-manager operator`."""
    parser.add_argument("--listen", type=_host_port, default=_host_port(DEFAULT_LISTEN), metavar="HOST:PORT",
                        help=f"where agents connect (WebSocket; default: {DEFAULT_LISTEN})")
    parser.add_argument("--tls-cert-file", type=Path, metavar="PATH",
                        help="certificate chain (PEM) agents see: serve wss:// (with --tls-key-file)")
    parser.add_argument("--tls-key-file", type=Path, metavar="PATH", help="the certificate's private key (PEM)")
    parser.add_argument("--insecure-listen", action="store_true",
                        help="serve plain ws:// instead: agent tokens and repository credentials cross the network "
                             "unencrypted; for local tests only")
    parser.add_argument("--agent-service-account", type=_namespaced_name, metavar="NS/NAME",
                        help="accept in-cluster agents presenting a projected token of this ServiceAccount "
                             "(checked by TokenReview); each registers an Agent named after its node")
    parser.add_argument("--agent-token-audience", default=DEFAULT_AUDIENCE, metavar="AUDIENCE",
                        help=f"the audience those tokens must carry (default: {DEFAULT_AUDIENCE})")
    parser.add_argument("--node-agent-namespace", metavar="NS",
                        help="where in-cluster agents' Agents live (default: the ServiceAccount's namespace)")
    parser.add_argument("--webhook-listen", type=_host_port, metavar="HOST:PORT",
                        help="serve the validating admission webhook (HTTPS, path /validate-schedule) here")
    parser.add_argument("--webhook-cert-file", type=Path, metavar="PATH",
                        help="the webhook's certificate (default: --tls-cert-file)")
    parser.add_argument("--webhook-key-file", type=Path, metavar="PATH",
                        help="the webhook's private key (default: --tls-key-file)")
    parser.add_argument("--metrics-listen", type=_host_port, metavar="HOST:PORT",
                        help="serve GET /metrics (refusal counters, Prometheus text) here")
    parser.add_argument("--kubeconfig", type=Path, metavar="PATH",
                        help="kubeconfig to use (default: in-cluster, else $KUBECONFIG or ~/.kube/config)")
    parser.add_argument("--namespace", action="append", metavar="NS", dest="namespaces",
                        help="watch only this namespace (repeatable; default: all namespaces)")
    parser.add_argument("--liveness", metavar="URL",
                        help="serve kopf's liveness probe here, e.g. http://0.0.0.0:8080/healthz")
    parser.add_argument("--agent-frame-rate", type=_positive, default=Limits.frames_per_second, metavar="N",
                        help="frames per second one agent may send, sustained (default: %(default)g); a frame over "
                             "it is dropped and answered rate-limited, and an agent sends a dropped fire again")
    parser.add_argument("--agent-frame-burst", type=_whole, default=Limits.burst, metavar="N",
                        help="frames one agent may send at once above the rate (default: %(default)s)")
    parser.add_argument("--handshakes-per-address", type=_whole, default=Limits.handshakes_per_address,
                        metavar="N", help="agent handshakes one address may have in progress at once; more are "
                        "reset at accept, before TLS (default: %(default)s; raise it for many agents behind one "
                        "NAT address)")
    parser.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                        help="default: INFO")


def agent_tls(args: argparse.Namespace) -> ServingCertificate | None:
    """The agents' endpoint's certificate, None for --insecure-listen."""
    if args.insecure_listen:
        if args.tls_cert_file or args.tls_key_file:
            raise UsageError("--insecure-listen and --tls-cert-file/--tls-key-file exclude each other")
        return None
    if not (args.tls_cert_file and args.tls_key_file):
        raise UsageError("agents connect over TLS: give --tls-cert-file and --tls-key-file "
                         "(or --insecure-listen for a local test, unencrypted)")
    return ServingCertificate(args.tls_cert_file, args.tls_key_file)


def webhook_server(args: argparse.Namespace) -> kopf.WebhookServer | None:
    if args.webhook_listen is None:
        return None
    cert, key = args.webhook_cert_file or args.tls_cert_file, args.webhook_key_file or args.tls_key_file
    if not (cert and key):
        raise UsageError("--webhook-listen needs a certificate: --webhook-cert-file and --webhook-key-file "
                         "(or --tls-cert-file and --tls-key-file)")
    ServingCertificate(cert, key)  # fail now, naming the files, rather than inside kopf
    host, port = args.webhook_listen
    return kopf.WebhookServer(addr=host, port=port, certfile=cert, pkeyfile=key)


def node_agents(args: argparse.Namespace) -> NodeAgents | None:
    account = args.agent_service_account
    if account is None:
        if args.node_agent_namespace:
            raise UsageError("--node-agent-namespace needs --agent-service-account")
        return None
    namespace = args.node_agent_namespace or account.namespace
    if args.namespaces and namespace not in args.namespaces:
        raise UsageError(f"in-cluster agents' Agents go to namespace {namespace}, which is not watched: add "
                         f"--namespace {namespace} or choose another with --node-agent-namespace")
    if args.namespaces and account.namespace not in args.namespaces:
        # An agent's connection ends when its pod goes, which the operator sees by watching them.
        raise UsageError(f"in-cluster agents' pods run in namespace {account.namespace}, which is not watched: "
                         f"add --namespace {account.namespace}")
    return NodeAgents(service_account=account, namespace=namespace, audience=args.agent_token_audience)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.log_level != "DEBUG":
        # kopf logs every handler call, websockets every connection, aiohttp every probe:
        # the operator's own log says what matters.
        for noisy in ("kopf", "websockets", "restic_manager.operator.agents.server.wire", "aiohttp.access"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    for wire in WIRE_LOGGERS:
        logger = logging.getLogger(wire)
        logger.setLevel(max(logger.getEffectiveLevel(), logging.INFO))
    try:
        tls = agent_tls(args)
        webhook = webhook_server(args)
        nodes = node_agents(args)
    except (UsageError, TLSError) as error:
        print(f"restic-manager operator: {error}", file=sys.stderr)
        return 2
    if tls is None:
        log.warning("--insecure-listen: agents connect over plain ws://; their tokens and the repository "
                    "credentials cross the network unencrypted")
    return asyncio.run(_main(args, tls=tls, webhook=webhook, nodes=nodes))


async def _main(args: argparse.Namespace, *, tls: ServingCertificate | None, webhook: kopf.WebhookServer | None,
                nodes: NodeAgents | None) -> int:
    try:
        configuration = await load_configuration(args.kubeconfig)
        kube = Kube(configuration)
    except Exception as error:  # the Kubernetes client and ssl raise several unrelated types here
        print(f"restic-manager operator: cannot load the Kubernetes configuration: {error}", file=sys.stderr)
        return 2
    controller = Controller(kube=kube, namespaces=args.namespaces, node_agents=nodes,
                            limits=Limits(frames_per_second=args.agent_frame_rate, burst=args.agent_frame_burst,
                                          handshakes_per_address=args.handshakes_per_address))
    host, port = args.listen
    listening: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    def started(bound: int) -> None:
        log.info("serving agents on %s://%s:%d", "wss" if tls else "ws", host, bound)
        listening.set_result(bound)

    served = asyncio.create_task(controller.run(host=host, port=port, tls=tls, started=started,
                                                metrics_listen=args.metrics_listen), name="controller")

    async def stop_controller() -> None:
        served.cancel()
        await asyncio.wait([served])

    gc_tuning = GCTuning()
    gc_tuning.install()
    sweeping = asyncio.create_task(gc_tuning.run(), name="garbage collector sweep")
    try:
        await asyncio.wait((served, listening), return_when=asyncio.FIRST_COMPLETED)
        if not served.done():
            # No stop_flag: after a signal kopf leaves its waiter on that flag pending and
            # then waits for it as a hung task. A failing controller cancels kopf instead.
            operator = asyncio.create_task(kopf.operator(
                registry=handlers.registry(controller, configuration, on_stop=stop_controller, webhook=webhook),
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
        sweeping.cancel()
        gc_tuning.uninstall()
        await stop_controller()
        await kube.close()
    if not served.cancelled() and served.exception() is not None:
        log.error("the agent server or a controller loop failed", exc_info=served.exception())
        return 1
    log.info("operator stopped")
    return 0
