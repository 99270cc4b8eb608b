"""The real waypoint in one process over loopback (tests/unit/waypoint_mesh.py): client pods
behind node-1's tunnel, HBONE to the waypoint on its own address, HBONE again to the backends'
node tunnel. Real certificates, real TLS, the real Workload API; no root needed."""

from __future__ import annotations

import asyncio
import collections
import hashlib
import json
import os
import shutil
import threading

import pytest
import uvloop

from agent.waypoint.workload import AgentLink, _get
from tests.unit.waypoint_mesh import (
    GRPC_STREAM,
    GRPC_UNARY,
    Backend,
    WaypointMesh,
    new_threads,
)

pytestmark = pytest.mark.timeout(120)

CLIENT = "spiffe://cluster.local/ns/apps/sa/client"
WAYPOINT = "spiffe://cluster.local/ns/ai/sa/waypoint"


@pytest.fixture(autouse=True)
def no_leaked_threads():
    """Every test leaves no thread behind (the mesh, its backends and grpc.aio)."""
    before = set(threading.enumerate())
    yield
    assert new_threads(before) == []


def test_get_goes_through_the_waypoint_with_the_callers_identity(tmp_path):
    """A GET to the Service VIP is carried node-1 -> waypoint -> node-2 -> a model server:
    HBONE from the client's node goes to the waypoint (its identity, port 15008), and the
    backend sees XFCC naming the waypoint and the original caller."""

    async def main() -> None:
        async with WaypointMesh(tmp_path) as m:
            r = await m.http("GET", "/debug/headers")
            assert r.status == 200, r
            assert r.headers["x-weft-served-by"] in ("ai/llm-v1", "ai/llm-v2")
            seen = r.json()["headers"]
            assert seen["x-forwarded-client-cert"] == f"By={WAYPOINT};URI={CLIENT}"
            (conn,) = m.tunnels["node-1"].pool.connections()
            assert conn.peer_id == WAYPOINT
            (inb,) = m.waypoint.inbound
            assert inb.peer_id == CLIENT

    uvloop.run(main())


def test_a_forged_xfcc_is_replaced(tmp_path):
    """An x-forwarded-client-cert sent by the caller never reaches the backend."""

    async def main() -> None:
        async with WaypointMesh(tmp_path) as m:
            r = await m.http(
                "GET",
                "/debug/headers",
                headers={"x-forwarded-client-cert": "URI=spiffe://evil/ns/x/sa/y"},
            )
            assert r.status == 200, r
            xfcc = r.json()["headers"]["x-forwarded-client-cert"]
            assert xfcc == f"By={WAYPOINT};URI={CLIENT}"

    uvloop.run(main())


def test_each_request_has_one_access_log_record_with_every_field(tmp_path):
    """The waypoint's request record (rendered from a template on the hot path): each field
    with its JSON type, a path with characters JSON must escape written back exactly, the
    request's annotations (trace id, normalized path) after the fixed fields."""

    async def main() -> None:
        log = tmp_path / "access.log"
        async with WaypointMesh(tmp_path, settings={"access_log": str(log)}) as m:
            ok = await m.http("GET", "/debug/headers")
            assert ok.status == 200, ok
            odd = await m.http("GET", "/a/./b/%22q?x=%22\\")
            assert odd.status in (200, 404), odd
        records = [json.loads(line) for line in log.read_text().splitlines()]
        reqs = [r for r in records if r.get("kind") == "request"]
        assert len(reqs) == 2, records
        first, second = reqs
        assert first["reporter"] == "waypoint" and first["source"] == CLIENT, first
        assert first["method"] == "GET" and first["path"] == "/debug/headers", first
        assert first["status"] == 200 and first["flags"] == "-", first
        assert first["destinationService"] == "llm.ai.svc.cluster.local", first
        assert first["destination"] in ("ai/llm-v1", "ai/llm-v2"), first
        assert type(first["bytesIn"]) is int and first["bytesOut"] > 0, first
        assert type(first["durationMs"]) is float and first["durationMs"] > 0, first
        assert len(first["traceId"]) == 32 and first["time"].endswith("Z"), first
        assert second["path"] == "/a/./b/%22q?x=%22\\", second
        assert second["normalizedPath"] == "/a/b/%22q?x=%22\\", second

    uvloop.run(main())


