"""AI traffic policy end to end on the lab: token budgets, priority shedding, model routing,
fallback, canary analysis, response caching and GenAI metrics, with real OpenAI-style
clients and model servers behind two waypoint replicas. Needs root.

Topology: callers apps/client (node-1) and apps/batch (node-2) call Service ai/llm (no
pods of its own: a ModelRoute sends each model to its backend Services), served by two
replicas of the ai-waypoint, one per node (each caller's agent hands its connections to
the replica on its node), that count token quotas in one real redis-server (pod
infra/redis, the lab's spec.quotaStore); a Prometheus scrapes them and the controller judges
Rollouts with analysis.provider: prometheus from it."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from agent.lab import mesh
from agent.netns import call_in
from agent.waypoint.aiflow import SCRAPE_EVERY
from tests.kernel.conftest import Mesh, build_mesh, metric, wait_until

pytestmark = pytest.mark.kernel

AI_LAB = """
apiVersion: weft.dev/v1alpha1
kind: Lab
metadata: {name: __LAB__}
spec:
  nodes: [{name: node-1}, {name: node-2}]
  quotaStore: redis://redis.infra:6379/0
  prometheus: true
  namespaces:
    - {name: apps, labels: {weft.dev/mesh: enabled}}
    - {name: ai, labels: {weft.dev/mesh: enabled}}
    - {name: infra}
  pods:
    - {name: client, namespace: apps, node: node-1, serviceAccount: client, labels: {app: client}}
    - {name: batch, namespace: apps, node: node-2, serviceAccount: batch, labels: {app: batch}}
    - {name: redis, namespace: infra, node: node-1, labels: {app: redis},
       command: [redis-server, --bind, 0.0.0.0, --port, "6379", --save, "", --appendonly, "no",
                 --protected-mode, "no"]}
    - {name: wp-a, namespace: ai, node: node-1, serviceAccount: waypoint,
       labels: {weft.dev/waypoint: ai-waypoint, weft.dev/mesh: disabled}}
    - {name: wp-b, namespace: ai, node: node-2, serviceAccount: waypoint,
       labels: {weft.dev/waypoint: ai-waypoint, weft.dev/mesh: disabled}}
    - {name: small-a, namespace: ai, node: node-2, serviceAccount: model, labels: {app: small}}
    - {name: big-a, namespace: ai, node: node-2, serviceAccount: model, labels: {app: big}}
    - {name: big-c, namespace: ai, node: node-1, serviceAccount: model, labels: {app: big-canary}}
    - {name: embed-a, namespace: ai, node: node-2, serviceAccount: model, labels: {app: embed}}
  services:
    - {name: redis, namespace: infra, selector: {app: redis}, ports: [{port: 6379}]}
    - {name: llm, namespace: ai, selector: {app: llm-front},
       labels: {weft.dev/use-waypoint: ai-waypoint}, ports: [{port: 8000, appProtocol: http}]}
    - {name: small, namespace: ai, selector: {app: small}, ports: [{port: 8000}]}
    - {name: big, namespace: ai, selector: {app: big}, ports: [{port: 8000}]}
    - {name: big-canary, namespace: ai, selector: {app: big-canary}, ports: [{port: 8000}]}
    - {name: embed, namespace: ai, selector: {app: embed}, ports: [{port: 8000}]}
"""

MODELS = {
    "ai/small-a": "small-model",
    "ai/big-a": "big-model",
    "ai/big-c": "big-model",
    "ai/embed-a": "embed-model",
}

ROUTE = """\
apiVersion: weft.dev/v1alpha1
kind: ModelRoute
metadata: {name: models, namespace: ai}
spec:
  targetRefs: [{name: llm}]
  rules:
    - {name: small, models: [small-model], backendRefs: [{name: small, port: 8000}]}
    - name: big
      models: [big-model]
      backendRefs: [{name: big, port: 8000}]
      fallback: [{model: small-model}]
    - {name: embed, models: [embed-model], backendRefs: [{name: embed, port: 8000}]}
  fallbackOn: [5xx, connect-failure]
