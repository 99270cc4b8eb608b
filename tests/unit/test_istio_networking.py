"""Istio's VirtualService and DestinationRule as users paste them from Istio's tutorials:
derived into HTTPRoute, BackendPolicy, RetryPolicy, FaultInjection and subset Services,
every unimplemented field an error naming it, and the 90/10 split plus the circuit breaker
acting through a real waypoint (in-process, over loopback)."""

from __future__ import annotations

import collections
import textwrap

import pytest
import uvloop

from agent.state import ConfigSnapshot
from controller.model.derived import derive
from controller.model.istio_networking import DERIVED_FROM
from controller.model.loader import parse_text
from controller.model.status import conditions
from tests.unit.waypoint_mesh import Backend, WaypointMesh

SERVICES = """\
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: bookinfo, labels: {weft.dev/use-waypoint: wp}}
spec: {selector: {app: reviews}, clusterIP: 10.96.0.20, ports: [{port: 9080}]}
---
apiVersion: weft.dev/v1alpha1
kind: Workload
metadata: {name: reviews-v1-a, namespace: bookinfo, labels: {app: reviews, version: v1}}
spec: {node: node-1, addresses: [10.244.1.5]}
---
apiVersion: weft.dev/v1alpha1
kind: Workload
metadata: {name: reviews-v2-a, namespace: bookinfo, labels: {app: reviews, version: v2}}
spec: {node: node-1, addresses: [10.244.1.6]}
"""

# Istio's "traffic shifting" and "circuit breaking" tasks, as written there.
VS = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: bookinfo}
spec:
  hosts: [reviews]
  http:
  - route:
    - destination: {host: reviews, subset: v1}
      weight: 90
    - destination: {host: reviews, subset: v2}
      weight: 10
"""

DR = """\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: bookinfo}
spec:
  host: reviews
  trafficPolicy:
    connectionPool:
      tcp: {maxConnections: 1}
      http: {http1MaxPendingRequests: 1, maxRequestsPerConnection: 1}
    outlierDetection:
      consecutive5xxErrors: 1
      interval: 1s
      baseEjectionTime: 3m
      maxEjectionPercent: 100
  subsets:
  - {name: v1, labels: {version: v1}}
  - name: v2
    labels: {version: v2}
    trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}
