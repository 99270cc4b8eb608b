"""Micro-benchmark of the waypoint's sans-IO HTTP codecs: µs per request, no sockets.

    .venv/bin/python -m benchmarks.codec_bench [requests]

A typical model-API call: a 1 KB JSON POST with eight headers (bearer token, trace
context) and a 1 KB JSON response, on one keep-alive connection (HTTP/1.1) or one stream
per request (HTTP/2). "server side" is what the waypoint does facing the caller: parse the
request, serialize the response; "client side" faces the backend: serialize the request,
parse the response. A proxied request costs about one of each. Numbers, not assertions.
"""

from __future__ import annotations

import gc
import platform
import sys
import time
from collections.abc import Callable

from agent.waypoint.codec import Data, Headers, Http1Connection, RequestHead, Role
from agent.waypoint.codec.http2 import Http2Connection

BODY = b'{"model":"llama-3-8b","messages":[{"role":"user","content":"' + b"x" * 960 + b'"}]}'
RESPONSE = b'{"id":"c1","choices":[{"message":{"content":"' + b"y" * 970 + b'"}}]}'
REQUEST_HEADERS = Headers.of(
    ("user-agent", "python-httpx/0.27.0"),
    ("accept", "application/json"),
    ("content-type", "application/json"),
    ("content-length", str(len(BODY))),
    ("authorization", "Bearer " + "t" * 180),
    ("x-request-id", "6f1c2a3e-9d4b-4f7a-8e21-0c5b7d9a1e42"),
    ("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
)
RESPONSE_HEADERS = Headers.of(
    ("content-type", "application/json"),
    ("content-length", str(len(RESPONSE))),
    ("x-tokens-used", "312"),
)


def timed(n: int, step: Callable[[], tuple[int, int]]) -> tuple[float, float]:
    """Run `step` n times after a warm-up; return mean µs of its two timed halves."""
    for _ in range(min(n // 10, 1000)):
        step()
    gc.collect()
    gc.disable()
    try:
        a = b = 0
        for _ in range(n):
            x, y = step()
            a += x
            b += y
    finally:
        gc.enable()
    return a / n / 1000, b / n / 1000


def http1_step() -> Callable[[], tuple[int, int]]:
    srv, cli = Http1Connection(Role.SERVER), Http1Connection(Role.CLIENT)
    clock = time.perf_counter_ns

    def step() -> tuple[int, int]:
        t0 = clock()
        sid = cli.next_stream_id()
        wire = cli.send_request_head(sid, "POST", "/v1/chat/completions", "llm:8000", "http",
                                     REQUEST_HEADERS) + cli.send_data(sid, BODY, True)  # fmt: skip
        t1 = clock()
        head = srv.receive_data(wire)[0]
        assert isinstance(head, RequestHead)
        rid = head.stream_id
        out = srv.send_response_head(rid, 200, RESPONSE_HEADERS) + srv.send_data(
            rid, RESPONSE, True
        )
        t2 = clock()
        cli.receive_data(out)
        t3 = clock()
        return t2 - t1, (t1 - t0) + (t3 - t2)

    return step


def http2_step() -> Callable[[], tuple[int, int]]:
    srv, cli = Http2Connection(Role.SERVER), Http2Connection(Role.CLIENT)
    srv.receive_data(cli.data_to_send())
    cli.receive_data(srv.data_to_send())
    srv.receive_data(cli.data_to_send())
    clock = time.perf_counter_ns
    updates = [b""]  # the client's WINDOW_UPDATEs, delivered with its next request

    def step() -> tuple[int, int]:
        t0 = clock()
        sid = cli.next_stream_id()
        wire = updates[0] + cli.send_request_head(sid, "POST", "/v1/chat/completions",
                                                  "llm:8000", "http", REQUEST_HEADERS)  # fmt: skip
        wire += cli.send_data(sid, BODY, True)
        t1 = clock()
        head = srv.receive_data(wire)[0]
        assert isinstance(head, RequestHead)
        rid = head.stream_id
        out = srv.consumed(rid, len(BODY))
        out += srv.send_response_head(rid, 200, RESPONSE_HEADERS)
        out += srv.send_data(rid, RESPONSE, True)
        t2 = clock()
        acks = b""
        for e in cli.receive_data(out):
            if isinstance(e, Data):
                acks += cli.consumed(e.stream_id, len(e.data))
        updates[0] = acks
        t3 = clock()
        return t2 - t1, (t1 - t0) + (t3 - t2)

    return step


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20_000
    python = f"{platform.python_implementation()} {platform.python_version()}"
    print(f"waypoint codec, {n:,} requests of 1 KB JSON each way; {python}, {platform.machine()}")
    print(f"{'protocol':<10}{'server side µs':>16}{'client side µs':>16}{'proxied µs':>12}")
    for name, make in (("HTTP/1.1", http1_step), ("HTTP/2", http2_step)):
        # HTTP/2 stream ids run out after 2**30 streams: a fresh connection per 100k.
        runs = [timed(min(n, 100_000), make()) for _ in range(max(1, n // 100_000))]
        server = sum(r[0] for r in runs) / len(runs)
        client = sum(r[1] for r in runs) / len(runs)
        print(f"{name:<10}{server:>16.1f}{client:>16.1f}{server + client:>12.1f}")


if __name__ == "__main__":
    main()
