"""The waypoint on the lab, through the real eBPF capture, driven by clients nobody here
wrote: grpcio (the C core), curl and the official `openai` SDK. The scenarios of
tests/unit/test_waypoint_paths.py, on the lab. Needs root.

One lab per module. The waypoint pod is on node-1; apps/client (node-1) reaches it through
its node agent's handoff, apps/batch (node-2) over HBONE. Services behind the waypoint:

- ai/grpc-echo (appProtocol grpc): agent.lab.workloads.grpc_echo on grpc-a (node-1) and
  grpc-b (node-2), each with a grpc.health.v1 server a test can switch to NOT_SERVING;
- ai/pool: three model servers (pool-a on node-1, pool-b and pool-c on node-2);
- ai/llm and ai/llm-tight (no pods of their own): a ModelRoute sends model `llama` to
  ai/pool; llm has a generous TokenRateLimit and denies apps/batch, llm-tight allows two
  requests a minute per caller.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from agent.netns import call_in
from tests.kernel.conftest import Mesh, build_mesh, metric, wait_until

pytestmark = pytest.mark.kernel

CLIENTS_LAB = """
apiVersion: weft.dev/v1alpha1
kind: Lab
metadata: {name: __LAB__}
spec:
  nodes: [{name: node-1}, {name: node-2}]
  namespaces:
    - {name: apps, labels: {weft.dev/mesh: enabled}}
    - {name: ai, labels: {weft.dev/mesh: enabled}}
  pods:
    - {name: client, namespace: apps, node: node-1, serviceAccount: client, labels: {app: client}}
    - {name: batch, namespace: apps, node: node-2, serviceAccount: batch, labels: {app: batch}}
    - {name: waypoint, namespace: ai, node: node-1, serviceAccount: waypoint,
       labels: {weft.dev/waypoint: ai-waypoint, weft.dev/mesh: disabled}}
    - {name: grpc-a, namespace: ai, node: node-1, serviceAccount: echo, labels: {app: grpc-echo}}
    - {name: grpc-b, namespace: ai, node: node-2, serviceAccount: echo, labels: {app: grpc-echo}}
    - {name: pool-a, namespace: ai, node: node-1, serviceAccount: model, labels: {app: pool}}
    - {name: pool-b, namespace: ai, node: node-2, serviceAccount: model, labels: {app: pool}}
    - {name: pool-c, namespace: ai, node: node-2, serviceAccount: model, labels: {app: pool}}
  services:
    - {name: grpc-echo, namespace: ai, selector: {app: grpc-echo},
       labels: {weft.dev/use-waypoint: ai-waypoint},
       ports: [{name: grpc, port: 9000, targetPort: 50051, appProtocol: grpc}]}
    - {name: pool, namespace: ai, selector: {app: pool},
       labels: {weft.dev/use-waypoint: ai-waypoint},
       ports: [{name: http, port: 8000, appProtocol: http}]}
    - {name: llm, namespace: ai, selector: {app: llm-front},
       labels: {weft.dev/use-waypoint: ai-waypoint}, ports: [{port: 8000, appProtocol: http}]}
    - {name: llm-tight, namespace: ai, selector: {app: llm-front},
       labels: {weft.dev/use-waypoint: ai-waypoint}, ports: [{port: 8000, appProtocol: http}]}
    - {name: llm-capped, namespace: ai, selector: {app: llm-front},
       labels: {weft.dev/use-waypoint: ai-waypoint}, ports: [{port: 8000, appProtocol: http}]}
"""

GRPC_PODS = ("ai/grpc-a", "ai/grpc-b")
MODEL_PODS = ("ai/pool-a", "ai/pool-b", "ai/pool-c")
GRPC_PORT = 9000

# The AI policies every test here runs under (one file: one revision to wait for).
AI_POLICIES = """\
apiVersion: weft.dev/v1alpha1
kind: ModelRoute
metadata: {name: models, namespace: ai}
spec:
  targetRefs: [{name: llm}, {name: llm-tight}, {name: llm-capped}]
  rules:
    - {name: llama, models: [llama], backendRefs: [{name: pool, port: 8000}]}
