"""Per-decision cost of the engine: route match, then endpoint pick and outcome, per balancer.

    .venv/bin/python -m benchmarks.engine_bench

A route table of 10 rules; the request passes 8 non-matching prefix+header rules before
reaching a 90/10 split. Prints a Markdown table (median of 3 x N calls). Not a test: numbers
depend on the machine, and no test asserts on time.
"""

from __future__ import annotations

import random
import sys
import timeit

from agent.waypoint.codec.headers import Headers
from agent.waypoint.engine.backend import Attempt
from agent.waypoint.engine.engine import Engine, Forward
from tests.enginetesting import FakeClock, service, snapshot

_TENANT_RULES = "\n".join(
    f"""\
    - matches: [{{path: {{value: /api/v{i}}}, headers: [{{name: x-tenant, value: t{i}}}]}}]
      backendRefs: [{{name: v1, port: 8000}}]"""
    for i in range(8)
)
ROUTE = f"""\
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: r, namespace: ai}}
spec:
  parentRefs: [{{group: "", kind: Service, name: llm}}]
  rules:
{_TENANT_RULES}
    - matches: [{{path: {{value: /v1}}, headers: [{{name: x-variant, value: b}}]}}]
      backendRefs: [{{name: v2, port: 8000}}]
    - matches: [{{path: {{value: /v1}}}}]
      backendRefs: [{{name: v1, port: 8000, weight: 90}}, {{name: v2, port: 8000, weight: 10}}]
"""
HEADERS = Headers.of(
    ("host", "llm.ai:8000"),
    ("user-agent", "openai-python/1.40"),
    ("content-type", "application/json"),
    ("accept", "*/*"),
    ("authorization", "Bearer " + "x" * 180),
    ("x-request-id", "0b7c3f"),
    ("x-session-id", "conv-42"),
    ("content-length", "1024"),
)
BALANCERS = {
    "RoundRobin": "{type: RoundRobin}",
    "Random": "{type: Random}",
    "LeastRequest (P2C)": "{type: LeastRequest}",
    "Weighted": "{type: Weighted}",
    "PeakEWMA": "{type: PeakEWMA}",
    "RingHash (header)": "{type: RingHash, consistentHash: {header: x-session-id}}",
    "Maglev (header)": "{type: Maglev, consistentHash: {header: x-session-id}}",
}


def _policy(name: str, lb: str) -> str:
    return f"""\
apiVersion: weft.dev/v1alpha1
kind: BackendPolicy
metadata: {{name: {name}, namespace: ai}}
spec:
  targetRefs: [{{name: {name}}}]
  loadBalancer: {lb}
  outlierDetection: {{}}"""


def _measure(engine: Engine, target: str, n: int) -> tuple[float, float]:
    svc = ("ai", "llm")

    def route() -> object:
        return engine.route(svc, 8000, "POST", target, HEADERS)

    def decide() -> None:
        fwd = engine.route(svc, 8000, "POST", target, HEADERS)
        assert isinstance(fwd, Forward)
        att = fwd.attempt()
        assert isinstance(att, Attempt)
        att.finish(200)

    decide()  # compile the table
    r = sorted(timeit.repeat(route, number=n, repeat=3))[1] / n * 1e6
    d = sorted(timeit.repeat(decide, number=n, repeat=3))[1] / n * 1e6
    return r, d


def main(n: int = 200_000) -> None:
    print("| balancer | route() µs | route() + attempt() + finish() µs |")
    print("|----------|-----------|-----------------------------------|")
    for label, lb in BALANCERS.items():
        snap = snapshot(
            service("llm", pods=1),
            service("v1", pods=8, subnet=2),
            service("v2", pods=4, subnet=3),
            ROUTE,
            _policy("v1", lb),
            _policy("v2", lb),
        )
        e = Engine(snap, clock=FakeClock(), rng=random.Random(1))
        r, d = _measure(e, "/v1/chat/completions", n)
        print(f"| {label} | {r:.1f} | {d:.1f} |")
    e = Engine(snapshot(service("llm", pods=8)), clock=FakeClock(), rng=random.Random(1))
    r, d = _measure(e, "/v1/chat/completions", n)
    print(f"| no HTTPRoute, LeastRequest | {r:.1f} | {d:.1f} |")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 200_000)
