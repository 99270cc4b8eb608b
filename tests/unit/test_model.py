"""Policy and route validation: every error names file, line, resource, field and reason."""

from __future__ import annotations

import textwrap

import pytest

from controller.model.base import parse_duration
from controller.model.loader import parse_text
from controller.model.routing import HTTPRoute
from controller.model.security import AuthorizationPolicy


def problems(text: str) -> list[str]:
    offer = parse_text(textwrap.dedent(text), "p.yaml")
    assert offer.problems, "expected problems"
    return [str(p) for p in offer.problems]


ROUTE = """\
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: llm-canary, namespace: ai}
spec:
  parentRefs: [{group: "", kind: Service, name: llm, port: 8000}]
  rules:
    - matches: [{path: {type: PathPrefix, value: /v1}}]
      backendRefs:
        - {name: llm-v1, port: 8000, weight: 90}
        - {name: llm-v2, port: 8000, weight: 10}
      timeouts: {request: 30s, backendRequest: 10s}
      retry: {codes: [503], attempts: 2, backoff: 100ms}
"""


def test_a_canary_route_parses():
    (r,) = parse_text(ROUTE, "r.yaml").resources
    assert isinstance(r, HTTPRoute)
    rule = r.spec.rules[0]
    assert [b.weight for b in rule.backend_refs] == [90, 10]
    assert rule.timeouts.request == 30.0 and rule.retry.backoff == 0.1
    assert r.parent_services() == [("ai", "llm", 8000)]


def test_route_to_a_gateway_is_refused_with_the_reason():
    (msg,) = problems(
        ROUTE.replace('{group: "", kind: Service, name: llm, port: 8000}', "{name: my-gateway}")
    )
    assert msg.startswith(
        "p.yaml:5: HTTPRoute ai/llm-canary: spec.parentRefs[0]: parent "
        "Gateway my-gateway: weft attaches routes to Services"
    )


def test_negative_weight_and_bad_regex_point_at_the_field():
    msgs = problems(ROUTE.replace("weight: 10}", "weight: -1}"))
    assert any("spec.rules[0].backendRefs[1].weight" in m and ":10:" in m for m in msgs)
    msgs = problems(
        ROUTE.replace(
            "{type: PathPrefix, value: /v1}", "{type: RegularExpression, value: '/v1/(['}"
        )
    )
    assert any("invalid regular expression" in m for m in msgs)


def test_backend_timeout_longer_than_request_is_refused():
    (msg,) = problems(ROUTE.replace("backendRequest: 10s", "backendRequest: 1m"))
    assert "backendRequest must not be longer than request" in msg


def test_missing_backend_port_is_refused():
    msgs = problems(
        ROUTE.replace("{name: llm-v1, port: 8000, weight: 90}", "{name: llm-v1, weight: 90}")
    )
    assert any("backendRefs[0].port: port is required" in m for m in msgs)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("10s", 10.0), ("500ms", 0.5), ("1m30s", 90.0), ("1h", 3600.0), ("2", 2.0)],
)
def test_durations(text, expected):
    assert parse_duration(text if text != "2" else 2) == expected


@pytest.mark.parametrize("bad", ["10", "1.5s", "s", "", "10x", "-1s"])
def test_bad_durations(bad):
    with pytest.raises(ValueError):
        parse_duration(bad)


POLICY = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: p, namespace: ai}
spec:
  selector: {matchLabels: {app: llm}}
  action: DENY
  rules:
    - from: [{source: {principals: ["cluster.local/ns/apps/sa/batch"]}}]
      to: [{operation: {ports: ["8000"], methods: [POST]}}]
"""


def test_policy_parses_and_knows_its_l7_parts():
    (p,) = parse_text(POLICY, "p.yaml").resources
    assert isinstance(p, AuthorizationPolicy)
    assert p.spec.rules[0].has_l7() and not p.enforced_at_waypoint


def test_custom_action_and_jwt_are_refused_with_the_alternative():
    (msg,) = problems(POLICY.replace("DENY", "CUSTOM"))
    assert "use ALLOW or DENY" in msg
    (msg,) = problems(POLICY.replace("principals:", "requestPrincipals:"))
    assert "spec.rules[0].from[0].source.requestPrincipals" in msg and "JWT" in msg


def test_bad_port_and_pattern_are_refused():
    (msg,) = problems(POLICY.replace('ports: ["8000"]', 'ports: ["http"]'))
    assert "port 'http' must be a number" in msg
    (msg,) = problems(POLICY.replace("ns/apps/sa/batch", "ns/*/sa/batch"))
    assert "'*' may only be a prefix, a suffix" in msg


def test_unknown_condition_key_is_refused():
    (msg,) = problems(POLICY + "      when: [{key: 'request.auth.claims[iss]', values: [x]}]\n")
    assert "condition key 'request.auth.claims[iss]' is not supported" in msg


def test_empty_spec_is_the_allow_nothing_policy():
    (p,) = parse_text(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
        "metadata: {name: deny-all, namespace: ai}\nspec: {}\n",
        "p",
    ).resources
    assert p.spec.action == "ALLOW" and p.spec.rules is None


def test_unknown_kind_lists_the_kinds_weft_reads():
    (msg,) = problems("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n")
    assert "unknown kind 'ConfigMap'" in msg and "HTTPRoute" in msg and ":2:" in msg


def test_istio_kinds_weft_does_not_read_say_what_to_write_instead():
    (msg,) = problems("apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: x}\n")
    assert "ingress gateway" in msg and "weft-waypoint" in msg
    (msg,) = problems(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: x}\n"
    )
    assert "unknown kind 'ServiceEntry'" in msg and "egress" in msg


def test_istio_virtualservice_without_spec_names_the_field():
    (msg,) = problems(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: x}\n"
    )
    assert "spec" in msg


KUBECTL_ROUTE = """\
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  annotations:
    kubectl.kubernetes.io/last-applied-configuration: |
      {"apiVersion":"gateway.networking.k8s.io/v1","kind":"HTTPRoute"}
    team: ml
  creationTimestamp: "2026-12-01T10:00:00Z"
  generation: 3
  managedFields:
  - apiVersion: gateway.networking.k8s.io/v1
    fieldsType: FieldsV1
    manager: kubectl-client-side-apply
    operation: Update
  name: llm
  namespace: ai
  resourceVersion: "48211"
  uid: 3f1f4c1e-9a55-4c1b-8d5e-2b0d6c1e7a10
spec:
  parentRefs: [{group: "", kind: Service, name: llm}]
  rules:
  - backendRefs: [{name: llm-v1, port: 8000}]
status:
  parents:
  - conditions: [{type: Accepted, status: "True", reason: Accepted}]
"""


def test_what_kubectl_get_prints_can_be_applied_again():
    """Issue 17: fields the API server adds, and status, are accepted and dropped; a user's
    own annotations stay, kubectl's copy of the last applied object does not."""
    (route,) = parse_text(KUBECTL_ROUTE, "route.yaml").resources
    assert route.metadata.annotations == {"team": "ml"}
    assert route.metadata.resource_version == "48211" and route.metadata.generation == 3
    assert route.status is None
