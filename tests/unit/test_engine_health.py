"""Active health checks: what is probed when, and how results move endpoints in and out."""

from __future__ import annotations

import random

from agent.waypoint.engine import Attempt, Engine
from tests.enginetesting import FakeClock, address, backend_policy, service, snapshot


def health_check(check: str) -> str:
    return backend_policy(
        "llm",
        f"healthCheck: {{{check}, interval: 5s, timeout: 1s, healthyThreshold: 2,"
        " unhealthyThreshold: 2}",
    )


def setup(check: str = "http: {path: /healthz}") -> tuple[Engine, FakeClock]:
    clock = FakeClock()
    e = Engine(
        snapshot(service("llm", pods=2), health_check(check)), clock=clock, rng=random.Random(1)
    )
    assert e.backend(("ai", "llm", 8000)) is not None
    return e, clock


def test_every_endpoint_is_probed_once_per_interval_spread_over_the_first():
    """First probes fall inside the first interval; each endpoint is then due every 5 s and
    is not handed out again while its probe runs."""
    e, clock = setup()
    first = e.next_timer()
    assert first is not None and clock.now <= first <= clock.now + 5
    clock.advance(5)
    probes = e.due_probes()
    assert sorted(p.endpoint.address for p in probes) == [address(0), address(1)]
    assert (probes[0].kind, probes[0].path, probes[0].timeout) == ("http", "/healthz", 1.0)
    assert e.due_probes() == []
    assert probes[0].passed(204) and not probes[0].passed(500)


def test_thresholds_move_an_endpoint_out_and_back_in():
    """Two failed probes take an endpoint out of rotation (event); two passes bring it back."""
    e, clock = setup("grpc: {service: llm.v1.Inference}")
    b = e.backend(("ai", "llm", 8000))
    assert b is not None
    for ok in (False, False):
        clock.advance(5)
        for p in e.due_probes():
            assert (p.kind, p.service) == ("grpc", "llm.v1.Inference")
            e.report_probe(p, ok or p.endpoint.address != address(0))
    picks = {a.endpoint.address for a in (b.attempt() for _ in range(30)) if isinstance(a, Attempt)}
    assert picks == {address(1)}
    assert [(ev.kind, ev.endpoint) for ev in e.take_events()] == [("unhealthy", address(0))]
    for _ in range(2):
        clock.advance(5)
        for p in e.due_probes():
            e.report_probe(p, True)
    assert [ev.kind for ev in e.take_events()] == ["healthy"]
    assert b.counters.health_check_failures == 2
