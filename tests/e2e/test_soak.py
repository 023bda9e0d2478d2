"""A short run of the fault-injection soak (soak/soak.py; `make soak` is the long one): faults
of every kind against the real control plane, operator, agents and restic, and nothing lost,
doubled or stuck."""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def load_soak():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("soak_harness", REPO / "soak" / "soak.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["soak_harness"] = module
    spec.loader.exec_module(module)
    return module


SHORT_RATES = {  # per minute: enough that a 90-second run meets most kinds more than once
    "operator-kill": 4.0, "agent-kill": 4.0, "agent-net": 3.0, "apiserver-net": 2.0,
    "apiserver-stop": 2.0, "etcd-stop": 1.5, "restic-kill": 3.0, "disk-full": 1.5, "hostile": 2.0,
}


def test_a_short_soak_loses_doubles_and_leaves_nothing(tmp_path: Path) -> None:
    soak = load_soak()
    settings = soak.Settings(minutes=1.5, agents=3, schedule="*/5 * * * * *", quiet=45, seed=7,
                             rates=dict(SHORT_RATES), directory=tmp_path / "soak")
    report = asyncio.run(soak.Soak(settings).run())
    print(soak.table(report))
    assert report["faults"].get("operator-kill", 0) > 0 and report["faults"].get("agent-kill", 0) > 0
    assert report["jobs"] > 0 and report["phases"].get("Succeeded", 0) > 0
    assert report["hostile"].get("sent", 0) == report["hostile"].get("answered", 0)
    assert report["ok"], soak.table(report) + f"\nlost: {report['lost']}\nunexplained: " \
        f"{report['gaps_without_a_fault']}\nstuck: {report['stuck']}\norphans: {report['orphan_snapshots']}\n" \
        f"missing: {report['snapshots_missing']}\nlocks: {report['locks_left']}\nlogs in {tmp_path / 'soak'}"
