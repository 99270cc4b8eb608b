"""`weft top`: live per-service requests/s, p99 latency, error rate and tokens/s.

It scrapes the waypoints' Prometheus endpoints twice per interval and shows the deltas,
the same numbers a dashboard would compute with rate() and histogram_quantile().
"""

from __future__ import annotations

import time
import urllib.request
from collections import defaultdict
from typing import Annotated

import typer
from prometheus_client.parser import text_string_to_metric_families

from agent.cli.output import Format, OutputOption, emit
from agent.cli.targets import LabOption
from agent.lab.topology import Lab
from agent.netns import call_in
from controller.errors import EnvironmentProblem
from controller.model.workloads import WAYPOINT_LABEL

REQUESTS = "istio_requests_total"
DURATION = "istio_request_duration_milliseconds"
TOKENS = "gen_ai_client_token_usage_sum"  # OTel GenAI token usage histogram's sum


def _fetch(url: str, netns: str | None) -> str:
    def get() -> str:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.read().decode()

    return call_in(netns, get) if netns else get()


def _targets(lab: str, urls: list[str]) -> list[tuple[str, str | None]]:
    if urls:
        return [(u, None) for u in urls]
    env = Lab(lab)
    if not env.exists():
        raise EnvironmentProblem(
            "no waypoint to scrape",
            hint="pass --url http://HOST:15020/metrics, or bring the lab up",
        )
    st = env.state()
    return [
        (f"http://{p.ip}:15020/metrics", p.netns) for p in st.pods if WAYPOINT_LABEL in p.labels
    ]


Sample = dict[str, dict[str, float]]  # service -> figure -> value


def _collect(texts: list[str]) -> Sample:
    out: Sample = defaultdict(lambda: defaultdict(float))
    for text in texts:
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                svc = s.labels.get("destination_service_name") or s.labels.get(
                    "destination_service", ""
                )
                if not svc:
                    continue
                ns = s.labels.get("destination_service_namespace", "")
                key = f"{ns}/{svc}" if ns else svc
                if s.name == REQUESTS:
                    out[key]["requests"] += s.value
                    if s.labels.get("response_code", "").startswith("5"):
                        out[key]["errors"] += s.value
                elif s.name == DURATION + "_bucket":
                    out[key][f"le:{s.labels['le']}"] += s.value
                elif s.name == TOKENS:
                    out[key]["tokens"] += s.value
    return out


def _p99(before: dict[str, float], after: dict[str, float]) -> float | None:
    buckets = sorted(
        ((float(k[3:]), after[k] - before.get(k, 0.0)) for k in after if k.startswith("le:")),
        key=lambda b: b[0],
    )
    if not buckets or buckets[-1][1] <= 0:
        return None
    total = buckets[-1][1]
    prev_le, prev_n = 0.0, 0.0
    for le, n in buckets:
        if n >= 0.99 * total:
            if le == float("inf"):
                return prev_le
            frac = (0.99 * total - prev_n) / max(n - prev_n, 1e-9)
            return prev_le + (le - prev_le) * frac  # linear, like histogram_quantile()
        prev_le, prev_n = le, n
    return None


def rows_between(a: Sample, b: Sample, seconds: float) -> list[dict[str, object]]:
    rows = []
    for svc in sorted(b):
        x, y = a.get(svc, {}), b[svc]
        req = y.get("requests", 0) - x.get("requests", 0)
        err = y.get("errors", 0) - x.get("errors", 0)
        p99 = _p99(x, y)
        rows.append(
            {
                "service": svc,
                "rps": round(req / seconds, 2),
                "p99Ms": round(p99, 2) if p99 is not None else None,
                "errorRate": round(err / req, 4) if req else 0.0,
                "tokensPerSecond": round((y.get("tokens", 0) - x.get("tokens", 0)) / seconds, 2),
            }
        )
    return rows


def top(
    interval: Annotated[float, typer.Option(help="Seconds between samples.")] = 2.0,
    once: Annotated[bool, typer.Option("--once", help="One sample, then exit.")] = False,
    url: Annotated[
        list[str] | None,
        typer.Option(help="Waypoint metrics URL (repeatable; default: the lab's waypoints)."),
    ] = None,
    lab: LabOption = "weft",
    output: Format = OutputOption,
) -> None:
    """Live per-service traffic through the waypoints: rps, p99, error rate, tokens/s.

    Example: weft top --once -o json
    """
    targets = _targets(lab, url or [])
    if not targets:
        raise EnvironmentProblem(
            "the lab has no waypoint",
            hint="label a pod weft.dev/waypoint: NAME and a Service weft.dev/use-waypoint",
        )
    before = _collect([_fetch(u, ns) for u, ns in targets])
    t0 = time.monotonic()
    while True:
        time.sleep(interval)
        after = _collect([_fetch(u, ns) for u, ns in targets])
        t1 = time.monotonic()
        rows = rows_between(before, after, t1 - t0)
        if not once and output is Format.table:
            typer.echo("\x1b[2J\x1b[H", nl=False)  # clear the screen between refreshes
        emit(
            rows,
            output,
            columns=[
                ("SERVICE", "service"),
                ("REQ/S", "rps"),
                ("P99 ms", "p99Ms"),
                ("ERRORS", "errorRate"),
                ("TOKENS/S", "tokensPerSecond"),
            ],
        )
        if once:
            return
        before, t0 = after, t1