"""


@pytest.fixture(scope="module")
def ai(request: pytest.FixtureRequest) -> Iterator[Mesh]:
    for m in build_mesh(request, AI_LAB):
        for pod, model in MODELS.items():
            m.lab.start_process(
                m.state,
                f"model-{pod.split('/')[1]}",
                [
                    sys.executable,
                    "-m",
                    "agent.lab.workloads.model_server",
                    "--port",
                    "8000",
                    "--model",
                    model,
                    "--name",
                    pod,
                    "--ttft",
                    "0.005",
                    "--tpot",
                    "0.002",
                    "--max-concurrency",
                    "0",
                ],
                pod=pod,
            )
            m.wait_listening(pod)
        m.apply("route.yaml", ROUTE)
        yield m


def client(m: Mesh, pod: str, *args: str, n: int = 1) -> list[dict[str, Any]]:
    return m.llm_client(pod, *args, n=n)


def control(m: Mesh, pod: str, body: dict[str, Any]) -> None:
    import urllib.request

    p = m.state.pod(pod)

    def post() -> int:
        req = urllib.request.Request(
            f"http://{p.ip}:8000/control",
            json.dumps(body).encode(),
            {"content-type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status  # type: ignore[no-any-return]

    assert call_in(p.netns, post) == 200


def served_count(m: Mesh, pod: str) -> float:
    import urllib.request

    p = m.state.pod(pod)

    def get() -> str:
        with urllib.request.urlopen(f"http://{p.ip}:8000/metrics", timeout=5) as r:
            return r.read().decode()  # type: ignore[no-any-return]

    return metric(call_in(p.netns, get), "model_server_requests_total")


def replica_metrics(m: Mesh) -> list[str]:
    import urllib.request

    out = []
    for pod in ("ai/wp-a", "ai/wp-b"):
        p = m.state.pod(pod)

        def get(ip: str = p.ip) -> str:
            with urllib.request.urlopen(f"http://{ip}:15020/metrics", timeout=5) as r:
                return r.read().decode()  # type: ignore[no-any-return]

        out.append(call_in(p.netns, get))
    return out


class Summed:
    """Metrics of both replicas, added up."""

    def __init__(self, texts: list[str]) -> None:
        self.texts = texts

    def value(self, name: str, **labels: str) -> float:
        return sum(metric(t, name, **labels) for t in self.texts)


def waypoint_metrics(m: Mesh) -> Summed:
    return Summed(replica_metrics(m))


@pytest.fixture
def clean(ai: Mesh) -> Iterator[Mesh]:
    yield ai
    for f in ("limit.yaml", "shed.yaml", "cache.yaml", "rollout.yaml"):
        ai.remove(f)
    ai.apply("route.yaml", ROUTE)
    for pod in MODELS:
        control(ai, pod, {"reset": True})


def test_requests_for_a_model_reach_only_its_backends(clean: Mesh) -> None:
    before = {p: served_count(clean, p) for p in MODELS}
    rs = client(clean, "apps/client", "--model", "small-model", n=10)
    assert all(r["status"] == 200 and r["served_by"] == "ai/small-a" for r in rs), rs
    assert rs[0]["headers"]["x-weft-model-served"] == "small-model"
    after = {p: served_count(clean, p) for p in MODELS}
    assert after["ai/small-a"] - before["ai/small-a"] == 10
    assert all(after[p] == before[p] for p in MODELS if p != "ai/small-a")
    (missing,) = client(clean, "apps/client", "--model", "no-such-model")
    assert missing["status"] == 404


def test_a_failing_model_falls_back_and_says_which_model_served(clean: Mesh) -> None:
    control(clean, "ai/big-a", {"error_rate": 1.0, "error_status": 500})
    rs = client(clean, "apps/client", "--model", "big-model", n=5)
    assert all(r["status"] == 200 and r["served_by"] == "ai/small-a" for r in rs), rs
    assert rs[0]["headers"]["x-weft-model-served"] == "small-model"
    assert rs[0]["headers"]["x-weft-fallback"] == "1"


LIMIT = """\
apiVersion: weft.dev/v1alpha1
kind: TokenRateLimit
metadata: {name: per-caller, namespace: ai}
spec:
  targetRefs: [{name: llm}]
  limits:
    - {name: tpm, by: principal, tokensPerMinute: 200}
