"""What the load clients share: worker threads started together, open-loop schedules,
outcomes gathered, nearest-rank percentiles.

Used by agent.lab.workloads.loadgen (TCP echo), agent.lab.workloads.llm_client (OpenAI
API) and, in the benchmarks, benchmarks.clients and benchmarks.grpc_client. Only the
scaffolding around a run lives here: each client keeps its own request loop, because
what is timed there (the request, and nothing else) is the measurement.

Percentiles are nearest-rank over every sample (the clients keep all of them), so p99.9 of
5,000 samples is the 4,995th smallest value, not an interpolation.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

PERCENTILES: tuple[float, ...] = (50.0, 90.0, 99.0, 99.9)
# Every worker connects before the first due time of an open loop, or that connect
# would be charged as latency to the requests it delayed.
START_DELAY_NS = 50_000_000


def percentile_key(p: float) -> str:
    """99.9 -> 'p99_9' (no dots, so keys work as dotted paths)."""
    return "p" + f"{p:g}".replace(".", "_")


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of already-sorted values; NaN when there are none."""
    if not sorted_values:
        return math.nan
    n = len(sorted_values)
    rank = max(0, min(n - 1, math.ceil(p / 100.0 * n) - 1))
    return float(sorted_values[rank])


def summarize_us(samples_us: Iterable[float]) -> dict[str, float]:
    """p50/p90/p99/p99.9, mean and max of latencies in µs (NaN when empty)."""
    s = sorted(samples_us)
    out = {percentile_key(p): percentile(s, p) for p in PERCENTILES}
    out["mean"] = sum(s) / len(s) if s else math.nan
    out["max"] = s[-1] if s else math.nan
    out["count"] = float(len(s))
    return out


@dataclass
class Outcome:
    """One worker's latencies (ns) and failures; only its own thread writes it."""

    latencies_ns: list[int] = field(default_factory=list)
    errors: int = 0
    first_error: str = ""

    def fail(self, e: BaseException | str) -> None:
        self.errors += 1
        self.first_error = self.first_error or str(e)


def summarize(outs: Sequence[Outcome], elapsed: float) -> tuple[dict[str, object], list[int]]:
    """The run's result (requests, errors, seconds, rps, latency_us, first_error when
    any) and every latency in ns."""
    lat = [x for o in outs for x in o.latencies_ns]
    out: dict[str, object] = {
        "requests": len(lat),
        "errors": sum(o.errors for o in outs),
        "seconds": elapsed,
        "rps": len(lat) / elapsed if elapsed > 0 else 0.0,
        "latency_us": summarize_us(x / 1000.0 for x in lat),
    }
    first = next((o.first_error for o in outs if o.first_error), "")
    if first:
        out["first_error"] = first
    return out, lat


def tight_timer_slack() -> None:
    """Ask for 1 ns timer slack: the default 50 µs would show up as open-loop latency."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(29, 1, 0, 0, 0)  # PR_SET_TIMERSLACK
    except (OSError, AttributeError):
        pass


def schedules(rate: float, duration: float, connections: int, t0: int) -> list[list[int]]:
    """Due times (perf_counter ns) of an open loop at `rate`, dealt round robin."""
    total = int(rate * duration)
    interval = 1e9 / rate
    return [
        [t0 + int(i * interval) for i in range(c, total, connections)] for c in range(connections)
    ]


def run_threads(n: int, work: Callable[[int, threading.Barrier], None]) -> float:
    """Run `work(i, start)` in n threads; each must wait on `start` once, when ready to
    send (connected), and the clock starts when all have. Returns the seconds from that
    common start to the last worker's end."""
    start = threading.Barrier(n + 1)
    threads = [threading.Thread(target=work, args=(i, start), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    start.wait()
    begin = time.perf_counter()
    for t in threads:
        t.join()
    return time.perf_counter() - begin


Worker = Callable[[int, "list[int] | None", int, threading.Barrier], None]


def run_workers(connections: int, rate: float, duration: float, work: Worker) -> float:
    """Run `work(c, schedule, deadline, start)` in a thread per connection: `schedule` is
    connection c's send times (perf_counter ns) at `rate` requests/s over all of them, or
    None for a closed loop; `deadline` is monotonic ns; `start` as for run_threads."""
    t0 = time.perf_counter_ns() + START_DELAY_NS
    plan: list[list[int] | None] = (
        list(schedules(rate, duration, connections, t0)) if rate > 0 else [None] * connections
    )
    deadline = time.monotonic_ns() + int(duration * 1e9)
    return run_threads(connections, lambda c, start: work(c, plan[c], deadline, start))
