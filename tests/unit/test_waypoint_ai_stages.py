"""The AI stages on the one request path, end to end over loopback (waypoint_mesh.py), where a
review found them wrong (2026-12-07): the LoadShedding queue lets requests go one at a time
and within their deadline; fallbackOn conditions follow their names; a caller that leaves
is not sent on to a fallback; a model name that is not text is refused before any GPU
work; an AI policy reads only the requests it is for (a gRPC call or an upload on the same
Service streams as without it). Real node tunnels, TLS, waypoint, model servers, and the
official `openai` SDK and grpcio as clients."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from typing import Any

import httpx
import openai
import pytest
import uvloop

from agent.lab.workloads.model_server import Behaviour
from tests.enginetesting import http_route
from tests.unit.waypoint_mesh import (
    GRPC_BIDI,
    Backend,
    WaypointMesh,
    new_threads,
    openai_client,
)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(autouse=True)
def no_leaked_threads():
    before = set(threading.enumerate())
    yield
    assert new_threads(before) == []


def model_backend(name: str, app: str, model: str, **behaviour: Any) -> Backend:
    b: dict[str, Any] = {"ttft": 0.0, "tpot": 0.0, "max_concurrency": 0, **behaviour}
    return Backend(name, app=app, model=model, waypoint=False, behaviour=Behaviour(**b))


def chat(model: str, content: str = "hello") -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}]}


ROUTE = """\
apiVersion: weft.dev/v1alpha1
kind: ModelRoute
metadata: {name: models, namespace: ai}
spec:
  targetRefs: [{name: llm}]
  rules:
    - {name: small, models: [small-model], backendRefs: [{name: small, port: 8000}]}
    - name: big
      models: [big-model]
      backendRefs: [{name: big, port: 8000}]
      fallback: [{model: small-model}]
"""

LIMIT = """\
apiVersion: weft.dev/v1alpha1
kind: TokenRateLimit
metadata: {name: per-caller, namespace: ai}
spec:
  targetRefs: [{name: llm}]
  limits: [{name: tpm, by: principal, tokensPerMinute: 1000000, requestsPerMinute: 1000}]
"""


def shedding(timeout: str) -> str:
    return f"""\
apiVersion: weft.dev/v1alpha1
kind: LoadShedding
metadata: {{name: shed, namespace: ai}}
spec:
  targetRefs: [{{name: llm}}]
  saturation: {{inFlight: 1}}
  priorityClasses:
    - {{name: standard, value: 50, whenSaturated: Queue,
       queue: {{maxRequests: 16, timeout: {timeout}}}}}
  defaultPriorityClass: standard
