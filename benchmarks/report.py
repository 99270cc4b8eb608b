"""Turning a run into results.json, results.md and PNG plots.

`analyze` adds the derived numbers (latency added over each scenario's baseline, ratios of
weft against the baselines) to the raw document; `markdown` renders it; `plots` draws the
latency distributions. All but `plots` are pure and unit-tested.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from benchmarks.stats import (
    PERCENTILES,
    added,
    nines,
    per_thousand,
    percentile_curve,
    percentile_key,
    ratio,
)

WEFT = ("weft-l4", "weft-waypoint", "weft-waypoint-ai")
# (scenario, the same path without one feature, what the difference is): stage costs.
STAGES = (("weft-waypoint-ai", "weft-waypoint", "AI policy stages"),)
DASH, MINUS, TIMES = "\u2013", "\u2212", "\u00d7"  # en dash, minus, times
BASELINES = ("stunnel", "haproxy")
MIN_ADDED_US = 20.0  # added latency below this is within run-to-run noise: no ratio of it


# --------------------------------------------------------------------------- analysis


def index(doc: Mapping[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    """(workload key, scenario) -> measurement."""
    return {(m["workload"], m["scenario"]): m for m in doc.get("measurements", [])}


def analyze(doc: dict[str, Any]) -> dict[str, Any]:
    """Fill in added latency over the baseline and the weft/baseline ratios, in place.
    `doc` is the lab part of a run: scenarios, workloads, measurements."""
    idx = index(doc)
    scen = doc.get("scenarios", {})
    for m in doc.get("measurements", []):
        base = (scen.get(m["scenario"]) or {}).get("baseline")
        b = idx.get((m["workload"], base)) if base else None
        if b is not None and m.get("ok") and b.get("ok") and m.get("latency_us"):
            m["added_us"] = added(m["latency_us"], b["latency_us"])
            m["baseline"] = base
            if b.get("rps") and m.get("rps"):
                m["rps_vs_baseline"] = ratio(m["rps"], b["rps"])
            mb, bb = m.get("extra", {}).get("MBps"), b.get("extra", {}).get("MBps")
            if mb and bb:
                m["throughput_vs_baseline"] = ratio(mb, bb)
        elif b is not None and m.get("extra", {}).get("MBps"):
            m["baseline"] = base
            m["throughput_vs_baseline"] = ratio(m["extra"]["MBps"], b.get("extra", {}).get("MBps"))
    doc["ratios"] = weft_ratios(doc)
    doc["stage_costs"] = stage_costs(doc)
    return doc


def stage_costs(doc: Mapping[str, Any]) -> list[dict[str, Any]]:
    """What a feature costs on the same path, same workload, same run: latency percentiles
    (µs) and proxy CPU per 1,000 requests of the scenario minus its STAGES reference."""
    idx = index(doc)
    out = []
    for w in doc.get("workloads", []):
        for scen, ref, what in STAGES:
            a, b = idx.get((w["key"], scen)), idx.get((w["key"], ref))
            if not a or not b or not a.get("ok") or not b.get("ok"):
                continue
            la, lb = a.get("latency_us") or {}, b.get("latency_us") or {}
            ca, cb = a.get("cpu_per_1k_total"), b.get("cpu_per_1k_total")
            row: dict[str, Any] = {"workload": w["key"], "scenario": scen, "reference": ref}
            row["what"] = what
            row["latency_us"] = added(la, lb)
            row["cpu_per_1k"] = (
                ca - cb if isinstance(ca, int | float) and isinstance(cb, int | float) else None
            )
            row["cpu_ratio"] = ratio(ca, cb)
            out.append(row)
    return out


def _metric(m: Mapping[str, Any] | None, name: str) -> float | None:
    if m is None or not m.get("ok", True):
        return None
    if name.startswith("added_"):
        return (m.get("added_us") or {}).get(name[len("added_") :])
    if name == "cpu_per_1k":
        return m.get("cpu_per_1k_total")
    if name == "rps":
        return m.get("rps")
    if name == "MBps":
        return (m.get("extra") or {}).get("MBps")
    return (m.get("latency_us") or {}).get(name)


def weft_ratios(doc: Mapping[str, Any]) -> list[dict[str, Any]]:
    """weft ÷ baseline for each workload both ran: added p50/p99, proxy CPU per 1,000
    requests, requests/s and MB/s (whichever the workload reports)."""
    idx = index(doc)
    out = []
    for w in doc.get("workloads", []):
        key = w["key"]
        for weft in WEFT:
            a = idx.get((key, weft))
            if a is None or not a.get("ok"):
                continue
            for base in BASELINES:
                b = idx.get((key, base))
                if b is None or not b.get("ok"):
                    continue
                row: dict[str, Any] = {"workload": key, "weft": weft, "baseline": base}
                for name in ("added_p50", "added_p99", "cpu_per_1k", "rps", "MBps"):
                    if name == "rps" and w.get("kind") not in ("max", "connrate"):
                        continue  # a fixed-rate run's req/s is the rate asked for
                    va, vb = _metric(a, name), _metric(b, name)
                    if va is None or vb is None:
                        continue
                    if name.startswith("added_") and (va < MIN_ADDED_US or vb < MIN_ADDED_US):
                        continue  # a ratio of noise around zero means nothing
                    row[name] = ratio(va, vb)
                out.append(row)
    return out


# --------------------------------------------------------------------------- markdown


def fmt(v: Any, digits: int = 0) -> str:
    if v is None:
        return DASH
    if isinstance(v, float):
        if math.isnan(v):
            return DASH
        if digits == 0 and abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.{digits}f}"
    return str(v)


def md_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub Markdown table; numbers right-aligned."""
    rows = [[str(c) for c in r] for r in rows]
    align = []
    for i in range(len(headers)):
        numeric = rows and all(_looks_numeric(r[i]) for r in rows if i < len(r))
        align.append("---:" if numeric else "---")
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _looks_numeric(s: str) -> bool:
    t = s.replace(",", "").replace(TIMES, "").replace("+", "").replace(MINUS, "").strip()
    if t in (DASH, ""):
        return True
    try:
        float(t.lstrip("-"))
        return True
    except ValueError:
        return False


