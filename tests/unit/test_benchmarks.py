"""The benchmark harness's pure parts: statistics, parsers, report rendering, configs.

No timing is asserted anywhere: these check arithmetic and text, not speed.
"""

from __future__ import annotations

import math
import socket
import types

import pytest
import yaml

from agent.lab.workloads.loadrun import schedules
from benchmarks import agent_pods, controller_scale, lab_suite, proxies, report, stats
from benchmarks.clients import HttpReader, http_request, post_request
from benchmarks.httpecho import parse_head, response

# --------------------------------------------------------------------------- stats


def test_percentile_is_nearest_rank():
    values = list(range(1, 101))  # 1..100
    assert stats.percentile(values, 50) == 50
    assert stats.percentile(values, 90) == 90
    assert stats.percentile(values, 99) == 99
    assert stats.percentile(values, 99.9) == 100
    assert stats.percentile(values, 0) == 1
    assert stats.percentile([7], 99.9) == 7
    assert math.isnan(stats.percentile([], 50))


def test_summarize_and_added():
    s = stats.summarize_us([10.0, 20.0, 30.0, 40.0])
    assert (s["p50"], s["p90"], s["p99"], s["p99_9"]) == (20.0, 40.0, 40.0, 40.0)
    assert s["mean"] == 25.0 and s["max"] == 40.0 and s["count"] == 4
    base = stats.summarize_us([5.0, 10.0, 15.0, 20.0])
    assert stats.added(s, base) == {"p50": 10.0, "p90": 20.0, "p99": 20.0, "p99_9": 20.0}
    empty = stats.summarize_us([])
    assert math.isnan(empty["p50"]) and empty["count"] == 0


def test_percentile_keys_match_loadgen():
    assert [stats.percentile_key(p) for p in stats.PERCENTILES] == ["p50", "p90", "p99", "p99_9"]


def test_ratio_and_per_thousand_never_raise():
    assert stats.ratio(3.0, 2.0) == 1.5
    for a, b in ((1.0, 0.0), (None, 1.0), (1.0, None), (math.nan, 1.0)):
        assert math.isnan(stats.ratio(a, b))
    assert stats.per_thousand(0.5, 2000) == 0.25
    assert math.isnan(stats.per_thousand(1.0, 0))


@pytest.mark.parametrize("v", [0.3, 1.0, 1.5, 2.0, 63.9, 64.0, 100.0, 12345.6, 1e6])
def test_histogram_buckets_contain_their_values(v):
    lo, hi = stats.bucket_bounds(stats.bucket_of(v))
    assert lo <= v < hi
    if v >= 1.0:
        assert (hi - lo) / lo <= 1.0 / stats.SUB_BUCKETS + 1e-12


def test_histogram_percentiles_within_bucket_error():
    values = [float(x) for x in range(1, 5001)]
    h = stats.histogram(values)
    assert sum(h.values()) == 5000
    for p in (50.0, 90.0, 99.0, 99.9):
        exact = stats.percentile(values, p)
        approx = stats.histogram_percentile(h, p)
        assert exact <= approx <= exact * (1 + 1.0 / stats.SUB_BUCKETS) + 1
    assert math.isnan(stats.histogram_percentile({}, 50))


def test_percentile_curve_spans_what_the_samples_can_show():
    values = sorted(float(x) for x in range(1, 1001))
    pts = stats.percentile_curve(values, nines=4, points=30)
    assert pts[0] == (0.0, 1.0)
    assert pts[-1][0] == pytest.approx(99.9)  # 1,000 samples show three nines, not four
    assert [v for _, v in pts] == sorted(v for _, v in pts)
    assert stats.percentile_curve([]) == []
    assert stats.nines(99.0) == pytest.approx(2.0)


# --------------------------------------------------------------------------- parsers

WRK = """\
Running 4s test @ http://127.0.0.1:28080/echo
  2 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     3.01ms    1.20ms  45.00ms   90.00%
    Req/Sec    10.50k   500.00    11.00k    70.00%
  Latency Distribution
     50%  812.00us
     75%    1.20ms
     90%    2.50ms
     99%   10.10ms
  84123 requests in 4.00s, 95.00MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 4
Requests/sec:  21030.75
Transfer/sec:     23.75MB
"""


