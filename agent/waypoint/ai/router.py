"""Model routing (ModelRoute): which backend serves a request, under which model name, and
what to try next when it fails.

`ModelRouter.plan(request, rng)` returns a `RoutePlan`: the cost rule that applied (if any)
and the ordered targets, the primary first, then the rule's fallback chain. Each `Target`
says which model the client gets (`model`, reported in x-weft-model-served), the backend
Service, and the name to write into the body for that backend (`upstream_model`).

The shell tries targets in order. It moves on only when the failure is one `fallbackOn`
lists (`plan.falls_back_on(kind)`) and nothing of the response has reached the client yet;
a stream that has started is never switched.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

from agent.waypoint.ai.openai import ModelRequest
from controller.model.ai import (
    CostRule,
    FallbackOn,
    ModelBackend,
    ModelRoute,
    ModelRule,
    pattern_matches,
)

BackendKey = tuple[str, str, int]  # namespace, Service, port
MODEL_SERVED = b"x-weft-model-served"  # response: the model that answered
FALLBACK_HEADER = b"x-weft-fallback"  # response: how many targets failed before it


@dataclass(frozen=True, slots=True)
class Target:
    model: str | None  # the model as the client sees it
    backend: BackendKey
    upstream_model: str | None  # the body's model for this backend; None: unchanged
    step: int  # 0: the primary; n: the nth fallback


@dataclass(slots=True)
class RoutePlan:
    requested: str | None  # what the client asked for
    targets: list[Target]
    cost_rule: str | None = None
    fallback_on: frozenset[str] = field(default_factory=frozenset)

    def falls_back_on(self, kind: FallbackOn) -> bool:
        return kind in self.fallback_on


def failure_kind(status: int) -> FallbackOn | None:
    """The fallbackOn condition a response status is, if any."""
    if status == 429:
        return "429"
    if 500 <= status <= 599:
        return "5xx"
    return None


def _weighted(backends: list[ModelBackend], rng: random.Random) -> ModelBackend:
    live = [b for b in backends if b.weight > 0]
    if len(live) == 1:
        return live[0]
    total = sum(b.weight for b in live)
    x = rng.random() * total
    for b in live:
        x -= b.weight
        if x < 0:
            return b
    return live[-1]


class _Cost:
    __slots__ = (
        "max_max",
        "max_prompt",
        "min_max",
        "min_prompt",
        "model",
        "models",
        "name",
        "tiers",
    )

    def __init__(self, c: CostRule) -> None:
        m = c.match
        self.name, self.model = c.name, c.model
        self.models = m.models
        self.tiers = frozenset(m.tiers) if m.tiers else None
        self.min_prompt, self.max_prompt = m.min_prompt_tokens, m.max_prompt_tokens
        self.min_max, self.max_max = m.min_max_tokens, m.max_max_tokens

    def matches(self, r: ModelRequest) -> bool:
        if self.models is not None and (
            r.model is None or not any(pattern_matches(p, r.model) for p in self.models)
        ):
            return False
        if self.tiers is not None and r.tier not in self.tiers:
            return False
        if self.min_prompt is not None and r.prompt_tokens < self.min_prompt:
            return False
        if self.max_prompt is not None and r.prompt_tokens > self.max_prompt:
            return False
        if self.max_max is not None and (r.max_tokens is None or r.max_tokens > self.max_max):
            return False
        return not (self.min_max is not None and (r.max_tokens or 0) < self.min_max)


class ModelRouter:
    def __init__(self, route: ModelRoute) -> None:
        self.route = route
        spec = route.spec
        self.ns = route.namespace
        self.costs = [_Cost(c) for c in spec.cost_rules]
        self.rules = spec.rules
        self.fallback_on = frozenset(spec.fallback_on)
        self.model_header = spec.model_header.lower().encode()
        self.tier_header = spec.tier_header.lower().encode()
        self.affinity_header = (
            spec.session_affinity.header.lower().encode() if spec.session_affinity else None
        )
        self.max_load_factor = (
            spec.session_affinity.max_load_factor if spec.session_affinity else 1.25
        )
        self.least_loaded = spec.endpoint_picker == "LeastLoaded"
        self.served: dict[str, int] = {}  # model served -> requests (for metrics)

    def _rule(self, model: str | None) -> ModelRule | None:
        return next((r for r in self.rules if r.serves(model)), None)

    def _target(self, model: str | None, b: ModelBackend, step: int) -> Target:
        key = (b.namespace or self.ns, b.name, b.port)
        return Target(model, key, b.model_name or model, step)

    def plan(
        self,
        r: ModelRequest,
        rng: random.Random,
        split: Callable[[BackendKey], BackendKey] | None = None,
    ) -> RoutePlan | None:
        """The targets for one request; None when no rule serves its model (answer 404
        `model_not_found`, as an OpenAI server does). `split` may replace the primary's
        backend (a Rollout moving traffic from a stable backend to its canary)."""
        model = r.model
        cost_rule = None
        for c in self.costs:
            if c.matches(r):
                model, cost_rule = c.model, c.name
                break
        rule = self._rule(model)
        if rule is None:
            return None
        primary = self._target(model, _weighted(rule.backend_refs, rng), 0)
        if split is not None:
            moved = split(primary.backend)
            if moved != primary.backend:
                primary = Target(primary.model, moved, primary.upstream_model, 0)
        targets = [primary]
        for i, f in enumerate(rule.fallback, start=1):
            if f.backend_ref is not None:
                targets.append(self._target(model, f.backend_ref, i))
                continue
            fr = self._rule(f.model)
            if fr is not None:  # validation guarantees one; config may race
                targets.append(self._target(f.model, _weighted(fr.backend_refs, rng), i))
        return RoutePlan(r.model, targets, cost_rule, self.fallback_on)

    def model_list(self) -> dict[str, object]:
        """OpenAI's `GET /v1/models` answer for the Service: every model a rule names
        exactly (patterns cannot be listed), each with the backends that serve it, in
        routing order (the first rule that serves a model wins, as in `plan`)."""
        data: list[dict[str, object]] = []
        seen: set[str] = set()
        for rule in self.rules:
            for m in rule.models:
                if "*" in m or m in seen or self._rule(m) is not rule:
                    continue
                seen.add(m)
                data.append(
                    {
                        "id": m,
                        "object": "model",
                        "created": 0,
                        "owned_by": f"{self.ns}/{self.route.name}",
                        "backends": [
                            {
                                "service": f"{b.namespace or self.ns}/{b.name}:{b.port}",
                                "model": b.model_name or m,
                                "weight": b.weight,
                            }
                            for b in rule.backend_refs
                        ],
                    }
                )
        return {"object": "list", "data": data}

    def answered(self, target: Target) -> list[tuple[bytes, bytes]]:
        """Response headers saying which model answered, and after how many failures."""
        model = target.model or ""
        self.served[model] = self.served.get(model, 0) + 1
        out = [(MODEL_SERVED, model.encode())]
        if target.step:
            out.append((FALLBACK_HEADER, str(target.step).encode()))
        return out
