"""A sample OpenAI-compatible model server. TEST WORKLOAD: not part of the mesh, not a model.

It stands in for vLLM in the lab, the tests, the benchmarks and the demo, so the mesh's AI
features can be exercised without a GPU: token counting from `usage`, SSE streaming
pass-through, time to first token, model routing, fallback on errors, load shedding on
saturation, and KV-cache (prefix) affinity. It generates no language: the answer is a
deterministic list of words, and it behaves the way the tests ask (latency per token,
injected errors, a bounded queue, health) through flags or at run time through /control.

    python -m agent.lab.workloads.model_server --port 8000 --model llama-8b [options]

Endpoints: POST /v1/chat/completions, /v1/completions, /v1/embeddings; GET /v1/models,
/health, /metrics (vLLM-style names), /debug/headers; GET and POST /control (test only,
unauthenticated). See docs/model-server.md for the rules (token counting, timing,
errors, queueing) that tests may rely on.

HTTP/1.1 with keep-alive and pipelining on asyncio (uvloop when installed), parsed by
httptools; no web framework, so it is not the bottleneck in a benchmark.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import bisect
import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import signal
import socket
import struct
import sys
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Iterator
from http import HTTPStatus
from typing import Any, TypeGuard, cast

import httptools
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily as Counter
from prometheus_client.core import GaugeMetricFamily as Gauge
from prometheus_client.core import HistogramMetricFamily, Metric

from agent.waypoint.errors import openai_error

log = logging.getLogger("weft.model_server")

MiB = 1 << 20
PREFIX_BLOCK = 16  # words per prefix-cache block (vLLM's default block size, in tokens)

# Words the fake model "generates": one word is one token.
VOCAB = (
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "that",
    "for",
    "it",
    "as",
    "with",
    "was",
    "on",
    "be",
    "at",
    "by",
    "this",
    "had",
    "not",
    "are",
    "but",
    "from",
    "or",
    "have",
    "an",
    "they",
    "which",
    "one",
    "you",
    "were",
    "all",
    "we",
    "can",
    "her",
    "has",
    "there",
    "been",
    "if",
    "more",
    "when",
    "will",
    "would",
    "who",
    "so",
    "no",
    "mesh",
    "token",
    "model",
    "cache",
    "route",
    "graph",
    "query",
    "vector",
    "weft",
    "node",
    "pod",
    "tunnel",
    "packet",
    "stream",
    "budget",
    "canary",
    "quota",
)

# Histogram buckets: vLLM's, with finer low ends because lab latencies are milliseconds.
TTFT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
                1.0, 2.5, 5.0, 7.5, 10.0)  # fmt: skip
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4,
                0.5, 0.75, 1.0, 2.5)  # fmt: skip
E2E_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0,
               15.0, 20.0, 30.0, 60.0)  # fmt: skip


# --------------------------------------------------------------------------- behaviour


@dataclasses.dataclass
class Behaviour:
    """What the server does; every field can be changed at run time through POST /control."""

    tokens: int = 16  # completion length when max_tokens is larger or absent
    ttft: float = 0.02  # seconds from the start of generation to the first token
    tpot: float = 0.005  # seconds per further output token
    prefill_per_token: float = 0.0  # extra TTFT per prompt token not in the prefix cache
    latency: float = 0.0  # extra seconds before every /v1 answer, injected errors included
    error_rate: float = 0.0  # fraction of /v1 requests answered with error_status
    error_status: int = 500
    fail_next: int = 0  # answer the next K /v1 requests with fail_next_status
    fail_next_status: int | None = None  # None: error_status
    fail_after: int | None = None  # let N more /v1 requests through, then fail all of them
    stream_abort_after: int | None = None  # cut streams (no [DONE]) after this many tokens
    unhealthy: bool = False  # GET /health answers 503
    kv_cache_usage: float | None = None  # pin vllm:gpu_cache_usage_perc (None: running/N)
    max_concurrency: int = 4  # requests generated at once; 0: unlimited
    max_queue: int = 64  # requests waiting for a slot; more are answered 503
    seed: int = 0  # seeds the error-injection draws


def _is_int(v: object) -> TypeGuard[int]:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: object) -> TypeGuard[float]:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


_SECONDS = ("ttft", "tpot", "prefill_per_token", "latency")
_NULLABLE = ("kv_cache_usage", "fail_next_status", "stream_abort_after", "fail_after")


def _check(name: str, v: object) -> str | None:
    """Why v is not a valid value for the Behaviour field name (None when it is)."""
    if v is None and name in _NULLABLE:
        return None
    if name in _SECONDS:
        return None if _is_num(v) and v >= 0 else "a number >= 0"
    if name in ("error_rate", "kv_cache_usage"):
        return None if _is_num(v) and 0 <= v <= 1 else "a number in [0, 1]"
    if name in ("error_status", "fail_next_status"):
        return None if _is_int(v) and 400 <= v <= 599 else "an HTTP status in [400, 599]"
    if name in ("tokens", "stream_abort_after"):
        return None if _is_int(v) and v >= 1 else "an integer >= 1"
    if name in ("fail_next", "fail_after", "max_concurrency", "max_queue"):
        return None if _is_int(v) and v >= 0 else "an integer >= 0"
    if name == "unhealthy":
        return None if isinstance(v, bool) else "true or false"
    if name == "seed":
        return None if _is_int(v) else "an integer"
    return "unknown field"


# --------------------------------------------------------------------------- metrics


class Histogram:
    __slots__ = ("buckets", "count", "counts", "sum")

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.count = 0
        self.sum = 0.0

    def observe(self, v: float) -> None:
        i = bisect.bisect_left(self.buckets, v)
        if i < len(self.counts):
            self.counts[i] += 1
        self.count += 1
        self.sum += v

    def cumulative(self) -> list[tuple[str, float]]:
        """Buckets as prometheus_client's HistogramMetricFamily takes them."""
        out: list[tuple[str, float]] = []
        acc = 0
        for le, c in zip(self.buckets, self.counts, strict=True):
            acc += c
            out.append((f"{le}", acc))
        out.append(("+Inf", self.count))
        return out