"""


def test_a_loadshedding_queue_lets_queued_requests_go_one_at_a_time(tmp_path):
    """inFlight: 1 and five requests at once: the queue releases them one by one as each
    finishes (each judged with the one before it in flight), never all at once; all are
    answered."""

    async def main() -> None:
        backends = [model_backend("small-a", "small", "small-model", latency=0.2)]
        async with WaypointMesh(
            tmp_path,
            backends=backends,
            frontends=["llm"],
            extra={"route.yaml": ROUTE, "shed.yaml": shedding("30s")},
        ) as m:
            board = m.waypoint.ai.board
            peak = 0

            async def watch() -> None:
                nonlocal peak
                while True:
                    peak = max(peak, sum(s.in_flight for s in board._eps.values()))
                    await asyncio.sleep(0.005)

            watcher = asyncio.create_task(watch())
            async with openai_client(m) as client:
                answers = await asyncio.gather(
                    *(client.chat.completions.create(**chat("small-model")) for _ in range(5))
                )
            watcher.cancel()
            assert len(answers) == 5
            assert peak == 1
            served = m.backend("small-a").server.metrics.outcomes
            assert served["ok"] == 5

    uvloop.run(main())


def test_time_in_the_queue_counts_against_the_request_timeout(tmp_path):
    """A request queued behind a slow one on a route with timeouts.request 1s is answered
    504 upstream_timeout by its deadline, not released (or shed with 503) when the queue's
    own 30 s timeout passes."""
    route_timeout = http_route(
        '    - matches: [{headers: [{name: x-slow, value: "1"}]}]\n    - timeouts: {request: 1s}\n',
        name="llm",
    )

    async def main() -> None:
        backends = [model_backend("small-a", "small", "small-model", latency=3.0)]
        async with (
            WaypointMesh(
                tmp_path,
                backends=backends,
                frontends=["llm"],
                extra={"route.yaml": ROUTE, "shed.yaml": shedding("30s"), "hr.yaml": route_timeout},
            ) as m,
            openai_client(m) as client,
        ):
            first = asyncio.create_task(
                client.chat.completions.create(**chat("small-model"), extra_headers={"x-slow": "1"})
            )
            board = m.waypoint.ai.board
            for _ in range(200):  # until the first holds the backend's one slot
                if sum(s.in_flight for s in board._eps.values()):
                    break
                await asyncio.sleep(0.01)
            with pytest.raises(openai.InternalServerError) as caught:
                await client.chat.completions.create(**chat("small-model"))
            assert caught.value.status_code == 504
            assert caught.value.code == "upstream_timeout"
            await first

    uvloop.run(main())


@pytest.mark.parametrize(
    ("fallback_on", "falls_back"),
    [("[timeout]", True), ("[connect-failure]", False), ("[reset]", False), ("[5xx]", False)],
)
def test_a_per_try_timeout_falls_back_only_where_fallbackon_lists_timeout(
    tmp_path, fallback_on, falls_back
):
    """The primary never answers within its per-try timeout: `timeout` falls back to the
    next model; `connect-failure`, `reset` and `5xx` do not (the caller gets 504), since a
    try that timed out may have used GPU time the docs say a fallback must not repeat."""
    per_try = http_route("    - timeouts: {backendRequest: 300ms}\n", name="llm")

    async def main() -> None:
        backends = [
            model_backend("small-a", "small", "small-model"),
            model_backend("big-a", "big", "big-model", latency=2.0),
        ]
        route = ROUTE + f"  fallbackOn: {fallback_on}\n"
        async with WaypointMesh(
            tmp_path,
            backends=backends,
            frontends=["llm"],
            extra={"route.yaml": route, "hr.yaml": per_try},
        ) as m:
            async with openai_client(m) as client:
                if falls_back:
                    r = await client.chat.completions.with_raw_response.create(**chat("big-model"))
                    assert r.headers.get("x-weft-fallback") == "1"
                    assert r.headers.get("x-weft-served-by") == "ai/small-a"
                else:
                    with pytest.raises(openai.InternalServerError) as caught:
                        await client.chat.completions.create(**chat("big-model"))
                    assert caught.value.status_code == 504
            assert m.backend("small-a").server.metrics.outcomes.get("ok", 0) == (
                1 if falls_back else 0
            )
            # The primary's timeout is a failed model request, error.type "timeout".
            failed = [
                s.value
                for metric in m.waypoint.metrics.registry.collect()
                if metric.name == "gen_ai_server_request_duration"
                for s in metric.samples
                if s.name.endswith("_count") and s.labels["error_type"] == "timeout"
            ]
            assert failed == [1.0]

    uvloop.run(main())


def test_a_stopped_primary_falls_back_on_connect_failure_not_on_timeout(tmp_path):
    """With the primary's replica gone, `connect-failure` falls back; `timeout` does not."""

    async def main() -> None:
        backends = [
            model_backend("small-a", "small", "small-model"),
            model_backend("big-a", "big", "big-model"),
        ]
        async with WaypointMesh(
            tmp_path, backends=backends, frontends=["llm"], extra={"route.yaml": ROUTE}
        ) as m:
            await m.stop_backend("big-a")
            async with openai_client(m) as client:
                await m.apply("route.yaml", ROUTE + "  fallbackOn: [timeout]\n")
                with pytest.raises(openai.InternalServerError) as caught:
                    await client.chat.completions.create(**chat("big-model"))
                assert caught.value.status_code == 503
                await m.apply("route.yaml", ROUTE + "  fallbackOn: [connect-failure]\n")
                r = await client.chat.completions.with_raw_response.create(**chat("big-model"))
                assert r.headers.get("x-weft-fallback") == "1"

    uvloop.run(main())