def test_keep_alive_idle_timeout_restarts_with_each_request_and_a_slow_head_gets_408(tmp_path):
    """The connection's one timer (downstream.py, re-armed lazily): requests spaced closer
    than idle_timeout keep a connection open for longer than idle_timeout in all, it is
    closed once idle for idle_timeout, and a head that never completes gets 408 after
    head_timeout."""

    async def main() -> None:
        idle = 2.0
        settings = {"idle_timeout": idle, "head_timeout": 0.4}
        async with WaypointMesh(tmp_path, settings=settings) as m:
            port = await m.listen("llm")
            r, w = await asyncio.open_connection("127.0.0.1", port)
            loop = asyncio.get_running_loop()
            start = sent = loop.time()
            # Requests 0.2 s apart (only a stall of 1.8 s could part two of them by the
            # idle timeout), until the connection has lived longer than idle_timeout.
            while loop.time() - start <= idle + 0.2:
                sent = loop.time()
                w.write(b"GET /debug/headers HTTP/1.1\r\nhost: llm\r\n\r\n")
                head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 10)
                assert head.startswith(b"HTTP/1.1 200"), head
                n = int(
                    next(
                        ln for ln in head.split(b"\r\n") if ln.lower().startswith(b"content-length")
                    ).split(b":")[1]
                )
                await r.readexactly(n)
                await asyncio.sleep(0.2)
            assert await asyncio.wait_for(r.read(), 10) == b""  # closed by the waypoint
            # Not before idle_timeout: its timer started once the last request had come
            # (less 10 ms: the loop's millisecond clock may fire a timer a little early).
            assert loop.time() - sent >= idle - 0.01, loop.time() - sent
            w.close()

            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(b"GET /debug/headers HTTP/1.1\r\nhost: ll")
            answer = await asyncio.wait_for(r.read(), 10)
            assert answer.startswith(b"HTTP/1.1 408"), answer
            w.close()

    uvloop.run(main())


def test_post_with_a_json_body_reaches_the_model_server(tmp_path):
    """A POST body is forwarded whole: the model server parses the OpenAI request and
    answers with usage counted from it."""

    async def main() -> None:
        async with WaypointMesh(tmp_path) as m:
            body = json.dumps({"model": "llama", "input": "hello mesh world"})
            r = await m.http(
                "POST", "/v1/embeddings", body, headers={"content-type": "application/json"}
            )
            assert r.status == 200, r
            doc = r.json()
            assert doc["object"] == "list" and len(doc["data"]) == 1
            assert doc["usage"]["prompt_tokens"] == 3

    uvloop.run(main())


def test_post_body_is_relayed_byte_exact(tmp_path):
    """A 256 KiB request body comes back unchanged from an echo backend (request and
    response bodies stream through both HBONE hops)."""

    async def main() -> None:
        echo = Backend("echo", app="echo", kind="echo")
        async with WaypointMesh(tmp_path, backends=[echo]) as m:
            payload = os.urandom(256 << 10)
            r = await m.http("POST", "/anything", payload, service="echo")
            assert r.status == 200, r.headers
            assert hashlib.sha256(r.body).digest() == hashlib.sha256(payload).digest()

    uvloop.run(main())


def test_keep_alive_serves_many_requests_on_one_connection(tmp_path):
    """Twenty requests on one client connection use one captured connection, one HBONE
    stream to the waypoint and one inbound HBONE connection at the waypoint."""

    async def main() -> None:
        async with WaypointMesh(tmp_path) as m, await m.connect() as c:
            for i in range(20):
                method = "POST" if i % 2 else "GET"
                body = json.dumps({"model": "llama", "input": f"n{i}"}) if i % 2 else None
                path = "/v1/embeddings" if i % 2 else "/v1/models"
                r = await c.request(method, path, body)
                assert r.status == 200, (i, r)
            pool = m.tunnels["node-1"].pool.connections()
            assert sum(conn.streams_opened for conn in pool) == 1
            assert len(m.waypoint.inbound) == 1

    uvloop.run(main())


SPLIT = """\
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: llm-route, namespace: ai}
spec:
  parentRefs: [{group: "", kind: Service, name: llm, port: 8000}]
  rules:
    - backendRefs:
        - {name: llm-v1, port: 8000, weight: 90}
        - {name: llm-v2, port: 8000, weight: 10}
"""


