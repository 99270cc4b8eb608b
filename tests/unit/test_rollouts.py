"""Canary analysis in the controller (controller/rollouts.py): the controller judges a
Rollout with analysis.provider prometheus from PromQL answers, asks its webhooks, and
publishes a RolloutState that every waypoint follows. Prometheus' answers here come from a
table keyed by the queries (the real server is in tests/kernel/test_ai.py); the clock is
injected."""

from __future__ import annotations

import asyncio
import json
import random
import textwrap
from typing import Any

import pytest

from agent.waypoint.ai.policy import AiPolicies
from agent.waypoint.ai.priority import LoadBoard as Board
from controller.model.base import ResourceKey
from controller.model.loader import parse_text
from controller.rollouts import (
    NO_PROMETHEUS,
    Prometheus,
    QueryError,
    RolloutController,
    post_webhook,
    render_query,
    selector,
    window_queries,
)
from controller.store import ConfigStore, Offer

CLUSTER = """\
apiVersion: v1
kind: Service
metadata: {name: llm, namespace: ai}
spec: {selector: {app: llm}, clusterIP: 10.96.0.10, ports: [{port: 8000}]}
---
apiVersion: v1
kind: Service
metadata: {name: llm-v1, namespace: ai}
spec: {selector: {app: llm-v1}, clusterIP: 10.96.0.11, ports: [{port: 8000}]}
---
apiVersion: v1
kind: Service
metadata: {name: llm-v2, namespace: ai}
spec: {selector: {app: llm-v2}, clusterIP: 10.96.0.12, ports: [{port: 8000}]}
---
apiVersion: weft.dev/v1alpha1
kind: Workload
metadata: {name: v2-a, namespace: ai, labels: {app: llm-v2}}
spec: {node: node-1, addresses: [10.244.1.5]}
---
apiVersion: weft.dev/v1alpha1
kind: Workload
metadata: {name: v1-a, namespace: ai, labels: {app: llm-v1}}
spec: {node: node-1, addresses: [10.244.1.6]}
"""

ROLLOUT = """\
apiVersion: weft.dev/v1alpha1
kind: Rollout
metadata: {name: llm, namespace: ai}
spec:
  targetRef: {name: llm}
  stable: {name: llm-v1, port: 8000}
  canary: {name: llm-v2, port: 8000}
  steps: [{weight: 10}, {weight: 50}]
  interval: 1m
  minRequests: 20
  thresholds: {minSuccessRate: 99, maxP99Latency: 2s}
  analysis: {provider: prometheus}
"""

CANARY = 'destination_workload=~"llm\\\\-v2",destination_workload_namespace="ai"'


class Answers(Prometheus):
    """Prometheus' answers by query; a query not in the table has no data."""

    def __init__(self) -> None:
        super().__init__("http://prometheus.test:9090")
        self.table: dict[str, float | None] = {}
        self.asked: list[str] = []
        self.down = False

    def canary(self, requests: float, errors: float = 0, p99: float = 0.5) -> None:
        q = window_queries(CANARY, "60s")
        self.table.update({q["requests"]: requests, q["errors"]: errors, q["p99"]: p99})

    async def value(self, promql: str) -> float | None:
        self.asked.append(promql)
        if self.down:
            raise QueryError("Prometheus http://prometheus.test:9090: connection refused")
        return self.table.get(promql)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def setup(rollout: str = ROLLOUT, *, prometheus: Answers | None = None, hooks: Any = None):
    store = ConfigStore()
    offer = parse_text(CLUSTER + "---\n" + textwrap.dedent(rollout), "cluster.yaml")
    assert not offer.problems, offer.problems
    store.offer("files", offer)
    clock = Clock()
    calls: list[tuple[str, dict[str, Any]]] = []

    def post(hook: Any, payload: dict[str, Any]) -> int:
        calls.append((hook.name, payload))
        return hooks(hook, payload) if hooks else 200

    rc = RolloutController(store, prometheus, clock=clock, post=post, rng=random.Random(1))
    return store, rc, clock, calls


def state(store: ConfigStore) -> Any:
    e = store.get(ResourceKey("RolloutState", "ai", "llm"))
    assert e is not None
    return e.resource.spec


def tick(rc: RolloutController) -> None:
    asyncio.run(rc.tick())


