"""Retries: what is retriable under which policy, the backoff schedule, and the budget."""

from __future__ import annotations

import random

import pytest

from agent.waypoint.codec.headers import Headers
from agent.waypoint.engine import Attempt, Engine, Failure, Forward
from agent.waypoint.engine.retry import DEFAULT_RETRY, compile_retry
from controller.model.routing import Retry
from controller.model.traffic import RetryPolicySpec
from tests.enginetesting import FakeClock, backend_policy, http_route, service, snapshot

LLM = ("ai", "llm")


def policy(**spec: object) -> RetryPolicySpec:
    return RetryPolicySpec.model_validate(spec)


@pytest.mark.parametrize(
    ("retry_on", "retried", "not_retried"),
    [
        (["5xx"], [500, 503, Failure.RESET, Failure.CONNECT_FAILURE], [429, 404, 200]),
        (["gateway-error"], [502, 503, 504, Failure.TIMEOUT], [500, 501]),
        (["reset"], [Failure.RESET, Failure.TIMEOUT], [503, Failure.REFUSED_STREAM]),
        (["connect-failure"], [Failure.CONNECT_FAILURE], [Failure.RESET, 503]),
        (["refused-stream"], [Failure.REFUSED_STREAM], [Failure.RESET, 500]),
        (["retriable-status-codes"], [503], [500, 502]),
    ],
)
def test_each_condition_covers_its_outcomes(retry_on, retried, not_retried):
    """retryOn conditions classify outcomes as Envoy's do (503 is the default code list)."""
    rule = compile_retry(None, policy(retryOn=retry_on))
    assert all(int(o) in rule.retriable for o in retried)
    assert not any(int(o) in rule.retriable for o in not_retried)


def test_defaults_and_merging_gateway_retry_with_a_retry_policy():
    """No config: retry only what never reached the app. Gateway API `retry` retries its
    codes and connection errors; a RetryPolicy's explicit fields override it."""
    assert 503 not in DEFAULT_RETRY.retriable and Failure.CONNECT_FAILURE in DEFAULT_RETRY.retriable
    gw = Retry(codes=[502], attempts=4, backoff=0.1)
    merged = compile_retry(gw, policy(perTryTimeout="2s", attempts=1), backend_request_timeout=9)
    assert (merged.attempts, merged.base_interval, merged.per_try_timeout) == (1, 0.1, 2.0)
    assert 502 in merged.retriable and Failure.RESET in merged.retriable
    assert 503 not in merged.retriable
    assert compile_retry(Retry(attempts=0), None).attempts == 0


def test_backoff_is_fully_jittered_exponential_and_capped():
    """Retry n waits in [0, base x (2^n - 1)], never above maxInterval."""
    rule = compile_retry(None, policy(backoff={"baseInterval": "10ms", "maxInterval": "50ms"}))
    rng = random.Random(9)
    for n, upper in ((1, 0.010), (2, 0.030), (3, 0.050), (8, 0.050)):
        waits = [rule.backoff(n, rng) for _ in range(500)]
        assert min(waits) >= 0 and max(waits) <= upper + 1e-12
        assert max(waits) > upper * 0.9  # the range is used, not a fixed delay


ROUTE = http_route("""\
    - retry: {codes: [503], attempts: 2, backoff: 10ms}
      backendRefs: [{name: llm, port: 8000}]""")


def test_a_503_twice_then_200_succeeds_via_retry():
    """Two 503s are retried (with backoff); the third try's 200 is the answer; a third
    retry would exceed `attempts: 2`."""
    e = Engine(snapshot(service("llm"), ROUTE), clock=FakeClock(), rng=random.Random(1))
    fwd = e.route(LLM, 8000, "POST", "/v1/chat/completions", Headers())
    assert isinstance(fwd, Forward)
    outcomes, waits = [503, 503, 200], []
    for outcome in outcomes:
        att = fwd.attempt()
        assert isinstance(att, Attempt)
        att.finish(outcome)
        wait = fwd.retry_after(outcome)
        if wait is None:
            break
        waits.append(wait)
    assert fwd.tries == 3 and len(waits) == 2 and fwd.backend.counters.retries == 2
    assert fwd.retry_after(503) is None and fwd.backend.counters.retries_exhausted == 1


