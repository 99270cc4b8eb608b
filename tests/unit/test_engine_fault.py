"""Fault injection: delays and aborts at the configured percentages, decided per request."""

from __future__ import annotations

import random

from agent.waypoint.codec.headers import Headers
from agent.waypoint.engine import Engine, Forward, Respond
from tests.enginetesting import http_route, service, snapshot


def engine(fault: str) -> Engine:
    return Engine(
        snapshot(
            service("llm"),
            f"""\
apiVersion: weft.dev/v1alpha1
kind: FaultInjection
metadata: {{name: chaos, namespace: ai}}
spec: {fault}""",
            http_route("""\
    - filters:
        - {type: ExtensionRef, extensionRef: {group: weft.dev, kind: FaultInjection, name: chaos}}
      backendRefs: [{name: llm, port: 8000}]"""),
        ),
        rng=random.Random(11),
    )


def test_percentages_hold_for_delay_and_abort_independently():
    """10% delayed by 2 s and 5% aborted with 503, drawn independently, over 10,000 requests."""
    e = engine("{delay: {fixedDelay: 2s, percentage: 10}, abort: {httpStatus: 503, percentage: 5}}")
    ds = [e.route(("ai", "llm"), 8000, "GET", "/", Headers()) for _ in range(10_000)]
    aborted = [d for d in ds if isinstance(d, Respond)]
    delayed = [d for d in ds if d.delay]
    assert 0.09 < len(delayed) / 10_000 < 0.11 and {d.delay for d in delayed} == {2.0}
    assert 0.04 < len(aborted) / 10_000 < 0.06
    assert all((d.status, d.code) == (503, "FaultAbort") for d in aborted)
    assert (e.counters.fault_delays, e.counters.fault_aborts) == (len(delayed), len(aborted))


def test_a_fault_without_percentage_hits_every_request_and_zero_never():
    """No percentage means every request; 0% means none."""
    e = engine("{abort: {httpStatus: 429}}")
    assert all(
        isinstance(d, Respond) and d.status == 429
        for d in (e.route(("ai", "llm"), 8000, "GET", "/", Headers()) for _ in range(100))
    )
    e = engine("{delay: {fixedDelay: 1s, percentage: 0}}")
    ds = [e.route(("ai", "llm"), 8000, "GET", "/", Headers()) for _ in range(1000)]
    assert all(isinstance(d, Forward) and d.delay == 0 for d in ds)
