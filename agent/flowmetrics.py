"""Per-flow telemetry from the eBPF data path, into Prometheus.

The data path keeps a record per socket of a meshed pod (map weft_flows_v1, an LRU hash):
direction, addresses, the destination the pod asked for, bytes each way, the smoothed RTT
and retransmits the kernel measured, open and close times. Every `flow_export_interval`
the agent reads the map, turns each *closed* flow into observations exactly once and
deletes its record, so the map holds open flows rather than history and an LRU eviction
only ever drops a flow nobody exported (compare `weft_flows_closed_total` with
`weft_datapath_events_total{event="flows_closed"}` to see any).

The data path's event counters and drops are read from their maps when Prometheus scrapes.
The last RECENT_CLOSED exported flows stay in memory with their pod's workload, so
`weft inspect flows` (the admin API's /flows) still shows a connection that just closed.

Labels name workloads, never addresses or ports (see docs/metrics.md on cardinality). An
inbound flow that came through the tunnel has the node tunnel as its TCP peer: its caller
is in `istio_tcp_*{reporter="destination"}`, and here its peer is "unknown" with
`path="tunnel"`.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from agent.datapath.loader import PACKED_SIZE, Flow
from agent.state import ConfigSnapshot
from controller.model.workloads import Workload, workload_name

log = logging.getLogger("weft.flows")

FLOW_LABELS = (
    "direction",
    "workload",
    "workload_namespace",
    "peer_workload",
    "peer_namespace",
    "path",
)
LOCAL_LABELS = ("direction", "workload", "workload_namespace", "path")
# Seconds (Prometheus' base unit): 50 µs to 250 ms.
RTT_S = (5e-05, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)
DURATION_S = (0.01, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 1800, 3600)
RECENT_CLOSED = 4096


def flow_path(f: Flow, node_ips: Iterable[str]) -> str:
    """How the flow travelled: `fastpath` (socket to socket in the kernel), `tunnel`
    (redirected into, or delivered by, the node tunnel), or `direct` (excluded or
    passthrough traffic the data path saw but did not steer)."""
    if f.fastpath:
        return "fastpath"
    if f.redirected or (f.direction == "inbound" and f.remote[0] in node_ips):
        return "tunnel"
    return "direct"


@dataclass(frozen=True, slots=True)
class FlowKey:
    direction: str
    workload: str
    workload_namespace: str
    peer_workload: str
    peer_namespace: str
    path: str

    @property
    def local(self) -> tuple[str, str, str, str]:
        return (self.direction, self.workload, self.workload_namespace, self.path)

    @property
    def values(self) -> tuple[str, str, str, str, str, str]:
        return (
            self.direction,
            self.workload,
            self.workload_namespace,
            self.peer_workload,
            self.peer_namespace,
            self.path,
        )


def classify(
    f: Flow, owner: Workload | None, snap: ConfigSnapshot, node_ips: Iterable[str]
) -> FlowKey:
    """The labels of one flow: its pod's workload and the peer it talked to (the
    destination the pod asked for when it was redirected: a workload, or a Service when
    the address was a Service VIP)."""
    path = flow_path(f, node_ips)
    peer_ip = (f.original_dst or f.remote)[0]
    peer = snap.workloads_by_ip.get(peer_ip)
    if peer is not None:
        peer_name, peer_ns = workload_name(peer), peer.namespace
    elif (svc := snap.services_by_vip.get(peer_ip)) is not None:
        peer_name, peer_ns = f"service/{svc.name}", svc.namespace
    else:
        peer_name, peer_ns = "unknown", "unknown"
    return FlowKey(
        f.direction,
        workload_name(owner),
        owner.namespace if owner else "unknown",
        peer_name,
        peer_ns,
        path,
    )


class FlowMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.closed = Counter(
            "weft_flows_closed",
            "TCP flows of meshed pods that closed, as seen by the eBPF data path.",
            FLOW_LABELS,
            registry=r,
        )
        self.sent = Counter(
            "weft_flow_sent_bytes",
            "Bytes the pod sent on closed flows (acknowledged over TCP, or handed over by "
            "the fast path).",
            FLOW_LABELS,
            registry=r,
        )
        self.received = Counter(
            "weft_flow_received_bytes",
            "Bytes the pod received on closed flows.",
            FLOW_LABELS,
            registry=r,
        )
        self.retransmits = Counter(
            "weft_flow_retransmits",
            "TCP segments retransmitted on closed flows.",
            FLOW_LABELS,
            registry=r,
        )
        self.rtt = Histogram(
            "weft_flow_srtt_seconds",
            "The kernel's smoothed RTT of each closed flow, last sample (fast-path flows, "
            "which never touch TCP, have none).",
            LOCAL_LABELS,
            buckets=RTT_S,
            registry=r,
        )
        self.duration = Histogram(
            "weft_flow_duration_seconds",
            "How long each closed flow was open.",
            LOCAL_LABELS,
            buckets=DURATION_S,
            registry=r,
        )
        self.open = Gauge(
            "weft_flows_open",
            "Open flows of meshed pods at the last export, by path.",
            ["path"],
            registry=r,
        )
        self.exports = Counter(
            "weft_flow_exports", "Reads of the flow map into metrics.", registry=r
        )

    def observe(self, key: FlowKey, f: Flow) -> None:
        v = key.values
        self.closed.labels(*v).inc()
        self.sent.labels(*v).inc(f.bytes_sent + f.fastpath_bytes_sent)
        self.received.labels(*v).inc(f.bytes_received)
        if f.total_retrans:
            self.retransmits.labels(*v).inc(f.total_retrans)
        if not f.fastpath:
            self.rtt.labels(*key.local).observe(f.srtt_us / 1e6)
        if f.end_ns > f.start_ns:
            self.duration.labels(*key.local).observe((f.end_ns - f.start_ns) / 1e9)


class FlowRing:
    """The last `capacity` closed flows with the workload each belonged to, oldest first,
    packed (Flow.pack) side by side in one buffer allocated once: 4,096 take 340 KB. Kept as
    objects (860 bytes each, 3.4 MB), or even as one small bytes object each, they were
    made one by one during bursts of connections and, living on, kept the allocator's
    arenas of those bursts resident."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._buf = bytearray(capacity * PACKED_SIZE)
        self._owners: list[Workload | None] = [None] * capacity
        self._next = 0  # where the next flow goes
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def append(self, f: Flow, owner: Workload | None) -> None:
        """Keep `f` (the oldest is dropped when full); raises ValueError or struct.error,
        keeping nothing, for a record that does not pack (an address that is not IPv4)."""
        i = self._next
        raw = f.pack()  # whole or not at all: the oldest entry is intact if this fails
        self._buf[i * PACKED_SIZE : (i + 1) * PACKED_SIZE] = raw
        self._owners[i] = owner
        self._next = (i + 1) % self.capacity
        self._count = min(self._count + 1, self.capacity)

    def __iter__(self) -> Iterator[tuple[Flow, Workload | None]]:
        start = (self._next - self._count) % self.capacity
        entries = [((start + k) % self.capacity) for k in range(self._count)]
        buf, owners = bytes(self._buf), list(self._owners)  # a stable copy to read from
        for j in entries:
            yield Flow.unpack(buf, j * PACKED_SIZE), owners[j]


