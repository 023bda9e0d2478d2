"""`restic-manager operator` with tracemalloc on, for the fleet benchmark's memory profile.

    python bench/traced_operator.py operator --kubeconfig ... (the operator's own arguments)

On SIGUSR1 it writes the largest allocation sites still alive (by line and by file) as
JSON to $BENCH_TRACEMALLOC_OUT. Only the harness runs this; the operator is unchanged.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tracemalloc
from pathlib import Path
from types import FrameType


def dump(signum: int, frame: FrameType | None) -> None:
    snapshot = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(False, tracemalloc.__file__)])

    def rows(key: str, top: int) -> list[dict[str, object]]:
        return [{"where": str(stat.traceback[0]), "kib": round(stat.size / 1024, 1), "blocks": stat.count}
                for stat in snapshot.statistics(key)[:top]]

    total = sum(stat.size for stat in snapshot.statistics("filename"))
    Path(os.environ["BENCH_TRACEMALLOC_OUT"]).write_text(json.dumps(
        {"traced_mib": round(total / 2**20, 1), "by_line": rows("lineno", 40), "by_file": rows("filename", 25)},
        indent=1))


if __name__ == "__main__":
    tracemalloc.start()
    signal.signal(signal.SIGUSR1, dump)
    from restic_manager.cli import main
    sys.exit(main(sys.argv[1:]))