@dataclasses.dataclass
class Metrics:
    prompt_tokens: int = 0
    generation_tokens: int = 0
    prefix_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_hits: int = 0  # of which found
    finished: dict[str, int] = dataclasses.field(default_factory=lambda: {"stop": 0, "length": 0})
    outcomes: dict[str, int] = dataclasses.field(default_factory=dict)
    ttft: Histogram = dataclasses.field(default_factory=lambda: Histogram(TTFT_BUCKETS))
    tpot: Histogram = dataclasses.field(default_factory=lambda: Histogram(TPOT_BUCKETS))
    e2e: Histogram = dataclasses.field(default_factory=lambda: Histogram(E2E_BUCKETS))

    def outcome(self, what: str) -> None:
        self.outcomes[what] = self.outcomes.get(what, 0) + 1


# --------------------------------------------------------------------------- requests


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.message, self.param, self.status = message, param, status


def error_body(status: int, message: str, param: str | None = None, code: Any = None) -> bytes:
    """An OpenAI-style error, with weft's one mapping of status to error type."""
    return openai_error(status, message, param=param, code=code)


def _text_of_content(content: object, where: str) -> list[str]:
    if content is None:
        return []
    if isinstance(content, str):
        return content.split()
    if isinstance(content, list):
        words: list[str] = []
        for part in content:
            if not isinstance(part, dict):
                raise BadRequest("content parts must be objects", where)
            if part.get("type") == "text" and isinstance(part.get("text"), str):
                words += part["text"].split()
        return words
    raise BadRequest("content must be a string, a list of parts or null", where)


def _prompt_words_chat(body: dict[str, Any]) -> list[str]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise BadRequest("'messages' must be a non-empty list", "messages")
    words: list[str] = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise BadRequest(f"messages[{i}] must be an object with a role", f"messages[{i}]")
        words += _text_of_content(m.get("content"), f"messages[{i}].content")
    return words


def _is_token_ids(v: object) -> bool:
    return isinstance(v, list) and all(_is_int(x) for x in v)


def _prompt_words_completion(body: dict[str, Any]) -> list[str]:
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and (isinstance(p[0], str) or _is_token_ids(p[0])):
        p = p[0]  # a batch of one
    if isinstance(p, str):
        return p.split()
    if _is_token_ids(p) and p:
        return [str(x) for x in p]  # token ids: one token each
    raise BadRequest(
        "'prompt' must be a string or a list of token ids (batches are not supported)", "prompt"
    )


def _embedding_inputs(body: dict[str, Any]) -> list[list[str]]:
    inp = body.get("input")
    if isinstance(inp, str) or _is_token_ids(inp):
        inp = [inp]
    if not isinstance(inp, list) or not inp:
        raise BadRequest("'input' must be a string or a non-empty list", "input")
    out: list[list[str]] = []
    for x in inp:
        if isinstance(x, str):
            out.append(x.split())
        elif _is_token_ids(x):
            out.append([str(t) for t in x])
        else:
            raise BadRequest("'input' items must be strings or lists of token ids", "input")
    return out


def embedding(model: str, words: list[str], dims: int) -> list[float]:
    """A deterministic unit vector from a hash of the model and the input's words."""
    seed = hashlib.blake2b(("\x1f".join([model, *words])).encode(), digest_size=32).digest()
    raw = b""
    block = 0
    while len(raw) < 4 * dims:
        raw += hashlib.blake2b(seed + block.to_bytes(4, "little"), digest_size=64).digest()
        block += 1
    ints = struct.unpack(f"<{dims}I", raw[: 4 * dims])
    vec = [x / 2147483647.5 - 1.0 for x in ints]
    norm = math.sqrt(sum(v * v for v in vec)) or 1.0
    return [round(v / norm, 6) for v in vec]


def generate(model: str, prompt: list[str], n: int, rng: random.Random | None = None) -> list[str]:
    """n words; the same model and prompt always give the same words (unless rng is given).

    Shorter answers are prefixes of longer ones, as with greedy decoding.
    """
    if rng is None:
        h = hashlib.blake2b(("\x1f".join([model, *prompt])).encode(), digest_size=8).digest()
        rng = random.Random(int.from_bytes(h, "little"))
    return rng.choices(VOCAB, k=n)


class PrefixCache:
    """Simulated KV prefix cache: chained hashes of full blocks of prompt tokens, LRU."""

    def __init__(self, capacity_blocks: int) -> None:
        self.capacity = capacity_blocks
        self.blocks: OrderedDict[int, None] = OrderedDict()

    def lookup_and_insert(self, words: list[str]) -> int:
        """Tokens of words found cached (whole leading blocks); then caches all its blocks."""
        if self.capacity <= 0:
            return 0
        hit = 0
        prefix_hit = True
        h = 0
        for start in range(0, len(words) - PREFIX_BLOCK + 1, PREFIX_BLOCK):
            h = hash((h, *words[start : start + PREFIX_BLOCK]))
            if prefix_hit and h in self.blocks:
                hit += PREFIX_BLOCK
                self.blocks.move_to_end(h)
            else:
                prefix_hit = False
                self.blocks[h] = None
                if len(self.blocks) > self.capacity:
                    self.blocks.popitem(last=False)
        return hit


# --------------------------------------------------------------------------- admission


