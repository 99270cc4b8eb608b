"""W3C Trace Context through the waypoint, and spans exported over OTLP/HTTP (JSON).

Per request the waypoint makes one SERVER span (the hop into the waypoint) and one
CLIENT span per upstream attempt (so retries show), continues the caller's trace when it
sent a valid `traceparent`, passes `tracestate` on untouched, and sends the backend a
`traceparent` naming the attempt's span as parent.

Spans are exported only when an OTLP endpoint is configured, in batches from a bounded
queue by a background task; a full queue drops spans (counted) rather than slowing
requests. The encoder writes OTLP's JSON mapping by hand: the whole SDK would cost more
per request than the proxying itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import re
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from agent.frozen import frozen
from agent.waypoint.codec import client
from agent.waypoint.codec.headers import Headers

log = logging.getLogger("weft.tracing")

_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")
SERVER, CLIENT = 2, 3  # OTLP SpanKind
STATUS_ERROR = 2
MAX_QUEUE = 4096  # spans waiting for export; beyond this they are dropped and counted
BATCH = 256
FLUSH_EVERY = 1.0  # seconds

# Trace, span and request ids need to be unique, not secret (W3C Trace Context §6: "random
# or pseudo-random"), so they come from a Mersenne Twister seeded once from the OS, as the
# OpenTelemetry SDK's RandomIdGenerator does: a getrandom(2) per id was four syscalls per
# proxied request.
_ids = random.Random()


def random_hex(bits: int) -> str:
    """`bits` random bits as lowercase hex, never all zeros (an invalid trace or span id)."""
    return f"{_ids.getrandbits(bits) or 1:0{bits // 4}x}"


@frozen
class TraceContext:
    trace_id: str  # 32 hex
    parent_id: str | None  # 16 hex, the caller's span; None when we start the trace
    sampled: bool
    tracestate: str | None = None

    @classmethod
    def from_headers(cls, traceparent: bytes | None, tracestate: bytes | None) -> TraceContext:
        if traceparent:
            m = _TRACEPARENT.match(traceparent.decode("latin-1").strip().lower())
            # Version ff is invalid, and all-zero ids are invalid (W3C Trace Context §3.2).
            if m and m.group(1) != "ff" and set(m.group(2)) != {"0"} and set(m.group(3)) != {"0"}:
                return cls(
                    m.group(2),
                    m.group(3),
                    bool(int(m.group(4), 16) & 1),
                    tracestate.decode("latin-1") if tracestate else None,
                )
        return cls(random_hex(128), None, True, None)

    def child_traceparent(self) -> bytes:
        """The `traceparent` for a new span of this trace (a try toward the backend) that
        is not exported."""
        return traceparent(self.trace_id, random_hex(64), self.sampled)


def new_span_id() -> str:
    return random_hex(64)


def traceparent(trace_id: str, span_id: str, sampled: bool) -> bytes:
    return f"00-{trace_id}-{span_id}-{'01' if sampled else '00'}".encode()


@dataclass(slots=True)
class Span:
    name: str
    trace_id: str
    span_id: str
    parent_id: str | None
    kind: int
    start_ns: int = field(default_factory=time.time_ns)
    end_ns: int = 0
    attributes: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    def end(self, **attrs: Any) -> None:
        self.end_ns = time.time_ns()
        self.attributes.update(attrs)

    def otlp(self) -> dict[str, Any]:
        span: dict[str, Any] = {
            "traceId": self.trace_id,
            "spanId": self.span_id,
            "name": self.name,
            "kind": self.kind,
            "startTimeUnixNano": str(self.start_ns),
            "endTimeUnixNano": str(self.end_ns or time.time_ns()),
            "attributes": [_attr(k, v) for k, v in self.attributes.items() if v is not None],
        }
        if self.parent_id:
            span["parentSpanId"] = self.parent_id
        if self.error:
            span["status"] = {"code": STATUS_ERROR, "message": self.error}
        return span


def _attr(k: str, v: Any) -> dict[str, Any]:
    if isinstance(v, bool):
        return {"key": k, "value": {"boolValue": v}}
    if isinstance(v, int):
        return {"key": k, "value": {"intValue": str(v)}}
    if isinstance(v, float):
        return {"key": k, "value": {"doubleValue": v}}
    return {"key": k, "value": {"stringValue": str(v)}}


class Exporter:
    """Batches spans to an OTLP/HTTP endpoint (http://host:4318, path /v1/traces)."""

    def __init__(self, endpoint: str | None, service_name: str) -> None:
        self.endpoint = endpoint.rstrip("/") if endpoint else None
        # Whether spans are exported: fixed with the endpoint, and read per request (an
        # attribute, as a property would cost a call each time).
        self.enabled = self.endpoint is not None
        self.service_name = service_name
        self.queue: deque[Span] = deque()
        self.dropped = 0
        self.exported = 0
        self.failures = 0
        self._task: asyncio.Task[None] | None = None

    def record(self, span: Span) -> None:
        if not self.enabled:
            return
        if len(self.queue) >= MAX_QUEUE:
            self.dropped += 1
            return
        self.queue.append(span)

    def start(self) -> None:
        if self.enabled:
            self._task = asyncio.create_task(self._run(), name="otlp-export")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_EVERY)
            await self.flush()

    async def flush(self) -> None:
        while self.queue:
            batch = [self.queue.popleft() for _ in range(min(BATCH, len(self.queue)))]
            try:
                await self._post(batch)
                self.exported += len(batch)
            except (OSError, TimeoutError, ValueError) as e:
                self.failures += 1
                log.warning(
                    "OTLP export to %s failed (%s); %d spans lost", self.endpoint, e, len(batch)
                )
                return

    def encode(self, spans: list[Span]) -> bytes:
        return json.dumps(
            {
                "resourceSpans": [
                    {
                        "resource": {"attributes": [_attr("service.name", self.service_name)]},
                        "scopeSpans": [
                            {"scope": {"name": "weft.waypoint"}, "spans": [s.otlp() for s in spans]}
                        ],
                    }
                ]
            }
        ).encode()

    async def _post(self, spans: list[Span]) -> None:
        assert self.endpoint is not None
        u = urlsplit(self.endpoint + "/v1/traces")
        answer = await client.request(
            (u.hostname or "", u.port or 4318),
            "POST",
            u.path,
            u.netloc,
            peer="the OTLP collector",
            limit=5,
            headers=Headers.of(("content-type", "application/json"), ("connection", "close")),
            body=self.encode(spans),
        )
        if not 200 <= answer.status < 300:
            raise ValueError(f"collector answered {answer.status}")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.flush(), 2)
