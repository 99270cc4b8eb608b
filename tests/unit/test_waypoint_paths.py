"""The waypoint's one request path end to end over loopback (tests/unit/waypoint_mesh.py):
outlier ejection, connection-pool limits, route timeouts, retries under a budget and active
gRPC health checks on AI and plain routes; mesh errors in the caller's protocol as the
official `openai` SDK and grpcio see them; gRPC streaming, deadlines and trailers; curl's
HTTP/2 modes. Real node tunnels, real TLS, the real waypoint and real backends."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import shutil
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import openai
import pytest
import uvloop

from controller.api.gen.grpc.health.v1 import health_pb2
from tests.unit.waypoint_mesh import (
    GRPC_ABORT,
    GRPC_BIDI,
    GRPC_CLIENT_STREAM,
    GRPC_SLOW,
    GRPC_STREAM,
    GRPC_UNARY,
    Backend,
    WaypointMesh,
    new_threads,
    openai_client,
)

pytestmark = pytest.mark.timeout(120)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture(autouse=True)
def no_leaked_threads():
    """Every test leaves no thread behind (the mesh, its backends, grpc.aio, openai)."""
    before = set(threading.enumerate())
    yield
    assert new_threads(before) == []


# ---- helpers --------------------------------------------------------------------------


def chat(model: str = "llama", content: str = "hello mesh", **extra: Any) -> str:
    return json.dumps({"model": model, "messages": [{"role": "user", "content": content}], **extra})


async def wait_for(
    cond: Callable[[], bool], limit: float = 15.0, step: float = 0.05, what: str = ""
) -> None:
    """Poll `cond` until it holds, at most `limit` seconds (bounded: limit / step polls)."""
    for _ in range(int(limit / step)):
        if cond():
            return
        await asyncio.sleep(step)
    assert cond(), f"not within {limit}s: {what}"


def pool(*names: str, app: str = "pool", **kw: Any) -> list[Backend]:
    """Model-server replicas of Service `app`, reached through a ModelRoute (no waypoint of
    their own)."""
    return [Backend(n, app=app, waypoint=False, **kw) for n in names]


async def burst(n: int, one: Callable[[int], Awaitable[Any]]) -> list[Any]:
    return list(await asyncio.gather(*(one(i) for i in range(n))))


def access_records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


MODEL_ROUTE = """\
apiVersion: weft.dev/v1alpha1
kind: ModelRoute
metadata: {name: models, namespace: ai}
spec:
  targetRefs: [{name: llm}]
  rules:
    - {name: llama, models: [llama], backendRefs: [{name: pool, port: 8000}]}
"""

GENEROUS_LIMIT = """\
apiVersion: weft.dev/v1alpha1
kind: TokenRateLimit
metadata: {name: generous, namespace: ai}
spec:
  targetRefs: [{name: llm}]
  limits:
    - {name: plenty, by: principal, tokensPerMinute: 100000000, requestsPerMinute: 1000000}
"""

AI_LLM = {"route.yaml": MODEL_ROUTE, "limit.yaml": GENEROUS_LIMIT}


# ---- 1. outlier ejection on an AI route ---------------------------------------------------

OUTLIER = """\
apiVersion: weft.dev/v1alpha1
kind: BackendPolicy
metadata: {name: pool, namespace: ai}
spec:
  targetRefs: [{name: pool, port: 8000}]
  outlierDetection: {consecutive5xxErrors: 3, baseEjectionTime: 60s, maxEjectionPercent: 50}
"""


async def _eject_then_measure(m: WaypointMesh, bad: str) -> tuple[int, collections.Counter]:
    """Send requests until the engine ejects an endpoint (bounded), then 200 sequential
    requests; (ejections, statuses of the 200)."""
    eb = m.engine_backend("pool")
    async with await m.connect() as c:
        for _ in range(60):
            r = await c.request("POST", "/v1/chat/completions", chat())
            assert r.status in (200, 503), r
            if eb.counters.ejections:
                break
        assert eb.counters.ejections >= 1, eb.counters.as_dict()
        (ejected,) = [e for e in eb.endpoints if e.ejected_until is not None]
        assert ejected.name == f"ai/{bad}"
        statuses: collections.Counter[int] = collections.Counter()
        served: collections.Counter[str] = collections.Counter()
        for _ in range(200):
            r = await c.request("POST", "/v1/chat/completions", chat())
            statuses[r.status] += 1
            served[r.headers.get("x-weft-served-by", "-")] += 1
    assert served[f"ai/{bad}"] == 0, served
    return eb.counters.ejections, statuses


@pytest.mark.parametrize("failure", ["503", "killed"])
def test_outlier_ejection_on_an_ai_route_takes_a_failing_replica_out(tmp_path, failure):
    """On a Service with a ModelRoute and a TokenRateLimit, a BackendPolicy's outlier
    detection (3 consecutive 5xx) ejects the model replica that answers 503 to everything
    (or whose server was killed: connect failures count too): the engine counts the
    ejection, and of 200 sequential requests after it fewer than 1% fail and none reach
    the bad replica."""

    async def main() -> None:
        async with WaypointMesh(
            tmp_path,
            backends=pool("pool-a", "pool-b"),
            frontends=["llm"],
            extra={**AI_LLM, "outlier.yaml": OUTLIER},
        ) as m:
            if failure == "503":
                m.backend("pool-b").server.apply_control({"error_rate": 1.0, "error_status": 503})
            else:
                await m.stop_backend("pool-b")
            ejections, statuses = await _eject_then_measure(m, "pool-b")
            assert ejections >= 1
            failed = sum(n for s, n in statuses.items() if s != 200)
            assert failed < 2, statuses  # < 1% of 200

    uvloop.run(main())


# ---- 2. connection-pool limits ----------------------------------------------------------

POOL_LIMITS = """\
apiVersion: weft.dev/v1alpha1
kind: BackendPolicy
metadata: {name: limits, namespace: ai}
spec:
  targetRefs: [{name: pool, port: 8000}, {name: slow, port: 8000}]
  connectionPool: {maxConnections: 2, maxPendingRequests: 2}
