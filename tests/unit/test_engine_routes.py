"""Route tables: Gateway API precedence, matching, splits, filters, and the errors rules answer."""

from __future__ import annotations

import itertools
import random
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.waypoint.codec.headers import Headers
from agent.waypoint.engine import Engine, Forward, Respond
from agent.waypoint.engine.routes import precedence
from controller.model.routing import HeaderMatch, PathMatch, QueryMatch, RouteMatch
from tests.enginetesting import FakeClock, http_route, service, snapshot

LLM = ("ai", "llm")
BACKENDS = (
    service("llm", pods=1),
    service("v1", pods=2, subnet=2),
    service("v2", pods=2, subnet=3),
    service("v3", pods=1, subnet=4),
)


def route(rules: str, name: str = "r", namespace: str = "ai") -> str:
    return http_route(rules, name=name, namespace=namespace, parent_namespace="ai")


def engine(*routes: str, seed: int = 1, clock: FakeClock | None = None) -> Engine:
    return Engine(snapshot(*BACKENDS, *routes), clock=clock or FakeClock(), rng=random.Random(seed))


def to(e: Engine, target: str, *headers: tuple[str, str], method: str = "GET") -> str:
    """Which backend (service name) or status a request gets."""
    d = e.route(LLM, 8000, method, target, Headers.of(*headers))
    return d.backend.key[1] if isinstance(d, Forward) else str(d.status)


def test_exact_beats_prefix_and_the_longest_prefix_wins():
    """Exact over any prefix; among prefixes the longest; prefixes match whole segments."""
    e = engine(
        route("""\
    - matches: [{path: {type: PathPrefix, value: /v1}}]
      backendRefs: [{name: v1, port: 8000}]
    - matches: [{path: {type: PathPrefix, value: /v1/chat}}]
      backendRefs: [{name: v2, port: 8000}]
    - matches: [{path: {type: Exact, value: /v1/chat/completions}}]
      backendRefs: [{name: v3, port: 8000}]""")
    )
    assert to(e, "/v1/chat/completions") == "v3"
    assert to(e, "/v1/chat/completions/x?stream=1") == "v2"
    assert to(e, "/v1/chat") == "v2"
    assert to(e, "/v1/chatter") == "v1"  # not a /v1/chat segment
    assert to(e, "/v1") == "v1"
    assert to(e, "/v2") == "404"


def test_method_then_header_count_then_query_count_break_path_ties():
    """Same path: a method match wins, then more header matches, then more query matches."""
    e = engine(
        route("""\
    - matches: [{path: {value: /v1}, headers: [{name: a, value: "1"}, {name: b, value: "2"}]}]
      backendRefs: [{name: v2, port: 8000}]
    - matches: [{path: {value: /v1}, method: POST}]
      backendRefs: [{name: v1, port: 8000}]
    - matches:
        - path: {value: /v1}
          headers: [{name: a, value: "1"}]
          queryParams: [{name: q, value: x}]
      backendRefs: [{name: v3, port: 8000}]""")
    )
    assert to(e, "/v1", ("a", "1"), ("b", "2"), method="POST") == "v1"
    assert to(e, "/v1?q=x", ("a", "1"), ("b", "2")) == "v2"
    assert to(e, "/v1?q=x", ("a", "1")) == "v3"
    assert to(e, "/v1?q=y", ("a", "1")) == "404"


def test_full_ties_go_to_the_alphabetically_first_route_then_the_first_rule():
    """Identical matches in two routes: "namespace/name" order; within a route, rule order."""
    rule = "    - backendRefs: [{{name: {b}, port: 8000}}]\n"
    e = engine(
        route(rule.format(b="v2"), name="zeta"),
        route(rule.format(b="v1") + rule.format(b="v3"), name="alpha"),
    )
    assert to(e, "/anything") == "v1"
    assert [r.label for r in e.table(LLM, 8000).rules] == [
        "ai/alpha/rules[0]",
        "ai/alpha/rules[1]",
        "ai/zeta/rules[0]",
    ]