def test_a_healthy_canary_steps_and_is_promoted_and_every_waypoint_follows():
    prom = Answers()
    store, rc, clock, _ = setup(prometheus=prom)
    tick(rc)
    assert (state(store).phase, state(store).canary_weight) == ("Progressing", 10)
    prom.canary(requests=40, errors=0, p99=0.3)
    clock.t += 60
    tick(rc)
    st = state(store)
    assert (st.step, st.canary_weight) == (1, 50)
    assert st.last_analysis["canary"]["requests"] == 40
    # The queries sum every replica's series for the canary's workloads over the interval.
    assert any("increase(istio_requests_total{" in q and "[60s]" in q for q in prom.asked)
    # Two waypoint replicas build their policies from the same config: both follow.
    resources = [e.resource for e in store.entries()]
    for _ in range(2):
        pols = AiPolicies.build(
            resources, store=None, board=Board(), rng=random.Random(), now=clock.t
        )
        (ca,) = pols.rollouts()
        assert ca.following and ca.canary_weight == 50
        assert ca.tick(clock.t + 1000) == []  # a follower never judges
    clock.t += 60
    tick(rc)
    assert (state(store).phase, state(store).canary_weight) == ("Promoted", 100)


def test_a_failing_canary_is_rolled_back_with_the_reason():
    prom = Answers()
    store, rc, clock, _ = setup(prometheus=prom)
    tick(rc)
    prom.canary(requests=40, errors=10)
    clock.t += 60
    tick(rc)
    st = state(store)
    assert (st.phase, st.canary_weight) == ("RolledBack", 0)
    assert "success rate 75.00% < 99%" in st.events[-1]


def test_a_quiet_canary_waits_and_a_broken_prometheus_never_passes_a_step():
    prom = Answers()
    store, rc, clock, _ = setup(prometheus=prom)
    tick(rc)
    prom.canary(requests=3)
    clock.t += 60
    tick(rc)
    assert state(store).step == 0 and "3 canary requests, 20 needed" in state(store).events[-1]
    prom.down = True
    prom.canary(requests=100)
    clock.t += 60
    tick(rc)
    st = state(store)
    assert st.step == 0 and st.waiting_for.startswith("Prometheus")
    prom.down = False
    clock.t += 60
    tick(rc)
    assert state(store).step == 1 and state(store).waiting_for is None


def test_without_prometheus_the_rollout_says_it_waits_for_one():
    store, rc, clock, _ = setup(prometheus=None)
    tick(rc)
    clock.t += 600
    tick(rc)
    st = state(store)
    assert st.step == 0 and st.waiting_for == NO_PROMETHEUS


def test_a_custom_promql_check_is_rendered_and_judged():
    prom = Answers()
    rollout = ROLLOUT + (
        "  metrics:\n"
        "    - name: cost-per-request\n"
        '      query: sum(rate(tokens{service="{{ canary }}",ns="{{ namespace }}"}'
        "[{{ interval }}]))\n"
        "      thresholdRange: {max: 5}\n"
    )
    store, rc, clock, _ = setup(rollout, prometheus=prom)
    r = next(iter(store.resources("Rollout")))
    q = render_query(r.spec.metrics[0], r, "60s")
    assert q == 'sum(rate(tokens{service="llm-v2",ns="ai"}[60s]))'
    tick(rc)
    prom.canary(requests=40)
    prom.table[q] = 9.5
    clock.t += 60
    tick(rc)
    st = state(store)
    assert st.phase == "RolledBack" and "cost-per-request: 9.5 > max 5" in st.events[-1]


def test_confirm_promotion_holds_the_last_step_until_it_says_yes_and_rollback_stops_it():
    prom = Answers()
    answer = {"gate": 403, "stop": 404}
    rollout = ROLLOUT + (
        "  webhooks:\n"
        '    - {name: gate, type: confirm-promotion, url: "http://gate.test/approve"}\n'
        '    - {name: stop, type: rollback, url: "http://gate.test/rollback"}\n'
    )
    store, rc, clock, calls = setup(
        rollout, prometheus=prom, hooks=lambda hook, _: answer[hook.name]
    )
    tick(rc)
    prom.canary(requests=40)
    for _ in range(3):  # step 1, then twice at the last step: not confirmed
        clock.t += 60
        tick(rc)
    st = state(store)
    assert (st.phase, st.step, st.waiting_for) == ("Progressing", 1, "gate")
    assert calls[-1][1]["type"] in ("confirm-promotion", "rollback")
    answer["gate"] = 200
    clock.t += 60
    tick(rc)
    assert state(store).phase == "Promoted"
    # A new rollout of the same Service: the rollback hook says yes at the first check.
    store.offer("files", parse_text(CLUSTER + "---\n" + rollout.replace("10}", "20}"), "c.yaml"))
    answer["stop"] = 200
    tick(rc)
    clock.t += 60
    tick(rc)
    st = state(store)
    assert st.phase == "RolledBack" and "rollback webhook stop" in st.events[-1]