"""


def parse(*texts: str) -> list:
    offer = parse_text("\n---\n".join(textwrap.dedent(t) for t in texts), "istio.yaml")
    assert not offer.problems, offer.problems
    return offer.resources


def problems_of(text: str) -> list[str]:
    offer = parse_text(textwrap.dedent(text), "istio.yaml")
    return [f"{p.field}: {p.reason}" for p in offer.problems]


def by_key(resources: list) -> dict[str, object]:
    return {f"{r.KIND} {r.namespace}/{r.name}": r for r in resources}


def test_the_tutorials_split_and_circuit_breaker_derive_into_weft_resources():
    derived, problems = derive(parse(SERVICES, VS, DR))
    assert problems == []
    got = by_key(derived)
    route = got["HTTPRoute bookinfo/reviews"]
    (rule,) = route.spec.rules
    assert [(b.name, b.weight, b.port) for b in rule.backend_refs] == [
        ("reviews--v1", 90, 9080),
        ("reviews--v2", 10, 9080),
    ]
    assert route.metadata.annotations[DERIVED_FROM] == "VirtualService bookinfo/reviews"
    v2 = got["Service bookinfo/reviews--v2"]
    assert v2.spec.selector == {"app": "reviews", "version": "v2"} and v2.spec.vips() == []
    pol = got["BackendPolicy bookinfo/reviews"].spec
    assert pol.connection_pool.max_connections == 1
    assert pol.connection_pool.max_pending_requests == 1
    assert pol.outlier_detection.consecutive_5xx_errors == 1
    assert pol.outlier_detection.base_ejection_time == 180
    # The subset inherits the rule's policy and overrides its load balancer, as in Istio.
    sub = got["BackendPolicy bookinfo/reviews--v2"].spec
    assert sub.load_balancer.type == "RoundRobin" and sub.connection_pool.max_connections == 1
    assert sub.target_refs[0].name == "reviews--v2"
    # A snapshot built from the originals has the derived resources and their endpoints.
    snap = ConfigSnapshot.build(
        "t", 1, "cluster.local", {r.key: r for r in parse(SERVICES, VS, DR)}
    )
    assert [w.name for w in snap.endpoints[("bookinfo", "reviews--v2")]] == ["reviews-v2-a"]
    assert snap.routes[("bookinfo", "reviews")][0].name == "reviews"


def test_retries_timeout_fault_mirror_headers_and_rewrite_are_mapped():
    vs = """\
    apiVersion: networking.istio.io/v1beta1
    kind: VirtualService
    metadata: {name: ratings, namespace: bookinfo}
    spec:
      hosts: [reviews.bookinfo.svc.cluster.local]
      http:
      - name: Canary Users
        match:
        - uri: {prefix: /api/v1}
          headers: {end-user: {exact: jason}, x-tier: {prefix: gold}}
          method: {exact: GET}
        rewrite: {uri: /v1}
        timeout: 2s
        retries: {attempts: 3, perTryTimeout: 500ms, retryOn: "5xx,reset,503"}
        fault:
          delay: {percentage: {value: 10}, fixedDelay: 5s}
          abort: {percentage: {value: 1.5}, httpStatus: 500}
        mirror: {host: reviews, subset: v2}
        mirrorPercentage: {value: 25.0}
        headers:
          request: {set: {x-env: test}, remove: [x-debug]}
          response: {add: {x-served-by: weft}}
        route:
        - destination: {host: reviews, subset: v1, port: {number: 9080}}
    """
    derived, problems = derive(parse(SERVICES, vs, DR))
    assert problems == []
    got = by_key(derived)
    (rule,) = got["HTTPRoute bookinfo/ratings"].spec.rules
    assert rule.name == "canary-users"
    (m,) = rule.matches
    assert (m.path.type, m.path.value, m.method) == ("PathPrefix", "/api/v1", "GET")
    assert [(h.type, h.name, h.value) for h in m.headers] == [
        ("Exact", "end-user", "jason"),
        ("RegularExpression", "x-tier", "gold.*"),  # the engine matches whole values
    ]
    assert rule.timeouts.request == 2.0
    kinds = [f.type for f in rule.filters]
    assert kinds == [
        "RequestHeaderModifier",
        "ResponseHeaderModifier",
        "URLRewrite",
        "RequestMirror",
        "ExtensionRef",
        "ExtensionRef",
    ]
    rw = rule.filters[2].url_rewrite.path
    assert (rw.type, rw.replace_prefix_match) == ("ReplacePrefixMatch", "/v1")
    mirror = rule.filters[3].request_mirror
    assert mirror.backend_ref.name == "reviews--v2"
    assert (mirror.fraction.numerator, mirror.fraction.denominator) == (2500, 10000)
    retry = got["RetryPolicy bookinfo/ratings-0"].spec
    assert retry.attempts == 3 and retry.per_try_timeout == 0.5
    assert set(retry.retry_on) == {"5xx", "reset", "retriable-status-codes"}
    assert retry.retriable_status_codes == [503]
    fault = got["FaultInjection bookinfo/ratings-0"].spec
    assert (fault.delay.fixed_delay, fault.delay.percentage) == (5.0, 10.0)
    assert (fault.abort.http_status, fault.abort.percentage) == (500, 1.5)


@pytest.mark.parametrize(
    ("snippet", "field"),
    [
        (
            "  http:\n  - corsPolicy: {allowOrigins: [{exact: x}]}\n    route: [{destination: "
            "{host: reviews}}]\n",
            "corsPolicy",
        ),
        (
            "  http:\n  - match: [{sourceLabels: {app: x}}]\n    route: [{destination: "
            "{host: reviews}}]\n",
            "sourceLabels",
        ),
        (
            "  gateways: [bookinfo-gateway]\n"
            "  http:\n  - route: [{destination: {host: reviews}}]\n",
            "gateways",
        ),
        ("  tls: [{match: [{sniHosts: [x]}], route: [{destination: {host: reviews}}]}]\n", "tls"),
        (
            "  http:\n  - route: [{destination: {host: reviews}}]\n    retries: "
            "{attempts: 2, retryOn: cancelled}\n",
            "retryOn",
        ),
    ],
)
def test_every_virtualservice_field_weft_does_not_implement_is_an_error_naming_it(snippet, field):
    text = (
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\n"
        "metadata: {name: r, namespace: bookinfo}\nspec:\n  hosts: [reviews]\n" + snippet
    )
    got = problems_of(text)
    assert got and any(field in p for p in got), got


@pytest.mark.parametrize(
    ("policy", "field"),
    [
        ("connectionPool: {http: {http2MaxRequests: 10}}", "http2MaxRequests"),
        ("loadBalancer: {localityLbSetting: {enabled: true}}", "localityLbSetting"),
        ("tls: {mode: SIMPLE}", "SIMPLE"),
        (
            "outlierDetection: {splitExternalLocalOriginErrors: true}",
            "splitExternalLocalOriginErrors",
        ),
    ],
)
def test_every_destinationrule_field_weft_does_not_implement_is_an_error_naming_it(policy, field):
    text = (
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\n"
        "metadata: {name: r, namespace: bookinfo}\nspec:\n  host: reviews\n"
        f"  trafficPolicy: {{{policy}}}\n"
    )
    got = problems_of(text)
    assert got and any(field in p for p in got), got


def test_a_missing_subset_is_said_on_the_virtualservice_and_nothing_half_applies():
    derived, problems = derive(parse(SERVICES, VS))
    assert not [r for r in derived if r.KIND == "HTTPRoute"]
    (p,) = [p for p in problems if "v1" in p.reason]
    assert p.resource == "VirtualService bookinfo/reviews" and "no DestinationRule" in p.reason
    cond = conditions(parse(SERVICES, VS))
    accepted = {c.type: c for c in next(v for k, v in cond.items() if k.kind == "VirtualService")}
    assert not accepted["Accepted"].status and accepted["Accepted"].reason == "Invalid"


def test_consistent_hash_and_port_level_settings():
    dr = """\
    apiVersion: networking.istio.io/v1alpha3
    kind: DestinationRule
    metadata: {name: reviews, namespace: bookinfo}
    spec:
      host: reviews
      trafficPolicy:
        loadBalancer:
          consistentHash: {httpHeaderName: x-user, ringHash: {minimumRingSize: 2048}}
        portLevelSettings:
        - port: {number: 9080}
          connectionPool: {tcp: {maxConnections: 7}}
    """
    derived, problems = derive(parse(SERVICES, dr))
    assert problems == []
    got = by_key(derived)
    lb = got["BackendPolicy bookinfo/reviews"].spec.load_balancer
    assert (lb.type, lb.consistent_hash.header, lb.minimum_ring_size) == (
        "RingHash",
        "x-user",
        2048,
    )
    port = got["BackendPolicy bookinfo/reviews-9080"].spec
    assert port.target_refs[0].port == 9080 and port.connection_pool.max_connections == 7
    assert port.load_balancer.type == "RingHash"  # the rule's, for the fields the port omits


SPLIT_VS = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: llm, namespace: ai}
spec:
  hosts: [llm]
  http:
  - route:
    - {destination: {host: llm, subset: v1}, weight: 90}
    - {destination: {host: llm, subset: v2}, weight: 10}
"""

