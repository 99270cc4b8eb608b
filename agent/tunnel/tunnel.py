"""The node tunnel: outbound capture on :15001, HBONE inbound on :15008.

Outbound (a pod's connection, redirected here by the capture program):
  1. recover the original destination (eBPF map, keyed by the pod's address and port)
     and the source workload (by the pod's address; the node's reverse-path filter
     guarantees a pod cannot use another's);
  2. resolve the destination from config (service VIP, workload, or passthrough);
  3. check L4 authorization early (the destination node checks again: it decides);
  4. same node: connect the pod directly; other node: open a CONNECT stream on a pooled
     HBONE connection that presents the *source workload's* certificate and accepts only
     the *destination workload's* identity (URI SAN), then relay.

Inbound (HBONE from another node):
  1. TLS 1.3 with client certificates; the certificate we present is the destination
     workload's, chosen by SNI; the peer's chain must verify against the trust bundle;
  2. per CONNECT stream: the target must be a workload on this node with the identity we
     presented; L4 authorization on the peer's SPIFFE ID; then connect to the pod and
     answer 200 only once it is up (401 denied, 503 pod refused, 400 anything else).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import ssl
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from agent import keeper
from agent.accesslog import AccessLog
from agent.identity.tls import direct_io
from agent.policy.authz import Request, evaluate, principal_of, workload_policies
from agent.state import ConfigSnapshot
from agent.tunnel import h2 as hb
from agent.tunnel.handoff import Handoff, HandoffServer
from agent.tunnel.hbone import HboneConnection
from agent.tunnel.metrics import FlowLabels, TunnelMetrics, request_direction
from agent.tunnel.pool import ConnectionPool, PeerIdentityMismatch, PoolSettings
from agent.tunnel.resolve import Destination, Unreachable, resolve
from agent.tunnel.streams import PodSide, splice
from controller.ca.spiffeid import WorkloadId, parse_workload_id
from controller.model.workloads import WAYPOINT_LABEL, Workload

if TYPE_CHECKING:
    # Types only: the identity modules bring gRPC and protobuf (about 12 MB), which the
    # waypoint, importing this module for its helpers, does not need.
    from agent.identity.manager import WorkloadCert
    from agent.identity.node import TrustBundle

log = logging.getLogger("weft.tunnel")

FORWARDED = "forwarded"  # RFC 7239: carries the client pod's address to the far node


@dataclass(frozen=True)
class TunnelSettings:
    node: str
    node_ip: str  # outbound listener address, and our source address toward pods
    outbound_port: int = 15001
    inbound_port: int = 15008
    inbound_host: str = "0.0.0.0"
    pod_connect_timeout: float = 5.0  # seconds to reach a pod before answering 503
    handshake_timeout: float = 10.0  # seconds for an inbound TLS handshake (slowloris)
    drain_timeout: float = 20.0  # seconds streams get to finish on SIGTERM; the pod's
    # default terminationGracePeriodSeconds is 30, so 20 leaves time to close cleanly.
    mark: int = 0x57454654  # SO_MARK on the tunnel's own sockets ("WEFT"); never captured
    keeper: Path | None = None  # the socket keeper holding the listeners (agent/keeper.py)
    h2: hb.Settings = field(default_factory=hb.Settings)
    pool: PoolSettings = field(default_factory=PoolSettings)


class Identities(Protocol):
    trust: TrustBundle

    def get(self, namespace: str, service_account: str) -> WorkloadCert | None: ...

    async def wait_for(
        self, namespace: str, service_account: str, limit: float = 10.0
    ) -> WorkloadCert | None: ...

    def certs(self) -> list[WorkloadCert]: ...


class OriginalDestinations(Protocol):
    def original_destination(self, src_ip: str, src_port: int) -> tuple[str, int] | None: ...


def sni_for(ident: WorkloadId | str) -> str:
    """The TLS server name that asks a node for one of its workload identities."""
    w = ident if isinstance(ident, WorkloadId) else parse_workload_id(ident)
    if w is None:
        raise ValueError(f"{ident} is not a workload identity")
    return f"{w.service_account}.{w.namespace}.{w.trust_domain}"


@dataclass(eq=False)
class _Flow:
    """An admitted connection and what admitted it, so a new config can take it back."""

    kind: str  # "inbound" (an HBONE stream to a local pod) or "local" (a same-node relay)
    request: Request  # what authorization judged
    destination: str  # the destination pod's address
    port: int
    labels: FlowLabels
    pods: tuple[PodSide, ...]
    stream: Any = None  # the HBONE stream (inbound)
    peer_id: str | None = None  # the authenticated peer (inbound)
    peer_ip: str | None = None
    local_id: str | None = None  # the identity the stream was accepted as (inbound)


class _OutboundPod(PodSide):
    def __init__(self, tunnel: Tunnel) -> None:
        super().__init__()
        self.tunnel = tunnel

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.tunnel._accepted(self)


class Tunnel:
    def __init__(
        self,
        settings: TunnelSettings,
        *,
        config: Callable[[], ConfigSnapshot],
        identities: Identities,
        original: OriginalDestinations,
        metrics: TunnelMetrics | None = None,
        access: AccessLog | None = None,
        handoff: HandoffServer | None = None,
    ) -> None:
        self.s = settings
        self.handoff = handoff
        self.config = config
        self.identities = identities
        self.original = original
        self.metrics = metrics or TunnelMetrics()
        self.access = access or AccessLog(None)
        self.pool = ConnectionPool(settings.pool, settings.h2, mark=settings.mark)
        self._servers: list[asyncio.AbstractServer] = []
        self._inbound: set[HboneConnection] = set()
        self._local: set[PodSide] = set()
        self._flows: dict[int, _Flow] = {}  # by id() of the flow's first PodSide
        self._tasks: set[asyncio.Task[None]] = set()
        self._ctx_ids: dict[int, str] = {}
        self.draining = False

    # ---- lifecycle ---------------------------------------------------------------------

    async def listen(self) -> None:
        """Bind and listen, without accepting yet: connections the kernel gives these
        sockets wait in their backlog until start(). A restarting agent listens first,
        then tells its predecessor to let go (agent/restart.py)."""
        if self._servers:
            return
        loop = asyncio.get_running_loop()
        held = keeper.take(self.s.keeper) if self.s.keeper else {}
        # New listeners go to the keeper once this agent holds the node (keep_listeners).
        out = keeper.listener(
            self.s.keeper, held, "outbound", self.s.node_ip, self.s.outbound_port, keep_new=False
        )
        self._servers.append(
            await loop.create_server(
                lambda: _OutboundPod(self), sock=out, backlog=4096, start_serving=False
            )
        )
        inb = keeper.listener(
            self.s.keeper,
            held,
            "inbound",
            self.s.inbound_host,
            self.s.inbound_port,
            keep_new=False,
        )
        for s in held.values():  # names this agent does not use (any more)
            s.close()
        self._servers.append(
            await loop.create_server(
                self._inbound_protocol,
                sock=inb,
                ssl=self._server_context(),
                backlog=4096,
                ssl_handshake_timeout=self.s.handshake_timeout,
                start_serving=False,
            )
        )

    def keep_listeners(self) -> None:
        """Give the socket keeper this process's listeners: once this agent holds the node,
        and again now and then (a predecessor that let go had it drop what it held; a
        restarted keeper holds nothing). Never while draining: a superseded agent's
        listeners must close for good."""
        if not self.s.keeper or self.draining:
            return
        for name, srv in zip(("outbound", "inbound"), self._servers, strict=False):
            keeper.keep(self.s.keeper, name, srv.sockets[0])  # type: ignore[attr-defined]

    def outbound_listener(self) -> int:
        """The outbound listener's descriptor (the data path steers captured connects to
        it and to nothing else, bpf/weft.c weft_tunnel_lookup)."""
        return int(self._servers[0].sockets[0].fileno())  # type: ignore[attr-defined]

    async def start(self) -> None:
        await self.listen()
        for srv in self._servers:
            await srv.start_serving()
        self.pool.start()
        log.info(
            "tunnel on node %s: outbound %s:%d, inbound %s:%d",
            self.s.node,
            self.s.node_ip,
            self.s.outbound_port,
            self.s.inbound_host,
            self.s.inbound_port,
        )

    def ports(self) -> dict[str, int]:
        return {
            name: srv.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
            for name, srv in zip(("outbound", "inbound"), self._servers, strict=False)
        }

    def stop_accepting(self) -> None:
        """Close the listeners. Connections queued on them move to a successor's listener
        on the same port, if one listens (tcp_migrate_req); otherwise they are reset."""
        self.draining = True
        for srv in self._servers:
            srv.close()

    def _log_denied(self, labels: FlowLabels, target: str, decision: Any) -> None:
        """A connection L4 authorization refused: always in the access log (never sampled
        away or capped), as the waypoint's 403s are."""
        if self.access.enabled:
            self.access.write(
                {
                    "time": self.access.timestamp(),
                    "kind": "denied",
                    "reporter": labels.reporter,
                    "node": self.s.node,
                    "source": labels.source_principal,
                    "destination": labels.destination_principal,
                    "target": target,
                    "reason": decision.reason,
                    "policy": decision.policy,
                },
                important=True,
            )

    async def drain(self, deadline: float | None = None) -> None:
        """Stop accepting; let streams finish up to the deadline; then close the rest."""
        self.stop_accepting()
        for c in list(self._inbound):
            c.goaway()
        limit = self.s.drain_timeout if deadline is None else deadline
        end = time.monotonic() + limit
        log.info("draining: %d streams open, waiting up to %.0fs", self.open_streams(), limit)
        while self.open_streams() and time.monotonic() < end:  # noqa: ASYNC110 - a deadline poll
            await asyncio.sleep(0.05)
        left = self.open_streams()
        if left:
            log.warning("drain deadline: closing %d stream(s) still open", left)
        await self.close()

    async def close(self) -> None:
        for srv in self._servers:
            srv.close()
        for t in list(self._tasks):
            t.cancel()
        for c in list(self._inbound):
            c.abort_all()
        for p in list(self._local):
            p.abort()
        await self.pool.close()

    def open_streams(self) -> int:
        return (
            sum(c.open_streams() for c in self._inbound)
            + sum(c.open_streams() for c in self.pool.connections())
            + sum(1 for p in self._local if not p.closed)
        )

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        t = asyncio.ensure_future(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    # ---- revocation --------------------------------------------------------------------

    def revalidate(self, snap: ConfigSnapshot) -> int:
        """Judge every open connection again under a new config; close, at once and at
        both ends, the ones it no longer admits (a DENY applied, an ALLOW removed, the
        destination's identity changed or its Service now needs a waypoint). Returns how
        many were closed."""
        revoked = 0
        for key, flow in list(self._flows.items()):
            why = self._still_denied(snap, flow)
            if why is None:
                continue
            self._flows.pop(key, None)
            revoked += 1
            self.metrics.revoked(flow.kind, why[0])
            log.info(
                "revoked %s connection %s -> %s:%d: %s",
                flow.kind,
                flow.peer_id or flow.request.source_principal,
                flow.destination,
                flow.port,
                why[1],
            )
            if self.access.enabled:
                self.access.write(
                    {
                        "time": self.access.timestamp(),
                        "kind": "revoked",
                        "reporter": flow.labels.reporter,
                        "node": self.s.node,
                        "source": flow.labels.source_principal,
                        "destination": flow.labels.destination_principal,
                        "target": f"{flow.destination}:{flow.port}",
                        "reason": why[1],
                    },
                    important=True,
                )
            if flow.stream is not None:
                with contextlib.suppress(Exception):
                    flow.stream.reset()  # RST_STREAM: the peer's end closes too
            for p in flow.pods:
                p.abort()
        return revoked

    def _still_denied(self, snap: ConfigSnapshot, flow: _Flow) -> tuple[str, str] | None:
        """(reason code, explanation) when `flow` is no longer admitted, else None."""
        w = snap.workloads_by_ip.get(flow.destination)
        if w is None:
            return "destination_gone", "the destination workload is gone"
        if flow.kind == "inbound":
            if snap.workload_identity(w) != flow.local_id:
                return "identity_changed", "the destination's identity changed"
            needed = required_waypoints(snap, w, flow.port)
            if needed and not is_waypoint(snap, flow.peer_id, flow.peer_ip, needed):
                return "waypoint_required", "its Service now needs a waypoint"
        elif required_waypoints(snap, w, flow.port):
            return "waypoint_required", "its Service now needs a waypoint"
        decision = evaluate(workload_policies(snap.authorization, w), flow.request)
        if not decision.allowed:
            return "denied", f"{decision.reason}" + (
                f" by {decision.policy}" if decision.policy else ""
            )
        return None

    # ---- outbound ----------------------------------------------------------------------

    def _accepted(self, pod: _OutboundPod) -> None:
        assert pod.transport is not None
        peer = pod.transport.get_extra_info("peername")
        # Accepted before the listeners closed (even if draining now): served.
        orig = self.original.original_destination(peer[0], peer[1])
        snap = self.config()
        if orig is None:
            # Not redirected by our capture program (someone dialled :15001 directly).
            self.metrics.refused("outbound", "no_original_destination")
            log.warning(
                "outbound connection from %s:%d has no original destination; closing",
                peer[0],
                peer[1],
            )
            pod.abort()
            return
        src = snap.workloads_by_ip.get(peer[0])
        if src is None or src.spec.node != self.s.node:
            self.metrics.refused("outbound", "unknown_source")
            log.warning(
                "outbound connection from %s: not a workload of node %s; closing",
                peer[0],
                self.s.node,
            )
            pod.abort()
            return
        try:
            dst = resolve(snap, self.s.node, orig[0], orig[1])
        except Unreachable as e:
            self.metrics.refused("outbound", "unreachable")
            log.warning("%s/%s -> %s:%d: %s", src.namespace, src.name, orig[0], orig[1], e)
            pod.abort()
            return
        if dst.hbone is not None and self._hand_off(pod, snap, src, dst, peer[0], orig):
            return
        pod.pause_reading()  # nothing to forward to until the far end is up
        self._spawn(self._outbound(pod, snap, src, dst, peer[0]))

    def _hand_off(
        self,
        pod: PodSide,
        snap: ConfigSnapshot,
        src: Workload,
        dst: Destination,
        client_ip: str,
        orig: tuple[str, int],
    ) -> bool:
        """Give a connection to a Service's waypoint on this node straight to the waypoint
        process (handoff.py); False when there is no such instance or channel."""
        ho = self.handoff
        wp = dst.workload
        if ho is None or wp is None or wp.spec.node != self.s.node or dst.hbone is None:
            return False
        sock = pod.transport.get_extra_info("socket") if pod.transport is not None else None
        if sock is None or not ho.has(dst.hbone[0]):
            return False
        src_id = snap.workload_identity(src)
        if not ho.hand_off(dst.hbone[0], sock, Handoff(src_id, client_ip, f"{orig[0]}:{orig[1]}")):
            return False
        labels = FlowLabels.of(snap, src, wp, dst.service, reporter="source", mtls=True)
        self.metrics.handed_off(labels)
        if self.access.enabled:
            self.access.write(
                {
                    "time": self.access.timestamp(),
                    "kind": "handoff",
                    "reporter": "source",
                    "node": self.s.node,
                    "source": src_id,
                    "sourceWorkload": f"{src.namespace}/{src.name}",
                    "waypoint": f"{wp.namespace}/{wp.name}",
                    "destinationService": labels.destination_service,
                    "target": dst.authority,
                }
            )
        # The waypoint holds the connection now; closing our descriptor does not end it.
        pod.on_close = None
        assert pod.transport is not None
        pod.transport.abort()
        return True

    async def _outbound(
        self, pod: PodSide, snap: ConfigSnapshot, src: Workload, dst: Destination, client_ip: str
    ) -> None:
        src_id = snap.workload_identity(src)
        labels = FlowLabels.of(
            snap, src, dst.workload, dst.service, reporter="source", mtls=dst.meshed
        )
        if dst.meshed and dst.workload is not None and dst.hbone is None:
            decision = evaluate(
                workload_policies(snap.authorization, dst.workload),
                Request(principal_of(src_id), src.namespace, client_ip, dst.ip, dst.port),
            )
            if not decision.allowed:
                self.metrics.denied(labels)
                log.info(
                    "denied %s -> %s/%s:%d (%s%s); closing",
                    src_id,
                    dst.workload.namespace,
                    dst.workload.name,
                    dst.port,
                    decision.reason,
                    f" by {decision.policy}" if decision.policy else "",
                )
                self._log_denied(labels, f"{dst.ip}:{dst.port}", decision)
                pod.abort()
                return
        if dst.workload is not None and dst.hbone is None:
            needed = required_waypoints(snap, dst.workload, dst.port)
            if needed:
                # The pod was dialled by its address, around its Service's waypoint.
                self.metrics.refused("outbound", "waypoint_required")
                log.info(
                    "%s -> %s/%s:%d refused: reachable only through waypoint %s "
                    "(dial its Service instead)",
                    src_id,
                    dst.workload.namespace,
                    dst.workload.name,
                    dst.port,
                    ", ".join(f"{ns}/{n}" for ns, n in sorted(needed)),
                )
                pod.abort()
                return
        try:
            if not dst.meshed or dst.local:
                far = await self._connect_pod(dst.ip, dst.port)
                self._local.update((pod, far))
                splice(pod, far)
                pod.resume_reading()
                self.metrics.opened(labels)
                if dst.meshed and dst.workload is not None:
                    self._flows[id(pod)] = _Flow(
                        "local",
                        Request(principal_of(src_id), src.namespace, client_ip, dst.ip, dst.port),
                        dst.ip,
                        dst.port,
                        labels,
                        (pod, far),
                    )
                self._watch(labels, dst.authority, pod, far)
                return
            await self._via_hbone(pod, snap, src, src_id, dst, client_ip, labels)
        except (ConnectionError, OSError, TimeoutError, PeerIdentityMismatch) as e:
            self.metrics.refused("outbound", type(e).__name__)
            log.warning("%s -> %s: %s", src_id, dst.authority, e)
            pod.abort()

    async def _via_hbone(
        self,
        pod: PodSide,
        snap: ConfigSnapshot,
        src: Workload,
        src_id: str,
        dst: Destination,
        client_ip: str,
        labels: FlowLabels,
    ) -> None:
        assert dst.identity is not None
        cert = await self.identities.wait_for(src.namespace, src.spec.service_account)
        if cert is None:
            raise ConnectionError(f"no certificate for {src_id} yet (is the controller reachable?)")
        if dst.hbone is not None:
            host, port = dst.hbone  # a waypoint: HBONE straight to it
        else:
            assert dst.node is not None
            host, port = dst.node.tunnel_address

        for attempt in (1, 2):
            conn = await self.pool.get(
                (src_id, dst.identity, host, port),
                cert.context("client", self.identities.trust),
                sni_for(dst.identity),
            )
            stream, response = conn.open(dst.authority, [(FORWARDED, f"for={client_ip}")])
            try:
                resp = await asyncio.wait_for(response, self.s.pod_connect_timeout * 2)
                break
            except TimeoutError:
                conn.h2.reset(stream.sid, hb.Err.CANCEL)
                conn.forget(stream)
                raise
            except ConnectionRefusedError:
                # GOAWAY named a last stream before ours: the peer (a restarting agent or
                # waypoint) never processed it, so it is safe to open it again on a new
                # connection (RFC 9113 section 6.8), which reaches its successor.
                conn.forget(stream)
                if attempt == 2:
                    raise
        if resp.status != 200:
            conn.forget(stream)
            self.metrics.refused("outbound", f"status_{resp.status}")
            log.info("%s -> %s: destination node answered %d", src_id, dst.authority, resp.status)
            pod.abort()
            return
        stream.bind(pod)
        pod.resume_reading()
        self.metrics.opened(labels)
        self._watch(labels, dst.authority, pod)

    def _watch(
        self,
        labels: FlowLabels,
        target: str,
        pod: PodSide,
        *others: PodSide,
        extra: dict[str, Any] | None = None,
    ) -> None:
        fut = asyncio.get_running_loop().create_future()
        pod.on_close = fut
        started = time.monotonic()

        def done(_: object) -> None:
            sent, received = request_direction(labels.reporter, pod.flow.sent, pod.flow.received)
            self.metrics.closed(labels, sent=sent, received=received)
            if self.access.enabled:
                self.access.write(
                    {
                        "time": self.access.timestamp(),
                        "kind": "connection",
                        "reporter": labels.reporter,
                        "node": self.s.node,
                        "source": labels.source_principal,
                        "sourceWorkload": f"{labels.source_workload_namespace}/"
                        f"{labels.source_workload}",
                        "destination": labels.destination_principal,
                        "destinationWorkload": f"{labels.destination_workload_namespace}/"
                        f"{labels.destination_workload}",
                        "destinationService": labels.destination_service,
                        "target": target,
                        "security": labels.connection_security_policy,
                        "bytesSent": sent,
                        "bytesReceived": received,
                        "durationMs": round((time.monotonic() - started) * 1000, 3),
                        **(extra or {}),
                    }
                )
            for p in (pod, *others):
                self._local.discard(p)
            self._flows.pop(id(pod), None)

        fut.add_done_callback(done)

    async def _connect_pod(self, ip: str, port: int) -> PodSide:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, self.s.mark)
            if ":" not in ip:
                # From the node's address: the STRICT inbound program admits exactly that.
                sock.bind((self.s.node_ip, 0))
            await asyncio.wait_for(loop.sock_connect(sock, (ip, port)), self.s.pod_connect_timeout)
            _, pod = await loop.create_connection(PodSide, sock=sock)
        except BaseException:
            sock.close()
            raise
        return pod

    # ---- inbound -----------------------------------------------------------------------

    def _server_context(self) -> ssl.SSLContext:
        ctx = direct_io(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        # OpenSSL copies the verify mode into a connection when it is created, and the SNI
        # switch below replaces only certificate and trust store; so the listening context
        # itself must demand a client certificate.
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.set_alpn_protocols(["h2"])
        ctx.options |= ssl.OP_NO_TICKET
        if self.identities.trust.pem:
            ctx.load_verify_locations(cadata=self.identities.trust.pem.decode())

        def pick(sslobj: ssl.SSLObject, name: str | None, _: ssl.SSLContext) -> int | None:
            cert = self._cert_for_sni(name)
            if cert is None:
                self.metrics.refused("inbound", "unknown_sni")
                return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
            chosen = cert.context("server", self.identities.trust)
            self._ctx_ids[id(chosen)] = cert.spiffe_id
            sslobj.context = chosen
            return None

        ctx.sni_callback = pick
        return ctx

    def _cert_for_sni(self, name: str | None) -> WorkloadCert | None:
        if not name:
            return None
        for c in self.identities.certs():
            w = parse_workload_id(c.spiffe_id)
            if w is not None and sni_for(w) == name and c.valid():
                return c
        return None

    def _inbound_protocol(self) -> HboneConnection:
        conn = HboneConnection(
            client=False,
            settings=self.s.h2,
            on_request=self._request,
            on_lost=self._inbound.discard,
            label="inbound",
        )
        self._inbound.add(conn)
        return conn

    def _request(self, conn: HboneConnection, req: hb.StreamRequest) -> None:
        if conn.local_id is None and conn.transport is not None:
            sslobj = conn.transport.get_extra_info("ssl_object")
            conn.local_id = self._ctx_ids.get(id(sslobj.context)) if sslobj else None
        peer = parse_workload_id(conn.peer_id or "")
        snap = self.config()
        if peer is None or peer.trust_domain != snap.trust_domain:
            self.metrics.refused("inbound", "peer_not_a_workload")
            log.warning(
                "inbound stream from %s refused: not a workload identity of %s",
                conn.peer_id,
                snap.trust_domain,
            )
            conn.respond(req.stream_id, 401)
            return
        if req.method != "CONNECT":
            conn.respond(req.stream_id, 400)
            return
        target = parse_authority(req.authority)
        w = snap.workloads_by_ip.get(target[0]) if target else None
        if target is None or w is None or w.spec.node != self.s.node:
            self.metrics.refused("inbound", "not_local")
            log.warning(
                "inbound CONNECT %r from %s: not a workload on node %s",
                req.authority,
                conn.peer_id,
                self.s.node,
            )
            conn.respond(req.stream_id, 400)
            return
        dst_id = snap.workload_identity(w)
        if conn.local_id != dst_id:
            self.metrics.refused("inbound", "identity_mismatch")
            log.warning(
                "inbound CONNECT to %s (%s) on a connection for %s: refused",
                req.authority,
                dst_id,
                conn.local_id,
            )
            conn.respond(req.stream_id, 400)
            return
        asserted = forwarded_for(req.headers)
        peername = conn.transport.get_extra_info("peername") if conn.transport else None
        peer_ip = peername[0] if peername else None
        needed = required_waypoints(snap, w, target[1])
        if needed and not is_waypoint(snap, conn.peer_id, peer_ip, needed):
            self.metrics.refused("inbound", "waypoint_required")
            log.info(
                "inbound CONNECT %s from %s refused: %s/%s:%d is reachable only through "
                "waypoint %s (dial its Service instead)",
                req.authority,
                conn.peer_id,
                w.namespace,
                w.name,
                target[1],
                ", ".join(f"{ns}/{n}" for ns, n in sorted(needed)),
            )
            conn.respond(req.stream_id, 401)
            return
        client_ip, believed = caller_address(snap, conn.peer_id, peer_ip, asserted, w)
        if asserted is not None and not believed:
            self.metrics.refused("inbound", "forwarded_not_trusted")
            log.info(
                "inbound from %s asserts Forwarded for=%s, which it cannot vouch for; judged as %s",
                conn.peer_id,
                asserted,
                client_ip,
            )
        src = snap.workloads_by_ip.get(client_ip)
        labels = FlowLabels.of(
            snap, src, w, None, reporter="destination", mtls=True, source_principal=conn.peer_id
        )
        decision = evaluate(
            workload_policies(snap.authorization, w),
            Request(peer.principal, peer.namespace, client_ip, target[0], target[1]),
        )
        if not decision.allowed:
            self.metrics.denied(labels)
            log.info(
                "denied %s -> %s (%s/%s:%d): %s%s",
                conn.peer_id,
                dst_id,
                w.namespace,
                w.name,
                target[1],
                decision.reason,
                f" by {decision.policy}" if decision.policy else "",
            )
            self._log_denied(labels, f"{target[0]}:{target[1]}", decision)
            conn.respond(req.stream_id, 401)
            return
        stream = conn.accept_stream(req.stream_id)
        extra = {"peer": conn.peer_id, "clientIp": client_ip}
        if asserted is not None and not believed:
            extra["assertedClientIp"] = asserted
        flow = _Flow(
            "inbound",
            Request(peer.principal, peer.namespace, client_ip, target[0], target[1]),
            target[0],
            target[1],
            labels,
            (),
            stream,
            conn.peer_id,
            peer_ip,
            conn.local_id,
        )
        self._spawn(self._inbound_connect(conn, stream, target, labels, extra, flow))

    async def _inbound_connect(
        self,
        conn: HboneConnection,
        stream: object,
        target: tuple[str, int],
        labels: FlowLabels,
        extra: dict[str, Any] | None = None,
        flow: _Flow | None = None,
    ) -> None:
        from agent.tunnel.streams import Stream

        assert isinstance(stream, Stream)
        try:
            pod = await self._connect_pod(*target)
        except (OSError, TimeoutError) as e:
            self.metrics.refused("inbound", "pod_refused")
            log.info(
                "pod %s:%d refused the tunnel (%s): answering 503",
                target[0],
                target[1],
                e.strerror if isinstance(e, OSError) and e.strerror else type(e).__name__,
            )
            conn.respond(stream.sid, 503)
            return
        if stream.sid not in conn.streams:
            pod.abort()  # the client gave up meanwhile
            return
        conn.respond(stream.sid, 200)
        stream.bind(pod)
        self.metrics.opened(labels)
        if flow is not None:
            flow.pods = (pod,)
            self._flows[id(pod)] = flow
        self._watch(labels, f"{target[0]}:{target[1]}", pod, extra=extra)


def parse_authority(a: str) -> tuple[str, int] | None:
    host, _, port = a.rpartition(":")
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
        p = int(port)
    except ValueError:
        return None
    return (host, p) if 0 < p < 65536 else None


def caller_address(
    snap: ConfigSnapshot,
    peer_id: str | None,
    peer_ip: str | None,
    asserted: str | None,
    destination: Workload | None,
) -> tuple[str, bool]:
    """The caller's address to authorize and log an HBONE stream with, and whether the
    `Forwarded: for=` the stream carried (`asserted`) was believed.

    A peer may say who it speaks for only when the mesh can check it:
    - a node tunnel speaking for one of its pods: the asserted address is a workload with
      the peer's own identity, on the node the connection comes from (`peer_ip` is one of
      that node's addresses);
    - a waypoint: the peer is a waypoint instance (its address is `peer_ip`) that serves a
      Service `destination` belongs to (or, at a waypoint, `destination` is None).
    Anything else (a workload that got its own certificate and dialled HBONE itself, or a
    waypoint speaking for a Service it does not serve) is judged by the address it
    connects from, whatever it asserts."""
    fallback = peer_ip or "0.0.0.0"
    if asserted is None or peer_id is None:
        return fallback, False
    claimed = snap.workloads_by_ip.get(asserted)
    if claimed is not None and snap.workload_identity(claimed) == peer_id:
        node = snap.nodes.get(claimed.spec.node)
        if node is not None and peer_ip in {str(a) for a in node.spec.addresses}:
            return asserted, True
    via = snap.workloads_by_ip.get(peer_ip or "")
    name = via.labels.get(WAYPOINT_LABEL) if via is not None else None
    if via is not None and name and snap.workload_identity(via) == peer_id:
        if destination is None:
            return asserted, True
        serves = waypoint_reach(snap).get((via.namespace, name), frozenset())
        if destination.spec.addresses and str(destination.spec.addresses[0]) in serves:
            return asserted, True
    return fallback, False


_GUARDS: dict[int, tuple[ConfigSnapshot, dict[tuple[str, int], frozenset[tuple[str, str]]]]] = {}


def required_waypoints(
    snap: ConfigSnapshot, workload: Workload, port: int
) -> frozenset[tuple[str, str]]:
    """The waypoints (namespace, name) that must carry traffic to `workload` on `port`: a
    port of a Service that selects it and uses a waypoint is reachable only through that
    waypoint, whatever address the caller dialled (issue 14, waypoint-only reach)."""
    hit = _GUARDS.get(id(snap))
    if hit is None or hit[0] is not snap:
        guards: dict[tuple[str, int], set[tuple[str, str]]] = {}
        for (ns, name), svc in snap.services.items():
            if not svc.waypoint:
                continue
            for w in snap.endpoints.get((ns, name), ()):
                if not w.spec.addresses:
                    continue
                for sp in svc.spec.ports:
                    key = (str(w.spec.addresses[0]), sp.target())
                    guards.setdefault(key, set()).add((ns, svc.waypoint))
        _GUARDS.clear()
        hit = (snap, {k: frozenset(v) for k, v in guards.items()})
        _GUARDS[id(snap)] = hit
    if not workload.spec.addresses:
        return frozenset()
    return hit[1].get((str(workload.spec.addresses[0]), port), frozenset())


def is_waypoint(
    snap: ConfigSnapshot,
    peer_id: str | None,
    peer_ip: str | None,
    allowed: frozenset[tuple[str, str]],
) -> bool:
    """The peer is an instance of one of `allowed`: its identity, from its own address."""
    via = snap.workloads_by_ip.get(peer_ip or "")
    if via is None or snap.workload_identity(via) != peer_id:
        return False
    return (via.namespace, via.labels.get(WAYPOINT_LABEL, "")) in allowed


_REACH: dict[int, tuple[ConfigSnapshot, dict[tuple[str, str], frozenset[str]]]] = {}


def waypoint_reach(snap: ConfigSnapshot) -> dict[tuple[str, str], frozenset[str]]:
    """For each waypoint (namespace, name): the addresses of every workload it may send
    to on a caller's behalf: the endpoints of the Services that use it, and of the
    backends their HTTPRoutes, ModelRoutes and BackendPolicy fallbacks name. Computed once
    per config snapshot."""
    hit = _REACH.get(id(snap))
    if hit is not None and hit[0] is snap:
        return hit[1]
    from controller.model.ai import ModelRoute
    from controller.model.traffic import BackendPolicy

    def ips(ns: str, name: str) -> set[str]:
        return {
            str(w.spec.addresses[0]) for w in snap.endpoints.get((ns, name), ()) if w.spec.addresses
        }

    out: dict[tuple[str, str], set[str]] = {}
    model_routes = [r for r in snap.of_kind(ModelRoute.KIND) if isinstance(r, ModelRoute)]
    policies = [r for r in snap.of_kind(BackendPolicy.KIND) if isinstance(r, BackendPolicy)]
    for (ns, name), svc in snap.services.items():
        if not svc.waypoint:
            continue
        reach = out.setdefault((ns, svc.waypoint), set())
        backends = {(ns, name)}
        for route in snap.routes.get((ns, name), ()):
            for rule in route.spec.rules:
                for ref in rule.backend_refs or ():
                    backends.add((ref.namespace or route.namespace, ref.name))
        for mr in model_routes:
            if any(
                (t.namespace or mr.namespace, t.name) == (ns, name) for t in mr.spec.target_refs
            ):
                for mrule in mr.spec.rules:
                    for b in mrule.backend_refs:
                        backends.add((b.namespace or mr.namespace, b.name))
                    for f in mrule.fallback:
                        if f.backend_ref is not None:
                            ref_ns = f.backend_ref.namespace or mr.namespace
                            backends.add((ref_ns, f.backend_ref.name))
        for bp in policies:
            fb = bp.spec.fallback
            if (
                fb is not None
                and fb.backend_ref is not None
                and any((t[0], t[1]) in backends for t in bp.targets())
            ):
                backends.add((fb.backend_ref.namespace or bp.namespace, fb.backend_ref.name))
        for b_ns, b_name in backends:
            reach |= ips(b_ns, b_name)
    frozen = {k: frozenset(v) for k, v in out.items()}
    _REACH.clear()  # one snapshot at a time: the current one
    _REACH[id(snap)] = (snap, frozen)
    return frozen


def forwarded_for(headers: list[tuple[str, str]]) -> str | None:
    for k, v in headers:
        if k == FORWARDED:
            for raw in v.split(";"):
                part = raw.strip()
                if part.lower().startswith("for="):
                    ip = part[4:].strip('"').strip("[]")
                    with contextlib.suppress(ValueError):
                        return str(ipaddress.ip_address(ip))
    return None
