"""An agent's memory with few and with many pods on its node (issue 16: flat in the pods).

    python -m benchmarks.agent_pods [--pods 10 200] [--requests 3]
    python -m benchmarks --only agent-pods

For each pod count N, a two-node lab: N meshed pods on node-1 (four to a service account,
as a Deployment's replicas share theirs, so N/4 workload identities), and an HTTP echo
behind a Service on node-2. Every pod calls the echo through the mesh (`--requests` curl
calls each, a new connection each: tunnel streams, flow records, an original-destination
entry), then the node-1 agent's RSS, PSS and USS, threads and open fds are read after its
flow export has run. The report gives both counts and the growth per pod.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from agent.lab import mesh
from agent.lab.manifest import plan
from agent.lab.topology import Lab, spawn
from benchmarks.lab_suite import memory_mb
from controller.model.yamldoc import load_documents

Progress = Callable[[str], None]
PODS_PER_ACCOUNT = 4
BATCH = 25  # curl processes at once


def manifest(pods: int) -> str:
    lines = [
        "apiVersion: weft.dev/v1alpha1",
        "kind: Lab",
        "metadata: {name: weft-pods}",
        "spec:",
        "  nodes: [{name: node-1}, {name: node-2}]",
        "  namespaces:",
        "    - {name: apps, labels: {weft.dev/mesh: enabled}}",
        "    - {name: svc, labels: {weft.dev/mesh: enabled}}",
        "  pods:",
        "    - {name: echo, namespace: svc, node: node-2, serviceAccount: echo,"
        " labels: {app: echo}}",
    ]
    for i in range(pods):
        sa = f"caller-{i // PODS_PER_ACCOUNT}"
        lines.append(
            f"    - {{name: c-{i:03d}, namespace: apps, node: node-1, serviceAccount: {sa},"
            f" labels: {{app: {sa}}}}}"
        )
    lines += [
        "  services:",
        "    - {name: echo, namespace: svc, selector: {app: echo}, ports: [{port: 8000}]}",
    ]
    return "\n".join(lines) + "\n"


def _agent_pid(state: Any, node: str) -> int:
    return next(p.pid for p in state.processes if p.name == f"agent-{node}")


def _memory(pid: int) -> dict[str, float]:
    p = psutil.Process(pid)
    return {
        **{k: round(v, 1) for k, v in memory_mb(p).items()},
        "threads": p.num_threads(),
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
    }


def one(pods: int, requests: int, progress: Progress) -> dict[str, Any]:
    lab = Lab("weft-pods")
    t = time.monotonic()
    state = lab.up(plan(load_documents(manifest(pods), "pods.yaml")[0]))
    try:
        mesh.install(lab, state, wait=180)
        state = lab.state()
        progress(f"{pods} pods: lab up in {time.monotonic() - t:.0f}s")
        vip = next(s["clusterIP"] for s in state.services if s["name"] == "echo")
        lab.start_process(
            state,
            "srv-echo",
            [sys.executable, "-m", "benchmarks.httpecho", "--port", "8000"],
            pod="svc/echo",
        )
        time.sleep(2)
        idle = _memory(_agent_pid(state, "node-1"))
        callers = [p for p in state.pods if p.namespace == "apps"]
        argv = ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}\\n", "--max-time", "10"]
        argv += [f"http://{vip}:8000/"] * requests
        ok = failed = 0
        for start in range(0, len(callers), BATCH):
            procs = [
                spawn(argv, netns=p.netns, cgroup=Path(p.cgroup), stdout=subprocess.PIPE)
                for p in callers[start : start + BATCH]
            ]
            for proc in procs:
                out, _ = proc.communicate(timeout=120)
                codes = out.decode().split()
                ok += codes.count("200")
                failed += len(codes) - codes.count("200") + (requests - len(codes))
        time.sleep(6)  # the agent's flow export (every second in the lab) has run
        after = _memory(_agent_pid(state, "node-1"))
        progress(
            f"{pods} pods: {ok} requests ok, {failed} failed; node-1 agent "
            f"{after['rss_mb']} MB RSS ({idle['rss_mb']} before the traffic)"
        )
        return {
            "pods": pods,
            "identities": -(-pods // PODS_PER_ACCOUNT),
            "requests_ok": ok,
            "requests_failed": failed,
            "agent_idle": idle,
            "agent_after_traffic": after,
        }
    finally:
        lab.down()


def run(
    pods: tuple[int, ...] = (10, 200), requests: int = 3, progress: Progress = print
) -> dict[str, Any]:
    runs = [one(n, requests, progress) for n in pods]
    out: dict[str, Any] = {"requests_per_pod": requests, "runs": runs}
    if len(runs) >= 2:
        out["growth_per_pod_kb"] = growth(runs[0], runs[-1])
    return out


def growth(lo: dict[str, Any], hi: dict[str, Any]) -> dict[str, float]:
    """KB more per extra pod, after traffic, from the smaller run to the larger."""
    extra = hi["pods"] - lo["pods"]
    a, b = lo["agent_after_traffic"], hi["agent_after_traffic"]
    return {k: round((b[k] - a[k]) * 1024 / extra, 1) for k in ("rss_mb", "pss_mb", "uss_mb")}


def report(doc: dict[str, Any]) -> list[str]:
    if doc.get("error"):
        return ["## Agent memory and pods on its node\n", f"Failed: {doc['error']}\n"]
    rows = []
    for r in doc.get("runs", []):
        a, i = r["agent_after_traffic"], r["agent_idle"]
        rows.append(
            f"| {r['pods']} | {r['identities']} | {r['requests_ok']} / {r['requests_failed']} "
            f"| {i['rss_mb']} | {a['rss_mb']} / {a['pss_mb']} / {a['uss_mb']} "
            f"| {a['threads']} | {a['fds']} |"
        )
    g = doc.get("growth_per_pod_kb") or {}
    return [
        "## Agent memory and pods on its node\n",
        "The node-1 agent after every pod made "
        f"{doc.get('requests_per_pod')} requests through the mesh (new connection each).\n",
        "| pods | identities | requests ok / failed | RSS idle MB | RSS / PSS / USS MB after "
        "| threads | fds |",
        "|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
        f"Growth per pod: RSS {g.get('rss_mb')} KB, PSS {g.get('pss_mb')} KB, USS "
        f"{g.get('uss_mb')} KB.\n",
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--pods", type=int, nargs="+", default=[10, 200])
    ap.add_argument("--requests", type=int, default=3)
    args = ap.parse_args(argv)
    doc = run(tuple(args.pods), args.requests)
    print(json.dumps(doc, indent=1))
    print("\n".join(report(doc)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