def _signed(v: float | None) -> str:
    if v is None or math.isnan(v):
        return DASH
    return f"+{v:.0f}" if v >= 0 else f"{MINUS}{-v:.0f}"


def _x(v: float | None) -> str:
    if v is None or math.isnan(v):
        return DASH
    return f"{v:.2f}{TIMES}"


def _title(doc: Mapping[str, Any], name: str) -> str:
    return str((doc.get("scenarios", {}).get(name) or {}).get("title", name))


def _rows_for(doc: Mapping[str, Any], key: str) -> list[dict[str, Any]]:
    order = list(doc.get("scenarios", {}))
    ms = [m for m in doc.get("measurements", []) if m["workload"] == key]
    return sorted(ms, key=lambda m: order.index(m["scenario"]) if m["scenario"] in order else 99)


def latency_table(doc: Mapping[str, Any], key: str) -> str:
    rows = []
    for m in _rows_for(doc, key):
        if not m.get("ok"):
            rows.append([_title(doc, m["scenario"]), "failed: " + m.get("error", "")[:80]])
            continue
        lat, add = m.get("latency_us", {}), m.get("added_us", {})
        rows.append(
            [
                _title(doc, m["scenario"]),
                *(fmt(lat.get(percentile_key(p))) for p in PERCENTILES),
                *(_signed(add.get(percentile_key(p))) for p in PERCENTILES),
                fmt(m.get("rps")),
                fmt(m.get("cpu_per_1k_total"), 3),
                str(m.get("errors", 0)),
            ]
        )
    return md_table(
        [
            "scenario",
            "p50 µs",
            "p90 µs",
            "p99 µs",
            "p99.9 µs",
            "+p50",
            "+p90",
            "+p99",
            "+p99.9",
            "req/s",
            "proxy CPU s/1k req",
            "errors",
        ],
        rows,
    )