def test_a_restarted_controller_carries_on_from_the_published_state():
    prom = Answers()
    store, rc, clock, _ = setup(prometheus=prom)
    tick(rc)
    prom.canary(requests=40)
    clock.t += 60
    tick(rc)
    assert state(store).step == 1
    again = RolloutController(store, prom, clock=clock, rng=random.Random(2))
    tick(again)
    assert state(store).step == 1 and state(store).phase == "Progressing"


def test_a_rollout_state_cannot_be_applied_by_hand():
    offer = parse_text(
        textwrap.dedent("""\
        apiVersion: weft.dev/v1alpha1
        kind: RolloutState
        metadata: {name: llm, namespace: ai}
        spec: {generation: x, phase: Promoted, step: 0, canaryWeight: 100, windowStart: 0}
        """),
        "mine.yaml",
    )
    assert not offer.resources
    (p,) = offer.problems
    assert "written by the controller" in p.reason and p.file == "mine.yaml"


def test_metrics_and_webhooks_need_the_controller_to_judge():
    offer = parse_text(
        ROLLOUT.replace("analysis: {provider: prometheus}", "")
        + "  webhooks: [{name: gate, type: confirm-promotion, url: 'http://x/'}]\n",
        "r.yaml",
    )
    assert offer.problems and "analysis.provider: prometheus" in offer.problems[0].reason


def test_the_canary_selector_names_the_workloads_behind_the_canary_service():
    assert selector(["llm-v2", "llm-v2"], "ai") == CANARY
    assert selector([], "ai").startswith('destination_workload=~"^$"')


@pytest.mark.parametrize("kind", ["scalar", "vector"])
def test_prometheus_answers_are_read_as_one_number(kind: str, monkeypatch):
    p = Prometheus("http://x")
    data = (
        {"resultType": "scalar", "result": [0, "2.5"]}
        if kind == "scalar"
        else {"resultType": "vector", "result": [{"value": [0, "1"]}, {"value": [0, "1.5"]}]}
    )
    monkeypatch.setattr(p, "_get", lambda q: data)
    assert asyncio.run(p.value("q")) == 2.5
    monkeypatch.setattr(p, "_get", lambda q: {"resultType": "vector", "result": []})
    assert asyncio.run(p.value("q")) is None


ISTIO_LABELS = (
    CLUSTER.replace("selector: {app: llm-v1}", "selector: {app: llm, version: v1}")
    .replace("selector: {app: llm-v2}", "selector: {app: llm, version: v2}")
    .replace("labels: {app: llm-v2}", "labels: {app: llm, version: v2}")
    .replace("labels: {app: llm-v1}", "labels: {app: llm, version: v1}")
)


def test_versions_tell_canary_from_stable_when_they_share_an_app_label():
    """Istio's labels (app: llm, version: v1 / v2): the workload name is the same for both,
    so the canary is selected by version too, and a canary failing 10% is rolled back
    (measured on the stable's traffic it would have looked healthy)."""
    prom = Answers()
    store = ConfigStore()
    store.offer("files", parse_text(ISTIO_LABELS + "---\n" + ROLLOUT, "c.yaml"))
    clock = Clock()
    rc = RolloutController(store, prom, clock=clock, rng=random.Random(1))
    tick(rc)
    sel = (
        'destination_workload=~"llm",destination_workload_namespace="ai",destination_version=~"v2"'
    )
    q = window_queries(sel, "60s")
    prom.table.update({q["requests"]: 100, q["errors"]: 10, q["p99"]: 0.2})
    clock.t += 60
    tick(rc)
    assert state(store).phase == "RolledBack", state(store).events


def test_a_canary_that_looks_like_the_stable_in_metrics_is_not_judged():
    same = ISTIO_LABELS.replace("version: v2}", "version: v1}")
    prom = Answers()
    store = ConfigStore()
    store.offer("files", parse_text(same + "---\n" + ROLLOUT, "c.yaml"))
    clock = Clock()
    rc = RolloutController(store, prom, clock=clock, rng=random.Random(1))
    tick(rc)
    clock.t += 60
    tick(rc)
    st = state(store)
    assert st.step == 0 and st.phase == "Progressing"
    assert "cannot be told apart" in st.waiting_for and not prom.asked