def test_httproute_weights_split_90_10(tmp_path):
    """An HTTPRoute applied at run time (a new revision through the Workload API) splits
    traffic by weight: of 400 requests, about 90% reach v1 (seeded engine; the bounds are
    more than 5 standard deviations wide)."""

    async def main() -> None:
        async with WaypointMesh(tmp_path, seed=1234) as m:
            await m.apply("route.yaml", SPLIT)
            served: collections.Counter[str] = collections.Counter()
            for _ in range(4):
                async with await m.connect() as c:
                    for _ in range(100):
                        r = await c.request("GET", "/v1/models")
                        assert r.status == 200, r
                        served[r.headers["x-weft-served-by"]] += 1
            assert sum(served.values()) == 400
            assert 0.80 <= served["ai/llm-v1"] / 400 <= 0.97, served
            assert served["ai/llm-v2"] > 0, served

    uvloop.run(main())


DENY_BATCH_CHAT = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: llm-l7, namespace: ai}
spec:
  targetRefs: [{kind: Service, group: "", name: llm}]
  action: DENY
  rules:
    - from: [{source: {principals: [cluster.local/ns/apps/sa/batch]}}]
      to: [{operation: {methods: [POST], paths: ["/v1/chat/*"]}}]
"""


def test_l7_deny_policy_answers_403_for_the_matching_caller_method_and_path(tmp_path):
    """A DENY AuthorizationPolicy on the Service is enforced at the waypoint on L7
    attributes: batch's POST /v1/chat/* gets 403, batch's other paths and the client's
    POST are allowed."""
    chat = json.dumps({"model": "llama", "messages": [{"role": "user", "content": "hi"}]})

    async def main() -> None:
        async with WaypointMesh(tmp_path) as m:
            await m.apply("l7.yaml", DENY_BATCH_CHAT)
            r = await m.http("POST", "/v1/chat/completions", chat, src="batch")
            assert r.status == 403, r
            assert b"RBAC: access denied" in r.body
            r = await m.http("POST", "/v1/embeddings", '{"model":"llama","input":"x"}', src="batch")
            assert r.status == 200, r
            r = await m.http("POST", "/v1/chat/completions", chat, src="client")
            assert r.status == 200, r
            await m.remove("l7.yaml")
            r = await m.http("POST", "/v1/chat/completions", chat, src="batch")
            assert r.status == 200, r

    uvloop.run(main())


def test_workload_api_gives_the_config_only_to_the_waypoint(tmp_path):
    """The harness's Workload API is the real one: a caller attested as a plain pod is
    refused the mesh config (403)."""

    async def main() -> None:
        async with WaypointMesh(tmp_path) as m:
            m.attest_as = "apps/client"
            link = AgentLink(m.waypoint.s.workload_socket, lambda s: None, lambda s: None)
            with pytest.raises(ConnectionError, match=r"refused the config \(403\)"):
                await link.fetch_config()
            m.attest_as = "ai/waypoint"
            assert (await link.fetch_config()).revision == m.revision

    uvloop.run(main())


def test_grpc_unary_call_through_the_waypoint(tmp_path):
    """A grpcio unary call (h2c prior knowledge) to a Service with appProtocol grpc is
    proxied over HTTP/2 end to end; the server sees the waypoint's XFCC."""

    async def main() -> None:
        async with WaypointMesh(tmp_path, grpc=True) as m:
            ch = await m.grpc_channel()
            reply = await ch.unary_unary(GRPC_UNARY)(b"ping", timeout=20)
            assert reply == b"ping"
            md = m.backend("grpc-echo").grpc_metadata[-1]
            assert md["x-forwarded-client-cert"] == f"By={WAYPOINT};URI={CLIENT}"

    uvloop.run(main())


