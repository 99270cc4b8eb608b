"""The waypoint process: weft's L7 proxy for Services that opt in.

    client pod ──capture──▶ node tunnel ──HBONE (client's identity)──▶ waypoint :15008
    waypoint ──HBONE (waypoint's identity)──▶ backend's node tunnel ──▶ backend pod

A Service opts in with the label weft.dev/use-waypoint: NAME; the waypoint's pods carry
weft.dev/waypoint: NAME. The waypoint terminates HBONE itself: the CONNECT authority
is the Service VIP and port the client dialled, and the client's identity comes from its
certificate. Toward the backend it adds `x-forwarded-client-cert` (Envoy's XFCC) so the
server sees the original caller, not just the waypoint; any XFCC the caller sent is
dropped first, so it cannot be forged.

Its identity and config come from its node agent's Workload API (agent/waypoint/workload.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import ssl
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, generate_latest

from agent import keeper, memtrim
from agent.accesslog import AccessLog, members, quote, quote_str
from agent.aio import cache_running_loop
from agent.httpserver import HttpRequest, HttpServer, Response
from agent.identity.tls import direct_io
from agent.policy.authz import Decision, Request, evaluate, principal_of, service_policies
from agent.state import ConfigSnapshot
from agent.tasks import TaskFailed, TaskOwner
from agent.tunnel import h2 as hb
from agent.tunnel.handoff import Handoff, socket_beside
from agent.tunnel.hbone import HboneConnection
from agent.tunnel.localstream import StreamTransport
from agent.tunnel.pool import ConnectionPool, PoolSettings
from agent.tunnel.tunnel import caller_address, forwarded_for, parse_authority
from agent.waypoint.aiflow import AiFlow
from agent.waypoint.codec.headers import Headers
from agent.waypoint.codec.http2 import Http2Connection
from agent.waypoint.downstream import CallerInfo, Downstream, Exchange
from agent.waypoint.engine.engine import Engine
from agent.waypoint.engine.health import Probe
from agent.waypoint.engine.respond import Respond, plain
from agent.waypoint.handoff import HandoffReceiver
from agent.waypoint.pathnorm import BadPath, EscapedSlashes, normalize
from agent.waypoint.probes import Prober
from agent.waypoint.proxy import RESPOND_FLAGS, Proxy
from agent.waypoint.reqmetrics import RequestMetrics, Series
from agent.waypoint.tracing import (
    CLIENT,
    SERVER,
    Exporter,
    Span,
    TraceContext,
    new_span_id,
    random_hex,
    traceparent,
)
from agent.waypoint.upstream import Endpoint, UpstreamConnection, UpstreamError, UpstreamPool
from agent.waypoint.workload import AgentLink, Svid
from controller.ca.spiffeid import parse_workload_id
from controller.model.workloads import (
    WAYPOINT_LABEL,
    Workload,
    canonical_revision,
    canonical_service,
    workload_name,
    workload_version,
)

log = logging.getLogger("weft.waypoint")
# Labelled metric children are cached per label tuple; a waypoint sees few distinct tuples
# (caller x destination x status), and past this many the cache starts over.
_CHILD_CACHE_MAX = 4096

XFCC = b"x-forwarded-client-cert"
ACCESS_DENIED = plain(403, "RBACAccessDenied", "RBAC: access denied")
ALLOWED = Decision(True, None, "no policy applies")


@dataclass
class WaypointSettings:
    name: str
    listen: str  # pod_ip:15008
    workload_socket: Path
    metrics_listen: str = "0.0.0.0:15020"
    connect_timeout: float = 5.0
    head_timeout: float = 10.0  # slowloris: a request head must arrive within this
    idle_timeout: float = 60.0
    drain_timeout: float = 10.0
    otlp_endpoint: str | None = None  # e.g. http://collector:4318; None: propagate only
    # Where token quotas are counted (agent/waypoint/ai/quotastore.py): "memory" (this
    # replica only), an SQLite file shared by the replicas of a node, or redis://HOST:PORT
    # shared by every replica in the cluster.
    quota_store: str = "memory"
    access_log: str = "stdout"  # stdout | stderr | off | a file path
    access_log_sample: float = 1.0  # share of ordinary lines (errors are always written)
    access_log_max_rate: int = 0  # lines a second at most; 0: no cap
    access_log_max_mb: float = 0  # rotate a file log past this size; 0: never
    # Take pod connections from the node agent directly when this instance runs on the
    # caller's node (agent/tunnel/handoff.py); off: every connection arrives over HBONE.
    handoff: bool = True
    # A request path with %2F or %5C: refused with 400 (reject), decoded to / (decode), or
    # forwarded as it is (keep); see agent/waypoint/pathnorm.py.
    escaped_slashes: EscapedSlashes = "reject"
    # The pod's socket keeper (agent/keeper.py): holds the HBONE listener across a crash.
    keeper_socket: Path | None = None


@dataclass
class WaypointMetrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        # istio_requests_total and the request histograms (reqmetrics.py).
        self.requests = RequestMetrics()
        r.register(self.requests)
        self.events = Counter(
            "weft_waypoint_endpoint_events",
            "Outlier ejections and readmissions, health changes, panic mode, by kind.",
            ["kind"],
            registry=r,
        )


class Waypoint:
    def __init__(self, s: WaypointSettings) -> None:
        self.s = s
        self.snapshot = ConfigSnapshot.empty()
        self._authz: dict[tuple[str, str], list[Any]] = {}
        self._endpoints: dict[tuple[int, int], Endpoint | None] = {}
        self.svid: Svid | None = None
        self._client_ctx: ssl.SSLContext | None = None
        self._server_ctx: ssl.SSLContext | None = None
        self.link = AgentLink(s.workload_socket, self._on_config, self._on_svid)
        self.tunnel_pool = ConnectionPool(
            PoolSettings(coalesce_writes=True),
            hb.Settings(),
            source=s.listen.rpartition(":")[0].strip("[]") or None,
        )
        self.engine = Engine(clock=time.monotonic)
        self._h2_ports: dict[tuple[str, int], bool] = {}
        self.upstream = UpstreamPool(
            self.tunnel_pool, lambda: self.identity, self.client_context, s.connect_timeout
        )
        self.metrics = WaypointMetrics()
        self.metrics.registry.register(_EngineCollector(self))
        # Per label key (_log): the metric series and two pieces of the access log record.
        self._children: dict[tuple[Any, ...], tuple[Series, str, str]] = {}
        self._children_of: ConfigSnapshot | None = None  # the snapshot _children is for
        self._xfcc: dict[str | None, bytes] = {}  # XFCC value per caller (for this identity)
        self.access = AccessLog.open(
            s.access_log,
            sample=s.access_log_sample,
            max_per_second=s.access_log_max_rate,
            max_mb=s.access_log_max_mb,
        )
        self.traces = Exporter(s.otlp_endpoint, f"waypoint/{s.name}")
        self.inbound: set[HboneConnection] = set()
        self._servers: list[asyncio.AbstractServer] = []
        # Long-running tasks (timers, the agent link, the hand-off channel), owned: a crash
        # of one makes the waypoint not ready and stop, instead of serving a stale config.
        self.tasks = TaskOwner(self._failed, "waypoint")
        self.failure: TaskFailed | None = None
        self.stop_requested = asyncio.Event()
        self.prober = Prober(s.name)
        self.proxy = Proxy(self.upstream, self.endpoint, self.engine.backend)
        self.ai = AiFlow(self, s.quota_store, self.metrics.registry)
        self.draining = False
        # Pod connections its node agent handed over (no HBONE hop): see _handed.
        self._handoffs: weakref.WeakSet[Downstream] = weakref.WeakSet()
        self.receiver = (
            HandoffReceiver(socket_beside(s.workload_socket), self._handed) if s.handoff else None
        )

    # ---- identity and config -----------------------------------------------------------

    @property
    def identity(self) -> str:
        return self.svid.spiffe_id if self.svid else ""

    def _on_svid(self, svid: Svid) -> None:
        self.svid = svid
        self._xfcc = {}  # the values name the waypoint's identity
        self._client_ctx = svid.client()
        self._server_ctx = svid.server()
        log.info("waypoint %s has identity %s", self.s.name, svid.spiffe_id)

    def _on_config(self, snap: ConfigSnapshot) -> None:
        self.snapshot = snap
        self._authz = {}  # Service -> its L7 policies, for this snapshot
        self.engine.update(snap)
        self.ai.update(list(snap.resources.values()), *self._replicas(snap))
        # Backends that speak HTTP/2 (gRPC, h2c), from the Service port's appProtocol.
        h2: dict[tuple[str, int], bool] = {}
        for (ns, name), svc in snap.services.items():
            for port in svc.spec.ports:
                if _is_h2(port.app_protocol):
                    for w in snap.endpoints.get((ns, name), ()):
                        h2[(str(w.spec.addresses[0]), port.target())] = True
        self._h2_ports = h2
        self._endpoints = {}  # (id(workload), port) -> Endpoint (with its h2 flag), per snapshot
        log.info("waypoint %s: config revision %d", self.s.name, snap.revision)

    def _replicas(self, snap: ConfigSnapshot) -> tuple[int, int]:
        """(replicas, nodes) of this waypoint: its pods (weft.dev/waypoint: NAME)."""
        mine = {
            w.key: w.spec.node
            for w in snap.workloads_by_ip.values()
            if w.labels.get(WAYPOINT_LABEL) == self.s.name
        }
        return max(1, len(mine)), max(1, len(set(mine.values())))

    def client_context(self) -> ssl.SSLContext:
        assert self._client_ctx is not None
        return self._client_ctx

    def _server_context(self) -> ssl.SSLContext:
        ctx = direct_io(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.set_alpn_protocols(["h2"])
        assert self.svid is not None
        ctx.load_verify_locations(cadata=self.svid.bundle.decode())

        def pick(sslobj: ssl.SSLObject, name: str | None, _: ssl.SSLContext) -> None:
            # One identity only; switching lets a renewed certificate take effect at once.
            if self._server_ctx is not None:
                sslobj.context = self._server_ctx

        ctx.sni_callback = pick
        return ctx

    # ---- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        for attempt in range(60):
            try:
                await self.link.fetch_svid()
                await self.link.fetch_config()
                break
            except (OSError, ConnectionError, ValueError) as e:
                if attempt == 59:
                    raise
                log.info("waiting for the node agent's Workload API (%s)", e)
                await asyncio.sleep(0.5)
        host, _, port = self.s.listen.rpartition(":")
        loop = asyncio.get_running_loop()
        # With a socket keeper in the pod, a crashed predecessor's listener (and the
        # connects queued on it meanwhile) is taken over; ours is kept for a successor.
        held = keeper.take(self.s.keeper_socket) if self.s.keeper_socket else {}
        hbone = keeper.listener(self.s.keeper_socket, held, "hbone", host, int(port))
        for extra in held.values():
            extra.close()
        self._servers.append(
            await loop.create_server(
                self._accept,
                sock=hbone,
                ssl=self._server_context(),
                backlog=4096,
                ssl_handshake_timeout=10,
            )
        )
        mhost, _, mport = self.s.metrics_listen.rpartition(":")
        if mport and mport != "0":
            srv = HttpServer(
                {
                    "/metrics": self._h_metrics,
                    "/healthz/ready": self._h_ready,
                    "/healthz/live": self._h_live,
                    "/rollouts": self._h_rollouts,
                    "/config": self._h_config,
                }
            )
            await srv.listen_tcp(mhost, int(mport))
            self._servers += srv.servers
        self.tunnel_pool.start()
        self.traces.start()
        self.tasks.start(self._timers(), "engine-timers")
        self.tasks.start(self.ai.run_timers(), "ai-timers")
        self.tasks.start(self.link.run(), "agent-link")
        self.tasks.start(memtrim.run(), "memory-trim", essential=False)
        if self.receiver is not None:
            self.tasks.start(self.receiver.run(), "handoff")
        log.info("waypoint %s listening on %s as %s", self.s.name, self.s.listen, self.identity)

    async def drain(self) -> None:
        """Stop taking connections (a successor's listener gets those queued on ours, and
        the agent hands new ones to it), let those in flight finish, then close."""
        # The hand-overs still queued on the channel are taken (and served, each answered
        # with Connection: close) before `draining` would make _handed turn them away.
        if self.receiver is not None:
            self.receiver.stop()
        self.draining = True
        for srv in self._servers:
            srv.close()
        for c in list(self.inbound):
            c.goaway()
        for d in list(self._handoffs):
            d.drain()
        end = time.monotonic() + self.s.drain_timeout
        while (  # noqa: ASYNC110
            any(c.open_streams() for c in self.inbound) or any(not d.closed for d in self._handoffs)
        ) and time.monotonic() < end:
            await asyncio.sleep(0.05)
        await self.close()

    async def close(self) -> None:
        for srv in self._servers:
            srv.close()
        # Awaited: nothing runs after close returns (a failure was reported as it ended).
        await self.tasks.cancel()
        await self.traces.close()
        for c in list(self.inbound):
            c.abort_all()
        for d in list(self._handoffs):
            d.close()
        self.upstream.close()
        await self.tunnel_pool.close()
        await self.ai.close()
        self.access.close()

    async def _h_metrics(self, req: HttpRequest) -> Response:
        return 200, generate_latest(self.metrics.registry), "text/plain; version=0.0.4"

    async def _h_config(self, req: HttpRequest) -> Response:
        snap = self.snapshot
        return (
            200,
            json.dumps(
                {
                    "waypoint": self.s.name,
                    "epoch": snap.epoch,
                    "revision": snap.revision,
                    "pid": os.getpid(),
                    "ready": self._ready(),
                }
            ).encode(),
            "application/json",
        )

    async def _h_rollouts(self, req: HttpRequest) -> Response:
        """Automated canary analyses this waypoint runs: phase, weights, recent events."""
        return (
            200,
            json.dumps([r.status() for r in self.ai.policies.rollouts()], default=str).encode(),
            "application/json",
        )

    def _ready(self) -> bool:
        return (
            self.svid is not None
            and self.snapshot.revision > 0
            and not self.draining
            and self.failure is None
        )

    def _failed(self, failure: TaskFailed) -> None:
        """An essential task failed (its traceback is logged): not ready, and stop as on
        SIGTERM (drain included); `run` then raises the failure (exit non-zero)."""
        if self.failure is None:
            self.failure = failure
        self.stop_requested.set()

    async def _h_live(self, req: HttpRequest) -> Response:
        return 200, "live\n", "text/plain"

    async def _h_ready(self, req: HttpRequest) -> Response:
        ok = self._ready()
        return (200, "ready\n", "text/plain") if ok else (503, "not ready\n", "text/plain")

    # ---- HBONE in ----------------------------------------------------------------------

    def _accept(self) -> HboneConnection:
        c = HboneConnection(
            client=False,
            settings=hb.Settings(),
            on_request=self._stream,
            on_lost=self.inbound.discard,
            label=f"waypoint {self.s.name}",
            coalesce=True,
        )
        self.inbound.add(c)
        return c

    def _stream(self, conn: HboneConnection, req: hb.StreamRequest) -> None:
        if req.method != "CONNECT":
            conn.respond(req.stream_id, 400)
            return
        # The caller's address only as far as its node tunnel can vouch for it.
        peername = conn.transport.get_extra_info("peername") if conn.transport else None
        client_ip, _ = caller_address(
            self.snapshot,
            conn.peer_id,
            peername[0] if peername else None,
            forwarded_for(req.headers),
            None,
        )
        caller = self._caller(conn.peer_id, client_ip, req.authority)
        if isinstance(caller, int):
            conn.respond(req.stream_id, caller)
            return
        stream = conn.accept_stream(req.stream_id)
        conn.respond(req.stream_id, 200)
        StreamTransport(self._downstream(caller), {"peer_identity": conn.peer_id}).bind(stream)

    def _caller(
        self, principal: str | None, client_ip: str | None, authority: str
    ) -> CallerInfo | int:
        """Who calls which Service port of this waypoint, or the status refusing it (401: not
        a peer of this trust domain; 400: not a Service this waypoint serves)."""
        snap = self.snapshot
        peer = parse_workload_id(principal or "")
        if peer is None or peer.trust_domain != snap.trust_domain:
            return 401
        target = parse_authority(authority)
        svc = snap.services_by_vip.get(target[0]) if target else None
        if target is None or svc is None or svc.port(target[1]) is None:
            log.info("waypoint %s: %r is not a port of a Service it serves", self.s.name, authority)
            return 400
        if svc.waypoint != self.s.name:
            return 400
        return CallerInfo(
            principal=principal,
            client_ip=client_ip or "0.0.0.0",
            service_ns=svc.namespace,
            service=svc.name,
            vip=target[0],
            port=target[1],
        )

    def _downstream(self, caller: CallerInfo) -> Downstream:
        return Downstream(
            caller, self.handle, head_timeout=self.s.head_timeout, idle_timeout=self.s.idle_timeout
        )

    # ---- connections handed over by the node agent -----------------------------------

    def _handed(self, what: Handoff, sock: socket.socket) -> None:
        """A pod connection the node agent captured for a Service of this waypoint
        (agent/tunnel/handoff.py): plaintext HTTP straight from the pod's socket."""
        caller = self._caller(what.source, what.client_ip, what.destination)
        if isinstance(caller, int) or self.draining:
            log.info("waypoint %s: handed connection to %s refused", self.s.name, what.destination)
            sock.close()
            return
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        proto = self._downstream(caller)
        loop = asyncio.get_running_loop()
        t = loop.create_task(loop.connect_accepted_socket(lambda: proto, sock))
        self._handoffs.add(proto)

        def started(t: asyncio.Task[Any]) -> None:
            if not t.cancelled() and (e := t.exception()) is not None:
                log.warning(
                    "waypoint %s: handed connection to %s lost: %s",
                    self.s.name,
                    what.destination,
                    e,
                )
                sock.close()

        t.add_done_callback(started)

    # ---- one request -------------------------------------------------------------------

    async def handle(self, x: Exchange) -> None:
        """One request: L7 authorization, then the one request path (proxy.py)."""
        snap = self.snapshot
        c = x.caller
        key = (c.service_ns, c.service)  # the Service's (namespace, name)
        svc = snap.services.get(key)
        head = x.head
        ai = self.ai.policies.for_service(c.service_ns, c.service)
        x.ai_service = ai is not None  # the style of the mesh's answers follows (style_of)
        if svc is None:
            x.reply(plain(503, "NoHealthyEndpoint", "service no longer exists"))
            return self._log(x, None, "NR")
        # What policy matches is what is forwarded: one canonical spelling (pathnorm.py).
        try:
            target = normalize(head.target, self.s.escaped_slashes)
        except BadPath as e:
            x.reply(plain(400, "BadRequest", str(e)))
            return self._log(x, None, "-")
        if target != head.target:
            x.annotations["normalizedPath"] = target
        headers = head.headers.copy()
        tp = headers.get(b"traceparent")
        # tracestate is of use only with a traceparent (and rarely sent): not looked for else.
        trace = TraceContext.from_headers(tp, headers.get(b"tracestate") if tp else None)
        # Spans are objects only when they are exported; otherwise the trace context is
        # still propagated (a new span id per try), which is all W3C asks of a proxy.
        if trace.sampled and self.traces.enabled:
            x.span = Span(
                f"{head.method} {c.service}.{c.service_ns}",
                trace.trace_id,
                new_span_id(),
                trace.parent_id,
                SERVER,
                attributes={
                    "http.request.method": head.method,
                    "url.path": target,
                    "server.address": head.authority,
                    "weft.source.principal": c.principal,
                    "weft.waypoint": self.s.name,
                },
            )
        x.trace = trace  # its trace id goes in the access log record
        if not headers.get(b"x-request-id"):
            headers.set(b"x-request-id", random_hex(128).encode())
        peer = parse_workload_id(c.principal or "")
        policies = self._authz.get(key)
        if policies is None:
            policies = self._authz[key] = service_policies(
                snap.authorization, c.service_ns, c.service, self.s.name
            )
        decision = (
            ALLOWED
            if not policies
            else evaluate(
                policies,
                Request(
                    principal_of(c.principal),
                    peer.namespace if peer else None,
                    c.client_ip,
                    c.vip,
                    c.port,
                    method=head.method,
                    path=target.split("?", 1)[0],
                    host=head.authority,
                    headers=_header_dict(headers),
                ),
            )
        )
        if not decision.allowed:
            x.reply(ACCESS_DENIED)
            log.info(
                "denied %s %s %s by %s: %s",
                c.principal,
                head.method,
                head.target,
                decision.policy or "-",
                decision.reason,
            )
            return self._log(x, None, "UAEX")
        headers.strip_hop_by_hop()
        # set() replaces every XFCC field the caller sent: whatever it claims, the backend
        # sees the identity the waypoint verified.
        headers.set(XFCC, self._xfcc_of(c.principal))
        dst: list[Endpoint] = []

        def before_try(ep: Endpoint, h: Headers) -> Span | None:
            dst.append(ep)
            if x.span is None:
                h.set(b"traceparent", trace.child_traceparent())
                return None
            span = Span(
                f"upstream {ep.key}",
                x.trace.trace_id,
                new_span_id(),
                x.span.span_id,
                CLIENT,
                attributes={
                    "server.address": ep.ip,
                    "server.port": ep.port,
                    "weft.peer.identity": ep.identity,
                },
            )
            h.set(b"traceparent", traceparent(x.trace.trace_id, span.span_id, x.trace.sampled))
            return span

        def after_try(span: Span | None, outcome: int) -> None:
            if span is None:
                return
            if outcome < 0:
                span.error = f"try failed ({outcome})"
            span.end(**{"http.response.status_code": outcome if outcome > 0 else None})
            self.traces.record(span)

        routed = self.engine.route(
            key,
            c.port,
            head.method,
            target,
            headers,
            source=c.principal,
            authority=head.authority,
            scheme=head.scheme,
        )
        if isinstance(routed, Respond):
            await self.proxy.reply(x, routed)
            flags = RESPOND_FLAGS.get(routed.code, routed.code)
        else:
            stage = None
            if ai is not None:
                stage = self.ai.request(x, ai, c.principal, peer.namespace if peer else None)
            flags = await self.proxy.run(
                x,
                routed,
                headers,
                stage=stage,
                before_try=before_try,
                # Without an exported span after_try has nothing to do: not called at all.
                after_try=after_try if x.span is not None else None,
            )
        last = self.snapshot.workloads_by_ip.get(dst[-1].ip) if dst else None
        self._log(x, last, flags)

    def _xfcc_of(self, principal: str | None) -> bytes:
        """The XFCC value for a caller: its SPIFFE ID and the waypoint's (kept per caller
        rather than formatted per request; the cache starts over with a new identity)."""
        v = self._xfcc.get(principal)
        if v is None:
            if len(self._xfcc) >= _CHILD_CACHE_MAX:
                self._xfcc.clear()
            v = self._xfcc[principal] = f"By={self.identity};URI={principal}".encode()
        return v

    def endpoint(self, w: Workload, port: int) -> Endpoint | None:
        """Where to reach a backend workload: its node's tunnel, as its identity (cached
        for the config revision)."""
        key = (id(w), port)
        ep = self._endpoints.get(key)
        if ep is None and w is not None:
            ep = self._endpoints[key] = self._endpoint(w, port)
        return ep

    def _endpoint(self, w: Workload, port: int) -> Endpoint | None:
        snap = self.snapshot
        node = snap.nodes.get(w.spec.node)
        if node is None:
            return None
        host, nport = node.tunnel_address
        h2 = self._h2_ports.get((str(w.spec.addresses[0]), port), False)
        return Endpoint(
            str(w.spec.addresses[0]), port, snap.workload_identity(w), host, nport, h2=h2
        )

    async def _timers(self) -> None:
        """The engine's clock work: outlier sweeps and readmissions, active health checks."""
        probes: set[asyncio.Task[None]] = set()
        try:
            while True:
                due = self.engine.next_timer()
                wait = 1.0 if due is None else max(0.01, min(1.0, due - time.monotonic()))
                await asyncio.sleep(wait)
                self.engine.tick()
                for probe in self.engine.due_probes():
                    t = asyncio.get_running_loop().create_task(self._probe(probe))
                    probes.add(t)
                    t.add_done_callback(probes.discard)
                for e in self.engine.take_events():
                    log.info("waypoint %s: %s", self.s.name, e)
                    self.metrics.events.labels(str(getattr(e, "kind", "event"))).inc()
        finally:
            for t in probes:
                t.cancel()
            await asyncio.gather(*probes, return_exceptions=True)

    async def _probe(self, probe: Probe) -> None:
        """One active health check; any failure is a failed probe (probes.py), so the
        endpoint is always reported and probed again at the next interval."""

        async def acquire() -> UpstreamConnection:
            ep = self.endpoint(probe.endpoint.workload, probe.endpoint.port)
            if ep is None:
                raise UpstreamError("connect-failure", f"no route to {probe.endpoint.address}")
            return await self.upstream.dial(ep, h2=True if probe.kind == "grpc" else None)

        result = await self.prober.run(acquire, probe)
        self.engine.report_probe(probe, result.ok)

    # ---- telemetry ---------------------------------------------------------------------

    def _log(self, x: Exchange, dst: Workload | None, flags: str) -> None:
        snap = self.snapshot
        c = x.caller
        span = x.span
        if span is not None:
            if x.status >= 500 or flags not in ("-",):
                span.error = flags if flags != "-" else f"HTTP {x.status}"
            span.end(**{"http.response.status_code": x.status, "weft.response_flags": flags})
            self.traces.record(span)
        elapsed_ms = (time.monotonic() - x.started) * 1000
        h2 = type(x.conn.codec) is Http2Connection
        # The label values follow from these (and the snapshot): look the metric
        # children up by them, not by 14 labels recomputed per request; and so do most of
        # the access log record's fields, rendered with them.
        if snap is not self._children_of:
            # Cached for one snapshot: `dst` is one of its Workloads, named by id() below,
            # and an id is only unique among objects alive together (a new controller's
            # revisions also start again from 1, so the revision cannot tell snapshots apart).
            self._children.clear()
            self._children_of = snap
        key = (
            c.client_ip,
            c.principal,
            c.service_ns,
            c.service,
            id(dst),
            h2,
            x.status,
            flags,
        )
        cached = self._children.get(key)
        if cached is None:
            if len(self._children) >= _CHILD_CACHE_MAX:
                self._children.clear()
            svc_fqdn = f"{c.service}.{c.service_ns}.svc.cluster.local"
            src = snap.workloads_by_ip.get(c.client_ip)
            labels = (
                "waypoint",
                workload_name(src),
                src.namespace if src else "unknown",
                c.principal or "unknown",
                workload_name(dst),
                dst.namespace if dst else "unknown",
                workload_version(dst),
                snap.workload_identity(dst) if dst else "unknown",
                svc_fqdn,
                c.service,
                c.service_ns,
                "HTTP/2" if h2 else "HTTP/1.1",
                str(x.status or 0),
                flags,
                "mutual_tls",
                canonical_service(src),
                canonical_revision(src),
                canonical_service(dst),
                canonical_revision(dst),
            )
            cached = self._children[key] = (
                self.metrics.requests.series_for(labels),
                # The access log record's fields from "waypoint" to "destination", and its
                # "status" and "flags".
                f'"waypoint":{quote(self.s.name)},"source":{quote(c.principal)},'
                f'"sourceIp":{quote(c.client_ip)},"destinationService":{quote(svc_fqdn)},'
                f'"destination":{quote(f"{dst.namespace}/{dst.name}" if dst else None)},',
                f'"status":{int(x.status)},"flags":{quote(flags)},',
            )
        series, who, outcome = cached
        series.record(elapsed_ms, x.bytes_in, x.bytes_out)
        if self.access.enabled:
            # The record's fixed fields from a template (a dict and the general encoder
            # cost four times as much on every request), those of the key cached above;
            # the annotations follow. quote_str, not quote: these are never None.
            ann = x.annotations
            extra = "," + members(ann) if ann else ""  # usually none: the trace id is fixed
            tid = f',"traceId":{quote_str(x.trace.trace_id)}' if x.trace is not None else ""
            self.access.write_json(
                f'{{"time":"{self.access.timestamp()}","kind":"request","reporter":"waypoint",'
                f'{who}"method":{quote_str(x.head.method)},"path":{quote_str(x.head.target)},'
                f'{outcome}"bytesIn":{int(x.bytes_in)},"bytesOut":{int(x.bytes_out)},'
                f'"durationMs":{float(round(elapsed_ms, 3))!r}{tid}{extra}}}',
                important=x.status >= 400 or x.status == 0 or flags != "-",
            )