"""


def test_a_caller_over_its_token_budget_gets_429_while_another_succeeds(clean: Mesh) -> None:
    clean.apply("limit.yaml", LIMIT)
    # Each request: about 5 prompt + 16 completion tokens; 200 per minute allows ~9.
    rs = client(clean, "apps/client", "--model", "small-model", n=20)
    codes = [r["status"] for r in rs]
    assert 200 in codes and 429 in codes, codes
    denied = next(r for r in rs if r["status"] == 429)
    assert int(denied["headers"]["retry-after"]) >= 1
    assert denied["headers"]["x-ratelimit-remaining-tokens"] is not None
    other = client(clean, "apps/batch", "--model", "small-model", n=3)
    assert [r["status"] for r in other] == [200, 200, 200]


def test_one_budget_holds_across_replicas_on_two_nodes(clean: Mesh) -> None:
    """Issue 15's measurement: callers on two nodes, served by the replica on each node,
    one limit for their namespace. Counted on one Redis, they get the limit between them,
    not the limit each."""
    # Counters are per limit name and outlive policy edits: a fresh name, fresh counters.
    clean.apply(
        "limit.yaml",
        LIMIT.replace(
            "by: principal, tokensPerMinute: 200", "by: namespace, requestsPerMinute: 12"
        ).replace("name: tpm", "name: rpm-replicas"),
    )
    served = "istio_requests_total"
    before = [metric(t, served, response_code="200") for t in replica_metrics(clean)]
    rs = client(clean, "apps/client", "--model", "small-model", n=6)
    rs += client(clean, "apps/batch", "--model", "small-model", n=12)
    rs += client(clean, "apps/client", "--model", "small-model", n=6)
    codes = [r["status"] for r in rs]
    # Per-node counters would admit 12 on each node; one store admits 12 in all.
    assert codes == [200] * 6 + [200] * 6 + [429] * 6 + [429] * 6, codes
    after = [metric(t, served, response_code="200") for t in replica_metrics(clean)]
    assert all(a > b for a, b in zip(after, before, strict=True)), (before, after)
    # Both replicas counted on the shared store.
    for t in replica_metrics(clean):
        ops = metric(t, "weft_ai_quota_store_duration_seconds_count", store="redis", op="admit")
        assert ops > 0


def test_a_quota_store_outage_degrades_to_per_replica_limits(clean: Mesh) -> None:
    """redis-server killed: failOpen admits on each replica's own counters, so the limit
    still holds per replica (not not at all); restarted, the replicas count on it again."""
    clean.apply(
        "limit.yaml",
        LIMIT.replace(
            "by: principal, tokensPerMinute: 200", "by: namespace, requestsPerMinute: 4"
        ).replace("name: tpm", "name: rpm-outage"),
    )
    redis = next(p for p in clean.state.processes if p.name == "pod-infra-redis")
    clean.lab.stop_process(clean.state, "pod-infra-redis")
    try:
        rs = client(clean, "apps/client", "--model", "small-model", n=8)
        assert [r["status"] for r in rs] == [200] * 4 + [429] * 4, [r["status"] for r in rs]
        t = replica_metrics(clean)[0]
        assert metric(t, "weft_ai_ratelimit_decisions_total", decision="local_admit") >= 8
    finally:
        clean.lab.start_process(clean.state, "pod-infra-redis", redis.argv, pod="infra/redis")
        clean.wait_listening("infra/redis", 6379)

    def counted_on_redis_again(pod: str, replica: int) -> bool:
        def now() -> tuple[float, float]:
            t = replica_metrics(clean)[replica]
            return (
                metric(t, "weft_ai_quota_store_duration_seconds_count", store="redis", op="admit"),
                metric(t, "weft_ai_quota_store_errors_total", store="redis", op="admit"),
            )

        ops, errors = now()
        client(clean, pod, "--model", "small-model")
        ops2, errors2 = now()
        return ops2 > ops and errors2 == errors

    for pod, replica in (("apps/client", 0), ("apps/batch", 1)):
        wait_until(
            lambda pod=pod, replica=replica: counted_on_redis_again(pod, replica),
            f"the replica serving {pod} to use the restarted store",
            15,
        )


def test_a_stream_over_budget_finishes_and_is_charged(clean: Mesh) -> None:
    clean.apply(
        "limit.yaml",
        LIMIT.replace("tokensPerMinute: 200", "tokensPerMinute: 12").replace(
            "name: tpm", "name: tpm-stream"
        ),
    )
    (first,) = client(clean, "apps/client", "--model", "small-model", "--stream", "--include-usage")
    # Admitted on its prompt estimate (a few tokens), it generated past the limit of 12 and
    # was not cut: every token arrived and the stream ended with [DONE].
    assert first["status"] == 200 and first["done"]
    assert first["usage"]["completion_tokens"] == 16 and first["usage"]["total_tokens"] > 12
    (second,) = client(clean, "apps/client", "--model", "small-model")
    assert second["status"] == 429  # the overshoot was charged


SHED = """\
apiVersion: weft.dev/v1alpha1
kind: LoadShedding
metadata: {name: priority, namespace: ai}
spec:
  targetRefs: [{name: llm}]
  saturation: {kvCacheUtilization: 0.9, metricsMaxAge: 30s}
  priorityClasses:
    - {name: interactive, value: 100, whenSaturated: Admit}
    - {name: batch, value: 0, whenSaturated: Shed, shedStatus: 503}
  defaultPriorityClass: interactive
  priorities:
    - match: {namespaces: [apps], principals: ["*/sa/batch"]}
      priorityClass: batch
