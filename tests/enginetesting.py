"""Test support for the engine and its shell: a config snapshot from YAML, a clock you move.

    clock = FakeClock()
    engine = Engine(snapshot(service("llm", pods=3), http_route(RULES)), clock=clock,
                    rng=random.Random(7))
    clock.advance(30)

Also used by benchmarks/engine_bench.py, so it lives beside the tests, not in the product.
"""

from __future__ import annotations

import textwrap

from agent.state import ConfigSnapshot
from controller.model.loader import parse_text


class FakeClock:
    """A monotonic clock that moves only when told to."""

    __slots__ = ("now",)

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def snapshot(*yaml_docs: str, trust_domain: str = "cluster.local") -> ConfigSnapshot:
    """A snapshot of the resources in these YAML texts; invalid config raises ValueError
    with every problem."""
    text = "\n---\n".join(textwrap.dedent(d).strip("\n") for d in yaml_docs)
    offer = parse_text(text, "test.yaml")
    if offer.problems:
        raise ValueError("\n".join(str(p) for p in offer.problems))
    return ConfigSnapshot.build("test", 1, trust_domain, {r.key: r for r in offer.resources})


def service(
    name: str,
    *,
    namespace: str = "ai",
    port: int = 8000,
    pods: int = 3,
    subnet: int = 1,
    weights: list[int] | None = None,
) -> str:
    """YAML for a Service `name` and `pods` ready workloads behind it, at 10.244.<subnet>.<i+1>
    (so `address(i)` names pod i's endpoint), optionally with `weft.dev/weight` annotations."""
    docs = [
        f"""\
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: {namespace}}}
spec:
  selector: {{app: {name}}}
  ports: [{{port: {port}}}]"""
    ]
    for i in range(pods):
        ann = f", annotations: {{weft.dev/weight: '{weights[i]}'}}" if weights else ""
        docs.append(
            f"""\
apiVersion: weft.dev/v1alpha1
kind: Workload
metadata: {{name: {name}-{i}, namespace: {namespace}, labels: {{app: {name}}}{ann}}}
spec: {{node: node-1, addresses: [10.244.{subnet}.{i + 1}]}}"""
        )
    return "\n---\n".join(docs)


def http_route(
    rules: str,
    *,
    name: str = "r",
    namespace: str = "ai",
    parent: str = "llm",
    parent_namespace: str | None = None,
) -> str:
    """YAML for HTTPRoute `namespace/name` on Service `parent` (in `parent_namespace`, if
    given: a consumer route from another namespace) with these rules: YAML list items
    indented by four spaces, as they sit under `rules:`."""
    ns = f", namespace: {parent_namespace}" if parent_namespace else ""
    return f"""\
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: {name}, namespace: {namespace}}}
spec:
  parentRefs: [{{group: "", kind: Service, name: {parent}{ns}}}]
  rules:
{rules}"""


def backend_policy(service: str, spec: str, *, port: int | None = None) -> str:
    """YAML for BackendPolicy `service`-policy on Service ai/`service` (on its `port` only,
    when given); `spec`: its fields after targetRefs, the first line as it is and the rest
    indented by two spaces, as they sit under `spec:`."""
    on_port = f", port: {port}" if port is not None else ""
    return f"""\
apiVersion: weft.dev/v1alpha1
kind: BackendPolicy
metadata: {{name: {service}-policy, namespace: ai}}
spec:
  targetRefs: [{{kind: Service, name: {service}{on_port}}}]
  {spec}"""


def address(i: int, *, subnet: int = 1, port: int = 8000) -> str:
    return f"10.244.{subnet}.{i + 1}:{port}"