SPLIT_DR = """\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: llm, namespace: ai}
spec:
  host: llm
  trafficPolicy:
    outlierDetection: {consecutive5xxErrors: 2, interval: 1s, baseEjectionTime: 1m,
                       maxEjectionPercent: 100}
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
"""


def test_the_istio_split_and_outlier_ejection_act_through_the_waypoint(tmp_path):
    """Pasted as written: 400 requests split about 90/10 between the subsets; then with v1's
    only replica answering 503, the DestinationRule's outlier detection ejects it."""

    async def main() -> None:
        backends = [
            Backend("llm-v1", version="v1"),
            Backend("llm-v2", version="v2"),
            Backend("llm-v1b", version="v1"),
        ]
        async with WaypointMesh(tmp_path, seed=99, backends=backends) as m:
            await m.apply("istio.yaml", SPLIT_VS + "---\n" + SPLIT_DR)
            served: collections.Counter[str] = collections.Counter()
            async with await m.connect() as c:
                for _ in range(400):
                    r = await c.request("GET", "/v1/models")
                    assert r.status == 200, r
                    served[r.headers["x-weft-served-by"]] += 1
            v1 = served["ai/llm-v1"] + served["ai/llm-v1b"]
            assert 0.82 <= v1 / 400 <= 0.97 and served["ai/llm-v2"] > 0, served
            bad = next(b for b in m.backends if b.name == "llm-v1").server
            bad.b.error_rate, bad.b.error_status = 1.0, 503
            codes = []
            chat = b'{"model": "llama", "messages": [{"role": "user", "content": "hi"}]}'
            async with await m.connect() as c:
                for _ in range(60):
                    r = await c.request("POST", "/v1/chat/completions", chat)
                    codes.append((r.status, r.headers.get("x-weft-served-by")))
            failures = [c for c in codes if c[0] == 503]
            assert len(failures) <= 2, failures  # ejected after consecutive5xxErrors: 2
            assert codes[-1][0] == 200
            backend = m.waypoint.engine.backend(("ai", "llm--v1", 8000))
            assert backend is not None and backend.policy is not None  # the derived policy
            ejected = [e for e in backend.endpoints if e.ejected_until is not None]
            bad_ip = next(b for b in m.backends if b.name == "llm-v1").ip
            assert [e.address.split(":")[0] for e in ejected] == [bad_ip], backend.endpoints

    uvloop.run(main())