@dataclass
class _Read:
    """What one read of the flow map is judged against, and the open flows it counted."""

    snap: ConfigSnapshot
    owners: Mapping[int, Workload]
    nodes: set[str]
    open_by_path: dict[str, int] = field(
        default_factory=lambda: {"tunnel": 0, "fastpath": 0, "direct": 0}
    )


class FlowExporter:
    """Reads the flow map every `interval` seconds (in a worker thread: a large map is
    many bpf syscalls) and feeds FlowMetrics; serves drops and counters at scrape time."""

    def __init__(
        self,
        datapath: Any,
        metrics: FlowMetrics,
        *,
        snapshot: Callable[[], ConfigSnapshot],
        owners: Callable[[], Mapping[int, Workload]],
        node_ips: Callable[[], Iterable[str]],
        interval: float,
    ) -> None:
        self.datapath = datapath
        self.metrics = metrics
        self.snapshot = snapshot
        self.owners = owners
        self.node_ips = node_ips
        self.interval = interval
        self._owners: Mapping[int, Workload] = {}
        self._recent = FlowRing(RECENT_CLOSED)  # exported (and reaped) flows

    def recent(self) -> Iterator[tuple[Flow, Workload | None]]:
        """The recently closed flows, oldest first, with the workload each belonged to."""
        return iter(self._recent)

    def export_flows(self, flows: Iterable[Flow]) -> int:
        """Observe every closed flow in `flows` (already deleted from the map by the read);
        count the open ones. Returns how many closed flows were exported."""
        read = self._start_read()
        n = self._observe(flows, read)
        self._finish(read)
        return n

    async def export_once(self) -> int:
        """One read of the flow map, in batches (Datapath.flow_batches): each is decoded in
        a worker thread (a few hundred bpf syscalls) and observed on the loop before the
        next is read, so a read after a burst of connections holds one batch of records
        at a time. The open-flow gauges are set once, from the whole read."""
        read = self._start_read()
        reader = self.datapath.flow_batches(reap_closed=True)
        n = 0
        while (batch := await asyncio.to_thread(next, reader, None)) is not None:
            n += self._observe(batch, read)
        self._finish(read)
        return n

    def _start_read(self) -> _Read:
        read = _Read(self.snapshot(), self.owners(), set(self.node_ips()))
        self._owners = read.owners  # the cgroup -> workload map drops are labelled by
        return read

    def _observe(self, flows: Iterable[Flow], read: _Read) -> int:
        owners = read.owners
        n = 0
        for f in flows:
            if f.closed:
                owner = owners.get(f.cgroup_id)
                try:
                    self._recent.append(f, owner)
                except (ValueError, struct.error) as e:  # a record the ring cannot keep
                    log.warning("flow %d not kept for inspection: %s", f.cookie, e)
                self.metrics.observe(classify(f, owner, read.snap, read.nodes), f)
                n += 1
            else:
                read.open_by_path[flow_path(f, read.nodes)] += 1
        return n

    def _finish(self, read: _Read) -> None:
        for path, count in read.open_by_path.items():
            self.metrics.open.labels(path).set(count)
        self.metrics.exports.inc()

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.export_once()
            except (OSError, KeyError) as e:  # a map read failing must not stop the agent
                log.warning("reading the flow map failed: %s", e)