def markdown(doc: Mapping[str, Any]) -> str:
    out: list[str] = []
    mach = doc.get("machine", {})
    out.append(f"# weft benchmarks, {doc.get('date', '')}\n")
    out.append(
        f"Machine: {mach.get('cpu', '?')}, {mach.get('cpus', '?')} CPUs, Linux "
        f"{mach.get('kernel', '?')}, Python {mach.get('python', '?')}; "
        + ", ".join(f"{k} {v}" for k, v in (mach.get("tools") or {}).items())
        + f". weft {mach.get('weft', '?')}, on {mach.get('runtime', '?')}. "
        f"Mode: {doc.get('mode', '?')}; "
        f"run took {fmt(doc.get('seconds'), 0)} s.\n"
    )
    lab = doc.get("lab") or {}
    if lab:
        out.append(
            "Latency in µs; `+pNN` is the latency added over the scenario's baseline measured "
            "in the same run (direct pod-to-pod, cross node or same node). *Pinned* runs put "
            f"every lab process and the client on CPU {lab.get('pinned_cpu')}: the serial "
            "cost of the path, stable run to run; *2 CPUs* runs let the scheduler spread "
            "them (cross-CPU wake-ups add about 20 µs each, and vary run to run). "
            '"proxy CPU" counts the mesh or proxy processes only (both weft agents; '
            "both stunnels; both HAProxies): user + system time from their cgroups' "
            "cpu.stat, per 1,000 requests including warm-up; not the client, not the "
            "server, not softirq time charged to other processes (so the in-kernel fast "
            "path shows about 0).\n"
        )
        out += _lab_sections(doc, lab)
    cs = doc.get("controller_scale")
    if cs:
        out += controller_section(cs)
    pods = doc.get("agent_pods")
    if pods:
        from benchmarks import agent_pods

        out += agent_pods.report(pods)
    return "\n".join(out)


