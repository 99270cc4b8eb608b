"""HTTPRoute (gateway.networking.k8s.io/v1) attached to a Service: the GAMMA mesh pattern.

weft implements the standard fields (matches, filters, weighted backendRefs, timeouts,
retry) and reaches its own behaviours (retry on resets, fault injection, model routing,
token limits) through `ExtensionRef` filters naming `weft.dev` resources — the extension
point Gateway API defines for exactly this.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from controller.model.base import Model, Resource, duration_validator, register

GATEWAY_API = ("gateway.networking.k8s.io/v1", "gateway.networking.k8s.io/v1beta1")
MAX_RULES = 16  # the Gateway API CRD's own limits
MAX_MATCHES = 64
MAX_BACKENDS = 16
HEADER_NAME = r"^[A-Za-z0-9!#$%&'*+\-.^_`|~]+$"


def _check_regex(v: str) -> str:
    try:
        re.compile(v)
    except re.error as e:
        raise ValueError(f"invalid regular expression {v!r}: {e}") from None
    return v


class ParentRef(Model):
    group: str = "gateway.networking.k8s.io"
    kind: str = "Gateway"
    namespace: str | None = None
    name: str
    section_name: str | None = Field(None, alias="sectionName")
    port: int | None = Field(None, ge=1, le=65535)

    @property
    def is_service(self) -> bool:
        return self.group in ("", "core") and self.kind == "Service"


class PathMatch(Model):
    type: Literal["Exact", "PathPrefix", "RegularExpression"] = "PathPrefix"
    value: str = "/"

    @model_validator(mode="after")
    def _value(self) -> PathMatch:
        if self.type == "RegularExpression":
            _check_regex(self.value)
        elif not self.value.startswith("/"):
            raise ValueError(f"path {self.value!r} must start with '/'")
        return self


class HeaderMatch(Model):
    type: Literal["Exact", "RegularExpression"] = "Exact"
    name: str = Field(pattern=HEADER_NAME, max_length=256)
    value: str = Field(max_length=4096)

    @model_validator(mode="after")
    def _re(self) -> HeaderMatch:
        if self.type == "RegularExpression":
            _check_regex(self.value)
        return self


class QueryMatch(HeaderMatch):
    name: str = Field(min_length=1, max_length=256)


class RouteMatch(Model):
    path: PathMatch | None = None
    headers: list[HeaderMatch] | None = Field(None, max_length=16)
    query_params: list[QueryMatch] | None = Field(None, alias="queryParams", max_length=16)
    method: (
        Literal["GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"]
        | None
    ) = None


def match_rank(m: RouteMatch) -> tuple[int, int, int, int, int]:
    """Gateway API's match precedence, ascending = first: Exact path, then
    RegularExpression, then PathPrefix (longer first), a method, more headers, more query
    parameters. The waypoint's route table sorts by it (agent/waypoint/engine/routes.py)."""
    path = m.path
    if path is None:
        kind, length = 0, 1
    else:
        kind = {"Exact": 2, "RegularExpression": 1, "PathPrefix": 0}[path.type]
        length = len(path.value)
    return (
        -kind,
        -length,
        -(m.method is not None),
        -len(m.headers or ()),
        -len(m.query_params or ()),
    )


def may_overlap(a: RouteMatch, b: RouteMatch) -> bool:
    """Whether some request could match both (conservative: True unless clearly not)."""
    if a.method and b.method and a.method != b.method:
        return False
    ha = {h.name.lower(): h.value for h in a.headers or () if h.type == "Exact"}
    for h in b.headers or ():
        if h.type == "Exact" and h.name.lower() in ha and ha[h.name.lower()] != h.value:
            return False
    pa, pb = a.path, b.path
    if pa is None or pb is None or "RegularExpression" in (pa.type, pb.type):
        return True

    def within(path: str, prefix: str) -> bool:
        p = prefix.rstrip("/")
        return path == p or path.startswith(p + "/") or not p

    if pa.type == "Exact" and pb.type == "Exact":
        return pa.value == pb.value
    if pa.type == "Exact":
        return within(pa.value, pb.value)
    if pb.type == "Exact":
        return within(pb.value, pa.value)
    return within(pa.value, pb.value) or within(pb.value, pa.value)