"""


def test_low_priority_is_shed_under_saturation_while_high_priority_flows(clean: Mesh) -> None:
    clean.apply("shed.yaml", SHED)
    control(clean, "ai/small-a", {"kv_cache_usage": 0.97})
    # The waypoints scrape model servers every 2 s; wait until batch is being shed.
    wait_until(
        lambda: client(clean, "apps/batch", "--model", "small-model")[0]["status"] == 503,
        "saturation to be seen",
        15,
    )
    # That was one replica; the other scrapes on its own 2 s clock. One more period, and
    # both have seen the server's new load (the 20 below ride one connection to either).
    time.sleep(SCRAPE_EVERY + 0.5)
    low = client(clean, "apps/batch", "--model", "small-model", n=20)
    high = client(clean, "apps/client", "--model", "small-model", n=100)
    assert sum(r["status"] == 503 for r in low) == 20
    assert low[0]["headers"]["x-weft-shed"] == "batch"
    errors = sum(r["status"] != 200 for r in high)
    assert errors / len(high) < 0.01, [r["status"] for r in high]


CACHE = """\
apiVersion: weft.dev/v1alpha1
kind: ResponseCache
metadata: {name: embeddings, namespace: ai}
spec:
  targetRefs: [{name: llm}]
  ttl: 10m
  tenantBy: principal
"""


def test_repeated_embeddings_come_from_the_cache_but_not_for_another_tenant(clean: Mesh) -> None:
    clean.apply("cache.yaml", CACHE)
    before = served_count(clean, "ai/embed-a")
    args = ("--api", "embeddings", "--model", "embed-model", "--prompt", "cache me please")
    # The same replica answers both (one kept-alive connection), so its cache is warm.
    rs = client(clean, "apps/client", *args, n=3)
    assert [r["status"] for r in rs] == [200, 200, 200]
    assert [r["headers"].get("x-weft-cache") for r in rs][1:] == ["hit", "hit"]
    assert served_count(clean, "ai/embed-a") - before == 1
    (other,) = client(clean, "apps/batch", *args)
    assert other["status"] == 200 and other["headers"].get("x-weft-cache") is None
    assert served_count(clean, "ai/embed-a") - before == 2


ROLLOUT = """\
apiVersion: weft.dev/v1alpha1
kind: Rollout
metadata: {name: big-canary, namespace: ai}
spec:
  targetRef: {name: llm}
  stable: {name: big, port: 8000}
  canary: {name: big-canary, port: 8000}
  steps: [{weight: 50}, {weight: 100}]
  interval: 1s
  minRequests: 5
  failureLimit: 1
  thresholds: {minSuccessRate: 90}