def _lab_sections(doc: Mapping[str, Any], lab: Mapping[str, Any]) -> list[str]:
    out: list[str] = []
    sub = {**doc, **lab}
    skipped = {n: s["skipped"] for n, s in lab.get("scenarios", {}).items() if "skipped" in s}
    wl = {w["key"]: w for w in lab.get("workloads", [])}
    headline = [k for k, w in wl.items() if w.get("headline")]
    if headline:
        out.append("## Headline: 1 KB request/response, 1,000 req/s, 4 connections\n")
        out.append(
            "Istio's published setup (its ztunnel figure is +0.17 ms p90 / +0.20 ms p99 for "
            "two hops). Open loop, latency corrected for coordinated omission.\n"
        )
        for k in headline:
            out.append(f"### {wl[k]['title']}\n")
            out.append(latency_table(sub, k))
    out.append("## Request/response at fixed rates\n")
    for k, w in wl.items():
        if w["kind"] == "rr" and not w.get("headline") and not w.get("group"):
            out.append(f"### {w['title']}\n")
            out.append(latency_table(sub, k))
    for k, w in wl.items():
        if w["kind"] == "sse" and not w.get("group"):
            out.append(f"## {w['title']}\n")
            srv = lab.get("sse_server", {})
            out.append(
                f"Model server with --ttft {srv.get('ttft')} --tpot {srv.get('tpot')} "
                f"--tokens {srv.get('tokens')}; client: agent.lab.workloads.llm_client "
                f"--stream, one stream at a time, {w.get('count')} streams. TTFT counts from "
                "sending the request to the first content token; `+` columns are TTFT added "
                "over direct.\n"
            )
            out.append(latency_table(sub, k))
    out += grpc_section(sub, wl)
    out += ai_section(sub, wl, lab)
    sat = [k for k, w in wl.items() if w["kind"] in ("max", "connrate")]
    if sat:
        out.append("## Saturation and connection setup (2 CPUs)\n")
        out.append(
            "Closed loop, as fast as the client goes: requests/s (or new connections/s) at "
            "saturation. TCP echo uses the Python load generator, which saturates itself "
            "near the direct path's rate (read direct's row as the client's ceiling); HTTP "
            "uses wrk (C; its latency is not corrected for coordinated omission, which "
            "does not matter in a closed loop).\n"
        )
        rows = []
        for k in sat:
            for m in _rows_for(sub, k):
                if not m.get("ok"):
                    rows.append([k, _title(lab, m["scenario"]), "failed", "", "", "", "", ""])
                    continue
                lat = m.get("latency_us", {})
                rows.append(
                    [
                        k,
                        _title(lab, m["scenario"]),
                        fmt(m.get("rps")),
                        _x(m.get("rps_vs_baseline")),
                        fmt(lat.get("p50")),
                        fmt(lat.get("p99")),
                        fmt(m.get("cpu_per_1k_total"), 3),
                        str(m.get("errors", 0)),
                    ]
                )
        out.append(
            md_table(
                [
                    "workload",
                    "scenario",
                    "req/s (conn/s)",
                    "vs baseline",
                    "p50 µs",
                    "p99 µs",
                    "proxy CPU s/1k",
                    "errors",
                ],
                rows,
            )
        )
    bulk = [k for k, w in wl.items() if w["kind"] == "bulk"]
    for k in bulk:
        out.append(f"## {wl[k]['title']}\n")
        rows = []
        for m in _rows_for(sub, k):
            if not m.get("ok"):
                rows.append([_title(lab, m["scenario"]), "failed", "", "", ""])
                continue
            ex = m.get("extra", {})
            per_gb = ex.get("cpu_s_per_GB") or {}
            rows.append(
                [
                    _title(lab, m["scenario"]),
                    fmt(ex.get("MBps"), 0),
                    _x(m.get("throughput_vs_baseline")),
                    fmt(sum(per_gb.values()) if per_gb else None, 2),
                    fmt(ex.get("retransmits")),
                ]
            )
        out.append(
            md_table(["scenario", "MB/s", "vs baseline", "proxy CPU s/GB", "retransmits"], rows)
        )
    out += cpu_section(sub)
    out += memory_section(lab)
    if lab.get("ratios"):
        out.append("## weft ÷ baseline (same run)\n")
        out.append(
            "Below 1 is better for weft on added latency and CPU, above 1 better on req/s and "
            "MB/s. Added-latency ratios are left out where either side added nothing "
            "measurable (under 20 µs: noise); req/s only for the saturation and "
            "connection-rate runs.\n"
        )
        rows = [
            [
                r["workload"],
                f"{r['weft']} ÷ {r['baseline']}",
                _x(r.get("added_p50")),
                _x(r.get("added_p99")),
                _x(r.get("cpu_per_1k")),
                _x(r.get("rps")),
                _x(r.get("MBps")),
            ]
            for r in lab["ratios"]
        ]
        out.append(
            md_table(["workload", "ratio", "+p50", "+p99", "CPU/1k req", "req/s", "MB/s"], rows)
        )
    if skipped:
        out.append("## Not run\n")
        out.append(md_table(["scenario", "why"], sorted(skipped.items())))
    prof = lab.get("profile") or {}
    if prof and "skipped" not in prof:
        out += profile_section(prof)
    return out


def grpc_section(doc: Mapping[str, Any], wl: Mapping[str, Mapping[str, Any]]) -> list[str]:
    keys = [k for k, w in wl.items() if w.get("group") == "grpc"]
    if not keys:
        return []
    out = [
        "## gRPC (HTTP/2)\n",
        "Client: benchmarks.grpc_client (grpcio's C core; open loop, latency from each call's "
        "due time), one HTTP/2 connection per channel, one call in flight on each; server: "
        "agent.lab.workloads.grpc_echo (grpc.aio), 1 KB messages. The waypoint's Service port "
        "has appProtocol grpc, so the waypoint speaks HTTP/2 to the server too; the HAProxy "
        "pair speaks h2c to the app and the server and h2 over mTLS between the proxies. A "
        "call counts only when it ends with status OK and the bytes sent. Streams: latency "
        "is to the end of the stream (its status), CPU is per 1,000 streams.\n",
    ]
    for k in keys:
        w = wl[k]
        out.append(f"### {w['title']}\n")
        out.append(latency_table(doc, k))
        if w.get("messages"):
            rows = []
            for m in _rows_for(doc, k):
                first = (m.get("extra") or {}).get("first_message_us") or {}
                if m.get("ok") and first:
                    rows.append(
                        [
                            _title(doc, m["scenario"]),
                            *(fmt(first.get(percentile_key(p))) for p in (50.0, 90.0, 99.0)),
                        ]
                    )
            if rows:
                out.append("Time to the first message of the stream:\n")
                out.append(md_table(["scenario", "p50 µs", "p90 µs", "p99 µs"], rows))
    return out


