"""Compiled against source, for what reaches the compiled modules from requests and config:
path normalization, route matching and the rest of Engine.route (filters, faults, mirrors,
redirects, hash policies), the try after it (balancers, outlier detection, retry), and the
header list operations the shell and the engine apply.

The source side is every listed module loaded from its .py *together* (srcworld.py), so an
interpreted Engine runs interpreted routes, backend and headers.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent import compiled
from tests.enginetesting import FakeClock, backend_policy, http_route, service, snapshot
from tests.unit.source_world import source_world

FUZZ = settings(
    max_examples=400,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)

if not all(compiled.is_compiled(m) for m in compiled.MODULES):
    pytest.skip("the modules are not compiled here (make compiled)", allow_module_level=True)

import agent.waypoint.codec.headers as c_headers  # noqa: E402
import agent.waypoint.engine.engine as c_engine  # noqa: E402
import agent.waypoint.pathnorm as c_pathnorm  # noqa: E402

SRC = source_world()
s_headers = SRC["agent.waypoint.codec.headers"]
s_engine = SRC["agent.waypoint.engine.engine"]
s_pathnorm = SRC["agent.waypoint.pathnorm"]


def outcome(f: Any, *args: Any) -> Any:
    try:
        return ("ok", f(*args))
    except Exception as e:  # compared, type and message
        return (type(e).__name__, str(e))


# ---- path normalization ---------------------------------------------------------------------

PIECES = [
    "/",
    "//",
    ".",
    "..",
    "./",
    "../",
    "%",
    "%2f",
    "%2F",
    "%5c",
    "%5C",
    "%41",
    "%7e",
    "%2e",
    "%2E%2e",
    "%00",
    "%7f",
    "%zz",
    "%4",
    "%%",
    "%e9",
    "%C3%A9",
    "a",
    "Z",
    "~",
    "-",
    "_",
    "?",
    "#",
    "&",
    "=",
    "\\",
    "\t",
    " ",
    "\x00",
    "\x7f",
    "\x80",
    "\xff",
    "é",
    "ς",
    "Σ",
    "日",
    "\U0001f600",
    "İ",
    "٣",
    "%٣٣",
    "*",
    ";",
    ":",
    "@",
    "+",
]
paths = st.one_of(
    st.lists(st.sampled_from(PIECES), max_size=14).map(lambda p: "/" + "".join(p)),
    st.lists(st.sampled_from(PIECES), max_size=14).map("".join),
    st.text(max_size=40),
    st.text(alphabet="/.%2fF5cC?#a", max_size=30),
)


@FUZZ
@given(paths, st.sampled_from(["reject", "decode", "keep"]))
def test_pathnorm_compiled_is_its_source(path: str, mode: str) -> None:
    assert outcome(c_pathnorm.normalize, path, mode) == outcome(s_pathnorm.normalize, path, mode)
    assert outcome(c_pathnorm.remove_dot_segments, "/" + path) == outcome(
        s_pathnorm.remove_dot_segments, "/" + path
    )


# ---- the engine: route, then one try ----------------------------------------------------------

ROUTES = (
    http_route("""\
    - matches: [{path: {type: Exact, value: /v1/chat/completions}}]
      backendRefs: [{name: v3, port: 8000}]
    - matches: [{path: {value: /v1}}, {path: {value: /v1/chat/}, method: POST}]
      backendRefs: [{name: v1, port: 8000, weight: 3}, {name: v2, port: 8000, weight: 1}]
    - matches:
        - path: {type: RegularExpression, value: '/api/[a-z]+/\\d+'}
        - path: {type: RegularExpression, value: '/é.*'}
      backendRefs: [{name: v2, port: 8000}]
    - matches:
        - headers: [{name: x-tier, value: gold}, {name: X-Tier, value: silver}]
        - headers: [{type: RegularExpression, name: x-user, value: 'u[0-9]+'}]
          queryParams: [{name: q, value: a b}]
        - queryParams: [{type: RegularExpression, name: k, value: '\\d{2}'}]
      filters:
        - type: RequestHeaderModifier
          requestHeaderModifier:
            set: [{name: X-Set, value: one}, {name: x-tier, value: none}]
            add: [{name: x-add, value: two}]
            remove: [x-remove, X-USER]
        - type: ResponseHeaderModifier
          responseHeaderModifier: {add: [{name: x-served-by, value: weft}], remove: [server]}
      backendRefs:
        - name: v3
          port: 8000
          filters:
            - type: RequestHeaderModifier
              requestHeaderModifier: {set: [{name: x-backend, value: v3}]}
    - matches: [{path: {value: /old}}]
      filters:
        - type: RequestRedirect
          requestRedirect:
            port: 8443
            path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}
    - matches: [{path: {type: Exact, value: /moved}}]
      filters:
        - type: RequestRedirect
          requestRedirect: {scheme: https, hostname: example.com, statusCode: 301}
    - matches: [{path: {value: /openai/}}]
      filters:
        - type: URLRewrite
          urlRewrite:
            hostname: llm.internal
            path: {type: ReplacePrefixMatch, replacePrefixMatch: /v1}
      backendRefs: [{name: v1, port: 8000}]
    - matches: [{path: {type: Exact, value: /full}}]
      filters:
        - type: URLRewrite
          urlRewrite: {path: {type: ReplaceFullPath, replaceFullPath: /replaced}}
      backendRefs: [{name: v1, port: 8000}]
    - matches: [{path: {value: /mirror}}]
      filters:
        - type: RequestMirror
          requestMirror: {backendRef: {name: v2, port: 8000}, percent: 50}
        - type: RequestMirror
          requestMirror:
            backendRef: {name: v3, port: 8000}
            fraction: {numerator: 1, denominator: 3}
      backendRefs: [{name: v1, port: 8000}]
    - matches: [{path: {value: /fault}}]
      filters:
        - {type: ExtensionRef, extensionRef: {group: weft.dev, kind: FaultInjection, name: chaos}}
      backendRefs: [{name: v1, port: 8000}]
    - matches: [{path: {value: /slow}}]
      timeouts: {request: 10s, backendRequest: 2s}
      retry: {attempts: 3, codes: [500, 503], backoff: 100ms}
      backendRefs: [{name: hh, port: 8000}]
    - matches: [{path: {value: /retry}}]
      filters:
        - {type: ExtensionRef, extensionRef: {group: weft.dev, kind: RetryPolicy, name: rp}}
      backendRefs: [{name: cc, port: 8000}]
    - matches: [{path: {value: /q}}]
      backendRefs: [{name: qq, port: 8000}]
    - matches: [{path: {value: /s}}]
      backendRefs: [{name: ss, port: 8000}]
    - matches: [{path: {value: /missing}}]
      backendRefs: [{name: nothere, port: 8000}, {name: v1, port: 9999}]
