"""What an L7 hop costs in Python at the least, beside HAProxy's, on this machine.

    python -m benchmarks.pyfloor [--rate 1000 -c 4 --duration 5] [--rounds 2]

A yardstick for the waypoint's CPU target (issue 13), not a product path: it tells apart
what Python costs per request from what weft's waypoint adds on top. Two proxies run side
by side on loopback, each pinned alone to the last CPU, in front of the benchmarks' HTTP
echo (benchmarks/httpecho.py) on the other: HAProxy in HTTP mode (one thread, no logging)
and `MinimalProxy` below, which does the least an HTTP/1.1 proxy in Python does per
request: parse the request head with llhttp (httptools, as the waypoint's codec does),
rebuild it with one added field, send it on a kept-alive upstream connection, parse the
response head, rebuild it and send it back, on uvloop. No TLS on either, no policy,
metrics or logging. The load is benchmarks.clients' open-loop HTTP client (1 KB POSTs
answered by 1 KB) at a fixed rate; each proxy's CPU time from the scheduler
(/proc/PID/task/*/schedstat, in ns) is divided by the requests it carried, warm-up included.

One JSON object per proxy and round on stdout; a summary on stderr. Numbers, not
assertions: nothing in the tests depends on them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

WARMUP = 200  # requests each client sends before its measured run (benchmarks.clients)

HAPROXY_CFG = """global
  nbthread 1
defaults
  mode http
  timeout connect 5s
  timeout client 30s
  timeout server 30s
frontend fe
  bind 127.0.0.1:{port}
  default_backend be
backend be
  http-reuse always
  server s1 127.0.0.1:{upstream}
"""


# --------------------------------------------------------------------------- the proxy


class _Up(asyncio.Protocol):
    """The kept-alive upstream connection of one downstream connection."""

    def __init__(self, down: _Down) -> None:
        import httptools

        self.down = down
        self.parser = httptools.HttpResponseParser(self)
        self.fields: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.fields.append((name, value))

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        out = [b"HTTP/1.1 %d OK\r\n" % self.parser.get_status_code()]
        out += [n + b": " + v + b"\r\n" for n, v in self.fields]
        out.append(b"\r\n")
        out += self.body
        self.fields, self.body = [], []
        self.down.transport.write(b"".join(out))


class _Down(asyncio.Protocol):
    """One client connection: each request is forwarded as soon as it is complete."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        import httptools

        self.upstream = upstream
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.fields: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.up: _Up | None = None
        self.waiting: list[bytes] = []
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        _, up = await loop.create_connection(lambda: _Up(self), *self.upstream)
        self.up = up
        for data in self.waiting:
            up.transport.write(data)
        self.waiting = []

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.fields.append((name, value))

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        out = [self.parser.get_method() + b" " + self.url + b" HTTP/1.1\r\n"]
        out += [n + b": " + v + b"\r\n" for n, v in self.fields]
        out.append(b"x-forwarded-for: 127.0.0.1\r\n\r\n")
        out += self.body
        self.url, self.fields, self.body = b"", [], []
        data = b"".join(out)
        if self.up is None:
            self.waiting.append(data)
        else:
            self.up.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.up is not None:
            self.up.transport.close()


def serve_minimal(port: int, upstream: int) -> None:
    """Run MinimalProxy on 127.0.0.1:port in front of 127.0.0.1:upstream, until killed."""
    import uvloop

    async def main() -> None:
        loop = asyncio.get_running_loop()
        await loop.create_server(lambda: _Down(("127.0.0.1", upstream)), "127.0.0.1", port)
        await asyncio.Event().wait()

    uvloop.run(main())


# --------------------------------------------------------------------------- the runner


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cpu_ns(pid: int) -> int:
    """Nanoseconds on a CPU so far, all threads of `pid` (schedstat's first field: the
    scheduler's own account, where /proc/PID/stat has 10 ms ticks)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            total += int((task / "schedstat").read_text().split()[0])
    return total


def _wait_port(port: int, limit: float = 10.0) -> None:
    deadline = time.monotonic() + limit
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {limit:g}s")
        time.sleep(0.05)


def run(rate: float, conns: int, duration: float, rounds: int) -> list[dict[str, Any]]:
    cpus = sorted(os.sched_getaffinity(0))
    proxy_cpu, other_cpu = str(cpus[-1]), str(cpus[0])
    py = sys.executable
    echo, hap, mini = _free_port(), _free_port(), _free_port()
    with tempfile.TemporaryDirectory(prefix="pyfloor-") as tmp:
        cfg = Path(tmp) / "haproxy.cfg"
        cfg.write_text(HAPROXY_CFG.format(port=hap, upstream=echo))
        ports = (str(mini), str(echo))
        procs = {
            "echo": subprocess.Popen(
                ["taskset", "-c", other_cpu, py, "-m", "benchmarks.httpecho", "--port", str(echo)]
            ),
            "haproxy": subprocess.Popen(["taskset", "-c", proxy_cpu, "haproxy", "-f", str(cfg)]),
            "python": subprocess.Popen(
                ["taskset", "-c", proxy_cpu, py, "-m", "benchmarks.pyfloor", "--serve", *ports]
            ),
        }
        try:
            for port in (echo, hap, mini):
                _wait_port(port)
            out = []
            for r in range(rounds):
                for name, port in (("haproxy", hap), ("python", mini)):
                    pid = procs[name].pid
                    before = _cpu_ns(pid)
                    argv = ["taskset", "-c", other_cpu, py, "-m", "benchmarks.clients", "http"]
                    argv += ["127.0.0.1", str(port), "--rate", f"{rate:g}", "-c", str(conns)]
                    argv += ["--duration", f"{duration:g}", "--warmup", str(WARMUP)]
                    done = subprocess.run(
                        argv, check=True, capture_output=True, timeout=duration + 60
                    )
                    res = json.loads(done.stdout)
                    cpu_ns = _cpu_ns(pid) - before
                    n = res["requests"] + WARMUP  # the warm-up requests are in the CPU too
                    row = {
                        "round": r + 1,
                        "proxy": name,
                        "rate": rate,
                        "connections": conns,
                        "requests": res["requests"],
                        "errors": res["errors"],
                        "p50_us": res["latency_us"]["p50"],
                        "cpu_us_per_request": round(cpu_ns / max(1, n) / 1000, 1),
                    }
                    out.append(row)
                    print(json.dumps(row))
            return out
        finally:
            for proc in procs.values():
                proc.terminate()
            for proc in procs.values():
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(5)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rate", type=float, default=1000, help="requests/s (0: closed loop)")
    ap.add_argument("-c", "--connections", type=int, default=4)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument(
        "--serve", nargs=2, type=int, metavar=("PORT", "UPSTREAM"), help=argparse.SUPPRESS
    )
    a = ap.parse_args(argv)
    if a.serve:
        serve_minimal(*a.serve)
        return 0
    rows = run(a.rate, a.connections, a.duration, a.rounds)
    for name in ("haproxy", "python"):
        cpu = [r["cpu_us_per_request"] for r in rows if r["proxy"] == name]
        print(f"{name:8} CPU per request: {', '.join(f'{c:g}' for c in cpu)} µs", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
