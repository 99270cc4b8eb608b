"""Requests to Services with AI policy: models, tokens, budgets, priority, cache, fallback.

The decisions are the sans-IO AI layer's (agent/waypoint/ai/); this module is the I/O
around them, in the order docs/ai-traffic.md gives:

    body -> model request -> cache -> plan (model routing, cost rules, rollout split)
    -> for each target (the primary, then fallbacks): quota -> priority -> endpoint
       -> send (model rewrite, usage injection) -> response head (fallback on failure)
    -> stream the body through the usage reader -> charge, cache, canary, GenAI metrics

A started stream is never cut for quota: it finishes and is charged at the end (the
overshoot bound is in docs/ai-traffic.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry

from agent.waypoint.ai.cache import BodyCollector
from agent.waypoint.ai.metrics import AiPolicyCollector, GenAIMetrics
from agent.waypoint.ai.openai import BadModelRequest, error_body
from agent.waypoint.ai.policy import MAX_REQUEST_BODY, AiPolicies, ServiceAi
from agent.waypoint.ai.priority import LoadBoard, backend_level, parse_vllm_metrics
from agent.waypoint.ai.quota import QuotaStore
from agent.waypoint.ai.router import Target, failure_kind
from agent.waypoint.ai.usage import ResponseReader
from agent.waypoint.codec import events as ev
from agent.waypoint.codec.headers import Headers
from agent.waypoint.downstream import Exchange
from agent.waypoint.engine.respond import Respond
from agent.waypoint.proxy import hold_body
from agent.waypoint.upstream import Endpoint, UpstreamError

if TYPE_CHECKING:
    from agent.waypoint.server import Waypoint

log = logging.getLogger("weft.waypoint.ai")

SCRAPE_EVERY = 2.0  # seconds between scrapes of model servers' /metrics (queue, KV cache)
HEAD_TIMEOUT = 300.0  # seconds to a model's response head (a long prompt's prefill)
STREAM_IDLE = 120.0  # seconds without a byte before a model stream counts as stalled


class AiFlow:
    def __init__(self, wp: Waypoint, quota_path: Path | None, registry: CollectorRegistry) -> None:
        self.wp = wp
        self.rng = random.Random()
        self.board = LoadBoard()
        self.quota_path = quota_path
        self._store: QuotaStore | None = None
        self.policies = AiPolicies()
        self.genai = GenAIMetrics(registry)
        registry.register(AiPolicyCollector(lambda: self.policies))
        self._waiters: dict[int, asyncio.Future[None]] = {}

    # ---- config, timers, scrapes -------------------------------------------------------

    def store(self) -> QuotaStore:
        if self._store is None:
            path = self.quota_path or Path(":memory:")
            if str(path) != ":memory:":
                path.parent.mkdir(parents=True, exist_ok=True)
            self._store = QuotaStore(path)
        return self._store

    def update(self, resources: Any) -> None:
        needs_store = any(r.KIND == "TokenRateLimit" for r in resources)
        self.policies = AiPolicies.build(
            resources,
            store=self.store() if needs_store else None,
            board=self.board,
            rng=self.rng,
            now=time.time(),
            previous=self.policies,
        )
        for c in self.policies.conflicts:
            log.warning("AI policy conflict: %s", c)

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
            with contextlib.suppress(UpstreamError, TimeoutError, OSError, ValueError):
                up = await asyncio.wait_for(self.wp.upstream.acquire(ep, "0.0.0.0"), 2)
                sid = up.start("GET", "/metrics", ep.key, Headers(), end_stream=True)
                body = b""
                async for e in up.events(sid):
                    if isinstance(e, ev.Data):
                        body += bytes(e.data)
                self.wp.upstream.release_conn(up)
                self.board.scraped(ep.key, parse_vllm_metrics(body), time.time())

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

    async def handle(
        self,
        x: Exchange,
        ai: ServiceAi,
        headers: Headers,
        principal: str | None,
        caller_ns: str | None,
        forward_plain: Callable[[Any], Any],
        route_backend: Callable[[], tuple[str, str, int] | Respond],
    ) -> str:
        """Serve one request under `ai`; returns response flags for the access log.

        `forward_plain(held_body)` serves a request that is not an OpenAI operation;
        `route_backend()` is the Service's own routing decision when no ModelRoute applies."""
        head = x.head
        body = await hold_body(x, MAX_REQUEST_BODY)
        if not body.complete:
            x.local_reply(413, error_body(413, "request body too large for model routing"), _json())
            return "-"
        try:
            req = ai.read_request(head.method, head.target, headers, bytes(body.held))
        except BadModelRequest as e:
            x.local_reply(400, error_body(400, str(e), param=e.param), _json())
            return "-"
        if req is None:  # not an OpenAI operation: plain routing, with the held body
            return str(await forward_plain(body))
        facts = ai.facts(principal, caller_ns, head.target, headers, req)
        now = time.time()
        x.annotations.update({"model": req.model, "operation": req.operation})
        cache_key = ai.cache.key(req, facts) if ai.cache is not None else None
        if ai.cache is not None:
            hit = ai.cache.lookup(cache_key, headers, now)
            if hit is not None:
                h = Headers()
                for hk, hv in hit.reply_headers(now):
                    h.add(hk, hv)
                x.local_reply(hit.status, hit.body, h)
                x.annotations["cache"] = "hit"
                return "-"
        split = None
        if ai.rollout is not None:
            rollout = ai.rollout
            split = lambda b: rollout.split(b, self.rng)  # noqa: E731
        if ai.route is not None:
            plan = ai.route.plan(req, self.rng, split=split)
            if plan is None:
                x.local_reply(
                    404,
                    error_body(
                        404, f"The model '{req.model}' does not exist", code="model_not_found"
                    ),
                    _json(),
                )
                return "NR"
            targets = plan.targets
        else:
            # No ModelRoute: the Service's HTTPRoutes (canary splits, header matches) choose
            # the backend, exactly as for a request without AI policy.
            plan = None
            chosen = route_backend()
            if isinstance(chosen, Respond):
                self.wp.proxy.reply(x, chosen)
                return "NR"
            targets = [Target(req.model, chosen, None, 0)]
        last_status, last_body, last_headers = 503, b"", Headers()
        for i, target in enumerate(targets):
            more = i + 1 < len(targets)
            facts.model = target.model
            admissions = []
            denied = None
            for lim in ai.limiters:
                adm = lim.admit(facts, req.prompt_tokens, time.time())
                admissions.append((lim, adm))
                if not adm.allowed:
                    denied = adm
                    break
            if denied is not None:
                self._refund(admissions)
                if more and plan is not None and plan.falls_back_on("over-quota"):
                    continue
                h = Headers()
                for hk, hv in denied.headers:
                    h.add(hk, hv)
                x.local_reply(denied.status, error_body(denied.status, denied.message()), _json(h))
                x.annotations["quota"] = "denied"
                return "RL"
            eps = self._endpoints(target.backend)
            if ai.shedder is not None:
                cls = ai.shedder.classify(facts)
                level = backend_level(
                    ai.shedder.saturation, self.board, [e.key for e in eps], time.time()
                )
                verdict = ai.shedder.admit(cls, level, time.time())
                if verdict.action == "queue" and verdict.ticket is not None:
                    fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                    self._waiters[id(verdict.ticket)] = fut
                    try:
                        await fut
                    except asyncio.CancelledError:
                        ai.shedder.cancel(verdict.ticket)
                        raise
                    if verdict.ticket.state != "admitted":
                        verdict = ai.shedder.shed_verdict(verdict.ticket)
                if verdict.action == "shed" or (
                    verdict.action == "queue"
                    and verdict.ticket is not None
                    and verdict.ticket.state != "admitted"
                ):
                    self._refund(admissions)
                    h = Headers()
                    for k, val in verdict.headers:
                        h.add(k, val)
                    x.local_reply(
                        verdict.status,
                        error_body(verdict.status, f"shed: {verdict.reason}"),
                        _json(h),
                    )
                    x.annotations["shed"] = verdict.priority_class
                    return "SH"
            if not eps:
                self._refund(admissions)
                last_status, last_body = 503, error_body(503, "no ready model endpoint")
                if more and plan is not None and plan.falls_back_on("connect-failure"):
                    continue
                break
            affinity = None
            if ai.route is not None and ai.route.affinity_header:
                affinity = headers.get(ai.route.affinity_header)
            if ai.balancer is not None:
                picked = ai.balancer.pick([e.key for e in eps], time.time(), affinity=affinity)
                ep = next(e for e in eps if e.key == picked)
            else:
                ep = self._engine_pick(target.backend, eps)
            upstream_body, strip = req.upstream_body(target.upstream_model)
            h = headers.copy()
            h.set(b"content-length", str(len(upstream_body)).encode())
            h.remove(b"accept-encoding")
            self.board.started(ep.key)
            x.annotations["endpoint"] = ep.key
            started = time.monotonic()
            outcome = await self._send(x, ep, h, upstream_body)
            if outcome.error is not None or failure_kind(outcome.status) is not None:
                self.board.finished(ep.key)
                self._refund(admissions)
                kind = "connect-failure" if outcome.error else failure_kind(outcome.status)
                if ai.rollout is not None:
                    ai.rollout.observe(target.backend, False, time.monotonic() - started)
                if more and plan is not None and kind and plan.falls_back_on(kind):
                    await outcome.discard()
                    x.annotations.setdefault("fallbacks", []).append(target.model)
                    continue
                if outcome.error is not None:
                    last_status, last_body = 503, error_body(503, outcome.error)
                    break
            # The answer: stream it through the usage reader.
            try:
                return await self._answer(
                    x, ai, req, target, ep, outcome, admissions, strip, started, cache_key
                )
            finally:
                self.board.finished(ep.key)
                if ai.shedder is not None:
                    self._release(ai.shedder)
        x.local_reply(last_status, last_body, _json(last_headers))
        return "UH"

    def _endpoints(self, backend: tuple[str, str, int]) -> list[Endpoint]:
        snap = self.wp.snapshot
        svc = snap.services.get((backend[0], backend[1]))
        port = svc.port(backend[2]) if svc else None
        if svc is None or port is None:
            return []
        out = []
        for w in snap.endpoints.get((backend[0], backend[1]), ()):
            ep = self.wp.endpoint(w, port.target())
            if ep is not None:
                out.append(ep)
        return out

    def _engine_pick(self, backend: tuple[str, str, int], eps: list[Endpoint]) -> Endpoint:
        b = self.wp.engine.backend(backend)
        if b is not None:
            att = b.attempt()
            if not hasattr(att, "status"):  # an Attempt, not a Respond
                att.release()
                ip = att.endpoint.host
                match = next((e for e in eps if e.ip == ip), None)
                if match is not None:
                    return match
        return self.rng.choice(eps)

    @staticmethod
    def _refund(admissions: list[Any]) -> None:
        for lim, adm in admissions:
            if adm.allowed:
                lim.charge(adm, 0, time.time())

    def _release(self, shedder: Any) -> None:
        while True:
            t = shedder.pop_ready(0.0)
            if t is None:
                return
            self._wake(t)

    def _wake(self, ticket: Any) -> None:
        fut = self._waiters.pop(id(ticket), None)
        if fut is not None and not fut.done():
            fut.set_result(None)

    # ---- sending and answering ---------------------------------------------------------

    async def _send(self, x: Exchange, ep: Endpoint, headers: Headers, body: bytes) -> _Sent:
        try:
            up = await asyncio.wait_for(self.wp.upstream.acquire(ep, x.caller.client_ip), 10)
        except (UpstreamError, TimeoutError) as err:
            return _Sent(error=f"cannot reach {ep.key}: {err}")
        head = x.head
        sid = up.start(head.method, head.target, head.authority, headers, end_stream=not body)
        if body:
            await up.send(sid, body, True)
        events = up.events(sid)
        try:
            while True:
                e = await asyncio.wait_for(anext(events), HEAD_TIMEOUT)
                if isinstance(e, ev.ResponseHead) and not e.informational:
                    return _Sent(
                        status=e.status,
                        head=e,
                        events=events,
                        up=up,
                        sid=sid,
                        pool=self.wp.upstream,
                    )
                if isinstance(e, ev.StreamReset):
                    return _Sent(error=f"{ep.key} reset the stream")
        except (UpstreamError, TimeoutError, StopAsyncIteration) as err:
            up.cancel(sid)
            return _Sent(error=f"{ep.key}: {err or 'no response'}")

    async def _answer(
        self,
        x: Exchange,
        ai: ServiceAi,
        req: Any,
        target: Any,
        ep: Endpoint,
        out: _Sent,
        admissions: list[Any],
        strip: bool,
        started: float,
        cache_key: bytes | None,
    ) -> str:
        assert out.head is not None
        h = out.head.headers.copy()
        h.strip_hop_by_hop()
        if ai.route is not None:
            for k, v in ai.route.answered(target):
                h.set(k, v)
        for _lim, adm in admissions:
            for k, v in adm.headers:
                h.set(k, v)
        collector = None
        if (
            ai.cache is not None
            and cache_key is not None
            and ai.cache.storable(out.status, out.head.headers)
        ):
            collector = BodyCollector(ai.cache.max_entry)
        ctype = out.head.headers.get(b"content-type") or b""
        streamed = strip or ctype.startswith(b"text/event-stream")
        if strip:
            h.remove(b"content-length")  # the injected usage chunk is taken out
        reader = ResponseReader(started, out.head.headers.get(b"content-type"), strip_usage=strip)
        x.respond_head(out.status, h, out.head.end_stream)
        ok = 200 <= out.status < 300
        try:
            while not out.head.end_stream:
                e = await asyncio.wait_for(anext(out.events, None), STREAM_IDLE)
                if e is None:
                    break
                if isinstance(e, ev.Data):
                    data = reader.feed(bytes(e.data), time.monotonic())
                    if collector is not None:
                        collector.feed(bytes(e.data))
                    if e.end_stream:
                        data += reader.end(time.monotonic())
                    await x.writable()
                    x.respond_data(data, e.end_stream)
                    if e.end_stream:
                        break
                elif isinstance(e, ev.Trailers):
                    x.respond_trailers(e.headers)
                    break
                elif isinstance(e, ev.StreamReset):
                    ok = False
                    x.abort()
                    break
        except (TimeoutError, UpstreamError):
            ok = False
            x.abort()
        finally:
            out.pool.release_conn(out.up)
        now = time.time()
        usage = reader.usage_or_estimate(req.prompt_tokens)
        for lim, adm in admissions:
            lim.charge(adm, usage.total_tokens, now)
        body = collector.body() if collector is not None and ok else None
        if body is not None and ai.cache is not None and cache_key is not None:
            ai.cache.store(
                cache_key,
                out.status,
                out.head.headers,
                body,
                now,
            )
        elapsed = time.monotonic() - started
        if ai.rollout is not None:
            ai.rollout.observe(target.backend, ok, elapsed, reader.ttft)
        self.genai.record(
            operation=req.operation,
            request_model=req.model,
            response_model=reader.model,
            duration=elapsed,
            usage=usage,
            ttft=reader.ttft,
            tpot=reader.tpot,
            error_type="" if ok else str(out.status),
        )
        x.annotations.update(
            {
                "modelServed": reader.model or target.model,
                "tokens": usage.total_tokens,
                "promptTokens": usage.prompt_tokens,
                "completionTokens": usage.completion_tokens,
                "ttftMs": round(reader.ttft * 1000, 2) if reader.ttft else None,
                "streamed": streamed,
            }
        )
        return "-"


class _Sent:
    def __init__(
        self,
        *,
        status: int = 0,
        head: ev.ResponseHead | None = None,
        events: Any = None,
        up: Any = None,
        sid: int = 0,
        pool: Any = None,
        error: str | None = None,
    ) -> None:
        self.status, self.head, self.events = status, head, events
        self.up, self.sid, self.pool, self.error = up, sid, pool, error

    async def discard(self) -> None:
        if self.up is not None:
            self.up.cancel(self.sid)


def _json(h: Headers | None = None) -> Headers:
    out = h or Headers()
    out.set(b"content-type", b"application/json")
    return out
