"""Latency statistics for the benchmarks: pure functions, no I/O (unit-tested).

Percentiles are nearest-rank over every sample, by the rule of the load clients that take
the samples (agent.lab.workloads.loadrun). Histograms are logarithmic (HdrHistogram-style:
a fixed number of buckets per power of two) so a run's whole distribution fits in
results.json in a few hundred numbers.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

# One percentile rule for the lab's load clients and the benchmarks: theirs. summarize_us
# is named here too for the reports, which take their statistics from this module.
from agent.lab.workloads.loadrun import (  # noqa: F401
    PERCENTILES,
    percentile,
    percentile_key,
    summarize_us,
)

SUB_BUCKETS = 16  # buckets per power of two: at most 1/16 (6.25 %) relative error


def added(scenario: Mapping[str, float], baseline: Mapping[str, float]) -> dict[str, float]:
    """Per-percentile latency added over the baseline (scenario minus baseline, µs)."""
    out: dict[str, float] = {}
    for p in PERCENTILES:
        k = percentile_key(p)
        a, b = scenario.get(k, math.nan), baseline.get(k, math.nan)
        out[k] = a - b
    return out


def ratio(a: float | None, b: float | None) -> float:
    """a / b, NaN when either is missing or b is zero (never raises)."""
    if a is None or b is None or not math.isfinite(a) or not math.isfinite(b) or b == 0:
        return math.nan
    return a / b


def per_thousand(cpu_seconds: float, requests: int) -> float:
    """CPU seconds per 1,000 requests (NaN for no requests)."""
    return cpu_seconds / requests * 1000.0 if requests > 0 else math.nan


# --------------------------------------------------------------------------- histogram


def bucket_of(value: float) -> int:
    """Log-linear bucket index: values below 1 share bucket 0; each power of two above is
    split into SUB_BUCKETS equal parts."""
    if value < 1.0:
        return 0
    exp = math.floor(math.log2(value))
    base = 2.0**exp
    sub = int((value - base) / base * SUB_BUCKETS)
    return 1 + exp * SUB_BUCKETS + min(sub, SUB_BUCKETS - 1)


def bucket_bounds(index: int) -> tuple[float, float]:
    """[low, high) of a bucket index (the inverse of bucket_of)."""
    if index == 0:
        return 0.0, 1.0
    exp, sub = divmod(index - 1, SUB_BUCKETS)
    base = 2.0**exp
    step = base / SUB_BUCKETS
    return base + sub * step, base + (sub + 1) * step


def histogram(samples: Iterable[float]) -> dict[str, int]:
    """Sparse log histogram {bucket upper bound (µs, str): count}, ordered by bound."""
    counts: dict[int, int] = {}
    for v in samples:
        i = bucket_of(v)
        counts[i] = counts.get(i, 0) + 1
    return {_fmt_bound(bucket_bounds(i)[1]): counts[i] for i in sorted(counts)}


def _fmt_bound(x: float) -> str:
    return f"{x:.6g}"


def histogram_percentile(hist: Mapping[str, int], p: float) -> float:
    """A percentile read back from histogram(): the upper bound of the bucket holding it."""
    items = sorted((float(k), c) for k, c in hist.items())
    total = sum(c for _, c in items)
    if total == 0:
        return math.nan
    rank = max(1, math.ceil(p / 100.0 * total))
    seen = 0
    for bound, c in items:
        seen += c
        if seen >= rank:
            return bound
    return items[-1][0]


def percentile_curve(
    sorted_values: Sequence[float], nines: float = 4.0, points: int = 200
) -> list[tuple[float, float]]:
    """(percentile, value) pairs spaced evenly on the 'nines' scale -log10(1 - p/100), from
    p0 to 1 - 10**-nines (capped by what the sample count can show): what latency-by-
    percentile plots (HdrHistogram's) draw, so the tail is as visible as the median."""
    n = len(sorted_values)
    if n == 0:
        return []
    top = min(nines, math.log10(n)) if n > 1 else 0.0
    out = []
    for i in range(points + 1):
        x = top * i / points
        p = 100.0 * (1.0 - 10.0**-x)
        out.append((p, percentile(sorted_values, p)))
    return out


def nines(p: float) -> float:
    """The plot coordinate of percentile p: -log10(1 - p/100) (p50 -> 0.30, p99 -> 2)."""
    return -math.log10(max(1e-12, 1.0 - p / 100.0))
