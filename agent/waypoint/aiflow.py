"""AI policy as stages of the waypoint's one request path (agent/waypoint/proxy.py).

The decisions are the sans-IO AI layer's (agent/waypoint/ai/). `AiFlow` is the per-waypoint
part (policies, the quota store, the load board, timers and scrapes of model servers);
`AiRequest` is one request's stage, which the proxy calls in the order docs/ai-traffic.md
gives:

    held body -> model request -> cache -> plan (model routing, cost rules, rollout split)
    -> for each target (the primary, then fallbacks): quota -> priority
       -> the engine's tries (pool admission, balancer or least-loaded pick among the
          endpoints outlier detection and health checks left, per-try timeout, retries)
    -> response head (answered-by headers) -> body through the usage reader
    -> charge, cache, canary, GenAI metrics

Nothing here opens a connection to a model for a request: every try is the engine's. A
stream is charged as it goes and cut for quota only with onExceed: truncate (`cut`);
otherwise it finishes and is charged at the end (the overshoot bound is in
docs/ai-traffic.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry

from agent.waypoint.ai.cache import BodyCollector
from agent.waypoint.ai.metrics import AiPolicyCollector, GenAIMetrics
from agent.waypoint.ai.openai import BadModelRequest, ModelRequest
from agent.waypoint.ai.policy import MAX_REQUEST_BODY, AiPolicies, ServiceAi, lists_models
from agent.waypoint.ai.priority import LoadBoard, backend_level, parse_vllm_metrics
from agent.waypoint.ai.quota import CHARGE_STEP, TokenLimiter
from agent.waypoint.ai.quotastore import QuotaStore, open_store
from agent.waypoint.ai.router import RoutePlan, Target
from agent.waypoint.ai.usage import ResponseReader
from agent.waypoint.codec import events as ev
from agent.waypoint.codec.headers import Headers
from agent.waypoint.downstream import Exchange
from agent.waypoint.engine.outcome import Failure
from agent.waypoint.engine.respond import Respond
from agent.waypoint.proxy import FAILURE_KIND, Body
from agent.waypoint.upstream import Endpoint, UpstreamError
from controller.model.workloads import workload_name, workload_version

if TYPE_CHECKING:
    from agent.waypoint.server import Waypoint

log = logging.getLogger("weft.waypoint.ai")

SCRAPE_EVERY = 2.0  # seconds between scrapes of model servers' /metrics (queue, KV cache)


class AiFlow:
    def __init__(self, wp: Waypoint, quota_store: str, registry: CollectorRegistry) -> None:
        self.wp = wp
        self.rng = random.Random()
        self.board = LoadBoard()
        self.quota_store = quota_store
        self._store: QuotaStore | None = None
        self.policies = AiPolicies()
        self.genai = GenAIMetrics(registry)
        registry.register(AiPolicyCollector(lambda: self.policies, lambda: self._store))
        self._waiters: dict[int, asyncio.Future[None]] = {}
        # Charges (store writes) run beside the request path; kept here until done, and
        # awaited by `close`.
        self._charges: set[asyncio.Task[Any]] = set()

    # ---- config, timers, scrapes -------------------------------------------------------

    def store(self) -> QuotaStore:
        if self._store is None:
            self._store = open_store(self.quota_store)
        return self._store

    def update(self, resources: Any, replicas: int = 1, nodes: int = 1) -> None:
        """A new config. `replicas`, `nodes`: how many replicas this waypoint has and on how
        many nodes: a TokenRateLimit served by several with a store they do not share is
        said to hold per replica (memory) or per node (SQLite), not silently."""
        limits = [r for r in resources if r.KIND == "TokenRateLimit"]
        store = self.store() if limits else None
        self.policies = AiPolicies.build(
            resources,
            store=store,
            board=self.board,
            rng=self.rng,
            now=time.time(),
            previous=self.policies,
        )
        split = None
        if store is not None and store.kind == "memory" and replicas > 1:
            split = f"{replicas} replicas and a per-replica quota store (memory)"
        elif store is not None and not store.shared and nodes > 1:
            split = f"replicas on {nodes} nodes and a per-node quota store ({store.kind})"
        if split is not None:
            for r in limits:
                self.policies.conflicts.append(
                    f"{r.key}: waypoint {self.wp.s.name} has {split}: each counts its own "
                    "budget; give every replica one shared store "
                    "(weft waypoint run --quota-store redis://HOST:6379)"
                )
        for c in self.policies.conflicts:
            log.warning("AI policy conflict: %s", c)

    def spawn_charge(self, lim: TokenLimiter, adm: Any, tokens: int, final: bool = True) -> Any:
        """Charge (or refund) beside the request path; returns the task."""
        task = asyncio.get_running_loop().create_task(
            lim.charge(adm, tokens, time.time(), final=final)
        )
        self._charges.add(task)
        task.add_done_callback(self._charges.discard)
        return task

    async def close(self) -> None:
        """Let the charges in flight reach the store, then close it."""
        if self._charges:
            await asyncio.wait(set(self._charges), timeout=2.0)
        for t in list(self._charges):
            t.cancel()
        if self._store is not None:
            await self._store.close()
            self._store = None

    async def run_timers(self) -> None:
        """Rollout checks, queue expiry, and scraping model servers for their load."""
        last_scrape = 0.0
        while True:
            await asyncio.sleep(0.25)
            now = time.time()
            for r in self.policies.rollouts():
                nxt = r.next_check()
                if nxt is not None and now >= nxt:
                    for e in r.tick(now):
                        log.info("rollout %s", e)
            for s in self.policies.shedders():
                for t in s.expire(now):
                    self._wake(t)
            if time.monotonic() - last_scrape >= SCRAPE_EVERY:
                last_scrape = time.monotonic()
                await self._scrape()

    async def _scrape(self) -> None:
        snap = self.wp.snapshot
        eps: dict[str, Endpoint] = {}
        for (ns, name), ai in self.policies.services.items():
            if ai.shedder is None and ai.balancer is None:
                continue
            for key in self._backends_of(ai, ns, name):
                svc = snap.services.get((key[0], key[1]))
                port = svc.port(key[2]) if svc else None
                if svc is None or port is None:
                    continue
                for w in snap.endpoints.get((key[0], key[1]), ()):
                    ep = self.wp.endpoint(w, port.target())
                    if ep is not None:
                        eps[ep.key] = ep

        async def one(ep: Endpoint) -> None:
            # A connection of its own (a new HBONE stream on the pooled TLS connection),
            # closed after: request traffic's pool limits count only request connections.
            up = None
            with contextlib.suppress(UpstreamError, TimeoutError, OSError, ValueError):
                async with asyncio.timeout(2):
                    up = await self.wp.upstream.dial(ep)
                    sid = up.start("GET", "/metrics", ep.key, Headers(), end_stream=True)
                    body = b""
                    async for e in up.events(sid):
                        if isinstance(e, ev.Data):
                            body += bytes(e.data)
                self.board.scraped(ep.key, parse_vllm_metrics(body), time.time())
            if up is not None:
                up.close()

        await asyncio.gather(*(one(ep) for ep in eps.values()))
        for s in self.policies.shedders():
            self._release(s)

    @staticmethod
    def _backends_of(ai: ServiceAi, ns: str, name: str) -> list[tuple[str, str, int]]:
        """Every backend a service's model routes can send to (their endpoints get scraped)."""
        if ai.route is None:
            return []
        keys = []
        for rule in ai.route.rules:
            for b in [
                *rule.backend_refs,
                *(f.backend_ref for f in rule.fallback if f.backend_ref is not None),
            ]:
                keys.append((b.namespace or ai.route.ns, b.name, b.port))
        return keys

    # ---- one request -------------------------------------------------------------------

    def request(
        self, x: Exchange, ai: ServiceAi, principal: str | None, caller_ns: str | None
    ) -> AiRequest:
        """The stage for one request to a Service with AI policy."""
        return AiRequest(self, x, ai, principal, caller_ns)

    def _release(self, shedder: Any) -> None:
        """Let the next queued request go if its backend has room now. One at a time: the
        one released counts toward its backend's level once its try starts, and it calls
        this again then (AiRequest.try_started), so a burst of room is filled request by
        request, each judged with the ones before it in flight."""
        now = time.time()
        board, sat = self.board, shedder.saturation
        t = shedder.pop_ready(lambda where: backend_level(sat, board, where, now))
        if t is not None:
            self._wake(t)

    def _wake(self, ticket: Any) -> None:
        fut = self._waiters.pop(id(ticket), None)
        if fut is not None and not fut.done():
            fut.set_result(None)