class DatapathCollector:
    """weft_datapath_events_total and weft_datapath_drops_total, read from the maps when
    Prometheus scrapes (per-CPU sums; nothing is kept in between). Empty until the data
    path runs (and with datapath=none)."""

    def __init__(self, exporter: Callable[[], FlowExporter | None]) -> None:
        self.exporter = exporter

    def collect(self) -> Any:
        from prometheus_client.core import CounterMetricFamily

        events = CounterMetricFamily(
            "weft_datapath_events",
            "eBPF data path events: connects seen, redirected, excluded, fast-path "
            "connects/sockets/messages/bytes/fallbacks, flows opened and closed, IPv6 "
            "passed, inbound drops.",
            labels=["event"],
        )
        drops = CounterMetricFamily(
            "weft_datapath_drops",
            "Packets dropped by inbound enforcement, by pod workload and reason.",
            labels=["workload", "workload_namespace", "reason"],
        )
        exp = self.exporter()
        if exp is None:
            yield events
            yield drops
            return
        dp = exp.datapath
        try:
            for c, v in dp.counters().items():
                events.add_metric([c.name.lower()], v)
            owners = exp._owners
            summed: dict[tuple[str, str, str], int] = {}
            for (cg, reason), n in dp.drop_counters().items():
                w = owners.get(cg)
                k = (
                    workload_name(w),
                    w.namespace if w else "unknown",
                    getattr(reason, "label", str(reason)),
                )
                summed[k] = summed.get(k, 0) + n
            for k, n in summed.items():
                drops.add_metric(list(k), n)
        except (OSError, KeyError) as e:
            log.warning("reading data path counters failed: %s", e)
        yield events
        yield drops
