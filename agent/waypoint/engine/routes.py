"""Route tables: the HTTPRoutes attached to one Service port, compiled for matching.

Compilation resolves everything that does not depend on the request (backends, filters,
ExtensionRefs, retry and fault policies) and flattens every rule's matches into one list in
Gateway API precedence order, so matching a request is a scan that stops at the first hit.

Precedence (Gateway API, HTTPRouteRule.matches), first difference wins:

1. an Exact path match; then a RegularExpression one (longer pattern first; the spec leaves
   regex placement to implementations, and putting it above prefixes keeps a catch-all
   `PathPrefix /` from shadowing every regex); then PathPrefix, longer prefix first;
2. a method match;
3. more header matches;
4. more query parameter matches;
5. the route first by "namespace/name" (the spec puts the oldest route first; weft's model
   does not carry creationTimestamp, so the alphabetical tie-break is the one that applies);
6. the rule's position in its route, then the match's position in its rule.

Hostnames are not matched: GAMMA routes attach to a Service, which already names the host.
Paths are matched as received (the shell normalises, if at all, before both routing and
authorization see the path).
"""

from __future__ import annotations

import random
import re
from bisect import bisect_right
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from urllib.parse import unquote

from agent.waypoint.codec.headers import Headers
from agent.waypoint.engine.backend import Backend, BackendKey
from agent.waypoint.engine.fault import Fault
from agent.waypoint.engine.respond import Respond, plain
from agent.waypoint.engine.retry import DEFAULT_RETRY, RetryRule, compile_retry
from controller.model.base import Resource, ResourceKey
from controller.model.routing import (
    BackendRef,
    HeaderModifier,
    HTTPRoute,
    PathModifier,
    RequestRedirect,
    RouteFilter,
    RouteMatch,
    RouteRule,
    match_rank,
)
from controller.model.traffic import FaultInjection, RetryPolicy

EXACT, REGEX, PREFIX = 2, 1, 0

# Gateway API's names for why a reference does not resolve (ResolvedRefs reasons), used as
# `Respond.code` so logs and metrics say which rule of the spec applied.
BACKEND_NOT_FOUND = "BackendNotFound"
FILTER_NOT_FOUND = "FilterNotFound"  # an ExtensionRef that names nothing
INCOMPATIBLE_FILTERS = "IncompatibleFilters"
NO_MATCHING_ROUTE = "NoMatchingRoute"
NO_WEIGHTED_BACKEND = "NoWeightedBackend"

NO_ROUTE = plain(404, NO_MATCHING_ROUTE, "no HTTPRoute rule attached to this Service matches")


# ---- header modifiers --------------------------------------------------------------

HeaderOps = tuple[tuple[int, bytes, bytes], ...]
_SET, _ADD, _REMOVE = 0, 1, 2


def compile_modifier(m: HeaderModifier | None) -> HeaderOps:
    """Gateway API order within one filter: set, then add, then remove."""
    if m is None:
        return ()
    ops: list[tuple[int, bytes, bytes]] = []
    ops += [(_SET, h.name.lower().encode(), h.value.encode()) for h in m.set or []]
    ops += [(_ADD, h.name.lower().encode(), h.value.encode()) for h in m.add or []]
    ops += [(_REMOVE, n.lower().encode(), b"") for n in m.remove or []]
    return tuple(ops)


def apply_ops(ops: HeaderOps, headers: Headers) -> None:
    for op, name, value in ops:
        if op == _SET:
            headers.set(name, value)
        elif op == _ADD:
            headers.add(name, value)
        else:
            headers.remove(name)


# ---- compiled forms ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RuleBackend:
    """One weighted backendRef of a rule, resolved."""

    backend: Backend
    request_ops: HeaderOps = ()
    response_ops: HeaderOps = ()


@dataclass(slots=True, eq=False)
class CompiledRule:
    route: str  # "namespace/name" of the HTTPRoute ("" for the default route)
    index: int  # position in spec.rules
    name: str | None  # the rule's name, if it has one
    targets: tuple[RuleBackend | Respond, ...] = ()  # Respond: the ref is invalid (500)
    cumulative: tuple[int, ...] = ()
    total: int = 0
    error: Respond | None = None  # the whole rule answers this (filter errors)
    redirect: RequestRedirect | None = None
    rewrite_host: str | None = None
    rewrite_path: PathModifier | None = None
    request_ops: HeaderOps = ()
    response_ops: HeaderOps = ()
    mirrors: tuple[tuple[Backend, float], ...] = ()
    request_timeout: float | None = None
    retry: RetryRule = DEFAULT_RETRY
    fault: Fault | None = None
    # weft.dev ExtensionRef resources the engine does not interpret itself (AI policy kinds);
    # the layers that do read them from here.
    extensions: tuple[Resource, ...] = ()

    def choose(self, rng: random.Random) -> RuleBackend | Respond:
        """A backend in proportion to the weights; weight 0 is never chosen."""
        targets = self.targets
        if len(targets) == 1:
            return targets[0]
        x = int(rng.random() * self.total)
        return targets[bisect_right(self.cumulative, x)]

    @property
    def label(self) -> str:
        """For logs and metrics: route/rule-name or route/rules[i]."""
        if not self.route:
            return "default"
        return f"{self.route}/{self.name}" if self.name else f"{self.route}/rules[{self.index}]"


