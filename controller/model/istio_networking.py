"""Istio's networking API as users write it: VirtualService and DestinationRule.

They are stored as written (so `weft policy get` shows what was applied) and *derived*
into the resources weft enforces, in one place (`derive`), wherever a config snapshot is
built: a VirtualService becomes an HTTPRoute attached to each of its hosts (Gateway API's
mesh binding), plus a RetryPolicy and a FaultInjection named from its rules by ExtensionRef
filters; a DestinationRule becomes a BackendPolicy per Service port it configures, and a
headless Service per subset (the host Service's selector plus the subset's labels), which is
what a VirtualService route to `host` + `subset` sends to. `weft policy convert` prints the
same derivation as YAML.

Every field of Istio's v1 API is either mapped or refused with an error naming it and
saying why: nothing is silently ignored. Hosts are Services: a short name (the resource's
namespace), `name.namespace`, or `name.namespace.svc[.cluster.local]`.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from controller.model.base import Model, Resource, register
from controller.model.problems import Problem
from controller.model.traffic import Duration

ISTIO_NET = (
    "networking.istio.io/v1",
    "networking.istio.io/v1beta1",
    "networking.istio.io/v1alpha3",
)
DERIVED_FROM = "weft.dev/derived-from"  # annotation on every derived resource
SUBSET_SEP = "--"  # a subset's Service: <host>--<subset>


def _refuse(obj: Model, fields: dict[str, str]) -> None:
    """Raise for the first Istio field that is set but not implemented, naming it."""
    for name, why in fields.items():
        if getattr(obj, name) not in (None, [], {}, False):
            alias = type(obj).model_fields[name].alias or name
            raise ValueError(f"{alias}: {why}")


class StringMatch(Model):
    exact: str | None = None
    prefix: str | None = None
    regex: str | None = None

    @model_validator(mode="after")
    def _one(self) -> StringMatch:
        if sum(v is not None for v in (self.exact, self.prefix, self.regex)) != 1:
            raise ValueError("set exactly one of exact, prefix, regex")
        return self

    def as_regex(self) -> str:
        """A regular expression the whole value must match (the engine matches whole
        values, as Gateway API's RegularExpression and Istio's regex do)."""
        if self.exact is not None:
            return re.escape(self.exact)
        if self.prefix is not None:
            return re.escape(self.prefix) + ".*"
        assert self.regex is not None
        return self.regex


class HTTPMatchRequest(Model):
    name: str | None = None
    uri: StringMatch | None = None
    method: StringMatch | None = None
    headers: dict[str, StringMatch] = Field(default_factory=dict)
    query_params: dict[str, StringMatch] = Field(default_factory=dict, alias="queryParams")
    port: int | None = Field(None, ge=1, le=65535)
    ignore_uri_case: bool = Field(False, alias="ignoreUriCase")
    scheme: Any = None
    authority: Any = None
    without_headers: Any = Field(None, alias="withoutHeaders")
    source_labels: Any = Field(None, alias="sourceLabels")
    source_namespace: Any = Field(None, alias="sourceNamespace")
    gateways: Any = None
    stat_prefix: Any = Field(None, alias="statPrefix")

    @model_validator(mode="after")
    def _supported(self) -> HTTPMatchRequest:
        if self.method is not None and self.method.exact is None:
            raise ValueError("method: weft matches a method exactly (use exact)")
        _refuse(
            self,
            {
                "ignore_uri_case": "not implemented by weft (paths match case-sensitively)",
                "port": "not implemented by weft: a VirtualService applies to every port of "
                "its hosts (write one HTTPRoute per port with parentRefs port)",
                "scheme": "not implemented by weft (mesh traffic is plain HTTP in the tunnel)",
                "authority": "not implemented by weft; match the host with the route's hosts",
                "without_headers": "not implemented by weft",
                "source_labels": "not implemented by weft; use an AuthorizationPolicy to "
                "tell callers apart",
                "source_namespace": "not implemented by weft; use an AuthorizationPolicy",
                "gateways": "weft has no gateways; a mesh route applies to every caller",
                "stat_prefix": "not implemented by weft",
            },
        )
        return self


class PortSelector(Model):
    number: int = Field(ge=1, le=65535)


class Destination(Model):
    host: str = Field(min_length=1)
    subset: str | None = None
    port: PortSelector | None = None


class HeaderOps(Model):
    set: dict[str, str] = Field(default_factory=dict)
    add: dict[str, str] = Field(default_factory=dict)
    remove: list[str] = Field(default_factory=list)


class Headers(Model):
    request: HeaderOps | None = None
    response: HeaderOps | None = None


class HTTPRouteDestination(Model):
    destination: Destination
    weight: int | None = Field(None, ge=0, le=100)
    headers: Headers | None = None


class HTTPRedirect(Model):
    uri: str | None = None
    authority: str | None = None
    port: int | None = Field(None, ge=1, le=65535)
    scheme: Literal["http", "https"] | None = None
    redirect_code: Literal[301, 302, 303, 307, 308] = Field(301, alias="redirectCode")
    derive_port: Any = Field(None, alias="derivePort")

    @model_validator(mode="after")
    def _supported(self) -> HTTPRedirect:
        _refuse(self, {"derive_port": "not implemented by weft; set port"})
        return self


class HTTPRewrite(Model):
    uri: str | None = None
    authority: str | None = None
    uri_regex_rewrite: Any = Field(None, alias="uriRegexRewrite")

    @model_validator(mode="after")
    def _supported(self) -> HTTPRewrite:
        _refuse(self, {"uri_regex_rewrite": "not implemented by weft; use uri"})
        return self


ISTIO_RETRY_ON = {
    "5xx": "5xx",
    "gateway-error": "gateway-error",
    "reset": "reset",
    "connect-failure": "connect-failure",
    "retriable-status-codes": "retriable-status-codes",
    "refused-stream": "refused-stream",
}


class HTTPRetry(Model):
    attempts: int = Field(2, ge=0, le=10)
    per_try_timeout: Duration | None = Field(None, alias="perTryTimeout", gt=0)
    retry_on: str | None = Field(None, alias="retryOn")
    retry_remote_localities: Any = Field(None, alias="retryRemoteLocalities")

    @model_validator(mode="after")
    def _supported(self) -> HTTPRetry:
        _refuse(self, {"retry_remote_localities": "not implemented by weft (no localities)"})
        for cond in self.conditions():
            if cond not in ISTIO_RETRY_ON and not cond.isdigit():
                raise ValueError(
                    f"retryOn {cond!r}: weft retries on {', '.join(ISTIO_RETRY_ON)} "
                    "and status codes"
                )
        return self

    def conditions(self) -> list[str]:
        return [c.strip() for c in (self.retry_on or "").split(",") if c.strip()]


class Percent(Model):
    value: float = Field(ge=0, le=100)


class Delay(Model):
    fixed_delay: Duration = Field(alias="fixedDelay", gt=0)
    percentage: Percent | None = None
    percent: int | None = Field(None, ge=0, le=100)  # deprecated in Istio, still read
    exponential_delay: Any = Field(None, alias="exponentialDelay")

    @model_validator(mode="after")
    def _supported(self) -> Delay:
        _refuse(self, {"exponential_delay": "not implemented by weft (nor by Istio)"})
        return self

    def share(self) -> float:
        return (
            self.percentage.value
            if self.percentage
            else (100.0 if self.percent is None else self.percent)
        )


class Abort(Model):
    http_status: int | None = Field(None, alias="httpStatus", ge=200, le=599)
    percentage: Percent | None = None
    grpc_status: Any = Field(None, alias="grpcStatus")
    http2_error: Any = Field(None, alias="http2Error")

    @model_validator(mode="after")
    def _supported(self) -> Abort:
        _refuse(
            self,
            {
                "grpc_status": "not implemented by weft; abort with httpStatus",
                "http2_error": "not implemented by weft; abort with httpStatus",
            },
        )
        if self.http_status is None:
            raise ValueError("httpStatus is required")
        return self


class Fault(Model):
    delay: Delay | None = None
    abort: Abort | None = None


class IstioHTTPRoute(Model):
    name: str | None = None
    match: list[HTTPMatchRequest] = Field(default_factory=list, max_length=64)
    route: list[HTTPRouteDestination] = Field(default_factory=list, max_length=64)
    redirect: HTTPRedirect | None = None
    rewrite: HTTPRewrite | None = None
    timeout: Duration | None = Field(None, gt=0)
    retries: HTTPRetry | None = None
    fault: Fault | None = None
    mirror: Destination | None = None
    mirror_percentage: Percent | None = Field(None, alias="mirrorPercentage")
    mirror_percent: int | None = Field(None, alias="mirrorPercent", ge=0, le=100)
    mirrors: list[dict[str, Any]] = Field(default_factory=list)
    headers: Headers | None = None
    cors_policy: Any = Field(None, alias="corsPolicy")
    delegate: Any = None
    direct_response: Any = Field(None, alias="directResponse")

    @model_validator(mode="after")
    def _supported(self) -> IstioHTTPRoute:
        _refuse(
            self,
            {
                "cors_policy": "not implemented by weft",
                "delegate": "not implemented by weft; write the routes in this VirtualService",
                "direct_response": "not implemented by weft; a FaultInjection abort answers "
                "with a status",
                "mirrors": "not implemented by weft; use mirror and mirrorPercentage",
            },
        )
        if (self.redirect is None) == (not self.route):
            raise ValueError("set route or redirect (exactly one)")
        return self


class L4Match(Model):
    port: int | None = Field(None, ge=1, le=65535)
    destination_subnets: Any = Field(None, alias="destinationSubnets")
    source_labels: Any = Field(None, alias="sourceLabels")
    source_namespace: Any = Field(None, alias="sourceNamespace")
    gateways: Any = None

    @model_validator(mode="after")
    def _supported(self) -> L4Match:
        _refuse(
            self,
            {
                "destination_subnets": "not implemented by weft",
                "source_labels": "not implemented by weft",
                "source_namespace": "not implemented by weft",
                "gateways": "weft has no gateways",
            },
        )
        return self


class RouteDestination(Model):
    destination: Destination
    weight: int | None = Field(None, ge=0, le=100)


class IstioTCPRoute(Model):
    match: list[L4Match] = Field(default_factory=list)
    route: list[RouteDestination] = Field(min_length=1)


class VirtualServiceSpec(Model):
    hosts: list[str] = Field(min_length=1, max_length=32)
    gateways: list[str] = Field(default_factory=list)
    http: list[IstioHTTPRoute] = Field(default_factory=list, max_length=256)
    tcp: list[IstioTCPRoute] = Field(default_factory=list)
    tls: Any = None
    export_to: list[str] = Field(default_factory=list, alias="exportTo")

    @model_validator(mode="after")
    def _supported(self) -> VirtualServiceSpec:
        _refuse(self, {"tls": "not implemented by weft (TLS routes by SNI)"})
        if any(g != "mesh" for g in self.gateways):
            raise ValueError(
                "gateways: weft has no ingress gateways; only mesh (or none) is accepted"
            )
        if any(e != "*" for e in self.export_to):
            raise ValueError(
                "exportTo: weft applies a VirtualService to every caller; only * is accepted"
            )
        for i, t in enumerate(self.tcp):
            for r in t.route:
                if r.destination.subset or (r.weight not in (None, 100)) or len(t.route) > 1:
                    raise ValueError(
                        f"tcp[{i}]: weft routes TCP to the Service itself (L4 in the node "
                        "tunnel); subsets and weighted TCP routes are not implemented"
                    )
        if not self.http and not self.tcp:
            raise ValueError("set http (or tcp) routes")
        return self


@register
class VirtualService(Resource):
    """Istio's VirtualService, derived into an HTTPRoute (and RetryPolicy, FaultInjection)."""

    KIND: ClassVar[str] = "VirtualService"
    API_VERSIONS: ClassVar[tuple[str, ...]] = ISTIO_NET

    spec: VirtualServiceSpec
    status: dict[str, object] | None = None


