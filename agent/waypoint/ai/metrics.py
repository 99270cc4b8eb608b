"""OpenTelemetry GenAI metrics, exported to Prometheus.

The semantic conventions (https://opentelemetry.io/docs/specs/semconv/gen-ai/) name:

| OpenTelemetry                         | Prometheus (dots -> underscores)        | unit  |
|---------------------------------------|-----------------------------------------|-------|
| gen_ai.client.token.usage             | gen_ai_client_token_usage               | token |
| gen_ai.server.time_to_first_token     | gen_ai_server_time_to_first_token       | s     |
| gen_ai.server.time_per_output_token   | gen_ai_server_time_per_output_token     | s     |
| gen_ai.server.request.duration        | gen_ai_server_request_duration          | s     |

each a histogram (so `_bucket`, `_sum`, `_count` series) with the attributes
gen_ai.operation.name (chat, text_completion, embeddings), gen_ai.request.model and
gen_ai.response.model; token usage adds gen_ai.token.type (input, output); request duration
adds error.type when the request failed. Bucket boundaries are the ones the conventions
advise. No unit suffix is appended (an OpenTelemetry Collector's Prometheus exporter would
add `_seconds`); the names are the conventions' own.

`AiPolicyCollector` exports the policies' plain counters (cache hits, rate-limit decisions,
shedding, rollouts) at scrape time, so the request path only increments ints.

This is the one module of the package that imports prometheus_client.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from agent.waypoint.ai.quotastore import BUCKETS, QuotaStore, StoreStats
from agent.waypoint.ai.usage import Usage

if TYPE_CHECKING:
    from agent.waypoint.ai.policy import AiPolicies

# The backend that answered, as Istio's metrics name it.
DESTINATION = ("destination_workload", "destination_workload_namespace", "destination_version")

CHILD_CACHE_MAX = 4096  # label-value tuples whose children GenAIMetrics keeps at hand
# Distinct model names a waypoint labels its series with; later ones are labelled
# OTHER_MODEL. The request's model is whatever the caller wrote in its body: without a
# bound, a caller could grow the registry (and every scrape) by a series per name it sends.
MAX_MODELS = 256
OTHER_MODEL = "_other"
OPERATION_NAMES = {"chat": "chat", "completions": "text_completion", "embeddings": "embeddings"}

# The semantic conventions' advised boundaries.
TOKEN_BUCKETS = (
    1,
    4,
    16,
    64,
    256,
    1024,
    4096,
    16384,
    65536,
    262144,
    1048576,
    4194304,
    16777216,
    67108864,
)
TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
DURATION_BUCKETS = (
    0.01,
    0.02,
    0.04,
    0.08,
    0.16,
    0.32,
    0.64,
    1.28,
    2.56,
    5.12,
    10.24,
    20.48,
    40.96,
    81.92,
)

OP, REQ, RESP = "gen_ai_operation_name", "gen_ai_request_model", "gen_ai_response_model"


class GenAIMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.token_usage = Histogram(
            "gen_ai_client_token_usage",
            "Number of input and output tokens used (gen_ai.client.token.usage).",
            (OP, REQ, RESP, "gen_ai_token_type"),
            buckets=TOKEN_BUCKETS,
            registry=registry,
        )
        # With the backend workload (an extra attribute, which the conventions allow), so a
        # canary's time to first token can be judged apart from the stable version's.
        self.ttft = Histogram(
            "gen_ai_server_time_to_first_token",
            "Time to generate the first token, seconds (gen_ai.server.time_to_first_token).",
            (
                OP,
                REQ,
                RESP,
                "destination_workload",
                "destination_workload_namespace",
                "destination_version",
            ),
            buckets=TTFT_BUCKETS,
            registry=registry,
        )
        self.tpot = Histogram(
            "gen_ai_server_time_per_output_token",
            "Time per output token after the first, seconds (gen_ai.server.time_per_output_token).",
            (OP, REQ, RESP),
            buckets=TPOT_BUCKETS,
            registry=registry,
        )
        self.duration = Histogram(
            "gen_ai_server_request_duration",
            "Model request duration, seconds (gen_ai.server.request.duration).",
            (OP, REQ, RESP, "error_type"),
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        # Children by label values: prometheus_client's labels() validates and locks on
        # every call (27 Python calls per chat completion in hopcost --ai). Bounded: the
        # cache starts over past CHILD_CACHE_MAX series (the registry keeps them all).
        self._children: dict[tuple[object, ...], Any] = {}
        self._models: set[str] = set()

    def _model(self, name: str | None) -> str:
        """The label value for a model name: itself, or OTHER_MODEL past MAX_MODELS names."""
        name = name or ""
        models = self._models
        if name in models:
            return name
        if len(models) >= MAX_MODELS:
            return OTHER_MODEL
        models.add(name)
        return name

    def _child(self, metric: Histogram, *values: str) -> Any:
        key = (metric, *values)
        c = self._children.get(key)
        if c is None:
            if len(self._children) >= CHILD_CACHE_MAX:
                self._children.clear()
            c = self._children[key] = metric.labels(*values)
        return c

    def record(
        self,
        *,
        operation: str,
        request_model: str | None,
        response_model: str | None,
        duration: float,
        usage: Usage | None = None,
        ttft: float | None = None,
        destination: tuple[str, str, str] = ("unknown", "unknown", "unknown"),
        tpot: float | None = None,
        error_type: str = "",
    ) -> None:
        """One finished model request. `error_type`: "" when it succeeded, else the status
        or failure (e.g. "503", "timeout"), the conventions' error.type."""
        op = OPERATION_NAMES.get(operation, operation)
        req, resp = self._model(request_model), self._model(response_model)
        child = self._child
        if usage is not None:
            child(self.token_usage, op, req, resp, "input").observe(usage.prompt_tokens)
            if operation != "embeddings":
                child(self.token_usage, op, req, resp, "output").observe(usage.completion_tokens)
        if ttft is not None:
            child(self.ttft, op, req, resp, *destination).observe(ttft)
        if tpot is not None:
            child(self.tpot, op, req, resp).observe(tpot)
        child(self.duration, op, req, resp, error_type).observe(duration)