@pytest.mark.parametrize("protocol", ["http/1.1", "h2"])
def test_a_caller_that_leaves_mid_try_is_not_sent_on_to_the_fallback(tmp_path, protocol):
    """The caller hangs up (HTTP/1.1) or resets its stream (HTTP/2) while the primary is
    still working: the fallback is not tried for it, its quota reservation is given back
    and no endpoint stays counted in flight."""

    async def main() -> None:
        backends = [
            model_backend("small-a", "small", "small-model"),
            model_backend("big-a", "big", "big-model", latency=1.0),
        ]
        async with WaypointMesh(
            tmp_path,
            backends=backends,
            frontends=["llm"],
            extra={"route.yaml": ROUTE + "  fallbackOn: [5xx, reset, timeout]\n", "l": LIMIT},
        ) as m:
            body = json.dumps(chat("big-model")).encode()
            if protocol == "http/1.1":
                _r, w = await m.dial("client", (m.vip("llm"), 8000))
                w.write(
                    b"POST /v1/chat/completions HTTP/1.1\r\nhost: llm\r\n"
                    b"content-type: application/json\r\ncontent-length: %d\r\n\r\n"
                    % len(body)
                    + body
                )
                await w.drain()
                await asyncio.sleep(0.3)
                w.transport.abort()
            else:
                port = await m.listen("llm")
                async with httpx.AsyncClient(http1=False, http2=True) as h:
                    with contextlib.suppress(httpx.TimeoutException):
                        await h.post(
                            f"http://127.0.0.1:{port}/v1/chat/completions",
                            content=body,
                            headers={"content-type": "application/json"},
                            timeout=0.3,
                        )  # the client resets its stream on the timeout
            board = m.waypoint.ai.board
            for _ in range(300):  # the waypoint notices, and settles the request
                if not sum(s.in_flight for s in board._eps.values()):
                    break
                await asyncio.sleep(0.01)
            await asyncio.sleep(1.5)  # past when the primary would have answered
            assert m.backend("small-a").server.metrics.outcomes.get("ok", 0) == 0
            assert sum(s.in_flight for s in board._eps.values()) == 0

    uvloop.run(main())


def test_a_model_name_that_is_not_text_is_refused_before_any_work(tmp_path):
    """A JSON model name with a lone surrogate (valid JSON, not text) used to reach the
    backend, which generated the whole answer, and then break the waypoint writing the
    name into a response header, before anything was charged. It is a 400 now, and the
    backend is never asked."""

    async def main() -> None:
        backends = [model_backend("big-a", "big", "big-model", tokens=50)]
        route = ROUTE.replace("models: [big-model]", 'models: ["big-*"]')
        async with WaypointMesh(
            tmp_path,
            backends=backends,
            frontends=["llm"],
            extra={"route.yaml": route, "limit.yaml": LIMIT},
        ) as m:
            raw = b'{"model": "big-\\ud800", "messages": [{"role": "user", "content": "x"}]}'
            r = await m.http(
                "POST",
                "/v1/chat/completions",
                raw,
                service="llm",
                headers={"content-type": "application/json"},
            )
            assert r.status == 400
            err = json.loads(r.body)["error"]
            assert err["code"] == "bad_request" and err["param"] == "model"
            assert sum(m.backend("big-a").server.metrics.outcomes.values()) == 0

    uvloop.run(main())


