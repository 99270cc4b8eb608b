"""Saturation from vLLM metrics, priority admission (admit, queue, shed) and model-aware
endpoint choice (least loaded, bounded-load session affinity)."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any
from urllib.request import urlopen

import pytest

from agent.lab.workloads.model_server import Behaviour, ServerConfig, ServerThread
from agent.waypoint.ai.balance import ModelBalancer
from agent.waypoint.ai.facts import RequestFacts
from agent.waypoint.ai.priority import (
    LoadBoard,
    LoadShedder,
    ScrapedLoad,
    backend_level,
    parse_vllm_metrics,
    saturation_level,
)
from agent.waypoint.codec.headers import Headers
from controller.model.ai import LoadShedding

SPEC: dict[str, Any] = {
    "targetRefs": [{"name": "llm"}],
    "saturation": {"queueDepth": 4, "kvCacheUtilization": 0.9, "inFlight": 8},
    "priorityClasses": [
        {"name": "critical", "value": 100, "whenSaturated": "Admit"},
        {
            "name": "standard",
            "value": 50,
            "whenSaturated": "Queue",
            "queue": {"maxRequests": 2, "timeout": "5s"},
        },
        {
            "name": "batch",
            "value": 0,
            "whenSaturated": "Shed",
            "saturationAt": 0.75,
            "shedStatus": 429,
        },
    ],
    "defaultPriorityClass": "standard",
    "priorities": [
        {"match": {"namespaces": ["prod"]}, "priorityClass": "critical"},
        {
            "match": {"headers": [{"name": "x-priority", "values": ["batch"]}]},
            "priorityClass": "batch",
        },
    ],
}


def shedder(**spec: Any) -> LoadShedder:
    return LoadShedder(
        LoadShedding.model_validate(
            {
                "apiVersion": "weft.dev/v1alpha1",
                "kind": "LoadShedding",
                "metadata": {"name": "shed", "namespace": "ai"},
                "spec": {**SPEC, **spec},
            }
        )
    )


def facts(ns: str, **headers: str) -> RequestFacts:
    return RequestFacts(
        f"spiffe://td/ns/{ns}/sa/x",
        ns,
        "llama",
        "/v1/chat/completions",
        Headers.of(*headers.items()),
    )


# ---- metrics -------------------------------------------------------------------------


def test_the_parser_reads_the_real_model_servers_metrics():
    cfg = ServerConfig(model="llama")
    with ServerThread(cfg, Behaviour(ttft=0, tpot=0, kv_cache_usage=0.75)) as srv:
        text = urlopen(srv.url + "/metrics", timeout=5).read()
    assert parse_vllm_metrics(text) == ScrapedLoad(0.0, 0.0, 0.75)


def test_the_parser_adds_series_takes_the_largest_kv_and_skips_the_rest():
    text = """# HELP vllm:num_requests_waiting x
