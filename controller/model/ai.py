"""weft.dev AI traffic kinds: what the waypoint does with model requests.

- `TokenRateLimit`: tokens and requests per minute, and token budgets per hour, day or month,
  counted per caller (SPIFFE principal), per namespace (tenant), per model, per header value,
  or for everyone together; optionally in shadow mode (count and report, never block).
- `ModelRoute`: route by the requested model to backend Services, rename the model per
  backend, send cheap requests to a cheaper model (cost rules), and fall back along an
  ordered chain on failure, timeout or exhausted quota.
- `LoadShedding`: priority classes, when a model backend counts as saturated (queue depth,
  KV-cache utilisation, requests in flight), and what each class does then: go on, wait in a
  bounded queue, or be shed with 503/429. Callers and routes are given a class here.
- `ResponseCache`: exact-match caching of deterministic calls (embeddings; chat and
  completions at temperature 0 when allowed), per tenant unless declared shared.
- `Rollout`: automated canary analysis: step weights, interval, and thresholds on success
  rate, p99 latency and p99 time to first token; promote or roll back without a human.

Every kind targets Services (the one a client calls). docs/ai-traffic.md has examples and the
semantics; agent/waypoint/ai/ is what acts on these.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BeforeValidator, Field, WithJsonSchema, field_validator, model_validator

from controller.model.base import DnsLabel, Model, ObjectName, Resource, parse_duration, register
from controller.model.routing import HEADER_NAME
from controller.model.workloads import WEFT_API

Problems = list[tuple[tuple[str | int, ...], str]]

# Durations as Gateway API strings ("10s", "1m") or seconds; stored as float seconds. The CRD
# says int-or-string, which the API server needs to accept both spellings.
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

_BYTES = re.compile(r"^(\d{1,12})(Ki|Mi|Gi|k|M|G)?$")
_UNITS = {None: 1, "k": 1000, "M": 1000**2, "G": 1000**3, "Ki": 1024, "Mi": 1024**2, "Gi": 1024**3}


def parse_bytes(v: Any) -> int:
    """Bytes from an int or a Kubernetes quantity string ("64Mi", "500k")."""
    if isinstance(v, bool):
        raise ValueError("a size must be a number of bytes or a string like '64Mi'")
    if isinstance(v, int):
        if v < 0:
            raise ValueError("a size cannot be negative")
        return v
    if not isinstance(v, str) or not (m := _BYTES.match(v)):
        raise ValueError(f"{v!r} is not a size like 1048576, '64Mi' or '500k'")
    return int(m.group(1)) * _UNITS[m.group(2)]


ByteSize = Annotated[
    int,
    BeforeValidator(parse_bytes),
    WithJsonSchema(
        {
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            "description": "bytes, or a quantity such as '64Mi' or '500k'",
        }
    ),
]
Port = Annotated[int, Field(ge=1, le=65535)]
HeaderName = Annotated[str, Field(pattern=HEADER_NAME, max_length=256)]


def _check_patterns(v: list[str] | None) -> list[str] | None:
    for s in v or []:
        if not s or "*" in s.strip("*") or (s.count("*") > 1 and s != "*"):
            raise ValueError(f"{s!r}: '*' may only be a prefix, a suffix, or the whole value")
    return v


def pattern_matches(pattern: str, value: str) -> bool:
    """Istio-style string match: exact, `prefix*`, `*suffix`, or `*` (anything)."""
    if pattern == "*":
        return True
    if pattern.endswith("*"):
        return value.startswith(pattern[:-1])
    if pattern.startswith("*"):
        return value.endswith(pattern[1:])
    return value == pattern


def _unique(names: list[str], what: str, path: tuple[str | int, ...]) -> Problems:
    seen: set[str] = set()
    out: Problems = []
    for i, n in enumerate(names):
        if n in seen:
            out.append(((*path, i), f"{what} {n!r} is declared twice"))
        seen.add(n)
    return out


# ---- shared pieces -------------------------------------------------------------------


class ServiceRef(Model):
    """A Service (the one clients call) that a policy applies to."""

    group: Literal["", "core"] = ""
    kind: Literal["Service"] = "Service"
    name: ObjectName
    namespace: DnsLabel | None = None


class BackendService(Model):
    """A Service that serves a model; `port` is the Service port to send to."""

    name: ObjectName
    namespace: DnsLabel | None = None
    port: Port


class HeaderIs(Model):
    name: HeaderName
    values: list[Annotated[str, Field(max_length=4096)]] = Field(min_length=1)


class CallerMatch(Model):
    """Which requests something applies to; every field set must match (AND), and within a
    field any listed value (OR). Strings match exactly, as `prefix*`, `*suffix` or `*`."""

    principals: list[str] | None = None  # SPIFFE IDs: spiffe://td/ns/NS/sa/SA
    namespaces: list[str] | None = None
    models: list[str] | None = None  # the model the request asks for
    paths: list[str] | None = None  # e.g. /v1/embeddings, /v1/chat/*
    headers: list[HeaderIs] | None = Field(None, max_length=16)

    _p = field_validator("principals", "namespaces", "models", "paths")(
        lambda cls, v: _check_patterns(v)
    )


# ---- TokenRateLimit ------------------------------------------------------------------

LimitBy = Literal["principal", "namespace", "model", "header", "none"]


class Budget(Model):
    """A cumulative token allowance per calendar window (UTC): the hour, the day, the month."""

    tokens: int = Field(ge=1)
    window: Literal["hour", "day", "month"]


class LimitOverride(Model):
    """Other numbers for some values of the limit's key (a big tenant, a batch account).
    Fields left out keep the limit's own value."""

    values: list[Annotated[str, Field(min_length=1)]] = Field(min_length=1)
    tokens_per_minute: int | None = Field(None, alias="tokensPerMinute", ge=0)
    requests_per_minute: int | None = Field(None, alias="requestsPerMinute", ge=0)
    budget: Budget | None = None