"""


async def _pool_burst(
    m: WaypointMesh, service: str, backend: str, eb: Any
) -> tuple[list[Any], list[int], list[int]]:
    """10 concurrent requests (each on its own client connection) to a slow backend, while
    sampling the engine's count of upstream connections and the connections the backend's
    server holds."""
    srv = m.backend(backend).server
    counted: list[int] = []
    held: list[int] = []
    done = asyncio.Event()

    async def sample() -> None:
        for _ in range(3000):  # bounded: at most ~30 s
            counted.append(eb.pool.connections)
            held.append(len(srv.conns))
            if done.is_set():
                return
            await asyncio.sleep(0.01)

    sampler = asyncio.create_task(sample())
    try:
        rs = await burst(
            10,
            lambda i: m.http(
                "POST", "/v1/chat/completions", chat(content=f"n{i}"), service=service
            ),
        )
    finally:
        done.set()
        await sampler
    return rs, counted, held


def test_connection_pool_limits_hold_on_an_ai_route(tmp_path):
    """maxConnections 2 / maxPendingRequests 2 on the model backend of an AI route: of 10
    concurrent slow requests some are refused at once with 503, `x-weft-overloaded: true`
    and the OpenAI error code `overflow`; the rest succeed; the backend's overflow counter
    rises; the engine never counts more than 2 upstream connections."""

    async def main() -> None:
        async with WaypointMesh(
            tmp_path,
            backends=pool("pool-a"),
            frontends=["llm"],
            extra={**AI_LLM, "limits.yaml": POOL_LIMITS},
        ) as m:
            m.backend("pool-a").server.apply_control({"latency": 1.5})
            eb = m.engine_backend("pool")
            rs, counted, _held = await _pool_burst(m, "llm", "pool-a", eb)
            codes = collections.Counter(r.status for r in rs)
            assert set(codes) == {200, 503}, codes
            assert codes[200] >= 2, codes
            over = [r for r in rs if r.status == 503]
            for r in over:
                assert r.headers["x-weft-overloaded"] == "true", r
                assert r.headers["content-type"] == "application/json", r
                err = r.json()["error"]
                assert err["code"] == "overflow" and err["type"] == "service_unavailable", err
            assert eb.counters.overflow == len(over)
            assert max(counted) <= 2, counted
            await wait_for(lambda: eb.active == 0, what="tries released")

    uvloop.run(main())


def test_connection_pool_limits_hold_on_a_plain_route(tmp_path):
    """The same limits on a Service without AI policy: overflow is a text 503 with
    `x-weft-overloaded: true`, counted, and the engine never counts more than 2 upstream
    connections while the backend never holds more than 2 from the waypoint."""

    async def main() -> None:
        backends = [Backend("slow-a", app="slow")]
        async with WaypointMesh(
            tmp_path, backends=backends, extra={"limits.yaml": POOL_LIMITS}
        ) as m:
            m.backend("slow-a").server.apply_control({"latency": 1.5})
            eb = m.engine_backend("slow")
            rs, counted, held = await _pool_burst(m, "slow", "slow-a", eb)
            codes = collections.Counter(r.status for r in rs)
            assert set(codes) == {200, 503}, codes
            over = [r for r in rs if r.status == 503]
            for r in over:
                assert r.headers["x-weft-overloaded"] == "true", r
                assert r.headers["content-type"].startswith("text/plain"), r
            assert eb.counters.overflow == len(over)
            assert max(counted) <= 2, counted
            assert max(held) <= 2, held

    uvloop.run(main())


def test_an_ai_backend_never_holds_more_connections_than_max_connections(tmp_path):
    """On an AI route (ModelRoute: its endpoints are scraped for load), request traffic
    never holds more than maxConnections (2) connections to the model server, over two
    bursts of 10 concurrent slow requests. The load scrape (every 2 s) dials a connection
    of its own and closes it, outside the request pool as a health check is; it used to
    borrow a pooled connection that requests then reused beyond the limit."""

    async def main() -> None:
        async with WaypointMesh(
            tmp_path,
            backends=pool("pool-a"),
            frontends=["llm"],
            extra={**AI_LLM, "limits.yaml": POOL_LIMITS},
        ) as m:
            m.backend("pool-a").server.apply_control({"latency": 2.5})
            eb = m.engine_backend("pool")
            held: list[int] = []
            counted: list[int] = []
            for _ in range(2):
                _, c, h = await _pool_burst(m, "llm", "pool-a", eb)
                held += h
                counted += c
            assert max(counted) <= 2, collections.Counter(counted)
            assert max(held) <= 3, collections.Counter(held)  # 2 + a scrape in flight

    uvloop.run(main())


LEAK_LIMITS = """\
apiVersion: weft.dev/v1alpha1
kind: BackendPolicy
metadata: {name: limits, namespace: ai}
spec:
  targetRefs: [{name: llm, port: 8000}]
  loadBalancer: {type: RoundRobin}
  connectionPool: {maxConnections: 2, maxPendingRequests: 0}