def test_parse_wrk():
    r = lab_suite.parse_wrk(WRK)
    assert r["requests"] == 84123
    assert r["rps"] == 21030.75
    assert r["seconds"] == 4.0
    assert r["errors"] == 7
    assert r["latency_us"] == {"p50": 812.0, "p75": 1200.0, "p90": 2500.0, "p99": 10100.0}


def test_parse_wrk_without_distribution_fails_loudly():
    with pytest.raises(ValueError, match="--latency"):
        lab_suite.parse_wrk("Requests/sec: 5\n")


def test_profile_summary_attributes_samples():
    raw = (
        'process 1:"python";thread (0x1);main (agent/main.py:10);flush (tunnel/hbone.py:5) 30\n'
        'process 1:"python";thread (0x1);main (agent/main.py:10);write (libc.so.6) 10\n'
        'process 1:"python";thread (0x2);epoll_wait (libc.so.6) 60\n'
    )
    p = lab_suite.profile_summary(raw, cpu_s=0.4, requests=1000)
    assert p["samples"] == 40 and p["idle_samples_dropped"] == 60
    assert p["cpu_us_per_request"] == pytest.approx(400.0)
    top = p["self"][0]
    assert top["function"] == "flush (tunnel/hbone.py)"
    assert top["share"] == pytest.approx(0.75)
    assert top["us_per_request"] == pytest.approx(300.0)
    incl = {r["function"]: r["share"] for r in p["inclusive"]}
    assert incl["main (agent/main.py)"] == pytest.approx(1.0)


# --------------------------------------------------------------------------- plan and registry


def test_workload_keys_are_unique_and_pinned_runs_come_first():
    for quick in (False, True):
        ws = lab_suite.workloads(quick)
        assert len({w.key for w in ws}) == len(ws)
        pinned = [w.pinned for w in ws]
        assert pinned == sorted(pinned, reverse=True)
        assert any(w.headline for w in ws)
        assert {w.protocol for w in ws} <= set(lab_suite.PORTS)


def test_full_plan_has_the_rates_and_connection_counts_asked_for():
    ws = lab_suite.workloads(False)
    rr = {(w.protocol, w.rate, w.connections) for w in ws if w.kind == "rr"}
    for conns in (1, 64):
        assert ("tcp", 100, conns) in rr or conns == 64
        assert ("tcp", 1000, conns) in rr
    assert ("tcp", 1000, 4) in rr
    assert {w.kind for w in ws} == {"rr", "sse", "max", "bulk", "connrate"}


def test_scenarios_name_existing_baselines_and_the_waypoint_is_measured_at_l7():
    for s in lab_suite.SCENARIOS.values():
        assert s.baseline is None or s.baseline in lab_suite.SCENARIOS
        assert s.protocols <= set(lab_suite.PORTS)
    wp = lab_suite.SCENARIOS["weft-waypoint"]
    # The waypoint is an HTTP proxy: it is compared on the HTTP workloads, like HAProxy,
    # and its own process is counted in the mesh's cost.
    assert wp.protocols == lab_suite.SCENARIOS["haproxy"].protocols
    assert "waypoint-mesh-waypoint" in wp.components
    assert set(lab_suite.AGENTS) <= set(wp.components)


def test_bench_lab_manifest_is_valid():
    from agent.lab.manifest import plan
    from controller.model.yamldoc import load_documents

    p = plan(load_documents(lab_suite.MANIFEST, "bench-lab.yaml")[0])
    pods = {x.key: x for x in p.pods}
    for pod in (*lab_suite.SERVER_PODS, "plain/client", "mesh/client"):
        assert pod in pods
    assert set(lab_suite.FAR_PODS) <= set(lab_suite.SERVER_PODS)
    assert not pods["plain/far"].meshed and pods["mesh/far"].meshed
    assert pods["mesh/near"].node == pods["mesh/client"].node != pods["mesh/far"].node
    services = {s["name"]: s for s in yaml.safe_load(lab_suite.MANIFEST)["spec"]["services"]}
    l7 = {port["name"]: port for port in services["far-l7"]["ports"]}
    # gRPC: the port's appProtocol makes the waypoint speak HTTP/2 to the server.
    assert l7["grpc"] == {"name": "grpc", "port": 50051, "appProtocol": "grpc"}
    assert l7["ai"]["appProtocol"] == "http"
    for name in ("far-l7", "far-ai"):
        assert services[name]["labels"] == {"weft.dev/use-waypoint": "bench-waypoint"}
        # Not mesh/far's pod: a port behind a waypoint is reachable only through it, and
        # weft-l4 dials mesh/far directly. Same node, so the paths compare.
        assert services[name]["selector"] == {"app": "far-l7"} != services["far"]["selector"]
    assert pods["mesh/far-l7"].labels == {"app": "far-l7"}
    assert pods["mesh/far-l7"].node == pods["mesh/far"].node
    assert [port["port"] for port in services["far-ai"]["ports"]] == [lab_suite.PORTS["ai"]]