---
apiVersion: weft.dev/v1alpha1
kind: TokenRateLimit
metadata: {name: generous, namespace: ai}
spec:
  targetRefs: [{name: llm}]
  limits:
    - {name: plenty, by: principal, tokensPerMinute: 100000000, requestsPerMinute: 1000000}
---
apiVersion: weft.dev/v1alpha1
kind: TokenRateLimit
metadata: {name: tight, namespace: ai}
spec:
  targetRefs: [{name: llm-tight}]
  limits: [{name: two-per-minute, by: principal, requestsPerMinute: 2}]
---
apiVersion: weft.dev/v1alpha1
kind: TokenRateLimit
metadata: {name: capped, namespace: ai}
spec:
  targetRefs: [{name: llm-capped}]
  onExceed: truncate
  limits: [{name: sixty-tokens, by: principal, tokensPerMinute: 60}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-batch, namespace: ai}
spec:
  targetRefs: [{kind: Service, group: "", name: llm}]
  action: DENY
  rules:
    - from: [{source: {principals: [cluster.local/ns/apps/sa/batch]}}]
"""


@pytest.fixture(scope="module")
def wp(request: pytest.FixtureRequest) -> Iterator[Mesh]:
    py = sys.executable
    for m in build_mesh(request, CLIENTS_LAB):
        for pod in GRPC_PODS:
            argv = [py, "-m", "agent.lab.workloads.grpc_echo", "--port", "50051", "--name", pod]
            m.lab.start_process(m.state, _proc(pod), argv, pod=pod)
        for pod in MODEL_PODS:
            argv = [py, "-m", "agent.lab.workloads.model_server", "--port", "8000"]
            argv += ["--model", "llama", "--name", pod, "--ttft", "0.005", "--tpot", "0.001"]
            m.lab.start_process(m.state, _proc(pod), [*argv, "--max-concurrency", "0"], pod=pod)
        for pod in GRPC_PODS:
            m.wait_listening(pod, 50051)
        for pod in MODEL_PODS:
            m.wait_listening(pod)
        m.apply("ai.yaml", AI_POLICIES)
        yield m


def _proc(pod: str) -> str:
    return f"srv-{pod.split('/')[1]}"


def _fetch(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=5) as r:
        return r.read().decode()


def control(m: Mesh, pod: str, body: dict[str, Any]) -> None:
    import urllib.request

    p = m.state.pod(pod)

    def post() -> int:
        req = urllib.request.Request(
            f"http://{p.ip}:8000/control",
            json.dumps(body).encode(),
            {"content-type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status

    assert call_in(p.netns, post) == 200


def waypoint_metrics(m: Mesh) -> str:
    w = m.state.pod("ai/waypoint")
    return call_in(w.netns, _fetch, f"http://{w.ip}:15020/metrics")


# ---- 1. grpcio ------------------------------------------------------------------------


def grpc_calls(m: Mesh, pod: str, *calls: str) -> list[dict[str, Any]]:
    """agent.lab.workloads.grpc_client in `pod` against Service grpc-echo: one result per
    call (code, details, replies, served_by), every call with a 10 s deadline."""
    target = f"{m.vip('grpc-echo')}:{GRPC_PORT}"
    argv = [sys.executable, "-m", "agent.lab.workloads.grpc_client", target, *calls]
    out = m.lab.run(pod, argv, timeout=120)
    assert out.returncode == 0, out.stderr.decode()[-2000:]
    rows = [json.loads(line) for line in out.stdout.decode().splitlines() if line.strip()]
    assert [r["call"] for r in rows] == list(calls), rows
    return rows


@pytest.mark.parametrize("pod", ["apps/client", "apps/batch"])
def test_grpc_calls_of_every_kind_through_the_waypoint(wp: Mesh, pod: str) -> None:
    """grpcio through the waypoint, from the waypoint's node (the node agent hands the
    captured connection to the waypoint) and from the other node (HBONE): unary calls on
    one HTTP/2 connection are balanced over both replicas (both nodes) and echo their
    message; server streaming gives every message; client streaming gets the joined
    messages; bidi used as ping-pong gets each answer before it sends the next message (the
    waypoint forwards a request stream as it arrives); a deadline shorter than a slow
    method is DEADLINE_EXCEEDED, and the connection serves the next call. The waypoint's
    metrics count every call under the caller's identity."""

    def through_waypoint() -> float:
        return metric(
            waypoint_metrics(wp),
            "istio_requests_total",
            reporter="waypoint",
            destination_service_name="grpc-echo",
            source_principal=f"spiffe://cluster.local/ns/apps/sa/{pod.split('/')[1]}",
        )

    before = through_waypoint()
    unary = [f"unary:u{i}" for i in range(20)]
    rows = grpc_calls(
        wp,
        pod,
        *unary,
        "stream:s-msg:5",
        "client-stream:a,b,c",
        "bidi:p0,p1,p2",
        "sleep:10:0.5",
        "unary:after",
    )
    by = {r["call"]: r for r in rows}
    for i, spec in enumerate(unary):
        assert by[spec]["code"] == "OK" and by[spec]["replies"] == [f"u{i}"], by[spec]
    # Two replicas, 20 calls: both answer unless the balancer is broken (odds 2^-19).
    assert {by[s]["served_by"] for s in unary} == set(GRPC_PODS), rows
    stream = by["stream:s-msg:5"]
    assert stream["code"] == "OK" and stream["replies"] == ["s-msg"] * 5, stream
    client_stream = by["client-stream:a,b,c"]
    assert client_stream["code"] == "OK" and client_stream["replies"] == ["a+b+c"], client_stream
    bidi = by["bidi:p0,p1,p2"]
    assert bidi["code"] == "OK" and bidi["replies"] == ["p0", "p1", "p2"], bidi
    assert by["sleep:10:0.5"]["code"] == "DEADLINE_EXCEEDED", by["sleep:10:0.5"]
    assert by["unary:after"]["code"] == "OK" and by["unary:after"]["replies"] == ["after"]
    # Every call was the waypoint's, with the caller's identity (HBONE or handoff).
    assert through_waypoint() - before >= len(rows), rows


