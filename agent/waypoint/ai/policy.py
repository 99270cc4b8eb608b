"""The AI policies of each Service, compiled once per config and looked up per request.

`AiPolicies.build(resources, ...)` runs when the config changes; `for_service(ns, name)` is
one dict lookup per request and returns None for a Service without AI policy, which is the
whole cost of this package on the common path. A rebuild keeps the state of policies whose
spec did not change (cache entries, queued requests, a rollout's progress).

When several policies of one kind target a Service: every TokenRateLimit applies (a request
must pass them all); of the others the first by namespace/name wins and the rest are
reported in `conflicts`.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from agent.waypoint.ai.balance import ModelBalancer
from agent.waypoint.ai.cache import ResponseCacheStore
from agent.waypoint.ai.canary import CanaryAnalysis
from agent.waypoint.ai.facts import RequestFacts
from agent.waypoint.ai.openai import (
    MODEL_HEADER,
    TIER_HEADER,
    ModelRequest,
    operation_of,
    parse_request,
)
from agent.waypoint.ai.priority import LoadBoard, LoadShedder
from agent.waypoint.ai.quota import TokenLimiter
from agent.waypoint.ai.quotastore import QuotaStore
from agent.waypoint.ai.router import ModelRouter
from agent.waypoint.codec.headers import Headers
from controller.model.ai import (
    LoadShedding,
    ModelRoute,
    ResponseCache,
    Rollout,
    RolloutState,
    ServiceRef,
    TokenRateLimit,
    rollout_generation,
)
from controller.model.base import Resource

ServiceKey = tuple[str, str]  # namespace, name
# The largest request body the waypoint buffers to read the model: a 128k-token prompt is
# about 0.5 MiB of text, and multimodal parts (base64 images) make bodies of several MiB.
MAX_REQUEST_BODY = 16 * 1024 * 1024


def lists_models(method: str, target: str) -> bool:
    """A request for the model list (GET /v1/models), which a ModelRoute answers itself."""
    return method in ("GET", "HEAD") and target.split("?", 1)[0].rstrip("/") in (
        "/v1/models",
        "/models",
    )


@dataclass
class ServiceAi:
    """Everything AI that applies to one Service."""

    service: ServiceKey
    route: ModelRouter | None = None
    limiters: list[TokenLimiter] = field(default_factory=list)
    shedder: LoadShedder | None = None
    cache: ResponseCacheStore | None = None
    rollout: CanaryAnalysis | None = None
    balancer: ModelBalancer | None = None

    @property
    def model_header(self) -> bytes:
        return self.route.model_header if self.route else MODEL_HEADER

    @property
    def tier_header(self) -> bytes:
        return self.route.tier_header if self.route else TIER_HEADER

    def reads(self, method: str, path: str) -> bool:
        """Whether the AI stage reads this request (an OpenAI operation, or the model list a
        ModelRoute answers): decided from the head, before any body is held. Anything
        else passes with no AI policy, its body streamed (a gRPC call, an upload)."""
        return operation_of(method, path) is not None or (
            self.route is not None and lists_models(method, path)
        )

    def read_request(
        self, method: str, path: str, headers: Headers, body: bytes
    ) -> ModelRequest | None:
        """The model request, or None when this is not an OpenAI operation (it then passes
        with no AI policy). Raises BadModelRequest (answer 400) for a broken body."""
        op = operation_of(method, path)
        if op is None:
            return None
        return parse_request(
            op, headers, body, model_header=self.model_header, tier_header=self.tier_header
        )

    @staticmethod
    def facts(
        principal: str | None,
        namespace: str | None,
        path: str,
        headers: Headers,
        req: ModelRequest | None,
    ) -> RequestFacts:
        return RequestFacts(
            principal or "",
            namespace or "",
            req.model if req is not None else None,
            path.split("?", 1)[0],
            headers,
        )


def _targets(res: Resource, refs: Iterable[ServiceRef]) -> list[ServiceKey]:
    return [(r.namespace or res.namespace, r.name) for r in refs]


@dataclass
class AiPolicies:
    services: dict[ServiceKey, ServiceAi] = field(default_factory=dict)
    conflicts: list[str] = field(default_factory=list)
    # Compiled policies by resource key and spec, reused across rebuilds.
    _compiled: dict[tuple[str, str, str], tuple[Any, Any]] = field(default_factory=dict)

    def for_service(self, namespace: str, name: str) -> ServiceAi | None:
        return self.services.get((namespace, name))

    @classmethod
    def build(
        cls,
        resources: Iterable[Resource],
        *,
        store: QuotaStore | None,
        board: LoadBoard,
        rng: random.Random,
        now: float,
        previous: AiPolicies | None = None,
    ) -> AiPolicies:
        """Compile every AI resource; `previous` lends the state of unchanged policies.
        `store` may be None only when no TokenRateLimit is configured."""
        out = cls()
        old = previous._compiled if previous is not None else {}

        def reuse(res: Resource, make: Any) -> Any:
            k = (res.KIND, res.namespace, res.name)
            spec = getattr(res, "spec", None)
            hit = old.get(k)
            obj = hit[1] if hit is not None and hit[0] == spec else make()
            out._compiled[k] = (spec, obj)
            return obj

        def svc(key: ServiceKey) -> ServiceAi:
            s = out.services.get(key)
            if s is None:
                s = out.services[key] = ServiceAi(key)
            return s

        ordered = sorted(resources, key=lambda r: (r.KIND, r.namespace, r.name))
        states = {(r.namespace, r.name): r for r in ordered if isinstance(r, RolloutState)}
        for res in ordered:
            if isinstance(res, TokenRateLimit):
                if store is None:
                    out.conflicts.append(f"{res.key}: no quota store configured; not enforced")
                    continue
                lim = reuse(res, lambda r=res, st=store: TokenLimiter(r, st))
                for k in _targets(res, res.spec.target_refs):
                    svc(k).limiters.append(lim)
            elif isinstance(res, ModelRoute):
                router = reuse(res, lambda r=res: ModelRouter(r))
                for k in _targets(res, res.spec.target_refs):
                    s = svc(k)
                    if s.route is not None:
                        out.conflicts.append(f"{res.key}: {k[0]}/{k[1]} already has a ModelRoute")
                        continue
                    s.route = router
                    if router.least_loaded:
                        s.balancer = ModelBalancer(
                            board, rng, max_load_factor=router.max_load_factor
                        )
            elif isinstance(res, LoadShedding):
                shedder = reuse(res, lambda r=res: LoadShedder(r))
                for k in _targets(res, res.spec.target_refs):
                    s = svc(k)
                    if s.shedder is not None:
                        out.conflicts.append(f"{res.key}: {k[0]}/{k[1]} already has one")
                        continue
                    s.shedder = shedder
            elif isinstance(res, ResponseCache):
                cache = reuse(res, lambda r=res: ResponseCacheStore(r))
                for k in _targets(res, res.spec.target_refs):
                    s = svc(k)
                    if s.cache is not None:
                        out.conflicts.append(f"{res.key}: {k[0]}/{k[1]} already has one")
                        continue
                    s.cache = cache
            elif isinstance(res, Rollout):
                ca = reuse(res, lambda r=res: CanaryAnalysis(r, now, random.Random(rng.random())))
                if res.spec.analysis.provider == "prometheus":
                    # The controller judges; this replica applies its latest decision
                    # (none yet: the first step, as the controller starts it).
                    ca.following = True
                    st = states.get((res.namespace, res.name))
                    if st is not None and st.spec.generation == rollout_generation(res):
                        ca.follow(st.spec)
                (k,) = _targets(res, [res.spec.target_ref])
                s = svc(k)
                if s.rollout is not None:
                    out.conflicts.append(f"{res.key}: {k[0]}/{k[1]} already has a Rollout")
                    continue
                s.rollout = ca
        return out

    # For the metrics collector and the admin API.
    def _each(self, attr: str) -> Iterator[Any]:
        seen: set[int] = set()
        for s in self.services.values():
            objs = getattr(s, attr)
            for o in objs if isinstance(objs, list) else [objs]:
                if o is not None and id(o) not in seen:
                    seen.add(id(o))
                    yield o

    def limiters(self) -> Iterator[TokenLimiter]:
        return self._each("limiters")

    def caches(self) -> Iterator[ResponseCacheStore]:
        return self._each("cache")

    def shedders(self) -> Iterator[LoadShedder]:
        return self._each("shedder")

    def rollouts(self) -> Iterator[CanaryAnalysis]:
        return self._each("rollout")