# ---- DestinationRule -----------------------------------------------------------------


class HttpCookie(Model):
    name: str
    ttl: Duration | None = None
    path: str | None = None
    attributes: Any = None

    @model_validator(mode="after")
    def _supported(self) -> HttpCookie:
        _refuse(self, {"attributes": "not implemented by weft"})
        return self


class RingHash(Model):
    minimum_ring_size: int = Field(1024, alias="minimumRingSize", ge=1)


class Maglev(Model):
    table_size: int = Field(65537, alias="tableSize", ge=2)


class IstioConsistentHash(Model):
    http_header_name: str | None = Field(None, alias="httpHeaderName")
    http_cookie: HttpCookie | None = Field(None, alias="httpCookie")
    use_source_ip: bool | None = Field(None, alias="useSourceIp")
    http_query_parameter_name: str | None = Field(None, alias="httpQueryParameterName")
    ring_hash: RingHash | None = Field(None, alias="ringHash")
    maglev: Maglev | None = None
    minimum_ring_size: int | None = Field(None, alias="minimumRingSize", ge=1)


SimpleLB = Literal["UNSPECIFIED", "ROUND_ROBIN", "LEAST_REQUEST", "LEAST_CONN", "RANDOM"]


class IstioLoadBalancer(Model):
    simple: (
        Literal["UNSPECIFIED", "ROUND_ROBIN", "LEAST_REQUEST", "LEAST_CONN", "RANDOM"] | None
    ) = None
    consistent_hash: IstioConsistentHash | None = Field(None, alias="consistentHash")
    locality_lb_setting: Any = Field(None, alias="localityLbSetting")
    warmup_duration_secs: Any = Field(None, alias="warmupDurationSecs")
    warmup: Any = None

    @model_validator(mode="after")
    def _supported(self) -> IstioLoadBalancer:
        _refuse(
            self,
            {
                "locality_lb_setting": "not implemented by weft (no localities)",
                "warmup_duration_secs": "not implemented by weft",
                "warmup": "not implemented by weft",
            },
        )
        if self.simple is not None and self.consistent_hash is not None:
            raise ValueError("set simple or consistentHash, not both")
        return self


