"""weft.dev traffic kinds: how a waypoint treats a Service's backends, and what a route rule
adds to Gateway API.

- `BackendPolicy` (like Istio's DestinationRule) targets Services: load balancing, connection
  pool limits, outlier detection, active health checks, the retry budget, and a fallback for
  when no endpoint can take a request.
- `RetryPolicy` and `FaultInjection` are named from HTTPRoute rules by `ExtensionRef` filters
  (group `weft.dev`), Gateway API's extension point for behaviour it does not define.

Every default below says where it comes from; docs/policy-reference.md has the full table.
The waypoint's engine (agent/waypoint/engine/) is what acts on these.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BeforeValidator, Field, WithJsonSchema, field_validator, model_validator

from controller.model.base import Model, ObjectName, Resource, parse_duration, register
from controller.model.routing import HEADER_NAME
from controller.model.workloads import WEFT_API

# Durations are written as Gateway API (GEP-2257) strings ("10s", "250ms") or as a number of
# seconds, and stored as float seconds. The CRD schema says int-or-string, which is what the
# API server must accept for both spellings.
Duration = Annotated[
    float,
    BeforeValidator(parse_duration),
    WithJsonSchema(
        {
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            "description": "a duration: '10s', '250ms', '1m30s', or a number of seconds",
        }
    ),
]
Percent = Annotated[float, Field(ge=0, le=100)]
Port = Annotated[int, Field(ge=1, le=65535)]

# Per-endpoint weight for the Weighted load balancer (and the weight of an endpoint on a
# RingHash ring or in a Maglev table): an annotation on the Workload, a label as a fallback.
WEIGHT_ANNOTATION = "weft.dev/weight"
MAX_ENDPOINT_WEIGHT = 1_000_000  # Gateway API's own ceiling for backendRef weights

_COOKIE_NAME = r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$"  # an RFC 6265 cookie-name is an RFC 9110 token


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    i = 2
    while i * i <= n:
        if n % i == 0:
            return False
        i += 1
    return True


# ---- BackendPolicy -------------------------------------------------------------------


class ServiceTargetRef(Model):
    """The Service a BackendPolicy applies to; `port` narrows it to one Service port."""

    group: Literal["", "core"] = ""
    kind: Literal["Service"] = "Service"
    name: ObjectName
    port: Port | None = None


class HashCookie(Model):
    name: str = Field(pattern=_COOKIE_NAME, max_length=256)
    # With a ttl, a request without the cookie gets a generated one (Set-Cookie with this
    # Max-Age) so its later requests stick; without one, such a request is balanced randomly.
    ttl: Duration | None = None
    path: str = "/"


class ConsistentHash(Model):
    """What a RingHash or Maglev balancer hashes: exactly one of these."""

    header: str | None = Field(None, pattern=HEADER_NAME, max_length=256)
    cookie: HashCookie | None = None
    source_identity: bool | None = Field(None, alias="sourceIdentity")
    query_parameter: str | None = Field(None, alias="queryParameter", min_length=1, max_length=256)

    @model_validator(mode="after")
    def _one(self) -> ConsistentHash:
        chosen = [
            name
            for name, v in (
                ("header", self.header),
                ("cookie", self.cookie),
                ("sourceIdentity", self.source_identity or None),
                ("queryParameter", self.query_parameter),
            )
            if v is not None
        ]
        if len(chosen) != 1:
            got = f" (got {', '.join(chosen)})" if chosen else ""
            raise ValueError(
                "set exactly one of header, cookie, sourceIdentity: true, queryParameter" + got
            )
        return self


LoadBalancerType = Literal[
    "RoundRobin", "Random", "LeastRequest", "Weighted", "RingHash", "Maglev", "PeakEWMA"
]
CONSISTENT = ("RingHash", "Maglev")


class LoadBalancer(Model):
    # LeastRequest (power of two choices) is Istio's default since 1.14: model requests vary
    # in cost by orders of magnitude, and P2C steers around busy endpoints where round robin
    # cannot.
    type: LoadBalancerType = "LeastRequest"
    consistent_hash: ConsistentHash | None = Field(None, alias="consistentHash")
    # Envoy's ring_hash minimum_ring_size default: ~1% spread between endpoints at 100s of them.
    minimum_ring_size: int = Field(1024, alias="minimumRingSize", ge=1, le=8_388_608)
    # Envoy's Maglev default: a prime well above 100 x the number of endpoints, which keeps
    # the imbalance under 1% (the Maglev paper's rule).
    table_size: int = Field(65537, alias="tableSize", ge=2, le=5_000_011)

    @field_validator("table_size")
    @classmethod
    def _prime(cls, v: int) -> int:
        if not _is_prime(v):
            raise ValueError(f"tableSize {v} must be a prime number (Maglev needs it), e.g. 65537")
        return v

    @model_validator(mode="after")
    def _hash(self) -> LoadBalancer:
        if self.type in CONSISTENT and self.consistent_hash is None:
            raise ValueError(
                f"type {self.type} needs consistentHash (header, cookie, sourceIdentity or "
                "queryParameter): it is what the hash is computed from"
            )
        if self.type not in CONSISTENT and self.consistent_hash is not None:
            raise ValueError(
                f"consistentHash only applies to type RingHash or Maglev, not {self.type}"
            )
        return self


class ConnectionPool(Model):
    """Limits per Service port and per waypoint worker (as Envoy's circuit breakers are per
    cluster and per proxy). Over a limit the request gets an immediate 503."""

    # Envoy's circuit-breaker defaults (1024 each): high enough never to bind a healthy
    # service, low enough that a stuck backend cannot pin unbounded memory in the waypoint.
    max_connections: int = Field(1024, alias="maxConnections", ge=1)
    max_pending_requests: int = Field(1024, alias="maxPendingRequests", ge=0)
    # 0 = unlimited, Envoy's and Istio's default; 1 turns keep-alive off.
    max_requests_per_connection: int = Field(0, alias="maxRequestsPerConnection", ge=0)
    # Istio's default connect timeout (Envoy's own is 5 s).
    connect_timeout: Duration = Field(10.0, alias="connectTimeout", gt=0)


class OutlierDetection(Model):
    """Passive health: eject endpoints that keep failing. Defaults are Istio's."""

    consecutive_5xx_errors: int = Field(5, alias="consecutive5xxErrors", ge=0)
    # 0 = off, Istio's default: gateway errors (502/503/504, connect failures, resets) are
    # already 5xx errors; this separate, usually lower, threshold is opt-in.
    consecutive_gateway_errors: int = Field(0, alias="consecutiveGatewayErrors", ge=0)
    interval: Duration = Field(10.0, gt=0)  # Istio and Envoy: 10 s between sweeps
    base_ejection_time: Duration = Field(30.0, alias="baseEjectionTime", gt=0)  # Istio: 30 s
    # Envoy's cap on base x ejections, so a flapping endpoint comes back within 5 minutes.
    max_ejection_time: Duration = Field(300.0, alias="maxEjectionTime", gt=0)
    # Istio and Envoy: 10%; Envoy still ejects at least one endpoint, and so does weft.
    max_ejection_percent: int = Field(10, alias="maxEjectionPercent", ge=0, le=100)
    # Istio's default 0 disables it: below this share of healthy endpoints, ejections and
    # failed health checks are ignored and every endpoint takes traffic (Envoy's panic mode).
    min_health_percent: int = Field(0, alias="minHealthPercent", ge=0, le=100)

    @model_validator(mode="after")
    def _some(self) -> OutlierDetection:
        if self.consecutive_5xx_errors == 0 and self.consecutive_gateway_errors == 0:
            raise ValueError(
                "consecutive5xxErrors and consecutiveGatewayErrors are both 0, so nothing "
                "would ever be ejected; set one of them, or remove outlierDetection"
            )
        if self.max_ejection_time < self.base_ejection_time:
            raise ValueError("maxEjectionTime must not be shorter than baseEjectionTime")
        return self


