"""agent.lab.workloads.loadrun: the scaffolding the load clients share (threads started
together, open-loop schedules, outcomes gathered)."""

from __future__ import annotations

import threading
import time

import pytest

from agent.lab.workloads import loadrun
from agent.lab.workloads.loadrun import Outcome, run_threads, run_workers, schedules, summarize


def test_schedules_deal_due_times_round_robin() -> None:
    """An open loop at 4/s for 1 s over two connections: one due time every 250 ms, dealt
    alternately, from t0."""
    assert schedules(4, 1.0, 2, t0=10) == [
        [10, 10 + 500_000_000],
        [10 + 250_000_000, 10 + 750_000_000],
    ]


def test_run_threads_times_from_when_every_worker_is_ready(monkeypatch: pytest.MonkeyPatch) -> None:
    """Set-up before the start barrier (connecting) is not counted in the elapsed time;
    every worker has finished when run_threads returns. Checked against the clock readings
    run_threads takes, not against durations, so a slow machine cannot fail it."""
    clock = time.perf_counter
    caller = threading.get_ident()
    readings: list[float] = []  # run_threads's own (on the caller's thread): start, end

    def reading() -> float:
        t = clock()
        if threading.get_ident() == caller:
            readings.append(t)
        return t

    ready: list[float] = []
    ended: list[float] = []

    def work(i: int, start: threading.Barrier) -> None:
        time.sleep(0.2)
        ready.append(clock())
        start.wait()
        time.sleep(0.05)
        ended.append(clock())

    with monkeypatch.context() as m:
        m.setattr(loadrun.time, "perf_counter", reading)
        elapsed = run_threads(3, work)
    begin, end = readings
    assert len(ready) == len(ended) == 3
    assert begin >= max(ready)  # the clock started once every worker was ready
    assert end >= max(ended)  # and stopped after the last one had finished
    assert elapsed == end - begin


def test_run_workers_closed_loop_gets_no_schedule_and_a_deadline() -> None:
    """Rate 0 is a closed loop: no schedule, and a deadline `duration` from now."""
    seen: dict[int, tuple[object, int]] = {}

    def work(c: int, plan: list[int] | None, deadline: int, start: threading.Barrier) -> None:
        start.wait()
        seen[c] = (plan, deadline)

    before = time.monotonic_ns()
    run_workers(2, 0.0, 3.0, work)
    assert [p for p, _ in seen.values()] == [None, None]
    assert all(before + 3e9 <= d <= time.monotonic_ns() + 3e9 for _, d in seen.values())


def test_summarize_gathers_every_worker() -> None:
    """Latencies of all workers are pooled (µs in the summary), errors summed, and the
    first failure reported."""
    a, b = Outcome([1_000, 3_000]), Outcome([2_000])
    b.fail("reset")
    b.fail("later")
    out, lat = summarize([a, b], elapsed=2.0)
    assert lat == [1_000, 3_000, 2_000]
    assert out["requests"] == 3 and out["errors"] == 2 and out["rps"] == 1.5
    assert out["first_error"] == "reset"
    assert out["latency_us"]["p50"] == 2.0 and out["latency_us"]["max"] == 3.0  # type: ignore[index]