DENY_GRPC = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-batch-unary, namespace: ai}
spec:
  targetRefs: [{kind: Service, group: "", name: grpc-echo}]
  action: DENY
  rules:
    - from: [{source: {principals: [cluster.local/ns/apps/sa/batch]}}]
      to: [{operation: {paths: ["/weft.bench.Echo/Unary"]}}]
"""


def test_a_grpc_authorization_deny_is_permission_denied(wp: Mesh) -> None:
    """An AuthorizationPolicy DENY on the gRPC Service (caller batch, method Unary) is a
    PERMISSION_DENIED status for grpcio; the same caller's other methods and another
    caller's Unary still succeed."""
    try:
        wp.apply("deny-grpc.yaml", DENY_GRPC)
        denied, other = grpc_calls(wp, "apps/batch", "unary:no", "stream:yes:2")
        assert denied["code"] == "PERMISSION_DENIED", denied
        assert other["code"] == "OK" and other["replies"] == ["yes", "yes"], other
        (allowed,) = grpc_calls(wp, "apps/client", "unary:yes")
        assert allowed["code"] == "OK" and allowed["replies"] == ["yes"], allowed
    finally:
        wp.remove("deny-grpc.yaml")


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

# Runs in a replica's pod: weft.bench.Echo/SetHealth on its own server (127.0.0.1, so no
# capture and no waypoint in the way: the call reaches that replica and no other).
SET_HEALTH = """
import sys, grpc
from agent.lab.workloads.grpc_echo import SET_HEALTH
with grpc.insecure_channel("127.0.0.1:50051", options=[("grpc.enable_http_proxy", 0)]) as ch:
    print(ch.unary_unary(SET_HEALTH)(sys.argv[1].encode(), timeout=10).decode())
"""


