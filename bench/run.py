"""Run restic-manager's benchmarks against the real local control plane.

    .venv/bin/python bench/run.py [--quick] [--profile auto|always|never] [--no-pin] [apply fire storm fleet agent reconnect handshake poison backup]

Each benchmark starts its own control plane (etcd, kube-apiserver, kube-controller-manager
from testbin/) and operator, drives them with simulated agents over the real wire
protocol, stops everything it started, and writes bench/results/<name>[.quick].json and
.png. The control plane runs on the first CPU, the operator and the harness on the others.
See bench/README.md for what each one measures and the figures of the last run.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import logging
import os
import shlex
import sys
import time
import traceback
from pathlib import Path
from types import ModuleType

import cluster
from cluster import raise_nofile
from common import Context, write_result
from plots import save

BENCHMARKS = ("apply", "fire", "storm", "fleet", "agent", "reconnect", "handshake", "poison",  # bench/b_<name>.py each
              "backup")
HERE = Path(__file__).resolve().parent
# Each benchmark stops by itself well before this; the bound is for a wedged control plane.
HARD_LIMIT = {"apply": 3600, "fire": 2400, "storm": 2400, "fleet": 4800, "agent": 1800, "reconnect": 2400,
              "handshake": 900, "poison": 900, "backup": 3600}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("which", nargs="*", choices=[[], *BENCHMARKS], metavar="BENCHMARK",
                        help=f"which to run (default: all): {', '.join(BENCHMARKS)}")
    parser.add_argument("--quick", action="store_true", help="small sizes: all of them in a few minutes")
    parser.add_argument("--profile", choices=("auto", "always", "never"), default="auto",
                        help="py-spy the operator where a target is missed (auto), always, or never")
    parser.add_argument("--results", type=Path, default=HERE / "results", help="where JSON and PNG files go")
    parser.add_argument("--replot", action="store_true",
                        help="only redraw the PNG files from the JSON results already there")
    parser.add_argument("--rev", metavar="REVISION",
                        help="benchmark this commit (a git archive of it) instead of the working tree, e.g. HEAD")
    parser.add_argument("--work", type=Path, default=Path("/tmp/restic-manager-bench"),
                        help="control-plane data, logs and raw profiles")
    parser.add_argument("--no-pin", dest="pin", action="store_false",
                        help="let the control plane share every CPU with the operator and the harness")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("websockets", "aiohttp"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    if args.replot:
        return replot(args.results, args.which or list(BENCHMARKS))
    plane_cpus = pin() if args.pin else ()
    args.results.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    if args.rev:
        cluster.use(cluster.snapshot(args.rev, args.work))
    logging.info("code under test: %s", cluster.SOURCE.label)
    limit = raise_nofile()
    logging.info("open-file limit %d", limit)
    command = "python bench/run.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    ctx = Context(quick=args.quick, results=args.results, work=args.work, profile=args.profile, command=command.strip(),
                  plane_cpus=plane_cpus)
    failed = []
    for name in args.which or list(BENCHMARKS):
        module: ModuleType = importlib.import_module(f"b_{name}")
        logging.info("benchmark %s: starting (%s)", name, "quick" if args.quick else "full")
        start = time.monotonic()
        try:
            result = asyncio.run(asyncio.wait_for(module.run(ctx), HARD_LIMIT[name]))
        except BaseException as error:  # noqa: BLE001  (report which benchmark broke, go on with the rest)
            if isinstance(error, KeyboardInterrupt):
                raise
            logging.error("benchmark %s failed after %.0fs:\n%s", name, time.monotonic() - start,
                          "".join(traceback.format_exception(error)))
            failed.append(name)
            continue
        result["duration_s"] = round(time.monotonic() - start, 1)
        result = write_result(ctx, name, result)
        path = ctx.result_path(name, "json")
        save(result, module.plot, ctx.result_path(name, "png"), panels=getattr(module, "PANELS", 1))
        verdicts = ", ".join(f"{t['target']}: {t['value']} {t['unit']} ({'met' if t['met'] else 'MISSED'})"
                             for t in result.get("targets", []))
        logging.info("benchmark %s done in %.0fs → %s\n  %s", name, result["duration_s"], path, verdicts)
    if failed:
        logging.error("failed: %s", ", ".join(failed))
    return 1 if failed else 0


def pin() -> tuple[int, ...]:
    """The control plane gets the first CPU, this process (the harness, and the operator and
    reference clients it starts) the others, so the operator cannot go faster by taking CPU
    from the apiserver. With one CPU nothing is pinned. Called before any thread exists: a
    thread's CPUs are inherited by the threads and processes it starts."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        logging.warning("one CPU: the control plane shares it with the operator")
        return ()
    os.sched_setaffinity(0, cpus[1:])
    logging.info("control plane on CPU %s; the operator, harness and reference clients on %s",
                 cpus[0], ",".join(map(str, cpus[1:])))
    return (cpus[0],)


def replot(results: Path, names: list[str]) -> int:
    for name in names:
        for path in sorted(results.glob(f"{name}.json")) + sorted(results.glob(f"{name}.quick.json")):
            module = importlib.import_module(f"b_{name}")
            save(json.loads(path.read_text()), module.plot, path.with_suffix(".png"),
                 panels=getattr(module, "PANELS", 1))
            logging.info("redrew %s", path.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
