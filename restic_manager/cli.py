"""`restic-manager`: the one entry point, with the operator, agent and next subcommands.

A subcommand's module is imported only when that subcommand runs: the operator's brings
kopf, kubernetes and aiohttp (tens of MB), which an agent on every host must not carry.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone

from restic_manager import __version__, cron


@dataclass(frozen=True)
class _Lazy:
    """A subcommand whose module (with `add_arguments` and `run`) is imported only when it is
    the one chosen."""

    module: str
    help: str
    description: str


_LAZY = {
    "operator": _Lazy(
        "restic_manager.operator.main", help="run the operator (kopf) and its agent WebSocket server",
        description="Run the operator: watches Schedules and ResticJobs and serves agents over WebSocket.",
    ),
    "agent": _Lazy(
        "restic_manager.agent.main", help="run a host agent",
        description="Run a host agent: keeps its schedules locally, fires them on time and runs restic. "
        "Every option can also come from the config file or a RESTIC_MANAGER_* environment variable.",
    ),
}


def _next(args: argparse.Namespace) -> int:
    try:
        expression = cron.Cron(args.expression, args.tz, name=args.name)
    except cron.CronError as error:
        print(f"restic-manager next: {error}", file=sys.stderr)
        return 2
    if args.after is None:
        after = datetime.now(timezone.utc)
    else:
        try:
            after = datetime.fromisoformat(args.after)
        except ValueError:
            print(f"restic-manager next: --after {args.after!r} is not an ISO 8601 time, "
                  "e.g. 2026-10-25T00:00:00+01:00", file=sys.stderr)
            return 2
        if after.tzinfo is None:
            after = after.replace(tzinfo=expression.zone)
    if args.count < 1:
        print("restic-manager next: --count must be at least 1", file=sys.stderr)
        return 2
    if args.name and expression.resolved != args.expression:
        print(f"# {args.expression} resolves to {expression.resolved} for {args.name}", file=sys.stderr)
    for fire in expression.iter_after(after, count=args.count):
        print(fire.isoformat())
    return 0


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole parser; only `command`'s module is imported, so only its options are known
    (the others' are known by name, for the usage line and the command list)."""
    parser = argparse.ArgumentParser(
        prog="restic-manager",
        description="Kubernetes-native manager for restic backups across a fleet of hosts.",
    )
    parser.add_argument("--version", action="version", version=f"restic-manager {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    for name, lazy in _LAZY.items():
        sub = commands.add_parser(name, help=lazy.help, description=lazy.description)
        if name == command:
            module = importlib.import_module(lazy.module)
            module.add_arguments(sub)
            sub.set_defaults(func=module.run)

    nxt = commands.add_parser(
        "next", help="print the next fire times of a cron expression",
        description="Print the next fire times of EXPR strictly after --after, exactly as the agent's "
        "scheduler fires them (time zone and DST rules included).",
        epilog="example: restic-manager next '30 1 * * *' --tz Europe/London --after 2026-10-24T12:00:00Z",
    )
    nxt.add_argument("expression", metavar="EXPR", help="cron expression: 5 fields, 6 with seconds first, or @daily etc.")
    nxt.add_argument("--tz", default="UTC", metavar="ZONE", help="IANA time zone (default: UTC)")
    nxt.add_argument("--after", metavar="ISO8601", help="start after this time (default: now); a time without offset is read in --tz")
    nxt.add_argument("--count", type=int, default=5, metavar="N", help="how many fire times (default: 5)")
    nxt.add_argument("--name", default="", metavar="NS/NAME", help="Schedule namespace/name that H and @*-random are derived from")
    nxt.set_defaults(func=_next)
    return parser


def _command(argv: Sequence[str]) -> str | None:
    """The subcommand named in `argv`: its first word that is not an option (the top level's
    options, --help and --version, take no value)."""
    return next((word for word in argv if not word.startswith("-")), None)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(_command(argv)).parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