class Admission:
    """max_concurrency running slots and a FIFO queue of at most max_queue waiters."""

    def __init__(self, behaviour: Behaviour) -> None:
        self.b = behaviour
        self.running = 0
        self.waiters: deque[asyncio.Future[None]] = deque()

    def _has_slot(self) -> bool:
        return self.b.max_concurrency == 0 or self.running < self.b.max_concurrency

    async def acquire(self) -> bool:
        """Take a slot, waiting in the queue if needed; False when the queue is full."""
        if not self.waiters and self._has_slot():
            self.running += 1
            return True
        if len(self.waiters) >= self.b.max_queue:
            return False
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiters.append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()  # the slot was handed over just as we were cancelled
            else:
                with contextlib.suppress(ValueError):
                    self.waiters.remove(fut)
            raise
        return True

    def release(self) -> None:
        self.running -= 1
        self.pump()

    def pump(self) -> None:
        """Hand free slots to waiters in order (also after max_concurrency grows)."""
        while self.waiters and self._has_slot():
            fut = self.waiters.popleft()
            if not fut.done():
                self.running += 1
                fut.set_result(None)


# --------------------------------------------------------------------------- HTTP


class Request:
    __slots__ = ("body", "headers", "http10", "keep_alive", "method", "path", "peer", "query")

    def __init__(self) -> None:
        self.method = ""
        self.path = ""
        self.query = ""
        self.headers: list[tuple[str, str]] = []
        self.body = b""
        self.keep_alive = True
        self.http10 = False
        self.peer = ""

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None


