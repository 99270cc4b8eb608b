"""OpenAI request parsing and the response reader (usage, model, TTFT/TPOT, usage stripping),
against real output of the sample model server (agent/lab/workloads/model_server.py) recorded
in-process, and under arbitrary chunking (hypothesis)."""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.lab.workloads.llm_client import Conn, iter_body, read_head, send_request
from agent.lab.workloads.model_server import Behaviour, ServerConfig, ServerThread
from agent.waypoint.ai.openai import BadModelRequest, operation_of, parse_request
from agent.waypoint.ai.usage import ResponseReader, Usage
from agent.waypoint.codec.headers import Headers

PROMPT = "say hello to the whole wide world"  # 7 words: 7 prompt tokens at the server


def call(st: ServerThread, path: str, body: bytes) -> tuple[int, dict[str, str], list[bytes]]:
    """Send one request; the response body as the chunks that arrived."""
    conn = Conn(st.host, st.port, 10)
    try:
        send_request(conn, "POST", "t", path, headers=[], body=body)
        resp = read_head(conn)
        chunks = list(iter_body(conn, resp, "POST"))
    finally:
        conn.close()
    return resp.status, dict(resp.headers), chunks


def chat(**extra: Any) -> dict[str, Any]:
    return {"model": "llama", "messages": [{"role": "user", "content": PROMPT}], **extra}


@pytest.fixture(scope="module")
def recorded() -> Iterator[dict[str, Any]]:
    """Responses of the real server, recorded once: the raw bodies as they arrived."""
    out: dict[str, Any] = {}
    cfg = ServerConfig(model="llama-real", name="pod-a")
    with ServerThread(cfg, Behaviour(ttft=0, tpot=0, tokens=6)) as srv:
        out["json"] = call(srv, "/v1/chat/completions", json.dumps(chat()).encode())
        out["embed"] = call(
            srv, "/v1/embeddings", json.dumps({"model": "e", "input": ["a b c", "d"]}).encode()
        )
        usage_req = chat(stream=True, stream_options={"include_usage": True})
        out["sse_usage"] = call(srv, "/v1/chat/completions", json.dumps(usage_req).encode())
        plain = chat(stream=True)
        out["sse_plain"] = call(srv, "/v1/chat/completions", json.dumps(plain).encode())
        # What the waypoint sends for that plain stream: the same request asking for usage.
        req = parse_request("chat", Headers(), json.dumps(plain).encode())
        injected, strip = req.upstream_body()
        assert strip
        out["sse_injected"] = call(srv, "/v1/chat/completions", injected)
        comp = {"model": "x", "prompt": PROMPT, "stream": True, "max_tokens": 3}
        out["completions_injected"] = call(
            srv,
            "/v1/completions",
            parse_request("completions", Headers(), json.dumps(comp).encode()).upstream_body()[0],
        )
        out["completions_plain"] = call(srv, "/v1/completions", json.dumps(comp).encode())
    yield out


def read_all(
    chunks: list[bytes], ctype: bytes, strip: bool = False, **kw: Any
) -> tuple[ResponseReader, bytes]:
    r = ResponseReader(0.0, ctype, strip_usage=strip, **kw)
    out = [r.feed(c, float(i + 1)) for i, c in enumerate(chunks)]
    out.append(r.end(float(len(chunks) + 1)))
    return r, b"".join(out)


def normalise(body: bytes) -> bytes:
    """Fields that differ between two runs of one request: the id and the second."""
    body = re.sub(rb'"id":"[^"]*"', b'"id":"X"', body)
    return re.sub(rb'"created":\d+', b'"created":0', body)


# ---- requests ------------------------------------------------------------------------


def test_operations_are_read_from_the_path_whatever_the_prefix():
    assert operation_of("POST", "/v1/chat/completions") == "chat"
    assert operation_of("POST", "/openai/v1/completions?x=1") == "completions"
    assert operation_of("POST", "/v1/embeddings/") == "embeddings"
    assert operation_of("GET", "/v1/chat/completions") is None
    assert operation_of("POST", "/v1/models") is None


def test_a_chat_request_gives_model_stream_limits_and_prompt_size():
    body = chat(stream=True, max_completion_tokens=50, max_tokens=9, temperature=0)
    r = parse_request("chat", Headers.of(("x-weft-tier", "free")), json.dumps(body).encode())
    assert (r.model, r.model_from, r.stream, r.include_usage) == ("llama", "body", True, False)
    assert r.max_tokens == 50  # max_completion_tokens wins, as in OpenAI's API
    assert r.temperature == 0.0 and r.deterministic and r.tier == "free"
    assert r.prompt_chars == len(PROMPT) and r.prompt_tokens == -(-len(PROMPT) // 4)


def test_the_model_header_names_the_model_only_when_the_body_does_not():
    h = Headers.of(("x-weft-model", "from-header"))
    assert parse_request("embeddings", h, b'{"input": "x"}').model == "from-header"
    r = parse_request("embeddings", h, b'{"input": "x", "model": "m"}')
    assert (r.model, r.model_from) == ("m", "body")


def test_token_id_prompts_count_one_token_per_id_and_content_parts_count_text():
    r = parse_request("completions", Headers(), b'{"prompt": [1, 2, 3, 4, 5]}')
    assert (r.prompt_chars, r.prompt_tokens) == (0, 5)
    parts = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "12345678"},
                    {"type": "image_url", "image_url": {}},
                ],
            }
        ]
    }
    assert parse_request("chat", Headers(), json.dumps(parts).encode()).prompt_tokens == 2


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        (b"{nope", None),
        (b"[1]", None),
        (b'{"model": 3}', "model"),
        (b'{"max_tokens": "9"}', "max_tokens"),
        (b'{"temperature": true}', "temperature"),
    ],
)
def test_broken_bodies_are_refused_naming_the_field(raw: bytes, param: str | None):
    with pytest.raises(BadModelRequest) as e:
        parse_request("chat", Headers(), raw)
    assert e.value.param == param