HeaderTest = tuple[bytes, bytes | None, re.Pattern[bytes] | None]
QueryTest = tuple[str, str | None, re.Pattern[str] | None]


@dataclass(slots=True, eq=False)
class CompiledMatch:
    rule: CompiledRule
    path_kind: int
    path: str  # Exact: the path; PathPrefix: the prefix without a trailing '/'; regex: pattern
    path_re: re.Pattern[str] | None
    method: str | None
    headers: tuple[HeaderTest, ...]
    query: tuple[QueryTest, ...]
    precedence: tuple[int | str, ...] = field(default=())
    prefix_value: str = ""  # PathPrefix as written, for ReplacePrefixMatch
    path_only: bool = False  # no method, header or query conditions

    def __post_init__(self) -> None:
        self.path_only = self.method is None and not self.headers and not self.query

    def matches(self, method: str, path: str, query: str, headers: Headers) -> bool:
        """Whether a request matches (the table inlines this; kept for inspection)."""
        return RouteTable([self]).match(method, path, query, headers) is self


def _headers_match(tests: tuple[HeaderTest, ...], headers: Headers) -> bool:
    for name, exact, pattern in tests:
        # Gateway API: a header repeated in the request is matched on its first value.
        for n, v in headers.fields:
            if n == name:
                if exact is not None:
                    if v != exact:
                        return False
                elif pattern is not None and pattern.fullmatch(v) is None:
                    return False
                break
        else:
            return False
    return True


def _query_match(tests: tuple[QueryTest, ...], params: dict[str, str]) -> bool:
    for name, exact, pattern in tests:
        value = params.get(name)
        if value is None:
            return False
        if exact is not None:
            if value != exact:
                return False
        elif pattern is not None and pattern.fullmatch(value) is None:
            return False
    return True


def _parse_query(query: str) -> dict[str, str]:
    out: dict[str, str] = {}
    if not query:
        return out
    for part in query.split("&"):
        k, _, v = part.partition("=")
        k = unquote(k)
        if k not in out:  # the first value counts, as for headers
            out[k] = unquote(v.replace("+", " "))
    return out


def precedence(m: RouteMatch, route_order: int, rule: int, match: int) -> tuple[int, ...]:
    """Sort key (ascending = higher precedence) of one match; see the module docstring."""
    return (*match_rank(m), route_order, rule, match)


def compile_match(m: RouteMatch, rule: CompiledRule, key: tuple[int, ...]) -> CompiledMatch:
    path = m.path
    path_re = None
    prefix_value = ""
    if path is None:
        kind, p = PREFIX, ""
        prefix_value = "/"
    elif path.type == "Exact":
        kind, p = EXACT, path.value
    elif path.type == "RegularExpression":
        kind, p = REGEX, path.value
        path_re = re.compile(path.value)
    else:
        kind, p = PREFIX, path.value.rstrip("/")
        prefix_value = path.value
    headers: list[HeaderTest] = []
    seen: set[bytes] = set()
    for h in m.headers or []:
        name = h.name.lower().encode()
        if name in seen:
            continue  # Gateway API: only the first match of a header name counts
        seen.add(name)
        if h.type == "Exact":
            headers.append((name, h.value.encode(), None))
        else:
            headers.append((name, None, re.compile(h.value.encode())))
    query: list[QueryTest] = []
    for q in m.query_params or []:
        if q.type == "Exact":
            query.append((q.name, q.value, None))
        else:
            query.append((q.name, None, re.compile(q.value)))
    return CompiledMatch(
        rule, kind, p, path_re, m.method, tuple(headers), tuple(query), key, prefix_value
    )


# ---- the table -------------------------------------------------------------------------


