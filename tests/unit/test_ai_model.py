"""The weft.dev AI kinds: the documented examples parse, and mistakes are refused naming the
file, line, resource and field."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

import controller.model.ai  # registers the kinds until base._load_all imports it
from controller import crds
from controller.model.base import kinds
from controller.model.loader import parse_text

ROOT = Path(__file__).resolve().parents[2]


def doc_examples() -> list[str]:
    """Every YAML block of docs/ai-traffic.md with a weft.dev apiVersion."""
    text = (ROOT / "docs" / "ai-traffic.md").read_text()
    return [b for b in re.findall(r"```yaml\n(.*?)```", text, re.S) if "weft.dev/" in b]


def problems(text: str) -> list[str]:
    offer = parse_text(textwrap.dedent(text), "p.yaml")
    assert offer.problems, "expected problems"
    return [str(p) for p in offer.problems]


def test_every_example_in_the_docs_is_valid():
    blocks = doc_examples()
    assert len(blocks) >= 5
    parsed = []
    for b in blocks:
        offer = parse_text(b, "ai-traffic.md")
        assert not offer.problems, [str(p) for p in offer.problems]
        parsed += [r.KIND for r in offer.resources]
    assert set(controller.model.ai.AI_KINDS) <= set(parsed)


@pytest.mark.parametrize("kind", controller.model.ai.AI_KINDS)
def test_every_ai_kind_has_a_structural_crd(kind):
    crd = crds.crd_for(kinds()[kind])
    assert crd["spec"]["names"]["kind"] == kind and crd["spec"]["group"] == "weft.dev"


LIMIT = """\
apiVersion: weft.dev/v1alpha1
kind: TokenRateLimit
metadata: {name: tokens, namespace: ai}
spec:
  targetRefs: [{name: llm}]
  limits:
    - name: per-caller
      by: principal
      tokensPerMinute: 1000
"""


def test_a_limit_without_numbers_is_refused_naming_it():
    (msg,) = problems(LIMIT.replace("      tokensPerMinute: 1000\n", ""))
    assert msg.startswith("p.yaml:7: TokenRateLimit ai/tokens: spec.limits[0]: set tokensPerMinute")


def test_by_header_needs_the_header_and_names_must_be_unique():
    (msg,) = problems(LIMIT.replace("by: principal", "by: header"))
    assert "spec.limits[0]: by: header needs header" in msg
    dup = LIMIT + "    - {name: per-caller, by: model, requestsPerMinute: 5}\n"
    (msg,) = problems(dup)
    assert "spec.limits[1]: limit 'per-caller' is declared twice" in msg


def test_a_bad_budget_window_and_a_negative_limit_point_at_their_fields():
    msgs = problems(
        LIMIT.replace(
            "tokensPerMinute: 1000", "tokensPerMinute: -1\n      budget: {tokens: 5, window: week}"
        )
    )
    assert any("spec.limits[0].tokensPerMinute" in m for m in msgs)
    assert any("spec.limits[0].budget.window" in m for m in msgs)


ROUTE = """\
apiVersion: weft.dev/v1alpha1
kind: ModelRoute
metadata: {name: models, namespace: ai}
spec:
  targetRefs: [{name: llm}]
  costRules:
    - {name: cheap, match: {maxPromptTokens: 100}, model: llama-8b}
  rules:
    - models: [llama-8b]
      backendRefs: [{name: vllm-8b, port: 8000}]
    - models: [llama-70b]
      backendRefs: [{name: vllm-70b, port: 8000}]
      fallback: [{model: llama-8b}]
"""


def test_fallbacks_and_cost_rules_must_name_a_routed_model():
    msgs = problems(
        ROUTE.replace("fallback: [{model: llama-8b}]", "fallback: [{model: gpt-5}]").replace(
            "model: llama-8b}", "model: tiny}"
        )
    )
    assert any("spec.costRules[0].model: no rule serves model 'tiny'" in m for m in msgs)
    assert any(
        "spec.rules[1].fallback[0].model: no rule serves fallback model 'gpt-5'" in m for m in msgs
    )


def test_a_fallback_is_a_model_or_a_backend_not_both():
    (msg,) = problems(
        ROUTE.replace("{model: llama-8b}]", "{model: llama-8b, backendRef: {name: x, port: 1}}]")
    )
    assert "spec.rules[1].fallback[0]: set exactly one of model or backendRef" in msg


SHED = """\
apiVersion: weft.dev/v1alpha1
kind: LoadShedding
metadata: {name: shed, namespace: ai}
spec:
  targetRefs: [{name: llm}]
  saturation: {queueDepth: 4}
  priorityClasses:
    - {name: high, value: 10, whenSaturated: Admit}
    - {name: low, value: 1, whenSaturated: Queue}
  defaultPriorityClass: medium
"""


def test_load_shedding_mistakes_name_their_fields():
    msgs = problems(SHED)
    assert any("spec.priorityClasses[1]: whenSaturated: Queue needs queue" in m for m in msgs)
    fixed = SHED.replace("whenSaturated: Queue}", "whenSaturated: Shed}")
    (msg,) = problems(fixed)
    assert "spec.defaultPriorityClass: 'medium' is not one of the priorityClasses" in msg


ROLLOUT = """\
apiVersion: weft.dev/v1alpha1
kind: Rollout
metadata: {name: llm, namespace: ai}
spec:
  targetRef: {name: llm}
  stable: {name: llm-v1, port: 8000}
  canary: {name: llm-v2, port: 8000}
  steps: [{weight: 10}, {weight: 5}]
  interval: 30s
  thresholds: {minSuccessRate: 101, maxP99Latency: soon}
"""


def test_rollout_mistakes_name_their_fields():
    msgs = problems(ROLLOUT)
    assert any("spec.thresholds.minSuccessRate" in m for m in msgs)
    assert any("spec.thresholds.maxP99Latency" in m and "is not a duration" in m for m in msgs)
    fixed = ROLLOUT.replace("minSuccessRate: 101, maxP99Latency: soon", "maxP99Latency: 2s")
    (msg,) = problems(fixed)
    assert "p.yaml:8: Rollout ai/llm: spec.steps[1].weight: step weights must rise" in msg


def test_cache_sizes_accept_quantities_and_refuse_an_entry_larger_than_the_cache():
    base = """\
apiVersion: weft.dev/v1alpha1
kind: ResponseCache
metadata: {name: c, namespace: ai}
spec: {targetRefs: [{name: embed}], maxBytes: 1Mi, maxEntryBytes: 2Mi}
"""
    (msg,) = problems(base)
    assert "maxEntryBytes must not be larger than maxBytes" in msg
    (r,) = parse_text(base.replace("2Mi", "64k"), "c.yaml").resources
    assert (r.spec.max_bytes, r.spec.max_entry_bytes) == (1024**2, 64_000)