def ai_section(
    doc: Mapping[str, Any], wl: Mapping[str, Mapping[str, Any]], lab: Mapping[str, Any]
) -> list[str]:
    keys = [k for k, w in wl.items() if w.get("group") == "ai"]
    if not keys:
        return []
    srv = lab.get("ai_server") or {}
    out = [
        "## AI policy: TokenRateLimit and ModelRoute in the waypoint\n",
        "OpenAI chat completions (a 1 KB system + user message body, `max_tokens` "
        f"{srv.get('tokens')}) to the model server agent.lab.workloads.model_server "
        f"(--ttft {srv.get('ttft')} --tpot {srv.get('tpot')}: it answers at once, so the "
        "latency is the path's). *weft waypoint + AI policy* goes through Service "
        "mesh/far-ai, which has a TokenRateLimit (per caller; limits never reached) and a "
        "ModelRoute (the model to Service mesh/far): the waypoint reads the body, routes by "
        "model, admits and charges tokens in its SQLite quota store and reads `usage` from "
        "the answer. *weft waypoint* is the same waypoint through mesh/far-l7, which has no "
        "AI policy; HAProxy does no AI work at all (that is the comparison). Non-streaming: "
        "benchmarks.clients http, open loop; streaming: agent.lab.workloads.llm_client, one "
        "stream at a time, time to the first content token.\n",
    ]
    for k in keys:
        out.append(f"### {wl[k]['title']}\n")
        out.append(latency_table(doc, k))
    rows = [
        [
            r["workload"],
            f"{_title(doc, r['scenario'])} {MINUS} {_title(doc, r['reference'])}",
            *(_signed((r.get("latency_us") or {}).get(percentile_key(p))) for p in PERCENTILES),
            _signed_cpu(r.get("cpu_per_1k")),
            _x(r.get("cpu_ratio")),
        ]
        for r in doc.get("stage_costs", [])
        if r["workload"] in keys
    ]
    if rows:
        out.append("### What the AI stages cost (same waypoint, same run)\n")
        out.append(
            md_table(
                ["workload", "difference", "p50", "p90", "p99", "p99.9", "CPU s/1k req", "CPU"],
                rows,
            )
        )
    return out


def _signed_cpu(v: float | None) -> str:
    if v is None or math.isnan(v):
        return DASH
    return f"+{v:.3f}" if v >= 0 else f"{MINUS}{-v:.3f}"


def cpu_section(doc: Mapping[str, Any]) -> list[str]:
    rows = []
    for m in doc.get("measurements", []):
        if not m.get("ok") or not m.get("cpu_s") or not m.get("work"):
            continue
        for comp, s in sorted(m["cpu_s"].items()):
            rows.append([m["workload"], m["scenario"], comp, fmt(per_thousand(s, m["work"]), 3)])
    if not rows:
        return []
    return [
        "## CPU per component (seconds per 1,000 requests)\n",
        md_table(["workload", "scenario", "process", "CPU s/1k req"], rows),
    ]


def memory_section(lab: Mapping[str, Any]) -> list[str]:
    mem = lab.get("memory") or {}
    if not mem:
        return []
    rows = [
        [
            name,
            fmt(v.get("rss_mb"), 1),
            fmt(v.get("pss_mb"), 1),
            fmt(v.get("uss_mb"), 1),
            fmt(v.get("threads"), 0),
        ]
        for name, v in sorted(mem.items())
    ]
    return [
        "## Memory (largest seen during the run)\n",
        "RSS counts shared pages (Python, OpenSSL, and for the agents bcc/LLVM) in full; "
        "PSS splits them among the processes sharing them; USS is the process's own.\n",
        md_table(["process", "RSS MB", "PSS MB", "USS MB", "threads"], rows),
    ]


