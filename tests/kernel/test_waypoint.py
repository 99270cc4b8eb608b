"""The L7 waypoint on the lab: real HTTP clients, real model servers, HBONE both ways.

One lab per module: a waypoint pod on node-1 serves Service ai/llm (three model-server
pods, two versions, both nodes); an OTLP sink collects spans. Needs root."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.lab import mesh as labmesh
from agent.lab.topology import Lab, LabState
from agent.netns import call_in
from tests.kernel.conftest import Mesh, build_mesh, metric, wait_until

pytestmark = pytest.mark.kernel

WAYPOINT_LAB = """
apiVersion: weft.dev/v1alpha1
kind: Lab
metadata: {name: __LAB__}
spec:
  nodes: [{name: node-1}, {name: node-2}]
  namespaces:
    - {name: apps, labels: {weft.dev/mesh: enabled}}
    - {name: ai, labels: {weft.dev/mesh: enabled}}
    - {name: obs}
  pods:
    - {name: client, namespace: apps, node: node-1, serviceAccount: client, labels: {app: client}}
    - {name: batch, namespace: apps, node: node-2, serviceAccount: batch, labels: {app: batch}}
    - {name: waypoint, namespace: ai, node: node-1, serviceAccount: waypoint,
       labels: {weft.dev/waypoint: ai-waypoint, weft.dev/mesh: disabled}}
    - {name: llm-v1-a, namespace: ai, node: node-2, serviceAccount: llm,
       labels: {app: llm, version: v1}}
    - {name: llm-v1-b, namespace: ai, node: node-1, serviceAccount: llm,
       labels: {app: llm, version: v1}}
    - {name: llm-v2, namespace: ai, node: node-2, serviceAccount: llm,
       labels: {app: llm, version: v2}}
    - {name: collector, namespace: obs, node: node-1, labels: {app: collector}}
  services:
    - {name: llm, namespace: ai, selector: {app: llm}, labels: {weft.dev/use-waypoint: ai-waypoint},
       ports: [{name: http, port: 8000, appProtocol: http}]}
    - {name: llm-v1, namespace: ai, selector: {app: llm, version: v1}, ports: [{port: 8000}]}
    - {name: llm-v2, namespace: ai, selector: {app: llm, version: v2}, ports: [{port: 8000}]}