def set_health(m: Mesh, pod: str, status: str) -> None:
    """What the grpc.health.v1 server of replica `pod` reports from now on."""
    out = m.run(pod, SET_HEALTH, status, timeout=60)
    assert out.returncode == 0, out.stderr.decode()[-2000:]
    assert out.stdout.decode().strip() == status, out.stdout


def test_a_not_serving_grpc_replica_leaves_and_comes_back_without_errors(wp: Mesh) -> None:
    """A BackendPolicy gRPC health check (grpc.health.v1 Check of "", every 1s, 2 failures
    out, 1 success back) on the grpc-echo Service, probed by the waypoint over the mesh
    (grpc-b is on the other node): both SERVING replicas take calls; grpc-b is switched to
    NOT_SERVING while grpcio calls continuously (one channel) and is marked unhealthy (the
    waypoint counts the failed probes and the health change) without a single failed call,
    and then every call is grpc-a's; switched back to SERVING the same way, grpc-b comes
    back (a healthy event), again without a failed call, and takes calls again."""

    def events(kind: str) -> float:
        return metric(waypoint_metrics(wp), "weft_waypoint_endpoint_events_total", kind=kind)

    def probe_failures() -> float:
        return metric(
            waypoint_metrics(wp),
            "weft_waypoint_backend_events_total",
            backend="ai/grpc-echo:9000",
            event="health_check_failures",
        )

    def client_calls() -> float:
        return metric(
            waypoint_metrics(wp),
            "istio_requests_total",
            reporter="waypoint",
            destination_service_name="grpc-echo",
            source_principal="spiffe://cluster.local/ns/apps/sa/client",
        )

    def switch(status: str, kind: str) -> list[dict[str, Any]]:
        """Switch grpc-b to `status` while apps/client calls without pause on one channel
        (two unary calls, a 100 ms Sleep call, 40 times: about 5 s), then, if need be,
        keep calling until the waypoint counts a `kind` event. Every call made."""
        before, sent = events(kind), client_calls()
        paced = [c for i in range(40) for c in (f"unary:{i}a", f"unary:{i}b", "sleep:0.1")]
        with ThreadPoolExecutor(1) as pool:
            running = pool.submit(grpc_calls, wp, "apps/client", *paced)
            # Switch once the client's first two calls (one per replica) are through.
            wait_until(lambda: running.done() or client_calls() - sent >= 2, "calls", 60)
            set_health(wp, "ai/grpc-b", status)
            rows = running.result()
        for _ in range(10):  # bounded: only if the transition outlasted the client
            if events(kind) > before:
                return rows
            rows += grpc_calls(wp, "apps/client", *paced[:30])
        raise AssertionError(f"no {kind} event: {waypoint_metrics(wp)[-3000:]}")

    def served(n: int, tag: str) -> Counter[str | None]:
        rows = grpc_calls(wp, "apps/client", *(f"unary:{tag}{i}" for i in range(n)))
        assert all(r["code"] == "OK" for r in rows), rows
        return Counter(r["served_by"] for r in rows)

    try:
        wp.apply("grpc-health.yaml", GRPC_HEALTH)
        assert set(served(10, "both")) == set(GRPC_PODS)
        failures = probe_failures()

        rows = switch("NOT_SERVING", "unhealthy")
        assert [r for r in rows if r["code"] != "OK"] == [], rows
        # The calls spanned the switch: grpc-b answered some before it left.
        assert "ai/grpc-b" in {r["served_by"] for r in rows}, rows
        assert probe_failures() - failures >= 2
        assert served(20, "a-only") == {"ai/grpc-a": 20}

        rows = switch("SERVING", "healthy")
        assert [r for r in rows if r["code"] != "OK"] == [], rows
        assert set(served(20, "back")) == set(GRPC_PODS)
    finally:
        set_health(wp, "ai/grpc-b", "SERVING")
        wp.remove("grpc-health.yaml")


