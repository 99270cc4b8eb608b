"""What one hop of the mesh costs per request, in CPU, bytecodes and Python calls, without the lab.

    python -m benchmarks.hopcost [--hop waypoint|destination] [-n 4000] [-c 4] [--ai]
                                 [--opcodes] [--profile]

The real waypoint and node tunnels in one process over loopback (tests/unit/waypoint_mesh.py:
real certificates, TLS 1.3, HBONE, authorization), HTTP/1.1 1 KB POSTs answered by 1 KB
from the benchmarks' echo over `-c` kept-alive connections through a waypoint-bound
Service. The hop being measured runs on an event loop (uvloop) of its own thread; the
rest (clients, the other tunnel, the backend) on the main thread. Three numbers per run:

- CPU per request of the hop's thread (CLOCK_THREAD_CPUTIME_ID), system calls and TLS
  included. Noisy (the threads share the GIL and the machine), so read it across runs;
- bytecode instructions per request in that thread (`Bytecodes`, a third and shorter
  pass): the same code path gives the same count run after run, and it is the number
  that follows the lab's cost. perf on the lab's waypoint puts about 70 % of its CPU in
  the interpreter, and a change that only folds functions into their callers (fewer
  calls, the same instructions) did not move the lab's figures;
- Python calls per request in that thread, counted by cProfile in a second pass, also
  exact run to run. The destination's agent (`--hop destination`, the same HBONE stream
  relayed to the backend) makes about 13.

`--ai` sends OpenAI chat completions (about 1 KB) through a Service with a TokenRateLimit
that never denies and a ModelRoute, as make bench's weft-waypoint-ai does: the plain path
plus the AI stages, with the counters in an SQLite file as there (`--quota-store` picks
another store). `--sse` streams chat completions from the model server as make bench's
sse-ttft does (a response head, then a chunk per token): what the waypoint spends relaying
a stream. `--opcodes` adds the bytecodes by module and the 25 functions that execute most.
`--profile` adds the hop's Python time by module and its 25 most expensive functions
(cProfile's own time: inflated by the profiler, and most for small functions). The hop
shares the GIL with the main thread: code that releases it (SQLite's statements) pays
for taking it back here, which a waypoint process alone does not.

A development tool for issue 13, not part of `make bench`: the lab's numbers (CPU from
cgroups, pinned, beside HAProxy) are the ones targets are judged by. Numbers, not
assertions: nothing in the tests depends on them.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import importlib
import os
import pstats
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import uvloop

from agent import compiled
from agent.lab.workloads.model_server import Behaviour
from benchmarks import lab_suite

BODY = b"x" * 1024
WARMUP = 300  # requests per connection before anything is measured
OPCODE_REQUESTS = 400  # requests (in all) whose bytecodes are counted


class _Hop:
    """The measured component's event loop, on a thread of its own."""

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self.ident = 0
        self.started = threading.Event()
        self.error: BaseException | None = None

    async def start(self, start: Callable[[], Awaitable[None]]) -> None:
        def run() -> None:
            loop = self.loop = uvloop.new_event_loop()
            asyncio.set_event_loop(loop)
            self.ident = threading.get_ident()
            try:
                loop.run_until_complete(start())
            except BaseException as e:
                self.error = e
                self.started.set()
                return
            self.started.set()
            loop.run_forever()
            # What the component ran on the loop's default executor (the SQLite quota
            # store closes there) ends with the loop, not as a stray thread.
            loop.run_until_complete(loop.shutdown_default_executor())
            loop.close()

        threading.Thread(target=run, name="hop", daemon=True).start()
        await asyncio.to_thread(self.started.wait)
        if self.error is not None:
            raise self.error

    def cpu(self) -> float:
        return time.clock_gettime(time.pthread_getcpuclockid(self.ident))

    async def stop(self, shutdown: Callable[[], Coroutine[Any, Any, Any]]) -> None:
        """Shut the component down on its own loop, then stop that loop."""
        assert self.loop is not None
        await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(shutdown(), self.loop))
        self.loop.call_soon_threadsafe(self.loop.stop)

    def call(self, fn: Callable[[], Any]) -> None:
        """Run `fn` on the hop's loop and wait for it."""
        assert self.loop is not None
        done = threading.Event()

        def run() -> None:
            try:
                fn()
            finally:
                done.set()

        self.loop.call_soon_threadsafe(run)
        done.wait(10)


