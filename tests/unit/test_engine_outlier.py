"""Outlier detection, fallback and panic: failing endpoints leave and come back on schedule."""

from __future__ import annotations

import random

from agent.waypoint.codec.headers import Headers
from agent.waypoint.engine import Attempt, Backend, Engine, Failure, Respond
from tests.enginetesting import FakeClock, address, backend_policy, service, snapshot

LLM = ("ai", "llm")


def setup(outlier: str, *, pods: int = 4, extra: str = "") -> tuple[Engine, Backend, FakeClock]:
    clock = FakeClock()
    spec = f"loadBalancer: {{type: RoundRobin}}\n  outlierDetection: {outlier}"
    doc = backend_policy("llm", spec + ("\n" + extra if extra else ""))
    e = Engine(snapshot(service("llm", pods=pods), doc), clock=clock, rng=random.Random(4))
    b = e.backend(("ai", "llm", 8000))
    assert b is not None
    return e, b, clock


def hit(b: Backend, ep: str, outcome: int, times: int = 1) -> None:
    """Report `outcome` for `times` tries that landed on endpoint `ep`."""
    for _ in range(times):
        att = b.attempt()
        while isinstance(att, Attempt) and att.endpoint.address != ep:
            att.finish(200)
            att = b.attempt()
        assert isinstance(att, Attempt)
        att.finish(outcome)


def picks(b: Backend, n: int = 40) -> set[str]:
    out = set()
    for _ in range(n):
        att = b.attempt()
        assert isinstance(att, Attempt)
        out.add(att.endpoint.address)
        att.release()
    return out


def test_ejected_after_n_consecutive_5xx_and_readmitted_after_the_base_time():
    """3 consecutive 5xx eject an endpoint (with an event); after baseEjectionTime it is
    readmitted at the next sweep; a second ejection lasts twice as long."""
    e, b, clock = setup(
        "{consecutive5xxErrors: 3, interval: 1s, baseEjectionTime: 10s, maxEjectionPercent: 50}"
    )
    bad = address(0)
    hit(b, bad, 500, 2)
    hit(b, bad, 200)  # a success resets the count
    hit(b, bad, 503, 3)
    assert bad not in picks(b)
    (ev,) = e.take_events()
    assert (ev.kind, ev.endpoint) == ("ejected", bad) and "3 consecutive 5xx" in ev.detail
    clock.advance(10.5)
    e.tick()
    assert bad in picks(b) and [ev.kind for ev in e.take_events()] == ["readmitted"]
    hit(b, bad, 500, 3)
    clock.advance(10.5)
    e.tick()
    assert bad not in picks(b)  # 20 s this time
    clock.advance(10)
    e.tick()
    assert bad in picks(b)


def test_gateway_errors_have_their_own_threshold():
    """consecutiveGatewayErrors counts 502/503/504 and connect failures; a 500 resets it."""
    _, b, _ = setup(
        "{consecutive5xxErrors: 0, consecutiveGatewayErrors: 2, maxEjectionPercent: 50}"
    )
    bad = address(1)
    hit(b, bad, 502)
    hit(b, bad, 500)
    hit(b, bad, Failure.CONNECT_FAILURE)
    assert bad in picks(b)
    hit(b, bad, 504)
    assert bad not in picks(b)
    assert b.counters.ejections == 1


def test_max_ejection_percent_caps_how_many_are_out():
    """With maxEjectionPercent 50 of 4 endpoints, a third failing endpoint stays in; the
    skipped ejection is counted."""
    _, b, _ = setup("{consecutive5xxErrors: 1, maxEjectionPercent: 50}")
    for i in range(3):
        hit(b, address(i), 500)
    assert picks(b, 80) == {address(2), address(3)}
    assert (b.counters.ejections, b.counters.ejections_overflow) == (2, 1)


def test_at_least_one_endpoint_may_be_ejected_even_at_10_percent_of_three():
    """Envoy's rule, which weft keeps: the percentage rounds down but never below one."""
    _, b, _ = setup("{consecutive5xxErrors: 1}", pods=3)
    hit(b, address(0), 500)
    hit(b, address(1), 500)
    assert picks(b) == {address(1), address(2)}


FALLBACK = """\
  fallback:
    response: {status: 503, headers: {retry-after: "5"}, body: "model is warming up"}"""


def test_fallback_response_when_every_endpoint_is_ejected():
    """All endpoints ejected: the BackendPolicy's fallback response answers, and is counted."""
    e, b, _ = setup("{consecutive5xxErrors: 1, maxEjectionPercent: 100}", pods=2, extra=FALLBACK)
    hit(b, address(0), 503)
    hit(b, address(1), 503)
    d = e.route(LLM, 8000, "GET", "/", Headers())
    att = d.attempt()  # type: ignore[union-attr]
    assert isinstance(att, Respond) and (att.status, att.body) == (503, b"model is warming up")
    assert (b"retry-after", b"5") in att.headers and b.counters.fallback_responses == 1


def test_a_fallback_backend_takes_over_while_every_endpoint_is_out():
    """A fallback backendRef serves while every endpoint is ejected; its own failures do
    not chain to another fallback."""
    doc = backend_policy(
        "llm",
        "outlierDetection: {consecutive5xxErrors: 1, maxEjectionPercent: 100}\n"
        "  fallback: {backendRef: {name: small, port: 8000}}",
    )
    e = Engine(snapshot(service("llm", pods=1), service("small", pods=1, subnet=9), doc))
    b = e.backend(("ai", "llm", 8000))
    assert b is not None
    hit(b, address(0), 500)
    att = b.attempt()
    assert isinstance(att, Attempt) and att.endpoint.address == address(0, subnet=9)
    assert att.backend.name == "ai/small:8000" and b.counters.fallback_backend == 1
    att.finish(500)
    assert att.backend.fallback is None


def test_without_a_fallback_no_available_endpoint_is_503():
    """A Service with no ready endpoints (or all out) and no fallback answers 503."""
    e = Engine(snapshot(service("llm", pods=0)), clock=FakeClock())
    b = e.backend(("ai", "llm", 8000))
    assert b is not None
    r = b.attempt()
    assert isinstance(r, Respond) and (r.status, r.code) == (503, "NoHealthyEndpoint")
    assert "has no ready endpoints" in r.reason and b.counters.no_healthy_endpoint == 1


def test_min_health_percent_balances_over_everyone_when_too_few_are_healthy():
    """Below minHealthPercent healthy, ejections are ignored (panic, Envoy's term), with an
    event each way; readmission ends it."""
    e, b, clock = setup(
        "{consecutive5xxErrors: 1, maxEjectionPercent: 100, minHealthPercent: 60, "
        "interval: 1s, baseEjectionTime: 5s}",
        pods=3,
    )
    hit(b, address(0), 500)
    assert picks(b) == {address(1), address(2)}  # 2 of 3 healthy: 66% >= 60%
    hit(b, address(1), 500)
    assert picks(b, 80) == {address(0), address(1), address(2)}  # 1 of 3: panic
    assert [ev.kind for ev in e.take_events()] == ["ejected", "ejected", "panic"]
    clock.advance(6)
    e.tick()
    assert [ev.kind for ev in e.take_events()] == ["readmitted", "readmitted", "panic_over"]