"""


def _rollout(m: Mesh) -> list[dict[str, Any]]:
    import urllib.request

    out = []
    for pod in ("ai/wp-a", "ai/wp-b"):
        p = m.state.pod(pod)

        def get(ip: str = p.ip) -> list[dict[str, Any]]:
            with urllib.request.urlopen(f"http://{ip}:15020/rollouts", timeout=5) as r:
                return json.loads(r.read())  # type: ignore[no-any-return]

        out += call_in(p.netns, get)
    return out


def _drive_until(m: Mesh, phase: str) -> list[dict[str, Any]]:
    def reached() -> bool:
        # Each replica analyses the traffic it carries and decides on its own; each caller
        # is served by the replica on its node.
        client(m, "apps/client", "--model", "big-model", n=10)
        client(m, "apps/batch", "--model", "big-model", n=10)
        return all(r["phase"] == phase for r in _rollout(m))

    wait_until(reached, f"rollout {phase}", 60)
    return _rollout(m)


def test_a_bad_canary_is_rolled_back_and_a_good_one_promoted(clean: Mesh) -> None:
    # Fallback would hide the canary's errors from callers; analyse without it.
    clean.apply("route.yaml", ROUTE.replace("      fallback: [{model: small-model}]\n", ""))
    control(clean, "ai/big-c", {"error_rate": 1.0, "error_status": 500})
    clean.apply("rollout.yaml", ROLLOUT)
    states = _drive_until(clean, "RolledBack")
    bad = next(r for r in states if r["phase"] == "RolledBack")
    assert bad["canaryWeight"] == 0 and any("rolled_back" in e for e in bad["events"])
    control(clean, "ai/big-c", {"reset": True})
    clean.remove("rollout.yaml")
    clean.apply(
        "rollout.yaml",
        ROLLOUT.replace("name: big-canary, namespace", "name: big-canary-2, namespace"),
    )
    states = _drive_until(clean, "Promoted")
    good = next(r for r in states if r["phase"] == "Promoted")
    assert good["canaryWeight"] == 100 and any("promoted" in e for e in good["events"])
    after = client(clean, "apps/client", "--model", "big-model", n=6)
    assert {r["served_by"] for r in after} == {"ai/big-c"}  # all traffic on the canary now


JUDGED = (
    ROLLOUT.replace("name: big-canary, namespace", "name: big-canary-judged, namespace").replace(
        "interval: 1s", "interval: 3s"
    )
    + "  analysis: {provider: prometheus}\n"
)


def test_the_controller_judges_a_canary_from_prometheus_and_both_replicas_apply_it(
    clean: Mesh,
) -> None:
    """analysis.provider: prometheus: the controller measures the canary from the
    waypoints' metrics in a real Prometheus (both replicas' traffic together), decides, and
    both replicas apply the same decision: a failing canary is rolled back everywhere, a
    good one promoted everywhere."""
    clean.apply("route.yaml", ROUTE.replace("      fallback: [{model: small-model}]\n", ""))
    control(clean, "ai/big-c", {"error_rate": 1.0, "error_status": 500})
    clean.apply("rollout.yaml", JUDGED)

    def judged(phase: str) -> bool:
        client(clean, "apps/client", "--model", "big-model", n=10)
        client(clean, "apps/batch", "--model", "big-model", n=10)
        states = _rollout(clean)
        return len(states) == 2 and all(r["phase"] == phase for r in states)

    wait_until(lambda: judged("RolledBack"), "the controller to roll the canary back", 60)
    a, b = _rollout(clean)
    assert a["judgedBy"] == b["judgedBy"] == "controller", (a, b)
    assert a["canaryWeight"] == b["canaryWeight"] == 0
    assert any("success rate" in e for e in a["events"]), a["events"]
    # The operator's view: `weft rollout status` reads what the controller published.
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "agent.cli",
            "rollout",
            "status",
            "big-canary-judged",
            "-n",
            "ai",
            "-o",
            "json",
            "--controller-socket",
            str(mesh.paths(clean.state)["admin"]),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    st = json.loads(out.stdout)
    assert st["phase"] == "RolledBack" and st["judgedBy"] == "controller", st
    assert st["lastAnalysis"]["canary"]["errors"] > 0, st
    control(clean, "ai/big-c", {"reset": True})
    clean.apply("rollout.yaml", JUDGED.replace("steps: [{weight: 50}", "steps: [{weight: 40}"))
    wait_until(lambda: judged("Promoted"), "the controller to promote the canary", 60)
    after = client(clean, "apps/client", "--model", "big-model", n=6)
    after += client(clean, "apps/batch", "--model", "big-model", n=6)
    assert {r["served_by"] for r in after} == {"ai/big-c"}  # every replica moved


def test_genai_metrics_have_the_right_values(clean: Mesh) -> None:
    before = waypoint_metrics(clean)
    rs = client(clean, "apps/client", "--model", "small-model", "--max-tokens", "7", n=4)
    assert all(r["usage"]["completion_tokens"] == 7 for r in rs)
    prompt = sum(r["usage"]["prompt_tokens"] for r in rs)
    after = waypoint_metrics(clean)

    def delta(name: str, **labels: str) -> float:
        return after.value(name, **labels) - before.value(name, **labels)

    labels = {
        "gen_ai_operation_name": "chat",
        "gen_ai_request_model": "small-model",
        "gen_ai_response_model": "small-model",
    }
    assert delta("gen_ai_client_token_usage_sum", gen_ai_token_type="output", **labels) == 28
    assert delta("gen_ai_client_token_usage_sum", gen_ai_token_type="input", **labels) == prompt
    assert delta("gen_ai_client_token_usage_count", gen_ai_token_type="output", **labels) == 4
    assert delta("gen_ai_server_request_duration_count", **labels) == 4
