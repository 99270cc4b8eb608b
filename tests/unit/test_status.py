"""Conditions of stored resources (controller/model/status.py): a policy that references a
missing Service, or needs a waypoint its Service lacks, is visibly not in effect."""

from __future__ import annotations

from controller.model.base import ResourceKey
from controller.model.status import conditions
from tests.enginetesting import snapshot

SERVICES = """\
apiVersion: v1
kind: Service
metadata: {name: llm, namespace: ai, labels: {weft.dev/use-waypoint: ai-waypoint}}
spec: {selector: {app: llm}, clusterIP: 10.96.0.10, ports: [{port: 8000}]}
---
apiVersion: v1
kind: Service
metadata: {name: plain, namespace: ai}
spec: {selector: {app: plain}, clusterIP: 10.96.0.11, ports: [{port: 8000}]}
"""


def authz(target: str) -> str:
    return f"""\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: to-{target}, namespace: ai}}
spec:
  targetRefs: [{{kind: Service, group: "", name: {target}}}]
  action: DENY
  rules: [{{to: [{{operation: {{paths: ["/admin"]}}}}]}}]
"""


def status_of(*docs: str) -> dict[str, dict[str, tuple[bool, str]]]:
    snap = snapshot(SERVICES, *docs)
    out = {}
    for key, conds in conditions(snap.resources.values()).items():
        out[f"{key.kind}/{key.name}"] = {c.type: (c.status, c.reason) for c in conds}
    return out


def test_policies_on_a_service_with_a_waypoint_are_accepted():
    """Targeting a Service that exists and has a waypoint: both conditions True."""
    st = status_of(authz("llm"))
    assert st["AuthorizationPolicy/to-llm"] == {
        "ResolvedRefs": (True, "ResolvedRefs"),
        "Accepted": (True, "Accepted"),
    }


def test_a_misspelled_service_is_not_resolved_and_not_accepted():
    """A targetRef to a Service that does not exist (a typo, or one not created yet)."""
    st = status_of(authz("llmm"))
    assert st["AuthorizationPolicy/to-llmm"]["ResolvedRefs"] == (False, "ServiceNotFound")
    assert st["AuthorizationPolicy/to-llmm"]["Accepted"][0] is False


def test_l7_policy_on_a_service_without_a_waypoint_is_enforced_nowhere():
    """The Service exists but no waypoint serves it: L7 rules would be inert, so the
    resource says so (NoWaypoint), for an AuthorizationPolicy and for AI policy alike."""
    limit = """\
apiVersion: weft.dev/v1alpha1
kind: TokenRateLimit
metadata: {name: budget, namespace: ai}
spec:
  targetRefs: [{name: plain}]
  limits: [{name: per-caller, by: principal, tokensPerMinute: 100}]
"""
    st = status_of(authz("plain"), limit)
    assert st["AuthorizationPolicy/to-plain"]["Accepted"] == (False, "NoWaypoint")
    assert st["TokenRateLimit/budget"]["Accepted"] == (False, "NoWaypoint")
    assert st["TokenRateLimit/budget"]["ResolvedRefs"] == (True, "ResolvedRefs")


def test_a_route_to_a_missing_backend_is_not_resolved():
    """An HTTPRoute on the waypointed Service whose backendRef names no Service."""
    route = """\
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: r, namespace: ai}
spec:
  parentRefs: [{group: "", kind: Service, name: llm}]
  rules: [{backendRefs: [{name: llm-v3, port: 8000}]}]
"""
    st = status_of(route)
    assert st["HTTPRoute/r"]["ResolvedRefs"] == (False, "BackendNotFound")
    assert st["HTTPRoute/r"]["Accepted"] == (True, "Accepted")


def test_workload_selector_policies_have_no_service_conditions():
    """A selector policy is enforced by node tunnels: nothing to resolve."""
    sel = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: sel, namespace: ai}
spec: {selector: {matchLabels: {app: llm}}}
"""
    snap = snapshot(SERVICES, sel)
    assert ResourceKey("AuthorizationPolicy", "ai", "sel") not in conditions(
        snap.resources.values()
    )
