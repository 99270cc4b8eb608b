"""Flow records into Prometheus: labels, exactly-once export, drops by workload.

The flow map itself (records, deletion on export) is read from the real kernel in
tests/kernel/test_datapath.py and test_mesh.py; here Flow records are built directly."""

from __future__ import annotations

import asyncio
import textwrap
from dataclasses import replace
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from agent.datapath.loader import Flow
from agent.datapath.reasons import Counter, DropReason
from agent.flowmetrics import DatapathCollector, FlowExporter, FlowMetrics, classify, flow_path
from agent.state import ConfigSnapshot
from controller.model.loader import parse_text
from tests.kernel.conftest import metric

NODE_IP = "10.0.0.11"

SNAP_YAML = textwrap.dedent("""\
    apiVersion: weft.dev/v1alpha1
    kind: Workload
    metadata: {name: client-7f9c, namespace: apps, labels: {app: client}}
    spec: {serviceAccount: client, node: node-1, addresses: [10.244.1.2]}
    ---
    apiVersion: weft.dev/v1alpha1
    kind: Workload
    metadata: {name: llm-0, namespace: ai, labels: {app.kubernetes.io/name: llm}}
    spec: {serviceAccount: llm, node: node-2, addresses: [10.244.2.2]}
    ---
    apiVersion: v1
    kind: Service
    metadata: {name: llm, namespace: ai}
    spec: {selector: {app.kubernetes.io/name: llm}, clusterIP: 10.96.0.10, ports: [{port: 80}]}
    """)


def snapshot() -> ConfigSnapshot:
    offer = parse_text(SNAP_YAML, "snap.yaml")
    assert not offer.problems, offer.problems
    return ConfigSnapshot.build("e", 1, "cluster.local", {r.key: r for r in offer.resources})


SNAP = snapshot()
CLIENT = SNAP.workloads_by_ip["10.244.1.2"]
CG = 4242


def flow(**kw: Any) -> Flow:
    base = dict(
        cookie=1,
        cgroup_id=CG,
        direction="outbound",
        local=("10.244.1.2", 40000),
        remote=(NODE_IP, 15001),
        original_dst=("10.244.2.2", 8000),
        bytes_sent=100,
        bytes_received=2000,
        fastpath_bytes_sent=0,
        srtt_us=180,
        total_retrans=0,
        start_ns=1_000_000_000,
        end_ns=3_500_000_000,
        redirected=True,
        fastpath=False,
    )
    base.update(kw)
    return Flow(**base)  # type: ignore[arg-type]


def test_labels_name_workloads_and_services_never_addresses() -> None:
    k = classify(flow(), CLIENT, SNAP, [NODE_IP])
    assert k.values == ("outbound", "client", "apps", "llm", "ai", "tunnel")
    via_vip = classify(flow(original_dst=("10.96.0.10", 80)), CLIENT, SNAP, [NODE_IP])
    assert (via_vip.peer_workload, via_vip.peer_namespace) == ("service/llm", "ai")
    stranger = classify(flow(original_dst=("192.0.2.9", 443)), None, SNAP, [NODE_IP])
    assert stranger.values[1:5] == ("unknown", "unknown", "unknown", "unknown")


def test_path_says_how_the_flow_travelled() -> None:
    assert flow_path(flow(), [NODE_IP]) == "tunnel"
    assert flow_path(flow(fastpath=True, redirected=False), [NODE_IP]) == "fastpath"
    inbound = flow(direction="inbound", redirected=False, original_dst=None)
    assert flow_path(replace(inbound, remote=(NODE_IP, 51000)), [NODE_IP]) == "tunnel"
    assert flow_path(replace(inbound, remote=("10.244.1.9", 51000)), [NODE_IP]) == "direct"


class MapReader:
    """What FlowExporter needs of the data path, returning records built above."""

    def __init__(self) -> None:
        self.counts = {c: 0 for c in Counter}
        self.drops: dict[tuple[int, DropReason | int], int] = {}

    def counters(self) -> dict[Counter, int]:
        return self.counts

    def drop_counters(self) -> dict[tuple[int, DropReason | int], int]:
        return self.drops


def exporter() -> tuple[FlowExporter, CollectorRegistry, MapReader]:
    r = CollectorRegistry()
    dp = MapReader()
    exp = FlowExporter(
        dp,
        FlowMetrics(r),
        snapshot=lambda: SNAP,
        owners=lambda: {CG: CLIENT},
        node_ips=lambda: (NODE_IP,),
        interval=5,
    )
    r.register(DatapathCollector(lambda: exp))
    return exp, r, dp