class TokenLimit(Model):
    """One limit. Each distinct value of `by` (each caller, tenant, model or header value)
    gets its own counters; `none` shares one set of counters among every matching request."""

    name: DnsLabel
    by: LimitBy
    header: HeaderName | None = None  # the header whose value is the key, for by: header
    match: CallerMatch | None = None  # which requests count; None: all of them
    tokens_per_minute: int | None = Field(None, alias="tokensPerMinute", ge=0)
    requests_per_minute: int | None = Field(None, alias="requestsPerMinute", ge=0)
    budget: Budget | None = None
    overrides: list[LimitOverride] = Field(default_factory=list, max_length=256)
    shadow: bool | None = None  # None: the spec's shadow

    @model_validator(mode="after")
    def _shape(self) -> TokenLimit:
        if self.tokens_per_minute is None and self.requests_per_minute is None and not self.budget:
            raise ValueError("set tokensPerMinute, requestsPerMinute or budget (or several)")
        if (self.by == "header") != (self.header is not None):
            raise ValueError(
                "by: header needs header (the header whose value is the key)"
                if self.by == "header"
                else f"header only applies to by: header, not by: {self.by}"
            )
        return self


class TokenRateLimitSpec(Model):
    target_refs: list[ServiceRef] = Field(alias="targetRefs", min_length=1, max_length=16)
    limits: list[TokenLimit] = Field(min_length=1, max_length=64)
    # Shadow mode: requests are counted and would-be denials reported (a header, a counter,
    # an event) but never blocked; for trying a limit on live traffic before enforcing it.
    shadow: bool = False
    # When the counter store cannot be read or written (disk full, locked for too long):
    # admit, as a rate limiter should not turn a storage fault into an outage.
    fail_open: bool = Field(True, alias="failOpen")
    # A stream that takes a tokens or budget limit past its value while it streams:
    # `finish` lets it finish (charged in full; the next requests wait), `truncate` ends it
    # with an OpenAI-style error event at the next charge (every CHARGE_STEP tokens).
    on_exceed: Literal["finish", "truncate"] = Field("finish", alias="onExceed")


