"""The response cache (ResponseCache): eligibility, the normalised key, tenants, no-cache,
TTL, the byte bound, and its counters."""

from __future__ import annotations

import json
from typing import Any

from agent.waypoint.ai.cache import BodyCollector, ResponseCacheStore
from agent.waypoint.ai.facts import RequestFacts
from agent.waypoint.ai.openai import ModelRequest, parse_request
from agent.waypoint.codec.headers import Headers
from controller.model.ai import ResponseCache

JSON = Headers.of(("content-type", "application/json"), ("x-weft-served-by", "pod-a"))
ANSWER = b'{"object":"list","data":[{"embedding":[0.1,0.2]}],"usage":{"prompt_tokens":2}}'


def cache(**spec: Any) -> ResponseCacheStore:
    return ResponseCacheStore(
        ResponseCache.model_validate(
            {
                "apiVersion": "weft.dev/v1alpha1",
                "kind": "ResponseCache",
                "metadata": {"name": "cache", "namespace": "ai"},
                "spec": {"targetRefs": [{"name": "embed"}], **spec},
            }
        )
    )


def tenant(ns: str, **headers: str) -> RequestFacts:
    return RequestFacts(
        f"spiffe://td/ns/{ns}/sa/app", ns, "e5", "/v1/embeddings", Headers.of(*headers.items())
    )


def embed(**body: Any) -> ModelRequest:
    return parse_request(
        "embeddings", Headers(), json.dumps({"model": "e5", "input": "a b", **body}).encode()
    )


def serve(c: ResponseCacheStore, req: ModelRequest, who: RequestFacts, now: float) -> str:
    """One request through the cache: 'hit', or 'miss' (then the answer is stored)."""
    key = c.key(req, who)
    if c.lookup(key, who.headers, now) is not None:
        return "hit"
    if key is not None and c.storable(200, JSON):
        c.store(key, 200, JSON, ANSWER, now)
    return "miss"


def test_a_repeated_embeddings_request_is_a_hit_and_another_tenants_is_not():
    c = cache()
    assert serve(c, embed(), tenant("team-a"), 0) == "miss"
    assert serve(c, embed(), tenant("team-a"), 1) == "hit"
    assert serve(c, embed(), tenant("team-b"), 2) == "miss"  # same bytes, other tenant
    hit = c.lookup(c.key(embed(), tenant("team-a")), Headers(), 10)
    assert hit is not None and hit.body == ANSWER
    assert dict(hit.reply_headers(10)) == {
        b"content-type": b"application/json",
        b"age": b"10",
        b"x-weft-cache": b"hit",
    }
    assert (c.counters.hits, c.counters.misses) == (2, 2) and c.hit_ratio == 0.5


def test_tenants_share_only_when_declared():
    c = cache(shareAcrossTenants=True)
    serve(c, embed(), tenant("team-a"), 0)
    assert serve(c, embed(), tenant("team-b"), 1) == "hit"


def test_the_key_ignores_stream_options_user_and_key_order_but_not_the_model():
    c = cache(cacheCompletions=True)
    who = tenant("t")
    assert c.key(embed(user="u1"), who) == c.key(embed(user="u2"), who)
    a = parse_request("chat", Headers(), b'{"model":"m","temperature":0,"messages":[]}')
    b = parse_request("chat", Headers(), b'{"messages":[],"temperature":0.0,"model":"m"}')
    assert c.key(a, who) == c.key(b, who) is not None
    assert c.key(embed(model="other"), who) != c.key(embed(), who)
    assert c.key(embed(dimensions=4), who) != c.key(embed(), who)


def test_only_deterministic_calls_are_eligible():
    who = tenant("t")
    chat0 = parse_request("chat", Headers(), b'{"model":"m","temperature":0,"messages":[]}')
    chat1 = parse_request("chat", Headers(), b'{"model":"m","temperature":0.7,"messages":[]}')
    stream0 = parse_request("chat", Headers(), b'{"temperature":0,"stream":true,"messages":[]}')
    assert cache().key(chat0, who) is None  # completions need cacheCompletions
    allowed = cache(cacheCompletions=True)
    assert allowed.key(chat0, who) is not None
    assert allowed.key(chat1, who) is None and allowed.key(stream0, who) is None


def test_no_cache_skips_the_lookup_but_stores_and_no_store_skips_both():
    c = cache()
    serve(c, embed(), tenant("t"), 0)
    fresh = tenant("t", **{"cache-control": "no-cache"})
    assert serve(c, embed(), fresh, 1) == "miss" and c.counters.bypass == 1
    assert c.key(embed(), tenant("t", **{"cache-control": "no-store"})) is None
    assert serve(c, embed(), tenant("t"), 2) == "hit"


def test_entries_expire_after_the_ttl():
    c = cache(ttl="10s")
    serve(c, embed(), tenant("t"), 0)
    assert serve(c, embed(), tenant("t"), 9.9) == "hit"
    assert serve(c, embed(), tenant("t"), 10.0) == "miss" and c.counters.expired == 1


def test_memory_is_bounded_by_bytes_least_recently_used_first_out():
    c = cache(maxBytes=1000, maxEntryBytes=500)
    who = tenant("t")
    for i in range(3):
        serve(c, embed(input=f"text {i}"), who, i)  # ~350 bytes each with overhead
    assert c.bytes <= 1000 and len(c.entries) == 2 and c.counters.evictions == 1
    assert serve(c, embed(input="text 0"), who, 5) == "miss"  # the oldest went first
    assert not c.store(b"k", 200, JSON, b"x" * 501, 6)  # over maxEntryBytes


def test_only_whole_cacheable_answers_are_stored():
    c = cache()
    assert not c.storable(503, JSON)
    assert not c.storable(200, Headers.of(("content-type", "text/event-stream")))
    assert not c.storable(
        200, Headers.of(("content-type", "application/json"), ("cache-control", "private"))
    )
    col = BodyCollector(limit=10)
    col.feed(b"12345")
    col.feed(b"678901")
    assert col.body() is None  # over the limit: not stored