MATCHES = st.builds(
    RouteMatch,
    path=st.one_of(
        st.none(),
        st.builds(
            PathMatch,
            type=st.sampled_from(["Exact", "PathPrefix", "RegularExpression"]),
            value=st.sampled_from(["/", "/v1", "/v1/chat", "/v1/.*"]),
        ),
    ),
    method=st.sampled_from([None, "GET", "POST"]),
    headers=st.lists(
        st.builds(HeaderMatch, name=st.sampled_from("abc"), value=st.just("x")), max_size=3
    ),
    query_params=st.lists(
        st.builds(QueryMatch, name=st.sampled_from("qr"), value=st.just("y")), max_size=3
    ),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(MATCHES, st.integers(0, 3), st.integers(0, 3)), min_size=2, max_size=8))
def test_precedence_is_a_total_order_that_follows_the_spec(entries):
    """Distinct (route, rule, match) positions never tie, and sorting puts Exact paths first,
    then a method match before none at equal paths (the spec's chain)."""
    keys = [precedence(m, r, i, j) for j, (m, r, i) in enumerate(entries)]
    assert len(set(keys)) == len(keys)
    ordered = [entries[k][0] for k in sorted(range(len(keys)), key=keys.__getitem__)]
    kinds = [m.path.type if m.path else "PathPrefix" for m in ordered]
    if "Exact" in kinds:
        assert kinds[0] == "Exact"
    for a, b in itertools.pairwise(ordered):
        if a.path == b.path and (a.method is None) != (b.method is None):
            assert a.method is not None


def test_a_90_10_and_a_99_1_split_hold_over_many_draws():
    """Weighted backendRefs split traffic within tolerance (seeded, 20,000 requests)."""
    for w1, w2, tol in ((90, 10, 0.01), (99, 1, 0.003)):
        e = engine(
            route(f"""\
    - backendRefs:
        - {{name: v1, port: 8000, weight: {w1}}}
        - {{name: v2, port: 8000, weight: {w2}}}""")
        )
        got = Counter(to(e, "/") for _ in range(20_000))
        assert abs(got["v2"] / 20_000 - w2 / 100) < tol, got


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 5), min_size=2, max_size=3).filter(any), st.integers(0, 2**32))
def test_weighted_choice_never_picks_a_weight_zero_backend(weights, seed):
    """Whatever the weights and the seed, a weight-0 backendRef receives nothing."""
    refs = ", ".join(f"{{name: v{i + 1}, port: 8000, weight: {w}}}" for i, w in enumerate(weights))
    e = engine(route(f"    - backendRefs: [{refs}]"), seed=seed)
    seen = {to(e, "/") for _ in range(200)}
    assert all(weights[int(s[1]) - 1] > 0 for s in seen)


def test_header_a_b_sends_the_flagged_caller_to_b():
    """A header match sends x-variant: b to v2, everyone else to v1."""
    e = engine(
        route("""\
    - matches: [{headers: [{name: x-variant, value: b}]}]
      backendRefs: [{name: v2, port: 8000}]
    - backendRefs: [{name: v1, port: 8000}]""")
    )
    assert to(e, "/v1/chat", ("X-Variant", "b")) == "v2"
    assert to(e, "/v1/chat", ("x-variant", "a")) == "v1"
    assert to(e, "/v1/chat") == "v1"