def test_weft_policy_convert_prints_resources_that_validate_as_they_are(tmp_path):
    from typer.testing import CliRunner

    from agent.cli import app

    f = tmp_path / "istio.yaml"
    f.write_text(SERVICES + "---\n" + VS + "---\n" + DR)
    out = CliRunner().invoke(app, ["policy", "convert", "-f", str(f), "--lab", "no-such-lab"])
    assert out.exit_code == 0, out.output
    offer = parse_text(out.stdout, "converted.yaml")
    assert not offer.problems, offer.problems
    kinds = collections.Counter(r.KIND for r in offer.resources)
    assert kinds == {"HTTPRoute": 1, "Service": 2, "BackendPolicy": 3}
    only_vs = tmp_path / "vs.yaml"
    only_vs.write_text(VS)
    out = CliRunner().invoke(app, ["policy", "convert", "-f", str(only_vs), "--lab", "no-such-lab"])
    # `weft` turns it into exit code 2 (docs/cli.md); under CliRunner it is the exception.
    assert type(out.exception).__name__ == "InvalidConfig"
    assert "no Service bookinfo/reviews" in str(out.exception)


# ---- what an attacker (or a mistake) must not get from Istio's kinds -----------------------


def test_a_method_match_other_than_exact_is_refused_and_never_breaks_a_snapshot():
    text = VS.replace("  - route:\n", "  - match: [{method: {prefix: G}}]\n    route:\n", 1)
    got = problems_of(text)
    assert got and "method" in got[0] and "exact" in got[0], got