# ---- 2. curl --------------------------------------------------------------------------


def curl(m: Mesh, *args: str, data: bytes | None = None) -> tuple[str, str]:
    """/usr/bin/curl in apps/client; (body, "STATUS HTTP_VERSION")."""
    argv = ["/usr/bin/curl", "-sS", "--max-time", "20", "-w", "\n%{http_code} %{http_version}"]
    if data is not None:
        argv += ["-H", "content-type: application/json", "--data-binary", "@-"]
    out = m.lab.run("apps/client", [*argv, *args], input=data, timeout=60)
    assert out.returncode == 0, out.stderr.decode()
    body, _, tail = out.stdout.decode().rpartition("\n")
    return body, tail


def chat_body(words: int) -> bytes:
    prompt = " ".join(f"w{i}" for i in range(words))
    return json.dumps(
        {"model": "llama", "messages": [{"role": "user", "content": prompt}]}
    ).encode()


def test_curl_http2_upgrade_and_prior_knowledge_through_the_waypoint(wp: Mesh) -> None:
    """curl --http2 offers an h2c upgrade: the waypoint serves the GET and a POST with a
    3000-word body over HTTP/1.1 (no Upgrade header reaches the model server); curl
    --http2-prior-knowledge POSTs over HTTP/2. All 200, and the model counted every word
    of the prompt (the body arrived whole)."""
    base = f"http://{wp.vip('pool')}:8000"
    body, tail = curl(wp, "--http2", f"{base}/v1/models")
    assert tail == "200 1.1", (tail, body)
    assert [x["id"] for x in json.loads(body)["data"]] == ["llama"]
    body, tail = curl(wp, "--http2", f"{base}/debug/headers")
    assert tail == "200 1.1", (tail, body)
    assert "upgrade" not in json.loads(body)["headers"], body
    for mode, version in (("--http2", "1.1"), ("--http2-prior-knowledge", "2")):
        body, tail = curl(wp, mode, f"{base}/v1/chat/completions", data=chat_body(3000))
        assert tail == f"200 {version}", (mode, tail, body)
        answer = json.loads(body)
        assert answer["usage"]["prompt_tokens"] == 3000, (mode, answer)
        assert answer["usage"]["completion_tokens"] == 16, (mode, answer)
        assert len(answer["choices"][0]["message"]["content"].split()) == 16, (mode, answer)


# ---- 3. the openai SDK ----------------------------------------------------------------

# Runs in a pod: the official SDK, no retries of its own; one JSON line per call.
OPENAI = """
import json, sys
import openai
base, calls = sys.argv[1], json.loads(sys.argv[2])
client = openai.OpenAI(base_url=base, api_key="lab", max_retries=0, timeout=30.0)
for c in calls:
    content = "x" * c["size"] if "size" in c else "hello mesh"
    try:
        raw = client.chat.completions.with_raw_response.create(
            model=c.get("model", "llama"), messages=[{"role": "user", "content": content}]
        )
        r = raw.parse()
        out = {"ok": True, "content": r.choices[0].message.content,
               "completion_tokens": r.usage.completion_tokens,
               "served_by": raw.headers.get("x-weft-served-by")}
    except openai.APIStatusError as e:
        out = {"ok": False, "error": type(e).__name__, "status": e.status_code, "code": e.code,
               "type": e.type, "param": e.param, "body": e.body,
               "retry_after": e.response.headers.get("retry-after"),
               "classes": [k.__name__ for k in type(e).__mro__]}
    except openai.APIError as e:
        out = {"ok": False, "error": type(e).__name__, "message": str(e)}
    print(json.dumps(out), flush=True)
"""


