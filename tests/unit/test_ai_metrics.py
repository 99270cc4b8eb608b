"""OpenTelemetry GenAI metrics in Prometheus: names, attributes and values."""

from __future__ import annotations

import random

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from agent.waypoint.ai.metrics import AiPolicyCollector, GenAIMetrics
from agent.waypoint.ai.policy import AiPolicies
from agent.waypoint.ai.priority import LoadBoard
from agent.waypoint.ai.usage import Usage
from controller.model.ai import ResponseCache


def samples(reg: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(reg).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def test_a_chat_request_records_tokens_by_type_ttft_tpot_and_duration():
    reg = CollectorRegistry()
    m = GenAIMetrics(reg)
    m.record(
        operation="chat",
        request_model="llama-70b",
        response_model="llama-8b",
        duration=0.8,
        usage=Usage(7, 6, 13),
        ttft=0.05,
        tpot=0.01,
        destination=("llm-8b", "ai", "v2"),
    )
    s = samples(reg)
    base = (
        ("gen_ai_operation_name", "chat"),
        ("gen_ai_request_model", "llama-70b"),
        ("gen_ai_response_model", "llama-8b"),
    )

    def key(name: str, *extra: tuple[str, str]) -> tuple[str, tuple[tuple[str, str], ...]]:
        return name, tuple(sorted((*base, *extra)))

    assert s[key("gen_ai_client_token_usage_sum", ("gen_ai_token_type", "input"))] == 7
    assert s[key("gen_ai_client_token_usage_sum", ("gen_ai_token_type", "output"))] == 6
    assert s[key("gen_ai_client_token_usage_count", ("gen_ai_token_type", "output"))] == 1
    assert (
        s[key("gen_ai_client_token_usage_bucket", ("gen_ai_token_type", "input"), ("le", "4.0"))]
        == 0
    )
    assert (
        s[key("gen_ai_client_token_usage_bucket", ("gen_ai_token_type", "input"), ("le", "16.0"))]
        == 1
    )
    # With the backend's workload, so a canary's TTFT is judged apart from the stable's.
    backend = (
        ("destination_workload", "llm-8b"),
        ("destination_workload_namespace", "ai"),
        ("destination_version", "v2"),
    )
    assert s[key("gen_ai_server_time_to_first_token_sum", *backend)] == 0.05
    assert s[key("gen_ai_server_time_per_output_token_sum")] == 0.01
    assert s[key("gen_ai_server_request_duration_sum", ("error_type", ""))] == 0.8


def test_embeddings_have_no_output_tokens_and_errors_carry_their_type():
    reg = CollectorRegistry()
    m = GenAIMetrics(reg)
    m.record(
        operation="embeddings",
        request_model="e5",
        response_model="e5",
        duration=0.1,
        usage=Usage(4, 0, 4),
    )
    m.record(
        operation="completions",
        request_model="x",
        response_model=None,
        duration=2.0,
        error_type="503",
    )
    names = {(n, dict(labels).get("gen_ai_token_type")) for n, labels in samples(reg)}
    assert ("gen_ai_client_token_usage_count", "input") in names
    assert ("gen_ai_client_token_usage_count", "output") not in names
    err = [
        v
        for (n, labels), v in samples(reg).items()
        if n == "gen_ai_server_request_duration_count" and ("error_type", "503") in labels
    ]
    assert err == [1.0]
    assert any(("gen_ai_operation_name", "text_completion") in labels for _, labels in samples(reg))


def test_policy_counters_are_read_at_scrape_time():
    cache = ResponseCache.model_validate(
        {
            "apiVersion": "weft.dev/v1alpha1",
            "kind": "ResponseCache",
            "metadata": {"name": "c", "namespace": "ai"},
            "spec": {"targetRefs": [{"name": "embed"}]},
        }
    )
    pol = AiPolicies.build([cache], store=None, board=LoadBoard(), rng=random.Random(1), now=0)
    reg = CollectorRegistry()
    reg.register(AiPolicyCollector(lambda: pol))
    c = pol.for_service("ai", "embed").cache
    c.counters.hits, c.counters.misses = 3, 1
    s = samples(reg)
    assert s[("weft_ai_cache_lookups_total", (("policy", "ai/c"), ("result", "hit")))] == 3
    assert s[("weft_ai_cache_lookups_total", (("policy", "ai/c"), ("result", "miss")))] == 1


def test_model_names_a_caller_makes_up_cannot_grow_the_registry_without_bound():
    """The request's model is the caller's text: past MAX_MODELS distinct names, further
    ones share the series labelled OTHER_MODEL, and names already seen keep their own."""
    from agent.waypoint.ai import metrics as M

    reg = CollectorRegistry()
    m = GenAIMetrics(reg)
    m.record(operation="chat", request_model="llama", response_model="llama", duration=0.1)
    for i in range(M.MAX_MODELS + 50):
        m.record(operation="chat", request_model=f"made-up-{i}", response_model=None, duration=0.1)
    m.record(operation="chat", request_model="llama", response_model="llama", duration=0.1)
    models = {
        dict(labels)["gen_ai_request_model"]
        for n, labels in samples(reg)
        if n == "gen_ai_server_request_duration_count"
    }
    assert len(models) <= M.MAX_MODELS + 1 and M.OTHER_MODEL in models and "llama" in models
    count = {
        dict(labels)["gen_ai_request_model"]: v
        for (n, labels), v in samples(reg).items()
        if n == "gen_ai_server_request_duration_count"
    }
    assert count["llama"] == 2  # a name seen before the bound keeps its own series
