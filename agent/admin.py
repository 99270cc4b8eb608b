"""The node agent's admin API: what it runs, holds and sees, as JSON, plus its metrics and
health checks. Read-only; `weft` (agent/cli/inspect.py) and the tests read it.

    GET /healthz     node, version, readiness, pid, uptime
    GET /workloads   this node's workloads: identity, attached, STRICT, fast path, certificate
    GET /certs       the node's and the workloads' certificates, trust bundle roots
    GET /config      config epoch, revision, controller connection, NACKs, resources by kind
    GET /flows       open and recently closed flows of the data path, with their workloads
    GET /datapath    eBPF counters, drops by reason, attached pods, fast path pairs
    GET /routes      services with their waypoint and HTTPRoute rules, one row per rule
    GET /tunnel      pooled and inbound HBONE connections and their streams
    GET /metrics     Prometheus text (its own listener)
    GET /healthz/ready, /healthz/live   readiness and liveness (their own listener)

The agent (agent/main.py) decides where each table listens.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import TYPE_CHECKING, Any

from prometheus_client import generate_latest

from agent import __version__
from agent.datapath.loader import Flow
from agent.httpserver import Handler, HttpRequest, Response, json_response
from controller.model.workloads import Workload

if TYPE_CHECKING:
    from agent.main import Agent


class AdminApi:
    """Handlers over a running Agent, grouped by the listener that serves them."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    def admin_routes(self) -> dict[str, Handler]:
        return {
            "/healthz": self.health,
            "/workloads": self.workloads,
            "/certs": self.certs,
            "/config": self.config,
            "/flows": self.flows,
            "/datapath": self.datapath,
            "/routes": self.services,
            "/tunnel": self.tunnel,
        }

    def metrics_routes(self) -> dict[str, Handler]:
        return {"/metrics": self.metrics}

    def ready_routes(self) -> dict[str, Handler]:
        return {"/healthz/ready": self.ready, "/healthz/live": self.live}

    async def health(self, req: HttpRequest) -> Response:
        return json_response(
            200,
            {
                "node": self.agent.s.node,
                "version": __version__,
                "ready": self.agent.ready,
                "pid": os.getpid(),
                "uptimeSeconds": int(time.time() - self.agent.started),
            },
        )

    async def live(self, req: HttpRequest) -> Response:
        """Liveness: answered by the event loop, so a loop that stopped turning fails it;
        a draining or superseded agent (not ready) is still live."""
        return 200, "live\n", "text/plain"

    async def ready(self, req: HttpRequest) -> Response:
        return (
            (200, "ready\n", "text/plain")
            if self.agent.ready
            else (503, "not ready\n", "text/plain")
        )

    async def metrics(self, req: HttpRequest) -> Response:
        self.agent.refresh_gauges()
        return 200, generate_latest(self.agent.registry), "text/plain; version=0.0.4"

    async def workloads(self, req: HttpRequest) -> Response:
        snap = self.agent.snapshot
        attached = {}
        if self.agent.datapath is not None:
            attached = {p.ip: p for p in self.agent.datapath.attached_pods()}
        out = []
        for w in snap.local_workloads(self.agent.s.node):
            ip = str(w.spec.addresses[0])
            a = attached.get(ip)
            cert = self.agent.identities.get(w.namespace, w.spec.service_account)
            out.append(
                {
                    "name": w.name,
                    "namespace": w.namespace,
                    "node": w.spec.node,
                    "ip": ip,
                    "identity": snap.workload_identity(w),
                    "meshed": w.spec.mesh,
                    "attached": a is not None,
                    "strict": bool(a and a.strict),
                    "fastpath": bool(a and a.fastpath),
                    "certificate": cert is not None,
                    "labels": w.labels,
                }
            )
        return json_response(200, out)

    async def certs(self, req: HttpRequest) -> Response:
        node = {
            "spiffeId": self.agent.node.spiffe_id,
            "notAfter": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.agent.node.not_after))
            if self.agent.node.not_after
            else None,
        }
        return json_response(
            200,
            {
                "node": node,
                "workloads": [c.to_dict() for c in self.agent.identities.certs()],
                "trustBundleRoots": self.agent.trust.pem.count(b"BEGIN CERT"),
            },
        )

    async def config(self, req: HttpRequest) -> Response:
        snap = self.agent.snapshot
        kinds: dict[str, int] = {}
        for k in snap.resources:
            kinds[k.kind] = kinds.get(k.kind, 0) + 1
        return json_response(
            200,
            {
                "node": self.agent.s.node,
                "epoch": snap.epoch,
                "revision": snap.revision,
                "connected": self.agent.config.connected,
                "nacks": self.agent.config.nacks,
                "lastNack": self.agent.config.last_nack,
                "resources": kinds,
            },
        )

    async def flows(self, req: HttpRequest) -> Response:
        if self.agent.datapath is None:
            return json_response(200, [])
        snap = self.agent.snapshot
        by_cg = self.agent.workloads_by_cgroup()
        out = []
        # Open flows (and closed ones not exported yet) from the map, then the recently
        # closed ones the exporter took out of it, with the workload they belonged to.
        flows = await asyncio.to_thread(self.agent.datapath.flows)
        owned: list[tuple[Flow, Workload | None]] = [(f, by_cg.get(f.cgroup_id)) for f in flows]
        if self.agent.flows is not None:
            cookies = {f.cookie for f in flows}
            owned += [(f, w) for f, w in self.agent.flows.recent() if f.cookie not in cookies]
        for f, owner in owned:
            peer_ip = (f.original_dst or f.remote)[0]
            peer = snap.workloads_by_ip.get(peer_ip)
            svc = snap.services_by_vip.get(peer_ip)
            out.append(
                {
                    "cookie": f.cookie,
                    "direction": f.direction,
                    "workload": f"{owner.namespace}/{owner.name}" if owner else None,
                    "identity": snap.workload_identity(owner) if owner else None,
                    "peer": f"{peer.namespace}/{peer.name}"
                    if peer
                    else f"service {svc.namespace}/{svc.name}"
                    if svc
                    else None,
                    "peerIdentity": snap.workload_identity(peer)
                    if peer and peer.spec.mesh
                    else None,
                    "local": f"{f.local[0]}:{f.local[1]}",
                    "remote": f"{f.remote[0]}:{f.remote[1]}",
                    "originalDst": f"{f.original_dst[0]}:{f.original_dst[1]}"
                    if f.original_dst
                    else None,
                    "bytesSent": f.bytes_sent,
                    "bytesReceived": f.bytes_received,
                    "fastpathBytes": f.fastpath_bytes_sent,
                    "srttUs": f.srtt_us,
                    "retransmits": f.total_retrans,
                    "redirected": f.redirected,
                    "fastpath": f.fastpath,
                    "start": f.started_at,
                    "end": f.ended_at,
                }
            )
        return json_response(200, out)

    async def services(self, req: HttpRequest) -> Response:
        """Services with their waypoint and attached HTTPRoute rules, one row per rule."""
        snap = self.agent.snapshot
        rows: list[dict[str, Any]] = []
        for (ns, name), svc in sorted(snap.services.items()):
            routes = snap.routes.get((ns, name), ())
            base = {"service": f"{ns}/{name}", "waypoint": svc.waypoint or ""}
            if not routes:
                rows.append({**base, "route": "", "rule": "", "matches": "", "backends": ""})
            for rt in routes:
                for i, rule in enumerate(rt.spec.rules):
                    rows.append(
                        {
                            **base,
                            "route": rt.name,
                            "rule": rule.name or str(i),
                            "matches": "; ".join(
                                _describe_match(m) for m in rule.effective_matches()
                            ),
                            "backends": ", ".join(
                                f"{b.name}:{b.port}={b.weight}" for b in rule.backend_refs or []
                            ),
                        }
                    )
        return json_response(200, rows)

    async def datapath(self, req: HttpRequest) -> Response:
        if self.agent.datapath is None:
            return json_response(200, {"mode": "none"})
        return json_response(
            200,
            {
                "mode": "ebpf",
                "counters": {c.name.lower(): v for c, v in self.agent.datapath.counters().items()},
                "drops": [
                    {"cgroupId": cg, "reason": getattr(r, "label", str(r)), "count": n}
                    for (cg, r), n in self.agent.datapath.drop_counters().items()
                ],
                "pods": [
                    {
                        "cgroup": p.cgroup,
                        "ip": p.ip,
                        "strict": p.strict,
                        "fastpath": p.fastpath,
                        "capture": p.capture,
                        "inboundExceptionPorts": sorted(p.inbound_exception_ports),
                        "probePorts": sorted(p.probe_ports),
                    }
                    for p in self.agent.datapath.attached_pods()
                ],
                "fastpathPairs": sorted(self.agent.datapath.fastpath_pairs()),
            },
        )

    async def tunnel(self, req: HttpRequest) -> Response:
        t = self.agent.tunnel
        assert t is not None
        return json_response(
            200,
            {
                "pool": [
                    {
                        "peer": c.peer_id,
                        "label": c.label,
                        "streams": c.open_streams(),
                        "streamsOpened": c.streams_opened,
                    }
                    for c in t.pool.connections()
                ],
                "inbound": [
                    {"peer": c.peer_id, "local": c.local_id, "streams": c.open_streams()}
                    for c in t._inbound
                ],
                "openStreams": t.open_streams(),
            },
        )


def _describe_match(m: Any) -> str:
    parts = []
    if m.path is not None:
        parts.append(f"path {m.path.type} {m.path.value}")
    if m.method:
        parts.append(f"method {m.method}")
    for h in m.headers or []:
        parts.append(f"header {h.name}{'~' if h.type != 'Exact' else '='}{h.value}")
    for q in m.query_params or []:
        parts.append(f"query {q.name}={q.value}")
    return " & ".join(parts) or "any"
