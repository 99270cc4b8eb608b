"""Retries: which outcomes a rule retries, how long to wait, and the budget that caps them.

A rule's policy comes from Gateway API's `retry` field and/or a `RetryPolicy` named by an
ExtensionRef filter; fields the RetryPolicy sets win, the rest come from `retry`, the rest
from weft's defaults (`DEFAULT_RETRY`). The budget is per backend and counts retries in
flight against requests in flight (Envoy's retry budget), so a failing backend sees at most
budgetPercent more load from retries, never attempts x the load.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from agent.waypoint.engine.outcome import FAILURES, Failure
from controller.model.routing import Retry
from controller.model.traffic import RetryPolicySpec

_5XX = frozenset(range(500, 600))

# The outcomes each retryOn condition covers (Envoy's definitions). "5xx" and
# "gateway-error" include the tries that got no response at all, as Envoy's do.
CONDITIONS: dict[str, frozenset[int]] = {
    "5xx": _5XX | FAILURES,
    "gateway-error": frozenset({502, 503, 504}) | FAILURES,
    "reset": frozenset({Failure.RESET, Failure.TIMEOUT, Failure.CONNECT_FAILURE}),
    "connect-failure": frozenset({Failure.CONNECT_FAILURE}),
    "refused-stream": frozenset({Failure.REFUSED_STREAM}),
    "retriable-status-codes": frozenset(),  # the codes themselves are added per policy
}

# With no retry configuration at all, retry only what never reached the application: a
# model request that reached a server may have cost seconds of GPU time, and only its author
# knows whether it is safe to repeat. Two attempts is Istio's default.
DEFAULT_RETRY_ON = ("connect-failure", "refused-stream")
DEFAULT_ATTEMPTS = 2
DEFAULT_BASE = 0.025  # Envoy: 25 ms base interval, cap 10 x base


@dataclass(frozen=True, slots=True)
class RetryRule:
    """A compiled retry policy. `attempts` is the number of retries after the first try."""

    attempts: int
    retriable: frozenset[int]
    base_interval: float
    max_interval: float
    per_try_timeout: float | None = None

    def backoff(self, retry: int, rng: random.Random) -> float:
        """Seconds to wait before retry number `retry` (1, 2, ...): fully jittered
        exponential, uniform in [0, base x (2^retry - 1)], capped at max_interval (Envoy)."""
        upper = self.base_interval * ((1 << min(retry, 30)) - 1)
        upper = min(upper, self.max_interval)
        return rng.random() * upper


def _outcomes(retry_on: list[str] | tuple[str, ...], codes: list[int]) -> frozenset[int]:
    out: set[int] = set()
    for cond in retry_on:
        out |= CONDITIONS[cond]
    if "retriable-status-codes" in retry_on:
        out |= set(codes)
    return frozenset(out)


DEFAULT_RETRY = RetryRule(
    DEFAULT_ATTEMPTS, _outcomes(DEFAULT_RETRY_ON, []), DEFAULT_BASE, 10 * DEFAULT_BASE
)
NO_RETRY = RetryRule(0, frozenset(), DEFAULT_BASE, DEFAULT_BASE)


def compile_retry(
    gateway: Retry | None,
    policy: RetryPolicySpec | None,
    backend_request_timeout: float | None = None,
) -> RetryRule:
    """Merge a rule's Gateway API `retry` with its RetryPolicy (whose set fields win).

    Gateway API's `retry` (GEP-1731) means: retry its `codes` (503 when unset) and the
    connection errors the GEP says implementations should retry (connect failure, refused
    stream, reset), `attempts` times (2 when unset), waiting at least `backoff`.
    """
    per_try = backend_request_timeout or None  # 0 disables (GEP-1742)
    if gateway is None and policy is None:
        if per_try is None:
            return DEFAULT_RETRY
        return RetryRule(
            DEFAULT_RETRY.attempts,
            DEFAULT_RETRY.retriable,
            DEFAULT_BASE,
            10 * DEFAULT_BASE,
            per_try,
        )
    attempts = DEFAULT_ATTEMPTS
    retry_on: list[str] = list(DEFAULT_RETRY_ON)
    codes: list[int] = []
    base = DEFAULT_BASE
    cap: float | None = None
    if gateway is not None:
        attempts = gateway.attempts if gateway.attempts is not None else DEFAULT_ATTEMPTS
        retry_on = ["connect-failure", "refused-stream", "reset", "retriable-status-codes"]
        codes = list(gateway.codes) if gateway.codes else [503]
        if gateway.backoff:
            base = gateway.backoff
    if policy is not None:
        explicit = policy.model_fields_set
        if "attempts" in explicit or gateway is None:
            attempts = policy.attempts
        if "retry_on" in explicit or gateway is None:
            retry_on = list(policy.retry_on)
            codes = policy.status_codes()
        elif "retriable_status_codes" in explicit:
            codes = policy.status_codes()
        if "backoff" in explicit or gateway is None:
            base = policy.backoff.base_interval
            cap = policy.backoff.cap
        if policy.per_try_timeout is not None:
            per_try = policy.per_try_timeout
    if attempts == 0:
        return NO_RETRY if per_try is None else RetryRule(0, frozenset(), base, base, per_try)
    return RetryRule(
        attempts, _outcomes(retry_on, codes), base, cap if cap is not None else 10 * base, per_try
    )


class RetryBudget:
    """Retries in flight <= max(min_concurrency, percent% of requests in flight)."""

    __slots__ = ("active_retries", "min_concurrency", "ratio")

    def __init__(self, percent: float = 20.0, min_concurrency: int = 3) -> None:
        self.ratio = percent / 100.0
        self.min_concurrency = min_concurrency
        self.active_retries = 0

    def allows(self, active_requests: int, active_retries: int | None = None) -> bool:
        """Whether one more retry may start, with `active_requests` tries in flight of which
        `active_retries` are retries (default: the counted ones)."""
        retries = self.active_retries if active_retries is None else active_retries
        limit = self.ratio * active_requests
        limit = max(limit, self.min_concurrency)
        return retries < limit
