"""Load generators the benchmark runs inside the client pod (one JSON object on stdout).

    python -m benchmarks.clients http HOST PORT [--rate R] [-c N] [--duration S] [--samples F]
        [--path P --body-file F --content-type T]
    python -m benchmarks.clients connrate HOST PORT [--http] [-c N] [--duration S]

`http`: 1 KB HTTP/1.1 POSTs on keep-alive connections, answered by a 1 KB body (the
benchmarks' HTTP echo); or, with `--path`, `--body-file` and `--content-type`, any POST (the
AI workloads send an OpenAI chat completion body to a model server). Only a 200 counts.
Open loop at `--rate` (requests scheduled every 1/R across all connections; latency counts
from the scheduled time, so a stall is charged to every request it delayed: the
coordinated-omission correction wrk2 makes) or closed loop with `--rate 0`.
The same scheduling as agent.lab.workloads.loadgen, which does this for raw TCP echo (both
from agent.lab.workloads.loadrun; the request loops stay here, inline, so that nothing but
the request is timed).

`connrate`: N workers each open a connection, send one 1 KB request, read the whole answer
and close, as fast as they can (closed loop): new connections per second, and the latency of
connect + request + response. `--http` sends an HTTP request with `connection: close`.

Both also report the client's own CPU seconds, so a saturated client can be spotted.
"""

from __future__ import annotations

import argparse
import json
import resource
import socket
import sys
import threading
import time
from collections.abc import Iterable

from agent.lab.workloads.loadrun import (
    Outcome,
    run_threads,
    run_workers,
    summarize,
    tight_timer_slack,
)

SIZE = 1024


def http_request(host: str, size: int = SIZE, close: bool = False) -> bytes:
    return post_request(host, "/echo", b"x" * size, "application/octet-stream", close)


def post_request(
    host: str, path: str, body: bytes, content_type: str, close: bool = False
) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nhost: {host}\r\ncontent-type: {content_type}\r\n"
        f"content-length: {len(body)}\r\n"
    )
    if close:
        head += "connection: close\r\n"
    return head.encode() + b"\r\n" + body