class _Fatal(Exception):
    """Stop parsing this connection: answer status and close."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


_STATUS_LINES: dict[int, bytes] = {}


def _status_line(status: int) -> bytes:
    line = _STATUS_LINES.get(status)
    if line is None:
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = "Error"
        line = _STATUS_LINES[status] = f"HTTP/1.1 {status} {phrase}\r\n".encode()
    return line


class StreamCut(Exception):
    """The client went away while we were streaming."""


class Connection(asyncio.Protocol):
    """One client connection: parses requests with httptools, answers them in order."""

    def __init__(self, server: ModelServer) -> None:
        self.srv = server
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.peer = ""
        self.cur = Request()
        self.url = b""
        self.body_parts: list[bytes] = []
        self.body_len = 0
        self.pending: deque[Request | _Fatal] = deque()
        self.task: asyncio.Task[None] | None = None
        self.reading = True
        self.stopped = False  # no more input is parsed (fatal error, EOF)
        self.lost = False
        self.write_paused = False
        self.drain_waiter: asyncio.Future[None] | None = None
        self.streaming = False  # a streamed response has started and not ended

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            self.peer = f"{peer[0]}:{peer[1]}"
        self.srv.conns.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.srv.conns.discard(self)
        if self.drain_waiter is not None and not self.drain_waiter.done():
            self.drain_waiter.set_exception(StreamCut())
        if self.task is not None:
            self.task.cancel()  # like vLLM: a request whose client left is aborted

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.drain_waiter is not None and not self.drain_waiter.done():
            self.drain_waiter.set_result(None)

    def eof_received(self) -> bool:
        # The client half-closed: finish what it asked for, then close.
        self.stopped = True
        return self.task is not None or bool(self.pending)

    def data_received(self, data: bytes) -> None:
        if self.stopped:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(_Fatal(400, "protocol upgrades are not supported"))
        except httptools.HttpParserError as e:
            cause = e.__context__ if isinstance(e.__context__, _Fatal) else None
            self._fail(cause or _Fatal(400, f"malformed HTTP request: {e}"))

    # -- httptools callbacks

    def on_message_begin(self) -> None:
        self.cur = Request()
        self.url = b""
        self.body_parts = []
        self.body_len = 0

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.cur.headers.append((name.decode("latin-1").lower(), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        req = self.cur
        cl = req.header("content-length")
        if cl is not None and cl.strip().isdigit() and int(cl) > self.srv.max_body:
            raise _Fatal(413, f"request body larger than {self.srv.max_body} bytes")
        expect = req.header("expect")
        if expect is not None and expect.lower() == "100-continue" and self.transport:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        self.body_len += len(body)
        if self.body_len > self.srv.max_body:
            raise _Fatal(413, f"request body larger than {self.srv.max_body} bytes")
        self.body_parts.append(body)

    def on_message_complete(self) -> None:
        req = self.cur
        req.method = self.parser.get_method().decode("latin-1")
        url = httptools.parse_url(self.url)
        req.path = (url.path or b"/").decode("latin-1")
        req.query = (url.query or b"").decode("latin-1")
        req.body = b"".join(self.body_parts)
        req.keep_alive = self.parser.should_keep_alive()
        req.http10 = self.parser.get_http_version() == "1.0"
        req.peer = self.peer
        self._enqueue(req)

    # -- processing

    def _fail(self, fatal: _Fatal) -> None:
        self.stopped = True
        self._enqueue(fatal)

    def _enqueue(self, item: Request | _Fatal) -> None:
        self.pending.append(item)
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self._run())
        if len(self.pending) > 16 and self.reading and self.transport:
            self.reading = False
            self.transport.pause_reading()

    async def _run(self) -> None:
        try:
            while self.pending and not self.lost:
                item = self.pending.popleft()
                if not self.reading and len(self.pending) < 4 and self.transport:
                    self.reading = True
                    self.transport.resume_reading()
                if isinstance(item, _Fatal):
                    self.respond_error(None, item.status, item.message)
                    self.linger_close()
                    return
                self.srv.active += 1
                try:
                    keep = await self.srv.handle(self, item)
                except (asyncio.CancelledError, StreamCut):
                    self.srv.metrics.outcome("aborted")  # the client left mid-request
                    self.close()
                    return
                except Exception:
                    log.exception("handling %s %s", item.method, item.path)
                    if self.streaming:
                        self.abort()  # a response is half-sent: nothing clean is possible
                        return
                    self.respond_error(None, 500, "internal error in the test model server")
                    keep = False
                finally:
                    self.srv.request_done()
                if not keep:
                    self.close()
                    return
            if self.stopped or self.srv.draining:
                self.close()
        finally:
            self.task = None

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def linger_close(self) -> None:
        """Close after an error while the client may still be sending (an oversized body).

        Closing with unread input makes the kernel send a reset, which can destroy the error
        response before the client reads it; so half-close, drop what still arrives, and
        close a little later.
        """
        t = self.transport
        if t is None or t.is_closing():
            return
        if not t.can_write_eof():
            t.close()
            return
        t.write_eof()
        if not self.reading:
            self.reading = True
            t.resume_reading()
        asyncio.get_running_loop().call_later(1.0, self.close)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    # -- writing

    def _head(
        self,
        req: Request | None,
        status: int,
        ctype: bytes,
        extra: list[tuple[str, str]] | None,
        keep: bool,
    ) -> list[bytes]:
        head = [_status_line(status), self.srv.fixed_headers, b"content-type: ", ctype, b"\r\n"]
        if req is not None:
            xfcc = req.header("x-forwarded-client-cert")
            if xfcc is not None:
                head.append(f"x-seen-xfcc: {xfcc}\r\n".encode("latin-1"))
        if extra:
            head.extend(f"{k}: {v}\r\n".encode("latin-1") for k, v in extra)
        if not keep:
            head.append(b"connection: close\r\n")
        elif req is not None and req.http10:
            head.append(b"connection: keep-alive\r\n")
        return head

    def keep_alive(self, req: Request | None) -> bool:
        return req is not None and req.keep_alive and not self.srv.draining

    def respond(
        self,
        req: Request | None,
        status: int,
        body: bytes,
        ctype: bytes = b"application/json",
        extra: list[tuple[str, str]] | None = None,
    ) -> bool:
        """Write a whole response; whether the connection stays open."""
        keep = self.keep_alive(req)
        head = self._head(req, status, ctype, extra, keep)
        head += [b"content-length: ", str(len(body)).encode(), b"\r\n\r\n"]
        if not (req is not None and req.method == "HEAD"):
            head.append(body)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(head))
        return keep

    def respond_json(
        self,
        req: Request | None,
        status: int,
        obj: object,
        extra: list[tuple[str, str]] | None = None,
    ) -> bool:
        return self.respond(
            req, status, json.dumps(obj, separators=(",", ":")).encode(), extra=extra
        )

    def respond_error(
        self,
        req: Request | None,
        status: int,
        message: str,
        param: str | None = None,
        extra: list[tuple[str, str]] | None = None,
    ) -> bool:
        return self.respond(req, status, error_body(status, message, param, status), extra=extra)

    def start_stream(
        self, req: Request, ctype: bytes, extra: list[tuple[str, str]] | None = None
    ) -> bool:
        """Send the head of a streamed response (chunked; HTTP/1.0: until close)."""
        keep = self.keep_alive(req) and not req.http10
        head = self._head(req, 200, ctype, extra, keep)
        head.append(b"cache-control: no-cache\r\n")
        if not req.http10:
            head.append(b"transfer-encoding: chunked\r\n")
        head.append(b"\r\n")
        self._write(b"".join(head))
        self.streaming = True
        return keep

    async def send_chunk(self, req: Request, data: bytes) -> None:
        if req.http10:
            self._write(data)
        else:
            self._write(b"%x\r\n%b\r\n" % (len(data), data))
        if self.write_paused and not self.lost:
            self.drain_waiter = asyncio.get_running_loop().create_future()
            await self.drain_waiter

    def end_stream(self, req: Request) -> None:
        if not req.http10:
            self._write(b"0\r\n\r\n")
        self.streaming = False

    def _write(self, data: bytes) -> None:
        if self.lost or self.transport is None or self.transport.is_closing():
            raise StreamCut()
        self.transport.write(data)


# --------------------------------------------------------------------------- server


@dataclasses.dataclass
class ServerConfig:
    """Start-up settings that do not change at run time (Behaviour holds those that do)."""

    model: str = "test-model"
    aliases: tuple[str, ...] = ()
    name: str = ""  # x-weft-served-by; default $WEFT_POD, $POD_NAME or the host name
    echo_model: bool = False  # answer with the request's model name instead of --model
    strict_model: bool = False  # 404 for models other than --model and its aliases
    random: bool = False  # temperature > 0 gives random words
    dims: int = 8
    max_body: int = MiB
    prefix_cache_blocks: int = 4096
    enable_control: bool = True
    access_log: bool = False


def default_name() -> str:
    return os.environ.get("WEFT_POD") or os.environ.get("POD_NAME") or socket.gethostname()


Handler = Callable[[Connection, Request], Awaitable[bool]]


class ModelServer:
    """The server's state and request handling, independent of how it is run."""

    def __init__(self, config: ServerConfig, behaviour: Behaviour | None = None) -> None:
        self.cfg = config
        self.name = config.name or default_name()
        self.initial = dataclasses.replace(behaviour or Behaviour())
        self.b = dataclasses.replace(self.initial)
        self.adm = Admission(self.b)
        self.rng = random.Random(self.b.seed)
        self.metrics = Metrics()
        self.prefix_cache = PrefixCache(config.prefix_cache_blocks)
        self.max_body = config.max_body
        self.conns: set[Connection] = set()
        self.active = 0
        self.draining = False
        self.idle = asyncio.Event()
        self.server: asyncio.Server | None = None
        self.created = int(time.time())
        self.seq = 0
        self.fixed_headers = (
            f"server: weft-model-server\r\nx-weft-served-by: {self.name}\r\n"
            f"x-model-server-model: {config.model}\r\n"
        ).encode("latin-1")
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)
        self.routes: dict[str, dict[str, Handler]] = {
            "/v1/chat/completions": {"POST": self._chat},
            "/v1/completions": {"POST": self._completions},
            "/v1/embeddings": {"POST": self._embeddings},
            "/v1/models": {"GET": self._models},
            "/health": {"GET": self._health},
            "/metrics": {"GET": self._metrics},
            "/debug/headers": {"GET": self._debug_headers, "POST": self._debug_headers},
        }
        if config.enable_control:
            self.routes["/control"] = {"GET": self._control, "POST": self._control}

    # -- lifecycle

    async def start(self, host: str = "0.0.0.0", port: int = 8000) -> int:
        """Listen; the port bound (useful with port 0)."""
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: Connection(self), host, port, backlog=1024, reuse_address=True
        )
        return int(self.server.sockets[0].getsockname()[1])

    async def shutdown(self, deadline: float = 10.0) -> bool:
        """Stop accepting, let in-flight requests finish within deadline seconds, then close.

        Idle keep-alive connections close at once, busy ones after their current response.
        True when everything finished in time.
        """
        self.draining = True
        if self.server is not None:
            self.server.close()
        for c in list(self.conns):
            if c.task is None and not c.pending:
                c.close()
        clean = True
        if self.active:
            self.idle.clear()
            try:
                await asyncio.wait_for(self.idle.wait(), deadline)
            except TimeoutError:
                clean = False
        for c in list(self.conns):
            if clean:
                c.close()
            else:
                c.abort()
        await asyncio.sleep(0)
        return clean

    def request_done(self) -> None:
        self.active -= 1
        if self.active == 0 and self.draining:
            self.idle.set()

    # -- dispatch

    async def handle(self, conn: Connection, req: Request) -> bool:
        methods = self.routes.get(req.path)
        if methods is None:
            keep = conn.respond_error(req, 404, f"no route for {req.path}")
        else:
            h = methods.get(req.method)
            if h is None and req.method == "HEAD" and "GET" in methods:
                h = methods["GET"]
            if h is None:
                allow = ", ".join(sorted(methods))
                keep = conn.respond_error(
                    req, 405, f"{req.method} is not allowed on {req.path}", extra=[("allow", allow)]
                )
            else:
                keep = await h(conn, req)
        if self.cfg.access_log:
            log.info("%s %s %s", req.peer, req.method, req.path)
        return keep

    # -- simple endpoints

    async def _health(self, conn: Connection, req: Request) -> bool:
        if self.b.unhealthy or self.draining:
            return conn.respond_json(req, 503, {"status": "unhealthy"})
        return conn.respond_json(req, 200, {"status": "ok"})

    async def _models(self, conn: Connection, req: Request) -> bool:
        data = [
            {"id": m, "object": "model", "created": self.created, "owned_by": "weft-lab"}
            for m in (self.cfg.model, *self.cfg.aliases)
        ]
        return conn.respond_json(req, 200, {"object": "list", "data": data})

    async def _debug_headers(self, conn: Connection, req: Request) -> bool:
        headers: dict[str, str] = {}
        for k, v in req.headers:
            headers[k] = f"{headers[k]}, {v}" if k in headers else v
        return conn.respond_json(
            req,
            200,
            {"method": req.method, "path": req.path, "peer": req.peer, "headers": headers},
        )

    async def _control(self, conn: Connection, req: Request) -> bool:
        if req.method == "POST":
            try:
                upd = json.loads(req.body or b"{}")
            except ValueError as e:
                return conn.respond_error(req, 400, f"invalid JSON: {e}")
            if not isinstance(upd, dict):
                return conn.respond_error(req, 400, "control body must be a JSON object")
            try:
                self.apply_control(upd)
            except BadRequest as e:
                return conn.respond_error(req, 400, e.message, e.param)
        return conn.respond_json(req, 200, dataclasses.asdict(self.b))

    def apply_control(self, upd: dict[str, Any]) -> None:
        """Apply a /control update atomically: all fields valid, or nothing changes.

        "reset": true first restores the start-up behaviour.
        """
        upd = dict(upd)
        reset = upd.pop("reset", False)
        if not isinstance(reset, bool):
            raise BadRequest("'reset' must be true or false", "reset")
        new = dataclasses.replace(self.initial if reset else self.b)
        fields = {f.name for f in dataclasses.fields(Behaviour)}
        for k, v in upd.items():
            if k not in fields:
                raise BadRequest(f"unknown control field {k!r}", k)
            why = _check(k, v)
            if why is not None:
                raise BadRequest(f"{k!r} must be {why}", k)
            setattr(new, k, float(v) if k in _SECONDS and _is_int(v) else v)
        for f in fields:
            setattr(self.b, f, getattr(new, f))  # in place: Admission shares self.b
        if reset or "seed" in upd:
            self.rng = random.Random(self.b.seed)
        self.adm.pump()

    def kv_cache_usage(self) -> float:
        if self.b.kv_cache_usage is not None:
            return self.b.kv_cache_usage
        if self.b.max_concurrency == 0:
            return 0.0
        return min(1.0, self.adm.running / self.b.max_concurrency)

    async def _metrics(self, conn: Connection, req: Request) -> bool:
        return conn.respond(req, 200, generate_latest(self.registry), CONTENT_TYPE_LATEST.encode())

    def collect(self) -> Iterator[Metric]:
        """The vLLM-style families, read from the server's state at scrape time."""
        m, lb = self.metrics, [self.cfg.model]
        for kind, name, help_, value in (
            (Gauge, "vllm:num_requests_running", "Requests being generated.", self.adm.running),
            (Gauge, "vllm:num_requests_waiting", "Requests queued.", len(self.adm.waiters)),
            (Gauge, "vllm:gpu_cache_usage_perc", "KV-cache usage, 0..1.", self.kv_cache_usage()),
            (Counter, "vllm:prompt_tokens_total", "Prompt tokens processed.", m.prompt_tokens),
            (Counter, "vllm:generation_tokens_total", "Tokens generated.", m.generation_tokens),
            (
                Counter,
                "vllm:prefix_cache_queries_total",
                "Prompt tokens looked up.",
                m.prefix_queries,
            ),
            (Counter, "vllm:prefix_cache_hits_total", "Prompt tokens found cached.", m.prefix_hits),
        ):
            family = kind(name, help_, labels=["model_name"])
            family.add_metric(lb, value)
            yield family
        for name, help_, label, counts in (
            (
                "vllm:request_success_total",
                "Finished requests by reason.",
                "finished_reason",
                m.finished,
            ),
            (
                "model_server_requests_total",
                "Inference requests by outcome.",
                "outcome",
                m.outcomes,
            ),
        ):
            counter = Counter(name, help_, labels=["model_name", label])
            for key, n in sorted(counts.items()):
                counter.add_metric([*lb, key], n)
            yield counter
        for name, h, help_ in (
            ("vllm:time_to_first_token_seconds", m.ttft, "Time to first token, from arrival."),
            (
                "vllm:time_per_output_token_seconds",
                m.tpot,
                "Time per output token after the first.",
            ),
            ("vllm:e2e_request_latency_seconds", m.e2e, "Arrival to last token."),
        ):
            histogram = HistogramMetricFamily(name, help_, labels=["model_name"])
            histogram.add_metric(lb, h.cumulative(), h.sum)
            yield histogram

    # -- inference

    def _injected_failure(self) -> int | None:
        """The status to fail this request with, or None; drawn in arrival order."""
        b = self.b
        if b.fail_next > 0:
            b.fail_next -= 1
            return b.fail_next_status or b.error_status
        if b.fail_after is not None:
            if b.fail_after == 0:
                return b.error_status
            b.fail_after -= 1
        if b.error_rate > 0 and self.rng.random() < b.error_rate:
            return b.error_status
        return None

    def _parse(self, req: Request) -> dict[str, Any]:
        try:
            body = json.loads(req.body)
        except ValueError as e:
            raise BadRequest(f"invalid JSON body: {e}") from None
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise BadRequest("'model' must be a string", "model")
        if self.cfg.strict_model and model not in (None, self.cfg.model, *self.cfg.aliases):
            raise BadRequest(f"The model `{model}` does not exist.", "model", 404)
        return body

    def _response_model(self, body: dict[str, Any]) -> str:
        model = body.get("model")
        return model if self.cfg.echo_model and isinstance(model, str) else self.cfg.model

    def _max_tokens(self, body: dict[str, Any]) -> int | None:
        for key in ("max_completion_tokens", "max_tokens"):
            v = body.get(key)
            if v is not None:
                if not _is_int(v) or v < 1:
                    raise BadRequest(f"'{key}' must be an integer >= 1", key)
                return int(v)
        return None

    async def _chat(self, conn: Connection, req: Request) -> bool:
        return await self._inference(conn, req, "chat")

    async def _completions(self, conn: Connection, req: Request) -> bool:
        return await self._inference(conn, req, "completion")

    async def _embeddings(self, conn: Connection, req: Request) -> bool:
        return await self._inference(conn, req, "embedding")

    async def _inference(self, conn: Connection, req: Request, kind: str) -> bool:
        t0 = time.monotonic()
        m = self.metrics
        inputs: list[list[str]] = []
        words: list[str] = []
        max_tokens: int | None = None
        fmt, dims = "float", self.cfg.dims
        try:
            body = self._parse(req)
            if kind == "embedding":
                inputs = _embedding_inputs(body)
                fmt = body.get("encoding_format") or "float"
                if fmt not in ("float", "base64"):
                    raise BadRequest("'encoding_format' must be float or base64", "encoding_format")
                dims = body.get("dimensions") or self.cfg.dims
                if not _is_int(dims) or not 1 <= dims <= 65536:
                    raise BadRequest("'dimensions' must be an integer in [1, 65536]", "dimensions")
            else:
                words = (
                    _prompt_words_chat(body) if kind == "chat" else _prompt_words_completion(body)
                )
                max_tokens = self._max_tokens(body)
                if body.get("n") not in (1, None):
                    raise BadRequest("only n = 1 is supported by the test model server", "n")
        except BadRequest as e:
            m.outcome("model_not_found" if e.status == 404 else "bad_request")
            return conn.respond_error(req, e.status, e.message, e.param)

        failure = self._injected_failure()
        if self.b.latency > 0:
            await asyncio.sleep(self.b.latency)
        if failure is not None:
            m.outcome("injected_error")
            extra = [("x-model-server-error", "injected")]
            if failure in (429, 503):
                extra.append(("retry-after", "1"))
            msg = f"injected error (test workload {self.name})"
            return conn.respond_error(req, failure, msg, extra=extra)

        if not await self.adm.acquire():
            m.outcome("rejected")
            msg = (
                f"server saturated: {self.adm.running} running, {len(self.adm.waiters)} waiting"
                f" (max queue {self.b.max_queue})"
            )
            extra = [("retry-after", "1"), ("x-model-server-error", "saturated")]
            return conn.respond_error(req, 503, msg, extra=extra)
        try:
            if kind == "embedding":
                return await self._embed(
                    conn, req, body=body, inputs=inputs, fmt=fmt, dims=dims, t0=t0
                )
            return await self._generate(
                conn, req, body=body, kind=kind, prompt=words, max_tokens=max_tokens, t0=t0
            )
        finally:
            self.adm.release()

    async def _embed(
        self,
        conn: Connection,
        req: Request,
        *,
        body: dict[str, Any],
        inputs: list[list[str]],
        fmt: str,
        dims: int,
        t0: float,
    ) -> bool:
        b, m = self.b, self.metrics
        if b.ttft > 0:
            await asyncio.sleep(b.ttft)
        data: list[dict[str, Any]] = []
        for i, words in enumerate(inputs):
            vec = embedding(self.cfg.model, words, dims)
            emb: Any = vec
            if fmt == "base64":
                emb = base64.b64encode(struct.pack(f"<{dims}f", *vec)).decode()
            data.append({"object": "embedding", "index": i, "embedding": emb})
        n = sum(len(w) for w in inputs)
        m.prompt_tokens += n
        m.finished["stop"] += 1
        m.outcome("ok")
        m.e2e.observe(time.monotonic() - t0)
        out = {
            "object": "list",
            "data": data,
            "model": self._response_model(body),
            "usage": {"prompt_tokens": n, "total_tokens": n},
        }
        return conn.respond_json(req, 200, out)

    async def _generate(
        self,
        conn: Connection,
        req: Request,
        *,
        body: dict[str, Any],
        kind: str,
        prompt: list[str],
        max_tokens: int | None,
        t0: float,
    ) -> bool:
        b, m = self.b, self.metrics
        n = b.tokens if max_tokens is None else min(max_tokens, b.tokens)
        finish = "length" if max_tokens is not None and max_tokens <= b.tokens else "stop"
        temperature = body.get("temperature")
        rng = None
        if self.cfg.random and _is_num(temperature) and temperature > 0:
            rng = random.Random()
        words = generate(self.cfg.model, prompt, n, rng)
        cached = self.prefix_cache.lookup_and_insert(prompt)
        m.prefix_queries += len(prompt)
        m.prefix_hits += cached
        m.prompt_tokens += len(prompt)
        usage = {
            "prompt_tokens": len(prompt),
            "completion_tokens": n,
            "total_tokens": len(prompt) + n,
            "prompt_tokens_details": {"cached_tokens": cached},
        }
        self.seq += 1
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{self.name}-{self.seq}"
        model = self._response_model(body)
        start = time.monotonic()
        first_at = start + b.ttft + b.prefill_per_token * (len(prompt) - cached)
        stream = body.get("stream") is True
        if stream:
            opts = body.get("stream_options")
            include_usage = isinstance(opts, dict) and opts.get("include_usage") is True
            return await self._stream(
                conn,
                req,
                kind=kind,
                rid=rid,
                model=model,
                words=words,
                finish=finish,
                usage=usage,
                include_usage=include_usage,
                t0=t0,
                first_at=first_at,
            )
        end = first_at + (n - 1) * b.tpot
        delay = end - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        text = " ".join(words)
        choice: dict[str, Any]
        if kind == "chat":
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish,
            }
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        out = {
            "id": rid,
            "object": "chat.completion" if kind == "chat" else "text_completion",
            "created": int(time.time()),
            "model": model,
            "choices": [choice],
            "usage": usage,
        }
        self._finished(n, finish, t0, first_at, time.monotonic())
        return conn.respond_json(req, 200, out)

    def _finished(self, n: int, finish: str, t0: float, first_at: float, end: float) -> None:
        m = self.metrics
        m.generation_tokens += n
        m.finished[finish] += 1
        m.outcome("ok")
        m.ttft.observe(max(0.0, first_at - t0))
        if n > 1:
            m.tpot.observe(max(0.0, (end - first_at) / (n - 1)))
        m.e2e.observe(end - t0)

    async def _stream(
        self,
        conn: Connection,
        req: Request,
        *,
        kind: str,
        rid: str,
        model: str,
        words: list[str],
        finish: str,
        usage: dict[str, Any],
        include_usage: bool,
        t0: float,
        first_at: float,
    ) -> bool:
        b = self.b
        created = int(time.time())
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
        base: dict[str, Any] = {"id": rid, "object": obj, "created": created, "model": model}
        if include_usage:
            base["usage"] = None  # as OpenAI: null in every chunk but the last

        def chunk(choice: dict[str, Any] | None, **extra: Any) -> bytes:
            c = dict(base, choices=[choice] if choice else [], **extra)
            return b"data: " + json.dumps(c, separators=(",", ":")).encode() + b"\n\n"

        keep = conn.start_stream(req, b"text/event-stream")
        abort_after = b.stream_abort_after
        tpot = b.tpot
        first_sent = first_at
        for i, w in enumerate(words):
            delay = first_at + i * tpot - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            piece = w if i == 0 else " " + w
            if kind == "chat":
                delta: dict[str, Any] = {"content": piece}
                if i == 0:
                    delta = {"role": "assistant", "content": piece}
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}
            else:
                choice = {"index": 0, "text": piece, "logprobs": None, "finish_reason": None}
            await conn.send_chunk(req, chunk(choice))
            if i == 0:
                first_sent = time.monotonic()
            if abort_after is not None and i + 1 >= abort_after:
                self.metrics.outcome("stream_cut")
                conn.abort()
                return False
        last: dict[str, Any]
        if kind == "chat":
            last = {"index": 0, "delta": {}, "logprobs": None, "finish_reason": finish}
        else:
            last = {"index": 0, "text": "", "logprobs": None, "finish_reason": finish}
        tail = chunk(last)
        if include_usage:
            tail += chunk(None, usage=usage)
        await conn.send_chunk(req, tail + b"data: [DONE]\n\n")
        conn.end_stream(req)
        self._finished(len(words), finish, t0, first_sent, time.monotonic())
        return keep