def test_grpc_server_streaming_call_through_the_waypoint(tmp_path):
    """A server-streaming call delivers every message in order and ends with OK status."""

    async def main() -> None:
        async with WaypointMesh(tmp_path, grpc=True) as m:
            ch = await m.grpc_channel()
            call = ch.unary_stream(GRPC_STREAM)(b"5", timeout=20)
            got = [msg async for msg in call]
            assert got == [f"grpc-echo-{i}".encode() for i in range(5)]
            import grpc

            assert await call.code() == grpc.StatusCode.OK

    uvloop.run(main())


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_http2_prior_knowledge_through_the_waypoint(tmp_path):
    """curl --http2-prior-knowledge (h2c) is served by the waypoint over HTTP/2 and
    forwarded to an HTTP/1.1 backend."""

    async def main() -> None:
        async with WaypointMesh(tmp_path) as m:
            port = await m.listen("llm")
            proc = await asyncio.create_subprocess_exec(
                "curl",
                "-sS",
                "--max-time",
                "20",
                "--http2-prior-knowledge",
                "-w",
                "\n%{http_code} %{http_version}",
                f"http://127.0.0.1:{port}/debug/headers",
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            out, err = await asyncio.wait_for(proc.communicate(), 60)
            assert proc.returncode == 0, err.decode()
            body, _, tail = out.decode().rpartition("\n")
            assert tail == "200 2", (tail, body, err.decode())
            seen = json.loads(body)["headers"]
            assert seen["x-forwarded-client-cert"] == f"By={WAYPOINT};URI={CLIENT}"

    uvloop.run(main())


MODEL_ROUTE = """\
apiVersion: weft.dev/v1alpha1
kind: ModelRoute
metadata: {name: models, namespace: ai}
spec:
  targetRefs: [{name: llm}]
  rules:
    - {name: small, models: [small-model], backendRefs: [{name: small, port: 8000}]}
    - {name: big, models: [big-model], backendRefs: [{name: big, port: 8000}]}
"""

TOKEN_LIMIT = """\
apiVersion: weft.dev/v1alpha1
kind: TokenRateLimit
metadata: {name: per-caller, namespace: ai}
spec:
  targetRefs: [{name: llm}]
  limits: [{name: rpm, by: principal, requestsPerMinute: 3}]
"""


def test_model_route_streams_sse_and_a_request_limit_answers_429(tmp_path):
    """On a pod-less Service whose ModelRoute picks the backend Service by model name, a
    streamed chat completion arrives as SSE ending in [DONE] from the right model server; a
    TokenRateLimit of 3 requests per minute admits 3 of the caller's requests, then 429."""

    def chat(model: str, stream: bool = False) -> str:
        msgs = [{"role": "user", "content": "hello"}]
        return json.dumps({"model": model, "messages": msgs, "stream": stream})

    async def main() -> None:
        backends = [
            Backend("small-a", app="small", model="small-model", waypoint=False),
            Backend("big-a", app="big", model="big-model", waypoint=False),
        ]
        async with WaypointMesh(
            tmp_path, backends=backends, frontends=["llm"], extra={"route.yaml": MODEL_ROUTE}
        ) as m:
            r = await m.http("POST", "/v1/chat/completions", chat("big-model", stream=True))
            assert r.status == 200, r
            assert r.headers["x-weft-served-by"] == "ai/big-a"
            assert r.headers["content-type"].startswith("text/event-stream")
            assert r.body.endswith(b"data: [DONE]\n\n")
            # The Service's model list is its ModelRoute's, not one backend's.
            r = await m.http("GET", "/v1/models")
            assert r.status == 200 and r.headers["content-type"] == "application/json", r
            listed = {d["id"]: d["backends"] for d in r.json()["data"]}
            assert set(listed) == {"small-model", "big-model"}, listed
            assert listed["big-model"][0]["service"] == "ai/big:8000"
            await m.apply("limit.yaml", TOKEN_LIMIT)
            async with await m.connect() as c:
                codes = [
                    (await c.request("POST", "/v1/chat/completions", chat("small-model"))).status
                    for _ in range(5)
                ]
            assert codes == [200, 200, 200, 429, 429], codes
            r = await m.http("POST", "/v1/chat/completions", chat("small-model"), src="batch")
            assert r.status == 200, r  # another caller has its own budget

    uvloop.run(main())


def test_a_dead_waypoint_loop_makes_it_not_ready_and_stop(tmp_path):
    """The waypoint's long-running tasks are owned (agent/tasks.py): when one dies (here the
    agent link, which keeps its config current), the waypoint says not ready and stops as on
    SIGTERM, with the failure named, rather than serving a stale config while ready."""

    async def main() -> None:
        async with WaypointMesh(tmp_path) as m:
            wp = m.waypoint
            assert wp._ready() and not wp.stop_requested.is_set()

            async def broken() -> None:
                await asyncio.sleep(0)
                raise RuntimeError("lost the plot")

            wp.tasks.start(broken(), "agent-link")
            await asyncio.wait_for(wp.stop_requested.wait(), 5)
            status, _, _ = await wp._h_ready(None)  # type: ignore[arg-type]
            assert status == 503
            assert wp.failure is not None and "waypoint" in str(wp.failure)
            assert "'agent-link'" in str(wp.failure)

    asyncio.run(main())


def test_a_policy_on_the_waypoint_gateway_applies_to_what_it_serves(tmp_path):
    """Istio's way of putting L7 policy on a waypoint: targetRefs to its Gateway (kind
    Gateway, the waypoint's name) applies to every Service the waypoint serves."""
    chat = json.dumps({"model": "llama", "messages": [{"role": "user", "content": "hi"}]})
    on_gateway = DENY_BATCH_CHAT.replace(
        'targetRefs: [{kind: Service, group: "", name: llm}]',
        "targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: ai-waypoint}]",
    )
    other_waypoint = on_gateway.replace("name: ai-waypoint", "name: another-waypoint")

    async def main() -> None:
        async with WaypointMesh(tmp_path) as m:
            await m.apply("l7.yaml", on_gateway)
            r = await m.http("POST", "/v1/chat/completions", chat, src="batch")
            assert r.status == 403, r
            r = await m.http("POST", "/v1/chat/completions", chat, src="client")
            assert r.status == 200, r
            await m.apply("l7.yaml", other_waypoint)  # not this waypoint: not enforced here
            r = await m.http("POST", "/v1/chat/completions", chat, src="batch")
            assert r.status == 200, r

    uvloop.run(main())


EXTRA_POLICY = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-batch, namespace: ai}
spec:
  action: DENY
  rules: [{from: [{source: {principals: [cluster.local/ns/apps/sa/batch]}}]}]