class RouteTable:
    """The compiled routes of one Service port (for one caller namespace)."""

    __slots__ = ("matches", "rules")

    def __init__(self, matches: Sequence[CompiledMatch]) -> None:
        self.matches = tuple(sorted(matches, key=lambda m: m.precedence))
        self.rules = tuple(dict.fromkeys(m.rule for m in self.matches))

    def match(self, method: str, path: str, query: str, headers: Headers) -> CompiledMatch | None:
        """The highest-precedence match for a request, or None (404). The path test is
        inlined: it is what rejects most entries, and a call per entry would cost more."""
        params: dict[str, str] | None = None
        for m in self.matches:
            kind = m.path_kind
            p = m.path
            if kind == PREFIX:
                if p and not (path.startswith(p) and (len(path) == len(p) or path[len(p)] == "/")):
                    continue
            elif kind == EXACT:
                if path != p:
                    continue
            elif m.path_re is not None and m.path_re.fullmatch(path) is None:
                continue
            if m.path_only:
                return m
            if m.method is not None and method != m.method:
                continue
            if m.headers and not _headers_match(m.headers, headers):
                continue
            if m.query:
                if params is None:
                    params = _parse_query(query)
                if not _query_match(m.query, params):
                    continue
            return m
        return None


BackendLookup = Callable[[BackendKey], Backend | None]


@dataclass(frozen=True, slots=True)
class Context:
    """What compiling needs from the engine: resolving Services and resources."""

    backend: BackendLookup
    resources: Mapping[ResourceKey, Resource]
    service_ports: Callable[[str, str], Mapping[int, str | None]]  # port -> name, of a Service


def parent_applies(route: HTTPRoute, ns: str, name: str, port: int, port_name: str | None) -> bool:
    for p in route.spec.parent_refs:
        if not p.is_service or p.name != name or (p.namespace or route.namespace) != ns:
            continue
        if p.port is not None and p.port != port:
            continue
        if p.section_name is not None and p.section_name != port_name:
            continue
        return True
    return False


def compile_table(ctx: Context, service: BackendKey, routes: Sequence[HTTPRoute]) -> RouteTable:
    """The table for Service `service` (namespace, name, port) from its attached routes;
    with none, one catch-all rule to the Service itself."""
    ns = service[0]
    if not routes:
        default = CompiledRule("", 0, None)
        _resolve_backends(ctx, default, [], service, ns)
        catch_all = RouteMatch()
        return RouteTable([compile_match(catch_all, default, precedence(catch_all, 0, 0, 0))])
    ordered = sorted(routes, key=lambda r: (r.namespace, r.name))
    matches: list[CompiledMatch] = []
    for order, route in enumerate(ordered):
        for i, spec_rule in enumerate(route.spec.rules):
            compiled = compile_rule(ctx, route, i, spec_rule, service)
            for j, m in enumerate(spec_rule.effective_matches()):
                matches.append(compile_match(m, compiled, precedence(m, order, i, j)))
    return RouteTable(matches)


def compile_rule(
    ctx: Context, route: HTTPRoute, index: int, rule: RouteRule, parent: BackendKey
) -> CompiledRule:
    out = CompiledRule(f"{route.namespace}/{route.name}", index, rule.name)
    retry_policy = None
    for f in rule.filters or []:
        problem = _apply_filter(ctx, out, route, f)
        if problem is not None:
            out.error = problem
            return out
        if f.extension_ref is not None and f.extension_ref.kind == RetryPolicy.KIND:
            res = ctx.resources.get(
                ResourceKey("RetryPolicy", route.namespace, f.extension_ref.name)
            )
            if isinstance(res, RetryPolicy):
                retry_policy = res.spec
    t = rule.timeouts
    out.request_timeout = (t.request or None) if t else None  # 0 disables (GEP-1742)
    out.retry = compile_retry(rule.retry, retry_policy, t.backend_request if t else None)
    if out.rewrite_path is not None and out.rewrite_path.type == "ReplacePrefixMatch":
        for m in rule.effective_matches():
            if m.path is not None and m.path.type != "PathPrefix":
                out.error = plain(
                    500,
                    INCOMPATIBLE_FILTERS,
                    f"{out.label}: URLRewrite ReplacePrefixMatch needs PathPrefix matches",
                )
                return out
    if out.redirect is None:
        _resolve_backends(ctx, out, rule.backend_refs or [], parent, route.namespace)
    return out