vllm:num_requests_waiting{model_name="a"} 3
vllm:num_requests_waiting{model_name="b",note="{weird} value"} 2.0 1712345678000
vllm:num_requests_running{model_name="a"} 5
vllm:kv_cache_usage_perc{model_name="a"} 0.5
vllm:gpu_cache_usage_perc{model_name="b"} 0.9
vllm:num_requests_waiting_total 99
vllm:gpu_cache_usage_perc{model_name="c"} NaN
other_metric 7
"""
    assert parse_vllm_metrics(text) == ScrapedLoad(5.0, 5.0, 0.9)


def test_level_is_the_largest_ratio_and_stale_scrapes_count_as_none():
    sat = shedder().saturation
    assert saturation_level(sat, ScrapedLoad(2, 0, 0.45), 0) == 0.5
    assert saturation_level(sat, ScrapedLoad(0, 0, 0.0), 8) == 1.0
    board = LoadBoard(max_age=15)
    board.scraped("a", ScrapedLoad(8, 4, 0.99), now=0)
    board.scraped("b", ScrapedLoad(4, 4, 0.5), now=0)
    assert backend_level(sat, board, ["a", "b"], now=10) == 1.0  # b is the least loaded
    assert backend_level(sat, board, ["a", "b"], now=16) == 0.0  # both stale
    assert backend_level(sat, board, [], now=0) == float("inf")


# ---- priority ------------------------------------------------------------------------


def test_callers_get_their_class_first_match_wins_and_the_default_otherwise():
    s = shedder()
    assert s.classify(facts("prod")).name == "critical"
    assert s.classify(facts("dev", **{"x-priority": "batch"})).name == "batch"
    assert s.classify(facts("dev")).name == "standard"


def test_under_saturation_low_priority_is_shed_while_high_priority_keeps_flowing():
    s = shedder()
    hi, std, lo = (
        s.classify(facts("prod")),
        s.classify(facts("dev")),
        s.classify(facts("dev", **{"x-priority": "batch"})),
    )
    # Not saturated: everyone goes.
    assert [s.admit(c, 0.5, 0).action for c in (hi, std, lo)] == ["admit"] * 3
    # At 0.8 only batch (saturationAt 0.75) is held back: shed with its 429.
    v = s.admit(lo, 0.8, 0)
    assert (v.action, v.status) == ("shed", 429)
    assert dict(v.headers) == {b"retry-after": b"1", b"x-weft-shed": b"batch"}
    assert s.admit(std, 0.8, 0).action == "admit"
    # Saturated: critical still flows for every one of 100 requests; batch is shed.
    assert all(s.admit(hi, 1.5, t).action == "admit" for t in range(100))
    assert s.admit(lo, 1.5, 0).action == "shed"
    assert hi.counters.shed == 0 and lo.counters.shed == 2


def test_the_standard_class_queues_up_to_its_bound_then_sheds():
    s = shedder()
    std = s.classify(facts("dev"))
    v1, v2, v3 = (s.admit(std, 1.2, 0.0), s.admit(std, 1.2, 1.0), s.admit(std, 1.2, 2.0))
    assert (v1.action, v2.action, v3.action) == ("queue", "queue", "shed")
    assert v3.status == 503 and "queue is full" in v3.reason
    assert s.queued() == 2 and s.next_deadline() == 5.0
    # Still saturated: nobody leaves; then the level drops and they go in FIFO order.
    assert s.pop_ready(lambda _: 1.1) is None
    assert s.pop_ready(lambda _: 0.5) is v1.ticket and s.pop_ready(lambda _: 0.5) is v2.ticket
    assert s.pop_ready(lambda _: 0.5) is None and v1.ticket.state == "admitted"


def test_queued_requests_time_out_and_cancelled_ones_are_skipped():
    s = shedder()
    std = s.classify(facts("dev"))
    a, b = s.admit(std, 1.2, 0.0).ticket, s.admit(std, 1.2, 3.0).ticket
    assert s.expire(4.9) == []
    assert s.expire(5.0) == [a] and a.state == "expired"
    assert s.shed_verdict(a).status == 503
    s.cancel(b)
    assert s.expire(100) == [] and s.queued() == 0 and std.counters.timed_out == 1


def test_a_newcomer_does_not_overtake_its_queued_class():
    s = shedder()
    std = s.classify(facts("dev"))
    first = s.admit(std, 1.2, 0).ticket
    assert s.admit(std, 0.5, 1).action == "queue"  # room now, but someone is waiting
    assert s.pop_ready(lambda _: 0.5) is first


def test_a_saturated_backends_queue_does_not_hold_back_another_backends_requests():
    """One LoadShedding class serves every backend of the Service: requests queued for a
    saturated backend (big) neither make a newcomer for an idle one (small) queue, nor keep
    a queued small request from leaving when small has room. FIFO holds per backend."""
    s = shedder()
    std = s.classify(facts("dev"))
    big1 = s.admit(std, 1.2, 0, ("10.0.0.1:8000",)).ticket
    big2 = s.admit(std, 1.2, 1, ("10.0.0.1:8000",)).ticket
    assert s.admit(std, 0.1, 2, ("10.0.0.2:8000",)).action == "admit"  # small has room
    small = s.admit(std, 1.2, 3, ("10.0.0.2:8000",)).ticket  # small saturated a moment
    levels = {("10.0.0.1:8000",): 1.5, ("10.0.0.2:8000",): 0.2}
    assert s.pop_ready(lambda where: levels[where]) is small  # big is still full
    assert s.pop_ready(lambda where: levels[where]) is None
    levels[("10.0.0.1:8000",)] = 0.5
    assert [s.pop_ready(lambda where: levels[where]) for _ in range(2)] == [big1, big2]


def test_higher_classes_leave_the_queue_first():
    s = shedder(
        priorityClasses=[
            {
                "name": "gold",
                "value": 10,
                "whenSaturated": "Queue",
                "queue": {"maxRequests": 5, "timeout": "10s"},
            },
            {
                "name": "bronze",
                "value": 1,
                "whenSaturated": "Queue",
                "queue": {"maxRequests": 5, "timeout": "10s"},
            },
        ],
        defaultPriorityClass="bronze",
        priorities=[{"match": {"namespaces": ["prod"]}, "priorityClass": "gold"}],
    )
    b = s.admit(s.classify(facts("dev")), 2, 0).ticket
    g = s.admit(s.classify(facts("prod")), 2, 1).ticket
    assert [s.pop_ready(lambda _: 0.1), s.pop_ready(lambda _: 0.1)] == [g, b]


# ---- endpoint choice -----------------------------------------------------------------


def test_least_loaded_prefers_short_queues_then_free_kv_cache_then_fewer_in_flight():
    board = LoadBoard()
    board.scraped("a:8000", ScrapedLoad(queue_depth=5, kv_cache=0.1), 0)
    board.scraped("b:8000", ScrapedLoad(queue_depth=0, kv_cache=0.9), 0)
    board.scraped("c:8000", ScrapedLoad(queue_depth=0, kv_cache=0.2), 0)
    lb = ModelBalancer(board, random.Random(1))
    eps = ["a:8000", "b:8000", "c:8000"]
    assert lb.pick(eps, 1) == "c:8000"
    for _ in range(3):
        board.started("c:8000")
    assert lb.pick(eps, 1) == "b:8000"  # 3 in flight on c outweigh b's fuller KV cache


def test_session_affinity_keeps_a_conversation_on_one_endpoint():
    board = LoadBoard()
    lb = ModelBalancer(board, random.Random(1))
    eps = [f"10.0.0.{i}:8000" for i in range(4)]
    homes = {lb.pick(eps, 0, affinity=f"conv-{k}".encode()) for k in range(50)}
    assert len(homes) == 4  # conversations spread over every endpoint
    for k in range(20):
        key = f"conv-{k}".encode()
        assert len({lb.pick(eps, 0, affinity=key) for _ in range(5)}) == 1
    # Removing another endpoint does not move a conversation whose home stays.
    home = lb.pick(eps, 0, affinity=b"conv-1")
    others = [e for e in eps if e != home]
    assert lb.pick([home, *others[1:]], 0, affinity=b"conv-1") == home


def test_affinity_yields_to_load_past_the_bound():
    board = LoadBoard()
    lb = ModelBalancer(board, random.Random(1), max_load_factor=1.25)
    eps = ["a:1", "b:1", "c:1", "d:1"]
    home = lb.pick(eps, 0, affinity=b"hot")
    placed = Counter()
    for _ in range(40):  # one hot conversation, requests that stay in flight
        ep = lb.pick(eps, 0, affinity=b"hot")
        board.started(ep)
        placed[ep] += 1
    assert placed[home] < 40 and max(placed.values()) <= 13  # ceil(1.25 * 41 / 4)
    assert lb.affinity_spills > 0 and lb.affinity_hits > 0


@pytest.mark.parametrize("n", [1, 2])
def test_one_endpoint_or_ties_need_no_load(n):
    lb = ModelBalancer(LoadBoard(), random.Random(3))
    eps = [f"e{i}" for i in range(n)]
    assert lb.pick(eps, 0) in eps
