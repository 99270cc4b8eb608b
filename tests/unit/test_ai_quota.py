"""Token rate limits and budgets (TokenRateLimit): per caller, shared by workers, charged at
the end of a stream, shadow mode, OpenAI's headers. The clock is injected: `now` values."""

from __future__ import annotations

import multiprocessing
from pathlib import Path
from typing import Any

import pytest

from agent.waypoint.ai.facts import RequestFacts
from agent.waypoint.ai.quota import (
    QuotaStore,
    TokenLimiter,
    budget_window,
    duration_text,
    wait_for_room,
)
from agent.waypoint.codec.headers import Headers
from controller.model.ai import TokenRateLimit

T0 = 1_700_000_040.0  # a minute boundary


def policy(*limits: dict[str, Any], shadow: bool = False) -> TokenRateLimit:
    return TokenRateLimit.model_validate(
        {
            "apiVersion": "weft.dev/v1alpha1",
            "kind": "TokenRateLimit",
            "metadata": {"name": "tokens", "namespace": "ai"},
            "spec": {"targetRefs": [{"name": "llm"}], "limits": list(limits), "shadow": shadow},
        }
    )


def caller(name: str, model: str = "llama", **headers: str) -> RequestFacts:
    return RequestFacts(
        f"spiffe://td/ns/team-{name}/sa/{name}",
        f"team-{name}",
        model,
        "/v1/chat/completions",
        Headers.of(*headers.items()),
    )


def run(lim: TokenLimiter, who: RequestFacts, tokens: int, now: float, used: int) -> bool:
    """One request: admit with its estimate, charge what it used; whether it was admitted."""
    adm = lim.admit(who, tokens, now)
    if adm.allowed:
        lim.charge(adm, used, now + 0.5)
    return adm.allowed


def hdr(adm: Any) -> dict[bytes, bytes]:
    return dict(adm.headers)


PER_CALLER = {"name": "per-caller", "by": "principal", "tokensPerMinute": 1000}


@pytest.fixture
def store(tmp_path: Path) -> QuotaStore:
    return QuotaStore(tmp_path / "quota.db")


def test_a_caller_over_its_tokens_per_minute_gets_429_while_another_succeeds(store):
    lim = TokenLimiter(policy(PER_CALLER), store)
    alice, bob = caller("alice"), caller("bob")
    for i in range(4):
        assert run(lim, alice, 10, T0 + i, used=300)  # 1200 charged: over by one request
    adm = lim.admit(alice, 10, T0 + 5)
    assert not adm.allowed and adm.status == 429
    h = hdr(adm)
    assert int(h[b"retry-after"]) >= 1
    assert h[b"x-ratelimit-limit-tokens"] == b"1000"
    assert h[b"x-ratelimit-remaining-tokens"] == b"0"
    assert h[b"x-weft-ratelimit-limit"] == b"ai/tokens/per-caller"
    assert "per-caller" in adm.message()
    ok = lim.admit(bob, 10, T0 + 5)
    assert ok.allowed and hdr(ok)[b"x-ratelimit-remaining-tokens"] == b"990"


def test_the_sliding_window_frees_room_as_the_last_minute_moves_on(store):
    lim = TokenLimiter(policy(PER_CALLER), store)
    alice = caller("alice")
    assert run(lim, alice, 10, T0 + 1, used=1000)
    assert not lim.admit(alice, 10, T0 + 30).allowed  # the whole 1000 is in this minute
    # 90 s later, 30 s into the next minute: the old minute weighs (1 - 0.5) -> 500 used.
    assert lim.admit(alice, 400, T0 + 90).allowed
    assert not lim.admit(alice, 200, T0 + 90).allowed  # 500 + 400 + 200 > 1000


def test_retry_after_is_when_the_window_has_room_again():
    # 1000 used this minute, at 0% into it: room for 100 comes when it has faded to 900,
    # i.e. 10% into the next minute: 60 s + 6 s.
    assert wait_for_room(0, 1000, 0.0, 1000, 100) == pytest.approx(66.0)
    assert wait_for_room(1000, 0, 0.5, 1000, 100) == pytest.approx(0.0)
    assert wait_for_room(1000, 200, 0.0, 1000, 100) == pytest.approx(18.0)
    assert wait_for_room(0, 0, 0.0, 1000, 2000) is None  # never fits
    assert duration_text(0.25) == "250ms" and duration_text(361) == "6m1s"