def sdk(m: Mesh, pod: str, service: str, *calls: dict[str, Any]) -> list[dict[str, Any]]:
    """The openai SDK in `pod` against `service`: one result per call (a completion, or
    the exception's class, status, code, type, param and body)."""
    base = f"http://{m.vip(service)}:8000/v1"
    out = m.run(pod, OPENAI, base, json.dumps(calls), timeout=120)
    assert out.returncode == 0, out.stderr.decode()[-2000:]
    rows = [json.loads(line) for line in out.stdout.decode().splitlines() if line.strip()]
    assert len(rows) == len(calls), rows
    return rows


def test_the_openai_sdk_completes_a_chat_and_parses_404_and_413(wp: Mesh) -> None:
    """On a Service with a ModelRoute and a TokenRateLimit, the SDK gets a chat completion
    from a model replica; an unknown model is NotFoundError (model_not_found, param model,
    invalid_request_error); a body over 16 MiB is an APIStatusError 413 of type
    invalid_request_error (payload_too_large); and the connection still completes a chat."""
    ok, missing, large, again = sdk(
        wp, "apps/client", "llm", {}, {"model": "no-such-model"}, {"size": 17 << 20}, {}
    )
    assert ok["ok"] and len(ok["content"].split()) == 16, ok
    assert ok["completion_tokens"] == 16 and ok["served_by"] in MODEL_PODS, ok
    assert missing["error"] == "NotFoundError" and missing["status"] == 404, missing
    assert missing["code"] == "model_not_found" and missing["param"] == "model", missing
    assert missing["type"] == "invalid_request_error", missing
    assert large["status"] == 413 and "APIStatusError" in large["classes"], large
    assert large["type"] == "invalid_request_error", large
    assert large["code"] == "payload_too_large", large
    assert again["ok"], again


def test_the_openai_sdk_sees_an_authorization_deny_as_permission_denied(wp: Mesh) -> None:
    """A DENY AuthorizationPolicy on the AI Service (caller apps/batch, on the other node:
    over HBONE) is PermissionDeniedError: 403, type permission_error, code
    rbac_access_denied."""
    (denied,) = sdk(wp, "apps/batch", "llm", {})
    assert denied["error"] == "PermissionDeniedError" and denied["status"] == 403, denied
    assert denied["code"] == "rbac_access_denied", denied
    assert denied["type"] == "permission_error", denied


def test_the_openai_sdk_sees_a_token_limit_as_rate_limit_error(wp: Mesh) -> None:
    """A TokenRateLimit of two requests a minute: two completions, then RateLimitError
    (429, rate_limit_error, rate_limited) with a retry-after of at least a second."""
    rows = sdk(wp, "apps/client", "llm-tight", {}, {}, {})
    assert rows[0]["ok"] and rows[1]["ok"], rows
    limited = rows[2]
    assert limited["error"] == "RateLimitError" and limited["status"] == 429, limited
    assert limited["code"] == "rate_limited" and limited["type"] == "rate_limit_error", limited
    assert int(limited["retry_after"]) >= 1, limited


STREAM = """
import json, sys
import openai
client = openai.OpenAI(base_url=sys.argv[1], api_key="lab", max_retries=0, timeout=30.0)
tokens, error = 0, None
try:
    stream = client.chat.completions.create(
        model="llama", messages=[{"role": "user", "content": "a long answer"}], stream=True
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            tokens += 1
except openai.APIError as e:
    error = {"class": type(e).__name__, "message": e.message, "code": e.code, "type": e.type}
print(json.dumps({"tokens": tokens, "error": error}))
"""