class TcpSettings(Model):
    max_connections: int | None = Field(None, alias="maxConnections", ge=1)
    connect_timeout: Duration | None = Field(None, alias="connectTimeout", gt=0)
    tcp_keepalive: Any = Field(None, alias="tcpKeepalive")
    max_connection_duration: Any = Field(None, alias="maxConnectionDuration")
    idle_timeout: Any = Field(None, alias="idleTimeout")

    @model_validator(mode="after")
    def _supported(self) -> TcpSettings:
        _refuse(
            self,
            {
                "tcp_keepalive": "not implemented by weft",
                "max_connection_duration": "not implemented by weft",
                "idle_timeout": "not implemented by weft",
            },
        )
        return self


class HttpSettings(Model):
    http1_max_pending_requests: int | None = Field(None, alias="http1MaxPendingRequests", ge=0)
    max_requests_per_connection: int | None = Field(None, alias="maxRequestsPerConnection", ge=0)
    http2_max_requests: Any = Field(None, alias="http2MaxRequests")
    max_retries: Any = Field(None, alias="maxRetries")
    idle_timeout: Any = Field(None, alias="idleTimeout")
    h2_upgrade_policy: Any = Field(None, alias="h2UpgradePolicy")
    use_client_protocol: Any = Field(None, alias="useClientProtocol")
    max_concurrent_streams: Any = Field(None, alias="maxConcurrentStreams")

    @model_validator(mode="after")
    def _supported(self) -> HttpSettings:
        _refuse(
            self,
            {
                "http2_max_requests": "not implemented by weft; limit with "
                "tcp.maxConnections and http1MaxPendingRequests",
                "max_retries": "not implemented by weft; retries are bounded by a retry "
                "budget (BackendPolicy retryBudget)",
                "idle_timeout": "not implemented by weft",
                "h2_upgrade_policy": "not implemented by weft; the Service port's "
                "appProtocol chooses HTTP/2",
                "use_client_protocol": "not implemented by weft",
                "max_concurrent_streams": "not implemented by weft",
            },
        )
        return self