def calls_per_request(stats: pstats.Stats, n: int) -> tuple[float, Counter[str], Counter[str]]:
    """Python calls per request in a profile of `n` requests (C functions excluded), and
    own time in µs per request by module and by function."""
    calls = 0
    by_module: Counter[str] = Counter()
    by_function: Counter[str] = Counter()
    for (file, line, name), (_, nc, tt, _, _) in stats.stats.items():  # type: ignore[attr-defined]
        if file == "~":
            continue
        calls += nc
        module = _short(file)
        by_module[module] += tt / n * 1e6
        by_function[f"{module}:{line} {name}"] += tt / n * 1e6
    return calls / n, by_module, by_function


class Bytecodes:
    """Counts the bytecode instructions the thread that calls `start` executes, by function
    (sys.settrace with opcode events). The lab's waypoint spends about 70 % of its CPU in
    the interpreter (perf, docs/performance.md), and what it costs follows the instructions
    a request executes, not the number of calls: folding a function into its caller saves
    a call and none of the work."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def start(self) -> None:
        counts = self.counts

        def on_call(frame: Any, event: str, arg: Any) -> Any:
            frame.f_trace_opcodes = True
            code = frame.f_code
            key = f"{_short(code.co_filename)}:{code.co_firstlineno} {code.co_name}"
            if code.co_filename == "<string>":  # a dataclass's generated __init__: whose
                key += f" ({type(frame.f_locals.get('self')).__name__})"

            def on_opcode(frame: Any, event: str, arg: Any) -> Any:
                if event == "opcode":
                    counts[key] += 1
                return on_opcode

            return on_opcode

        sys.settrace(on_call)

    def stop(self) -> None:
        sys.settrace(None)

    def by(self, group: Callable[[str], str]) -> Counter[str]:
        out: Counter[str] = Counter()
        for k, v in self.counts.items():
            out[group(k)] += v
        return out


def _short(path: str) -> str:
    root = str(Path(__file__).resolve().parent.parent) + os.sep
    return path[len(root) :] if path.startswith(root) else Path(path).name


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    # The test suite's in-process mesh (tests are not type-checked: imported by name).
    wm: Any = importlib.import_module("tests.unit.waypoint_mesh")
    Backend, WaypointMesh = wm.Backend, wm.WaypointMesh

    hop = _Hop()
    with tempfile.TemporaryDirectory(prefix="hopcost-") as tmp:
        if getattr(args, "ai", False):
            # An OpenAI chat completion (about 1 KB) through a Service with a TokenRateLimit
            # that never denies and a ModelRoute: the plain path plus the AI stages.
            m = WaypointMesh(
                Path(tmp),
                backends=[
                    Backend("small-a", app="small", model=lab_suite.AI_MODEL, waypoint=False)
                ],
                frontends=["echo"],
                extra={"ai.yaml": lab_suite.ai_policy("ai", "echo", "small", 8000)},
                # make bench's waypoints keep TokenRateLimit counters in the node's SQLite
                # file; `--quota-store memory` leaves the store out of the figures.
                settings={"quota_store": args.quota_store or str(Path(tmp) / "quota.db")},
            )
            path, body, ctype = lab_suite.AI_PATH, lab_suite.ai_chat_body(), "application/json"
        elif getattr(args, "sse", False):
            # A streamed chat completion from the lab's model server as make bench's sse-ttft
            # runs it (the first token after 1 ms, then one every 0.5 ms), no AI policy: the
            # waypoint relays a response head and one chunk per token.
            spec = lab_suite.SSE_SERVER
            behaviour = Behaviour(ttft=spec["ttft"], tpot=spec["tpot"], tokens=int(spec["tokens"]))
            m = WaypointMesh(
                Path(tmp), backends=[Backend("model-1", app="echo", behaviour=behaviour)]
            )
            path, ctype = lab_suite.AI_PATH, "application/json"
            body = lab_suite.ai_chat_body(stream=True)
        else:
            m = WaypointMesh(Path(tmp), backends=[Backend("echo-1", app="echo", kind="echo")])
            path, body, ctype = "/echo", BODY, "text/plain"
        component: Any = m.waypoint if args.hop == "waypoint" else m.tunnels["node-2"]
        # The mesh starts and stops it (Waypoint.drain, Tunnel.close) on the hop's thread.
        start = component.start
        component.start = lambda: hop.start(start)
        stop_name = "drain" if args.hop == "waypoint" else "close"
        shutdown = getattr(component, stop_name)

        async def stopped() -> None:
            await hop.stop(shutdown)

        setattr(component, stop_name, stopped)
        async with m:
            conns = [await m.connect("echo") for _ in range(args.connections)]

            async def load(n: int) -> None:
                async def one(c: Any) -> None:
                    for _ in range(n):
                        r = await c.request("POST", path, body, {"content-type": ctype})
                        if r.status != 200:
                            raise RuntimeError(f"the mesh answered {r.status}: {r.body[:200]!r}")

                await asyncio.gather(*(one(c) for c in conns))

            await load(WARMUP)
            per = args.requests // args.connections
            n = per * args.connections
            c0 = hop.cpu()
            await load(per)
            cpu_us = (hop.cpu() - c0) / n * 1e6
            prof = cProfile.Profile()
            hop.call(prof.enable)
            await load(per)
            hop.call(prof.disable)
            # A third pass, shorter (tracing every instruction is slow), counting bytecodes.
            ops_per = max(1, min(per, OPCODE_REQUESTS // args.connections))
            counter = Bytecodes()
            hop.call(counter.start)
            await load(ops_per)
            hop.call(counter.stop)
            for c in conns:
                await c.close()
    calls, by_module, by_function = calls_per_request(pstats.Stats(prof), n)
    ops_n = ops_per * args.connections
    return {
        "bytecodes_per_request": round(sum(counter.counts.values()) / ops_n),
        "bytecodes_by_module": {
            k: round(v / ops_n) for k, v in counter.by(lambda f: f.split(":")[0]).most_common(15)
        },
        "bytecodes_by_function": {k: round(v / ops_n) for k, v in counter.counts.most_common(25)},
        "hop": args.hop,
        "requests": n,
        "connections": args.connections,
        "cpu_us_per_request": round(cpu_us, 1),
        "python_calls_per_request": round(calls, 1),
        "by_module_us": {k: round(v, 2) for k, v in by_module.most_common(15)},
        "by_function_us": {k: round(v, 2) for k, v in by_function.most_common(25)},
    }


def _print_tables(title: str, by_module: dict[str, float], by_function: dict[str, float]) -> None:
    for what, rows in (("by module", by_module), ("by function", by_function)):
        print(f"\n{title}, {what}:")
        for k, v in rows.items():
            print(f"  {v:10.2f}  {k}" if isinstance(v, float) else f"  {v:10d}  {k}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hop", choices=("waypoint", "destination"), default="waypoint")
    ap.add_argument("-n", "--requests", type=int, default=4000)
    ap.add_argument("-c", "--connections", type=int, default=4)
    ap.add_argument(
        "--ai", action="store_true", help="chat completions through TokenRateLimit + ModelRoute"
    )
    ap.add_argument(
        "--quota-store",
        metavar="SPEC",
        help="--ai: the TokenRateLimit store (default: an SQLite file, as in make bench)",
    )
    ap.add_argument(
        "--sse", action="store_true", help="streamed chat completions (SSE), as sse-ttft"
    )
    ap.add_argument("--profile", action="store_true", help="Python time by module and function")
    ap.add_argument("--opcodes", action="store_true", help="bytecodes by module and function")
    args = ap.parse_args(argv)
    sys.setswitchinterval(0.001)  # the measured thread gets the GIL back promptly
    r = uvloop.run(_run(args))
    print(f"runtime: {compiled.describe()}")
    print(
        f"{r['hop']}: {r['cpu_us_per_request']} µs CPU, {r['bytecodes_per_request']} bytecodes "
        f"and {r['python_calls_per_request']} Python calls per request ({r['requests']} "
        f"requests over {r['connections']} connections)"
    )
    if args.opcodes:
        _print_tables("bytecodes per request", r["bytecodes_by_module"], r["bytecodes_by_function"])
    if args.profile:
        _print_tables(
            "Python own time per request (cProfile, inflated), µs",
            r["by_module_us"],
            r["by_function_us"],
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