# --------------------------------------------------------------------------- running


def new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class ServerThread:
    """Run a ModelServer on its own event loop in a thread (for tests and benchmarks).

    with ServerThread(ServerConfig(model="m"), Behaviour(ttft=0)) as st:
        urlopen(st.url + "/health")
    """

    def __init__(
        self,
        config: ServerConfig | None = None,
        behaviour: Behaviour | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.config = config or ServerConfig()
        self.behaviour = behaviour
        self.host, self.port = host, port
        self.loop = new_event_loop()
        self.server: ModelServer | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="model-server", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def boot() -> None:
            self.server = ModelServer(self.config, self.behaviour)
            self.port = await self.server.start(self.host, self.port)

        try:
            self.loop.run_until_complete(boot())
        except BaseException as e:
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        self.loop.run_forever()
        self.loop.close()

    def start(self) -> ServerThread:
        self._thread.start()
        self._ready.wait(10)
        if self._error is not None:
            raise self._error
        return self

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run fn on the server's loop and return its result (to read or change state)."""

        async def run() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(5)

    def stop(self, deadline: float = 2.0) -> None:
        if self.server is not None and self._thread.is_alive():
            fut = asyncio.run_coroutine_threadsafe(self.server.shutdown(deadline), self.loop)
            with contextlib.suppress(Exception):
                fut.result(deadline + 5)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(5)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


async def serve(
    config: ServerConfig, behaviour: Behaviour, host: str, port: int, drain: float
) -> int:
    srv = ModelServer(config, behaviour)
    bound = await srv.start(host, port)
    print(
        json.dumps(
            {
                "event": "listening",
                "host": host,
                "port": bound,
                "model": config.model,
                "name": srv.name,
            }
        ),
        flush=True,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    in_flight = srv.active
    log.info("draining: %d requests in flight", in_flight)
    clean = await srv.shutdown(drain)
    print(json.dumps({"event": "stopped", "clean": clean, "in_flight": in_flight}), flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    d = Behaviour()
    ap = argparse.ArgumentParser(
        prog="python -m agent.lab.workloads.model_server",
        description="OpenAI-compatible fake model server (a test workload; stands in for vLLM).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    a = ap.add_argument
    a("--host", default="0.0.0.0")
    a("--port", type=int, default=8000, help="0 picks a free port (printed on stdout)")
    a("--model", default="test-model", help="the model this server serves")
    a("--alias", action="append", default=[], help="another accepted model name (repeatable)")
    a("--name", default="", help="x-weft-served-by (default: $WEFT_POD, $POD_NAME, hostname)")
    a("--echo-model", action="store_true", help="answer with the requested model name")
    a("--strict-model", action="store_true", help="404 for models not --model or --alias")
    a("--tokens", type=int, default=d.tokens, help="completion tokens unless max_tokens is lower")
    a("--ttft", type=float, default=d.ttft, help="seconds to the first token")
    a("--tpot", type=float, default=d.tpot, help="seconds per further output token")
    a("--prefill-per-token", type=float, default=d.prefill_per_token,
      help="extra TTFT seconds per prompt token not in the prefix cache")  # fmt: skip
    a("--latency", type=float, default=d.latency, help="extra seconds before every /v1 answer")
    a("--random", action="store_true", help="temperature > 0 gives random words")
    a("--dims", type=int, default=8, help="embedding dimensions")
    a("--max-concurrency", type=int, default=d.max_concurrency, help="0: unlimited")
    a("--max-queue", type=int, default=d.max_queue)
    a("--error-rate", type=float, default=d.error_rate, help="fraction of /v1 requests to fail")
    a("--error-status", type=int, default=d.error_status)
    a("--fail-next", type=int, default=0, help="fail the next K /v1 requests")
    a("--fail-after", type=int, default=None, help="let N /v1 requests through, then fail all")
    a("--seed", type=int, default=d.seed, help="seed of the error-injection draws")
    a("--unhealthy", action="store_true", help="GET /health answers 503")
    a("--kv-cache-usage", type=float, default=None, help="pin vllm:gpu_cache_usage_perc")
    a("--prefix-cache-blocks", type=int, default=4096, help="0 disables the prefix cache")
    a("--max-body", type=int, default=MiB, help="largest request body, bytes (else 413)")
    a("--drain", type=float, default=5.0, help="seconds to finish in-flight work on SIGTERM")
    a("--no-control", action="store_true", help="disable /control")
    a("--access-log", action="store_true", help="log every request on stderr")
    return ap


def config_from_args(args: argparse.Namespace) -> tuple[ServerConfig, Behaviour]:
    cfg = ServerConfig(
        model=args.model,
        aliases=tuple(args.alias),
        name=args.name,
        echo_model=args.echo_model,
        strict_model=args.strict_model,
        random=args.random,
        dims=args.dims,
        max_body=args.max_body,
        prefix_cache_blocks=args.prefix_cache_blocks,
        enable_control=not args.no_control,
        access_log=args.access_log,
    )
    values = {
        "tokens": args.tokens,
        "ttft": args.ttft,
        "tpot": args.tpot,
        "prefill_per_token": args.prefill_per_token,
        "latency": args.latency,
        "error_rate": args.error_rate,
        "error_status": args.error_status,
        "fail_next": args.fail_next,
        "fail_after": args.fail_after,
        "unhealthy": args.unhealthy,
        "kv_cache_usage": args.kv_cache_usage,
        "max_concurrency": args.max_concurrency,
        "max_queue": args.max_queue,
        "seed": args.seed,
    }
    for k, v in values.items():
        why = _check(k, v)
        if why is not None:
            raise ValueError(f"--{k.replace('_', '-')} must be {why}")
    if args.dims < 1:
        raise ValueError("--dims must be >= 1")
    return cfg, Behaviour(**values)


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    try:
        cfg, behaviour = config_from_args(args)
    except ValueError as e:
        ap.error(str(e))
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(serve(cfg, behaviour, args.host, args.port, args.drain))


if __name__ == "__main__":
    sys.exit(main())