_PROFILED = {
    "weft-l4": "weft-l4, TCP 1 KB, 1,000 req/s",
    "weft-waypoint": "weft-waypoint, HTTP 1 KB, 1,000 req/s",
}
_ROLE = {
    "agent-node-1": "outbound (client side)",
    "agent-node-2": "inbound (server side)",
}


def profile_section(prof: Mapping[str, Any]) -> list[str]:
    out = [
        "## Where weft spends its time (py-spy)\n",
        "Separate runs (py-spy slows the processes), so these are shares, converted to µs per "
        "request with the process's CPU seconds in that run / requests. *Python frames*: a C "
        "call (a socket write, the SSL object, uvloop's loop) is charged to the Python "
        "function that makes it. *Native frames*: the C function itself; a socket write's "
        "time includes the kernel's TCP and veth work done in the writer's context.\n",
    ]
    for scen, title in _PROFILED.items():
        runs = prof.get(scen) or {}
        for mode, what in (("python", "Python frames"), ("native", "native frames")):
            run = runs.get(mode) or {}
            for comp, p in run.items():
                if not isinstance(p, Mapping) or "self" not in p:
                    continue
                role = _ROLE.get(comp, "the L7 proxy")
                out.append(
                    f"### {title}: {comp}, {role}, {what}: "
                    f"{fmt(p.get('cpu_us_per_request'), 0)} µs CPU per request, "
                    f"{p.get('samples')} samples\n"
                )
                rows = [
                    [r["function"], f"{r['share'] * 100:.1f} %", fmt(r["us_per_request"], 1)]
                    for r in p.get("self", [])[:10]
                ]
                out.append(md_table(["function (self time)", "share", "µs/req"], rows))
    return out


def _unit(v: Any, unit: str, digits: int = 0) -> str:
    return f"{fmt(v, digits)} {unit}"


def controller_section(cs: Mapping[str, Any]) -> list[str]:
    if cs.get("error"):
        return ["## Controller scale\n", f"Failed: {cs['error']}\n"]
    prop = cs.get("propagation", {})
    sign = cs.get("signing", {})
    rows = [
        ["workloads / agents", f"{cs.get('workloads')} / {cs.get('agents')}"],
        ["agent worker processes", str(cs.get("workers"))],
        [
            "initial sync: every agent has the full snapshot",
            _unit(cs.get("initial_sync_s"), "s", 2),
        ],
        [
            "initial sync: CPU of the controller / of all agents",
            f"{fmt((cs.get('initial_sync_cpu_s') or {}).get('controller'), 1)} / "
            f"{fmt((cs.get('initial_sync_cpu_s') or {}).get('agents'), 1)} s",
        ],
        ["one-pod change: file written -> controller revision", _unit(prop.get("detect_ms"), "ms")],
        ["one-pod change: revision -> every agent applied", _unit(prop.get("fanout_ms"), "ms")],
        [
            "one-pod change: file written -> every agent applied (p50 agent)",
            f"{fmt(prop.get('p50_ms'), 0)} ms",
        ],
        [
            "one-pod change: file written -> every agent applied (last agent)",
            f"{fmt(prop.get('total_ms'), 0)} ms",
        ],
        [
            "one agent's own time to apply that delta (p50)",
            _unit((cs.get("agent_apply_ms") or {}).get("delta_p50"), "ms"),
        ],
        [
            "one agent's own time to apply the full snapshot (p50)",
            _unit((cs.get("agent_apply_ms") or {}).get("full_snapshot_p50"), "ms"),
        ],
        [
            "certificates/s, CertificateAuthority.sign_workload (one thread)",
            fmt(sign.get("direct_per_s"), 0),
        ],
        [
            f"certificates/s over gRPC ({sign.get('grpc_clients')} clients, "
            f"{sign.get('grpc_in_flight')} in flight each)",
            fmt(sign.get("grpc_per_s"), 0),
        ],
        [
            f"controller CPU per certificate over gRPC (its process and "
            f"{sign.get('signer_processes')} signer processes)",
            _unit(sign.get("controller_cpu_us_per_cert"), "us"),
        ],
        [
            "certificates/s over gRPC, batched as agents batch (SignWorkloadCertificates, "
            f"up to {sign.get('grpc_in_flight')} per call)",
            fmt(sign.get("grpc_batched_per_s"), 0),
        ],
        [
            "controller CPU per certificate over gRPC, batched",
            _unit(sign.get("grpc_batched_controller_cpu_us_per_cert"), "us"),
        ],
    ]
    return [
        "## Controller scale\n",
        f"Controller poll interval {cs.get('poll_interval')} s (the detection step waits for "
        "the next scan). Agents are ConfigClients over real mTLS gRPC on loopback, "
        f"{cs.get('agents')} of them in {cs.get('workers')} processes apart from the "
        "controller's, so on this machine the agents share 2 CPUs and apply one after "
        "another: the last agent's time is mostly queueing behind the others' apply time "
        "(on real nodes each agent has its own CPU). Medians over "
        f"{len(cs.get('propagation_runs') or [])} changes.\n",
        md_table(["measure", "value"], rows),
    ]