class IstioConnectionPool(Model):
    tcp: TcpSettings | None = None
    http: HttpSettings | None = None


class IstioOutlierDetection(Model):
    consecutive_5xx_errors: int | None = Field(None, alias="consecutive5xxErrors", ge=0)
    consecutive_gateway_errors: int | None = Field(None, alias="consecutiveGatewayErrors", ge=0)
    consecutive_errors: int | None = Field(None, alias="consecutiveErrors", ge=0)  # deprecated
    interval: Duration | None = Field(None, gt=0)
    base_ejection_time: Duration | None = Field(None, alias="baseEjectionTime", gt=0)
    max_ejection_percent: int | None = Field(None, alias="maxEjectionPercent", ge=0, le=100)
    min_health_percent: int | None = Field(None, alias="minHealthPercent", ge=0, le=100)
    split_external_local_origin_errors: Any = Field(None, alias="splitExternalLocalOriginErrors")
    consecutive_local_origin_failures: Any = Field(None, alias="consecutiveLocalOriginFailures")

    @model_validator(mode="after")
    def _supported(self) -> IstioOutlierDetection:
        _refuse(
            self,
            {
                "split_external_local_origin_errors": "not implemented by weft",
                "consecutive_local_origin_failures": "not implemented by weft",
            },
        )
        return self


class ClientTLS(Model):
    mode: Literal["DISABLE", "SIMPLE", "MUTUAL", "ISTIO_MUTUAL"] = "ISTIO_MUTUAL"

    @model_validator(mode="after")
    def _supported(self) -> ClientTLS:
        if self.mode != "ISTIO_MUTUAL":
            raise ValueError(
                f"mode {self.mode}: weft always uses mesh mTLS between workloads "
                "(ISTIO_MUTUAL); other modes are not implemented"
            )
        return self


class PortTrafficPolicy(Model):
    port: PortSelector
    load_balancer: IstioLoadBalancer | None = Field(None, alias="loadBalancer")
    connection_pool: IstioConnectionPool | None = Field(None, alias="connectionPool")
    outlier_detection: IstioOutlierDetection | None = Field(None, alias="outlierDetection")
    tls: ClientTLS | None = None


class TrafficPolicy(Model):
    load_balancer: IstioLoadBalancer | None = Field(None, alias="loadBalancer")
    connection_pool: IstioConnectionPool | None = Field(None, alias="connectionPool")
    outlier_detection: IstioOutlierDetection | None = Field(None, alias="outlierDetection")
    tls: ClientTLS | None = None
    port_level_settings: list[PortTrafficPolicy] = Field(
        default_factory=list, alias="portLevelSettings"
    )
    tunnel: Any = None
    proxy_protocol: Any = Field(None, alias="proxyProtocol")

    @model_validator(mode="after")
    def _supported(self) -> TrafficPolicy:
        _refuse(
            self,
            {
                "tunnel": "not implemented by weft",
                "proxy_protocol": "not implemented by weft",
            },
        )
        return self


class Subset(Model):
    # No "--": a subset's Service is <host>--<subset>, which must name one subset of one host.
    name: str = Field(pattern=r"^[a-z0-9]+(-[a-z0-9]+)*$", max_length=40)
    labels: dict[str, str] = Field(default_factory=dict)
    traffic_policy: TrafficPolicy | None = Field(None, alias="trafficPolicy")


class DestinationRuleSpec(Model):
    host: str = Field(min_length=1)
    traffic_policy: TrafficPolicy | None = Field(None, alias="trafficPolicy")
    subsets: list[Subset] = Field(default_factory=list, max_length=64)
    export_to: list[str] = Field(default_factory=list, alias="exportTo")
    workload_selector: Any = Field(None, alias="workloadSelector")

    @model_validator(mode="after")
    def _supported(self) -> DestinationRuleSpec:
        _refuse(self, {"workload_selector": "not implemented by weft"})
        if any(e != "*" for e in self.export_to):
            raise ValueError(
                "exportTo: weft applies a DestinationRule to every caller; only * is accepted"
            )
        names = [s.name for s in self.subsets]
        for n in names:
            if names.count(n) > 1:
                raise ValueError(f"subsets: {n!r} is defined twice")
        return self


