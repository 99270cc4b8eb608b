"""The tunnel's metrics, under Istio's standard TCP names so existing dashboards work.

Byte counts are kept as plain integers per connection on the hot path and added to the
counters when the connection closes (Istio's proxies also report long connections'
bytes periodically; `flush_open` is for that, called by the agent's metrics loop).
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter

from agent.state import ConfigSnapshot
from controller.model.workloads import Service, Workload, workload_name

TCP_LABELS = (
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_service",
    "destination_service_name",
    "destination_service_namespace",
    "connection_security_policy",
)


@dataclass(frozen=True, slots=True)
class FlowLabels:
    reporter: str
    source_workload: str
    source_workload_namespace: str
    source_principal: str
    source_app: str
    destination_workload: str
    destination_workload_namespace: str
    destination_principal: str
    destination_app: str
    destination_service: str
    destination_service_name: str
    destination_service_namespace: str
    connection_security_policy: str

    @classmethod
    def of(
        cls,
        snap: ConfigSnapshot,
        src: Workload | None,
        dst: Workload | None,
        svc: Service | None,
        *,
        reporter: str,
        mtls: bool,
        source_principal: str | None = None,
    ) -> FlowLabels:
        td = snap.trust_domain
        svc_ns = svc.namespace if svc else (dst.namespace if dst else "unknown")
        return cls(
            reporter=reporter,
            source_workload=workload_name(src),
            source_workload_namespace=src.namespace if src else "unknown",
            source_principal=source_principal or (src.identity(td) if src else "unknown"),
            source_app=src.labels.get("app", "unknown") if src else "unknown",
            destination_workload=workload_name(dst),
            destination_workload_namespace=dst.namespace if dst else "unknown",
            destination_principal=dst.identity(td) if dst and dst.spec.mesh else "unknown",
            destination_app=dst.labels.get("app", "unknown") if dst else "unknown",
            destination_service=f"{svc.name}.{svc.namespace}.svc.cluster.local"
            if svc
            else "unknown",
            destination_service_name=svc.name if svc else "unknown",
            destination_service_namespace=svc_ns,
            connection_security_policy="mutual_tls" if mtls else "none",
        )

    def values(self) -> tuple[str, ...]:
        return tuple(getattr(self, k) for k in TCP_LABELS)


def request_direction(reporter: str, pod_sent: int, pod_received: int) -> tuple[int, int]:
    """(client-to-server bytes, server-to-client bytes) from what the local pod sent and
    received: at the source the pod is the client, at the destination the server."""
    if reporter == "destination":
        return pod_received, pod_sent
    return pod_sent, pod_received


class TunnelMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = registry or CollectorRegistry()
        self.registry = r
        self._opened = Counter(
            "istio_tcp_connections_opened", "TCP connections opened.", TCP_LABELS, registry=r
        )
        self._closed = Counter(
            "istio_tcp_connections_closed", "TCP connections closed.", TCP_LABELS, registry=r
        )
        self._sent = Counter(
            "istio_tcp_sent_bytes",
            "Bytes sent by the source side of TCP connections (request direction).",
            TCP_LABELS,
            registry=r,
        )
        self._received = Counter(
            "istio_tcp_received_bytes",
            "Bytes received by the source side (response direction).",
            TCP_LABELS,
            registry=r,
        )
        self._denied = Counter(
            "weft_tunnel_denied_connections",
            "Connections refused by L4 authorization.",
            TCP_LABELS,
            registry=r,
        )
        self._handoffs = Counter(
            "weft_tunnel_waypoint_handoffs",
            "Captured connections handed to a waypoint on this node (no HBONE hop).",
            registry=r,
        )
        self._revoked = Counter(
            "weft_tunnel_revoked_connections",
            "Open connections closed because a new config no longer admits them, by kind "
            "(inbound HBONE stream, local relay) and reason.",
            ["kind", "reason"],
            registry=r,
        )
        self._refused = Counter(
            "weft_tunnel_refused_connections",
            "Connections the tunnel could not serve, by direction and reason (bounded set).",
            ["direction", "reason"],
            registry=r,
        )

    def handed_off(self, labels: FlowLabels) -> None:
        """A connection given to a waypoint on this node (handoff.py): opened here, and
        from now on the waypoint's to serve and to report."""
        self._opened.labels(*labels.values()).inc()
        self._handoffs.inc()

    def opened(self, labels: FlowLabels) -> None:
        self._opened.labels(*labels.values()).inc()

    def closed(self, labels: FlowLabels, *, sent: int, received: int) -> None:
        """`sent`: bytes in the request direction (client to server), `received`: in the
        response direction, at either end (see request_direction)."""
        v = labels.values()
        self._closed.labels(*v).inc()
        if sent:
            self._sent.labels(*v).inc(sent)
        if received:
            self._received.labels(*v).inc(received)

    def denied(self, labels: FlowLabels) -> None:
        self._denied.labels(*labels.values()).inc()

    def revoked(self, kind: str, reason: str) -> None:
        self._revoked.labels(kind, reason).inc()

    def refused(self, direction: str, reason: str) -> None:
        self._refused.labels(direction, reason).inc()