""")
    + "\n---\n"
    + http_route(
        """\
    - matches: [{path: {value: /v1}}]
      backendRefs: [{name: v2, namespace: ai, port: 8000}]""",
        name="consumer",
        namespace="other",
        parent_namespace="ai",
    )
    + """
---
apiVersion: weft.dev/v1alpha1
kind: FaultInjection
metadata: {name: chaos, namespace: ai}
spec: {delay: {fixedDelay: 1500ms, percentage: 40}, abort: {httpStatus: 418, percentage: 30}}
---
apiVersion: weft.dev/v1alpha1
kind: RetryPolicy
metadata: {name: rp, namespace: ai}
spec:
  attempts: 4
  retryOn: [5xx, reset]
  perTryTimeout: 1s
  backoff: {baseInterval: 10ms, maxInterval: 50ms}
"""
)


def policy(name: str, lb: str, extra: str = "") -> str:
    return backend_policy(name, f"loadBalancer: {lb}\n{extra}")


OUTLIER = """\
  outlierDetection: {consecutive5xxErrors: 2, consecutiveGatewayErrors: 1, interval: 1s,
                     baseEjectionTime: 2s, maxEjectionPercent: 50}
  retryBudget: {budgetPercent: 50, minRetryConcurrency: 1}
  connectionPool: {maxConnections: 2, maxPendingRequests: 1}"""

SNAPSHOT = snapshot(
    service("llm", pods=1),
    service("v1", pods=2, subnet=2),
    service("v2", pods=3, subnet=3, weights=[0, 1, 5]),
    service("v3", pods=1, subnet=4),
    service("hh", pods=4, subnet=5),
    service("cc", pods=4, subnet=6),
    service("qq", pods=4, subnet=7),
    service("ss", pods=4, subnet=8),
    ROUTES,
    policy(
        "hh", "{type: RingHash, minimumRingSize: 64, consistentHash: {header: X-Session}}", OUTLIER
    ),
    policy("cc", "{type: Maglev, tableSize: 251, consistentHash: {cookie: {name: aff, ttl: 1h}}}"),
    policy("qq", "{type: RingHash, consistentHash: {queryParameter: user}}", OUTLIER),
    policy("ss", "{type: Maglev, tableSize: 97, consistentHash: {sourceIdentity: true}}"),
    policy("v1", "{type: PeakEWMA}", OUTLIER),
    policy("v2", "{type: Weighted}"),
    policy("v3", "{type: RoundRobin}"),
)

SEGMENTS = [
    "v1",
    "chat",
    "completions",
    "api",
    "abc",
    "123",
    "é",
    "%C3%A9",
    "old",
    "moved",
    "openai",
    "full",
    "mirror",
    "fault",
    "slow",
    "retry",
    "q",
    "s",
    "missing",
    "",
    "x",
    "\xff",
    "日",
]
QUERY = [
    "q=a+b",
    "q=a%20b",
    "k=12",
    "k=1",
    "k=١٢",
    "q=%zz",
    "user=ann",
    "user=bob",
    "user=",
    "user",
    "=x",
    "&",
    "q=a b",
    "%75ser=ann",
]
HEADERS = [
    (b"x-tier", b"gold"),
    (b"x-tier", b"silver"),
    (b"x-user", b"u12"),
    (b"x-user", b"u\xd9\xa1"),
    (b"cookie", b"aff=abc"),
    (b"cookie", b"x=1; aff=zz"),
    (b"cookie", b"aff"),
    (b"x-session", b"s1"),
    (b"x-session", b"s2"),
    (b"x-remove", b"1"),
    (b"x-set", b"0"),
    (b"server", b"nginx"),
    (b"x-session", b"\xff\xfe"),
    (b"x-add", b"0"),
]
SOURCES = [
    None,
    "",
    "spiffe://cluster.local/ns/other/sa/a",
    "spiffe://cluster.local/ns/ai/sa/b",
    "spiffe://x/ns",
    "garbage",
]
AUTHORITIES = ["", "llm.ai:8000", "llm.ai", "[::1]", "[::1]:80", "h:80", "h:443", "é:1"]

request = st.tuples(
    st.sampled_from(["GET", "POST", "PUT", "get", "PATCH"]),
    st.lists(st.sampled_from(SEGMENTS), max_size=4).map(lambda s: "/" + "/".join(s)),
    st.lists(st.sampled_from(QUERY), max_size=3).map("&".join),
    st.lists(st.sampled_from(HEADERS), max_size=4),
    st.sampled_from(SOURCES),
    st.sampled_from(AUTHORITIES),
    st.sampled_from(["http", "https"]),
    st.lists(st.sampled_from([200, 204, 404, 500, 502, 503, 504, -1, -2, -3, -4]), max_size=3),
    st.floats(0, 5),
)


def describe(x: Any) -> Any:
    """An engine answer as plain values (the two worlds' classes differ)."""
    name = type(x).__name__
    if name == "Respond":
        return (
            "Respond",
            x.status,
            x.code,
            x.reason,
            x.headers,
            x.body,
            x.delay,
            x.param,
            x.final_headers,
        )
    if name == "Forward":
        return (
            "Forward",
            x.rule.label,
            x.backend.key,
            x.target,
            x.authority,
            x.hash_key,
            x.set_cookie,
            tuple(m.key for m in x.mirrors),
            x.delay,
            x.deadline,
            x.per_try_timeout,
            repr(x),
        )
    if name == "Attempt":
        return ("Attempt", x.endpoint.address, x.retry, x.started)
    return x


def trace(engine_mod: Any, headers_mod: Any, requests: list[Any]) -> list[Any]:
    clock = FakeClock()
    e = engine_mod.Engine(SNAPSHOT, clock=clock, rng=random.Random(5))
    out: list[Any] = []
    for method, path, query, fields, source, authority, scheme, outcomes, dt in requests:
        clock.advance(dt)
        target = path + ("?" + query if query else "")
        h = headers_mod.Headers(list(fields))
        svc = ("ai", "llm")
        try:
            d = e.route(
                svc, 8000, method, target, h, source=source, authority=authority, scheme=scheme
            )
        except Exception as exc:
            out.append(("route raised", type(exc).__name__, str(exc)))
            continue
        out.append(describe(d))
        if type(d).__name__ != "Forward":
            continue
        req = h.copy()
        resp = headers_mod.Headers([(b"server", b"x"), (b"x-served-by", b"a")])
        d.rewrite_request(req)
        d.rewrite_response(resp)
        out.append((req.fields, resp.fields))
        last = None
        for o in [*outcomes, 200]:
            att = d.attempt()
            out.append(describe(att))
            if type(att).__name__ != "Attempt":
                break
            out.append(att.admit(False).value)
            att.observe(o)
            wait = d.retry_after(o, att)
            out.append(wait)
            att.release()
            if wait is None:
                out.append(describe(d.failure_response(o)) if o < 0 else o)
                break
            last = att
        del last
    e.tick()
    out.append(
        [(b.name, b.active, b.available_count, b.panic, vars_of(b.counters)) for b in e.backends()]
    )
    out.append([str(ev) for ev in e.take_events()])
    out.append(vars_of(e.counters))
    out.append(e.next_timer())
    return out


def vars_of(counters: Any) -> Any:
    return counters.as_dict() if hasattr(counters, "as_dict") else repr(counters)


@FUZZ
@given(st.lists(request, min_size=1, max_size=12))
def test_the_compiled_engine_routes_and_tries_as_its_source_does(requests: list[Any]) -> None:
    assert trace(c_engine, c_headers, requests) == trace(s_engine, s_headers, requests)


# ---- header lists ------------------------------------------------------------------------

names = st.sampled_from(
    [
        b"a",
        b"A",
        b"b",
        b"connection",
        b"te",
        b"upgrade",
        b"keep-alive",
        b"x-y",
        b"X-Y",
        b"transfer-encoding",
        b"cookie",
        b"\xc4",
        b"\xe4",
    ]
)
values = st.one_of(
    st.sampled_from([b"", b"1", b"trailers", b" Trailers ", b"close, x-y", b"a, A ,b", b"\xff"]),
    st.binary(max_size=8),
)
fields = st.lists(st.tuples(names, values), max_size=8)
ops = st.lists(
    st.one_of(
        st.tuples(st.just("get"), names),
        st.tuples(st.just("get_all"), names),
        st.tuples(st.just("add"), names, values),
        st.tuples(st.just("set"), names, values),
        st.tuples(st.just("update"), st.lists(st.tuples(names, values), max_size=3)),
        st.tuples(st.just("remove"), names),
        st.tuples(
            st.just("strip"),
        ),
        st.tuples(st.just("contains"), st.one_of(names, st.just("a"), st.just(None))),
        st.tuples(
            st.just("tokens"),
        ),
        st.tuples(
            st.just("copy"),
        ),
    ),
    max_size=10,
)


def run_headers(mod: Any, start: list[Any], script: list[Any]) -> list[Any]:
    h = mod.Headers(list(start))
    out: list[Any] = []
    methods = {"strip": "strip_hop_by_hop", "contains": "__contains__"}
    for op, *args in script:
        if op == "tokens":
            r = outcome(mod.connection_tokens, h)
        elif op == "copy":
            h = h.copy()
            r = None
        else:
            r = outcome(getattr(h, methods.get(op, op)), *args)
        out.append((op, r, list(h.fields), len(h)))
    out.append(repr(h))
    return out


@FUZZ
@given(fields, ops)
def test_compiled_headers_operate_as_their_source(start: list[Any], script: list[Any]) -> None:
    assert run_headers(c_headers, start, script) == run_headers(s_headers, start, script)


@FUZZ
@given(
    st.lists(
        st.tuples(
            st.one_of(st.text(max_size=4), st.binary(max_size=4)),
            st.one_of(st.text(max_size=4), st.binary(max_size=4)),
        ),
        max_size=4,
    )
)
def test_headers_of_is_its_source(pairs: list[Any]) -> None:
    a, b = outcome(c_headers.Headers.of, *pairs), outcome(s_headers.Headers.of, *pairs)
    a = (a[0], a[1].fields) if a[0] == "ok" else a
    b = (b[0], b[1].fields) if b[0] == "ok" else b
    assert a == b
