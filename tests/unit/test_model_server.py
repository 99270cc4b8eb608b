"""The sample model server (a test workload standing in for vLLM) and its client.

Servers run in-process on 127.0.0.1, port 0, in a thread (ServerThread); the SIGTERM test
and one client test use subprocesses. No root needed.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import math
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.lab.workloads import llm_client
from agent.lab.workloads.llm_client import Conn, iter_body, read_head, send_request
from agent.lab.workloads.model_server import Behaviour, ServerConfig, ServerThread

ROOT = Path(__file__).resolve().parents[2]
FAST = Behaviour(ttft=0.0, tpot=0.0)


@pytest.fixture
def server() -> Iterator[ServerThread]:
    with ServerThread(ServerConfig(model="llama", name="pod-a"), Behaviour(ttft=0, tpot=0)) as st:
        yield st


def request(
    conn: Conn,
    method: str,
    path: str,
    body: Any = None,
    headers: list[tuple[str, str]] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    raw = body if isinstance(body, bytes) else b"" if body is None else json.dumps(body).encode()
    send_request(conn, method, "t", path, headers=headers or [], body=raw)
    resp = read_head(conn)
    data = b"".join(iter_body(conn, resp, method))
    return resp.status, dict(resp.headers), data


def call(
    st: ServerThread, method: str, path: str, body: Any = None, **kw: Any
) -> tuple[int, dict[str, str], Any]:
    conn = Conn(st.host, st.port, 10)
    try:
        status, headers, data = request(conn, method, path, body, **kw)
    finally:
        conn.close()
    ctype = headers.get("content-type", "")
    return status, headers, json.loads(data) if ctype.startswith("application/json") else data


def chat(content: str, **extra: Any) -> dict[str, Any]:
    return {"model": "asked", "messages": [{"role": "user", "content": content}], **extra}


def metrics(st: ServerThread) -> dict[str, float]:
    """Sample name (+ sorted labels other than model_name) -> value."""
    status, _, text = call(st, "GET", "/metrics")
    assert status == 200
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text.decode()):
        for s in fam.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k != "model_name")
            out[s.name + (f"{{{labels}}}" if labels else "")] = s.value
    return out


def sse_events(data: bytes) -> list[Any]:
    events = []
    for block in data.decode().split("\n\n"):
        if block.startswith("data: "):
            payload = block[len("data: ") :]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


# --------------------------------------------------------------------------- completions


def test_chat_usage_model_and_identity_headers(server: ServerThread) -> None:
    body = {
        "model": "asked-for",
        "messages": [
            {"role": "system", "content": "be  brief"},
            {"role": "user", "content": [{"type": "text", "text": "hello there world"}]},
        ],
    }
    status, headers, out = call(server, "POST", "/v1/chat/completions", body)
    assert status == 200
    assert out["object"] == "chat.completion"
    assert out["model"] == "llama"  # the server's --model, not the name asked for
    assert out["usage"]["prompt_tokens"] == 5  # whitespace-separated words of all messages
    assert out["usage"]["completion_tokens"] == 16  # default --tokens
    assert out["usage"]["total_tokens"] == 21
    msg = out["choices"][0]["message"]
    assert msg["role"] == "assistant" and len(msg["content"].split()) == 16
    assert out["choices"][0]["finish_reason"] == "stop"
    assert headers["x-weft-served-by"] == "pod-a"
    assert headers["x-model-server-model"] == "llama"
    assert "x-seen-xfcc" not in headers

    # max_tokens below --tokens caps the answer; the same request gets the same words.
    s1, _, a = call(server, "POST", "/v1/chat/completions", chat("one two", max_tokens=3))
    s2, h2, b = call(
        server,
        "POST",
        "/v1/chat/completions",
        chat("one two", max_completion_tokens=3),
        headers=[("x-forwarded-client-cert", "By=spiffe://weft/ns/ai/sa/model")],
    )
    assert s1 == s2 == 200
    assert a["usage"] == b["usage"] and a["usage"]["completion_tokens"] == 3
    assert a["choices"][0]["finish_reason"] == "length"
    assert a["choices"][0]["message"] == b["choices"][0]["message"]
    assert a["id"] != b["id"]  # a fresh answer, not a cached one
    assert h2["x-seen-xfcc"] == "By=spiffe://weft/ns/ai/sa/model"
    # A prefix of the 16-word answer, as with greedy decoding.
    _, _, full = call(server, "POST", "/v1/chat/completions", chat("one two"))
    assert full["choices"][0]["message"]["content"].startswith(
        a["choices"][0]["message"]["content"]
    )


def test_completions_and_echo_model() -> None:
    cfg = ServerConfig(model="llama", echo_model=True)
    with ServerThread(cfg, Behaviour(ttft=0, tpot=0, tokens=5)) as st:
        status, _, out = call(st, "POST", "/v1/completions", {"model": "alias", "prompt": "a b"})
        assert status == 200 and out["object"] == "text_completion"
        assert out["model"] == "alias"
        assert out["usage"] == {
            "prompt_tokens": 2,
            "completion_tokens": 5,
            "total_tokens": 7,
            "prompt_tokens_details": {"cached_tokens": 0},
        }
        assert len(out["choices"][0]["text"].split()) == 5
        _, _, ids = call(st, "POST", "/v1/completions", {"prompt": [1, 2, 3], "max_tokens": 50})
        assert ids["usage"]["prompt_tokens"] == 3 and ids["usage"]["completion_tokens"] == 5
        assert ids["model"] == "llama"  # no model asked for: the server's own
        status, _, models = call(st, "GET", "/v1/models")
        assert status == 200 and [m["id"] for m in models["data"]] == ["llama"]


def test_strict_model_rejects_other_models() -> None:
    cfg = ServerConfig(model="llama", aliases=("llama-8b",), strict_model=True)
    with ServerThread(cfg, FAST) as st:
        assert call(st, "POST", "/v1/chat/completions", chat("x") | {"model": "llama-8b"})[0] == 200
        status, _, out = call(st, "POST", "/v1/chat/completions", chat("x") | {"model": "gpt"})
        assert status == 404 and out["error"]["param"] == "model"


# --------------------------------------------------------------------------- streaming


def read_stream(
    st: ServerThread, body: dict[str, Any]
) -> tuple[list[tuple[float, bytes]], float, dict[str, str]]:
    """(arrival time, chunk) for each HTTP chunk, the time the request was sent, headers."""
    conn = Conn(st.host, st.port, 10)
    try:
        t0 = time.monotonic()
        send_request(
            conn, "POST", "t", "/v1/chat/completions", headers=[], body=json.dumps(body).encode()
        )
        resp = read_head(conn)
        assert resp.status == 200
        assert resp.header("content-type") == "text/event-stream"
        assert resp.header("transfer-encoding") == "chunked"
        chunks = [(time.monotonic(), c) for c in iter_body(conn, resp, "POST")]
    finally:
        conn.close()
    return chunks, t0, dict(resp.headers)


def test_stream_is_incremental_and_paced() -> None:
    with ServerThread(ServerConfig(model="llama"), Behaviour(ttft=0.05, tpot=0.08)) as st:
        chunks, t0, headers = read_stream(st, chat("hi there", max_tokens=4, stream=True))
        assert headers["x-weft-served-by"]
        events = sse_events(b"".join(c for _, c in chunks))
        assert events[-1] == "[DONE]"
        tokens = [
            e for e in events[:-1] if e["choices"] and e["choices"][0]["delta"].get("content")
        ]
        assert len(tokens) == 4
        assert tokens[0]["choices"][0]["delta"]["role"] == "assistant"
        assert events[-2]["choices"][0]["finish_reason"] == "length"
        assert all("usage" not in e for e in events[:-1])  # not asked for: none sent
        # Paced: no token before its time (lower bounds: they hold however slow the machine).
        first, last = chunks[0][0] - t0, chunks[-1][0] - t0
        assert first >= 0.04  # ttft
        assert last >= 0.05 + 3 * 0.08 - 0.01  # ttft + 3 * tpot
        text = "".join(e["choices"][0]["delta"]["content"] for e in tokens)
        assert len(text.split()) == 4
        # Incremental: the first token arrives while the next one is a minute away. A server
        # that held the answer back would leave this read to time out (Conn's 10 s).
        call(st, "POST", "/control", {"tpot": 60})
        conn = Conn(st.host, st.port, 10)
        try:
            body = json.dumps(chat("hi there", max_tokens=2, stream=True)).encode()
            send_request(conn, "POST", "t", "/v1/chat/completions", headers=[], body=body)
            resp = read_head(conn)
            seen = b""
            for piece in iter_body(conn, resp, "POST"):
                seen += piece
                if b"\n\n" in seen:  # one whole SSE event
                    break
        finally:
            conn.close()
        (event,) = sse_events(seen)
        assert event["choices"][0]["delta"]["content"] == text.split()[0]
        assert event["choices"][0]["finish_reason"] is None


def test_stream_usage_only_with_include_usage(server: ServerThread) -> None:
    body = chat("one two three", max_tokens=2, stream=True, stream_options={"include_usage": True})
    chunks, _, _ = read_stream(server, body)
    events = sse_events(b"".join(c for _, c in chunks))
    assert events[-1] == "[DONE]"
    final = events[-2]
    assert final["choices"] == []
    assert final["usage"] == {
        "prompt_tokens": 3,
        "completion_tokens": 2,
        "total_tokens": 5,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    assert all(e["usage"] is None for e in events[:-2])  # null until the last, as OpenAI


def test_stream_cut_and_client_disconnect_abort() -> None:
    with ServerThread(ServerConfig(), Behaviour(ttft=0, tpot=0.05)) as st:
        assert call(st, "POST", "/control", {"stream_abort_after": 2})[0] == 200
        conn = Conn(st.host, st.port, 10)
        body = json.dumps(chat("x", stream=True)).encode()
        send_request(conn, "POST", "t", "/v1/chat/completions", headers=[], body=body)
        resp = read_head(conn)
        with pytest.raises((ConnectionError, OSError)):
            for _ in iter_body(conn, resp, "POST"):
                pass
        conn.close()
        # A client that leaves mid-stream frees its slot (the server's next writes fail).
        # Half a second per token, 16 tokens: the stream is still running when metrics are
        # read and when the client leaves, however slow the machine is.
        call(st, "POST", "/control", {"stream_abort_after": None, "tpot": 0.5})
        conn = Conn(st.host, st.port, 10)
        send_request(conn, "POST", "t", "/v1/chat/completions", headers=[], body=body)
        read_head(conn)
        assert metrics(st)["vllm:num_requests_running"] == 1
        conn.close()
        deadline = time.monotonic() + 10
        while metrics(st)["vllm:num_requests_running"] != 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        m = metrics(st)
        assert m["vllm:num_requests_running"] == 0
        assert m["model_server_requests_total{outcome=stream_cut}"] == 1
        assert m["model_server_requests_total{outcome=aborted}"] == 1


# --------------------------------------------------------------------------- embeddings


def test_embeddings_are_deterministic(server: ServerThread) -> None:
    body = {"model": "e", "input": ["the quick fox", "jumps"]}
    _, _, a = call(server, "POST", "/v1/embeddings", body)
    _, _, b = call(server, "POST", "/v1/embeddings", body)
    assert a["data"] == b["data"]
    assert a["usage"] == {"prompt_tokens": 4, "total_tokens": 4}
    v0, v1 = (d["embedding"] for d in a["data"])
    assert len(v0) == 8 and v0 != v1
    assert math.isclose(math.sqrt(sum(x * x for x in v0)), 1.0, abs_tol=1e-5)
    _, _, single = call(server, "POST", "/v1/embeddings", {"input": "the quick fox"})
    assert single["data"][0]["embedding"] == v0
    _, _, b64 = call(
        server, "POST", "/v1/embeddings", {"input": "the quick fox", "encoding_format": "base64"}
    )
    decoded = struct.unpack("<8f", base64.b64decode(b64["data"][0]["embedding"]))
    assert all(math.isclose(x, y, abs_tol=1e-6) for x, y in zip(decoded, v0, strict=True))
    status, _, err = call(server, "POST", "/v1/embeddings", {"input": 3})
    assert status == 400 and err["error"]["param"] == "input"


# --------------------------------------------------------------------------- saturation


def test_queue_then_503_past_max_queue_and_metrics() -> None:
    b = Behaviour(ttft=0.4, tpot=0, tokens=1, max_concurrency=2, max_queue=2)
    with ServerThread(ServerConfig(model="llama"), b) as st:
        # Requests that get a slot wait at a gate the test opens, not for a time: the queue
        # fills and stays full however late the callers' threads start.
        assert st.server is not None
        gate = asyncio.Event()
        generate = st.server._generate

        async def gated(*args: Any, **kwargs: Any) -> bool:
            await gate.wait()
            return await generate(*args, **kwargs)

        st.server._generate = gated  # type: ignore[method-assign]
        results: list[tuple[int, dict[str, str], Any]] = []
        lock = threading.Lock()

        def one() -> None:
            r = call(st, "POST", "/v1/chat/completions", chat("x"))
            with lock:
                results.append(r)

        threads = [threading.Thread(target=one) for _ in range(4)]
        started = time.monotonic()  # no request arrived before this
        for t in threads:
            t.start()
        try:
            deadline = time.monotonic() + 10
            while metrics(st)["vllm:num_requests_waiting"] < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            queued_by = time.monotonic()  # all four requests had arrived by then
            m = metrics(st)
            assert m["vllm:num_requests_running"] == 2
            assert m["vllm:num_requests_waiting"] == 2
            assert m["vllm:gpu_cache_usage_perc"] == 1.0
            status, headers, err = call(st, "POST", "/v1/chat/completions", chat("x"))
            assert status == 503
            assert err["error"]["code"] == 503 and "saturated" in err["error"]["message"]
            assert headers["retry-after"] == "1"
            # A wait before the first token, which TTFT must count: at least as long as
            # the requests took to arrive, so that the earliest (with a slot) cannot have
            # waited more than twice `waited` below, however late the threads started.
            time.sleep(max(0.2, queued_by - started))
        finally:
            opened = time.monotonic()  # no request generates before this
            st.call(gate.set)
        for t in threads:
            t.join()
        assert sorted(r[0] for r in results) == [200] * 4
        m = metrics(st)
        assert m["vllm:num_requests_running"] == m["vllm:num_requests_waiting"] == 0
        assert m["model_server_requests_total{outcome=rejected}"] == 1
        # TTFT counts from arrival, as vLLM's. Every request arrived by `queued_by` and none
        # generated before `opened`: the two with a slot count at least `waited` + 0.4, the
        # two queued behind them a whole first wave (0.4) more. Counted from leaving the
        # queue, the queued two would count 0.4 each whatever they waited, and the sum at
        # most 2 * (2 * waited + 0.4) + 0.8, below the bound.
        assert m["vllm:time_to_first_token_seconds_count"] == 4
        waited = opened - queued_by
        bound = 2 * (waited + 0.4) + 2 * (waited + 0.8) - 0.02  # uvloop may fire a timer early
        assert m["vllm:time_to_first_token_seconds_sum"] >= bound


# --------------------------------------------------------------------------- errors


def statuses(st: ServerThread, n: int) -> list[int]:
    conn = Conn(st.host, st.port, 10)
    try:
        return [request(conn, "POST", "/v1/chat/completions", chat("x"))[0] for _ in range(n)]
    finally:
        conn.close()


def test_error_injection_is_deterministic() -> None:
    b = Behaviour(ttft=0, tpot=0, error_rate=0.3, error_status=502, seed=7)
    with ServerThread(ServerConfig(), b) as one, ServerThread(ServerConfig(), b) as two:
        a, c = statuses(one, 40), statuses(two, 40)
        assert a == c
        assert set(a) == {200, 502} and 4 <= a.count(502) <= 24
        # Re-seeding through /control replays the sequence.
        call(one, "POST", "/control", {"seed": 7})
        assert statuses(one, 40) == a
        status, headers, err = call(one, "POST", "/v1/chat/completions", chat("x"))
        while status == 200:
            status, headers, err = call(one, "POST", "/v1/chat/completions", chat("x"))
        assert headers["x-model-server-error"] == "injected"
        assert err["error"]["type"] == "server_error" and err["error"]["code"] == 502


def test_fail_next_and_fail_after(server: ServerThread) -> None:
    status, _, state = call(server, "POST", "/control", {"fail_next": 2, "fail_next_status": 503})
    assert status == 200 and state["fail_next"] == 2
    assert statuses(server, 4) == [503, 503, 200, 200]
    call(server, "POST", "/control", {"fail_after": 2, "error_status": 500})
    assert statuses(server, 4) == [200, 200, 500, 500]
    call(server, "POST", "/control", {"reset": True})
    assert statuses(server, 2) == [200, 200]
    # Health and models are not inference: never failed by injection.
    call(server, "POST", "/control", {"error_rate": 1.0})
    assert call(server, "GET", "/health")[0] == 200
    assert statuses(server, 1) == [500]


def test_control_validates_and_changes_behaviour(server: ServerThread) -> None:
    status, _, before = call(server, "GET", "/control")
    assert status == 200 and before["max_concurrency"] == 4
    for bad in ({"nope": 1}, {"error_rate": 2}, {"tokens": 0}, {"unhealthy": "yes"}):
        status, _, err = call(server, "POST", "/control", bad)
        assert status == 400 and err["error"]["param"] == next(iter(bad))
    # All or nothing: a bad field leaves the good ones unapplied.
    assert call(server, "POST", "/control", {"tokens": 3, "error_rate": -1})[0] == 400
    assert call(server, "GET", "/control")[2] == before
    assert call(server, "POST", "/control", b"{bad")[0] == 400

    call(server, "POST", "/control", {"unhealthy": True, "kv_cache_usage": 0.75, "tokens": 3})
    status, _, health = call(server, "GET", "/health")
    assert status == 503 and health == {"status": "unhealthy"}
    assert metrics(server)["vllm:gpu_cache_usage_perc"] == 0.75
    assert (
        call(server, "POST", "/v1/chat/completions", chat("x"))[2]["usage"]["completion_tokens"]
        == 3
    )
    call(server, "POST", "/control", {"reset": True})
    assert call(server, "GET", "/health")[0] == 200
    assert metrics(server)["vllm:gpu_cache_usage_perc"] == 0.0


def test_latency_control_delays_answers(server: ServerThread) -> None:
    call(server, "POST", "/control", {"latency": 0.15, "fail_next": 1})
    t0 = time.monotonic()
    assert call(server, "POST", "/v1/chat/completions", chat("x"))[0] == 500
    assert time.monotonic() - t0 >= 0.14  # injected errors are delayed too


# --------------------------------------------------------------------------- HTTP


def test_clean_http_errors() -> None:
    with ServerThread(ServerConfig(max_body=1000), FAST) as st:
        status, _, err = call(st, "POST", "/v1/chat/completions", b"{not json")
        assert status == 400
        assert set(err["error"]) == {"message", "type", "param", "code"}
        assert err["error"]["type"] == "invalid_request_error"
        status, _, err = call(st, "POST", "/v1/chat/completions", {"model": "m"})
        assert status == 400 and err["error"]["param"] == "messages"
        status, _, err = call(st, "POST", "/v1/chat/completions", chat("x", max_tokens=0))
        assert status == 400 and err["error"]["param"] == "max_tokens"
        assert call(st, "POST", "/v1/chat/completions", [1])[0] == 400
        assert call(st, "GET", "/v2/nothing")[0] == 404
        status, headers, _ = call(st, "GET", "/v1/chat/completions")
        assert status == 405 and headers["allow"] == "POST"
        status, headers, err = call(st, "POST", "/v1/chat/completions", chat("x" * 2000))
        assert status == 413 and headers["connection"] == "close"
        # Malformed HTTP: 400 and the connection is closed.
        with socket.create_connection((st.host, st.port), timeout=5) as s:
            s.sendall(b"NOT HTTP AT ALL\r\n\r\n")
            data = b""
            while chunk := s.recv(4096):
                data += chunk
        assert data.startswith(b"HTTP/1.1 400 ")


def test_keep_alive_and_pipelining(server: ServerThread) -> None:
    conn = Conn(server.host, server.port, 10)
    try:
        peers = set()
        for i in range(5):
            status, headers, data = request(
                conn, "GET", "/debug/headers", headers=[("x-i", str(i))]
            )
            assert status == 200 and "connection" not in headers
            seen = json.loads(data)
            assert seen["headers"]["x-i"] == str(i)
            peers.add(seen["peer"])
        status, _, _ = request(conn, "POST", "/v1/chat/completions", chat("a b"))
        assert status == 200
        assert len(peers) == 1  # one connection throughout
    finally:
        conn.close()
    # Three requests in one write are answered in order on the same connection.
    with socket.create_connection((server.host, server.port), timeout=5) as s:
        body = json.dumps(chat("x", max_tokens=1)).encode()
        post = b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n%b" % (
            len(body),
            body,
        )
        last = b"GET /v1/models HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
        s.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n" + post + last)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    assert data.count(b"HTTP/1.1 200 OK") == 3
    assert data.index(b'"status":"ok"') < data.index(b"chat.completion") < data.index(b'"list"')


def test_metrics_parse_and_count(server: ServerThread) -> None:
    call(server, "POST", "/v1/chat/completions", chat("one two three", max_tokens=4))
    call(server, "POST", "/v1/chat/completions", chat("four five"))
    call(server, "POST", "/v1/embeddings", {"input": "six seven"})
    m = metrics(server)
    assert m["vllm:prompt_tokens_total"] == 3 + 2 + 2
    assert m["vllm:generation_tokens_total"] == 4 + 16
    assert m["vllm:time_to_first_token_seconds_count"] == 2
    assert m["vllm:e2e_request_latency_seconds_count"] == 3
    assert m["vllm:request_success_total{finished_reason=length}"] == 1
    assert m["vllm:request_success_total{finished_reason=stop}"] == 2
    assert m["model_server_requests_total{outcome=ok}"] == 3
    assert m["vllm:num_requests_running"] == 0


def test_prefix_cache_hits_for_a_repeated_conversation(server: ServerThread) -> None:
    history = " ".join(f"w{i}" for i in range(40))
    first = call(server, "POST", "/v1/chat/completions", chat(history))[2]
    again = call(server, "POST", "/v1/chat/completions", chat(history + " and more"))[2]
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == 32  # two whole blocks
    m = metrics(server)
    assert m["vllm:prefix_cache_queries_total"] == 40 + 42
    assert m["vllm:prefix_cache_hits_total"] == 32


# --------------------------------------------------------------------------- client


def client_args(url: str, *argv: str) -> argparse.Namespace:
    return llm_client.build_parser().parse_args([url, *argv])


def test_client_in_process_streaming_and_summary() -> None:
    with ServerThread(
        ServerConfig(model="llama", name="pod-z"), Behaviour(ttft=0.03, tpot=0)
    ) as st:
        out = io.StringIO()
        argv = ["-n", "6", "-c", "3", "--stream", "--include-usage", "--max-tokens", "5"]
        args = client_args(st.url, *argv, "--summary", "-H", "x-forwarded-client-cert: hash=abc")
        results = llm_client.run(args, out)
        lines = [json.loads(x) for x in out.getvalue().splitlines()]
        assert len(results) == 6 and len(lines) == 7
        for r in lines[:-1]:
            assert r["status"] == 200 and r["done"] is True and r["served_by"] == "pod-z"
            assert r["usage"]["completion_tokens"] == 5 and r["model"] == "llama"
            assert r["ttft_s"] >= 0.025 and r["total_s"] >= r["ttft_s"]
            assert r["headers"]["x-seen-xfcc"] == "hash=abc"
        summary = lines[-1]
        assert summary["summary"] and summary["ok"] == 6 and summary["completion_tokens"] == 30
        # Streaming without include_usage: no usage reaches the client.
        out = io.StringIO()
        llm_client.run(client_args(st.url, "--stream", "--max-tokens", "2"), out)
        assert json.loads(out.getvalue())["usage"] is None


def test_client_subprocess_reports_errors_and_transport_failures(server: ServerThread) -> None:
    call(server, "POST", "/control", {"fail_next": 1, "fail_next_status": 503})
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "agent.lab.workloads.llm_client"]

    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*cmd, *argv], capture_output=True, text=True, timeout=30, env=env, cwd=ROOT
        )

    p = run(f"{server.host}:{server.port}", "-n", "2", "--model", "m")
    assert p.returncode == 0, p.stderr
    first, second = (json.loads(x) for x in p.stdout.splitlines())
    assert first["status"] == 503 and "injected" in first["error"]
    assert first["headers"]["retry-after"] == "1"
    assert second["status"] == 200 and second["usage"]["total_tokens"] == 16 + 5
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    p = run(f"http://127.0.0.1:{free}/")
    assert p.returncode == 1 and "refused" in json.loads(p.stdout)["error"].lower()


# --------------------------------------------------------------------------- lifecycle


def test_sigterm_finishes_in_flight_then_exits() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # 8 tokens 0.25 s apart: the stream is still going when SIGTERM is handled unless the
    # machine stalls for 2 s (then in_flight below says so rather than passing vacuously).
    opts = ["--host", "127.0.0.1", "--port", "0", "--ttft", "0", "--tpot", "0.25"]
    cmd = [sys.executable, "-m", "agent.lab.workloads.model_server", *opts, "--name", "drain"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=ROOT)
    try:
        assert proc.stdout is not None
        hello = json.loads(proc.stdout.readline())
        assert hello["event"] == "listening"
        port = hello["port"]
        conn = Conn("127.0.0.1", port, 10)
        body = json.dumps(chat("x", max_tokens=8, stream=True)).encode()
        send_request(conn, "POST", "t", "/v1/chat/completions", headers=[], body=body)
        resp = read_head(conn)
        assert resp.status == 200
        proc.send_signal(signal.SIGTERM)
        # The listener closes once the server has handled the signal: poll for that.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=2).close()
            except ConnectionRefusedError:
                break
            time.sleep(0.02)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=2)
        events = sse_events(b"".join(iter_body(conn, resp, "POST")))
        conn.close()
        assert events[-1] == "[DONE]" and len(events) == 8 + 2
        assert proc.wait(10) == 0
        # The stream was still in flight when the server began to drain (else this test
        # would pass without draining anything), and it finished: all 8 tokens, [DONE].
        assert json.loads(proc.stdout.readline()) == {
            "event": "stopped",
            "clean": True,
            "in_flight": 1,
        }
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