def test_a_destinationrule_in_another_namespace_changes_nothing_there():
    """A tenant's rule for bookinfo's Service (by its FQDN) would set that Service's policy
    and subsets for every caller: refused, and the owner's rule applies."""
    other = (
        DR.replace("namespace: bookinfo}", "namespace: aaa-tenant}")
        .replace("host: reviews", "host: reviews.bookinfo.svc.cluster.local")
        .replace("version: v1}", "app: payments}")
    )
    derived, problems = derive(parse(SERVICES, VS, DR, other))
    assert any(
        p.resource == "DestinationRule aaa-tenant/reviews" and "own namespace" in p.reason
        for p in problems
    )
    got = by_key(derived)
    assert got["Service bookinfo/reviews--v1"].spec.selector == {"app": "reviews", "version": "v1"}
    assert got["BackendPolicy bookinfo/reviews"].metadata.annotations[DERIVED_FROM] == (
        "DestinationRule bookinfo/reviews"
    )


def test_subset_labels_that_contradict_the_service_selector_are_refused():
    bad = DR.replace("{name: v1, labels: {version: v1}}", "{name: v1, labels: {app: payments}}")
    derived, problems = derive(parse(SERVICES, VS, bad))
    assert any("contradict" in p.reason for p in problems)
    # All or nothing: neither the rule's Services and policies, nor the VirtualService
    # routing to its subsets, is derived.
    assert not derived


def test_rules_whose_order_the_waypoint_would_change_are_refused():
    """Istio takes the first matching rule; the waypoint orders by precedence. A catch-all
    prefix rule before a header rule would be reordered: refused, with what to do."""
    vs = """\
    apiVersion: networking.istio.io/v1
    kind: VirtualService
    metadata: {name: r, namespace: bookinfo}
    spec:
      hosts: [reviews]
      http:
      - match: [{uri: {prefix: /admin}}]
        fault: {abort: {httpStatus: 403}}
        route: [{destination: {host: reviews}}]
      - match: [{uri: {prefix: /admin}, headers: {x-debug: {exact: "1"}}}]
        route: [{destination: {host: reviews}}]
    """
    derived, problems = derive(parse(SERVICES, vs))
    assert not derived and any("would be tried before" in p.reason for p in problems)
    # The same rules in the order the waypoint keeps are accepted.
    lines = textwrap.dedent(vs).splitlines()
    swapped = "\n".join(lines[:6] + lines[9:11] + lines[6:9]) + "\n"
    derived, problems = derive(parse(SERVICES, swapped))
    assert not problems and [r.KIND for r in derived].count("HTTPRoute") == 1


@pytest.mark.parametrize(
    ("snippet", "says"),
    [
        ("  exportTo: [.]\n  http:\n  - route: [{destination: {host: reviews}}]\n", "exportTo"),
        (
            "  http:\n  - match: [{port: 9999}]\n    route: [{destination: {host: reviews}}]\n",
            "port",
        ),
    ],
)
def test_fields_that_would_be_ignored_are_refused(snippet, says):
    text = (
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\n"
        "metadata: {name: r, namespace: bookinfo}\nspec:\n  hosts: [reviews]\n" + snippet
    )
    got = problems_of(text)
    assert got and any(says in p for p in got), got


def test_tcp_routes_only_to_the_hosts_themselves():
    vs = """\
    apiVersion: networking.istio.io/v1
    kind: VirtualService
    metadata: {name: t, namespace: bookinfo}
    spec:
      hosts: [reviews]
      tcp: [{route: [{destination: {host: ratings}}]}]
    """
    _, problems = derive(parse(SERVICES, vs))
    assert any("tcp routes may only go to the hosts" in p.reason for p in problems)


def test_a_rule_that_cannot_be_routed_leaves_no_retry_policy_or_fault_behind():
    vs = """\
    apiVersion: networking.istio.io/v1
    kind: VirtualService
    metadata: {name: r, namespace: bookinfo}
    spec:
      hosts: [reviews]
      http:
      - retries: {attempts: 3}
        fault: {abort: {httpStatus: 500}}
        route: [{destination: {host: reviews, subset: nope}}]
    """
    derived, problems = derive(parse(SERVICES, vs, DR))
    assert problems and not [r for r in derived if r.KIND in ("RetryPolicy", "FaultInjection")]