@register
class DestinationRule(Resource):
    """Istio's DestinationRule, derived into BackendPolicies and a Service per subset."""

    KIND: ClassVar[str] = "DestinationRule"
    API_VERSIONS: ClassVar[tuple[str, ...]] = ISTIO_NET

    spec: DestinationRuleSpec
    status: dict[str, object] | None = None


# ---- derivation ----------------------------------------------------------------------


def host_service(host: str, namespace: str) -> tuple[str, str] | None:
    """(namespace, name) of the Service a host names; None for a host that is not one
    (an external name, a wildcard)."""
    if "*" in host:
        return None
    parts = host.split(".")
    if len(parts) == 1:
        return namespace, parts[0]
    if len(parts) == 2 or (len(parts) >= 3 and parts[2] == "svc"):
        return parts[1], parts[0]
    return None


def subset_service_name(host: str, subset: str) -> str:
    return f"{host}{SUBSET_SEP}{subset}"


class _Deriver:
    def __init__(self, resources: list[Resource]) -> None:
        self.services = {(r.namespace, r.name): r for r in resources if r.KIND == "Service"}
        # The DestinationRule of each host: only one in the host Service's own namespace
        # counts (weft has no consumer-side DestinationRules: a rule in another namespace
        # would set the Service's policy, and its subsets, for every caller).
        self.rules: dict[tuple[str, str], DestinationRule] = {}
        for r in sorted(
            (r for r in resources if isinstance(r, DestinationRule)), key=lambda r: r.key
        ):
            h = host_service(r.spec.host, r.namespace)
            if h is not None and h[0] == r.namespace:
                self.rules.setdefault(h, r)
        self.failed: set[str] = set()  # sources with a problem: nothing of them is derived
        self.docs: list[tuple[Resource, dict[str, Any]]] = []
        self.problems: list[Problem] = []

    def problem(self, src: Resource, msg: str, field: str) -> None:
        self.problems.append(Problem(msg, resource=str(src.key), field=field))
        self.failed.add(str(src.key))

    def emit(self, src: Resource, kind: str, api: str, name: str, ns: str, spec: Any) -> None:
        md: dict[str, Any] = {
            "name": name,
            "namespace": ns,
            "annotations": {DERIVED_FROM: f"{src.KIND} {src.namespace}/{src.name}"},
        }
        self.docs.append((src, {"apiVersion": api, "kind": kind, "metadata": md, "spec": spec}))

    def service(self, src: Resource, host: str, field: str) -> tuple[str, str] | None:
        h = host_service(host, src.namespace)
        if h is None:
            self.problem(src, f"host {host!r} is not a Service of the mesh", field)
            return None
        if h not in self.services:
            self.problem(src, f"host {host!r}: no Service {h[0]}/{h[1]}", field)
            return None
        return h

    def backend(self, src: Resource, d: Destination, field: str) -> dict[str, Any] | None:
        h = self.service(src, d.host, field + ".host")
        if h is None:
            return None
        ns, name = h
        if d.subset is not None:
            dr = self.rules.get(h)
            if dr is not None and str(dr.key) in self.failed:
                self.problem(
                    src,
                    f"subset {d.subset!r} of {ns}/{name}: DestinationRule "
                    f"{dr.namespace}/{dr.name} could not be applied (see its conditions)",
                    field + ".subset",
                )
                return None
            if dr is None or d.subset not in {s.name for s in dr.spec.subsets}:
                self.problem(
                    src,
                    f"subset {d.subset!r} of {ns}/{name}: no DestinationRule defines it",
                    field + ".subset",
                )
                return None
            name = subset_service_name(name, d.subset)
        ref: dict[str, Any] = {"name": name, "namespace": ns}
        port = d.port.number if d.port else self._only_port(h)
        if port is None:
            self.problem(src, f"{d.host} has several ports: set destination.port", field)
            return None
        ref["port"] = port
        return ref

    def _only_port(self, h: tuple[str, str]) -> int | None:
        ports = self.services[h].spec.ports  # type: ignore[attr-defined]
        return ports[0].port if len(ports) == 1 else None

    # VirtualService -------------------------------------------------------------------

    def virtual_service(self, vs: VirtualService) -> None:
        parents = []
        for i, host in enumerate(vs.spec.hosts):
            h = self.service(vs, host, f"spec.hosts[{i}]")
            if h is not None:
                parents.append({"group": "", "kind": "Service", "name": h[1], "namespace": h[0]})
        hosts = {host_service(x, vs.namespace) for x in vs.spec.hosts}
        for i, t in enumerate(vs.spec.tcp):
            for j, dest in enumerate(t.route):
                if host_service(dest.destination.host, vs.namespace) not in hosts:
                    self.problem(
                        vs,
                        f"tcp routes may only go to the hosts themselves (TCP goes to the "
                        f"Service in the node tunnel); {dest.destination.host!r} is not one",
                        f"spec.tcp[{i}].route[{j}].destination.host",
                    )
        if not parents or not vs.spec.http:
            return
        rules = []
        for i, r in enumerate(vs.spec.http):
            rule = self.http_rule(vs, r, f"spec.http[{i}]", i)
            if rule is not None:
                rules.append(rule)
        self.check_order(vs, rules)
        if len(rules) == len(vs.spec.http):
            self.emit(
                vs,
                "HTTPRoute",
                "gateway.networking.k8s.io/v1",
                vs.name,
                vs.namespace,
                {"parentRefs": parents, "rules": rules},
            )

    def check_order(self, vs: VirtualService, rules: list[dict[str, Any]]) -> None:
        """Istio takes a VirtualService's first matching rule; the waypoint orders matches
        by Gateway API's precedence. Where they would differ for some request (a later
        rule's match outranks an earlier one's it may overlap), the VirtualService is
        refused: reorder its rules, or make the matches disjoint."""
        from controller.model.routing import RouteMatch, match_rank, may_overlap

        def matches(rule: dict[str, Any]) -> list[RouteMatch]:
            return [RouteMatch.model_validate(m) for m in rule.get("matches") or [{}]]

        parsed = [matches(r) for r in rules]
        for i, earlier in enumerate(parsed):
            for j in range(i + 1, len(parsed)):
                for a in earlier:
                    for b in parsed[j]:
                        if match_rank(b) < match_rank(a) and may_overlap(a, b):
                            self.problem(
                                vs,
                                f"http[{j}] would be tried before http[{i}] for requests both "
                                "match (the waypoint orders matches by Gateway API precedence: "
                                "exact path, regex, longer prefix, method, more headers); put "
                                f"http[{j}] first, or make the matches disjoint",
                                f"spec.http[{j}]",
                            )
                            return

    def http_rule(
        self, vs: VirtualService, r: IstioHTTPRoute, field: str, index: int
    ) -> dict[str, Any] | None:
        rule: dict[str, Any] = {}
        if r.name:
            rule["name"] = re.sub(r"[^a-z0-9-]", "-", r.name.lower())[:63].strip("-") or None
        matches = [self.match(m) for m in r.match]
        if matches:
            rule["matches"] = matches
        filters: list[dict[str, Any]] = []
        if r.headers is not None:
            filters += _header_filters(r.headers)
        if r.rewrite is not None:
            rw: dict[str, Any] = {}
            if r.rewrite.authority:
                rw["hostname"] = r.rewrite.authority
            if r.rewrite.uri is not None:
                prefixes = [m.uri.prefix for m in r.match if m.uri and m.uri.prefix is not None]
                if prefixes and len(prefixes) == len(r.match):
                    rw["path"] = {"type": "ReplacePrefixMatch", "replacePrefixMatch": r.rewrite.uri}
                else:
                    rw["path"] = {"type": "ReplaceFullPath", "replaceFullPath": r.rewrite.uri}
            filters.append({"type": "URLRewrite", "urlRewrite": rw})
        if r.redirect is not None:
            rd: dict[str, Any] = {"statusCode": r.redirect.redirect_code}
            if r.redirect.scheme:
                rd["scheme"] = r.redirect.scheme
            if r.redirect.authority:
                rd["hostname"] = r.redirect.authority
            if r.redirect.port:
                rd["port"] = r.redirect.port
            if r.redirect.uri is not None:
                rd["path"] = {"type": "ReplaceFullPath", "replaceFullPath": r.redirect.uri}
            filters.append({"type": "RequestRedirect", "requestRedirect": rd})
        if r.mirror is not None:
            ref = self.backend(vs, r.mirror, field + ".mirror")
            if ref is None:
                return None
            m: dict[str, Any] = {"backendRef": ref}
            share = (
                r.mirror_percentage.value
                if r.mirror_percentage is not None
                else (100.0 if r.mirror_percent is None else float(r.mirror_percent))
            )
            m["fraction"] = {"numerator": round(share * 100), "denominator": 10000}
            filters.append({"type": "RequestMirror", "requestMirror": m})
        name = f"{vs.name}-{index}"
        if r.retries is not None:
            self.emit(vs, "RetryPolicy", "weft.dev/v1alpha1", name, vs.namespace, _retry(r.retries))
            filters.append(_ext("RetryPolicy", name))
        if r.fault is not None and (r.fault.delay or r.fault.abort):
            spec: dict[str, Any] = {}
            if r.fault.delay is not None:
                spec["delay"] = {
                    "fixedDelay": r.fault.delay.fixed_delay,
                    "percentage": r.fault.delay.share(),
                }
            if r.fault.abort is not None:
                spec["abort"] = {
                    "httpStatus": r.fault.abort.http_status,
                    "percentage": r.fault.abort.percentage.value
                    if r.fault.abort.percentage
                    else 100.0,
                }
            self.emit(vs, "FaultInjection", "weft.dev/v1alpha1", name, vs.namespace, spec)
            filters.append(_ext("FaultInjection", name))
        if filters:
            rule["filters"] = filters
        if r.timeout is not None:
            rule["timeouts"] = {"request": r.timeout}
        if r.route:
            refs = []
            weights = [d.weight for d in r.route]
            if len(r.route) > 1 and any(w is None for w in weights):
                self.problem(vs, "every destination of a split needs a weight", field + ".route")
                return None
            for j, d in enumerate(r.route):
                ref = self.backend(vs, d.destination, f"{field}.route[{j}].destination")
                if ref is None:
                    return None
                ref["weight"] = 100 if d.weight is None else d.weight
                if d.headers is not None:
                    ref["filters"] = _header_filters(d.headers)
                refs.append(ref)
            rule["backendRefs"] = refs
        return rule

    @staticmethod
    def match(m: HTTPMatchRequest) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if m.uri is not None:
            if m.uri.exact is not None:
                out["path"] = {"type": "Exact", "value": m.uri.exact}
            elif m.uri.prefix is not None:
                out["path"] = {"type": "PathPrefix", "value": m.uri.prefix}
            else:
                out["path"] = {"type": "RegularExpression", "value": m.uri.regex}
        if m.method is not None and m.method.exact is not None:
            out["method"] = m.method.exact
        if m.headers:
            out["headers"] = [_string_match(k, v) for k, v in m.headers.items()]
        if m.query_params:
            out["queryParams"] = [_string_match(k, v) for k, v in m.query_params.items()]
        return out

    # DestinationRule ------------------------------------------------------------------

    def destination_rule(self, dr: DestinationRule) -> None:
        h = self.service(dr, dr.spec.host, "spec.host")
        if h is None:
            return
        ns, name = h
        if ns != dr.namespace:
            self.problem(
                dr,
                f"host {dr.spec.host!r} is in namespace {ns}: a DestinationRule applies to "
                f"Services of its own namespace ({dr.namespace}); weft has no consumer-side "
                "DestinationRules",
                "spec.host",
            )
            return
        svc = self.services[h]
        if self.rules.get(h) is not dr:
            first = self.rules[h]
            self.problem(
                dr,
                f"{ns}/{name} already has DestinationRule {first.namespace}/{first.name}; "
                "the first by namespace/name applies",
                "spec.host",
            )
            return
        self.policies(dr, name, ns, name, dr.spec.traffic_policy, "spec.trafficPolicy")
        for i, s in enumerate(dr.spec.subsets):
            sub = subset_service_name(name, s.name)
            if (ns, sub) in self.services:
                self.problem(dr, f"a Service {ns}/{sub} exists already", f"spec.subsets[{i}]")
                continue
            selector = dict(svc.spec.selector or {})  # type: ignore[attr-defined]
            clash = {k for k, v in s.labels.items() if k in selector and selector[k] != v}
            if clash:
                self.problem(
                    dr,
                    f"subset {s.name!r}: labels {sorted(clash)} contradict the Service's "
                    "selector; a subset is a part of the Service's pods, never others",
                    f"spec.subsets[{i}].labels",
                )
                continue
            selector.update(s.labels)
            ports = [
                p.model_dump(by_alias=True, exclude_none=True)
                for p in svc.spec.ports  # type: ignore[attr-defined]
            ]
            self.emit(
                dr,
                "Service",
                "v1",
                sub,
                ns,
                {"selector": selector, "clusterIP": "None", "ports": ports},
            )
            # A subset's policy overrides the rule's, field by field as in Istio.
            merged = _merge(dr.spec.traffic_policy, s.traffic_policy)
            self.policies(dr, f"{name}{SUBSET_SEP}{s.name}", ns, sub, merged, f"spec.subsets[{i}]")

    def policies(
        self,
        dr: DestinationRule,
        name: str,
        ns: str,
        service: str,
        tp: TrafficPolicy | None,
        field: str,
    ) -> None:
        if tp is None:
            return
        body = _backend_policy(tp.load_balancer, tp.connection_pool, tp.outlier_detection)
        if body:
            self.emit(
                dr,
                "BackendPolicy",
                "weft.dev/v1alpha1",
                name,
                ns,
                {"targetRefs": [{"name": service}], **body},
            )
        for p in tp.port_level_settings:
            pbody = _backend_policy(
                p.load_balancer or tp.load_balancer,
                p.connection_pool or tp.connection_pool,
                p.outlier_detection or tp.outlier_detection,
            )
            self.emit(
                dr,
                "BackendPolicy",
                "weft.dev/v1alpha1",
                f"{name}-{p.port.number}",
                ns,
                {"targetRefs": [{"name": service, "port": p.port.number}], **pbody},
            )


