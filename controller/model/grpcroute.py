"""Gateway API's GRPCRoute (gateway.networking.k8s.io/v1), attached to a Service (GAMMA).

A gRPC call is an HTTP/2 POST to `/<package.Service>/<Method>`, so a GRPCRoute is derived
into the HTTPRoute the waypoint already enforces (`to_httproute`): a method match becomes a
path match (service and method exact: the exact path; service only: the prefix
`/<service>/`; method only: a regular expression; RegularExpression types: a regular
expression over both), header matches, filters and weighted backendRefs carry over as they
are. Retries and faults come from ExtensionRef filters (RetryPolicy, FaultInjection) as for
HTTPRoute. Fields weft does not implement are errors naming them.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from controller.model.base import Model, Resource, register
from controller.model.routing import (
    GATEWAY_API,
    MAX_RULES,
    BackendRef,
    HeaderMatch,
    ParentRef,
    RouteFilter,
    parent_services,
    route_ref_problems,
)

SERVICE_RE = r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$"
METHOD_RE = r"^[A-Za-z_][A-Za-z0-9_]*$"


class GRPCMethodMatch(Model):
    type: Literal["Exact", "RegularExpression"] = "Exact"
    service: str | None = Field(None, max_length=1024)
    method: str | None = Field(None, max_length=1024)

    @model_validator(mode="after")
    def _shape(self) -> GRPCMethodMatch:
        if self.service is None and self.method is None:
            raise ValueError("set service, method or both")
        if self.type == "Exact":
            if self.service is not None and not re.match(SERVICE_RE, self.service):
                raise ValueError(f"service {self.service!r} is not a gRPC service name")
            if self.method is not None and not re.match(METHOD_RE, self.method):
                raise ValueError(f"method {self.method!r} is not a gRPC method name")
        else:
            for v in (self.service, self.method):
                if v is not None:
                    try:
                        re.compile(v)
                    except re.error as e:
                        raise ValueError(f"{v!r} is not a regular expression: {e}") from e
        return self

    def path(self) -> dict[str, str]:
        """The HTTPRoute path match for this method match."""
        if self.type == "Exact":
            if self.service is not None and self.method is not None:
                return {"type": "Exact", "value": f"/{self.service}/{self.method}"}
            if self.service is not None:
                return {"type": "PathPrefix", "value": f"/{self.service}"}
            return {"type": "RegularExpression", "value": f"/[^/]+/{re.escape(self.method or '')}"}
        svc = self.service if self.service is not None else "[^/]+"
        meth = self.method if self.method is not None else "[^/]+"
        return {"type": "RegularExpression", "value": f"/(?:{svc})/(?:{meth})"}


class GRPCRouteMatch(Model):
    method: GRPCMethodMatch | None = None
    headers: list[HeaderMatch] | None = Field(None, max_length=16)


class GRPCBackendRef(BackendRef):
    pass


class GRPCRouteRule(Model):
    name: str | None = None
    matches: list[GRPCRouteMatch] | None = Field(None, max_length=64)
    filters: list[RouteFilter] | None = Field(None, max_length=16)
    backend_refs: list[GRPCBackendRef] | None = Field(None, alias="backendRefs", max_length=16)
    session_persistence: Any = Field(None, alias="sessionPersistence")

    @model_validator(mode="after")
    def _supported(self) -> GRPCRouteRule:
        if self.session_persistence is not None:
            raise ValueError("sessionPersistence: not implemented by weft")
        for f in self.filters or []:
            if f.type in ("RequestRedirect", "URLRewrite"):
                raise ValueError(f"filter {f.type}: not part of GRPCRoute (gRPC paths are fixed)")
        return self


class GRPCRouteSpec(Model):
    parent_refs: list[ParentRef] = Field(alias="parentRefs", min_length=1, max_length=32)
    hostnames: list[str] | None = None
    rules: list[GRPCRouteRule] = Field(
        default_factory=lambda: [GRPCRouteRule()], max_length=MAX_RULES
    )


@register
class GRPCRoute(Resource):
    """Routes gRPC calls to a Service by service, method and headers (through its waypoint)."""

    KIND: ClassVar[str] = "GRPCRoute"
    API_VERSIONS: ClassVar[tuple[str, ...]] = GATEWAY_API

    spec: GRPCRouteSpec
    status: dict[str, object] | None = None

    def semantic_check(self) -> list[tuple[tuple[str | int, ...], str]]:
        return route_ref_problems(self.spec.parent_refs, self.spec.rules)

    def parent_services(self) -> list[tuple[str, str, int | None]]:
        """(namespace, name, port) of every Service this route attaches to."""
        return parent_services(self.namespace, self.spec.parent_refs)

    def to_httproute(self) -> dict[str, Any]:
        """The HTTPRoute document that enforces this route (same name and namespace)."""
        rules = []
        for rule in self.spec.rules:
            out: dict[str, Any] = {}
            if rule.name:
                out["name"] = rule.name
            matches = []
            for m in rule.matches or []:
                hm: dict[str, Any] = {"method": "POST"}  # every gRPC call is a POST
                if m.method is not None:
                    hm["path"] = m.method.path()
                if m.headers:
                    hm["headers"] = [h.model_dump(by_alias=True) for h in m.headers]
                matches.append(hm)
            if matches:
                out["matches"] = matches
            if rule.filters:
                out["filters"] = [
                    f.model_dump(by_alias=True, exclude_none=True) for f in rule.filters
                ]
            if rule.backend_refs:
                out["backendRefs"] = [
                    b.model_dump(by_alias=True, exclude_none=True) for b in rule.backend_refs
                ]
            rules.append(out)
        parents = [p.model_dump(by_alias=True, exclude_none=True) for p in self.spec.parent_refs]
        return {
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "HTTPRoute",
            "metadata": {
                "name": self.name,
                "namespace": self.namespace,
                "annotations": {"weft.dev/derived-from": f"GRPCRoute {self.namespace}/{self.name}"},
            },
            "spec": {
                "parentRefs": parents,
                **({"hostnames": self.spec.hostnames} if self.spec.hostnames else {}),
                "rules": rules,
            },
        }