"""


def test_a_failed_connect_gives_its_connection_slot_back(tmp_path):
    """With one of two replicas killed (RoundRobin, so every other first try meets a
    refused connect), 20 sequential requests leave the engine counting exactly the
    connections the waypoint really holds (to the live replica), and none of them is
    refused as an overflow: a dial that failed holds no slot of maxConnections."""

    async def main() -> None:
        async with WaypointMesh(tmp_path, extra={"limits.yaml": LEAK_LIMITS}) as m:
            eb = m.engine_backend("llm")
            await m.stop_backend("llm-v2")
            codes: collections.Counter[int] = collections.Counter()
            async with await m.connect() as c:
                for _ in range(20):
                    codes[(await c.request("GET", "/v1/models")).status] += 1
                live = len(m.backend("llm-v1").server.conns)
                assert eb.pool.connections == live, (eb.pool.connections, live, codes)
            assert eb.counters.overflow == 0, (eb.counters.as_dict(), codes)

    uvloop.run(main())


# ---- 3. a route timeout on an AI route --------------------------------------------------

REQUEST_TIMEOUT = """\
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: llm-timeout, namespace: ai}
spec:
  parentRefs: [{group: "", kind: Service, name: llm, port: 8000}]
  rules:
    - timeouts: {request: 1s}
"""


def test_a_request_timeout_on_an_ai_route_is_an_openai_504(tmp_path):
    """HTTPRoute timeouts.request (1s) on a Service with a ModelRoute and a TokenRateLimit
    bounds the model route's target too: a model answering after 10s gets the caller a 504
    OpenAI JSON error (type timeout_error, code upstream_timeout), which the openai SDK
    raises as InternalServerError with status 504 and `.code == "upstream_timeout"`; the
    abandoned try is released."""

    async def main() -> None:
        async with WaypointMesh(
            tmp_path,
            backends=pool("pool-a"),
            frontends=["llm"],
            extra={**AI_LLM, "timeout.yaml": REQUEST_TIMEOUT},
        ) as m:
            m.backend("pool-a").server.apply_control({"latency": 10.0})
            r = await m.http("POST", "/v1/chat/completions", chat())
            assert r.status == 504, r
            assert r.headers["content-type"] == "application/json"
            err = r.json()["error"]
            assert err["type"] == "timeout_error" and err["code"] == "upstream_timeout", err
            async with openai_client(m) as client:
                with pytest.raises(openai.InternalServerError) as caught:
                    await client.chat.completions.create(
                        model="llama", messages=[{"role": "user", "content": "hi"}]
                    )
            e = caught.value
            assert isinstance(e, openai.APIStatusError)
            assert e.status_code == 504 and e.code == "upstream_timeout", (e, e.body)
            assert e.type == "timeout_error"
            eb = m.engine_backend("pool")
            await wait_for(lambda: eb.active == 0, what="the timed-out tries released")

    uvloop.run(main())


# ---- 4. every mesh error through the openai SDK -----------------------------------------

DENY_BATCH = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-batch, namespace: ai}
spec:
  targetRefs: [{kind: Service, group: "", name: llm}]
  action: DENY
  rules:
    - from: [{source: {principals: [cluster.local/ns/apps/sa/batch]}}]
"""

