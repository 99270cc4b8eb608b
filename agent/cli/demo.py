"""`weft demo`: the lab end to end, and a table of what was measured.

It builds its own lab (named weft-demo, so a lab you are using is left alone), runs
traffic, prints what it saw and always tears down. Exit code 0 means every step passed.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time

import typer

from agent.cli.output import table
from agent.cli.progress import StepFailed, Steps
from agent.lab.manifest import load_manifest
from agent.lab.topology import Lab, LabState
from agent.netns import call_in

DEMO_LAB = "weft-demo"


def wait_port(state: LabState, pod: str, port: int, timeout: float = 10.0) -> None:
    import socket

    p = state.pod(pod)

    def probe() -> bool:
        try:
            socket.create_connection((p.ip, port), timeout=0.5).close()
            return True
        except OSError:
            return False

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if call_in(p.netns, probe):
            return
        time.sleep(0.05)
    raise StepFailed(f"{pod} is not listening on :{port} after {timeout}s")


def demo(
    keep: bool = typer.Option(False, "--keep", help="Leave the lab up afterwards."),
) -> None:
    """Bring the lab up, drive pod-to-pod traffic, print what was measured, tear down.

    Example: weft demo
    """
    steps = Steps(4)
    plan = dataclasses.replace(load_manifest(), name=DEMO_LAB)
    lab = Lab(DEMO_LAB)
    rows = []
    try:
        with steps.step("building the lab: 2 nodes, 6 pods, 2 namespaces"):
            state = lab.up(plan)
        with steps.step("starting echo servers in ai/llm-v1-b (node-1) and ai/llm-v2 (node-2)"):
            for pod in ("ai/llm-v1-b", "ai/llm-v2"):
                lab.start_process(
                    state,
                    f"echo-{pod.replace('/', '-')}",
                    [sys.executable, "-m", "agent.lab.workloads.echo", "--port", "8000"],
                    pod=pod,
                )
            for pod in ("ai/llm-v1-b", "ai/llm-v2"):
                wait_port(state, pod, 8000)
        with steps.step("driving 1 KB request/response traffic from apps/client"):
            for label, target in (
                ("same node (node-1 -> node-1)", "ai/llm-v1-b"),
                ("cross node (node-1 -> node-2)", "ai/llm-v2"),
            ):
                ip = state.pod(target).ip
                out = lab.run(
                    "apps/client",
                    [
                        sys.executable,
                        "-m",
                        "agent.lab.workloads.loadgen",
                        ip,
                        "8000",
                        "--requests",
                        "2000",
                        "--size",
                        "1024",
                    ],
                )
                if out.returncode != 0:
                    raise StepFailed(
                        f"traffic to {target} failed: "
                        f"{out.stdout.decode()} {out.stderr.decode()[-400:]}"
                    )
                r = json.loads(out.stdout)
                lat = r["latency_us"]
                rows.append(
                    {
                        "path": label,
                        "requests": r["requests"],
                        "errors": r["errors"],
                        "p50": lat["p50"],
                        "p90": lat["p90"],
                        "p99": lat["p99"],
                    }
                )
        with steps.step("tearing down" if not keep else "leaving the lab up (--keep)"):
            if not keep:
                lab.down()
    except BaseException:
        if not keep:
            lab.down()
        raise
    typer.echo("")
    typer.echo("Pod-to-pod TCP in the lab (no mesh yet), round-trip latency in microseconds:")
    typer.echo(
        table(
            rows,
            [
                ("PATH", "path"),
                ("REQUESTS", "requests"),
                ("ERRORS", "errors"),
                ("P50 µs", "p50"),
                ("P90 µs", "p90"),
                ("P99 µs", "p99"),
            ],
        )
    )