@register
class TokenRateLimit(Resource):
    """Tokens and requests per minute, and token budgets per hour, day or month, for the
    model requests to Services, counted per caller, tenant, model or header value."""

    KIND: ClassVar[str] = "TokenRateLimit"
    API_VERSIONS: ClassVar[tuple[str, ...]] = (WEFT_API,)

    spec: TokenRateLimitSpec

    def semantic_check(self) -> Problems:
        out = _unique([lim.name for lim in self.spec.limits], "limit", ("spec", "limits"))
        for i, lim in enumerate(self.spec.limits):
            seen: set[str] = set()
            for j, o in enumerate(lim.overrides):
                for v in o.values:
                    if v in seen:
                        out.append(
                            (
                                ("spec", "limits", i, "overrides", j, "values"),
                                f"{v!r} is overridden twice in limit {lim.name}",
                            )
                        )
                    seen.add(v)
            if lim.by == "none" and lim.overrides:
                out.append(
                    (
                        ("spec", "limits", i, "overrides"),
                        "by: none has one shared counter and no key values to override",
                    )
                )
        return out


# ---- ModelRoute ----------------------------------------------------------------------

FallbackOn = Literal["5xx", "429", "timeout", "connect-failure", "reset", "over-quota"]
# Every way a backend can fail a request before answering it, and quota. 429 is left out:
# a backend's own rate limit usually means "slow down", not "ask someone else".
DEFAULT_FALLBACK_ON: tuple[FallbackOn, ...] = (
    "5xx",
    "timeout",
    "connect-failure",
    "reset",
    "over-quota",
)


class ModelBackend(BackendService):
    weight: int = Field(1, ge=0, le=1_000_000)
    # The model name this backend knows the model by (vLLM serves "meta-llama/Llama-3-8B"
    # while clients ask for "llama-8b"); the request body is rewritten for this backend.
    model_name: str | None = Field(None, alias="modelName", min_length=1, max_length=512)


class FallbackTarget(Model):
    """One step of a fallback chain: another model (routed by the rules, as if the client
    had asked for it) or one backend directly. Exactly one of model or backendRef."""

    model: str | None = Field(None, min_length=1, max_length=512)
    backend_ref: ModelBackend | None = Field(None, alias="backendRef")

    @model_validator(mode="after")
    def _one(self) -> FallbackTarget:
        if (self.model is None) == (self.backend_ref is None):
            raise ValueError("set exactly one of model or backendRef")
        return self


class ModelRule(Model):
    name: DnsLabel | None = None
    # The models this rule serves (exact, `prefix*`, `*suffix`, `*`); empty: any model,
    # including requests that name none.
    models: list[str] = Field(default_factory=list, max_length=64)
    backend_refs: list[ModelBackend] = Field(alias="backendRefs", min_length=1, max_length=16)
    # Tried in order when the chosen backend fails as `fallbackOn` says; the response's
    # x-weft-model-served header names the model that answered.
    fallback: list[FallbackTarget] = Field(default_factory=list, max_length=8)

    _p = field_validator("models")(lambda cls, v: _check_patterns(v))

    def serves(self, model: str | None) -> bool:
        if not self.models:
            return True
        return model is not None and any(pattern_matches(p, model) for p in self.models)


class CostMatch(Model):
    """Request features; every field set must hold. Prompt size is the estimate in
    docs/ai-traffic.md (about 4 characters per token)."""

    models: list[str] | None = None
    tiers: list[str] | None = None  # values of the tier header
    min_prompt_tokens: int | None = Field(None, alias="minPromptTokens", ge=0)
    max_prompt_tokens: int | None = Field(None, alias="maxPromptTokens", ge=0)
    # The request's max_tokens (or max_completion_tokens); a request without one never
    # matches maxMaxTokens, as it may generate up to the model's limit.
    max_max_tokens: int | None = Field(None, alias="maxMaxTokens", ge=1)
    min_max_tokens: int | None = Field(None, alias="minMaxTokens", ge=1)

    _p = field_validator("models")(lambda cls, v: _check_patterns(v))