def test_requests_per_minute_count_requests_not_tokens(store):
    lim = TokenLimiter(policy({"name": "rpm", "by": "namespace", "requestsPerMinute": 3}), store)
    a, b = caller("a"), caller("b")
    assert [run(lim, a, 0, T0 + i, used=10_000) for i in range(4)] == [True, True, True, False]
    adm = lim.admit(b, 0, T0 + 4)
    assert adm.allowed and hdr(adm)[b"x-ratelimit-remaining-requests"] == b"2"


def test_two_workers_on_one_store_file_share_one_limit(tmp_path):
    p = policy({"name": "all", "by": "none", "requestsPerMinute": 10})
    w1 = TokenLimiter(p, QuotaStore(tmp_path / "q.db"))
    w2 = TokenLimiter(p, QuotaStore(tmp_path / "q.db"))
    admitted = [(w1 if i % 2 else w2).admit(caller("x"), 0, T0 + 1).allowed for i in range(16)]
    assert admitted.count(True) == 10


def _worker(path: str, n: int, start: Any, out: Any) -> None:
    p = policy({"name": "all", "by": "none", "tokensPerMinute": 500})
    lim = TokenLimiter(p, QuotaStore(path))
    start.wait(10)
    got = 0
    for _ in range(n):
        adm = lim.admit(caller("x"), 5, T0 + 1)
        if adm.allowed:
            got += 1
            lim.charge(adm, 5, T0 + 1)
    out.put(got)


def test_two_worker_processes_never_admit_more_than_the_limit_together(tmp_path):
    """Check and increment are one IMMEDIATE transaction: the last token is taken once."""
    ctx = multiprocessing.get_context("fork")
    q, start = ctx.Queue(), ctx.Barrier(2)
    path = str(tmp_path / "q.db")
    QuotaStore(path).close()  # create the schema before they race
    procs = [ctx.Process(target=_worker, args=(path, 150, start, q)) for _ in range(2)]
    for pr in procs:
        pr.start()
    counts = [q.get(timeout=30) for _ in procs]
    for pr in procs:
        pr.join(30)
    assert sum(counts) == 100  # 300 tries of 5 tokens at 500 per minute


def _opener(path: str, start: Any, out: Any) -> None:
    start.wait()
    try:
        QuotaStore(path).close()
        out.put("ok")
    except Exception as e:  # reported to the test, which names it
        out.put(repr(e))


def test_replicas_creating_the_store_file_at_once_all_open_it(tmp_path):
    """Waypoint replicas of a node see a new token policy together and open the shared file
    at the same moment; switching a new file to WAL takes an exclusive lock that the busy
    timeout does not cover. Every one of them must get the store."""
    ctx = multiprocessing.get_context("fork")
    for round_ in range(5):
        q, start = ctx.Queue(), ctx.Barrier(6)
        path = str(tmp_path / f"race-{round_}.db")
        procs = [ctx.Process(target=_opener, args=(path, start, q)) for _ in range(6)]
        for pr in procs:
            pr.start()
        results = [q.get(timeout=30) for _ in procs]
        for pr in procs:
            pr.join(30)
        assert results == ["ok"] * 6, results


def test_a_stream_over_budget_finishes_and_is_charged_in_full(store):
    """Admission reserves the prompt estimate; the end charges the actual usage, even past
    the limit (the stream was never cut), and the overshoot blocks the next request."""
    lim = TokenLimiter(policy(PER_CALLER), store)
    alice = caller("alice")
    adm = lim.admit(alice, 50, T0 + 1)
    assert adm.allowed
    assert store.value("ai/tokens/per-caller/" + alice.principal + "/t", int(T0)) == 50
    lim.charge(adm, 1800, T0 + 20)  # a long stream: 1800 tokens, 800 over the limit
    assert store.value("ai/tokens/per-caller/" + alice.principal + "/t", int(T0)) == 1800
    assert not lim.admit(alice, 1, T0 + 21).allowed
    assert lim.counters.tokens_charged == 1800


