"""`python -m benchmarks` (`make bench`): run the scenarios and write results.

Today: the direct pod-to-pod floor (same node and cross node), at a fixed rate of
1,000 req/s over 4 connections with 1 KB requests (Istio's published setup); the
mesh scenarios join as they land.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

from agent.cli.demo import wait_port
from agent.cli.output import table
from agent.lab.manifest import load_manifest
from agent.lab.topology import Lab

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    plan = dataclasses.replace(load_manifest(), name="weft-bench")
    lab = Lab(plan.name)
    rows = []
    try:
        state = lab.up(plan)
        for pod in ("ai/llm-v1-b", "ai/llm-v2"):
            lab.start_process(
                state,
                f"echo-{pod.replace('/', '-')}",
                [sys.executable, "-m", "agent.lab.workloads.echo"],
                pod=pod,
            )
            wait_port(state, pod, 8000)
        for label, target in (
            ("direct, same node", "ai/llm-v1-b"),
            ("direct, cross node", "ai/llm-v2"),
        ):
            out = lab.run(
                "apps/client",
                [
                    sys.executable,
                    "-m",
                    "agent.lab.workloads.loadgen",
                    state.pod(target).ip,
                    "8000",
                    "--rate",
                    "1000",
                    "--connections",
                    "4",
                    "--duration",
                    "10",
                ],
                timeout=60,
            )
            r = json.loads(out.stdout)
            rows.append(
                {"scenario": label, **r["latency_us"], "rps": r["rps"], "errors": r["errors"]}
            )
    finally:
        lab.down()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out_dir = RESULTS / stamp
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = {
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "results": rows,
    }
    (out_dir / "results.json").write_text(json.dumps(doc, indent=2))
    text = table(
        rows,
        [
            ("SCENARIO", "scenario"),
            ("P50 µs", "p50"),
            ("P90 µs", "p90"),
            ("P99 µs", "p99"),
            ("P99.9 µs", "p99_9"),
            ("REQ/S", "rps"),
            ("ERRORS", "errors"),
        ],
    )
    (out_dir / "results.md").write_text(text)
    print(text)
    print(f"written to {out_dir}")


if __name__ == "__main__":
    main()
