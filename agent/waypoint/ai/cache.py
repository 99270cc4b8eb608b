"""Exact-match response cache for deterministic model calls (ResponseCache).

Eligible: embeddings always; chat and completions when the policy allows it and the request
sets temperature 0. Streams are not cached: a cached answer is one JSON body, and replaying
it as SSE would be a different response.

The key is a BLAKE2 digest of: the tenant (unless shared), the operation, and the canonical
JSON of the body (sorted keys, no spaces, integral floats written as integers) without the
fields that do not change the answer: `stream`, `stream_options` and `user`. The model is
part of the body, so it is part of the key.

Requests: `cache-control: no-cache` skips the lookup (the fresh answer is stored);
`no-store` skips both. Responses are stored only when 200, `application/json`, no larger
than maxEntryBytes, and not marked `no-store` or `private` by the backend.

Memory is bounded by maxBytes (body + headers of each entry), least recently used first out;
entries expire after the TTL. One cache per waypoint worker, in memory.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from agent.waypoint.ai.facts import RequestFacts
from agent.waypoint.ai.openai import ModelRequest
from agent.waypoint.codec.headers import Headers
from controller.model.ai import ResponseCache

IGNORED_FIELDS = frozenset({"stream", "stream_options", "user"})
ENTRY_OVERHEAD = 256  # bytes of bookkeeping per entry (key, object headers), for the bound
CACHE_HEADER = b"x-weft-cache"  # response: hit | miss | bypass
KEPT_HEADERS = frozenset({b"content-type", b"x-weft-model-served", b"openai-model"})


@dataclass(slots=True)
class CachedResponse:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    stored_at: float
    expires: float
    size: int

    def reply_headers(self, now: float) -> list[tuple[bytes, bytes]]:
        age = str(max(0, int(now - self.stored_at))).encode()
        return [*self.headers, (b"age", age), (CACHE_HEADER, b"hit")]


@dataclass
class CacheCounters:
    hits: int = 0
    misses: int = 0
    bypass: int = 0  # not eligible, or no-cache / no-store
    stores: int = 0
    evictions: int = 0
    expired: int = 0


def _canon(v: Any) -> Any:
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, dict):
        return {k: _canon(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_canon(x) for x in v]
    return v


def _directives(h: bytes | None) -> set[bytes]:
    if not h:
        return set()
    return {d.strip().split(b"=", 1)[0].lower() for d in h.split(b",")}


class ResponseCacheStore:
    def __init__(self, policy: ResponseCache) -> None:
        s = policy.spec
        self.name = f"{policy.namespace}/{policy.name}"
        self.completions = s.cache_completions
        self.ttl = s.ttl
        self.max_bytes = s.max_bytes
        self.max_entry = s.max_entry_bytes
        self.tenant_by = s.tenant_by
        self.tenant_header = s.tenant_header.lower().encode() if s.tenant_header else b""
        self.shared = s.share_across_tenants
        self.entries: OrderedDict[bytes, CachedResponse] = OrderedDict()
        self.bytes = 0
        self.counters = CacheCounters()

    # ---- request side --------------------------------------------------------------

    def tenant(self, r: RequestFacts) -> str:
        if self.shared:
            return "*"
        if self.tenant_by == "principal":
            return r.principal or "-"
        if self.tenant_by == "header":
            v = r.headers.get(self.tenant_header)
            return v.decode("latin-1") if v else "-"
        return r.namespace or "-"

    def key(self, req: ModelRequest, facts: RequestFacts) -> bytes | None:
        """The cache key, or None when this request must not use the cache."""
        if req.stream:
            return None
        if req.operation != "embeddings" and not (self.completions and req.temperature == 0):
            return None
        cc = _directives(facts.headers.get(b"cache-control"))
        if b"no-store" in cc:
            return None
        body = {k: v for k, v in req.body.items() if k not in IGNORED_FIELDS}
        if "model" not in body and req.model is not None:
            body["model"] = req.model  # named by the header: still part of the answer
        canon = json.dumps(
            _canon(body), sort_keys=True, separators=(",", ":"), ensure_ascii=False
        ).encode()
        h = hashlib.blake2b(digest_size=16)
        for part in (self.tenant(facts).encode(), req.operation.encode(), canon):
            h.update(len(part).to_bytes(4, "big"))
            h.update(part)
        return h.digest()

    def lookup(self, key: bytes | None, headers: Headers, now: float) -> CachedResponse | None:
        """A fresh entry, or None (a miss, or the request said no-cache)."""
        if key is None:
            self.counters.bypass += 1
            return None
        if b"no-cache" in _directives(headers.get(b"cache-control")):
            self.counters.bypass += 1
            return None
        e = self.entries.get(key)
        if e is not None and e.expires <= now:
            self._drop(key)
            self.counters.expired += 1
            e = None
        if e is None:
            self.counters.misses += 1
            return None
        self.entries.move_to_end(key)
        self.counters.hits += 1
        return e

    # ---- response side -------------------------------------------------------------

    def storable(self, status: int, headers: Headers) -> bool:
        """Whether to collect this response's body for `store` (decide at the head)."""
        if status != 200:
            return False
        ctype = (headers.get(b"content-type") or b"").split(b";", 1)[0].strip().lower()
        if ctype != b"application/json":
            return False
        if _directives(headers.get(b"cache-control")) & {b"no-store", b"private"}:
            return False
        length = headers.get(b"content-length")
        return not (length is not None and length.isdigit() and int(length) > self.max_entry)

    def store(self, key: bytes, status: int, headers: Headers, body: bytes, now: float) -> bool:
        kept = [(n, v) for n, v in headers.fields if n in KEPT_HEADERS]
        size = len(body) + sum(len(n) + len(v) for n, v in kept) + ENTRY_OVERHEAD
        if len(body) > self.max_entry or size > self.max_bytes:
            return False
        if key in self.entries:
            self._drop(key)
        while self.bytes + size > self.max_bytes and self.entries:
            oldest = next(iter(self.entries))
            self._drop(oldest)
            self.counters.evictions += 1
        self.entries[key] = CachedResponse(status, kept, body, now, now + self.ttl, size)
        self.bytes += size
        self.counters.stores += 1
        return True

    def _drop(self, key: bytes) -> None:
        e = self.entries.pop(key)
        self.bytes -= e.size

    @property
    def hit_ratio(self) -> float:
        c = self.counters
        looked = c.hits + c.misses
        return c.hits / looked if looked else 0.0


class BodyCollector:
    """Collects a response body for the cache, giving up past `limit` bytes."""

    __slots__ = ("limit", "parts", "size")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.parts: list[bytes] | None = []
        self.size = 0

    def feed(self, data: bytes) -> None:
        if self.parts is None:
            return
        self.size += len(data)
        if self.size > self.limit:
            self.parts = None
        else:
            self.parts.append(data)

    def body(self) -> bytes | None:
        return None if self.parts is None else b"".join(self.parts)