class CostRule(Model):
    """Send requests that match to `model` instead of the one asked for. The first matching
    rule wins; no match keeps the request's own model."""

    name: DnsLabel
    match: CostMatch
    model: str = Field(min_length=1, max_length=512)


class SessionAffinity(Model):
    """Keep a conversation on one endpoint so its KV cache is reused: a consistent hash of
    this header's value, unless that endpoint is overloaded (bounded-load hashing)."""

    header: HeaderName
    # Mirrokni et al., "Consistent Hashing with Bounded Loads" (2018): c = 1.25 keeps every
    # endpoint under 1.25 x the mean load while moving few keys.
    max_load_factor: float = Field(1.25, alias="maxLoadFactor", ge=1.0, le=100.0)


class ModelRouteSpec(Model):
    target_refs: list[ServiceRef] = Field(alias="targetRefs", min_length=1, max_length=16)
    # The model when the body names none (or is not JSON); the body wins when both say.
    model_header: HeaderName = Field("x-weft-model", alias="modelHeader")
    tier_header: HeaderName = Field("x-weft-tier", alias="tierHeader")
    cost_rules: list[CostRule] = Field(default_factory=list, alias="costRules", max_length=64)
    rules: list[ModelRule] = Field(min_length=1, max_length=64)
    fallback_on: list[FallbackOn] = Field(
        default_factory=lambda: list(DEFAULT_FALLBACK_ON),
        alias="fallbackOn",
    )
    session_affinity: SessionAffinity | None = Field(None, alias="sessionAffinity")
    # LeastLoaded picks the endpoint with the least queue, KV-cache use and in-flight
    # requests; Backend leaves the choice to the Service's BackendPolicy balancer.
    endpoint_picker: Literal["LeastLoaded", "Backend"] = Field(
        "LeastLoaded", alias="endpointPicker"
    )


@register
class ModelRoute(Resource):
    """Route model requests by model name to backend Services, with a model-name rewrite per
    backend, cost rules that pick a cheaper model, and an ordered fallback chain."""

    KIND: ClassVar[str] = "ModelRoute"
    API_VERSIONS: ClassVar[tuple[str, ...]] = (WEFT_API,)

    spec: ModelRouteSpec

    def rule_for(self, model: str | None) -> ModelRule | None:
        return next((r for r in self.spec.rules if r.serves(model)), None)

    def semantic_check(self) -> Problems:
        out: Problems = []
        out += _unique([c.name for c in self.spec.cost_rules], "cost rule", ("spec", "costRules"))
        names = [r.name for r in self.spec.rules if r.name]
        out += _unique(names, "rule", ("spec", "rules"))
        for i, c in enumerate(self.spec.cost_rules):
            if self.rule_for(c.model) is None:
                out.append(
                    (
                        ("spec", "costRules", i, "model"),
                        f"no rule serves model {c.model!r}; add it to a rule's models",
                    )
                )
        for i, r in enumerate(self.spec.rules):
            if all(b.weight == 0 for b in r.backend_refs):
                out.append((("spec", "rules", i, "backendRefs"), "every weight is 0"))
            for j, f in enumerate(r.fallback):
                if f.model is not None and self.rule_for(f.model) is None:
                    out.append(
                        (
                            ("spec", "rules", i, "fallback", j, "model"),
                            f"no rule serves fallback model {f.model!r}",
                        )
                    )
        return out


# ---- LoadShedding --------------------------------------------------------------------