TIGHT_LIMIT = """\
apiVersion: weft.dev/v1alpha1
kind: TokenRateLimit
metadata: {name: tight, namespace: ai}
spec:
  targetRefs: [{name: llm}]
  limits: [{name: two-per-minute, by: principal, requestsPerMinute: 2}]
"""


HI = [{"role": "user", "content": "hi"}]


def test_the_openai_sdk_sees_an_authorization_deny_as_permission_denied(tmp_path):
    """A DENY AuthorizationPolicy on an AI Service answers the denied caller with a 403
    OpenAI error that the SDK raises as PermissionDeniedError, type permission_error and
    code rbac_access_denied (docs/waypoint-engine.md, "Answers in the caller's protocol")."""

    async def main() -> None:
        async with WaypointMesh(
            tmp_path,
            backends=pool("pool-a"),
            frontends=["llm"],
            extra={**AI_LLM, "deny.yaml": DENY_BATCH},
        ) as m:
            port = await m.listen("llm", src="batch")
            async with openai.AsyncOpenAI(
                base_url=f"http://127.0.0.1:{port}/v1", api_key="t", max_retries=0
            ) as batch:
                with pytest.raises(openai.PermissionDeniedError) as denied:
                    await batch.chat.completions.create(model="llama", messages=HI)
            e = denied.value
            assert e.status_code == 403 and e.type == "permission_error", e.body
            assert e.body["message"] == "RBAC: access denied", e.body
            assert e.code == "rbac_access_denied", e.body

    uvloop.run(main())


def test_the_openai_sdk_parses_the_mesh_404_413_and_429(tmp_path):
    """The other answers the mesh makes on an AI route reach the official SDK as OpenAI's
    own API would give them: an unknown model under a ModelRoute is NotFoundError (code
    model_not_found, param model), a body over 16 MiB is a 413 APIStatusError of type
    invalid_request_error (code payload_too_large), and a TokenRateLimit denial is
    RateLimitError (code rate_limited) with a retry-after header; answers from the model
    in between parse as completions."""

    async def main() -> None:
        async with WaypointMesh(
            tmp_path,
            backends=pool("pool-a"),
            frontends=["llm"],
            extra={"route.yaml": MODEL_ROUTE, "limit.yaml": TIGHT_LIMIT},
        ) as m:
            async with openai_client(m) as client:
                with pytest.raises(openai.NotFoundError) as missing:
                    await client.chat.completions.create(model="no-such-model", messages=HI)
                assert missing.value.code == "model_not_found", missing.value.body
                assert missing.value.param == "model"
                assert missing.value.type == "invalid_request_error"
                with pytest.raises(openai.APIStatusError) as large:
                    await client.chat.completions.create(
                        model="llama", messages=[{"role": "user", "content": "x" * (17 << 20)}]
                    )
                assert large.value.status_code == 413, large.value
                assert large.value.type == "invalid_request_error", large.value.body
                assert large.value.code == "payload_too_large", large.value.body
                for _ in range(2):
                    ok = await client.chat.completions.create(model="llama", messages=HI)
                    assert ok.choices[0].message.content
                with pytest.raises(openai.RateLimitError) as limited:
                    await client.chat.completions.create(model="llama", messages=HI)
            e = limited.value
            assert e.status_code == 429 and e.code == "rate_limited", e.body
            assert e.type == "rate_limit_error"
            assert int(e.response.headers["retry-after"]) >= 1

    uvloop.run(main())


def test_a_streamed_chat_completion_through_the_mesh_with_the_openai_sdk(tmp_path):
    """stream=True with the openai SDK on an AI route: the SDK yields every token chunk
    (16 words from the test model server) and no usage chunk it did not ask for; the
    waypoint read the usage it injected (the access log's tokens, completionTokens and
    streamed) and returned the budget headers; with include_usage the SDK gets the
    usage chunk itself."""

    async def main() -> None:
        log = tmp_path / "access.log"
        async with WaypointMesh(
            tmp_path,
            backends=pool("pool-a"),
            frontends=["llm"],
            extra=AI_LLM,
            settings={"access_log": str(log)},
        ) as m:
            hi = [{"role": "user", "content": "hello streaming mesh"}]
            async with openai_client(m) as client:
                raw = await client.chat.completions.with_raw_response.create(
                    model="llama", messages=hi, stream=True
                )
                assert raw.headers["content-type"].startswith("text/event-stream")
                assert raw.headers["x-weft-model-served"] == "llama"
                assert int(raw.headers["x-ratelimit-remaining-tokens"]) > 0
                words, usages = [], []
                async for chunk in raw.parse():
                    if chunk.usage is not None:
                        usages.append(chunk.usage)
                    for ch in chunk.choices:
                        if ch.delta.content:
                            words.append(ch.delta.content)
                assert len(words) == 16, words
                assert usages == []
                stream = await client.chat.completions.create(
                    model="llama", messages=hi, stream=True, stream_options={"include_usage": True}
                )
                usage = [c.usage async for c in stream if c.usage is not None]
                assert len(usage) == 1 and usage[0].completion_tokens == 16, usage
        chats = [r for r in access_records(log) if r.get("operation") == "chat"]
        assert len(chats) == 2, chats
        for rec in chats:
            assert rec["status"] == 200 and rec["streamed"] is True, rec
            assert rec["completionTokens"] == 16, rec
            assert rec["tokens"] == rec["promptTokens"] + 16 and rec["promptTokens"] > 0, rec

    uvloop.run(main())