def test_ai_policy_is_valid_and_targets_the_ai_service_only():
    from controller.model.base import parse_resource
    from controller.model.yamldoc import load_documents

    docs = [parse_resource(d.data) for d in load_documents(lab_suite.AI_POLICY, "ai.yaml")]
    assert [d.kind for d in docs] == ["TokenRateLimit", "ModelRoute"]
    for d in docs:
        assert [r.name for r in d.spec.target_refs] == ["far-ai"]
        assert d.metadata.namespace == "mesh"
    limit, route = docs
    # Never denies at benchmark rates: the cost measured is the stage's, not a 429's.
    (lim,) = limit.spec.limits
    assert lim.tokens_per_minute >= 10**9 and lim.requests_per_minute >= 10**9
    (rule,) = route.spec.rules
    assert rule.models == [lab_suite.AI_MODEL]
    assert [(b.name, b.port) for b in rule.backend_refs] == [("far", lab_suite.PORTS["ai"])]


def test_ai_bodies_are_openai_chat_completions_of_about_1kb():
    import json

    plain, stream = (json.loads(lab_suite.ai_chat_body(s)) for s in (False, True))
    assert plain["model"] == lab_suite.AI_MODEL and "stream" not in plain
    assert stream["stream"] is True
    assert [m["role"] for m in plain["messages"]] == ["system", "user"]
    assert plain["max_tokens"] == lab_suite.AI_SERVER["tokens"]
    assert 900 <= len(lab_suite.ai_chat_body()) <= 1200


def test_ai_policy_active_needs_the_route_and_the_limit_headers():
    ok = {
        "status": 200,
        "headers": {"x-weft-model-served": "bench-model", "x-ratelimit-limit-requests": "1"},
    }
    assert lab_suite.ai_policy_active(ok)
    assert not lab_suite.ai_policy_active({**ok, "status": 404})
    assert not lab_suite.ai_policy_active({"status": 200, "headers": {"x-weft-model-served": "m"}})
    assert not lab_suite.ai_policy_active(
        {"status": 200, "headers": {"x-ratelimit-limit-tokens": 1}}
    )
    assert not lab_suite.ai_policy_active({})


def test_grpc_and_ai_workloads_run_on_the_l7_proxies():
    ws = {w.key: w for w in lab_suite.workloads(quick=True)}
    unary, stream = ws["grpc-unary-200-c4"], ws["grpc-stream-100-c4"]
    assert (unary.protocol, unary.kind, unary.rate, unary.connections) == ("grpc", "rr", 200, 4)
    assert unary.messages == 0 and stream.messages == 10 and unary.pinned and stream.pinned
    assert ws["ai-chat-200-c4"].kind == "rr" and ws["ai-sse-ttft"].kind == "sse"
    assert {w.group for w in ws.values() if w.protocol in ("grpc", "ai")} == {"grpc", "ai"}
    sc = lab_suite.SCENARIOS
    for proto in ("grpc", "ai"):
        assert {n for n, s in sc.items() if proto in s.protocols} >= {
            "direct",
            "haproxy",
            "weft-waypoint",
        }
    ai = sc["weft-waypoint-ai"]
    assert ai.protocols == {"ai"} and ai.baseline == "direct"
    assert ai.components == sc["weft-waypoint"].components
    assert "weft-waypoint-ai" in report.WEFT


# --------------------------------------------------------------------------- proxies


def test_stunnel_configs(tmp_path):
    certs = proxies.CertFiles(tmp_path / "r", tmp_path / "c", tmp_path / "k", tmp_path / "b")
    routes = [proxies.Route("tcp", "127.0.0.1:18000", "10.244.2.2:19000")]
    client = proxies.stunnel_config("client", routes, certs)
    assert "[tcp]" in client and "client = yes" in client
    assert "accept = 127.0.0.1:18000" in client and "connect = 10.244.2.2:19000" in client
    assert "verifyChain = yes" in client and "sslVersionMin = TLSv1.3" in client
    assert "requireCert" not in client
    server = proxies.stunnel_config("server", routes, certs)
    assert "client = no" in server and "requireCert = yes" in server
    with pytest.raises(ValueError):
        proxies.stunnel_config("sidecar", routes, certs)