"""


def test_config_changes_reach_the_waypoint_as_deltas_through_the_workload_api(tmp_path):
    """After its first config the waypoint gets only what changed (the real Workload API
    diffs what it served against the new snapshot); what it builds is what a full rebuild
    gives, for an added resource and for a removed one."""
    from agent.state import ConfigSnapshot

    def same(a: ConfigSnapshot, b: ConfigSnapshot) -> None:
        assert dict(a.sources) == dict(b.sources)
        assert dict(a.workloads_by_ip) == dict(b.workloads_by_ip)
        assert a.authorization == b.authorization and dict(a.endpoints) == dict(b.endpoints)

    async def main() -> None:
        async with WaypointMesh(tmp_path) as m:
            link = m.waypoint.link
            assert link.deltas == 0
            published = await m.apply("deny", EXTRA_POLICY)
            assert link.deltas == 1
            same(m.waypoint.snapshot, published)
            assert [p.name for p in m.waypoint.snapshot.authorization] == ["deny-batch"]
            published = await m.remove("deny")
            assert link.deltas == 2
            same(m.waypoint.snapshot, published)
            assert m.waypoint.snapshot.authorization == ()
            # Only the change travels: every other resource was rebuilt by the harness
            # (new objects), and equal ones are not sent again.
            sock = m.waypoint.s.workload_socket
            q = f"/v1/config?after={published.revision - 1}&epoch=loopback&delta=1"
            status, doc = await _get(sock, q, 5)
            assert status == 200 and doc["base"] == published.revision - 1
            assert doc["resources"] == []
            assert doc["removed"] == [["AuthorizationPolicy", "ai", "deny-batch"]]
            # A waypoint that asks without the opt-in (an older one) gets everything.
            old = AgentLink(m.waypoint.s.workload_socket, lambda s: None, lambda s: None)
            status, doc = await _get(
                m.waypoint.s.workload_socket, "/v1/config?after=1&epoch=loopback", 5
            )
            assert (
                status == 200
                and "base" not in doc
                and len(doc["resources"]) == len(published.sources)
            )
            assert (await old.fetch_config()).revision == published.revision

    uvloop.run(main())