# ---- 5. retries under a budget (issue 19) -----------------------------------------------

RETRY = """\
apiVersion: weft.dev/v1alpha1
kind: RetryPolicy
metadata: {name: retry-503, namespace: ai}
spec:
  attempts: 3
  retryOn: [retriable-status-codes]
  retriableStatusCodes: [503]
  backoff: {baseInterval: 1ms}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: llm-retry, namespace: ai}
spec:
  parentRefs: [{group: "", kind: Service, name: llm, port: 8000}]
  rules:
    - filters:
        - {type: ExtensionRef, extensionRef: {group: weft.dev, kind: RetryPolicy, name: retry-503}}
---
apiVersion: weft.dev/v1alpha1
kind: BackendPolicy
metadata: {name: llm, namespace: ai}
spec:
  targetRefs: [{name: llm, port: 8000}]
  retryBudget: {budgetPercent: 20, minRetryConcurrency: 1}
"""

LLM_LIMIT = GENEROUS_LIMIT  # targets Service llm


@pytest.mark.parametrize("route", ["plain", "ai"])
def test_retries_of_one_request_at_a_time_are_never_refused_by_the_budget(tmp_path, route):
    """attempts 3 on 503 with a retry budget of 20% / minRetryConcurrency 1, against a
    backend failing half of its requests at random (seeded): requests sent one at a time
    take about 1 + 1/2 + 1/4 + 1/8 = 1.875 upstream tries each (the engine's `tries`, and
    the model server's own count of requests), more than 90% succeed, and the budget never
    refuses a retry (the failed try is over, so a lone chain has one retry in flight).
    Also with AI policy (a TokenRateLimit) on the Service."""

    async def main() -> None:
        extra = {"retry.yaml": RETRY}
        if route == "ai":
            extra["limit.yaml"] = LLM_LIMIT
        async with WaypointMesh(tmp_path, backends=[Backend("llm-a")], extra=extra) as m:
            srv = m.backend("llm-a").server
            srv.apply_control({"error_rate": 0.5, "error_status": 503, "seed": 19})
            eb = m.engine_backend("llm")
            n = 200
            codes: collections.Counter[int] = collections.Counter()
            async with await m.connect() as c:
                for i in range(n):
                    r = await c.request("POST", "/v1/chat/completions", chat(content=f"r{i}"))
                    codes[r.status] += 1
            assert set(codes) <= {200, 503}, codes
            assert codes[200] > 0.9 * n, codes
            tries = eb.counters.tries / n
            assert 1.6 <= tries <= 2.15, (tries, eb.counters.as_dict())
            served = sum(srv.metrics.outcomes.values())
            assert served == eb.counters.tries, (served, srv.metrics.outcomes)
            assert eb.counters.retry_budget_exhausted == 0, eb.counters.as_dict()
            assert eb.counters.retries == eb.counters.tries - n
            assert eb.counters.retries_exhausted == codes[503]

    uvloop.run(main())


# ---- 6. gRPC through the waypoint --------------------------------------------------------


def test_grpc_client_streaming_call_through_the_waypoint(tmp_path):
    """A client-streaming call: every request message reaches the backend in order and
    the single answer comes back with OK."""

    async def main() -> None:
        async with WaypointMesh(tmp_path, grpc=True) as m:
            ch = await m.grpc_channel()

            async def messages() -> AsyncIterator[bytes]:
                for i in range(5):
                    yield f"m{i}".encode()

            call = ch.stream_unary(GRPC_CLIENT_STREAM)(messages(), timeout=20)
            assert await call == b"grpc-echo:m0+m1+m2+m3+m4"
            assert await call.code() == grpc.StatusCode.OK

    uvloop.run(main())


async def _ping_pong(m: WaypointMesh, rounds: int = 3) -> list[bytes | str]:
    """A bidi call used as ping-pong; each reply, or "timeout" for one that did not come
    within 5s (then the call is cancelled). Nothing of grpc is left referenced."""
    ch = await m.grpc_channel()
    call = ch.stream_stream(GRPC_BIDI)(timeout=20)
    got: list[bytes | str] = []
    try:
        for i in range(rounds):
            await call.write(f"ping{i}".encode())
            try:
                got.append(await asyncio.wait_for(call.read(), 5))
            except TimeoutError:
                got.append("timeout")
                return got
        await call.done_writing()
        got.append(await call.read())
        got.append(str(await call.code()))
        return got
    finally:
        call.cancel()


