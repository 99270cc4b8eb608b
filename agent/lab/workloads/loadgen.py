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
import socket
import sys
import threading
import time

from agent.lab.workloads.loadrun import Outcome, run_workers, summarize, tight_timer_slack


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
    out: Outcome,
    start: threading.Barrier,
) -> None:
    payload = b"x" * size
    buf = bytearray(size)
    try:
        sock = socket.create_connection((host, port), timeout=10)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError as e:
        out.fail(f"connect {host}:{port}: {e}")
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
                    out.fail(e)
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
                out.fail(e)
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
    tight_timer_slack()
    if warmup:
        run(
            host, port, size=size, connections=1, rate=0.0, duration=10.0, requests=warmup, warmup=0
        )
    outs = [Outcome() for _ in range(connections)]
    # Closed loop: `requests` in all (then no time limit), or as many as fit in `duration`.
    count = requests // connections if requests else 10**12
    elapsed = run_workers(
        connections,
        rate,
        duration,
        lambda c, schedule, deadline, start: _worker(
            host,
            port,
            size=size,
            schedule=schedule,
            count=count,
            deadline_ns=deadline if not requests else 2**62,
            out=outs[c],
            start=start,
        ),
    )
    out, lat = summarize(outs, elapsed)
    out.update({"size": size, "connections": connections, "rate": rate})
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