"""

MODEL_PODS = ("ai/llm-v1-a", "ai/llm-v1-b", "ai/llm-v2")


def _sink(lab: Lab, state: LabState) -> dict[str, str]:
    out = Path(state.run_dir) / "spans.jsonl"
    lab.start_process(
        state,
        "otlp-sink",
        [sys.executable, "-m", "agent.lab.workloads.otlp_sink", "--out", str(out)],
        pod="obs/collector",
    )
    ip = state.pod("obs/collector").ip
    return {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{ip}:4318", "WEFT_HEAD_TIMEOUT": "1"}


@pytest.fixture(scope="module")
def wp(request: pytest.FixtureRequest) -> Iterator[Mesh]:
    for m in build_mesh(request, WAYPOINT_LAB, before_install=_sink):
        for pod in MODEL_PODS:
            version = m.state.pod(pod).labels["version"]
            m.lab.start_process(
                m.state,
                f"model-{pod.split('/')[1]}",
                [
                    sys.executable,
                    "-m",
                    "agent.lab.workloads.model_server",
                    "--port",
                    "8000",
                    "--model",
                    f"llama-{version}",
                    "--name",
                    pod,
                    "--tpot",
                    "0.01",
                    "--max-concurrency",
                    "0",
                ],
                pod=pod,
            )
            p = m.state.pod(pod)
            wait_until(lambda p=p: call_in(p.netns, _open, p.ip, 8000), f"{pod} serving")
        yield m


def _open(ip: str, port: int) -> bool:
    try:
        socket.create_connection((ip, port), timeout=0.5).close()
        return True
    except OSError:
        return False


def vip(m: Mesh, name: str = "llm") -> str:
    return next(s["clusterIP"] for s in m.state.services if s["name"] == name)


def chat(m: Mesh, pod: str = "apps/client", *args: str, n: int = 1) -> list[dict]:
    out = m.lab.run(
        pod,
        [
            sys.executable,
            "-m",
            "agent.lab.workloads.llm_client",
            f"http://{vip(m)}:8000",
            "-n",
            str(n),
            "--all-headers",
            *args,
        ],
        timeout=120,
    )
    assert out.returncode == 0, out.stderr.decode()[-2000:]
    return [json.loads(line) for line in out.stdout.decode().splitlines() if line.strip()]


def test_requests_through_the_waypoint_carry_the_callers_identity(wp: Mesh) -> None:
    rs = chat(wp, n=6)
    assert all(r["status"] == 200 for r in rs), rs
    assert {r["served_by"] for r in rs} == set(MODEL_PODS)  # round robin over endpoints
    xfcc = rs[0]["headers"]["x-seen-xfcc"]
    assert xfcc == (
        "By=spiffe://cluster.local/ns/ai/sa/waypoint;URI=spiffe://cluster.local/ns/apps/sa/client"
    )
    wpod = wp.state.pod("ai/waypoint")
    text = call_in(wpod.netns, _fetch, f"http://{wpod.ip}:15020/metrics")
    assert (
        metric(
            text,
            "istio_requests_total",
            reporter="waypoint",
            response_code="200",
            source_principal="spiffe://cluster.local/ns/apps/sa/client",
            destination_service_name="llm",
        )
        >= 6
    )


def _fetch(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=5) as r:
        return r.read().decode()  # type: ignore[no-any-return]


def test_a_forged_xfcc_from_the_caller_is_replaced(wp: Mesh) -> None:
    (r,) = chat(wp, "apps/client", "-H", "x-forwarded-client-cert: URI=spiffe://evil/ns/x/sa/y")
    assert r["headers"]["x-seen-xfcc"].endswith("URI=spiffe://cluster.local/ns/apps/sa/client")
    assert "evil" not in r["headers"]["x-seen-xfcc"]


def test_sse_arrives_token_by_token(wp: Mesh) -> None:
    (r,) = chat(wp, "apps/client", "--stream", "--include-usage", "--max-tokens", "12")
    assert r["status"] == 200 and r["done"] and r["usage"]["completion_tokens"] == 12
    # 12 tokens at 10 ms each: the first arrives long before the stream ends.
    assert r["ttft_s"] < r["total_s"] / 2, r


POLICY = """\
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


def test_l7_authorization_at_the_waypoint(wp: Mesh) -> None:
    try:
        wp.apply("l7.yaml", POLICY)
        wait_until(lambda: chat(wp, "apps/batch")[0]["status"] == 403, "batch denied", 10)
        assert chat(wp, "apps/client")[0]["status"] == 200
        r = wp.lab.run(
            "apps/batch",
            [
                sys.executable,
                "-m",
                "agent.lab.workloads.llm_client",
                f"http://{vip(wp)}:8000",
                "--api",
                "embeddings",
            ],
        )
        assert json.loads(r.stdout)["status"] == 200  # another path is still allowed
    finally:
        wp.remove("l7.yaml")


RAW = """
import socket, sys, time
s = socket.create_connection((sys.argv[1], 8000), timeout=10)
s.sendall(sys.argv[2].encode().decode("unicode_escape").encode("latin-1"))
data = b""
while True:
    try:
        chunk = s.recv(65536)
    except TimeoutError:
        break
    if not chunk:
        break
    data += chunk
print(data.split(b"\\r\\n", 1)[0].decode())
"""


