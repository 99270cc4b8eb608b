"""Model routing (ModelRoute): backends by model, model-name rewrite, cost rules, the
fallback chain, and the per-Service policy index that keeps the common path free."""

from __future__ import annotations

import json
import random
from collections import Counter
from typing import Any

from agent.waypoint.ai.openai import ModelRequest, parse_request
from agent.waypoint.ai.policy import AiPolicies
from agent.waypoint.ai.priority import LoadBoard
from agent.waypoint.ai.quotastore import SqliteStore
from agent.waypoint.ai.router import ModelRouter, failure_kind
from agent.waypoint.codec.headers import Headers
from controller.model.ai import ModelRoute, ResponseCache, TokenRateLimit

SPEC: dict[str, Any] = {
    "targetRefs": [{"name": "llm"}],
    "costRules": [
        {"name": "free-tier", "match": {"tiers": ["free"]}, "model": "llama-8b"},
        {
            "name": "short",
            "match": {"models": ["llama-70b"], "maxPromptTokens": 100, "maxMaxTokens": 256},
            "model": "llama-8b",
        },
    ],
    "rules": [
        {
            "name": "small",
            "models": ["llama-8b"],
            "backendRefs": [
                {"name": "vllm-8b", "port": 8000, "modelName": "meta-llama/Llama-3.1-8B"}
            ],
        },
        {
            "name": "big",
            "models": ["llama-70b", "llama-70b-*"],
            "backendRefs": [
                {"name": "vllm-70b-a", "port": 8000, "weight": 3},
                {"name": "vllm-70b-b", "namespace": "gpu", "port": 9000, "weight": 1},
            ],
            "fallback": [
                {"model": "llama-8b"},
                {"backendRef": {"name": "openai-proxy", "port": 443, "modelName": "gpt-4o"}},
            ],
        },
    ],
}


def route(**spec: Any) -> ModelRouter:
    return ModelRouter(
        ModelRoute.model_validate(
            {
                "apiVersion": "weft.dev/v1alpha1",
                "kind": "ModelRoute",
                "metadata": {"name": "models", "namespace": "ai"},
                "spec": {**SPEC, **spec},
            }
        )
    )


def request(
    model: str | None, prompt: str = "hi", tier: str | None = None, **body: Any
) -> ModelRequest:
    b = {"messages": [{"role": "user", "content": prompt}], **body}
    if model:
        b["model"] = model
    h = Headers.of(("x-weft-tier", tier)) if tier else Headers()
    return parse_request("chat", h, json.dumps(b).encode())


def test_requests_for_a_model_reach_only_its_backends_with_the_weights():
    r = route()
    rng = random.Random(7)
    seen = Counter(
        r.plan(request("llama-70b", "x" * 2000), rng).targets[0].backend for _ in range(2000)
    )
    assert set(seen) == {("ai", "vllm-70b-a", 8000), ("gpu", "vllm-70b-b", 9000)}
    assert 0.72 < seen[("ai", "vllm-70b-a", 8000)] / 2000 < 0.78  # 3:1
    plan = r.plan(request("llama-8b"), rng)
    assert [t.backend for t in plan.targets] == [("ai", "vllm-8b", 8000)]


def test_the_model_name_is_rewritten_per_backend():
    r = route()
    req = request("llama-8b")
    (t,) = r.plan(req, random.Random(1)).targets
    assert (t.model, t.upstream_model) == ("llama-8b", "meta-llama/Llama-3.1-8B")
    body, _ = req.upstream_body(t.upstream_model)
    assert json.loads(body)["model"] == "meta-llama/Llama-3.1-8B"


def test_an_unknown_model_has_no_plan_and_a_pattern_matches_a_family():
    r = route()
    assert r.plan(request("mistral"), random.Random(1)) is None
    assert r.plan(request("llama-70b-instruct", "x" * 800), random.Random(1)) is not None


