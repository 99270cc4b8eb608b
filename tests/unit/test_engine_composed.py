"""The one request path's decisions composed, at memory speed (no sockets): what the shell
(agent/waypoint/proxy.py) asks the engine for, in order, and what it gets back. Each test
feeds outcomes in and checks the decisions out, as docs/waypoint-engine.md ("One request
path") describes them: outlier detection inside retries, retries inside a target, a model
route's fallback target after its tries, pool admission for every try, a picker choosing
only among available endpoints."""

from __future__ import annotations

import random

from agent.waypoint.codec.headers import Headers
from agent.waypoint.engine import Attempt, Engine, Failure, Forward
from agent.waypoint.engine.pool import Admission
from agent.waypoint.engine.respond import Respond
from tests.enginetesting import FakeClock, http_route, service, snapshot
from tests.enginetesting import backend_policy as policy

LLM = ("ai", "llm")
ROUTE = http_route("""\
    - retry: {codes: [503], attempts: 2, backoff: 10ms}
      timeouts: {request: 30s}
      backendRefs: [{name: llm, port: 8000}]""")


def engine(*docs: str, clock: FakeClock | None = None) -> Engine:
    return Engine(snapshot(*docs), clock=clock or FakeClock(), rng=random.Random(3))


def _try(fwd: Forward, outcome: int, picker=None) -> tuple[Attempt, float | None]:
    """One try as the shell makes it: attempt, admit, observe, ask for a retry."""
    att = fwd.attempt(picker)
    assert isinstance(att, Attempt), att
    assert att.admit(reusable=False) in (Admission.OPEN, Admission.REUSE)
    att.observe(outcome)
    return att, fwd.retry_after(outcome, att)


def test_ejection_happens_inside_the_retries_of_one_request():
    """consecutive5xxErrors 1: the first try's 503 ejects its endpoint at once, so the
    retry of the same request goes to another endpoint and succeeds."""
    e = engine(
        service("llm", pods=2),
        ROUTE,
        policy("llm", "outlierDetection: {consecutive5xxErrors: 1, maxEjectionPercent: 50}"),
    )
    fwd = e.route(LLM, 8000, "POST", "/v1/chat/completions", Headers())
    assert isinstance(fwd, Forward)
    first, wait = _try(fwd, 503)
    assert wait is not None and first.released and first.endpoint.ejected_until is not None
    second, wait = _try(fwd, 200)
    assert wait is None and second.endpoint is not first.endpoint
    assert fwd.backend.counters.ejections == 1 and fwd.backend.counters.retries == 1


def test_a_targets_tries_then_its_fallback_keep_the_rules_deadline_and_policy():
    """A model route's primary backend fails every try (503, retried twice); the shell
    then sends the same decision to the fallback backend: the rule, its retry policy and
    the request deadline carry over, the tries start afresh there, and the primary's
    failed tries were released (nothing stays counted in flight)."""
    clock = FakeClock()
    e = engine(service("llm", pods=1), service("backup", pods=1, subnet=2), ROUTE, clock=clock)
    fwd = e.route(LLM, 8000, "POST", "/v1/chat/completions", Headers())
    assert isinstance(fwd, Forward)
    for _ in range(2):
        _, wait = _try(fwd, 503)
        assert wait is not None
        clock.advance(wait)
    last, wait = _try(fwd, 503)
    assert wait is None  # attempts exhausted: the shell falls back
    last.release()
    assert fwd.backend.active == 0
    backup = e.backend(("ai", "backup", 8000))
    assert backup is not None
    fb = fwd.to_backend(backup)
    assert (fb.rule, fb.deadline, fb.tries) == (fwd.rule, fwd.deadline, 0)
    att, wait = _try(fb, 200)
    assert wait is None and att.endpoint.host.startswith("10.244.2.")
    att.release()