def test_malformed_request_gets_400_and_slowloris_408_without_blocking_others(wp: Mesh) -> None:
    bad = wp.run(
        "apps/client", RAW, vip(wp), "GET / HTTP/1.1\\r\\nHost: x\\r\\nBad Header\\r\\n\\r\\n"
    )
    assert bad.stdout.decode().startswith("HTTP/1.1 400"), bad.stdout
    p = wp.state.pod("apps/client")
    from agent.netns import spawn

    slow = spawn(
        [sys.executable, "-c", RAW, vip(wp), "GET / HTTP/1.1\\r\\nHost: x\\r\\n"],
        netns=p.netns,
        cgroup=Path(p.cgroup),
        stdout=subprocess.PIPE,
    )
    t0 = time.monotonic()
    assert chat(wp)[0]["status"] == 200  # other callers are unaffected meanwhile
    out, _ = slow.communicate(timeout=30)
    assert out.decode().startswith("HTTP/1.1 408"), out
    assert time.monotonic() - t0 < 10


def test_trace_context_propagates_and_spans_are_exported(wp: Mesh) -> None:
    tid, parent = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    out = wp.lab.run(
        "apps/client",
        [
            sys.executable,
            "-c",
            "import json, urllib.request, sys\n"
            "r = urllib.request.Request(sys.argv[1], headers={'traceparent': sys.argv[2], "
            "'tracestate': 'vendor=1'})\n"
            "print(urllib.request.urlopen(r, timeout=10).read().decode())",
            f"http://{vip(wp)}:8000/debug/headers",
            f"00-{tid}-{parent}-01",
        ],
    )
    assert out.returncode == 0, out.stderr.decode()
    seen = json.loads(out.stdout)
    seen = seen.get("headers", seen)
    got_tp = seen["traceparent"]
    assert got_tp.startswith(f"00-{tid}-") and parent not in got_tp and got_tp.endswith("-01")
    assert seen["tracestate"] == "vendor=1"
    spans_file = Path(wp.state.run_dir) / "spans.jsonl"

    def spans() -> list[dict]:
        if not spans_file.exists():
            return []
        return [
            s for s in map(json.loads, spans_file.read_text().splitlines()) if s["traceId"] == tid
        ]

    got = wait_until(lambda: len(spans()) >= 2 and spans(), "spans exported", 15)
    server = next(s for s in got if s["kind"] == 2)
    client = next(s for s in got if s["kind"] == 3)
    assert server["parentSpanId"] == parent and client["parentSpanId"] == server["spanId"]
    assert got_tp.split("-")[2] == client["spanId"]
    assert server["service"] == "waypoint/ai-waypoint"


def test_weft_top_shows_the_service(wp: Mesh) -> None:
    import os

    proc = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "top", "--once", "--interval", "3", "-o", "json"],
        stdout=subprocess.PIPE,
        env={**os.environ, "WEFT_LAB": wp.lab.name},
    )
    chat(wp, n=8)
    out, _ = proc.communicate(timeout=60)
    rows = {r["service"]: r for r in json.loads(out)}
    assert rows["ai/llm"]["rps"] > 0 and rows["ai/llm"]["errorRate"] == 0.0
    assert rows["ai/llm"]["p99Ms"] is not None


def test_waypoint_workload_api_refuses_strangers(wp: Mesh) -> None:
    """A pod that is not the waypoint cannot read the mesh config from the node agent."""
    sock = labmesh.workload_socket(wp.state, "node-1")
    code = (
        "import socket, sys\n"
        "s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])\n"
        "s.sendall(b'GET /v1/config HTTP/1.1\\r\\nhost: a\\r\\nconnection: close\\r\\n\\r\\n')\n"
        "print(s.recv(100).split(b' ')[1].decode())"
    )
    assert wp.run("apps/client", code, str(sock)).stdout.decode().strip() == "403"
    svid = code.replace("/v1/config", "/v1/svid")
    assert wp.run("obs/collector", svid, str(sock)).stdout.decode().strip() == "403"