PING_PONG = [
    b"grpc-echo:ping0",
    b"grpc-echo:ping1",
    b"grpc-echo:ping2",
    grpc.aio.EOF,
    "StatusCode.OK",
]

NO_RETRY = """\
apiVersion: weft.dev/v1alpha1
kind: RetryPolicy
metadata: {name: no-retry, namespace: ai}
spec: {attempts: 0}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: grpc-no-retry, namespace: ai}
spec:
  parentRefs: [{group: "", kind: Service, name: grpc-echo, port: 9000}]
  rules:
    - filters:
        - {type: ExtensionRef, extensionRef: {group: weft.dev, kind: RetryPolicy, name: no-retry}}
"""


def test_grpc_bidi_streaming_ping_pong_through_the_waypoint(tmp_path):
    """A bidirectional call used as ping-pong on a Service with no route configuration:
    each message is answered while the client keeps its side open, so the waypoint
    forwards a streaming request as it arrives (it does not wait for the end of the
    request body)."""

    async def main() -> list[bytes | str]:
        async with WaypointMesh(tmp_path, grpc=True) as m:
            return await _ping_pong(m)

    assert uvloop.run(main()) == PING_PONG


def test_grpc_bidi_ping_pong_with_retries_off(tmp_path):
    """With a RetryPolicy of 0 attempts on the route, the same ping-pong bidi call works:
    the request body streams through as it arrives (what the default-policy test above
    expects without the RetryPolicy)."""

    async def main() -> list[bytes | str]:
        async with WaypointMesh(tmp_path, grpc=True, extra={"r.yaml": NO_RETRY}) as m:
            return await _ping_pong(m)

    assert uvloop.run(main()) == PING_PONG


def test_grpc_bidi_streaming_all_at_once_through_the_waypoint(tmp_path):
    """A bidirectional call whose client writes everything and half-closes before reading:
    every answer arrives in order and the call ends OK."""

    async def main() -> None:
        async with WaypointMesh(tmp_path, grpc=True) as m:
            ch = await m.grpc_channel()

            async def messages() -> AsyncIterator[bytes]:
                for i in range(4):
                    yield f"b{i}".encode()

            call = ch.stream_stream(GRPC_BIDI)(messages(), timeout=20)
            got = [msg async for msg in call]
            assert got == [f"grpc-echo:b{i}".encode() for i in range(4)]
            assert await call.code() == grpc.StatusCode.OK

    uvloop.run(main())


def test_grpc_deadline_is_deadline_exceeded_and_the_backend_call_ends(tmp_path):
    """A call whose deadline (0.5s) is shorter than the handler (30s) ends with
    DEADLINE_EXCEEDED at the client, the backend's handler is cancelled, and the waypoint
    keeps no upstream stream open: the engine backend's tries in flight return to 0."""

    async def main() -> None:
        async with WaypointMesh(tmp_path, grpc=True) as m:
            ch = await m.grpc_channel()
            b = m.backend("grpc-echo")
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await ch.unary_unary(GRPC_SLOW)(b"30", timeout=0.5)
            assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            await wait_for(lambda: "slow-cancelled" in b.grpc_events, what=str(b.grpc_events))
            eb = m.engine_backend("grpc-echo")
            await wait_for(lambda: eb.active == 0, what="the try released")
            # The connection is still good for the next call.
            assert await ch.unary_unary(GRPC_UNARY)(b"after", timeout=20) == b"after"

    uvloop.run(main())


def test_a_cancelled_grpc_call_cancels_the_backend_call(tmp_path):
    """A call without a deadline that the client cancels (RST_STREAM CANCEL) while the
    handler is silent: the waypoint resets its upstream stream at once, so the backend's
    handler sees the cancellation and the engine's tries in flight return to 0."""

    async def main() -> tuple[list[str], int]:
        async with WaypointMesh(tmp_path, grpc=True) as m:
            ch = await m.grpc_channel()
            b = m.backend("grpc-echo")
            call = ch.unary_unary(GRPC_SLOW)(b"30")
            await wait_for(lambda: "slow-started" in b.grpc_events, what="handler started")
            call.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await call
            del call
            eb = m.engine_backend("grpc-echo")
            for _ in range(100):  # bounded: 5 s
                if "slow-cancelled" in b.grpc_events and eb.active == 0:
                    break
                await asyncio.sleep(0.05)
            return list(b.grpc_events), eb.active

    events, active = uvloop.run(main())
    assert "slow-cancelled" in events and active == 0, (events, active)