def test_haproxy_configs(tmp_path):
    certs = proxies.CertFiles(tmp_path / "r", tmp_path / "c", tmp_path / "k", tmp_path / "b")
    routes = [proxies.Route("http", "127.0.0.1:28080", "10.244.2.2:29080")]
    client = proxies.haproxy_config("client", routes, certs)
    assert "mode http" in client and "nbthread 1" in client
    # Every request is logged, as the waypoint logs it (same work on both sides).
    assert "log stdout format raw" in client and "option httplog" in client
    assert "server up 10.244.2.2:29080 ssl crt" in client and "verify required" in client
    assert "bind 127.0.0.1:28080\n" in client
    server = proxies.haproxy_config("server", routes, certs)
    assert "bind 127.0.0.1:28080 ssl crt" in server and "server up 10.244.2.2:29080\n" in server


def test_haproxy_h2_route_is_http2_on_every_leg(tmp_path):
    certs = proxies.CertFiles(tmp_path / "r", tmp_path / "c", tmp_path / "k", tmp_path / "b")
    client = proxies.haproxy_config(
        "client", [proxies.Route("grpc", "127.0.0.1:28051", "10.244.2.2:29051", h2=True)], certs
    )
    assert "bind 127.0.0.1:28051 proto h2\n" in client  # h2c prior knowledge from the app
    assert "server up 10.244.2.2:29051 ssl crt" in client and client.rstrip().endswith("alpn h2")
    server = proxies.haproxy_config(
        "server", [proxies.Route("grpc", "0.0.0.0:29051", "127.0.0.1:50051", h2=True)], certs
    )
    assert "verify required ssl-min-ver TLSv1.3 alpn h2\n" in server
    assert "server up 127.0.0.1:50051 proto h2\n" in server
    assert "http/1.1" not in client + server


def test_certificates_verify_against_the_root(tmp_path):
    from cryptography.x509.verification import PolicyBuilder, Store

    from controller.ca.spiffe import load_chain

    certs = proxies.make_certs(tmp_path / "certs")
    roots = load_chain(certs["client"].root.read_bytes())
    for role in ("client", "server"):
        (leaf,) = load_chain(certs[role].cert.read_bytes())
        PolicyBuilder().store(Store(roots)).build_client_verifier().verify(leaf, [])
        assert certs[role].key.stat().st_mode & 0o077 == 0
        assert b"PRIVATE KEY" in certs[role].bundle.read_bytes()


# --------------------------------------------------------------------------- clients, server


def test_open_loop_schedule_deals_requests_round_robin():
    s = schedules(rate=1000, duration=0.01, connections=3, t0=0)
    assert [len(x) for x in s] == [4, 3, 3]
    assert sorted(t for conn in s for t in conn) == [i * 1_000_000 for i in range(10)]


def _reader(data: bytes) -> tuple[HttpReader, socket.socket]:
    a, b = socket.socketpair()
    b.sendall(data)
    b.close()
    return HttpReader(a), a


