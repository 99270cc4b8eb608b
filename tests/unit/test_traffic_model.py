"""weft.dev traffic kinds: defaults with their sources, and errors that name field and reason."""

from __future__ import annotations

import textwrap

import pytest

from controller.crds import all_crds
from controller.model.loader import parse_text
from controller.model.traffic import (
    BackendPolicy,
    FaultInjection,
    RetryPolicy,
    endpoint_weight,
)

POLICY = """\
apiVersion: weft.dev/v1alpha1
kind: BackendPolicy
metadata: {name: llm, namespace: ai}
spec:
  targetRefs: [{name: llm}]
"""


def problems(text: str) -> list[str]:
    offer = parse_text(textwrap.dedent(text), "p.yaml")
    assert offer.problems, "expected problems"
    return [str(p) for p in offer.problems]


def test_a_minimal_policy_gets_istio_and_envoy_defaults():
    """targetRefs alone: LeastRequest, Envoy's pool limits, a 20%/3 retry budget; outlier
    detection, health checks and fallback stay off until configured."""
    (p,) = parse_text(POLICY, "p.yaml").resources
    assert isinstance(p, BackendPolicy)
    s = p.spec
    assert s.load_balancer.type == "LeastRequest"
    assert (s.connection_pool.max_connections, s.connection_pool.connect_timeout) == (1024, 10.0)
    assert (s.retry_budget.budget_percent, s.retry_budget.min_retry_concurrency) == (20.0, 3)
    assert s.outlier_detection is None and s.health_check is None and s.fallback is None
    assert p.targets() == [("ai", "llm", None)]


def test_outlier_detection_defaults_are_istios():
    """outlierDetection: {} means 5 consecutive 5xx, 10 s interval, 30 s base, 10% max."""
    (p,) = parse_text(POLICY + "  outlierDetection: {}\n", "p.yaml").resources
    od = p.spec.outlier_detection  # type: ignore[attr-defined]
    assert (od.consecutive_5xx_errors, od.interval, od.base_ejection_time) == (5, 10.0, 30.0)
    assert (od.max_ejection_percent, od.consecutive_gateway_errors) == (10, 0)


@pytest.mark.parametrize(
    ("extra", "field", "reason"),
    [
        ("  loadBalancer: {type: RingHash}", "spec.loadBalancer", "needs consistentHash"),
        (
            "  loadBalancer: {type: Random, consistentHash: {header: x}}",
            "spec.loadBalancer",
            "only applies to type RingHash or Maglev",
        ),
        (
            "  loadBalancer: {type: Maglev, consistentHash: {header: x, sourceIdentity: true}}",
            "spec.loadBalancer.consistentHash",
            "set exactly one of",
        ),
        ("  loadBalancer: {type: Maglev, tableSize: 1000}", "spec.loadBalancer.tableSize", "prime"),
        ("  loadBalancer: {type: Fastest}", "spec.loadBalancer.type", "RoundRobin"),
        (
            "  connectionPool: {maxConnections: 0}",
            "spec.connectionPool.maxConnections",
            "greater than or equal to 1",
        ),
        (
            "  connectionPool: {connectTimeout: 5 s}",
            "spec.connectionPool.connectTimeout",
            "duration",
        ),
        (
            "  outlierDetection: {maxEjectionPercent: 150}",
            "spec.outlierDetection.maxEjectionPercent",
            "less than or equal to 100",
        ),
        (
            "  outlierDetection: {consecutive5xxErrors: 0}",
            "spec.outlierDetection",
            "nothing would ever be ejected",
        ),
        ("  healthCheck: {interval: 5s}", "spec.healthCheck", "exactly one of http or grpc"),
        ("  healthCheck: {http: {path: healthz}}", "spec.healthCheck.http.path", "start with '/'"),
        (
            "  retryBudget: {budgetPercent: -1}",
            "spec.retryBudget.budgetPercent",
            "greater than or equal to 0",
        ),
        ("  fallback: {}", "spec.fallback", "exactly one of response or backendRef"),
        ("  fallback: {backendRef: {name: llm, port: 8000}}", "spec.fallback.backendRef", "itself"),
        ("  loadBalancer: {typo: 1}", "spec.loadBalancer.typo", "unknown field"),
    ],
)
def test_backend_policy_errors_name_the_field_and_the_reason(extra, field, reason):
    """Each invalid BackendPolicy is refused with the field's path and why."""
    msgs = problems(POLICY + extra + "\n")
    assert any(field in m and reason in m for m in msgs), msgs


@pytest.mark.parametrize(
    ("spec", "field", "reason"),
    [
        (
            "{retryOn: [5xx], retriableStatusCodes: [503]}",
            "spec",
            "does not list retriable-status-codes",
        ),
        ("{retryOn: [teapot]}", "spec.retryOn[0]", "'5xx'"),
        ("{retriableStatusCodes: [200]}", "spec.retriableStatusCodes", "400-599"),
        ("{attempts: 11}", "spec.attempts", "less than or equal to 10"),
        ("{backoff: {baseInterval: 1s, maxInterval: 10ms}}", "spec.backoff", "maxInterval"),
        ("{perTryTimeout: soon}", "spec.perTryTimeout", "is not a duration"),
    ],
)
def test_retry_policy_errors_name_the_field_and_the_reason(spec, field, reason):
    """Each invalid RetryPolicy is refused with the field's path and why."""
    doc = f"apiVersion: weft.dev/v1alpha1\nkind: RetryPolicy\nmetadata: {{name: r}}\nspec: {spec}\n"
    msgs = problems(doc)
    assert any(f"RetryPolicy r: {field}:" in m and reason in m for m in msgs), msgs


def test_fault_injection_needs_a_fault_and_valid_percentages():
    """FaultInjection without delay or abort, or with a percentage over 100, is refused."""
    head = "apiVersion: weft.dev/v1alpha1\nkind: FaultInjection\nmetadata: {name: f}\n"
    (msg,) = problems(head + "spec: {}\n")
    assert "spec: set delay, abort, or both" in msg
    (msg,) = problems(head + "spec: {abort: {httpStatus: 503, percentage: 101}}\n")
    assert "spec.abort.percentage" in msg
    (f,) = parse_text(head + "spec: {delay: {fixedDelay: 250ms}}\n", "f").resources
    assert isinstance(f, FaultInjection) and f.spec.delay and f.spec.delay.percentage == 100


def test_retry_policy_defaults_and_weights():
    """An empty RetryPolicy is Istio's default (2 attempts, 503 and connection errors);
    endpoint weights come from the annotation, else the label, else 1."""
    (r,) = parse_text(
        "apiVersion: weft.dev/v1alpha1\nkind: RetryPolicy\nmetadata: {name: r}\nspec: {}\n", "r"
    ).resources
    assert isinstance(r, RetryPolicy) and r.spec.attempts == 2 and r.spec.status_codes() == [503]
    assert endpoint_weight({"weft.dev/weight": "5"}, {"weft.dev/weight": "2"}) == 5
    assert endpoint_weight({}, {"weft.dev/weight": "2"}) == 2
    assert endpoint_weight({"weft.dev/weight": "lots"}, {}) == 1


def test_the_new_kinds_have_structural_crds_with_int_or_string_durations():
    """The CRD generator accepts every new kind; durations take "10s" or a number."""
    crds = {c["spec"]["names"]["kind"]: c for c in all_crds()}
    assert {"BackendPolicy", "RetryPolicy", "FaultInjection"} <= set(crds)
    schema = crds["RetryPolicy"]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    assert schema["properties"]["spec"]["properties"]["perTryTimeout"].get(
        "x-kubernetes-int-or-string"
    )