def test_a_new_controller_process_carries_on_from_the_saved_state(tmp_path):
    """A restart is a new process with a new store, rebuilt from the sources: the rollout
    goes on where it stood (a promoted canary stays promoted), from the state file."""
    prom = Answers()
    state_file = tmp_path / "rollouts.json"

    def controller() -> tuple[ConfigStore, RolloutController, Clock]:
        store = ConfigStore()
        store.offer("files", parse_text(CLUSTER + "---\n" + ROLLOUT, "c.yaml"))
        clock = Clock()
        return store, RolloutController(store, prom, clock=clock, state_file=state_file), clock

    store, rc, clock = controller()
    tick(rc)
    prom.canary(requests=40)
    for _ in range(2):
        clock.t += 60
        tick(rc)
    assert state(store).phase == "Promoted"
    store2, rc2, _ = controller()
    assert state(store2).phase == "Promoted"  # published before the first tick
    tick(rc2)
    assert (state(store2).phase, state(store2).canary_weight) == ("Promoted", 100)


def test_a_webhook_that_fails_oddly_is_a_no_and_other_rollouts_go_on():
    prom = Answers()
    rollout = ROLLOUT + (
        "  webhooks:\n    - {name: stop, type: rollback, url: 'http://hooks.test/rollback'}\n"
    )

    store, rc, clock, _ = setup(rollout, prometheus=prom)
    # The real poster, against a port nothing listens on.
    rc.post = lambda hook, payload: post_webhook(
        hook.model_copy(update={"url": "http://127.0.0.1:9/never"}), payload
    )
    tick(rc)
    prom.canary(requests=40)
    clock.t += 60
    tick(rc)
    assert state(store).step == 1  # no answer from the rollback hook: no rollback


@pytest.mark.parametrize(
    "url", ["http://bot:80x/", "http://[::1/", "http://a/\r\nX: y", "ftp://x/"]
)
def test_webhook_urls_are_checked_when_applied(url):
    rollout = ROLLOUT + f"  webhooks:\n    - {{name: h, type: rollback, url: {json.dumps(url)}}}\n"
    offer = parse_text(rollout, "r.yaml")
    assert offer.problems, url


def test_in_a_cluster_the_state_goes_through_the_rollouts_status_to_every_replica():
    """The leader writes the state to the Rollout's status (a merge patch); every replica's
    Kubernetes source reads it back as a RolloutState, so waypoints on any replica's agents
    apply the same weights, and a restarted leader carries on from it."""
    from controller.sources.kubernetes import ROLLOUT_STATES, convert

    prom = Answers()
    store = ConfigStore()
    store.offer("files", parse_text(CLUSTER + "---\n" + ROLLOUT, "c.yaml"))
    clock = Clock()
    written: list[tuple[str, str, dict[str, Any]]] = []
    rc = RolloutController(
        store,
        prom,
        clock=clock,
        rng=random.Random(1),
        write_status=lambda ns, name, st: written.append((ns, name, st)),
    )
    tick(rc)
    assert store.get(ResourceKey("RolloutState", "ai", "llm")) is None  # not in the store
    ((ns, name, st),) = written
    assert (ns, name, st["phase"], st["canaryWeight"]) == ("ai", "llm", "Progressing", 10)
    tick(rc)
    assert len(written) == 1  # unchanged: not written again
    prom.canary(requests=40)
    clock.t += 60
    tick(rc)
    st = written[-1][2]
    assert (st["step"], st["canaryWeight"]) == (1, 50)
    # Any replica: the Rollout object as the API serves it, status included.
    obj = {
        "apiVersion": "weft.dev/v1alpha1",
        "kind": "Rollout",
        "metadata": {"name": "llm", "namespace": "ai", "resourceVersion": "7"},
        "spec": {},
        "status": {"rollout": st, "conditions": []},
    }
    state = convert(ROLLOUT_STATES, obj)
    assert state is not None and state.KIND == "RolloutState"
    follower = ConfigStore()
    follower.offer("files", parse_text(CLUSTER + "---\n" + ROLLOUT, "c.yaml"))
    follower.offer(ROLLOUT_STATES.source_id, Offer(resources=[state]))
    pols = AiPolicies.build(
        [e.resource for e in follower.entries()],
        store=None,
        board=Board(),
        rng=random.Random(),
        now=clock.t,
    )
    (ca,) = pols.rollouts()
    assert ca.following and ca.canary_weight == 50
    # A Rollout without a status yet is no RolloutState.
    assert convert(ROLLOUT_STATES, {**obj, "status": {}}) is None