class Saturation(Model):
    """When one endpoint counts as saturated: any threshold set is reached. A backend is
    saturated when every endpoint it could use is."""

    queue_depth: int | None = Field(None, alias="queueDepth", ge=1)  # vllm:num_requests_waiting
    # vllm:gpu_cache_usage_perc (vllm:kv_cache_usage_perc in vLLM v1), 0..1.
    kv_cache_utilization: float | None = Field(None, alias="kvCacheUtilization", gt=0, le=1)
    in_flight: int | None = Field(None, alias="inFlight", ge=1)  # this waypoint's, per endpoint
    # Scrapes older than this are ignored (the endpoint then counts by in-flight only): three
    # missed 5 s scrapes.
    metrics_max_age: Duration = Field(15.0, alias="metricsMaxAge", gt=0)

    @model_validator(mode="after")
    def _some(self) -> Saturation:
        if self.queue_depth is None and self.kv_cache_utilization is None and not self.in_flight:
            raise ValueError("set queueDepth, kvCacheUtilization or inFlight (or several)")
        return self


class ShedQueue(Model):
    max_requests: int = Field(alias="maxRequests", ge=1, le=1_000_000)
    timeout: Duration = Field(gt=0)


class PriorityClass(Model):
    name: DnsLabel
    value: int = Field(ge=0, le=1_000_000)  # higher is more important
    when_saturated: Literal["Admit", "Queue", "Shed"] = Field(alias="whenSaturated")
    # This class's action starts at this fraction of the saturation thresholds: 0.8 sheds
    # batch traffic before the backend is full, leaving headroom for the classes above.
    saturation_at: float = Field(1.0, alias="saturationAt", gt=0, le=10)
    queue: ShedQueue | None = None
    shed_status: Literal[429, 503] = Field(503, alias="shedStatus")

    @model_validator(mode="after")
    def _queue(self) -> PriorityClass:
        if (self.when_saturated == "Queue") != (self.queue is not None):
            raise ValueError(
                "whenSaturated: Queue needs queue (maxRequests, timeout)"
                if self.when_saturated == "Queue"
                else f"queue only applies to whenSaturated: Queue, not {self.when_saturated}"
            )
        return self


class PriorityAssignment(Model):
    """Give matching requests (callers, routes, models) a priority class; first match wins."""

    match: CallerMatch
    priority_class: DnsLabel = Field(alias="priorityClass")


class LoadSheddingSpec(Model):
    target_refs: list[ServiceRef] = Field(alias="targetRefs", min_length=1, max_length=16)
    saturation: Saturation
    priority_classes: list[PriorityClass] = Field(
        alias="priorityClasses", min_length=1, max_length=16
    )
    default_priority_class: DnsLabel = Field(alias="defaultPriorityClass")
    priorities: list[PriorityAssignment] = Field(default_factory=list, max_length=256)


@register
class LoadShedding(Resource):
    """Priority classes and what each does when a model backend is saturated: keep flowing,
    wait in a bounded queue, or be shed with 503/429."""

    KIND: ClassVar[str] = "LoadShedding"
    API_VERSIONS: ClassVar[tuple[str, ...]] = (WEFT_API,)

    spec: LoadSheddingSpec

    def semantic_check(self) -> Problems:
        s = self.spec
        classes = [c.name for c in s.priority_classes]
        out = _unique(classes, "priority class", ("spec", "priorityClasses"))
        values = [str(c.value) for c in s.priority_classes]
        for loc, _ in _unique(values, "value", ("spec", "priorityClasses")):
            out.append(((*loc, "value"), "two priority classes have the same value"))
        if s.default_priority_class not in classes:
            out.append(
                (
                    ("spec", "defaultPriorityClass"),
                    f"{s.default_priority_class!r} is not one of the priorityClasses "
                    f"({', '.join(classes)})",
                )
            )
        for i, p in enumerate(s.priorities):
            if p.priority_class not in classes:
                out.append(
                    (
                        ("spec", "priorities", i, "priorityClass"),
                        f"{p.priority_class!r} is not one of the priorityClasses",
                    )
                )
        return out


# ---- ResponseCache -------------------------------------------------------------------