def test_a_stream_past_its_token_limit_is_truncated_with_an_error_the_sdk_raises(
    wp: Mesh,
) -> None:
    """TokenRateLimit onExceed: truncate, 60 tokens a minute, answers of 200 tokens: the
    stream is charged as it goes and ended soon after the limit with an OpenAI-style error
    event, which the official SDK raises as APIError (code rate_limit_exceeded)."""
    try:
        for pod in MODEL_PODS:
            control(wp, pod, {"tokens": 200})
        out = wp.run("apps/client", STREAM, f"http://{wp.vip('llm-capped')}:8000/v1", timeout=60)
        assert out.returncode == 0, out.stderr.decode()[-2000:]
        got = json.loads(out.stdout)
    finally:
        for pod in MODEL_PODS:
            control(wp, pod, {"reset": True})
    assert got["error"] is not None, got
    assert got["error"]["code"] == "rate_limit_exceeded", got
    assert "truncated" in got["error"]["message"], got
    # Cut within a few charge steps (16 tokens each) of the limit, not at the stream's end.
    assert 48 <= got["tokens"] < 200, got


REQUEST_TIMEOUT = """\
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: llm-timeout, namespace: ai}
spec:
  parentRefs: [{group: "", kind: Service, name: llm, port: 8000}]
  rules:
    - timeouts: {request: 1s}
"""


def test_the_openai_sdk_sees_a_route_timeout_as_504(wp: Mesh) -> None:
    """HTTPRoute timeouts.request (1s) on the AI Service, every model replica answering
    after 5s: InternalServerError 504, type timeout_error, code upstream_timeout."""
    try:
        wp.apply("timeout.yaml", REQUEST_TIMEOUT)
        for pod in MODEL_PODS:
            control(wp, pod, {"latency": 5.0})
        (late,) = sdk(wp, "apps/client", "llm", {})
        assert late["error"] == "InternalServerError" and late["status"] == 504, late
        assert late["code"] == "upstream_timeout" and late["type"] == "timeout_error", late
    finally:
        for pod in MODEL_PODS:
            control(wp, pod, {"reset": True})
        wp.remove("timeout.yaml")


# ---- 4. outlier ejection on an AI route -----------------------------------------------

OUTLIER = """\
apiVersion: weft.dev/v1alpha1
kind: BackendPolicy
metadata: {name: pool, namespace: ai}
spec:
  targetRefs: [{name: pool, port: 8000}]
  outlierDetection: {consecutive5xxErrors: 3, baseEjectionTime: 120s, maxEjectionPercent: 67}
"""


def test_a_killed_and_a_failing_replica_are_ejected_on_an_ai_route(wp: Mesh) -> None:
    """Three model replicas behind a ModelRoute with a TokenRateLimit and outlier detection
    (3 consecutive 5xx): one replica's server is killed (connect failures), another answers
    503 to everything. After at most a few failed requests both are ejected (the waypoint
    counts two ejections), and of 200 requests after that at most one fails (< 1%) and all
    are served by the healthy replica. Runs last: it kills pool-b."""
    wp.apply("outlier.yaml", OUTLIER)
    wp.lab.stop_process(wp.state, _proc("ai/pool-b"))
    control(wp, "ai/pool-c", {"error_rate": 1.0, "error_status": 503})

    def ejections() -> float:
        return metric(
            waypoint_metrics(wp),
            "weft_waypoint_backend_events_total",
            backend="ai/pool:8000",
            event="ejections",
        )

    before = ejections()
    statuses: Counter[int] = Counter()
    for _ in range(5):  # bounded: at most 5 x 10 requests
        statuses.update(r["status"] for r in wp.llm_client("apps/client", "--model", "llama", n=10))
        if ejections() - before >= 2:
            break
    assert ejections() - before >= 2, (statuses, waypoint_metrics(wp)[-3000:])
    # Each bad replica fails at most 3 tries before it is ejected.
    assert sum(n for s, n in statuses.items() if s != 200) <= 6, statuses

    rs = wp.llm_client("apps/client", "--model", "llama", n=200)
    failed = [r["status"] for r in rs if r["status"] != 200]
    assert len(failed) <= 1, Counter(r["status"] for r in rs)
    served = Counter(r.get("served_by") for r in rs if r["status"] == 200)
    assert set(served) == {"ai/pool-a"}, served