def test_http_reader_reads_content_length_and_chunked_responses():
    chunked = (
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-type: application/json\r\n\r\n"
        b"5\r\nhello\r\n3;ext=1\r\n{}!\r\n0\r\nx-trailer: yes\r\n\r\n"
    )
    plain = b"HTTP/1.1 429 Too Many Requests\r\ncontent-length: 4\r\n\r\nslow"
    rd, sock = _reader(chunked + plain + chunked)
    with sock:
        assert rd.response() == 200
        assert rd.response() == 429
        assert rd.response() == 200
        assert rd.buf == b""
    rd, sock = _reader(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhelloXX")
    with sock, pytest.raises((ValueError, ConnectionError)):
        rd.response()


def test_post_request_frames_any_body():
    req = post_request("h", "/v1/chat/completions", b'{"a":1}', "application/json")
    head, _, body = req.partition(b"\r\n\r\n")
    assert head.startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")
    assert b"content-type: application/json" in head and b"content-length: 7" in head
    assert body == b'{"a":1}'
    assert http_request("h", size=3) == post_request(
        "h", "/echo", b"xxx", "application/octet-stream"
    )


def test_grpc_client_against_the_echo_server():
    """benchmarks.grpc_client and agent.lab.workloads.grpc_echo on loopback: unary and
    server-streaming calls complete, are checked, and are counted (closed loop, briefly)."""
    import asyncio
    import threading

    import grpc

    from agent.lab.workloads import grpc_echo
    from benchmarks import grpc_client

    started = threading.Event()
    box: dict = {}

    async def serve() -> None:
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((grpc_echo.handler(),))
        box["port"] = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        box["stop"] = asyncio.Event()
        box["loop"] = asyncio.get_running_loop()
        started.set()
        await box["stop"].wait()
        await server.stop(0)

    t = threading.Thread(target=asyncio.run, args=(serve(),), daemon=True)
    t.start()
    assert started.wait(10)
    try:
        for mode, messages in (("unary", 0), ("stream", 3)):
            out, lat = grpc_client.run(
                mode,
                "127.0.0.1",
                box["port"],
                rate=0,
                connections=2,
                duration=0.2,
                warmup=4,
                size=100,
                messages=messages,
            )
            assert out["errors"] == 0 and out["requests"] == len(lat) > 0
            if mode == "stream":
                assert out["messages"] == 3 and out["first_message_us"]["count"] == len(lat)
    finally:
        box["loop"].call_soon_threadsafe(box["stop"].set)
        t.join(10)


def test_grpc_echo_reads_the_message_count():
    from agent.lab.workloads.grpc_echo import DEFAULT_MESSAGES, messages_asked

    assert messages_asked((("x-messages", "7"), ("other", "1"))) == 7
    assert messages_asked(()) == messages_asked(None) == DEFAULT_MESSAGES
    with pytest.raises(ValueError):
        messages_asked((("x-messages", "-1"),))


def test_http_echo_framing():
    req = http_request("h", size=5, close=True)
    head, _, body = req.partition(b"\r\n\r\n")
    assert body == b"xxxxx"
    assert parse_head(head) == (5, True)
    assert parse_head(b"POST / HTTP/1.1\r\ncontent-length: 3") == (3, False)
    assert parse_head(b"GET / HTTP/1.0") == (0, True)
    out = response(b"abc", close=False)
    assert out.startswith(b"HTTP/1.1 200 OK\r\n") and out.endswith(b"\r\n\r\nabc")
    assert b"content-length: 3\r\n" in out and b"connection: close" not in out


# --------------------------------------------------------------------------- controller scale


def test_spread_and_config_docs():
    parts = controller_scale.spread(10, 3)
    assert [len(p) for p in parts] == [4, 3, 3]
    assert [x for p in parts for x in p] == list(range(10))
    docs = list(yaml.safe_load_all(controller_scale.config_docs(2, range(5, 8), rev=3, changed=6)))
    assert docs[0]["kind"] == "Node" and docs[0]["metadata"]["name"] == "n-002"
    assert [d["metadata"]["name"] for d in docs[1:]] == ["w-00005", "w-00006", "w-00007"]
    labels = {d["metadata"]["name"]: d["metadata"]["labels"] for d in docs[1:]}
    assert labels["w-00006"][controller_scale.LABEL] == "3"
    assert controller_scale.LABEL not in labels["w-00005"]
    assert all(d["spec"]["node"] == "n-002" for d in docs[1:])


# --------------------------------------------------------------------------- agent pods


def test_the_pods_manifest_is_a_valid_lab_with_shared_service_accounts():
    from agent.lab.manifest import plan
    from controller.model.yamldoc import load_documents

    lab = plan(load_documents(agent_pods.manifest(10), "pods.yaml")[0])
    callers = [p for p in lab.pods if p.namespace == "apps"]
    assert len(callers) == 10 and all(p.node == "node-1" for p in callers)
    assert len({p.service_account for p in callers}) == 3  # four pods to an account
    assert [s.name for s in lab.services] == ["echo"]


def test_the_pods_report_gives_both_counts_and_the_growth_per_pod():
    def mem(rss: float) -> dict:
        return {"rss_mb": rss, "pss_mb": rss - 30, "uss_mb": rss - 40, "threads": 13, "fds": 60}

    runs = [
        {
            "pods": n,
            "identities": n // 4,
            "requests_ok": 3 * n,
            "requests_failed": 0,
            "agent_idle": mem(80.0),
            "agent_after_traffic": mem(rss),
        }
        for n, rss in ((10, 82.0), (200, 87.0))
    ]
    doc = {"requests_per_pod": 3, "runs": runs, "growth_per_pod_kb": agent_pods.growth(*runs)}
    assert doc["growth_per_pod_kb"] == {"rss_mb": 26.9, "pss_mb": 26.9, "uss_mb": 26.9}
    text = "\n".join(agent_pods.report(doc))
    assert "| 200 | 50 | 600 / 0 | 80.0 | 87.0 / 57.0 / 47.0 | 13 | 60 |" in text
    assert "Growth per pod: RSS 26.9 KB, PSS 26.9 KB, USS 26.9 KB" in text
    assert "Failed: boom" in "\n".join(agent_pods.report({"error": "boom"}))


# --------------------------------------------------------------------------- report


def _m(scenario: str, workload: str, p50: float, p99: float, **kw: object) -> dict:
    lat = {"p50": p50, "p90": p50, "p99": p99, "p99_9": p99}
    return {"scenario": scenario, "workload": workload, "ok": True, "latency_us": lat,
            "errors": 0, "rps": 1000.0, "cpu_per_1k_total": 0.1, "cpu_s": {}, "work": 1000,
            **kw}  # fmt: skip


def _lab() -> dict:
    return {
        "scenarios": {
            "direct": {"title": "direct", "baseline": None},
            "weft-l4": {"title": "weft", "baseline": "direct"},
            "stunnel": {"title": "stunnel", "baseline": "direct"},
            "weft-waypoint": {"title": "waypoint", "baseline": "direct", "skipped": "not yet"},
        },
        "workloads": [
            {"key": "tcp-rr-1000-c4", "title": "TCP 1000", "kind": "rr", "headline": True},
            {"key": "bulk", "title": "bulk", "kind": "bulk"},
        ],
        "measurements": [
            _m("direct", "tcp-rr-1000-c4", 60, 200),
            _m(
                "weft-l4",
                "tcp-rr-1000-c4",
                260,
                600,
                cpu_per_1k_total=0.2,
                cpu_s={"agent-node-1": 0.1, "agent-node-2": 0.1},
            ),
            _m("stunnel", "tcp-rr-1000-c4", 160, 400),
            {"scenario": "direct", "workload": "bulk", "ok": True, "extra": {"MBps": 2000.0}},
            {"scenario": "weft-l4", "workload": "bulk", "ok": True, "extra": {"MBps": 500.0}},
            {"scenario": "stunnel", "workload": "bulk", "ok": True, "extra": {"MBps": 1000.0}},
        ],
        "memory": {"agent-node-1": {"rss_mb": 90.0, "pss_mb": 50.0, "uss_mb": 40.0}},
        "pinned_cpu": 1,
    }


def test_analyze_adds_baseline_deltas_and_ratios():
    lab = report.analyze(_lab())
    idx = report.index(lab)
    weft = idx[("tcp-rr-1000-c4", "weft-l4")]
    assert weft["added_us"]["p50"] == 200 and weft["added_us"]["p99"] == 400
    assert "added_us" not in idx[("tcp-rr-1000-c4", "direct")]
    assert idx[("bulk", "weft-l4")]["throughput_vs_baseline"] == 0.25
    (rr,) = [r for r in lab["ratios"] if r["workload"] == "tcp-rr-1000-c4"]
    assert rr["weft"] == "weft-l4" and rr["baseline"] == "stunnel"
    assert rr["added_p50"] == 2.0 and rr["added_p99"] == 2.0 and rr["cpu_per_1k"] == 2.0
    (bulk,) = [r for r in lab["ratios"] if r["workload"] == "bulk"]
    assert bulk["MBps"] == 0.5


def test_markdown_renders_every_section():
    doc = {
        "date": "today",
        "mode": "quick",
        "machine": {"cpu": "X", "cpus": 2, "tools": {"haproxy": "2.6"}},
        "lab": report.analyze(_lab()),
        "controller_scale": {
            "workloads": 10,
            "agents": 2,
            "workers": 1,
            "poll_interval": 0.1,
            "propagation": {
                "detect_ms": 100.0,
                "fanout_ms": 50.0,
                "p50_ms": 120.0,
                "total_ms": 150.0,
            },
            "signing": {"direct_per_s": 6000.0, "grpc_per_s": 1500.0},
        },
    }
    text = report.markdown(doc)
    assert "## Headline" in text and "| weft | 260 |" in text
    assert "+200" in text and "2.00\u00d7" in text
    assert "## Not run" in text and "not yet" in text
    assert "## Memory" in text and "## Controller scale" in text and "6,000" in text
    assert "## CPU per component" in text and "agent-node-1" in text


def _l7_lab() -> dict:
    first = {"p50": 300.0, "p90": 400.0, "p99": 500.0, "p99_9": 500.0}
    ms = []
    for scen, p50, cpu in (
        ("direct", 100, 0.0),
        ("haproxy", 200, 0.1),
        ("weft-waypoint", 600, 0.6),
        ("weft-waypoint-ai", 900, 1.0),
    ):
        ms.append(_m(scen, "ai-chat-200-c4", p50, 2 * p50, cpu_per_1k_total=cpu))
        if scen != "weft-waypoint-ai":
            extra = {"first_message_us": first, "messages": 10}
            ms.append(_m(scen, "grpc-stream-100-c4", p50, 2 * p50, extra=extra))
    return {
        "scenarios": {
            n: {"title": n, "baseline": None if n == "direct" else "direct"}
            for n in ("direct", "haproxy", "weft-waypoint", "weft-waypoint-ai")
        },
        "workloads": [
            {
                "key": "grpc-stream-100-c4",
                "title": "gRPC streams",
                "kind": "rr",
                "group": "grpc",
                "messages": 10,
            },
            {"key": "ai-chat-200-c4", "title": "AI chat", "kind": "rr", "group": "ai"},
        ],
        "measurements": ms,
        "ai_server": {"ttft": 0.0, "tpot": 0.0, "tokens": 8},
        "pinned_cpu": 1,
    }


def test_ai_stage_cost_is_the_waypoint_with_policy_minus_without():
    lab = report.analyze(_l7_lab())
    (cost,) = lab["stage_costs"]
    assert (cost["workload"], cost["scenario"], cost["reference"]) == (
        "ai-chat-200-c4",
        "weft-waypoint-ai",
        "weft-waypoint",
    )
    assert cost["latency_us"]["p50"] == 300 and cost["latency_us"]["p99"] == 600
    assert cost["cpu_per_1k"] == pytest.approx(0.4)
    assert cost["cpu_ratio"] == pytest.approx(1.0 / 0.6)
    pairs = {(r["workload"], r["weft"], r["baseline"]): r for r in lab["ratios"]}
    ai = pairs[("ai-chat-200-c4", "weft-waypoint-ai", "haproxy")]
    assert ai["added_p50"] == pytest.approx(8.0) and ai["cpu_per_1k"] == pytest.approx(10.0)
    assert ("grpc-stream-100-c4", "weft-waypoint", "haproxy") in pairs


def test_markdown_renders_the_grpc_and_ai_sections():
    text = report.markdown({"lab": report.analyze(_l7_lab())})
    general = text.split("## Request/response at fixed rates", 1)[1].split("## gRPC", 1)[0]
    assert "AI chat" not in general and "gRPC streams" not in general
    grpc = text.split("## gRPC (HTTP/2)", 1)[1].split("## AI policy", 1)[0]
    assert "### gRPC streams" in grpc and "Time to the first message" in grpc
    assert "| weft-waypoint | 300 | 400 | 500 |" in grpc
    ai = text.split("## AI policy", 1)[1]
    assert "### AI chat" in ai and "--ttft 0.0 --tpot 0.0" in ai
    assert "### What the AI stages cost" in ai
    assert "| ai-chat-200-c4 | weft-waypoint-ai \u2212 weft-waypoint | +300 |" in ai
    assert "+0.400 | 1.67\u00d7 |" in ai
    assert "weft-waypoint-ai ÷ haproxy" in text


def test_profile_section_names_each_scenario_and_process():
    one = {
        "cpu_us_per_request": 480.0,
        "samples": 900,
        "self": [{"function": "flush (hbone.py)", "share": 0.125, "us_per_request": 60.0}],
    }
    prof = {
        "weft-l4": {"python": {"requests": 8000, "agent-node-1": one}},
        "weft-waypoint": {
            "python": {"requests": 8000, "cpu_s": {}, "waypoint-mesh-waypoint": one},
            "native": {"requests": 2000, "agent-node-2": one},
        },
    }
    text = "\n".join(report.profile_section(prof))
    assert "weft-l4, TCP 1 KB" in text and "agent-node-1, outbound" in text
    assert "weft-waypoint, HTTP 1 KB" in text and "waypoint-mesh-waypoint, the L7 proxy" in text
    assert "agent-node-2, inbound (server side), native frames: 480 µs" in text
    assert "| flush (hbone.py) |" in text and "12.5 %" in text


def test_md_table_aligns_numbers_right():
    t = report.md_table(["a", "b"], [["x", "1,234"], ["y", report.DASH]])
    lines = t.splitlines()
    assert lines[1] == "|---|---:|"
    assert lines[2] == "| x | 1,234 |"
    assert report.fmt(math.nan) == report.DASH and report.fmt(1234.5) == "1,234"


def test_pyfloor_minimal_proxy_forwards_requests_on_one_upstream_connection():
    """The yardstick of benchmarks/pyfloor.py stays a working HTTP/1.1 proxy: keep-alive
    requests come back echoed, in order, over one upstream connection per client one."""
    import asyncio

    from benchmarks.httpecho import Echo
    from benchmarks.pyfloor import _Down

    async def main() -> None:
        loop = asyncio.get_running_loop()
        upstream_conns = []

        def echo() -> Echo:
            upstream_conns.append(1)
            return Echo()

        back = await loop.create_server(echo, "127.0.0.1", 0)
        up = back.sockets[0].getsockname()[1]
        front = await loop.create_server(lambda: _Down(("127.0.0.1", up)), "127.0.0.1", 0)
        r, w = await asyncio.open_connection("127.0.0.1", front.sockets[0].getsockname()[1])
        try:
            bodies = [b"first", b"x" * 3000, b"third"]
            for b in bodies:
                w.write(post_request("floor", "/echo", b, "text/plain"))
            got: list[bytes] = []
            for _ in bodies:
                head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 10)
                assert head.startswith(b"HTTP/1.1 200 "), head
                fields = dict(line.lower().split(b": ", 1) for line in head[:-4].split(b"\r\n")[1:])
                got.append(
                    await asyncio.wait_for(r.readexactly(int(fields[b"content-length"])), 10)
                )
            assert got == bodies
            assert upstream_conns == [1]
        finally:
            w.close()
            await w.wait_closed()
            front.close()
            back.close()
            await front.wait_closed()
            await back.wait_closed()

    asyncio.run(main())