def test_an_unchanged_body_is_forwarded_as_the_same_bytes():
    raw = json.dumps(chat(stream=True, stream_options={"include_usage": True})).encode()
    r = parse_request("chat", Headers(), raw)
    assert r.upstream_body() == (raw, False)
    assert r.upstream_body("llama") == (raw, False)  # the same name is no rename


def test_a_rename_and_usage_injection_rewrite_the_body_and_keep_the_rest():
    r = parse_request(
        "chat",
        Headers(),
        json.dumps(
            chat(stream=True, stream_options={"continuous_usage_stats": False}, user="u1")
        ).encode(),
    )
    body, strip = r.upstream_body("meta-llama/Llama-3-8B")
    sent = json.loads(body)
    assert strip and sent["model"] == "meta-llama/Llama-3-8B" and sent["user"] == "u1"
    assert sent["stream_options"] == {"continuous_usage_stats": False, "include_usage": True}


# ---- responses from the real server --------------------------------------------------


def test_json_usage_and_model_from_a_real_answer(recorded):
    status, headers, chunks = recorded["json"]
    r, out = read_all(chunks, headers["content-type"].encode())
    assert status == 200 and out == b"".join(chunks)
    assert r.usage == Usage(7, 6, 13, 0) and r.model == "llama-real"
    assert r.ttft is None and r.tpot is None  # timing is for streams


def test_embeddings_usage_has_no_completion_tokens(recorded):
    _, headers, chunks = recorded["embed"]
    r, _ = read_all(chunks, headers["content-type"].encode())
    assert r.usage == Usage(4, 0, 4)


def test_a_json_body_past_the_buffer_bound_still_gives_usage_from_its_tail(recorded):
    _, _, chunks = recorded["json"]
    body = b"".join(chunks)
    padded = body.replace(b'"content":"', b'"content":"' + b"x" * 100_000, 1)
    pieces = [padded[i : i + 1000] for i in range(0, len(padded), 1000)]
    r, out = read_all(pieces, b"application/json", max_json_bytes=8192)
    assert out == padded and len(r._buf) <= 16384
    assert r.usage == Usage(7, 6, 13, 0) and r.model == "llama-real"


def test_sse_usage_ttft_and_tpot_from_a_real_stream(recorded):
    _, headers, chunks = recorded["sse_usage"]
    assert headers["content-type"].startswith("text/event-stream")
    r, out = read_all(chunks, headers["content-type"].encode())
    assert out == b"".join(chunks) and r.done
    assert r.usage == Usage(7, 6, 13, 0) and r.model == "llama-real"
    # Chunk i arrives at time i + 1; six tokens, the first in chunk 0.
    assert r.content_events == 6 and r.ttft == 1.0
    assert r.tpot == pytest.approx((r.last_token_at - r.first_token_at) / 5)


def test_a_stream_without_usage_gives_none_and_an_estimate(recorded):
    _, headers, chunks = recorded["sse_plain"]
    r, _ = read_all(chunks, headers["content-type"].encode())
    assert r.usage is None and r.done
    assert r.usage_or_estimate(7) == Usage(7, 6, 13, estimated=True)


@pytest.mark.parametrize("kind", ["sse_injected", "completions_injected"])
def test_an_injected_usage_is_read_and_the_client_gets_the_stream_it_asked_for(recorded, kind):
    """The waypoint asked for usage on the client's behalf; the client must not see it."""
    _, headers, chunks = recorded[kind]
    _, _, plain = recorded[kind.replace("injected", "plain")]
    assert b'"usage":null' in b"".join(chunks)  # the server marked every chunk
    r, out = read_all(chunks, headers["content-type"].encode(), strip=True)
    assert r.usage is not None and r.usage.completion_tokens in (3, 6)
    assert normalise(out) == normalise(b"".join(plain))
    assert b"usage" not in out and out.endswith(b"data: [DONE]\n\n")


# ---- any chunking --------------------------------------------------------------------


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds) if b > a]


@pytest.fixture(scope="module")
def streams(recorded) -> dict[str, bytes]:
    return {k: b"".join(recorded[k][2]) for k in ("sse_usage", "sse_injected")}


@settings(max_examples=150, deadline=None)
@given(
    cuts=st.lists(st.integers(min_value=0, max_value=5000), max_size=40),
    strip=st.booleans(),
    crlf=st.booleans(),
)
def test_any_chunking_gives_the_same_usage_and_the_same_bytes(streams, cuts, strip, crlf):
    whole = streams["sse_injected" if strip else "sse_usage"]
    if crlf:  # SSE allows CRLF line endings; some servers use them
        whole = whole.replace(b"\n", b"\r\n")
    one, out_one = read_all([whole], b"text/event-stream", strip)
    many, out_many = read_all(split_at(whole, cuts), b"text/event-stream", strip)
    assert out_many == out_one
    assert many.usage == one.usage == Usage(7, 6, 13, 0)
    assert many.content_events == one.content_events == 6 and many.done
    assert out_one == whole if not strip else b"usage" not in out_one


def test_comments_and_multi_line_data_events_are_read():
    body = (
        b': keep-alive\n\nevent: message\ndata: {"choices":[],\n'
        b'data: "usage":{"prompt_tokens":2,"completion_tokens":1}}\n\ndata: [DONE]\n\n'
    )
    r, out = read_all([body], b"text/event-stream")
    assert out == body and r.usage == Usage(2, 1, 3) and r.done