def test_an_ai_policy_leaves_requests_it_does_not_read_streaming(tmp_path):
    """A TokenRateLimit on a Service used to hold every request's body to read a model from
    it: a gRPC bidirectional call (each message waits for the answer to the one before)
    deadlocked, and an upload on a non-OpenAI path larger than the model-body limit got
    413. Only OpenAI operations are read now; the rest stream as with no AI policy."""
    limit_grpc = LIMIT.replace("name: llm", "name: grpc-echo")

    async def bidi(ch: Any) -> list[bytes]:
        call = ch.stream_stream(GRPC_BIDI)(timeout=5)
        got = []
        for i in range(3):
            await call.write(f"m{i}".encode())
            got.append(await call.read())
        await call.done_writing()
        return got

    async def main() -> None:
        (tmp_path / "grpc").mkdir()
        (tmp_path / "upload").mkdir()
        async with WaypointMesh(tmp_path / "grpc", backends=[], grpc=True) as m:
            await m.apply("limit.yaml", limit_grpc)
            ch = await m.grpc_channel()
            assert await bidi(ch) == [b"grpc-echo:m0", b"grpc-echo:m1", b"grpc-echo:m2"]
            await ch.close()
        async with WaypointMesh(
            tmp_path / "upload",
            backends=[Backend("small-a", app="small", kind="echo", waypoint=True)],
        ) as m:
            await m.apply("limit.yaml", LIMIT.replace("name: llm", "name: small"))
            body = b"x" * (17 << 20)  # past the 16 MiB an OpenAI body may be
            r = await m.http("POST", "/upload", body, service="small")
            assert r.status == 200 and len(r.body) == len(body)

    uvloop.run(main())


def test_a_stream_runs_while_its_tokens_arrive_whatever_the_request_timeout(tmp_path):
    """timeouts.request 1s bounds the way to the answer's head (here at 0.8 s); once it is
    relayed, a stream of 8 tokens 0.3 s apart runs to its end, the idle timeout (the
    request's 1 s) never passing between tokens. It used to be cut when the head came late
    in the request's second (the idle timeout was what was left of it), and to run
    unbounded when the head came early."""
    route_timeout = http_route("    - timeouts: {request: 1s}\n", name="llm")

    async def main() -> None:
        backends = [
            model_backend("small-a", "small", "small-model", latency=0.8, tpot=0.3, tokens=8)
        ]
        async with (
            WaypointMesh(
                tmp_path,
                backends=backends,
                frontends=["llm"],
                extra={"route.yaml": ROUTE, "hr.yaml": route_timeout},
            ) as m,
            openai_client(m) as client,
        ):
            stream = await client.chat.completions.create(**chat("small-model"), stream=True)
            pieces = [c.choices[0].delta.content async for c in stream if c.choices]
            assert len([p for p in pieces if p]) == 8

    uvloop.run(main())


def test_ai_requests_carry_istios_destination_labels_of_the_replica_that_answered(tmp_path):
    """Issue 13, point 3: istio_requests_total for a request a ModelRoute sent on (here after
    a fallback from a stopped primary) names the replica that answered: its workload,
    version and canonical service and revision, as Istio derives them from pod labels."""

    async def main() -> None:
        backends = [
            model_backend("small-a", "small", "small-model"),
            model_backend("big-a", "big", "big-model"),
        ]
        backends[0].version = "v3"
        async with WaypointMesh(
            tmp_path,
            backends=backends,
            frontends=["llm"],
            extra={"route.yaml": ROUTE + "  fallbackOn: [connect-failure]\n"},
        ) as m:
            await m.stop_backend("big-a")
            async with openai_client(m) as client:
                r = await client.chat.completions.with_raw_response.create(**chat("big-model"))
                assert r.headers.get("x-weft-fallback") == "1"
            samples = [
                s.labels
                for metric in m.waypoint.metrics.registry.collect()
                if metric.name == "istio_requests"
                for s in metric.samples
                if s.name == "istio_requests_total" and s.labels["response_code"] == "200"
            ]
            assert len(samples) == 1
            labels = samples[0]
            assert labels["destination_workload"] == "small"
            assert labels["destination_version"] == "v3"
            assert labels["destination_canonical_service"] == "small"
            assert labels["destination_canonical_revision"] == "v3"
            assert labels["source_canonical_service"] != "unknown"
            assert labels["source_canonical_revision"] == "latest"

    uvloop.run(main())
