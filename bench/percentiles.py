"""Latency statistics of a run: nearest-rank percentiles, their summary in
milliseconds, and the median."""

from __future__ import annotations

import math
from collections.abc import Sequence


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """The ``p``-th percentile (0..100) by nearest rank; NaN when empty."""
    if not sorted_values:
        return math.nan
    k = max(0, min(len(sorted_values) - 1, math.ceil(p / 100 * len(sorted_values)) - 1))
    return float(sorted_values[k])


def summary_ms(values_s: Sequence[float]) -> dict[str, float]:
    s = sorted(values_s)
    out = {f"p{str(p).replace('.', '_')}": percentile(s, p) * 1000 for p in (50, 90, 99, 99.9)}
    out["max"] = (s[-1] * 1000) if s else math.nan
    out["mean"] = (sum(s) / len(s) * 1000) if s else math.nan
    return {k: round(v, 3) for k, v in out.items()}


def median(values: Sequence[float]) -> float:
    s = sorted(values)
    if not s:
        return math.nan
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2