class ResponseCacheSpec(Model):
    target_refs: list[ServiceRef] = Field(alias="targetRefs", min_length=1, max_length=16)
    # Embeddings are deterministic and always eligible. Chat and completions are cached only
    # when this is true and the request sets temperature 0 (greedy decoding).
    cache_completions: bool = Field(False, alias="cacheCompletions")
    ttl: Duration = Field(300.0, gt=0)
    max_bytes: ByteSize = Field(64 * 1024**2, alias="maxBytes", ge=1)  # per waypoint worker
    max_entry_bytes: ByteSize = Field(1024**2, alias="maxEntryBytes", ge=1)
    # Whose entries are whose: a tenant never sees another's unless shareAcrossTenants.
    tenant_by: Literal["namespace", "principal", "header"] = Field("namespace", alias="tenantBy")
    tenant_header: HeaderName | None = Field(None, alias="tenantHeader")
    share_across_tenants: bool = Field(False, alias="shareAcrossTenants")

    @model_validator(mode="after")
    def _shape(self) -> ResponseCacheSpec:
        if (self.tenant_by == "header") != (self.tenant_header is not None):
            raise ValueError("tenantBy: header and tenantHeader go together")
        if self.max_entry_bytes > self.max_bytes:
            raise ValueError("maxEntryBytes must not be larger than maxBytes")
        return self


@register
class ResponseCache(Resource):
    """Exact-match caching of deterministic model calls (embeddings; chat and completions at
    temperature 0 when allowed), per tenant, bounded in bytes, with a TTL."""

    KIND: ClassVar[str] = "ResponseCache"
    API_VERSIONS: ClassVar[tuple[str, ...]] = (WEFT_API,)

    spec: ResponseCacheSpec


# ---- Rollout -------------------------------------------------------------------------


class RolloutStep(Model):
    weight: int = Field(ge=1, le=100)  # percent of the traffic to the canary
    interval: Duration | None = Field(None, gt=0)  # None: the spec's interval


class RolloutThresholds(Model):
    """What a healthy canary looks like over one interval; unset thresholds are not checked."""

    min_success_rate: float = Field(99.0, alias="minSuccessRate", ge=0, le=100)  # percent
    max_p99_latency: Duration | None = Field(None, alias="maxP99Latency", gt=0)
    max_p99_time_to_first_token: Duration | None = Field(None, alias="maxP99TimeToFirstToken", gt=0)


class ThresholdRange(Model):
    """Flagger's thresholdRange: the check passes when min <= value <= max."""

    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _some(self) -> ThresholdRange:
        if self.min is None and self.max is None:
            raise ValueError("set min, max or both")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min:g} is above max {self.max:g}")
        return self


class RolloutMetric(Model):
    """A custom check (Flagger's metric with an inline query): a PromQL query that returns
    one number, judged against thresholdRange at every step. In the query, {{ namespace }},
    {{ canary }}, {{ stable }} and {{ target }} are the Services' names and {{ interval }}
    the step's interval as a PromQL duration (60s)."""

    name: DnsLabel
    query: str = Field(min_length=1, max_length=4096)
    threshold_range: ThresholdRange = Field(alias="thresholdRange")


WebhookType = Literal["confirm-promotion", "rollback"]


class RolloutWebhook(Model):
    """Flagger's webhooks. confirm-promotion: asked before promoting; anything but a 2xx
    keeps the canary at its last step until it says yes. rollback: asked at every check;
    a 2xx rolls back at once (a human's or a pipeline's emergency stop)."""

    name: DnsLabel
    type: WebhookType
    url: str = Field(pattern=r"^https?://\S+$", max_length=2048)
    timeout: Duration = Field(5.0, gt=0, le=60)
    metadata: dict[str, str] = Field(default_factory=dict)

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        import urllib.parse

        try:
            u = urllib.parse.urlsplit(v)
            _ = u.port  # raises for a port that is not a number in range
        except ValueError as e:
            raise ValueError(f"{v!r} is not a URL: {e}") from e
        if not u.hostname:
            raise ValueError(f"{v!r} names no host")
        return v