def test_retry_budget_caps_retries_under_a_failing_backend():
    """100 concurrent requests all failing with 503: retries in flight stop at 20% (the
    budget), the rest are refused and counted; the minimum of 3 holds at low load."""
    e = Engine(snapshot(service("llm"), ROUTE), clock=FakeClock(), rng=random.Random(1))
    fwds = [e.route(LLM, 8000, "POST", "/", Headers()) for _ in range(100)]
    first = [f.attempt() for f in fwds]  # type: ignore[union-attr]
    retries = []
    for f, att in zip(fwds, first, strict=True):
        assert isinstance(f, Forward) and isinstance(att, Attempt)
        att.observe(503)  # the head arrived; the stream is still draining
        if f.retry_after(503) is not None:
            retries.append(f.attempt())
    b = fwds[0].backend  # type: ignore[union-attr]
    # 25 retries are 20% of the 125 tries then in flight.
    assert len(retries) == 25 and b.budget.active_retries == 25
    assert b.counters.retry_budget_exhausted == 75
    lone = e.route(LLM, 8000, "POST", "/", Headers())
    assert isinstance(lone, Forward)
    for a in [*first, *retries]:
        a.release()  # type: ignore[union-attr]
    lone.attempt()
    assert lone.retry_after(503) is not None  # min 3 concurrent retries at any load


def test_no_retry_past_the_request_deadline():
    """A retry whose backoff would end after timeouts.request is not taken."""
    clock = FakeClock()
    doc = ROUTE.replace("backoff: 10ms}", "backoff: 1s}\n      timeouts: {request: 2s}")
    e = Engine(snapshot(service("llm"), doc), clock=clock, rng=random.Random(1))
    fwd = e.route(LLM, 8000, "POST", "/", Headers())
    assert isinstance(fwd, Forward)
    fwd.attempt()
    clock.advance(1.99)
    assert fwd.retry_after(503) is None


def test_failure_after_the_last_try_is_503_or_504():
    """A connect failure with no retry left becomes 503; a per-try timeout 504."""
    e = Engine(snapshot(service("llm")), clock=FakeClock())
    fwd = e.route(LLM, 8000, "GET", "/", Headers())
    assert isinstance(fwd, Forward)
    assert fwd.failure_response(Failure.CONNECT_FAILURE).status == 503
    assert fwd.failure_response(Failure.TIMEOUT).status == 504


BUDGET_1 = backend_policy("llm", "retryBudget: {budgetPercent: 20, minRetryConcurrency: 1}")
ROUTE_3 = ROUTE.replace("attempts: 2", "attempts: 3")


def test_one_requests_chain_of_retries_is_not_capped_by_min_retry_concurrency():
    """Issue 19: with one request at a time, minRetryConcurrency 1 and attempts 3, every
    retry of the chain is allowed: the failed try is over before the budget judges the
    next one, so at most one retry is ever in flight and nothing counts as exhausted."""
    e = Engine(snapshot(service("llm"), ROUTE_3, BUDGET_1), clock=FakeClock())
    fwd = e.route(LLM, 8000, "POST", "/", Headers())
    assert isinstance(fwd, Forward)
    for _ in range(3):
        att = fwd.attempt()
        assert isinstance(att, Attempt)
        att.observe(503)
        assert fwd.retry_after(503, att) is not None
        assert att.released  # released by the decision to retry
    last = fwd.attempt()
    assert isinstance(last, Attempt)
    last.observe(503)
    assert fwd.retry_after(503, last) is None and not last.released  # it is the answer
    b = fwd.backend
    assert (b.counters.retries, b.counters.retry_budget_exhausted) == (3, 0)
    assert b.counters.retries_exhausted == 1 and b.budget.active_retries == 1
    last.release()
    assert (b.active, b.budget.active_retries) == (0, 0)


def test_the_budget_still_caps_retries_when_every_request_fails():
    """Issue 19's other half: 100 concurrent requests whose first tries all fail, each
    handing its failed try to `retry_after`. Tries in flight stay at 100, so retries stop
    at 20% of them (20) and the other 80 are refused and counted."""
    e = Engine(snapshot(service("llm"), ROUTE_3, BUDGET_1), clock=FakeClock())
    fwds = [e.route(LLM, 8000, "POST", "/", Headers()) for _ in range(100)]
    first = [f.attempt() for f in fwds]  # type: ignore[union-attr]
    retries = []
    for f, att in zip(fwds, first, strict=True):
        assert isinstance(f, Forward) and isinstance(att, Attempt)
        att.observe(503)
        if f.retry_after(503, att) is not None:
            retries.append(f.attempt())
    b = fwds[0].backend  # type: ignore[union-attr]
    assert len(retries) == 20 and b.budget.active_retries == 20 and b.active == 100
    assert b.counters.retry_budget_exhausted == 80