def _apply_filter(
    ctx: Context, out: CompiledRule, route: HTTPRoute, f: RouteFilter
) -> Respond | None:
    if f.request_header_modifier is not None:
        out.request_ops += compile_modifier(f.request_header_modifier)
    elif f.response_header_modifier is not None:
        out.response_ops += compile_modifier(f.response_header_modifier)
    elif f.request_redirect is not None:
        out.redirect = f.request_redirect
    elif f.url_rewrite is not None:
        out.rewrite_host = f.url_rewrite.hostname
        out.rewrite_path = f.url_rewrite.path
    elif f.request_mirror is not None:
        ref = f.request_mirror.backend_ref
        b = (
            ctx.backend((ref.namespace or route.namespace, ref.name, ref.port))
            if ref.port is not None
            else None
        )
        # A mirror that does not resolve is dropped: mirrors never change the client's answer.
        if b is not None:
            out.mirrors += ((b, f.request_mirror.ratio()),)
    elif f.extension_ref is not None:
        ext = f.extension_ref
        res = ctx.resources.get(ResourceKey(ext.kind, route.namespace, ext.name))
        if res is None:
            return plain(
                500,
                FILTER_NOT_FOUND,
                f"{out.label}: ExtensionRef {ext.group}/{ext.kind} {route.namespace}/{ext.name} "
                "does not exist",
            )
        if isinstance(res, FaultInjection):
            out.fault = Fault.of(res.spec)
        elif not isinstance(res, RetryPolicy):
            out.extensions += (res,)
    return None


def _resolve_backends(
    ctx: Context, out: CompiledRule, refs: Sequence[BackendRef], parent: BackendKey, route_ns: str
) -> None:
    targets: list[RuleBackend | Respond] = []
    weights: list[int] = []
    if not refs:
        # GAMMA: a rule without backendRefs sends traffic where it was going, the parent
        # Service (Istio does the same).
        b = ctx.backend(parent)
        if b is not None:
            targets.append(RuleBackend(b))
        else:
            why = (
                f"Service {parent[0]}/{parent[1]} has no port {parent[2]}"
                if ctx.service_ports(parent[0], parent[1])
                else f"Service {parent[0]}/{parent[1]} does not exist"
            )
            targets.append(plain(500, BACKEND_NOT_FOUND, why))
        weights.append(1)
    for ref in refs:
        if ref.weight == 0:
            continue
        ns = ref.namespace or route_ns
        b = ctx.backend((ns, ref.name, ref.port)) if ref.port is not None else None
        if b is None:
            why = (
                f"Service {ns}/{ref.name} does not exist"
                if not ctx.service_ports(ns, ref.name)
                else f"Service {ns}/{ref.name} has no port {ref.port}"
            )
            targets.append(plain(500, BACKEND_NOT_FOUND, f"{out.label}: backendRef {why}"))
        else:
            req: HeaderOps = ()
            resp: HeaderOps = ()
            for f in ref.filters or []:
                req += compile_modifier(f.request_header_modifier)
                resp += compile_modifier(f.response_header_modifier)
            targets.append(RuleBackend(b, req, resp))
        weights.append(ref.weight)
    if not targets:
        out.error = plain(500, NO_WEIGHTED_BACKEND, f"{out.label}: every backendRef has weight 0")
        return
    acc = 0
    cumulative = []
    for w in weights:
        acc += w
        cumulative.append(acc)
    out.targets = tuple(targets)
    out.cumulative = tuple(cumulative)
    out.total = acc


# ---- request rewriting -----------------------------------------------------------------


def rewrite_path(modifier: PathModifier, path: str, matched_prefix: str) -> str:
    """Gateway API HTTPPathModifier: ReplaceFullPath, or ReplacePrefixMatch, which replaces
    the matched prefix element-wise (`/foo` -> `/xyz` turns `/foo/bar` into `/xyz/bar`, and
    `/foo` -> `/` turns `/foo/bar` into `/bar`)."""
    if modifier.type == "ReplaceFullPath":
        return modifier.replace_full_path or "/"
    prefix = matched_prefix.rstrip("/")
    rest = path[len(prefix) :]
    out = (modifier.replace_prefix_match or "/").rstrip("/") + rest
    return out or "/"


def redirect_location(
    r: RequestRedirect, scheme: str, authority: str, path: str, query: str, matched_prefix: str
) -> str:
    host, port = authority, ""
    if ":" in authority and not authority.endswith("]"):  # "[::1]" is a host without port
        host, _, port = authority.rpartition(":")
    new_scheme = r.scheme or scheme
    new_host = r.hostname or host
    if r.port is not None:
        new_port = str(r.port)
    elif r.scheme is not None:
        new_port = ""  # a scheme change implies its well-known port
    else:
        new_port = port
    if new_port and (new_scheme, new_port) in (("http", "80"), ("https", "443")):
        new_port = ""
    new_path = rewrite_path(r.path, path, matched_prefix) if r.path is not None else path
    target = new_path + ("?" + query if query else "")
    return f"{new_scheme}://{new_host}{':' + new_port if new_port else ''}{target}"
