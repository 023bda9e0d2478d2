"""Print the targets of the results in bench/results as a Markdown table (for the README).

    python bench/summary.py [--quick]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
ORDER = ("apply", "fire", "storm", "fleet", "agent", "handshake", "poison", "backup")  # reconnect has no target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the --quick results instead of the full ones")
    parser.add_argument("--results", type=Path, default=HERE / "results")
    args = parser.parse_args()
    print("| benchmark | target | measured | limit | met | code under test |")
    print("|---|---|---|---|---|---|")
    for name in ORDER:
        path = args.results / f"{name}{'.quick' if args.quick else ''}.json"
        if not path.exists():
            print(f"| {name} | (no result) | | | | |")
            continue
        result = json.loads(path.read_text())
        code = result.get("machine", {}).get("code_under_test", "?")
        partial = f" (partial: {result['partial']})" if result.get("partial") else ""
        for target in result.get("targets", []):
            value = target["value"]
            measured = "none (nothing within the bound)" if value is None else f"{value} {target['unit']}"
            print(f"| {name} | {target['target']} | {measured} | "
                  f"{target['comparison']} {target['limit']} {target['unit']} | "
                  f"{'yes' if target['met'] else '**no**'} | {code}{partial} |")


if __name__ == "__main__":
    main()
