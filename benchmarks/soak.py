"""Soak: the mesh under steady load for minutes, and whether anything grows.

    python -m benchmarks.soak [--minutes 10] [--rate 300] [--out DIR]      (make soak)

A two-node lab: a client pod calls an HTTP echo on the other node through weft L4 (keep-alive
connections, open loop at --rate) and through a waypoint, and opens a new connection per
request at a steady rate besides (each leaves a closed flow, an original-destination
entry and a TIME_WAIT to clean up). Every 30 s it samples, per weft process (both agents,
the waypoint, the controller): RSS, open file descriptors and threads; and per node, the
entries of each pinned eBPF hash map. The report gives the first and last sample and the
growth, and the load generators' errors. A leak shows as growth that keeps going, not as
a high first value.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from agent.lab import mesh
from agent.lab.manifest import plan
from agent.lab.topology import Lab
from controller.model.yamldoc import load_documents

MANIFEST = """
apiVersion: weft.dev/v1alpha1
kind: Lab
metadata: {name: weft-soak}
spec:
  nodes: [{name: node-1}, {name: node-2}]
  namespaces:
    - {name: apps, labels: {weft.dev/mesh: enabled}}
    - {name: svc, labels: {weft.dev/mesh: enabled}}
  pods:
    - {name: client, namespace: apps, node: node-1, serviceAccount: client, labels: {app: client}}
    - {name: echo, namespace: svc, node: node-2, serviceAccount: echo, labels: {app: echo}}
    # Its own pod: a pod behind a waypoint is not reachable on that port directly.
    - {name: echo-l7, namespace: svc, node: node-2, serviceAccount: echo, labels: {app: echo7}}
    - {name: waypoint, namespace: svc, node: node-1, serviceAccount: waypoint,
       labels: {weft.dev/waypoint: wp, weft.dev/mesh: disabled}}
  services:
    - {name: echo, namespace: svc, selector: {app: echo}, ports: [{port: 8000}]}
    - {name: echo-l7, namespace: svc, selector: {app: echo7},
       labels: {weft.dev/use-waypoint: wp}, ports: [{port: 8000, appProtocol: http}]}
"""
SAMPLE_EVERY = 30.0


def _vip(state: Any, name: str) -> str:
    return next(s["clusterIP"] for s in state.services if s["name"] == name)


def process_sample(pid: int) -> dict[str, float]:
    p = psutil.Process(pid)
    return {
        "rssMB": round(p.memory_info().rss / 2**20, 1),
        "fds": float(len(os.listdir(f"/proc/{pid}/fd"))),
        "threads": float(p.num_threads()),
    }


def _bpftool(*args: str) -> Any:
    """bpftool's JSON answer, or None when it refuses (a pin that is not a map)."""
    out = subprocess.run(["bpftool", "-j", *args], check=False, capture_output=True, text=True)
    return json.loads(out.stdout or "null") if out.returncode == 0 else None


def map_entries(pin_root: str) -> dict[str, int]:
    """Entries of every pinned hash map under the node's pin root (bpftool)."""
    out: dict[str, int] = {}
    for f in sorted(Path(pin_root).rglob("*")):
        if not f.is_file():
            continue
        info = _bpftool("map", "show", "pinned", str(f))
        if info is None or "hash" not in str(info.get("type", "")):
            continue  # a program, a link, or not a hash map
        dump = _bpftool("map", "dump", "pinned", str(f))
        if dump is not None:
            out[info.get("name") or f.name] = len(dump)
    return out


def sample(state: Any) -> dict[str, Any]:
    procs = {}
    for p in state.processes:
        if p.name.startswith(("agent-", "waypoint-")) or p.name == mesh.CONTROLLER:
            try:
                procs[p.name] = process_sample(p.pid)
            except (psutil.Error, OSError):
                continue
    maps = {n.name: map_entries(n.bpffs) for n in state.nodes}
    return {"t": time.time(), "processes": procs, "maps": maps}