class RolloutAnalysis(Model):
    # waypoint: each waypoint replica judges the traffic it carries (no dependency; replicas
    # can step apart). prometheus: the controller judges once, from the waypoints' metrics
    # in Prometheus (controller --prometheus-url), and every replica applies its decision.
    provider: Literal["waypoint", "prometheus"] = "waypoint"


class RolloutSpec(Model):
    target_ref: ServiceRef = Field(alias="targetRef")
    stable: BackendService
    canary: BackendService
    steps: list[RolloutStep] = Field(min_length=1, max_length=32)
    interval: Duration = Field(60.0, gt=0)
    # An interval with fewer canary requests than this is not judged; the step waits.
    min_requests: int = Field(20, alias="minRequests", ge=1)
    thresholds: RolloutThresholds = Field(default_factory=RolloutThresholds)
    # Failed checks (in a row) that roll the canary back; 1 rolls back at the first one.
    failure_limit: int = Field(1, alias="failureLimit", ge=1, le=100)
    analysis: RolloutAnalysis = Field(default_factory=RolloutAnalysis)
    metrics: list[RolloutMetric] = Field(default_factory=list, max_length=16)
    webhooks: list[RolloutWebhook] = Field(default_factory=list, max_length=8)


@register
class Rollout(Resource):
    """Automated canary analysis: shift traffic to a canary in steps, judge each step on
    success rate, p99 latency and p99 time to first token, then promote or roll back."""

    KIND: ClassVar[str] = "Rollout"
    API_VERSIONS: ClassVar[tuple[str, ...]] = (WEFT_API,)

    spec: RolloutSpec

    def semantic_check(self) -> Problems:
        out: Problems = []
        weights = [s.weight for s in self.spec.steps]
        for i in range(1, len(weights)):
            if weights[i] <= weights[i - 1]:
                out.append(
                    (
                        ("spec", "steps", i, "weight"),
                        f"step weights must rise: {weights[i]} after {weights[i - 1]}",
                    )
                )
        st, ca = self.spec.stable, self.spec.canary
        if (st.namespace, st.name, st.port) == (ca.namespace, ca.name, ca.port):
            out.append((("spec", "canary"), "the canary is the stable backend itself"))
        if self.spec.analysis.provider == "waypoint":
            for field_, items in (("metrics", self.spec.metrics), ("webhooks", self.spec.webhooks)):
                if items:
                    out.append(
                        (
                            ("spec", field_),
                            f"{field_} need analysis.provider: prometheus (the controller runs "
                            "them); a waypoint cannot",
                        )
                    )
        return out


class RolloutStateSpec(Model):
    generation: str  # the Rollout spec this state belongs to (a digest of it)
    phase: Literal["Progressing", "Promoted", "RolledBack"]
    step: int = Field(ge=0)
    canary_weight: int = Field(alias="canaryWeight", ge=0, le=100)
    failures: int = Field(0, ge=0)
    window_start: float = Field(alias="windowStart")
    waiting_for: str | None = Field(None, alias="waitingFor")  # e.g. a confirm-promotion hook
    last_analysis: dict[str, Any] | None = Field(None, alias="lastAnalysis")
    events: list[str] = Field(default_factory=list, max_length=64)


def rollout_generation(r: Rollout) -> str:
    """A digest of a Rollout's spec: a RolloutState applies only to the spec it was
    decided for (an edited Rollout starts over)."""
    import hashlib

    return hashlib.sha256(r.spec.model_dump_json(by_alias=True).encode()).hexdigest()[:16]


@register
class RolloutState(Resource):
    """Where a Rollout judged by the controller (analysis.provider: prometheus) stands:
    written by the controller only, sent to every waypoint like any config, so every
    replica applies the same weights. `weft rollout status` shows it."""

    KIND: ClassVar[str] = "RolloutState"
    API_VERSIONS: ClassVar[tuple[str, ...]] = (WEFT_API,)
    INTERNAL: ClassVar[bool] = True

    spec: RolloutStateSpec


AI_KINDS = ("TokenRateLimit", "ModelRoute", "LoadShedding", "ResponseCache", "Rollout")
