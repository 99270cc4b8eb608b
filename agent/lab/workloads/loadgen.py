"""Request/response load generator (test workload) with coordinated-omission correction.

Closed loop (`--rate 0`): each connection sends its next request when the previous
response has fully arrived; latency is send-to-last-byte.

Open loop (`--rate R`): requests are scheduled at fixed intervals of 1/R across all
connections, and latency counts from the *scheduled* time, not from when the request
could actually be sent. A stall therefore shows up in every request it delayed, as in
wrk2; without this a slow server would hide its own tail ("coordinated omission").

The server must answer each request with exactly as many bytes (the echo workload does).
Prints one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import socket
import sys
import threading
import time
from dataclasses import dataclass, field

PERCENTILES = (50.0, 90.0, 99.0, 99.9)


@dataclass
class Result:
    latencies_ns: list[int] = field(default_factory=list)
    errors: int = 0
    first_error: str = ""


def percentile(sorted_values: list[int], p: float) -> float:
    """Nearest-rank percentile of already-sorted values."""
    if not sorted_values:
        return float("nan")
    rank = max(0, min(len(sorted_values) - 1, math.ceil(p / 100.0 * len(sorted_values)) - 1))
    return float(sorted_values[rank])


def percentile_key(p: float) -> str:
    """99.9 -> 'p99_9' (no dots: keys are also used as dotted paths)."""
    return "p" + f"{p:g}".replace(".", "_")


def _tight_timer_slack() -> None:
    """Ask for 1 ns timer slack: the default 50 µs would show up as open-loop latency."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(29, 1, 0, 0, 0)  # PR_SET_TIMERSLACK
    except (OSError, AttributeError):
        pass


def summarize(lat_ns: list[int], errors: int, elapsed: float) -> dict[str, object]:
    s = sorted(lat_ns)
    us = {percentile_key(p): percentile(s, p) / 1000.0 for p in PERCENTILES}
    us["max"] = s[-1] / 1000.0 if s else float("nan")
    us["mean"] = sum(s) / len(s) / 1000.0 if s else float("nan")
    return {
        "requests": len(s),
        "errors": errors,
        "seconds": elapsed,
        "rps": len(s) / elapsed if elapsed > 0 else 0.0,
        "latency_us": us,
    }


def _recv_exact(sock: socket.socket, n: int, buf: bytearray) -> None:
    view = memoryview(buf)[:n]
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            raise ConnectionError("server closed the connection mid-response")
        got += k


def _worker(
    host: str,
    port: int,
    *,
    size: int,
    schedule: list[int] | None,
    count: int,
    deadline_ns: int,
    out: Result,
    start: threading.Barrier,
) -> None:
    payload = b"x" * size
    buf = bytearray(size)
    try:
        sock = socket.create_connection((host, port), timeout=10)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError as e:
        out.errors += 1
        out.first_error = out.first_error or f"connect {host}:{port}: {e}"
        start.wait()
        return
    start.wait()
    with sock:
        if schedule is None:
            for _ in range(count):
                if time.monotonic_ns() > deadline_ns:
                    break
                t0 = time.perf_counter_ns()
                try:
                    sock.sendall(payload)
                    _recv_exact(sock, size, buf)
                except OSError as e:
                    out.errors += 1
                    out.first_error = out.first_error or str(e)
                    return
                out.latencies_ns.append(time.perf_counter_ns() - t0)
            return
        for due in schedule:
            now = time.perf_counter_ns()
            if due > now:
                time.sleep((due - now) / 1e9)
            try:
                sock.sendall(payload)
                _recv_exact(sock, size, buf)
            except OSError as e:
                out.errors += 1
                out.first_error = out.first_error or str(e)
                return
            out.latencies_ns.append(time.perf_counter_ns() - due)


def run(
    host: str,
    port: int,
    *,
    size: int = 1024,
    connections: int = 1,
    rate: float = 0.0,
    duration: float = 5.0,
    requests: int = 0,
    warmup: int = 100,
    keep_samples: bool = False,
) -> dict[str, object]:
    """Drive the server and return the summary (also used in-process by benchmarks)."""
    _tight_timer_slack()
    if warmup:
        run(
            host, port, size=size, connections=1, rate=0.0, duration=10.0, requests=warmup, warmup=0
        )
    results = [Result() for _ in range(connections)]
    barrier = threading.Barrier(connections + 1)
    # Leave 50 ms for every connection to be established before the first due time.
    t0 = time.perf_counter_ns() + 50_000_000
    schedules: list[list[int] | None]
    if rate > 0:
        total = int(rate * duration)
        interval = 1e9 / rate
        schedules = [
            [t0 + int(i * interval) for i in range(c, total, connections)]
            for c in range(connections)
        ]
        count = 0
    else:
        schedules = [None] * connections
        count = requests if requests else 10**12
    deadline = time.monotonic_ns() + int(duration * 1e9) if not requests else 2**62
    threads = [
        threading.Thread(
            target=_worker,
            args=(host, port),
            kwargs={
                "size": size,
                "schedule": schedules[c],
                "count": count // connections if requests else count,
                "deadline_ns": deadline,
                "out": results[c],
                "start": barrier,
            },
            daemon=True,
        )
        for c in range(connections)
    ]
    for t in threads:
        t.start()
    barrier.wait()
    begin = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - begin
    lat = [x for r in results for x in r.latencies_ns]
    out = summarize(lat, sum(r.errors for r in results), elapsed)
    out.update({"size": size, "connections": connections, "rate": rate})
    first = next((r.first_error for r in results if r.first_error), "")
    if first:
        out["first_error"] = first
    if keep_samples:
        out["samples_ns"] = lat
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("host")
    ap.add_argument("port", type=int)
    ap.add_argument("--size", type=int, default=1024, help="bytes per request and response")
    ap.add_argument("--connections", "-c", type=int, default=1)
    ap.add_argument("--rate", type=float, default=0.0, help="requests/s in total; 0 = closed loop")
    ap.add_argument("--duration", type=float, default=5.0, help="seconds")
    ap.add_argument("--requests", type=int, default=0, help="closed loop: stop after N requests")
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--samples", help="also write every latency (ns) to this file, one per line")
    args = ap.parse_args()
    out = run(
        args.host,
        args.port,
        size=args.size,
        connections=args.connections,
        rate=args.rate,
        duration=args.duration,
        requests=args.requests,
        warmup=args.warmup,
        keep_samples=bool(args.samples),
    )
    if args.samples:
        samples = out.pop("samples_ns")
        with open(args.samples, "w") as f:
            f.writelines(f"{x}\n" for x in samples)  # type: ignore[attr-defined]
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")
    sys.exit(0 if not out["errors"] else 1)


if __name__ == "__main__":
    main()