class AiPolicyCollector(Collector):
    """weft_ai_* counters read from the live policies when Prometheus scrapes."""

    def __init__(
        self,
        policies: Callable[[], AiPolicies],
        store: Callable[[], QuotaStore | None] = lambda: None,
    ) -> None:
        self.policies = policies
        self.store = store

    def describe(self) -> Iterable[object]:
        return []  # unchecked collector: families depend on the config

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily | HistogramMetricFamily]:
        p = self.policies()
        cache = CounterMetricFamily(
            "weft_ai_cache_lookups",
            "Response cache lookups by result.",
            labels=("policy", "result"),
        )
        cache_bytes = GaugeMetricFamily("weft_ai_cache_bytes", "Bytes held.", labels=("policy",))
        for c in p.caches():
            k = c.counters
            for result, n in (("hit", k.hits), ("miss", k.misses), ("bypass", k.bypass)):
                cache.add_metric((c.name, result), n)
            cache_bytes.add_metric((c.name,), c.bytes)
        limits = CounterMetricFamily(
            "weft_ai_ratelimit_decisions",
            "Token rate limit decisions (shadow_denied: would have been denied).",
            labels=("policy", "decision"),
        )
        for lim in p.limiters():
            k2 = lim.counters
            for what, n in (
                ("allowed", k2.allowed),
                ("denied", k2.denied),
                ("shadow_denied", k2.shadow_denied),
                ("store_error", k2.store_errors),
                ("local_admit", k2.local_admits),
            ):
                limits.add_metric((lim.name, what), n)
        shed = CounterMetricFamily(
            "weft_ai_priority_requests",
            "Requests by priority class and outcome.",
            labels=("policy", "priority_class", "outcome"),
        )
        for s in p.shedders():
            for cls in s.classes.values():
                k3 = cls.counters
                for what, n in (
                    ("admitted", k3.admitted),
                    ("queued", k3.queued),
                    ("shed", k3.shed),
                    ("timed_out", k3.timed_out),
                ):
                    shed.add_metric((s.name, cls.name, what), n)
        weight = GaugeMetricFamily(
            "weft_ai_rollout_canary_weight",
            "The canary's share of traffic, percent.",
            labels=("rollout", "phase"),
        )
        for r in p.rollouts():
            weight.add_metric((r.name, r.phase), r.canary_weight)
        yield from (cache, cache_bytes, limits, shed, weight)
        store = self.store()
        if store is not None:
            yield from _store_families(store.stats)


def _store_families(stats: StoreStats) -> Iterator[HistogramMetricFamily | CounterMetricFamily]:
    latency = HistogramMetricFamily(
        "weft_ai_quota_store_duration_seconds",
        "Token quota store ops (admit, charge) by store (sqlite, redis, memory: this "
        "replica's fallback counters), seconds.",
        labels=("store", "op"),
    )
    errors = CounterMetricFamily(
        "weft_ai_quota_store_errors",
        "Token quota store ops that failed (timeouts, a server down, a locked file).",
        labels=("store", "op"),
    )
    for (kind, op), row in sorted(stats.ops.items()):
        buckets, acc = [], 0.0
        for bound, n in zip((*BUCKETS, float("inf")), row, strict=False):
            acc += n
            buckets.append((floatToGoString(bound), acc))
        latency.add_metric((kind, op), buckets, row[-2])
        errors.add_metric((kind, op), row[-1])
    yield latency
    yield errors