class _EngineCollector:
    """The engine's plain-int counters, read at scrape time (no cost per request)."""

    def __init__(self, wp: Waypoint) -> None:
        self.wp = wp

    def collect(self) -> Any:
        from prometheus_client.core import CounterMetricFamily

        route = CounterMetricFamily(
            "weft_waypoint_route_decisions",
            "Route-stage decisions by outcome.",
            labels=["decision"],
        )
        for name in type(self.wp.engine.counters).__slots__:
            route.add_metric([name], getattr(self.wp.engine.counters, name))
        yield route
        backend = CounterMetricFamily(
            "weft_waypoint_backend_events",
            "What happened to each "
            "backend's tries: retries, budget exhaustion, overflow, "
            "ejections, fallbacks.",
            labels=["backend", "event"],
        )
        for b in self.wp.engine.backends():
            for name in type(b.counters).__slots__:
                backend.add_metric([b.name, name], getattr(b.counters, name))
        yield backend
        mirrors = CounterMetricFamily(
            "weft_waypoint_mirrors", "Mirror copies by outcome.", labels=["outcome"]
        )
        p = self.wp.proxy
        for k, v in (
            ("sent", p.mirrors_sent),
            ("failed", p.mirrors_failed),
            ("skipped", p.mirrors_skipped),
        ):
            mirrors.add_metric([k], v)
        yield mirrors

    def describe(self) -> list[Any]:
        return []


def _header_dict(h: Headers) -> dict[str, str]:
    return {k.decode("latin-1"): v.decode("latin-1") for k, v in h}


def _is_h2(app_protocol: str | None) -> bool:
    return (app_protocol or "").lower() in ("http2", "grpc", "kubernetes.io/h2c")


async def run(s: WaypointSettings) -> None:
    cache_running_loop(asyncio.get_running_loop())
    wp = Waypoint(s)
    await wp.start()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, wp.stop_requested.set)
    await wp.stop_requested.wait()
    await wp.drain()
    if wp.failure is not None:
        raise wp.failure


def main(s: WaypointSettings) -> None:
    import uvloop

    memtrim.one_arena()  # before any thread starts
    uvloop.run(run(s))