def run(minutes: float, rate: float, out: Path) -> dict[str, Any]:
    lab = Lab("weft-soak")
    state = lab.up(plan(load_documents(MANIFEST, "soak.yaml")[0]))
    try:
        mesh.install(lab, state, wait=120)
        state = lab.state()
        secs = int(minutes * 60)
        py = sys.executable
        loads = {
            "l4": [
                py,
                "-m",
                "benchmarks.clients",
                "http",
                _vip(state, "echo"),
                "8000",
                "--rate",
                str(rate),
                "-c",
                "4",
                "--duration",
                str(secs),
            ],
            "l7": [
                py,
                "-m",
                "benchmarks.clients",
                "http",
                _vip(state, "echo-l7"),
                "8000",
                "--rate",
                str(rate / 2),
                "-c",
                "4",
                "--duration",
                str(secs),
            ],
            "connrate": [
                py,
                "-m",
                "benchmarks.clients",
                "connrate",
                _vip(state, "echo"),
                "8000",
                "--http",
                "-c",
                "1",
                "--duration",
                str(secs),
            ],
        }
        for pod in ("svc/echo", "svc/echo-l7"):
            argv = [py, "-m", "benchmarks.httpecho", "--port", "8000"]
            lab.start_process(state, f"srv-{pod.split('/')[1]}", argv, pod=pod)
        time.sleep(3)  # the echo server and the waypoint take their first connections
        for name, argv in loads.items():
            lab.start_process(state, f"load-{name}", argv, pod="apps/client")
        state = lab.state()
        samples = [sample(state)]
        end = time.monotonic() + secs
        while time.monotonic() < end:
            time.sleep(min(SAMPLE_EVERY, max(0.0, end - time.monotonic())))
            samples.append(sample(state))
        time.sleep(5)  # the load generators print their results
        results = {}
        for name in loads:
            log = Path(state.run_dir) / "logs" / f"load-{name}.log"
            lines = [x for x in log.read_text().splitlines() if x.startswith("{")]
            results[name] = json.loads(lines[-1]) if lines else {"error": "no result"}
        doc = {"minutes": minutes, "rate": rate, "samples": samples, "load": results}
        out.mkdir(parents=True, exist_ok=True)
        (out / "soak.json").write_text(json.dumps(doc, indent=1))
        (out / "soak.md").write_text(report(doc))
        return doc
    finally:
        lab.down()


def report(doc: dict[str, Any]) -> str:
    first, last = doc["samples"][0], doc["samples"][-1]
    lines = [
        f"# weft soak: {doc['minutes']:g} minutes at {doc['rate']:g} req/s L4 "
        f"+ {doc['rate'] / 2:g} req/s through the waypoint + a new connection per request",
        "",
        "| process | RSS MB start → end | fds start → end | threads start → end |",
        "|---|---:|---:|---:|",
    ]
    for name, a in sorted(first["processes"].items()):
        b = last["processes"].get(name, a)
        lines.append(
            f"| {name} | {a['rssMB']:g} → {b['rssMB']:g} | {a['fds']:g} → {b['fds']:g} "
            f"| {a['threads']:g} → {b['threads']:g} |"
        )
    lines += ["", "| node | eBPF map | entries start → end |", "|---|---|---:|"]
    for node, maps in sorted(last["maps"].items()):
        for m, n in sorted(maps.items()):
            lines.append(f"| {node} | {m} | {first['maps'].get(node, {}).get(m, 0)} → {n} |")
    lines += ["", "| load | requests | errors |", "|---|---:|---:|"]
    for name, r in sorted(doc["load"].items()):
        lines.append(
            f"| {name} | {r.get('requests', r.get('connections', '-'))} | {r.get('errors', '-')} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.soak",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--rate", type=float, default=300.0, help="L4 requests/s (half via L7)")
    ap.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).parent / "results" / time.strftime("soak-%Y%m%d-%H%M%S"),
    )
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        ap.error("the soak runs a lab: run as root")
    doc = run(args.minutes, args.rate, args.out)
    sys.stdout.write(report(doc))
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