class HeaderValue(Model):
    name: str = Field(pattern=HEADER_NAME, max_length=256)
    value: str = Field(max_length=4096)


class HeaderModifier(Model):
    set: list[HeaderValue] | None = None
    add: list[HeaderValue] | None = None
    # Names like set's and add's: a field name is a token (RFC 9110 5.1), ASCII only.
    remove: list[Annotated[str, Field(pattern=HEADER_NAME, max_length=256)]] | None = None


class BackendObjectRef(Model):
    group: str = ""
    kind: str = "Service"
    name: str
    namespace: str | None = None
    port: int | None = Field(None, ge=1, le=65535)


class Fraction(Model):
    numerator: int = Field(ge=0)
    denominator: int = Field(100, ge=1)


class Mirror(Model):
    backend_ref: BackendObjectRef = Field(alias="backendRef")
    percent: int | None = Field(None, ge=0, le=100)
    fraction: Fraction | None = None

    def ratio(self) -> float:
        if self.fraction is not None:
            return min(1.0, self.fraction.numerator / self.fraction.denominator)
        return (self.percent if self.percent is not None else 100) / 100.0


class PathModifier(Model):
    type: Literal["ReplaceFullPath", "ReplacePrefixMatch"]
    replace_full_path: str | None = Field(None, alias="replaceFullPath")
    replace_prefix_match: str | None = Field(None, alias="replacePrefixMatch")


class UrlRewrite(Model):
    hostname: str | None = None
    path: PathModifier | None = None


class RequestRedirect(Model):
    scheme: Literal["http", "https"] | None = None
    hostname: str | None = None
    path: PathModifier | None = None
    port: int | None = None
    status_code: Literal[301, 302, 303, 307, 308] = Field(302, alias="statusCode")


class ExtensionRef(Model):
    group: str
    kind: str
    name: str


class RouteFilter(Model):
    type: Literal[
        "RequestHeaderModifier",
        "ResponseHeaderModifier",
        "RequestMirror",
        "RequestRedirect",
        "URLRewrite",
        "ExtensionRef",
    ]
    request_header_modifier: HeaderModifier | None = Field(None, alias="requestHeaderModifier")
    response_header_modifier: HeaderModifier | None = Field(None, alias="responseHeaderModifier")
    request_mirror: Mirror | None = Field(None, alias="requestMirror")
    request_redirect: RequestRedirect | None = Field(None, alias="requestRedirect")
    url_rewrite: UrlRewrite | None = Field(None, alias="urlRewrite")
    extension_ref: ExtensionRef | None = Field(None, alias="extensionRef")

    @model_validator(mode="after")
    def _one(self) -> RouteFilter:
        field = {
            "RequestHeaderModifier": "request_header_modifier",
            "ResponseHeaderModifier": "response_header_modifier",
            "RequestMirror": "request_mirror",
            "RequestRedirect": "request_redirect",
            "URLRewrite": "url_rewrite",
            "ExtensionRef": "extension_ref",
        }[self.type]
        if getattr(self, field) is None:
            raise ValueError(
                f"filter type {self.type} needs its {self.model_fields[field].alias} field"
            )
        if self.extension_ref is not None and self.extension_ref.group != "weft.dev":
            raise ValueError(
                f"extensionRef group {self.extension_ref.group!r}: weft only "
                "understands weft.dev extensions"
            )
        return self


class BackendRef(BackendObjectRef):
    weight: int = Field(1, ge=0, le=1_000_000)
    filters: list[RouteFilter] | None = None


class Timeouts(Model):
    request: float | None = None
    backend_request: float | None = Field(None, alias="backendRequest")

    _d = duration_validator("request", "backend_request")

    @model_validator(mode="after")
    def _order(self) -> Timeouts:
        if self.request and self.backend_request and self.backend_request > self.request:
            raise ValueError("backendRequest must not be longer than request")
        return self