class AiRequest:
    """One request's AI stage; see agent/waypoint/proxy.py `Stage` for when each is called."""

    max_body = MAX_REQUEST_BODY

    def __init__(
        self,
        flow: AiFlow,
        x: Exchange,
        ai: ServiceAi,
        principal: str | None,
        caller_ns: str | None,
    ) -> None:
        self.flow = flow
        self.x = x
        self.ai = ai
        self.principal = principal
        self.caller_ns = caller_ns
        self.targets: list[Target] = []
        self.req: ModelRequest | None = None
        self.plan: RoutePlan | None = None
        self.facts: Any = None
        self.cache_key: bytes | None = None
        self.admissions: list[Any] = []
        self.endpoint: str | None = None  # the endpoint of the try in flight (load board)
        self.target: Target | None = None
        self.started = time.monotonic()
        self.reader: ResponseReader | None = None
        self.collector: BodyCollector | None = None
        self.status = 0
        self.upstream_headers: Headers | None = None
        self.strip = False
        self.charged_events = 0  # content events charged so far (a stream in progress)
        self.over: str | None = None  # the limit a progress charge took past its value
        self.cut_sent = False

    # ---- before the tries --------------------------------------------------------------

    def reads(self, target: str) -> bool:
        """Whether this request is one the stage reads (its body is then held for it)."""
        return self.ai.reads(self.x.head.method, target)

    def prepare(self, body: Body, fwd: Any) -> Respond | None:
        """Read the model request; answer from the cache, or plan the targets. Leaves
        `targets` empty for a request that is not an OpenAI operation."""
        x, ai = self.x, self.ai
        head = x.head
        path = fwd.target or head.target
        if ai.route is not None and lists_models(head.method, path):
            # The models this Service routes, not one backend's list (which would name only
            # that backend's models, under its own names).
            body_out = json.dumps(ai.route.model_list()).encode()
            return Respond(
                200, "ModelList", headers=((b"content-type", b"application/json"),), body=body_out
            )
        try:
            req = ai.read_request(head.method, path, head.headers, bytes(body.held))
        except BadModelRequest as e:
            return Respond(400, "BadRequest", str(e), param=e.param or "")
        if req is None:
            return None
        self.req = req
        self.facts = ai.facts(self.principal, self.caller_ns, path, head.headers, req)
        x.annotations.update({"model": req.model, "operation": req.operation})
        now = time.time()
        if ai.cache is not None:
            self.cache_key = ai.cache.key(req, self.facts)
            hit = ai.cache.lookup(self.cache_key, head.headers, now)
            if hit is not None:
                x.annotations["cache"] = "hit"
                return Respond(
                    hit.status, "CacheHit", headers=tuple(hit.reply_headers(now)), body=hit.body
                )
        rng = self.flow.rng
        if ai.route is not None:
            rollout = ai.rollout
            split = (lambda b: rollout.split(b, rng)) if rollout is not None else None
            plan = ai.route.plan(req, rng, split=split)
            if plan is None:
                return Respond(
                    404,
                    "ModelNotFound",
                    f"The model '{req.model}' does not exist",
                    param="model",
                )
            self.plan = plan
            self.targets = plan.targets
        else:
            # No ModelRoute: the Service's HTTPRoute chose the backend, as for any request.
            self.targets = [Target(req.model, fwd.backend.key, None, 0)]
        return None

    async def admit(self, target: Target, fwd: Any) -> Respond | None:
        """Token budgets, then priority and shedding, for one target."""
        ai, facts, req = self.ai, self.facts, self.req
        assert req is not None
        self._refund()
        facts.model = target.model
        facts.served = target.upstream_model
        self.target = target
        for lim in ai.limiters:
            adm = await lim.admit(facts, req.prompt_tokens, time.time())
            self.admissions.append((lim, adm))
            if not adm.allowed:
                self._refund()
                self.x.annotations["quota"] = "denied"
                code = "RateLimited" if adm.status == 429 else "QuotaStoreUnavailable"
                if adm.status != 429:
                    # The store's address and error are for the operator, not the caller.
                    log.warning("%s: failOpen is false: %s", lim.name, adm.store_error)
                message = adm.message() or "token quota store unavailable; try again later"
                return Respond(adm.status, code, message, headers=tuple(adm.headers))
        shedder = ai.shedder
        if shedder is None:
            return None
        cls = shedder.classify(facts)
        keys = [e.address for e in fwd.backend.endpoints]
        level = backend_level(shedder.saturation, self.flow.board, keys, time.time())
        verdict = shedder.admit(cls, level, time.time(), keys)
        if verdict.action == "queue" and verdict.ticket is not None:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self.flow._waiters[id(verdict.ticket)] = fut
            try:
                # The request's deadline (timeouts.request) bounds its time in the queue too.
                async with asyncio.timeout(fwd.remaining()):
                    await fut
            except (TimeoutError, asyncio.CancelledError) as e:
                shedder.cancel(verdict.ticket)
                self.flow._waiters.pop(id(verdict.ticket), None)
                self._refund()
                if not isinstance(e, TimeoutError):
                    raise
                self.x.annotations["shed"] = verdict.priority_class
                return fwd.failure_response(Failure.TIMEOUT)
            if verdict.ticket.state != "admitted":
                verdict = shedder.shed_verdict(verdict.ticket)
        if verdict.action == "shed":
            self._refund()
            self.x.annotations["shed"] = verdict.priority_class
            return Respond(
                verdict.status, "Shed", f"shed: {verdict.reason}", headers=tuple(verdict.headers)
            )
        return None

    def falls_back(self, kind: str) -> bool:
        return self.plan is not None and self.plan.falls_back_on(kind)  # type: ignore[arg-type]

    def picker(self, target: Target, backend: Any) -> Any:
        """Least-loaded or KV-affine choice among the endpoints the engine offers."""
        balancer, route = self.ai.balancer, self.ai.route
        if balancer is None:
            return None
        affinity = None
        if route is not None and route.affinity_header:
            affinity = self.x.head.headers.get(route.affinity_header)

        def pick(available: list[Any]) -> Any:
            chosen = balancer.pick([e.address for e in available], time.time(), affinity=affinity)
            return next(e for e in available if e.address == chosen)

        return pick

    def body_for(self, target: Target, body: Body) -> Body:
        """The body this target's backend gets (its model name, usage asked for)."""
        assert self.req is not None
        data, self.strip = self.req.upstream_body(target.upstream_model)
        if data is self.req.raw:
            return body
        return Body(bytearray(data), complete=True)

    def headers_for(self, target: Target, headers: Headers, body: Body) -> Headers:
        h = headers.copy()
        h.set(b"content-length", str(len(body.held)).encode())
        h.remove(b"accept-encoding")  # the usage reader reads the body
        return h

    def try_started(self, endpoint: str) -> None:
        board = self.flow.board
        if self.endpoint is not None:
            board.finished(self.endpoint)
        self.endpoint = endpoint
        board.started(endpoint)
        self.x.annotations["endpoint"] = endpoint
        shedder = self.ai.shedder
        if shedder is not None:
            # This request now counts toward its backend's level: the next queued one may
            # be judged against it (_release lets queued requests go one at a time).
            self.flow._release(shedder)

    def failed(self, target: Target, outcome: int) -> None:
        """This target's tries failed: count it as a failed model request
        (gen_ai_server_request_duration's error.type), give back what it holds, tell the
        canary."""
        if self.req is not None:
            self.flow.genai.record(
                operation=self.req.operation,
                request_model=self.req.model,
                response_model=None,
                duration=time.monotonic() - self.started,
                destination=self._workload_of(self.endpoint),
                # A status for a failed answer; -1 (CONNECT_FAILURE) is also a mesh answer
                # given up on.
                error_type=FAILURE_KIND.get(outcome, str(outcome)),
            )
        self.abandoned()
        if self.ai.rollout is not None:
            self.ai.rollout.observe(target.backend, False, time.monotonic() - self.started)

    def abandoned(self) -> None:
        """The request ended before an answer streamed: what it still holds (a reservation,
        an endpoint in flight) is given back and nothing is observed (a caller hanging up
        says nothing about the backend: no canary failure, no fallback). Idempotent: after
        failed() or a refusal there is nothing left to give back."""
        self._refund()
        self._done_with_endpoint()
        if self.ai.shedder is not None:
            self.flow._release(self.ai.shedder)

    # ---- the answer --------------------------------------------------------------------

    def response_head(self, target: Target, status: int, upstream: Headers, out: Headers) -> None:
        ai = self.ai
        self.status = status
        self.upstream_headers = upstream
        # First: from here on the backend has answered, and finish() charges for it
        # whatever fails below.
        self.reader = ResponseReader(
            self.started, upstream.get(b"content-type"), strip_usage=self.strip
        )
        set_: list[tuple[bytes, bytes]] = []
        if ai.route is not None:
            set_ += ai.route.answered(target)
        for _lim, adm in self.admissions:
            set_ += adm.headers
        out.update(set_)  # as set() for each, in one pass
        cache = ai.cache
        if cache is not None and self.cache_key is not None and cache.storable(status, upstream):
            self.collector = BodyCollector(cache.max_entry)
        if self.strip:
            out.remove(b"content-length")  # the injected usage chunk is taken out

    def feed(self, data: bytes) -> bytes:
        if self.collector is not None:
            self.collector.feed(data)
        reader = self.reader
        assert reader is not None
        out = reader.feed(data, time.monotonic())
        if reader.content_events >= self.charged_events + CHARGE_STEP and self.admissions:
            self._charge_progress()
        return out

    def _charge_progress(self) -> None:
        """A stream in progress: charge what it has used so far (its prompt estimate and a
        token per content event), so other admissions see it now; with onExceed: truncate,
        a charge that takes a limit past its value cuts the stream (`cut`)."""
        assert self.reader is not None and self.req is not None
        self.charged_events = self.reader.content_events
        total = self.req.prompt_tokens + self.charged_events
        for lim, adm in self.admissions:
            if not adm.allowed:
                continue
            task = self.flow.spawn_charge(lim, adm, total, final=False)
            if lim.truncate:
                task.add_done_callback(lambda t, lim=lim: self._over(t, lim))

    def _over(self, task: asyncio.Task[bool], lim: TokenLimiter) -> None:
        if not task.cancelled() and task.exception() is None and task.result():
            self.over = self.over or lim.name

    def cut(self) -> bytes | None:
        """The event that ends a stream cut for its token limit (onExceed: truncate), once;
        None: carry on."""
        if not self.over or self.cut_sent or self.reader is None or not self.reader.sse:
            return None
        self.cut_sent = True
        self.x.annotations["quota"] = "truncated"
        err = {
            "error": {
                "message": f"token limit {self.over} reached while streaming; "
                "the answer was truncated",
                "type": "tokens",
                "param": None,
                "code": "rate_limit_exceeded",
            }
        }
        return b"data: " + json.dumps(err).encode() + b"\n\n"

    def end(self) -> bytes:
        assert self.reader is not None
        return self.reader.end(time.monotonic())

    def finish(self, ok: bool) -> None:
        """The answer is over (or cut): charge, cache, canary, GenAI metrics."""
        ai, req, reader, target = self.ai, self.req, self.reader, self.target
        answered_by = self.endpoint
        self._done_with_endpoint()
        if ai.shedder is not None:
            self.flow._release(ai.shedder)
        if req is None or reader is None or target is None:
            return
        success = 200 <= self.status < 300
        # A 2xx answer is charged even when it was cut (the caller went away, the backend
        # reset, onExceed: truncate): what it used, or at least its reservation, never 0, so
        # hanging up before the end is not a way to use tokens for free.
        billable = success
        ok = ok and success
        usage = reader.usage_or_estimate(req.prompt_tokens)
        for lim, adm in self.admissions:
            if adm.allowed:
                # An answer that is not a success consumed no budget: its reservation is
                # given back (charged 0), as for a target that failed before answering.
                used = usage.total_tokens if ok else max(usage.total_tokens, req.prompt_tokens)
                self.flow.spawn_charge(lim, adm, used if billable else 0)
        self.admissions = []
        now = time.time()
        if ok and self.collector is not None and self.cache_key is not None and ai.cache:
            body = self.collector.body()
            if body is not None and self.upstream_headers is not None:
                ai.cache.store(self.cache_key, self.status, self.upstream_headers, body, now)
        elapsed = time.monotonic() - self.started
        if ai.rollout is not None:
            ai.rollout.observe(target.backend, ok, elapsed, reader.ttft)
        self.flow.genai.record(
            operation=req.operation,
            request_model=req.model,
            response_model=reader.model,
            duration=elapsed,
            usage=usage,
            ttft=reader.ttft,
            tpot=reader.tpot,
            destination=self._workload_of(answered_by),
            error_type="" if ok else str(self.status),
        )
        ctype = (self.upstream_headers or Headers()).get(b"content-type") or b""
        self.x.annotations.update(
            {
                "modelServed": reader.model or target.model,
                "tokens": usage.total_tokens,
                "promptTokens": usage.prompt_tokens,
                "completionTokens": usage.completion_tokens,
                "ttftMs": round(reader.ttft * 1000, 2) if reader.ttft else None,
                "streamed": self.strip or ctype.startswith(b"text/event-stream"),
            }
        )

    def _refund(self) -> None:
        for lim, adm in self.admissions:
            if adm.allowed:
                self.flow.spawn_charge(lim, adm, 0)
        self.admissions = []

    def _workload_of(self, endpoint: str | None) -> tuple[str, str, str]:
        w = None
        if endpoint is not None:
            w = self.flow.wp.snapshot.workloads_by_ip.get(endpoint.rsplit(":", 1)[0].strip("[]"))
        if w is None:
            return ("unknown", "unknown", "unknown")
        return (workload_name(w), w.namespace, workload_version(w))

    def _done_with_endpoint(self) -> None:
        if self.endpoint is not None:
            self.flow.board.finished(self.endpoint)
            self.endpoint = None
