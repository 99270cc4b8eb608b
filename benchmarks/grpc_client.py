"""gRPC load generator the benchmark runs inside the client pod (one JSON object on stdout).

    python -m benchmarks.grpc_client unary HOST PORT [--rate R] [-c N] [--duration S]
    python -m benchmarks.grpc_client stream HOST PORT [--messages M] [--rate R] [-c N] ...

A real gRPC client (grpcio, the C core: HTTP/2 framing, HPACK, flow control, trailers and
`grpc-status` all its own) driven by the same open-loop schedule as benchmarks.clients:
calls are due every 1/R seconds, dealt round robin over N channels, each channel one HTTP/2
connection (a local subchannel pool, so channels never share a connection) with one call in
flight; latency counts from the due time, so a stall is charged to every call it delayed
(the coordinated-omission correction wrk2 makes). `--rate 0` is a closed loop.

`unary`: a `--size`-byte message to weft.bench.Echo/Unary (agent.lab.workloads.grpc_echo),
answered with the same bytes. `stream`: one message to ServerStream asking for `--messages`
answers of the same size; the latency is to the end of the stream (its OK status), and the
time to the first message is reported too. A call is an error unless it ends OK with the
expected bytes.

Prints requests, errors, seconds, rps, latency_us (and first_message_us for streams) and the
client's own CPU seconds; `--samples` writes every latency in ns, one per line.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections.abc import Callable

import grpc

from agent.lab.workloads.grpc_echo import MESSAGES_KEY, SERVER_STREAM, UNARY
from agent.lab.workloads.loadrun import Outcome, run_workers, summarize_us, tight_timer_slack
from benchmarks.clients import SIZE, _result, emit

CHANNEL_OPTIONS = (
    ("grpc.use_local_subchannel_pool", 1),  # one connection per channel, never shared
    ("grpc.enable_http_proxy", 0),
    ("grpc.enable_retries", 0),
    ("grpc.max_receive_message_length", 64 << 20),
)

Call = Callable[[], int]  # makes one call; returns ns from its start to its first message


def _make_call(channel: grpc.Channel, mode: str, payload: bytes, messages: int) -> Call:
    if mode == "unary":
        stub = channel.unary_unary(UNARY)

        def unary() -> int:
            t0 = time.perf_counter_ns()
            reply = stub(payload, timeout=10)
            if reply != payload:
                raise ValueError(f"echo answered {len(reply)} bytes, not the {len(payload)} sent")
            return time.perf_counter_ns() - t0

        return unary
    stream = channel.unary_stream(SERVER_STREAM)
    meta = ((MESSAGES_KEY, str(messages)),)

    def server_stream() -> int:
        t0 = time.perf_counter_ns()
        first = 0
        n = 0
        for reply in stream(payload, metadata=meta, timeout=10):
            if n == 0:
                first = time.perf_counter_ns() - t0
            if reply != payload:
                raise ValueError(f"message {n}: {len(reply)} bytes, not {len(payload)}")
            n += 1
        if n != messages:
            raise ValueError(f"stream ended after {n} of {messages} messages")
        return first

    return server_stream


def _describe(e: BaseException) -> str:
    if isinstance(e, grpc.FutureTimeoutError):
        return "no connection within 10 s"
    if isinstance(e, grpc.RpcError):
        return f"{e.code().name}: {e.details()}"
    return f"{type(e).__name__}: {e}"


def _worker(
    call: Call,
    schedule: list[int] | None,
    deadline_ns: int,
    out: Outcome,
    first: list[int],
    start: threading.Barrier,
) -> None:
    start.wait()
    if schedule is None:
        while time.monotonic_ns() < deadline_ns:
            t0 = time.perf_counter_ns()
            try:
                f = call()
            except (grpc.RpcError, ValueError) as e:
                out.fail(_describe(e))
                continue
            out.latencies_ns.append(time.perf_counter_ns() - t0)
            first.append(f)
        return
    for due in schedule:
        now = time.perf_counter_ns()
        if due > now:
            time.sleep((due - now) / 1e9)
        late = max(0, time.perf_counter_ns() - due)
        try:
            f = call()
        except (grpc.RpcError, ValueError) as e:
            out.fail(_describe(e))
            continue
        out.latencies_ns.append(time.perf_counter_ns() - due)
        first.append(late + f)


def run(
    mode: str,
    host: str,
    port: int,
    *,
    rate: float,
    connections: int,
    duration: float,
    warmup: int,
    size: int = SIZE,
    messages: int = 10,
) -> tuple[dict[str, object], list[int]]:
    tight_timer_slack()
    payload = b"x" * size
    channels = [
        grpc.insecure_channel(f"{host}:{port}", options=CHANNEL_OPTIONS) for _ in range(connections)
    ]
    try:
        calls = []
        for ch in channels:
            grpc.channel_ready_future(ch).result(timeout=10)
            calls.append(_make_call(ch, mode, payload, messages))
        # Warm-up calls on the measured channels (connections, streams and pools warm).
        for i in range(warmup):
            calls[i % connections]()
        outs = [Outcome() for _ in range(connections)]
        firsts: list[list[int]] = [[] for _ in range(connections)]
        elapsed = run_workers(
            connections,
            rate,
            duration,
            lambda c, plan, deadline, barrier: _worker(
                calls[c], plan, deadline, outs[c], firsts[c], barrier
            ),
        )
        out, lat = _result(outs, elapsed)
    finally:
        for ch in channels:
            ch.close()
    if mode == "stream":
        out["messages"] = messages
        out["first_message_us"] = summarize_us(x / 1000.0 for f in firsts for x in f)
    return out, lat


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.grpc_client",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("mode", choices=("unary", "stream"))
    ap.add_argument("host")
    ap.add_argument("port", type=int)
    ap.add_argument("--rate", type=float, default=0.0, help="calls/s; 0 = closed loop")
    ap.add_argument("-c", "--connections", type=int, default=1, help="channels (connections)")
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--warmup", type=int, default=100, help="calls made first, uncounted")
    ap.add_argument("--size", type=int, default=SIZE, help="bytes per message")
    ap.add_argument("--messages", type=int, default=10, help="stream: messages per call")
    ap.add_argument("--samples", help="write every latency (ns) to this file, one per line")
    args = ap.parse_args(argv)
    try:
        out, lat = run(
            args.mode,
            args.host,
            args.port,
            rate=args.rate,
            connections=args.connections,
            duration=args.duration,
            warmup=args.warmup,
            size=args.size,
            messages=args.messages,
        )
    except (grpc.RpcError, grpc.FutureTimeoutError, ValueError) as e:
        if args.samples:
            open(args.samples, "w").close()
        json.dump({"requests": 0, "errors": 1, "seconds": 0.0, "rps": 0.0,
                   "first_error": f"setup: {_describe(e)}"}, sys.stdout)  # fmt: skip
        sys.stdout.write("\n")
        return 1
    return emit(out, lat, args.samples)


if __name__ == "__main__":
    sys.exit(main())
