"""AuthorizationPolicy decisions (Istio semantics) at the tunnel (L4) and waypoint (L7)."""

from __future__ import annotations

import textwrap

from agent.policy.authz import (
    Request,
    evaluate,
    service_policies,
    workload_policies,
)
from controller.model.loader import parse_text
from controller.model.workloads import Workload

LLM = parse_text(
    textwrap.dedent("""\
    apiVersion: weft.dev/v1alpha1
    kind: Workload
    metadata: {name: llm-a, namespace: ai, labels: {app: llm}}
    spec: {serviceAccount: llm, node: node-1, addresses: [10.244.1.2]}
    """),
    "w",
).resources[0]
assert isinstance(LLM, Workload)


def policies(text: str):
    offer = parse_text(textwrap.dedent(text), "p.yaml")
    assert not offer.problems, offer.problems
    return offer.resources


def req(principal="cluster.local/ns/apps/sa/client", ns="apps", port=8000, **l7):
    return Request(principal, ns, "10.244.2.2", "10.244.1.2", port, **l7)


def decide(text: str, r: Request):
    return evaluate(workload_policies(policies(text), LLM), r)


HEAD = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"


def test_no_policy_allows():
    assert evaluate([], req()).allowed


def test_empty_spec_allows_nothing():
    d = decide(HEAD + "metadata: {name: deny-all, namespace: ai}\nspec: {}\n", req())
    assert not d.allowed and "ai/deny-all" in d.reason


def test_allow_for_one_principal_admits_it_and_denies_another():
    text = (
        HEAD
        + """metadata: {name: p, namespace: ai}
spec:
  selector: {matchLabels: {app: llm}}
  rules: [{from: [{source: {principals: [cluster.local/ns/apps/sa/client]}}]}]
"""
    )
    assert decide(text, req()).allowed
    d = decide(text, req(principal="cluster.local/ns/apps/sa/batch"))
    assert not d.allowed


def test_deny_wins_over_allow():
    text = (
        HEAD
        + """metadata: {name: allow-all, namespace: ai}
spec: {rules: [{}]}
---
"""
        + HEAD
        + """metadata: {name: no-batch, namespace: ai}
spec:
  action: DENY
  rules: [{from: [{source: {principals: ["*/sa/batch"]}}]}]
"""
    )
    assert decide(text, req()).allowed
    d = decide(text, req(principal="cluster.local/ns/apps/sa/batch"))
    assert (d.allowed, d.policy) == (False, "ai/no-batch")


def test_selector_and_namespace_scope():
    other = (
        HEAD
        + """metadata: {name: p, namespace: ai}
spec: {selector: {matchLabels: {app: embedder}}}
"""
    )
    assert decide(other, req()).allowed  # selects another workload: does not apply
    elsewhere = HEAD + "metadata: {name: p, namespace: apps}\nspec: {}\n"
    assert decide(elsewhere, req()).allowed
    root = HEAD + "metadata: {name: p, namespace: weft-system}\nspec: {}\n"
    assert not decide(root, req()).allowed  # the root namespace applies mesh-wide
    # From Istio's root namespace only DENY applies mesh-wide (it only tightens); an
    # ALLOW there would grant access to every workload with ALLOW policies.
    istio_allow = HEAD + "metadata: {name: p, namespace: istio-system}\nspec: {}\n"
    assert decide(istio_allow, req()).allowed
    istio_deny = (
        HEAD
        + "metadata: {name: p, namespace: istio-system}\n"
        + "spec: {action: DENY, rules: [{from: [{source: {namespaces: [apps]}}]}]}\n"
    )
    assert not decide(istio_deny, req()).allowed


def test_ports_and_namespaces():
    text = (
        HEAD
        + """metadata: {name: p, namespace: ai}
spec:
  rules:
    - from: [{source: {namespaces: [apps]}}]
      to: [{operation: {ports: ["8000"]}}]
"""
    )
    assert decide(text, req()).allowed
    assert not decide(text, req(port=9000)).allowed
    assert not decide(text, req(ns="web", principal="cluster.local/ns/web/sa/x")).allowed
    assert not decide(text, req(principal=None, ns=None)).allowed  # plaintext: no identity


def test_l7_allow_rule_fails_safe_at_l4_and_works_at_l7():
    text = (
        HEAD
        + """metadata: {name: p, namespace: ai}
spec:
  rules: [{to: [{operation: {methods: [GET]}}]}]
"""
    )
    assert not decide(text, req()).allowed
    assert decide(text, req(method="GET", path="/", host="llm")).allowed
    assert not decide(text, req(method="POST", path="/", host="llm")).allowed


def test_l7_deny_rule_denies_on_its_l4_part_at_the_tunnel():
    text = (
        HEAD
        + """metadata: {name: p, namespace: ai}
spec:
  action: DENY
  rules: [{to: [{operation: {ports: ["8000"], paths: ["/admin*"]}}]}]
"""
    )
    assert not decide(text, req()).allowed
    assert decide(text, req(port=9000)).allowed
    assert decide(text, req(method="GET", path="/v1/chat", host="llm")).allowed
    assert not decide(text, req(method="GET", path="/admin/x", host="llm")).allowed


def test_waypoint_policies_by_target_ref_and_header_conditions():
    ps = policies(
        HEAD
        + """metadata: {name: p, namespace: ai}
spec:
  targetRefs: [{kind: Service, group: "", name: llm}]
  rules:
    - to: [{operation: {paths: ["/v1/*"]}}]
      when: [{key: "request.headers[x-tier]", values: [gold]}]
"""
    )
    assert workload_policies(ps, LLM) == []  # not the tunnel's to enforce
    applicable = service_policies(ps, "ai", "llm")
    ok = req(method="POST", path="/v1/chat", host="llm", headers={"x-tier": "gold"})
    assert evaluate(applicable, ok).allowed
    bad = req(method="POST", path="/v1/chat", host="llm", headers={"x-tier": "free"})
    assert not evaluate(applicable, bad).allowed


def test_audit_is_reported_and_never_decides():
    text = (
        HEAD
        + """metadata: {name: a, namespace: ai}
spec: {action: AUDIT, rules: [{}]}
"""
    )
    d = decide(text, req())
    assert d.allowed and d.audited == ("ai/a",)


def test_ip_blocks_and_conditions():
    text = (
        HEAD
        + """metadata: {name: p, namespace: ai}
spec:
  rules:
    - from: [{source: {ipBlocks: [10.244.2.0/24]}}]
      when: [{key: destination.port, values: ["8000"]}]
"""
    )
    assert decide(text, req()).allowed
    assert not decide(text, req(port=8001)).allowed


def test_waypoint_gateway_targets_apply_to_the_services_it_serves() -> None:
    from controller.model.loader import parse_text

    text = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: on-waypoint, namespace: ai}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: wp}]
  action: DENY
  rules: [{to: [{operation: {methods: [DELETE]}}]}]
"""
    ps = parse_text(text, "p.yaml").resources
    assert service_policies(ps, "ai", "llm", "wp") == ps  # type: ignore[arg-type]
    assert service_policies(ps, "ai", "llm", "other") == []  # type: ignore[arg-type]
    assert service_policies(ps, "ai", "llm") == []  # type: ignore[arg-type]
    assert service_policies(ps, "apps", "llm", "wp") == []  # type: ignore[arg-type]