def test_a_refund_takes_back_the_reservation_but_not_the_request(store):
    lim = TokenLimiter(
        policy({"name": "l", "by": "principal", "tokensPerMinute": 100, "requestsPerMinute": 5}),
        store,
    )
    alice = caller("alice")
    adm = lim.admit(alice, 90, T0)
    lim.charge(adm, 0, T0 + 1)  # the backend failed; a fallback will be tried
    again = lim.admit(alice, 90, T0 + 2)
    assert again.allowed and hdr(again)[b"x-ratelimit-remaining-requests"] == b"3"


def test_shadow_mode_counts_and_reports_but_never_blocks(store):
    lim = TokenLimiter(policy(PER_CALLER, shadow=True), store)
    alice = caller("alice")
    results = [lim.admit(alice, 400, T0 + i) for i in range(4)]
    assert all(a.allowed for a in results)
    assert [a.shadow_denied for a in results] == [False, False, True, True]
    assert hdr(results[3])[b"x-weft-ratelimit-shadow-denied"] == b"ai/tokens/per-caller"
    assert lim.counters.shadow_denied == 2 and lim.counters.denied == 0


def test_an_enforced_limit_still_applies_next_to_a_shadow_one(store):
    trial = {**PER_CALLER, "name": "trial", "tokensPerMinute": 10, "shadow": True}
    lim = TokenLimiter(policy(PER_CALLER, trial), store)
    adm = lim.admit(caller("alice"), 100, T0)
    assert adm.allowed and adm.shadow_denied
    assert not lim.admit(caller("alice"), 950, T0).allowed  # per-caller is enforced


def test_a_daily_budget_survives_a_restart_and_resets_at_midnight_utc(tmp_path):
    p = policy({"name": "daily", "by": "namespace", "budget": {"tokens": 1000, "window": "day"}})
    lim = TokenLimiter(p, QuotaStore(tmp_path / "q.db"))
    assert run(lim, caller("a"), 10, T0, used=990)
    restarted = TokenLimiter(p, QuotaStore(tmp_path / "q.db"))
    adm = restarted.admit(caller("a"), 20, T0 + 3600)
    assert not adm.allowed
    _, end = budget_window("day", T0)
    assert hdr(adm)[b"x-weft-budget-remaining-tokens"] == b"10"
    assert int(hdr(adm)[b"retry-after"]) == pytest.approx(end - T0 - 3600, abs=1)
    assert restarted.admit(caller("a"), 20, end + 1).allowed


def test_calendar_windows_of_budgets():
    assert budget_window("month", 1_709_251_200.0 + 5) == (1_709_251_200, 1_711_929_600)  # Mar 24
    assert budget_window("hour", 7300.0) == (7200, 10800)


def test_overrides_give_some_key_values_their_own_numbers(store):
    lim = TokenLimiter(
        policy(
            {
                "name": "per-tenant",
                "by": "header",
                "header": "x-tenant",
                "requestsPerMinute": 1,
                "overrides": [{"values": ["big"], "requestsPerMinute": 3}],
            }
        ),
        store,
    )
    big, small = caller("x", **{"x-tenant": "big"}), caller("x", **{"x-tenant": "small"})
    assert [lim.admit(big, 0, T0).allowed for _ in range(4)] == [True, True, True, False]
    assert [lim.admit(small, 0, T0).allowed for _ in range(2)] == [True, False]


def test_a_limit_by_model_with_a_match_only_counts_matching_requests(store):
    lim = TokenLimiter(
        policy(
            {"name": "gpt", "by": "model", "requestsPerMinute": 1, "match": {"models": ["gpt-*"]}}
        ),
        store,
    )
    assert lim.admit(caller("a", model="gpt-4"), 0, T0).allowed
    assert not lim.admit(caller("b", model="gpt-4"), 0, T0).allowed
    assert lim.admit(caller("a", model="gpt-3"), 0, T0).allowed  # another model, own counter
    adm = lim.admit(caller("a", model="llama"), 0, T0)
    assert adm.allowed and adm.headers == []  # no limit applies


def test_a_store_failure_admits_when_fail_open(store):
    lim = TokenLimiter(policy(PER_CALLER), store)
    store.close()
    adm = lim.admit(caller("a"), 1, T0)
    assert adm.allowed and adm.store_error and lim.counters.store_errors == 1


def test_old_counters_are_swept(store):
    lim = TokenLimiter(policy(PER_CALLER), store)
    run(lim, caller("a"), 10, T0, used=10)
    assert store.sweep(T0 + 60) == 0 and store.sweep(T0 + 121) == 1