def test_header_modifiers_apply_to_request_and_response():
    """Set/add/remove on the request (rule and backendRef), and on the response."""
    e = engine(
        route("""\
    - filters:
        - type: RequestHeaderModifier
          requestHeaderModifier: {set: [{name: x-a, value: "1"}], remove: [x-drop]}
        - type: ResponseHeaderModifier
          responseHeaderModifier: {add: [{name: x-served-by, value: weft}]}
      backendRefs:
        - name: v1
          port: 8000
          filters:
            - type: RequestHeaderModifier
              requestHeaderModifier: {add: [{name: x-b, value: "2"}]}""")
    )
    fwd = e.route(LLM, 8000, "GET", "/", Headers.of(("x-a", "0"), ("x-drop", "y")))
    req, resp = Headers.of(("x-a", "0"), ("x-drop", "y")), Headers()
    assert isinstance(fwd, Forward)
    fwd.rewrite_request(req)
    fwd.rewrite_response(resp)
    assert req.fields == [(b"x-a", b"1"), (b"x-b", b"2")]
    assert resp.fields == [(b"x-served-by", b"weft")]


def test_url_rewrite_replaces_the_matched_prefix_and_the_host():
    """ReplacePrefixMatch works on whole segments and keeps the query; hostname is rewritten."""
    e = engine(
        route("""\
    - matches: [{path: {value: /openai/}}]
      filters:
        - type: URLRewrite
          urlRewrite:
            hostname: llm.internal
            path: {type: ReplacePrefixMatch, replacePrefixMatch: /v1}
      backendRefs: [{name: v1, port: 8000}]
    - matches: [{path: {value: /legacy}}]
      filters:
        - type: URLRewrite
          urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /}}
      backendRefs: [{name: v1, port: 8000}]""")
    )
    fwd = e.route(LLM, 8000, "POST", "/openai/chat?x=1", Headers())
    assert isinstance(fwd, Forward)
    assert (fwd.target, fwd.authority) == ("/v1/chat?x=1", "llm.internal")
    assert e.route(LLM, 8000, "GET", "/legacy/a/b", Headers()).target == "/a/b"  # type: ignore[union-attr]
    assert e.route(LLM, 8000, "GET", "/legacy", Headers()).target == "/"  # type: ignore[union-attr]


def test_redirect_answers_with_location_and_status():
    """RequestRedirect is answered by the waypoint: scheme, host, port and path as configured."""
    e = engine(
        route("""\
    - filters:
        - type: RequestRedirect
          requestRedirect:
            scheme: https
            hostname: llm.example.com
            statusCode: 301
            path: {type: ReplaceFullPath, replaceFullPath: /moved}""")
    )
    d = e.route(LLM, 8000, "GET", "/old?a=1", Headers(), authority="llm.ai:8000")
    assert isinstance(d, Respond) and d.status == 301
    assert d.headers == ((b"location", b"https://llm.example.com/moved?a=1"),)


def test_mirror_percentage_is_honoured_and_separate_from_the_answer():
    """A 25% mirror copies about a quarter of requests; the primary backend is unchanged."""
    e = engine(
        route("""\
    - filters:
        - type: RequestMirror
          requestMirror: {backendRef: {name: v2, port: 8000}, percent: 25}
      backendRefs: [{name: v1, port: 8000}]""")
    )
    fwds = [e.route(LLM, 8000, "GET", "/", Headers()) for _ in range(4000)]
    assert all(isinstance(f, Forward) and f.backend.key[1] == "v1" for f in fwds)
    mirrored = sum(1 for f in fwds if isinstance(f, Forward) and f.mirrors)
    assert 0.22 < mirrored / 4000 < 0.28
    assert e.counters.mirrors == mirrored


def test_timeouts_give_a_deadline_and_a_per_try_timeout():
    """timeouts.request sets the deadline; backendRequest is the per-try timeout; 0s disables."""
    clock = FakeClock(100.0)
    e = engine(
        route("""\
    - matches: [{path: {value: /a}}]
      timeouts: {request: 30s, backendRequest: 5s}
      backendRefs: [{name: v1, port: 8000}]
    - timeouts: {request: 0s}
      backendRefs: [{name: v1, port: 8000}]"""),
        clock=clock,
    )
    a = e.route(LLM, 8000, "GET", "/a", Headers())
    b = e.route(LLM, 8000, "GET", "/b", Headers())
    assert isinstance(a, Forward) and isinstance(b, Forward)
    assert (a.deadline, a.per_try_timeout, a.remaining()) == (130.0, 5.0, 30.0)
    assert (b.deadline, b.per_try_timeout) == (None, None)