# --------------------------------------------------------------------------- plots


def plots(
    doc: Mapping[str, Any], samples: Mapping[tuple[str, str], Sequence[float]], out_dir: Path
) -> list[Path]:
    """Latency-by-percentile curves per workload (every scenario on one chart) and a bar
    chart of added latency for the headline workloads. Needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lab = doc.get("lab") or {}
    wl = {w["key"]: w for w in lab.get("workloads", [])}
    titles = {n: s.get("title", n) for n, s in (lab.get("scenarios") or {}).items()}
    written = []
    ticks = [50.0, 90.0, 99.0, 99.9, 99.99]
    for key, w in wl.items():
        curves = {s: v for (k, s), v in samples.items() if k == key and v}
        if not curves:
            continue
        fig, ax = plt.subplots(figsize=(9, 5.5))
        for scen, values in curves.items():
            pts = percentile_curve(values)
            ax.plot([nines(p) for p, _ in pts], [v for _, v in pts], label=titles.get(scen, scen))
        top = max(nines(100.0 * (1 - 1.0 / len(v))) for v in curves.values())
        shown = [t for t in ticks if nines(t) <= top + 1e-9] or ticks[:1]
        ax.set_xticks([nines(t) for t in shown])
        ax.set_xticklabels([f"p{t:g}" for t in shown])
        ax.set_yscale("log")
        ax.set_ylabel("µs" + (" (time to first token)" if w["kind"] == "sse" else ""))
        ax.set_title(w["title"])
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        f = out_dir / f"latency-{key}.png"
        fig.tight_layout()
        fig.savefig(f, dpi=110)
        plt.close(fig)
        written.append(f)
    idx = index(lab)
    for key, w in wl.items():
        if not w.get("headline"):
            continue
        rows = [(s, m) for (k, s), m in idx.items() if k == key and m.get("added_us")]
        if not rows:
            continue
        fig, ax = plt.subplots(figsize=(9, 5))
        width = 0.8 / 3
        for i, p in enumerate((50.0, 90.0, 99.0)):
            pk = percentile_key(p)
            ax.bar(
                [j + i * width for j in range(len(rows))],
                [m["added_us"][pk] for _, m in rows],
                width,
                label=f"+p{p:g}",
            )
        ax.set_xticks([j + width for j in range(len(rows))])
        ax.set_xticklabels([titles.get(s, s) for s, _ in rows], rotation=15, fontsize=8)
        ax.set_ylabel("µs added over direct")
        ax.set_title("Added latency: " + w["title"])
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend()
        f = out_dir / f"added-{key}.png"
        fig.tight_layout()
        fig.savefig(f, dpi=110)
        plt.close(fig)
        written.append(f)
    return written