def test_hopcost_measures_the_waypoint_hop_on_its_own_thread():
    """benchmarks/hopcost.py runs the real in-process mesh with the waypoint on a thread of
    its own, counts its Python calls per request (C functions left out) and stops it on
    its own loop: a short run through the mesh returns a count and a CPU figure, and
    leaves no thread behind."""
    import threading

    import uvloop

    from benchmarks import hopcost

    args = types.SimpleNamespace(hop="waypoint", requests=40, connections=2)
    before = set(threading.enumerate())
    r = uvloop.run(hopcost._run(args))
    assert r["requests"] == 40 and r["cpu_us_per_request"] > 0
    # --sse relays a streamed chat completion per request, --ai runs the AI stages with an
    # SQLite quota store: both through the same mesh, each more work than a plain request.
    for mode in ({"sse": True}, {"ai": True, "quota_store": None}):
        other = uvloop.run(
            hopcost._run(types.SimpleNamespace(hop="waypoint", requests=8, connections=1, **mode))
        )
        assert other["requests"] == 8, mode
        assert other["bytecodes_per_request"] > r["bytecodes_per_request"], mode
    # An HTTP/1.1 exchange through the waypoint is more than a handful of Python calls
    # (the destination's relay makes about 15); C functions are not counted.
    assert r["python_calls_per_request"] > 50
    # ... and many more bytecodes, most of them in the waypoint's own modules.
    assert r["bytecodes_per_request"] > 10 * r["python_calls_per_request"]
    assert any(k.startswith("agent/waypoint/") for k in r["bytecodes_by_module"])
    assert not any(k.startswith("~") for k in r["by_function_us"])
    assert "agent/waypoint/proxy.py" in r["by_module_us"]
    for t in set(threading.enumerate()) - before:
        t.join(10)
        assert not t.is_alive(), t
