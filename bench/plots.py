"""PNG figures of the results (matplotlib, without a display)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

FOOTNOTE = ("{cpus} cores / 24 GiB: {where}\n(and other test runs: loadavg {load} at the start); code under test: {code}")
SHARED = "etcd, kube-apiserver, kube-controller-manager, the operator and the load generator share them"


def cdf(ax: Any, values: Sequence[float], *, label: str, **style: Any) -> None:
    """The empirical cumulative distribution of ``values``."""
    if not values:
        return
    ordered = sorted(values)
    ax.step(ordered, [(i + 1) / len(ordered) for i in range(len(ordered))], where="post", label=label, **style)
    ax.set_ylabel("fraction ≤ x")
    ax.set_ylim(0, 1.02)
    ax.grid(True, which="both", alpha=0.3)


def save(result: dict[str, Any], draw: Callable[[dict[str, Any], Any], None], path: Path, *, panels: int = 1) -> None:
    figure, axes = plt.subplots(1, panels, figsize=(max(9, 7.5 * panels), 5.5), squeeze=False)
    draw(result, axes[0] if panels > 1 else axes[0][0])
    for ax in axes[0]:
        ax.title.set_fontsize(10)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="best", fontsize=8)
    machine = result.get("machine", {})
    load = "/".join(str(x) for x in machine.get("loadavg_at_start", [])) or "?"
    code = machine.get("code_under_test", "?")
    cpus = machine.get("cpus_of", {})
    where = (f"the control plane on CPU {cpus['control_plane']}, the operator and the load generator on "
             f"{cpus['operator_harness_and_reference_clients']}"
             if isinstance(cpus.get("control_plane"), list) else SHARED)
    text = FOOTNOTE.format(cpus=machine.get("cpus", "?"), where=where, load=load, code=code)
    figure.text(0.01, 0.01, text + f"\n$ .venv/bin/{result['command']}", fontsize=7,
                color="dimgrey", family="monospace")
    figure.tight_layout(rect=(0, 0.09, 1, 1))
    figure.savefig(path, dpi=110)
    plt.close(figure)