def test_unresolvable_backends_answer_500_for_their_share():
    """A backendRef to a missing Service gets 500 BackendNotFound for its share of traffic;
    the valid one keeps its share (Gateway API)."""
    e = engine(
        route("""\
    - backendRefs: [{name: v1, port: 8000}, {name: gone, port: 8000}, {name: v2, port: 9999}]""")
    )
    got = Counter(to(e, "/") for _ in range(3000))
    assert set(got) == {"v1", "500"} and 0.6 < got["500"] / 3000 < 0.73
    d = e.table(LLM, 8000).rules[0].targets[1]
    assert isinstance(d, Respond) and d.code == "BackendNotFound" and "ai/gone" in d.reason


def test_a_missing_extension_filter_fails_the_rule_and_no_route_is_404():
    """An ExtensionRef naming nothing answers 500 FilterNotFound (never skipped); a request
    that matches no rule gets 404 NoMatchingRoute."""
    e = engine(
        route("""\
    - matches: [{path: {value: /x}}]
      filters:
        - {type: ExtensionRef, extensionRef: {group: weft.dev, kind: RetryPolicy, name: nope}}
      backendRefs: [{name: v1, port: 8000}]""")
    )
    d = e.route(LLM, 8000, "GET", "/x", Headers())
    assert isinstance(d, Respond) and (d.status, d.code) == (500, "FilterNotFound")
    d = e.route(LLM, 8000, "GET", "/y", Headers())
    assert isinstance(d, Respond) and (d.status, d.code) == (404, "NoMatchingRoute")


def test_without_routes_traffic_goes_to_the_service_itself():
    """No HTTPRoute attached: one catch-all rule to the Service, on the requested port."""
    e = engine()
    fwd = e.route(LLM, 8000, "GET", "/anything", Headers())
    assert isinstance(fwd, Forward) and fwd.backend.name == "ai/llm:8000"
    assert fwd.rule.label == "default"


def test_consumer_routes_apply_only_to_callers_from_their_namespace():
    """GAMMA: a route in the caller's namespace replaces the producer's routes for it only."""
    e = engine(
        route("    - backendRefs: [{name: v1, port: 8000}]"),
        route("    - backendRefs: [{name: v2, namespace: ai, port: 8000}]", namespace="apps"),
    )
    caller = "spiffe://cluster.local/ns/apps/sa/client"
    other = "spiffe://cluster.local/ns/batch/sa/job"
    assert e.route(LLM, 8000, "GET", "/", Headers(), source=caller).backend.key[1] == "v2"  # type: ignore[union-attr]
    assert e.route(LLM, 8000, "GET", "/", Headers(), source=other).backend.key[1] == "v1"  # type: ignore[union-attr]


def test_rules_that_cannot_be_served_say_why():
    """Every backendRef at weight 0 is 500 NoWeightedBackend; ReplacePrefixMatch on an Exact
    match is 500 IncompatibleFilters; a Service that does not exist is BackendNotFound."""
    e = engine(
        route("""\
    - matches: [{path: {value: /zero}}]
      backendRefs: [{name: v1, port: 8000, weight: 0}]
    - matches: [{path: {type: Exact, value: /exact}}]
      filters:
        - type: URLRewrite
          urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /v1}}
      backendRefs: [{name: v1, port: 8000}]""")
    )
    codes = [e.route(LLM, 8000, "GET", p, Headers()) for p in ("/zero", "/exact")]
    assert [(d.status, d.code) for d in codes] == [  # type: ignore[union-attr]
        (500, "NoWeightedBackend"),
        (500, "IncompatibleFilters"),
    ]
    d = e.route(("ai", "ghost"), 8000, "GET", "/", Headers())
    assert isinstance(d, Respond) and d.code == "BackendNotFound" and "does not exist" in d.reason