def _ext(kind: str, name: str) -> dict[str, Any]:
    return {
        "type": "ExtensionRef",
        "extensionRef": {"group": "weft.dev", "kind": kind, "name": name},
    }


def _string_match(name: str, m: StringMatch) -> dict[str, Any]:
    if m.exact is not None:
        return {"type": "Exact", "name": name, "value": m.exact}
    return {"type": "RegularExpression", "name": name, "value": m.as_regex()}


def _header_filters(h: Headers) -> list[dict[str, Any]]:
    out = []
    for ops, kind, key in (
        (h.request, "RequestHeaderModifier", "requestHeaderModifier"),
        (h.response, "ResponseHeaderModifier", "responseHeaderModifier"),
    ):
        if ops is None:
            continue
        mod: dict[str, Any] = {}
        if ops.set:
            mod["set"] = [{"name": k, "value": v} for k, v in ops.set.items()]
        if ops.add:
            mod["add"] = [{"name": k, "value": v} for k, v in ops.add.items()]
        if ops.remove:
            mod["remove"] = list(ops.remove)
        if mod:
            out.append({"type": kind, key: mod})
    return out


def _retry(r: HTTPRetry) -> dict[str, Any]:
    spec: dict[str, Any] = {"attempts": r.attempts}
    conds = r.conditions()
    codes = [int(c) for c in conds if c.isdigit()]
    on = [ISTIO_RETRY_ON[c] for c in conds if not c.isdigit()]
    if codes and "retriable-status-codes" not in on:
        on.append("retriable-status-codes")
    if on:
        spec["retryOn"] = on
    if codes:
        spec["retriableStatusCodes"] = codes
    if r.per_try_timeout is not None:
        spec["perTryTimeout"] = r.per_try_timeout
    return spec


