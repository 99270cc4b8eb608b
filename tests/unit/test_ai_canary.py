"""Automated canary analysis (Rollout): steps, promotion, rollback with the reason, and the
weights the router uses; every time is an injected `now`."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

from agent.waypoint.ai.canary import CanaryAnalysis
from controller.model.ai import Rollout

STABLE, CANARY = ("ai", "llm-v1", 8000), ("ai", "llm-v2", 8000)


def analysis(**spec: Any) -> CanaryAnalysis:
    base = {
        "targetRef": {"name": "llm"},
        "stable": {"name": "llm-v1", "port": 8000},
        "canary": {"name": "llm-v2", "port": 8000},
        "steps": [{"weight": 10}, {"weight": 50}],
        "interval": "1m",
        "minRequests": 20,
        "thresholds": {
            "minSuccessRate": 99,
            "maxP99Latency": "2s",
            "maxP99TimeToFirstToken": "500ms",
        },
    }
    r = Rollout.model_validate(
        {
            "apiVersion": "weft.dev/v1alpha1",
            "kind": "Rollout",
            "metadata": {"name": "llm", "namespace": "ai"},
            "spec": {**base, **spec},
        }
    )
    return CanaryAnalysis(r, now=0.0, rng=random.Random(1))


def traffic(
    ca: CanaryAnalysis, n: int, *, errors: int = 0, latency: float = 0.5, ttft: float = 0.1
) -> None:
    for i in range(n):
        ca.observe(CANARY, ok=i >= errors, latency=latency, ttft=ttft)
        ca.observe(STABLE, ok=True, latency=0.4, ttft=0.1)


def test_a_healthy_canary_is_promoted_step_by_step():
    ca = analysis()
    assert ca.weights() == {STABLE: 90, CANARY: 10}
    traffic(ca, 50)
    assert ca.tick(59.9) == []  # the interval is not over
    (ev,) = ca.tick(60)
    assert ev.kind == "step_advanced" and ca.weights() == {STABLE: 50, CANARY: 50}
    traffic(ca, 50)
    (ev,) = ca.tick(120)
    assert ev.kind == "promoted" and ca.phase == "Promoted" and ca.canary_weight == 100
    assert ca.next_check() is None and ca.tick(1000) == []
    assert [e.kind for e in ca.events] == ["started", "step_advanced", "promoted"]


def test_a_canary_with_a_bad_error_rate_is_rolled_back_with_the_reason():
    ca = analysis()
    traffic(ca, 100, errors=5)
    (ev,) = ca.tick(60)
    assert ev.kind == "rolled_back" and ca.phase == "RolledBack"
    assert "success rate 95.00% < 99%" in ev.detail
    assert ca.weights() == {STABLE: 100, CANARY: 0}
    assert ca.choose(random.Random(2)) == STABLE


def test_slow_latency_or_first_token_fails_the_check():
    ca = analysis(failureLimit=2)
    traffic(ca, 30, latency=3.0, ttft=0.9)
    (ev,) = ca.tick(60)
    assert ev.kind == "check_failed" and ca.phase == "Progressing"
    assert "p99 latency 3000 ms > 2000 ms" in ev.detail and "p99 TTFT 900 ms > 500 ms" in ev.detail
    traffic(ca, 30, latency=3.0)
    assert ca.tick(120)[0].kind == "rolled_back"


def test_a_step_without_enough_canary_requests_waits_instead_of_judging():
    ca = analysis()
    traffic(ca, 5)
    (ev,) = ca.tick(60)
    assert ev.kind == "waiting" and "5 canary requests, 20 needed" in ev.detail
    traffic(ca, 15)  # the window keeps what it had
    assert ca.tick(120)[0].kind == "step_advanced"


def test_the_split_follows_the_weights_and_leaves_other_backends_alone():
    ca = analysis()
    rng = random.Random(5)
    got = Counter(ca.split(STABLE, rng) for _ in range(5000))
    assert 0.085 < got[CANARY] / 5000 < 0.115
    assert ca.split(("ai", "other", 1), rng) == ("ai", "other", 1)


def test_status_reports_the_phase_step_and_window():
    ca = analysis()
    traffic(ca, 3, errors=1)
    s = ca.status()
    assert s["phase"] == "Progressing" and s["canaryWeight"] == 10
    assert s["window"]["canary"]["requests"] == 3 and s["window"]["canary"]["errors"] == 1