def test_the_fallback_chain_is_tried_in_declared_order_and_says_who_answered():
    r = route()
    plan = r.plan(request("llama-70b", "x" * 2000), random.Random(1))
    assert [(t.step, t.model, t.backend[1], t.upstream_model) for t in plan.targets] == [
        (0, "llama-70b", "vllm-70b-a", "llama-70b"),
        (1, "llama-8b", "vllm-8b", "meta-llama/Llama-3.1-8B"),  # the model's own rule
        (2, "llama-70b", "openai-proxy", "gpt-4o"),
    ]
    assert plan.falls_back_on("5xx") and plan.falls_back_on("over-quota")
    assert not plan.falls_back_on("429")  # not in the default list
    assert (failure_kind(503), failure_kind(429), failure_kind(404)) == ("5xx", "429", None)
    assert dict(r.answered(plan.targets[1])) == {
        b"x-weft-model-served": b"llama-8b",
        b"x-weft-fallback": b"1",
    }


def test_cost_rules_send_cheap_requests_to_the_cheap_model_and_the_rest_to_the_capable_one():
    r = route()
    rng = random.Random(1)
    short = r.plan(request("llama-70b", "hello there", max_tokens=100), rng)
    assert (short.cost_rule, short.targets[0].model) == ("short", "llama-8b")
    long_prompt = r.plan(request("llama-70b", "x" * 1000, max_tokens=100), rng)
    assert (long_prompt.cost_rule, long_prompt.targets[0].model) == (None, "llama-70b")
    unbounded = r.plan(request("llama-70b", "hello"), rng)  # no max_tokens: may be long
    assert unbounded.cost_rule is None
    free = r.plan(request("llama-70b", "x" * 1000, tier="free"), rng)
    assert (free.cost_rule, free.targets[0].model, free.requested) == (
        "free-tier",
        "llama-8b",
        "llama-70b",
    )


def test_a_rollout_split_replaces_only_the_primary_backend():
    r = route()
    canary = ("ai", "vllm-70b-canary", 8000)
    plan = r.plan(request("llama-70b", "x" * 800), random.Random(1), split=lambda b: canary)
    assert plan.targets[0].backend == canary and plan.targets[1].backend[1] == "vllm-8b"


def resource(kind: type, name: str, spec: dict[str, Any]) -> Any:
    return kind.model_validate(
        {
            "apiVersion": "weft.dev/v1alpha1",
            "kind": kind.KIND,
            "metadata": {"name": name, "namespace": "ai"},
            "spec": spec,
        }
    )


def test_the_policy_index_finds_a_services_policies_and_nothing_for_others(tmp_path):
    res = [
        resource(ModelRoute, "models", SPEC),
        resource(
            TokenRateLimit,
            "t",
            {
                "targetRefs": [{"name": "llm"}],
                "limits": [{"name": "a", "by": "principal", "tokensPerMinute": 5}],
            },
        ),
        resource(ResponseCache, "c", {"targetRefs": [{"name": "embed"}]}),
    ]
    store, board, rng = SqliteStore(tmp_path / "q.db"), LoadBoard(), random.Random(1)
    pol = AiPolicies.build(res, store=store, board=board, rng=rng, now=0)
    llm = pol.for_service("ai", "llm")
    assert llm is not None and llm.route is not None and len(llm.limiters) == 1
    assert llm.balancer is not None and llm.cache is None
    assert pol.for_service("ai", "other") is None  # the common path: one dict lookup
    req = llm.read_request("POST", "/v1/chat/completions", Headers(), b'{"model": "llama-8b"}')
    assert req is not None and req.model == "llama-8b"
    assert llm.read_request("GET", "/v1/models", Headers(), b"") is None
    # A rebuild keeps the compiled state of unchanged policies (cache entries...).
    again = AiPolicies.build(res, store=store, board=board, rng=rng, now=1, previous=pol)
    assert again.for_service("ai", "embed").cache is pol.for_service("ai", "embed").cache
    assert again.for_service("ai", "llm").route is llm.route