class Retry(Model):
    codes: list[int] | None = None
    attempts: int | None = Field(None, ge=0, le=10)
    backoff: float | None = None

    _d = duration_validator("backoff")

    @field_validator("codes")
    @classmethod
    def _codes(cls, v: list[int] | None) -> list[int] | None:
        for c in v or []:
            if not 400 <= c <= 599:
                raise ValueError(f"retry code {c} must be an HTTP error status (400-599)")
        return v


class RouteRule(Model):
    name: str | None = None
    matches: list[RouteMatch] | None = Field(None, max_length=MAX_MATCHES)
    filters: list[RouteFilter] | None = Field(None, max_length=16)
    backend_refs: list[BackendRef] | None = Field(
        None, alias="backendRefs", max_length=MAX_BACKENDS
    )
    timeouts: Timeouts | None = None
    retry: Retry | None = None

    def effective_matches(self) -> list[RouteMatch]:
        return self.matches or [RouteMatch(path=PathMatch())]


class HTTPRouteSpec(Model):
    parent_refs: list[ParentRef] = Field(alias="parentRefs", min_length=1, max_length=32)
    hostnames: list[str] | None = None
    rules: list[RouteRule] = Field(default_factory=lambda: [RouteRule()], max_length=MAX_RULES)


@register
class HTTPRoute(Resource):
    KIND: ClassVar[str] = "HTTPRoute"
    API_VERSIONS: ClassVar[tuple[str, ...]] = GATEWAY_API

    spec: HTTPRouteSpec
    status: dict[str, object] | None = None

    def semantic_check(self) -> list[tuple[tuple[str | int, ...], str]]:
        out = route_ref_problems(self.spec.parent_refs, self.spec.rules)
        for r, rule in enumerate(self.spec.rules):
            kinds = [f.type for f in rule.filters or []]
            for t in ("RequestRedirect", "URLRewrite"):
                if t in kinds and kinds.count(t) > 1:
                    out.append((("spec", "rules", r, "filters"), f"{t} may appear only once"))
            if "RequestRedirect" in kinds and rule.backend_refs:
                out.append(
                    (("spec", "rules", r), "a rule with RequestRedirect must not have backendRefs")
                )
        return out

    def parent_services(self) -> list[tuple[str, str, int | None]]:
        """(namespace, name, port) of every Service this route attaches to."""
        return parent_services(self.namespace, self.spec.parent_refs)


def parent_services(
    namespace: str, parent_refs: list[ParentRef]
) -> list[tuple[str, str, int | None]]:
    """(namespace, name, port) of every Service a route (HTTPRoute, GRPCRoute) attaches to."""
    return [(p.namespace or namespace, p.name, p.port) for p in parent_refs if p.is_service]


def route_ref_problems(
    parent_refs: list[ParentRef], rules: list[Any]
) -> list[tuple[tuple[str | int, ...], str]]:
    """What a mesh route (HTTPRoute, GRPCRoute) may reference: Services as parents (GAMMA)
    and as backends, with a port."""
    out: list[tuple[tuple[str | int, ...], str]] = []
    for i, p in enumerate(parent_refs):
        if not p.is_service:
            out.append(
                (
                    ("spec", "parentRefs", i),
                    f"parent {p.kind} {p.name}: weft "
                    'attaches routes to Services (group: "", kind: Service), the '
                    "GAMMA mesh pattern",
                )
            )
    for r, rule in enumerate(rules):
        for b, ref in enumerate(rule.backend_refs or []):
            if ref.kind != "Service" or ref.group not in ("", "core"):
                out.append(
                    (("spec", "rules", r, "backendRefs", b), "backendRefs must name Services")
                )
            if ref.port is None:
                out.append(
                    (
                        ("spec", "rules", r, "backendRefs", b, "port"),
                        "port is required for a Service backend",
                    )
                )
    return out