class HttpReader:
    """Reads HTTP/1.1 responses framed by content-length (all the echo server sends) or
    chunked (a proxy may re-frame a body); trailers after the last chunk are skipped."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def response(self) -> int:
        """Read one whole response; its status."""
        while True:
            i = self.buf.find(b"\r\n\r\n")
            if i >= 0:
                break
            self._more()
        head = self.buf[:i].decode("latin-1")
        self.buf = self.buf[i + 4 :]
        lines = head.split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        length = 0
        chunked = False
        for line in lines[1:]:
            k, _, v = line.partition(":")
            name = k.strip().lower()
            if name == "content-length":
                length = int(v.strip())
            elif name == "transfer-encoding" and v.strip().lower().endswith("chunked"):
                chunked = True
        if chunked:
            self._chunks()
            return status
        while len(self.buf) < length:
            self._more()
        self.buf = self.buf[length:]
        return status

    def _line(self) -> bytes:
        while (i := self.buf.find(b"\r\n")) < 0:
            self._more()
        line = self.buf[:i]
        self.buf = self.buf[i + 2 :]
        return line

    def _chunks(self) -> None:
        while True:
            size = int(self._line().split(b";", 1)[0].strip(), 16)
            if size == 0:
                while self._line():  # trailer fields, then the blank line
                    pass
                return
            while len(self.buf) < size + 2:
                self._more()
            if self.buf[size : size + 2] != b"\r\n":
                raise ValueError("chunk not followed by CRLF")
            self.buf = self.buf[size + 2 :]

    def drain(self) -> None:
        while self.sock.recv(65536):
            pass

    def _more(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("server closed the connection mid-response")
        self.buf += data


def _connect(host: str, port: int) -> socket.socket:
    s = socket.create_connection((host, port), timeout=10)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def _http_worker(
    host: str,
    port: int,
    req: bytes,
    schedule: list[int] | None,
    deadline_ns: int,
    out: Outcome,
    start: threading.Barrier,
) -> None:
    try:
        sock = _connect(host, port)
    except OSError as e:
        out.fail(f"connect {host}:{port}: {e}")
        start.wait()
        return
    start.wait()
    rd = HttpReader(sock)
    with sock:
        if schedule is None:
            while time.monotonic_ns() < deadline_ns:
                t0 = time.perf_counter_ns()
                try:
                    sock.sendall(req)
                    status = rd.response()
                except (OSError, ValueError, IndexError) as e:
                    out.fail(e)
                    return
                if status != 200:
                    out.fail(f"HTTP {status}")
                    continue
                out.latencies_ns.append(time.perf_counter_ns() - t0)
            return
        for due in schedule:
            now = time.perf_counter_ns()
            if due > now:
                time.sleep((due - now) / 1e9)
            try:
                sock.sendall(req)
                status = rd.response()
            except (OSError, ValueError, IndexError) as e:
                out.fail(e)
                return
            if status != 200:
                out.fail(f"HTTP {status}")
                continue
            out.latencies_ns.append(time.perf_counter_ns() - due)


def _http_warmup(host: str, port: int, req: bytes, n: int) -> None:
    """n requests on one connection first (connections, caches and pools warm)."""
    with _connect(host, port) as sock:
        rd = HttpReader(sock)
        for _ in range(n):
            sock.sendall(req)
            status = rd.response()
            if status != 200:
                raise ConnectionError(f"warm-up request answered HTTP {status}")


def run_http(
    host: str,
    port: int,
    *,
    rate: float,
    connections: int,
    duration: float,
    warmup: int,
    request: bytes | None = None,
) -> tuple[dict[str, object], list[int]]:
    tight_timer_slack()
    req = request if request is not None else http_request(host)
    if warmup:
        _http_warmup(host, port, req, warmup)
    outs = [Outcome() for _ in range(connections)]
    elapsed = run_workers(
        connections,
        rate,
        duration,
        lambda c, plan, deadline, barrier: _http_worker(
            host, port, req, plan, deadline, outs[c], barrier
        ),
    )
    return _result(outs, elapsed)


def _conn_worker(
    host: str, port: int, http: bool, deadline_ns: int, out: Outcome, start: threading.Barrier
) -> None:
    payload = http_request(host, close=True) if http else b"x" * SIZE
    start.wait()
    while time.monotonic_ns() < deadline_ns:
        t0 = time.perf_counter_ns()
        try:
            with _connect(host, port) as s:
                s.sendall(payload)
                if http:
                    rd = HttpReader(s)
                    status = rd.response()
                    if status != 200:
                        out.fail(f"HTTP {status}")
                        continue
                else:
                    got = 0
                    while got < SIZE:
                        data = s.recv(65536)
                        if not data:
                            raise ConnectionError("closed before the whole answer")
                        got += len(data)
                # Linger-free close; the server side closes after EOF (echo) or at once.
                s.shutdown(socket.SHUT_WR)
        except OSError as e:
            out.fail(e)
            time.sleep(0.001)
            continue
        out.latencies_ns.append(time.perf_counter_ns() - t0)


def run_connrate(
    host: str, port: int, *, http: bool, connections: int, duration: float
) -> tuple[dict[str, object], list[int]]:
    outs = [Outcome() for _ in range(connections)]
    deadline = time.monotonic_ns() + int(duration * 1e9)
    elapsed = run_threads(
        connections, lambda c, start: _conn_worker(host, port, http, deadline, outs[c], start)
    )
    return _result(outs, elapsed)


def _result(outs: list[Outcome], elapsed: float) -> tuple[dict[str, object], list[int]]:
    """The run's summary with the client's own CPU seconds (a saturated client shows)."""
    out, lat = summarize(outs, elapsed)
    ru = resource.getrusage(resource.RUSAGE_SELF)
    out["client_cpu_s"] = ru.ru_utime + ru.ru_stime
    return out, lat


def emit(out: dict[str, object], lat: Iterable[int], samples: str | None) -> int:
    """A client's result: the JSON line on stdout, every latency to `samples`; the exit
    status says whether any request failed."""
    if samples:
        with open(samples, "w") as f:
            f.writelines(f"{x}\n" for x in lat)
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")
    return 0 if not out["errors"] else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.clients",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("mode", choices=("http", "connrate"))
    ap.add_argument("host")
    ap.add_argument("port", type=int)
    ap.add_argument("--rate", type=float, default=0.0, help="http: requests/s; 0 = closed loop")
    ap.add_argument("-c", "--connections", type=int, default=1)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--warmup", type=int, default=100, help="http: requests sent first, uncounted")
    ap.add_argument("--http", action="store_true", help="connrate: HTTP with connection: close")
    ap.add_argument("--samples", help="write every latency (ns) to this file, one per line")
    ap.add_argument("--path", default="/echo", help="http: request path")
    ap.add_argument("--body-file", help="http: POST this file's bytes (default 1 KB of x)")
    ap.add_argument("--content-type", default="application/octet-stream", help="http")
    args = ap.parse_args(argv)
    if args.mode == "http":
        body = b"x" * SIZE
        if args.body_file:
            with open(args.body_file, "rb") as f:
                body = f.read()
        out, lat = run_http(
            args.host,
            args.port,
            rate=args.rate,
            connections=args.connections,
            duration=args.duration,
            warmup=args.warmup,
            request=post_request(args.host, args.path, body, args.content_type),
        )
    else:
        out, lat = run_connrate(
            args.host,
            args.port,
            http=args.http,
            connections=args.connections,
            duration=args.duration,
        )
    return emit(out, lat, args.samples)


if __name__ == "__main__":
    sys.exit(main())