def test_grpc_status_details_and_trailers_reach_the_client(tmp_path):
    """A handler that aborts with a status and details (a trailers-only answer, with
    trailing metadata): the client sees that exact status, details (non-ASCII included)
    and trailing metadata through the waypoint."""

    async def main() -> None:
        async with WaypointMesh(tmp_path, grpc=True) as m:
            ch = await m.grpc_channel()
            for code, details in (
                ("FAILED_PRECONDITION", "model is warming up"),
                ("RESOURCE_EXHAUSTED", "quota: ünïcode ✓ 100%"),
                ("NOT_FOUND", "no such thing"),
            ):
                call = ch.unary_unary(GRPC_ABORT)(f"{code}:{details}".encode(), timeout=20)
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await call
                e = caught.value
                assert e.code() == grpc.StatusCode[code], e
                assert e.details() == details, e
                assert ("x-abort-trailer", "yes") in tuple(e.trailing_metadata()), e

    uvloop.run(main())


DENY_GRPC = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-client, namespace: ai}
spec:
  targetRefs: [{kind: Service, group: "", name: grpc-echo}]
  action: DENY
  rules:
    - from: [{source: {principals: [cluster.local/ns/apps/sa/client]}}]
      to: [{operation: {paths: ["/weft.test.Echo/Unary"]}}]
"""

UNARY_ONLY = """\
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: grpc-unary-only, namespace: ai}
spec:
  parentRefs: [{group: "", kind: Service, name: grpc-echo, port: 9000}]
  rules:
    - matches: [{path: {type: Exact, value: /weft.test.Echo/Unary}}]
    - matches: [{path: {type: Exact, value: /weft.test.Echo/Slow}}]
      timeouts: {request: 500ms}
"""


def test_mesh_errors_reach_a_grpc_caller_as_grpc_statuses(tmp_path):
    """What the mesh answers itself is a trailers-only gRPC status for a gRPC caller: an
    AuthorizationPolicy DENY is PERMISSION_DENIED, a method no route matches is
    UNIMPLEMENTED, a route timeout is DEADLINE_EXCEEDED (and the backend's handler is
    cancelled), and a Service whose only backend is gone is UNAVAILABLE; calls the
    policies allow still succeed."""

    async def main() -> None:
        async with WaypointMesh(tmp_path, grpc=True) as m:
            ch = await m.grpc_channel()
            b = m.backend("grpc-echo")

            async def code_of(method: str, req: bytes) -> grpc.StatusCode:
                try:
                    await ch.unary_unary(method)(req, timeout=20)
                except grpc.aio.AioRpcError as e:
                    return e.code()
                return grpc.StatusCode.OK

            await m.apply("deny.yaml", DENY_GRPC)
            assert await code_of(GRPC_UNARY, b"x") == grpc.StatusCode.PERMISSION_DENIED
            assert await code_of(GRPC_SLOW, b"0") == grpc.StatusCode.OK  # not denied
            await m.remove("deny.yaml")
            await m.apply("route.yaml", UNARY_ONLY)
            assert await code_of(GRPC_UNARY, b"x") == grpc.StatusCode.OK
            stream = ch.unary_stream(GRPC_STREAM)(b"2", timeout=20)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                [x async for x in stream]
            assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
            assert await code_of(GRPC_SLOW, b"30") == grpc.StatusCode.DEADLINE_EXCEEDED
            await wait_for(lambda: "slow-cancelled" in b.grpc_events, what=str(b.grpc_events))
            await m.stop_backend("grpc-echo")
            assert await code_of(GRPC_UNARY, b"x") == grpc.StatusCode.UNAVAILABLE

    uvloop.run(main())


SLOW_TIMEOUT = """\
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: grpc-slow-timeout, namespace: ai}
spec:
  parentRefs: [{group: "", kind: Service, name: grpc-echo, port: 9000}]
  rules:
    - timeouts: {request: 500ms}
"""


def test_a_route_timeout_after_grpc_headers_is_deadline_exceeded(tmp_path):
    """A route timeout (timeouts.request 500ms) on a gRPC call whose handler sent its
    response headers and then went silent: the gRPC caller still learns that the mesh's
    deadline passed (DEADLINE_EXCEEDED), and the backend's handler is cancelled."""

    async def main() -> tuple[str, list[str]]:
        async with WaypointMesh(tmp_path, grpc=True, extra={"t.yaml": SLOW_TIMEOUT}) as m:
            ch = await m.grpc_channel()
            b = m.backend("grpc-echo")
            code = "OK"
            try:
                await ch.unary_unary(GRPC_SLOW)(b"h:30", timeout=20)
            except grpc.aio.AioRpcError as e:
                code = e.code().name
            await wait_for(lambda: "slow-cancelled" in b.grpc_events, what=str(b.grpc_events))
            return code, list(b.grpc_events)

    code, events = uvloop.run(main())
    assert code == "DEADLINE_EXCEEDED", (code, events)


# ---- 7. active gRPC health checks (issue 20) ---------------------------------------------

