"""Summaries of measured samples: pure functions, no clock and no I/O."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def percentile(values: Sequence[float], fraction: float) -> float:
    """The ``fraction`` quantile (0..1) by linear interpolation between closest ranks."""
    if not values:
        raise ValueError("percentile of no samples")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction {fraction} is outside 0..1")
    ordered = sorted(values)
    position = fraction * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summary(values: Sequence[float], *, scale: float = 1.0, digits: int = 1) -> dict[str, Any]:
    """count, min, p50, p90, p99, max and mean of ``values`` times ``scale`` (e.g. 1000 for ms)."""
    if not values:
        return {"count": 0}
    scaled = [v * scale for v in values]

    def r(x: float) -> float:
        return round(x, digits)

    return {
        "count": len(scaled),
        "min": r(min(scaled)),
        "p50": r(percentile(scaled, 0.50)),
        "p90": r(percentile(scaled, 0.90)),
        "p99": r(percentile(scaled, 0.99)),
        "max": r(max(scaled)),
        "mean": r(sum(scaled) / len(scaled)),
    }


def check(name: str, value: float | None, *, limit: float, unit: str, at_most: bool = True) -> dict[str, Any]:
    """One target: whether ``value`` is within ``limit`` (a missing value misses the target)."""
    met = value is not None and (value <= limit if at_most else value >= limit)
    return {"target": name, "value": value, "limit": limit, "unit": unit,
            "comparison": "<=" if at_most else ">=", "met": met}
