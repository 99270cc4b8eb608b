"""`python -m benchmarks` (`make bench`): weft beside the alternatives, side by side, one run.

    python -m benchmarks                       everything (under 15 minutes on 2 CPUs)
    python -m benchmarks --quick               a smoke run (about 2-3 minutes)
    python -m benchmarks --only weft-l4 stunnel controller-scale
    python -m benchmarks --list                scenarios and workloads
    python -m benchmarks --profile             also py-spy the agents and waypoint (needs py-spy)

Builds a lab (benchmarks/lab_suite.py: direct pod-to-pod, weft L4 cross node, weft same
node with the fast path on and off, stunnel and HAProxy sidecar pairs, the weft waypoint
without and with AI policy),
runs every workload against every scenario it applies to, then the controller scale
benchmark (benchmarks/controller_scale.py), and writes results.json, results.md and PNG
plots to benchmarks/results/<timestamp>/. See benchmarks/README.md for how to read them.
Needs root (the lab).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from agent import compiled

RESULTS = Path(__file__).parent / "results"
CONTROLLER_SCALE = "controller-scale"
AGENT_PODS = "agent-pods"


def _first_line(argv: list[str]) -> str:
    try:
        r = subprocess.run(argv, capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "not installed"
    text = (r.stdout + r.stderr).decode(errors="replace").strip().splitlines()
    return text[0] if text else "?"


def _version(dist: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine() -> dict[str, Any]:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    weft = _first_line(
        ["git", "-C", str(Path(__file__).parent.parent), "describe", "--always", "--dirty"]
    )
    stunnel = _first_line(["stunnel", "-version"])
    for line in (
        subprocess.run(["stunnel", "-version"], capture_output=True, check=False)
        .stderr.decode(errors="replace")
        .splitlines()
    ):
        if line.startswith("stunnel "):
            stunnel = line
            break
    return {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        # what runs weft: the interpreter, and how many hot-path modules run compiled
        "runtime": compiled.describe(),
        "platform": platform.platform(),
        "weft": weft,
        "tools": {
            "stunnel": " ".join(stunnel.split()[:2]),
            "haproxy": " ".join(_first_line(["haproxy", "-v"]).split()[:3]),
            "wrk": " ".join(_first_line(["wrk", "-v"]).split()[:2]),
            "iperf3": " ".join(_first_line(["iperf3", "--version"]).split()[:2]),
            "openssl": _first_line(["openssl", "version"]),
            "grpcio": _version("grpcio"),
        },
    }


def _clean(x: Any) -> Any:
    """NaN/inf -> None, so results.json is strict JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_clean(v) for v in x]
    return x


def main(argv: list[str] | None = None) -> int:
    from benchmarks import lab_suite, report

    ap = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--quick", action="store_true", help="short smoke run (~2-3 minutes)")
    ap.add_argument(
        "--only",
        nargs="+",
        metavar="SCENARIO",
        default=[],
        help=f"run only these scenarios (their baselines are added) and/or {CONTROLLER_SCALE}, "
        f"{AGENT_PODS}",
    )
    ap.add_argument(
        "--workloads",
        nargs="+",
        metavar="WORKLOAD",
        default=[],
        help="run only these workloads (see --list); for iterating on one number",
    )
    ap.add_argument("--list", action="store_true", help="list scenarios and workloads, exit")
    ap.add_argument(
        "--profile", action="store_true", help="py-spy weft's processes (weft-l4, weft-waypoint)"
    )
    ap.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    ap.add_argument("--out", type=Path, help="results directory (default: results/<timestamp>)")
    args = ap.parse_args(argv)

    known = set(lab_suite.SCENARIOS) | {CONTROLLER_SCALE, AGENT_PODS}
    if args.list:
        for s in lab_suite.SCENARIOS.values():
            print(f"{s.name:22} {s.title}  [baseline: {s.baseline or '-'}]")
        print(f"{CONTROLLER_SCALE:22} controller: 10,000 workloads, 100 agents, certs/s")
        print(f"{AGENT_PODS:22} an agent's memory with 10 and 200 pods on its node")
        print()
        for w in lab_suite.workloads(args.quick):
            print(f"{w.key:22} {w.title}")
        return 0
    known_w = {w.key for w in lab_suite.workloads(args.quick)}
    bad_w = [w for w in args.workloads if w not in known_w]
    if bad_w:
        ap.error(f"unknown workload(s) {', '.join(bad_w)}; see --list")
    bad = [n for n in args.only if n not in known]
    if bad:
        ap.error(f"unknown scenario(s) {', '.join(bad)}; known: {', '.join(sorted(known))}")
    only = set(args.only)
    lab_only = only - {CONTROLLER_SCALE, AGENT_PODS}
    for name in list(lab_only):
        base = lab_suite.SCENARIOS[name].baseline
        if base:
            lab_only.add(base)
    run_lab = not only or bool(lab_only)
    run_scale = not only or CONTROLLER_SCALE in only
    run_pods = not only or AGENT_PODS in only
    if (run_lab or run_pods) and os.geteuid() != 0:
        ap.error("the lab scenarios need root (network namespaces); run as root")

    stamp = time.strftime("%Y%m%d-%H%M%S")
    out_dir = args.out or RESULTS / stamp
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()

    def progress(msg: str) -> None:
        print(f"bench {time.monotonic() - t0:6.0f}s  {msg}", flush=True)

    doc: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "mode": "quick" if args.quick else "full",
        "machine": machine(),
        "only": sorted(only),
    }
    progress(f"machine: {doc['machine']['cpu']}, {doc['machine']['cpus']} CPUs; out: {out_dir}")
    samples: dict[tuple[str, str], list[float]] = {}
    failed = False
    if run_lab:
        bench = lab_suite.Bench(
            out_dir,
            quick=args.quick,
            only=lab_only,
            progress=progress,
            profile=args.profile,
            workloads=args.workloads,
        )
        try:
            doc["lab"] = report.analyze(bench.run())
        except KeyboardInterrupt:
            progress("interrupted; the lab was torn down")
            raise
        samples = bench.samples
        failed = any(not m["ok"] for m in doc["lab"]["measurements"])
    if run_scale:
        from benchmarks import controller_scale

        progress("controller scale benchmark")
        try:
            doc["controller_scale"] = controller_scale.run(quick=args.quick, progress=progress)
        except Exception as e:  # report and go on: the lab results are still worth writing
            doc["controller_scale"] = {"error": f"{type(e).__name__}: {e}"}
            failed = True
            progress(f"controller scale failed: {e}")
    if run_pods:
        from benchmarks import agent_pods

        progress("agent memory with 10 and 200 pods")
        try:
            doc["agent_pods"] = agent_pods.run(
                (10, 50) if args.quick else (10, 200), progress=progress
            )
        except Exception as e:  # reported; the other results are still worth writing
            doc["agent_pods"] = {"error": f"{type(e).__name__}: {e}"}
            failed = True
            progress(f"agent pods benchmark failed: {e}")
    doc["seconds"] = time.monotonic() - t0
    doc = _clean(doc)
    (out_dir / "results.json").write_text(json.dumps(doc, indent=1) + "\n")
    text = report.markdown(doc)
    (out_dir / "results.md").write_text(text)
    if run_lab and not args.no_plots:
        try:
            written = report.plots(doc, samples, out_dir)
            progress(f"{len(written)} plots")
        except ImportError:
            progress("matplotlib is not installed (pip install -e '.[bench]'): no plots")
    print()
    print(text)
    progress(f"written to {out_dir}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