def _backend_policy(
    lb: IstioLoadBalancer | None,
    pool: IstioConnectionPool | None,
    od: IstioOutlierDetection | None,
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if lb is not None:
        if lb.consistent_hash is not None:
            ch = lb.consistent_hash
            key: dict[str, Any] = {}
            if ch.http_header_name:
                key["header"] = ch.http_header_name
            elif ch.http_cookie is not None:
                key["cookie"] = {
                    k: v
                    for k, v in (
                        ("name", ch.http_cookie.name),
                        ("ttl", ch.http_cookie.ttl),
                        ("path", ch.http_cookie.path),
                    )
                    if v is not None
                }
            elif ch.use_source_ip:
                key["sourceIdentity"] = True
            elif ch.http_query_parameter_name:
                key["queryParameter"] = ch.http_query_parameter_name
            body: dict[str, Any] = {"consistentHash": key}
            if ch.maglev is not None:
                body.update(type="Maglev", tableSize=ch.maglev.table_size)
            else:
                size = ch.ring_hash.minimum_ring_size if ch.ring_hash else ch.minimum_ring_size
                body["type"] = "RingHash"
                if size:
                    body["minimumRingSize"] = size
            out["loadBalancer"] = body
        elif lb.simple is not None:
            out["loadBalancer"] = {
                "type": {
                    "UNSPECIFIED": "LeastRequest",
                    "ROUND_ROBIN": "RoundRobin",
                    "LEAST_REQUEST": "LeastRequest",
                    "LEAST_CONN": "LeastRequest",
                    "RANDOM": "Random",
                }[lb.simple]
            }
    if pool is not None:
        cp: dict[str, Any] = {}
        if pool.tcp is not None:
            if pool.tcp.max_connections is not None:
                cp["maxConnections"] = pool.tcp.max_connections
            if pool.tcp.connect_timeout is not None:
                cp["connectTimeout"] = pool.tcp.connect_timeout
        if pool.http is not None:
            if pool.http.http1_max_pending_requests is not None:
                cp["maxPendingRequests"] = pool.http.http1_max_pending_requests
            if pool.http.max_requests_per_connection is not None:
                cp["maxRequestsPerConnection"] = pool.http.max_requests_per_connection
        if cp:
            out["connectionPool"] = cp
    if od is not None:
        o: dict[str, Any] = {}
        c5 = od.consecutive_5xx_errors
        if c5 is None and od.consecutive_errors is not None:
            c5 = od.consecutive_errors
        for name, v in (
            ("consecutive5xxErrors", c5),
            ("consecutiveGatewayErrors", od.consecutive_gateway_errors),
            ("interval", od.interval),
            ("baseEjectionTime", od.base_ejection_time),
            ("maxEjectionPercent", od.max_ejection_percent),
            ("minHealthPercent", od.min_health_percent),
        ):
            if v is not None:
                o[name] = v
        out["outlierDetection"] = o
    return out


def _merge(base: TrafficPolicy | None, over: TrafficPolicy | None) -> TrafficPolicy | None:
    if base is None or over is None:
        return over or base
    data = base.model_dump(by_alias=True, exclude_none=True)
    for k, v in over.model_dump(by_alias=True, exclude_none=True).items():
        if v not in ([], {}):
            data[k] = v
    return TrafficPolicy.model_validate(data)


def istio_documents(
    resources: list[Resource],
) -> tuple[list[tuple[Resource, dict[str, Any]]], list[Problem]]:
    """(source, document) for everything the VirtualServices and DestinationRules among
    `resources` derive into, and the problems of those that cannot be derived."""
    istio = [r for r in resources if isinstance(r, (VirtualService, DestinationRule))]
    if not istio:
        return [], []
    d = _Deriver(resources)
    for r in sorted(istio, key=lambda r: (r.KIND != "DestinationRule", r.key)):
        if isinstance(r, DestinationRule):
            d.destination_rule(r)
        else:
            d.virtual_service(r)
    return d.docs, d.problems


__all__ = [
    "DERIVED_FROM",
    "DestinationRule",
    "VirtualService",
    "host_service",
    "istio_documents",
    "subset_service_name",
]