def test_each_closed_flow_is_observed_once_and_open_ones_are_counted() -> None:
    exp, r, _ = exporter()
    # The map read deletes closed records, so a closed flow appears in one read only.
    assert exp.export_flows([flow(cookie=1), flow(cookie=2, end_ns=0)]) == 1
    assert exp.export_flows([flow(cookie=2, end_ns=0), flow(cookie=3, total_retrans=2)]) == 1
    text = generate_latest(r).decode()
    labels = dict(workload="client", peer_workload="llm", path="tunnel")
    assert metric(text, "weft_flows_closed_total", **labels) == 2
    assert metric(text, "weft_flow_sent_bytes_total", **labels) == 200
    assert metric(text, "weft_flow_received_bytes_total", **labels) == 4000
    assert metric(text, "weft_flow_retransmits_total", **labels) == 2
    assert metric(text, "weft_flow_srtt_seconds_sum", workload="client") == pytest.approx(360e-6)
    assert metric(text, "weft_flow_duration_seconds_sum", workload="client") == 5.0
    assert metric(text, "weft_flows_open", path="tunnel") == 1
    assert [f.cookie for f, _ in exp.recent()] == [1, 3]
    assert all(w is CLIENT for _, w in exp.recent())


def test_a_read_in_batches_observes_each_batch_before_reading_the_next() -> None:
    """export_once takes the flow map in batches (Datapath.flow_batches): every closed
    record of every batch is observed once, the open-flow gauge counts the whole read (not
    its last batch), and a batch is read only after the one before it was observed."""
    exp, r, dp = exporter()
    events: list[str] = []
    batches = [
        [flow(cookie=1), flow(cookie=2, end_ns=0)],
        [flow(cookie=3, end_ns=0), flow(cookie=4)],
        [flow(cookie=5)],
    ]

    def flow_batches(*, reap_closed: bool) -> Any:
        assert reap_closed
        for i, b in enumerate(batches):
            events.append(f"read {i}")
            yield b

    dp.flow_batches = flow_batches  # type: ignore[attr-defined]
    real_observe = exp._observe

    def observe(flows: Any, read: Any) -> int:
        events.append(f"observed {[f.cookie for f in flows]}")
        return real_observe(flows, read)

    exp._observe = observe  # type: ignore[method-assign]
    assert asyncio.run(exp.export_once()) == 3
    assert events == [
        "read 0",
        "observed [1, 2]",
        "read 1",
        "observed [3, 4]",
        "read 2",
        "observed [5]",
    ]
    text = generate_latest(r).decode()
    assert metric(text, "weft_flows_closed_total", workload="client", path="tunnel") == 3
    assert metric(text, "weft_flows_open", path="tunnel") == 2
    assert [f.cookie for f, _ in exp.recent()] == [1, 4, 5]


def test_fast_path_flows_count_their_bytes_and_skip_rtt() -> None:
    exp, r, _ = exporter()
    exp.export_flows([flow(fastpath=True, bytes_sent=0, fastpath_bytes_sent=5000, srtt_us=0)])
    text = generate_latest(r).decode()
    assert metric(text, "weft_flow_sent_bytes_total", path="fastpath") == 5000
    assert metric(text, "weft_flow_srtt_seconds_count", path="fastpath") == 0


def test_drops_are_summed_by_workload_and_reason_at_scrape_time() -> None:
    exp, r, dp = exporter()
    exp.export_flows([])  # learns the cgroup -> workload map
    dp.counts[Counter.INBOUND_DROPS] = 7
    dp.drops = {(CG, DropReason.NOT_FROM_TUNNEL): 5, (999, DropReason.MALFORMED): 2}
    text = generate_latest(r).decode()
    assert metric(text, "weft_datapath_events_total", event="inbound_drops") == 7
    assert (
        metric(text, "weft_datapath_drops_total", workload="client", reason="not_from_tunnel") == 5
    )
    assert metric(text, "weft_datapath_drops_total", workload="unknown", reason="malformed") == 2


def test_a_packed_flow_reads_back_the_same_and_is_small():
    """The ring of recently closed flows keeps them packed (Flow.pack): every field,
    including large counters and an absent original destination, comes back as it was."""
    for odst in (("10.96.0.10", 8080), None):
        f = flow(
            cookie=2**63 + 5,
            cgroup_id=2**40 + 1,
            direction="inbound" if odst is None else "outbound",
            original_dst=odst,
            bytes_sent=2**50,
            bytes_received=7,
            fastpath_bytes_sent=2**33,
            srtt_us=1234,
            total_retrans=3,
            start_ns=10**15,
            end_ns=10**15 + 99,
            redirected=odst is not None,
            fastpath=True,
        )
        raw = f.pack()
        assert Flow.unpack(raw) == f and len(raw) < 100


def test_the_ring_keeps_the_newest_flows_oldest_first_and_skips_what_does_not_pack():
    """FlowRing: full, it drops the oldest; iteration is oldest first with each flow's
    workload; a record that does not pack (not IPv4) is refused and leaves the ring as it
    was."""
    import pytest

    from agent.flowmetrics import FlowRing

    ring = FlowRing(3)
    owners = [object() for _ in range(5)]
    for i in range(5):
        ring.append(flow(cookie=i), owners[i])  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        ring.append(flow(cookie=9, local=("fd00::1", 1)), None)
    got = list(ring)
    assert [f.cookie for f, _ in got] == [2, 3, 4] and len(ring) == 3
    assert [w for _, w in got] == owners[2:]
    assert got[0][0] == flow(cookie=2)