GRPC_HEALTH = """\
apiVersion: weft.dev/v1alpha1
kind: BackendPolicy
metadata: {name: grpc-health, namespace: ai}
spec:
  targetRefs: [{name: grpc-echo, port: 9000}]
  loadBalancer: {type: RoundRobin}
  healthCheck:
    grpc: {service: ""}
    interval: 1s
    timeout: 500ms
    unhealthyThreshold: 2
    healthyThreshold: 1
"""


def test_grpc_health_checks_take_a_not_serving_backend_out_and_back(tmp_path):
    """Two gRPC backends with a grpc.health.v1 server and a BackendPolicy gRPC health
    check: both SERVING stay in and share the calls; one set NOT_SERVING is marked
    unhealthy by the probes (within bounded polling) and takes no more calls while every
    call keeps succeeding; SERVING again, it comes back and takes calls again."""

    async def main() -> None:
        backends = [
            Backend("grpc-a", app="grpc-echo", kind="grpc"),
            Backend("grpc-b", app="grpc-echo", kind="grpc"),
        ]
        async with WaypointMesh(
            tmp_path, backends=backends, extra={"health.yaml": GRPC_HEALTH}
        ) as m:
            ch = await m.grpc_channel()
            eb = m.engine_backend("grpc-echo")
            ep = {e.name: e for e in eb.endpoints}
            assert set(ep) == {"ai/grpc-a", "ai/grpc-b"}

            async def calls(n: int) -> collections.Counter[str]:
                served: collections.Counter[str] = collections.Counter()
                for i in range(n):
                    call = ch.unary_unary(GRPC_UNARY)(f"c{i}".encode(), timeout=20)
                    assert await call == f"c{i}".encode()
                    served[dict(await call.initial_metadata())["x-served-by"]] += 1
                return served

            assert set(await calls(10)) == {"ai/grpc-a", "ai/grpc-b"}
            b = m.backend("grpc-b")
            await wait_for(lambda: b.grpc_events.count("health-check") >= 2, what="probes")
            assert ep["ai/grpc-a"].healthy and ep["ai/grpc-b"].healthy

            b.grpc_health[""] = NOT_SERVING
            for _ in range(100):  # bounded: the probes run every second
                await calls(2)
                if not ep["ai/grpc-b"].healthy:
                    break
                await asyncio.sleep(0.1)
            assert not ep["ai/grpc-b"].healthy and ep["ai/grpc-a"].healthy
            assert await calls(10) == {"ai/grpc-a": 10}
            assert eb.counters.health_check_failures >= 2

            b.grpc_health[""] = SERVING
            await wait_for(lambda: ep["ai/grpc-b"].healthy, what="grpc-b healthy again")
            assert set(await calls(10)) == {"ai/grpc-a", "ai/grpc-b"}

    uvloop.run(main())


# ---- 8. curl's HTTP/2 modes ------------------------------------------------------------


async def _curl(*args: str) -> tuple[str, str]:
    """Run curl; (body, "STATUS HTTP_VERSION")."""
    proc = await asyncio.create_subprocess_exec(
        "curl",
        "-sS",
        "--max-time",
        "20",
        "-w",
        "\n%{http_code} %{http_version}",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    body, _, tail = out.decode().rpartition("\n")
    return body, tail


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_http2_upgrade_and_prior_knowledge_through_the_waypoint(tmp_path):
    """`curl --http2` offers an h2c Upgrade: the waypoint declines it and serves the GET and
    a POST with a body over HTTP/1.1, the body reaching the backend intact;
    `curl --http2-prior-knowledge` POSTs over HTTP/2 and gets the body echoed."""

    async def main() -> None:
        backends = [Backend("llm-v1"), Backend("echo", app="echo", kind="echo")]
        async with WaypointMesh(tmp_path, backends=backends) as m:
            llm = await m.listen("llm")
            echo = await m.listen("echo")
            body, tail = await _curl("--http2", f"http://127.0.0.1:{llm}/debug/headers")
            assert tail == "200 1.1", (tail, body)
            assert "upgrade" not in json.loads(body)["headers"]
            payload = "x" * 5000 + "-end"
            body, tail = await _curl(
                "--http2", "--data-binary", payload, f"http://127.0.0.1:{echo}/anything"
            )
            assert (tail, body) == ("200 1.1", payload)
            body, tail = await _curl(
                "--http2", "-d", chat(), "-H", "content-type: application/json",
                f"http://127.0.0.1:{llm}/v1/chat/completions",
            )  # fmt: skip
            assert tail == "200 1.1", (tail, body)
            assert json.loads(body)["usage"]["completion_tokens"] == 16
            body, tail = await _curl(
                "--http2-prior-knowledge",
                "--data-binary",
                payload,
                f"http://127.0.0.1:{echo}/anything",
            )
            assert (tail, body) == ("200 2", payload)

    uvloop.run(main())