def test_a_picker_only_ever_sees_available_endpoints():
    """AI policy's least-loaded picker chooses among what outlier detection and health
    leave: after an ejection it is offered only the remaining endpoints, and its choice
    is accounted like the balancer's (in flight, released)."""
    e = engine(
        service("llm", pods=3),
        policy("llm", "outlierDetection: {consecutive5xxErrors: 1, maxEjectionPercent: 50}"),
    )
    fwd = e.route(LLM, 8000, "POST", "/", Headers())
    assert isinstance(fwd, Forward)
    offered: list[list[str]] = []

    def picker(available):
        offered.append(sorted(a.address for a in available))
        return available[0]

    bad, _ = _try(fwd, 503, picker)
    bad.release()
    fwd2 = e.route(LLM, 8000, "POST", "/", Headers())
    assert isinstance(fwd2, Forward)
    att = fwd2.attempt(picker)
    assert isinstance(att, Attempt)
    assert len(offered[0]) == 3 and len(offered[1]) == 2
    assert bad.endpoint.address not in offered[1]
    assert att.endpoint.active == 1
    att.release()
    assert att.endpoint.active == 0


def test_a_queued_try_is_admitted_again_and_its_new_connection_counted():
    """maxConnections 1, maxPendingRequests 1: the second try queues; when the first
    connection closes, the queued try is admitted again and gets OPEN (counted), and a
    third concurrent try overflows with the 503 the shell sends."""
    e = engine(
        service("llm", pods=1),
        policy("llm", "connectionPool: {maxConnections: 1, maxPendingRequests: 1}"),
    )
    fwds = [e.route(LLM, 8000, "GET", "/", Headers()) for _ in range(3)]
    atts = [f.attempt() for f in fwds]  # type: ignore[union-attr]
    a, b, c = atts
    assert isinstance(a, Attempt) and isinstance(b, Attempt) and isinstance(c, Attempt)
    pool = a.backend.pool
    assert a.admit(reusable=False) is Admission.OPEN
    assert b.admit(reusable=False) is Admission.QUEUE
    assert c.admit(reusable=False) is Admission.OVERFLOW and c.released
    a.finish(200)
    pool.closed()  # the shell's connection for `a` closed
    b.dequeued()
    assert b.admit(reusable=False) is Admission.OPEN
    assert (pool.connections, pool.pending, a.backend.counters.overflow) == (1, 0, 1)


def test_no_endpoint_left_is_an_answer_the_shell_sends_or_falls_back_on():
    """When every endpoint is ejected the engine answers 503 NoHealthyEndpoint instead of
    an attempt (a model route's fallback treats it as connect-failure); with a
    BackendPolicy fallback backend, that backend takes the try instead."""
    e = engine(
        service("llm", pods=1),
        service("spare", pods=1, subnet=2),
        policy(
            "llm",
            "outlierDetection: {consecutive5xxErrors: 1, maxEjectionPercent: 100}\n"
            "  fallback: {backendRef: {name: spare, port: 8000}}",
        ),
    )
    fwd = e.route(LLM, 8000, "GET", "/", Headers())
    assert isinstance(fwd, Forward)
    att, _ = _try(fwd, Failure.CONNECT_FAILURE)
    att.release()
    nxt = e.route(LLM, 8000, "GET", "/", Headers())
    assert isinstance(nxt, Forward)
    alt = nxt.attempt()
    assert isinstance(alt, Attempt) and alt.endpoint.host.startswith("10.244.2.")
    alt.release()
    e2 = engine(
        service("llm", pods=1),
        policy("llm", "outlierDetection: {consecutive5xxErrors: 1, maxEjectionPercent: 100}"),
    )
    f2 = e2.route(LLM, 8000, "GET", "/", Headers())
    assert isinstance(f2, Forward)
    a2, _ = _try(f2, 503)
    a2.release()
    f3 = e2.route(LLM, 8000, "GET", "/", Headers())
    assert isinstance(f3, Forward)
    answer = f3.attempt()
    assert isinstance(answer, Respond) and (answer.status, answer.code) == (
        503,
        "NoHealthyEndpoint",
    )