class HttpHealthCheck(Model):
    path: str = Field(max_length=1024)
    # None: 200-399, what the kubelet counts as success for the same endpoint's probes.
    expected_statuses: list[int] | None = Field(None, alias="expectedStatuses", min_length=1)

    @field_validator("path")
    @classmethod
    def _path(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError(f"path {v!r} must start with '/'")
        return v

    @field_validator("expected_statuses")
    @classmethod
    def _statuses(cls, v: list[int] | None) -> list[int] | None:
        for s in v or []:
            if not 100 <= s <= 599:
                raise ValueError(f"status {s} is not an HTTP status (100-599)")
        return v


class GrpcHealthCheck(Model):
    # grpc.health.v1.Health/Check; "" asks about the server as a whole.
    service: str = ""


class HealthCheck(Model):
    """Active health checks; the defaults are the kubelet's probe defaults."""

    http: HttpHealthCheck | None = None
    grpc: GrpcHealthCheck | None = None
    interval: Duration = Field(10.0, gt=0)  # periodSeconds
    timeout: Duration = Field(1.0, gt=0)  # timeoutSeconds
    healthy_threshold: int = Field(1, alias="healthyThreshold", ge=1)  # successThreshold
    unhealthy_threshold: int = Field(3, alias="unhealthyThreshold", ge=1)  # failureThreshold

    @model_validator(mode="after")
    def _one(self) -> HealthCheck:
        if (self.http is None) == (self.grpc is None):
            raise ValueError("set exactly one of http or grpc")
        if self.timeout > self.interval:
            raise ValueError("timeout must not be longer than interval")
        return self


class RetryBudget(Model):
    """Retries in flight may be at most max(minRetryConcurrency, budgetPercent% of the
    requests in flight), so retries cannot multiply the load on a failing backend."""

    budget_percent: Percent = Field(20.0, alias="budgetPercent")  # Envoy's and Istio's default
    min_retry_concurrency: int = Field(3, alias="minRetryConcurrency", ge=0)  # Envoy: 3


class FallbackResponse(Model):
    status: int = Field(503, ge=200, le=599)
    headers: dict[str, str] = Field(default_factory=dict)
    body: str = Field("", max_length=65536)

    @field_validator("headers")
    @classmethod
    def _names(cls, v: dict[str, str]) -> dict[str, str]:
        for name, value in v.items():
            if not re.match(HEADER_NAME, name):
                raise ValueError(f"{name!r} is not a valid header name")
            if any(c in value for c in "\r\n\0"):
                raise ValueError(f"header {name}: the value may not contain CR, LF or NUL")
        return v


class FallbackBackendRef(Model):
    group: Literal["", "core"] = ""
    kind: Literal["Service"] = "Service"
    name: ObjectName
    namespace: str | None = None
    port: Port


class Fallback(Model):
    """What answers when no endpoint can: every one is ejected or failing its health checks,
    or the Service has none. Exactly one of response or backendRef."""

    response: FallbackResponse | None = None
    backend_ref: FallbackBackendRef | None = Field(None, alias="backendRef")

    @model_validator(mode="after")
    def _one(self) -> Fallback:
        if (self.response is None) == (self.backend_ref is None):
            raise ValueError("set exactly one of response or backendRef")
        return self


class BackendPolicySpec(Model):
    target_refs: list[ServiceTargetRef] = Field(alias="targetRefs", min_length=1, max_length=16)
    load_balancer: LoadBalancer = Field(default_factory=LoadBalancer, alias="loadBalancer")
    connection_pool: ConnectionPool = Field(default_factory=ConnectionPool, alias="connectionPool")
    outlier_detection: OutlierDetection | None = Field(None, alias="outlierDetection")
    health_check: HealthCheck | None = Field(None, alias="healthCheck")
    retry_budget: RetryBudget = Field(default_factory=RetryBudget, alias="retryBudget")
    fallback: Fallback | None = None


@register
class BackendPolicy(Resource):
    """How the waypoint treats a Service's endpoints: load balancing, connection limits,
    outlier detection, health checks, retry budget and fallback (Istio's DestinationRule).

    When two policies target the same Service port, the one naming the port beats the one
    naming the whole Service; among equals the alphabetically first wins.
    """

    KIND: ClassVar[str] = "BackendPolicy"
    API_VERSIONS: ClassVar[tuple[str, ...]] = (WEFT_API,)

    spec: BackendPolicySpec

    def semantic_check(self) -> list[tuple[tuple[str | int, ...], str]]:
        out: list[tuple[tuple[str | int, ...], str]] = []
        fb = self.spec.fallback
        if fb is not None and fb.backend_ref is not None:
            ref = fb.backend_ref
            for i, t in enumerate(self.spec.target_refs):
                same_ns = (ref.namespace or self.namespace) == self.namespace
                if same_ns and ref.name == t.name and (t.port is None or t.port == ref.port):
                    out.append(
                        (
                            ("spec", "fallback", "backendRef"),
                            f"the fallback is targetRefs[{i}] itself; name another Service",
                        )
                    )
        return out

    def targets(self) -> list[tuple[str, str, int | None]]:
        """(namespace, name, port or None for every port) of each Service this applies to."""
        return [(self.namespace, t.name, t.port) for t in self.spec.target_refs]


# ---- RetryPolicy ---------------------------------------------------------------------

RetryOn = Literal[
    "5xx", "gateway-error", "reset", "connect-failure", "retriable-status-codes", "refused-stream"
]


class Backoff(Model):
    # Envoy's defaults: 25 ms base, max 10 x base. Fully jittered exponential: try n waits a
    # random time in [0, base x (2^n - 1)], capped at maxInterval.
    base_interval: Duration = Field(0.025, alias="baseInterval", gt=0)
    max_interval: Duration | None = Field(None, alias="maxInterval", gt=0)

    @model_validator(mode="after")
    def _order(self) -> Backoff:
        if self.max_interval is not None and self.max_interval < self.base_interval:
            raise ValueError("maxInterval must not be shorter than baseInterval")
        return self

    @property
    def cap(self) -> float:
        return self.max_interval if self.max_interval is not None else 10 * self.base_interval


DEFAULT_RETRY_ON: tuple[RetryOn, ...] = (
    "connect-failure",
    "refused-stream",
    "retriable-status-codes",
)


class RetryPolicySpec(Model):
    # Istio's default: 2 retries.
    attempts: int = Field(2, ge=0, le=10)
    # Istio's default set, minus gRPC-only conditions: retry what never reached the app, and
    # 503 (retriableStatusCodes' default), which a server sends when it is shedding load.
    retry_on: list[RetryOn] = Field(
        default_factory=lambda: list(DEFAULT_RETRY_ON),
        alias="retryOn",
        min_length=1,
    )
    retriable_status_codes: list[int] | None = Field(None, alias="retriableStatusCodes")
    per_try_timeout: Duration | None = Field(None, alias="perTryTimeout", gt=0)
    backoff: Backoff = Field(default_factory=Backoff)

    @field_validator("retriable_status_codes")
    @classmethod
    def _codes(cls, v: list[int] | None) -> list[int] | None:
        for c in v or []:
            if not 400 <= c <= 599:
                raise ValueError(f"retriable status {c} must be an HTTP error status (400-599)")
        return v

    @model_validator(mode="after")
    def _codes_need_the_condition(self) -> RetryPolicySpec:
        if self.retriable_status_codes and "retriable-status-codes" not in self.retry_on:
            raise ValueError(
                "retriableStatusCodes is set but retryOn does not list "
                "retriable-status-codes, so the codes would never be retried"
            )
        return self

    def status_codes(self) -> list[int]:
        if "retriable-status-codes" not in self.retry_on:
            return []
        return self.retriable_status_codes or [503]


@register
class RetryPolicy(Resource):
    """How a route rule retries: on which outcomes, how often, per-try timeout and backoff.
    Named from an HTTPRoute rule by an ExtensionRef filter (group weft.dev)."""

    KIND: ClassVar[str] = "RetryPolicy"
    API_VERSIONS: ClassVar[tuple[str, ...]] = (WEFT_API,)

    spec: RetryPolicySpec = Field(default_factory=RetryPolicySpec)


# ---- FaultInjection ------------------------------------------------------------------


class FaultDelay(Model):
    fixed_delay: Duration = Field(alias="fixedDelay")
    # A fault without a percentage applies to every request the rule matches.
    percentage: Percent = 100.0


class FaultAbort(Model):
    http_status: int = Field(alias="httpStatus", ge=200, le=599)
    percentage: Percent = 100.0


class FaultInjectionSpec(Model):
    delay: FaultDelay | None = None
    abort: FaultAbort | None = None

    @model_validator(mode="after")
    def _some(self) -> FaultInjectionSpec:
        if self.delay is None and self.abort is None:
            raise ValueError("set delay, abort, or both")
        return self


@register
class FaultInjection(Resource):
    """Delays and aborts injected into a route rule's requests, for testing resilience.
    Named from an HTTPRoute rule by an ExtensionRef filter (group weft.dev). The delay comes
    first; an aborted request is answered by the waypoint and never reaches a backend."""

    KIND: ClassVar[str] = "FaultInjection"
    API_VERSIONS: ClassVar[tuple[str, ...]] = (WEFT_API,)

    spec: FaultInjectionSpec


EXTENSION_KINDS = ("RetryPolicy", "FaultInjection")


def endpoint_weight(annotations: dict[str, str], labels: dict[str, str]) -> int:
    """The Weighted balancer's weight of one endpoint: `weft.dev/weight` as an annotation,
    else as a label, else 1. A value that is not an integer 0-1000000 counts as 1."""
    raw: Any = annotations.get(WEIGHT_ANNOTATION, labels.get(WEIGHT_ANNOTATION))
    if raw is None:
        return 1
    try:
        w = int(raw)
    except ValueError:
        return 1
    return w if 0 <= w <= MAX_ENDPOINT_WEIGHT else 1
