"""The node agent process: identity, config, data path, tunnel, and its endpoints.

Start-up order, and why (Agent.start; a restart is the same with a predecessor running,
agent/restart.py):
  1. tunnel listeners, not yet accepting: connects queue from here on, never refused;
  2. everything that can fail: the identity store (the certificates a previous process
     kept), the data path's build and preflight, the admin listeners;
  3. the listener registered for captured connects, then the running agent (if any)
     asked to let go;
  4. data path: it adopts whatever the previous agent left attached (pins and
     attachments never go away, so pods are never uncaptured or unenforced);
  5. config: the cached copy (if any), then the controller's stream; accepting starts,
     and readiness turns green once config and certificates are in.

Shutdown (SIGTERM, or a successor's request): readiness goes red, the data path is
released (*not* detached: the kernel keeps capturing and enforcing, and spliced
connections keep flowing), the listeners close (queued connects move to a successor's),
and the connections this process holds drain for up to drain_timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import subprocess
import time
from typing import Any

from prometheus_client import CollectorRegistry, Gauge

from agent import cgroups, keeper, memtrim, restart
from agent.accesslog import AccessLog
from agent.admin import AdminApi
from agent.aio import cache_running_loop
from agent.cgroups import own_cgroup
from agent.config.client import ConfigClient
from agent.discovery import CgroupResolver
from agent.flowmetrics import DatapathCollector, FlowExporter, FlowMetrics
from agent.httpserver import HttpServer
from agent.identity.manager import IdentityManager
from agent.identity.node import ControllerEndpoint, NodeCredential, TrustBundle
from agent.identity.store import IdentityStore
from agent.netns import call_in
from agent.policy.authz import Request, evaluate, principal_of, workload_policies
from agent.policy.peerauth import mtls_mode
from agent.settings import AgentSettings
from agent.state import ConfigSnapshot
from agent.tasks import TaskFailed, TaskOwner
from agent.tunnel.handoff import HandoffServer, socket_beside
from agent.tunnel.metrics import TunnelMetrics
from agent.tunnel.tunnel import Tunnel, TunnelSettings
from agent.workloadapi import WorkloadApi
from controller.errors import EnvironmentProblem
from controller.model.workloads import WAYPOINT_LABEL, Workload

log = logging.getLogger("weft.agent")

FASTPATH_ANNOTATION = "weft.dev/fastpath"


HANDOVER_WAIT = 30.0  # seconds a new agent waits for its predecessor to release the data path
KEEPER_REFRESH = 30.0  # seconds between giving the socket keeper our listeners again
# Trim the heap (agent/memtrim.py) once the resident set has grown this much since the
# last trim: a burst of connections or a bulk transfer leaves MBs of freed heap.
TRIM_GROWN = 1 << 20


class Agent:
    def __init__(self, s: AgentSettings) -> None:
        self.s = s
        self.registry = CollectorRegistry()
        self.trust = TrustBundle()
        host, port = AgentSettings.split(s.controller)
        bhost, bport = AgentSettings.split(s.bootstrap)
        self.node = NodeCredential(
            s.node,
            ControllerEndpoint(
                address=f"{host}:{port}",
                bootstrap_address=f"{bhost}:{bport}",
                server_name=s.controller_name,
                ca_bundle_file=s.ca_bundle,
                token_file=s.token_file,
                sa_token_file=s.sa_token_file,
            ),
            self.trust,
        )
        self.identities = IdentityManager(self.node, self.trust, trust_domain=s.trust_domain)
        self.snapshot = ConfigSnapshot.empty(s.trust_domain)
        self.config = ConfigClient(
            self.node,
            self.trust,
            self.apply,
            cache=s.state_dir / "config.json",
            trust_domain=s.trust_domain,
        )
        self.resolver = CgroupResolver(s.cgroup_mode)
        self.access = AccessLog.open(
            s.access_log,
            sample=s.access_log_sample,
            max_per_second=s.access_log_max_rate,
            max_mb=s.access_log_max_mb,
        )
        self.workload_api = WorkloadApi(self)
        # Connections to a waypoint on this node go to it directly (tunnel/handoff.py).
        self.handoff = (
            HandoffServer(socket_beside(s.workload_socket), self.workload_api.attest_waypoint)
            if s.workload_socket is not None
            else None
        )
        self.datapath: Any = None
        self.flows: FlowExporter | None = None
        self.tunnel: Tunnel | None = None
        self.http = HttpServer({})
        self.started = time.time()
        self.ready = False
        self.stopping = False
        self.tasks = TaskOwner(self._failed)
        self.failure: TaskFailed | None = None  # an essential task failed: stop, exit non-zero
        self._unresolved: set[str] = set()
        self.stop_requested = asyncio.Event()  # SIGTERM, or a successor asking (restart.py)
        self.superseded = False  # a successor asked: drain, then wait for SIGTERM
        self.released = False  # the data path handed back (pins stay) while draining
        self.handover: restart.HandoverListener | None = None
        self._metrics()

    # ---- metrics -----------------------------------------------------------------------

    def _metrics(self) -> None:
        r = self.registry
        self.tunnel_metrics = TunnelMetrics(r)
        self.flow_metrics = FlowMetrics(r)
        r.register(DatapathCollector(lambda: self.flows))
        self.m_revision = Gauge(
            "weft_agent_config_revision", "Config revision applied.", registry=r
        )
        self.m_nacks = Gauge(
            "weft_agent_config_nacks",
            "Config responses this agent rejected since it started.",
            registry=r,
        )
        self.m_cert_expiry = Gauge(
            "weft_agent_cert_expiry_seconds",
            "Seconds until a workload certificate expires.",
            ["identity"],
            registry=r,
        )
        self.m_pods = Gauge(
            "weft_agent_attached_pods", "Pods with eBPF programs attached.", registry=r
        )
        self.m_pool = Gauge(
            "weft_tunnel_pool_connections", "Pooled outbound HBONE connections.", registry=r
        )
        self.m_inbound = Gauge(
            "weft_tunnel_inbound_connections", "Inbound HBONE connections.", registry=r
        )
        self.m_streams = Gauge(
            "weft_tunnel_open_streams", "Streams and local relays open.", registry=r
        )

    def refresh_gauges(self) -> None:
        self.m_revision.set(self.snapshot.revision)
        self.m_nacks.set(self.config.nacks)
        now = time.time()
        for c in self.identities.certs():
            self.m_cert_expiry.labels(c.spiffe_id).set(c.not_after - now)
        if self.tunnel is not None:
            self.m_pool.set(len(self.tunnel.pool.connections()))
            self.m_inbound.set(len(self.tunnel._inbound))
            self.m_streams.set(self.tunnel.open_streams())
        if self.datapath is not None:
            self.m_pods.set(len(self.datapath.attached_pods()))

    # ---- config ------------------------------------------------------------------------

    def local_workloads(self, snap: ConfigSnapshot) -> list[Workload]:
        """This node's meshed workloads: captured, enforced, given certificates."""
        return [w for w in snap.local_workloads(self.s.node) if w.spec.mesh]

    def identity_holders(self, snap: ConfigSnapshot) -> list[Workload]:
        """Workloads this node holds certificates for: meshed ones, and waypoints (which
        speak HBONE themselves, so they are not captured, but need an identity)."""
        return [
            w
            for w in snap.local_workloads(self.s.node)
            if w.spec.mesh or WAYPOINT_LABEL in w.labels
        ]

    def apply(self, snap: ConfigSnapshot) -> None:
        """Make the node match a new config snapshot (called by the config client)."""
        self.snapshot = snap
        local = self.local_workloads(snap)
        if not self.stopping:
            with contextlib.suppress(RuntimeError):  # no running loop: cache load at start
                self.identities.want(
                    {(w.namespace, w.spec.service_account) for w in self.identity_holders(snap)}
                )
                self.tasks.start(self.workload_api.notify(), "notify-waypoints", essential=False)
        if self.datapath is not None and not self.released:
            self._reconcile_datapath(snap, local)
        if self.tunnel is not None:
            # Open connections the new config no longer admits are closed now (issue 14),
            # also those a draining agent still relays after handing the node over.
            self.tunnel.revalidate(snap)

    def _reconcile_datapath(self, snap: ConfigSnapshot, local: list[Workload]) -> None:
        from agent.datapath import PodAttachment

        pods = []
        unresolved = set()
        for w in local:
            cg = self.resolver.cgroup_of(w)
            if cg is None:
                unresolved.add(f"{w.namespace}/{w.name}")
                continue
            mode = mtls_mode(snap.peer_authentication, w, default_strict=self.s.default_strict)
            pods.append(
                PodAttachment(
                    cgroup=str(cg),
                    ip=str(w.spec.addresses[0]),
                    strict=mode.strict,
                    capture=True,
                    fastpath=w.metadata.annotations.get(FASTPATH_ANNOTATION, "true") != "false",
                    inbound_exception_ports=mode.plaintext_ports,
                    probe_ports=mode.probe_ports,
                )
            )
        if unresolved != self._unresolved and unresolved:
            log.info(
                "waiting for the cgroups of %s (pod not started yet?)",
                ", ".join(sorted(unresolved)),
            )
        self._unresolved = unresolved
        self.datapath.reconcile(pods)
        pairs = self.fastpath_pairs(snap, local)
        self.datapath.set_fastpath_pairs(pairs)
        self._revoke_spliced(pairs)

    def _revoke_spliced(self, allowed: set[tuple[str, str, int]]) -> None:
        """Close spliced (fast path) connections whose pair the new config no longer allows
        (issue 14, revocation): the agent is not in their path, so it destroys the client
        pod's socket (SOCK_DESTROY, as `ss -K` does, inside the pod's network namespace);
        the kernel sends the server a RST, so both ends close."""
        if self.datapath is None:
            return
        gone = [
            f
            for f in self.datapath.flows()
            if f.fastpath
            and not f.closed
            and f.direction == "outbound"
            and (f.local[0], f.remote[0], f.remote[1]) not in allowed
        ]
        if not gone:
            return
        by_cg = self.workloads_by_cgroup()
        for f in gone:
            w = by_cg.get(f.cgroup_id)
            cg = self.resolver.cgroup_of(w) if w is not None else None
            pids = cgroups.pids(cg) if cg is not None else []
            if not pids:
                continue
            self.tunnel_metrics.revoked("fastpath", "denied")
            log.info(
                "revoked spliced connection %s:%d -> %s:%d: no longer allowed",
                *f.local,
                *f.remote,
            )
            args = (f"/proc/{pids[0]}/ns/net", f.local, f.remote)
            try:
                asyncio.get_running_loop()
            except RuntimeError:  # no loop yet (the cached config at start)
                _destroy_socket(*args)
            else:
                destroy = asyncio.to_thread(_destroy_socket, *args)
                self.tasks.start(destroy, "revoke-spliced", essential=False)

    def workloads_by_cgroup(self) -> dict[int, Workload]:
        """This node's workloads by cgroup id (the inode number the eBPF maps key on)."""
        by_cg = {}
        for w in self.snapshot.local_workloads(self.s.node):
            cg = self.resolver.cgroup_of(w)
            if cg is not None:
                with contextlib.suppress(OSError):
                    by_cg[cg.stat().st_ino] = w
        return by_cg

    def fastpath_pairs(
        self, snap: ConfigSnapshot, local: list[Workload]
    ) -> set[tuple[str, str, int]]:
        """Same-node (src ip, dst ip, port) that L4 policy allows and no waypoint needs."""
        if not self.s.fastpath:
            return set()
        ports: dict[str, set[int]] = {}
        waypointed: set[str] = set()
        for w in local:
            ports[w.name + "." + w.namespace] = set(w.spec.ports)
        for (ns, name), svc in snap.services.items():
            for ep in snap.endpoints.get((ns, name), ()):
                key = ep.name + "." + ep.namespace
                if key in ports:
                    ports[key].update(p.target() for p in svc.spec.ports)
                    if svc.waypoint:
                        waypointed.add(key)
        out = set()
        for dst in local:
            dkey = dst.name + "." + dst.namespace
            if dkey in waypointed:
                continue  # L7 policy applies: the waypoint must see this traffic
            policies = workload_policies(snap.authorization, dst)
            for src in local:
                if src is dst:
                    continue
                for port in ports.get(dkey, ()):
                    d = evaluate(
                        policies,
                        Request(
                            principal_of(snap.workload_identity(src)),
                            src.namespace,
                            str(src.spec.addresses[0]),
                            str(dst.spec.addresses[0]),
                            port,
                        ),
                    )
                    if d.allowed:
                        out.add((str(src.spec.addresses[0]), str(dst.spec.addresses[0]), port))
        return out

    # ---- lifecycle ---------------------------------------------------------------------

    def original_destination(self, ip: str, port: int) -> tuple[str, int] | None:
        """Where a captured connection was going (the tunnel's OriginalDestinations)."""
        if self.datapath is None or self.released:
            return None  # draining: the data path belongs to the successor now
        o = self.datapath.original_destination(ip, port)
        return (o.ip, o.port) if o is not None else None

    def _prepare_datapath(self) -> None:
        """Build the data path's bytecode (cached, or compiled in a child process) and
        check the node; touches nothing a running agent owns."""
        if self.s.datapath == "none":
            return
        from agent.datapath import Datapath, DatapathSettings

        self.datapath = Datapath(
            DatapathSettings(
                tunnel_ip=self.s.node_ip,
                pin_root=self.s.pin_root,
                outbound_port=self.s.outbound_port,
                inbound_port=self.s.inbound_port,
                socket_mark=self.s.socket_mark,
                fastpath=self.s.fastpath,
            )
        )
        self.datapath.prepare()

    def _start_datapath(self, lock_wait: float = 0.0) -> None:
        if self.s.datapath == "none":
            log.warning(
                "data path disabled (datapath=none): pods are neither captured nor "
                "STRICT-enforced on node %s; only the tunnel listeners run",
                self.s.node,
            )
            return
        if self.datapath is None:
            self._prepare_datapath()
        # Adopts a previous agent's attachments (after it released them, on a handover).
        report = self.datapath.start(lock_wait=lock_wait)
        # The tunnel's own cgroup: SO_ORIGINAL_DST for its sockets, and its SYNs to local
        # pods recorded, so STRICT pods admit the tunnel and not any process that sends
        # from the node's address (bpf/weft.c, weft_tunnel_egress).
        own = own_cgroup()
        if own is not None:
            self.datapath.attach_tunnel(own)
        else:
            log.warning(
                "the agent's own cgroup is unknown: STRICT pods on node %s admit any process "
                "that connects from the node's address, not only the tunnel",
                self.s.node,
            )
        self.flows = FlowExporter(
            self.datapath,
            self.flow_metrics,
            snapshot=lambda: self.snapshot,
            owners=self.workloads_by_cgroup,
            node_ips=lambda: (self.s.node_ip,),
            interval=self.s.flow_export_interval,
        )
        log.info(
            "data path: build %s (%s, %.1fs), %d pod(s) adopted",
            report.build[:12],
            "compiled" if report.compiled else "cached",
            report.compile_seconds,
            report.adopted_pods,
        )

    async def start(self) -> None:
        """Start up, taking the node over from a running agent process if there is one
        (agent/restart.py): listen beside it, tell it to let go, adopt what it held."""
        s = self.s
        restart.enable_request_migration()
        self.tunnel = Tunnel(
            TunnelSettings(
                node=s.node,
                node_ip=s.node_ip,
                outbound_port=s.outbound_port,
                inbound_port=s.inbound_port,
                drain_timeout=s.drain_timeout,
                mark=s.socket_mark,
                keeper=s.keeper_socket,
            ),
            config=lambda: self.snapshot,
            identities=self.identities,
            original=self,
            metrics=self.tunnel_metrics,
            access=self.access,
            handoff=self.handoff,
        )
        await self.tunnel.listen()  # connects from here on queue, never refused
        # Everything that can fail comes before asking a running agent to let go: a new
        # agent that cannot start must leave the node to the old one.
        store = IdentityStore.open(s.identity_dir)
        self.node.restore(store)
        self.identities.restore(store)
        self._prepare_datapath()
        await self._endpoints()
        if s.datapath != "none":
            # Captured connects reach only this listener (and its predecessor's, in the same
            # reuseport group) from now on, even after the predecessor closes its own.
            from agent.datapath.loader import register_tunnel_listener

            register_tunnel_listener(s.pin_root, self.tunnel.outbound_listener())
        handover = s.state_dir / restart.HANDOVER_SOCKET
        took_over = restart.ask_predecessor(handover)
        if took_over:
            log.info("taking node %s over from the running agent process", s.node)
        self._start_datapath(lock_wait=HANDOVER_WAIT if took_over else 0.0)
        # This agent holds the node now (a predecessor let go: it released the data path
        # lock after having the keeper drop what it held): the keeper holds our listeners.
        self.tunnel.keep_listeners()
        if self.datapath is not None:
            self.datapath.set_tunnel_listener(self.tunnel.outbound_listener())
        if await self.config.load_cache():
            self.apply(self.config.snapshot)
        self.handover = restart.HandoverListener(handover, self._superseded)
        self.handover.start()
        if self.handoff is not None:
            self.handoff.start()
        await self.tunnel.start()
        for name, coro in (
            ("node-credential", self.node.run()),
            ("config", self.config.run()),
            ("reconcile", self._reconcile_loop()),
            ("readiness", self._readiness_loop()),
        ):
            self.tasks.start(coro, name)
        if self.flows is not None:
            self.tasks.start(self.flows.run(), "flow-export")
        self.tasks.start(memtrim.run(grown=TRIM_GROWN), "memory-trim", essential=False)

    async def _reconcile_loop(self) -> None:
        kept = time.monotonic()
        while True:
            await asyncio.sleep(self.s.reconcile_interval)
            if self.datapath is not None and self.tunnel is not None:
                self._keep_listener_registered()
            if self.tunnel is not None and time.monotonic() - kept >= KEEPER_REFRESH:
                # A restarted keeper holds nothing: give it our listeners again (in a
                # thread: a wedged keeper must not stall the loop).
                kept = time.monotonic()
                await asyncio.to_thread(self.tunnel.keep_listeners)
            if self.datapath is not None and self._unresolved:
                self._reconcile_datapath(self.snapshot, self.local_workloads(self.snapshot))
            self.refresh_gauges()

    async def _readiness_loop(self) -> None:
        while not self.ready:
            await asyncio.sleep(0.1)
            local = self.identity_holders(self.snapshot)
            certs = all(self.identities.get(w.namespace, w.spec.service_account) for w in local)

            # Config (live or the cached copy) and certificates are what serving needs; the
            # controller itself is not (it may be away while a restarted agent serves).
            if self.snapshot.revision > 0 and certs:
                self.ready = True
                log.info(
                    "agent on node %s ready: config revision %d, %d local workload(s)",
                    self.s.node,
                    self.snapshot.revision,
                    len(local),
                )
                # What start-up freed (source compiled at import, config validators built,
                # the first snapshot decoded, keys made) goes back to the kernel now rather
                # than at the first periodic trim, up to 30 s later.
                await asyncio.to_thread(memtrim.trim)

    def _keep_listener_registered(self) -> None:
        """A successor that registered its listener and then failed (before asking this
        agent to let go) leaves none registered, and every captured connect refused: put
        this agent's own back."""
        assert self.datapath is not None and self.tunnel is not None
        if not self.datapath.tunnel_listener_registered():
            log.warning("no tunnel listener registered (a failed successor?); registering ours")
            self.datapath.set_tunnel_listener(self.tunnel.outbound_listener())

    def _failed(self, failure: TaskFailed) -> None:
        """An essential task failed (TaskOwner logged its traceback): no longer ready,
        and stop as on SIGTERM; `run` then raises the failure."""
        if self.failure is None:
            self.failure = failure
        self.ready = False
        self.stop_requested.set()

    def _superseded(self) -> None:
        self.superseded = True
        self.stop_requested.set()

    async def stop(self) -> None:
        """Let go of the node, then drain. First what a successor takes over: the control
        loops stop touching the data path, which is released (pins and attachments stay:
        the kernel keeps capturing and enforcing), and the listeners close (connections
        queued on them move to a successor's, agent/restart.py). Then the connections this
        process holds are relayed until they end or the drain deadline passes."""
        self.stopping = True
        self.ready = False
        if self.handover is not None:
            self.handover.close()
        # The successor's admin, metrics and readiness listeners answer from now on.
        self.http.close()
        if self.tunnel is not None:
            self.tunnel.stop_accepting()
            if self.superseded and self.s.keeper_socket is not None:
                # Our listeners close for good (queued connects move to the successor's)
                # unless the successor shares them; it gives the keeper its own again.
                # On a plain SIGTERM the keeper keeps them: connects made until the next
                # agent process starts wait in their backlog.
                keeper.drop(self.s.keeper_socket)
            # Connections accepted before the listeners closed get their original
            # destination (data path maps) before those are released.
            await asyncio.sleep(0)
        # The config stream keeps running through the drain: a DENY that lands meanwhile
        # still closes the connections this process relays (apply -> revalidate).
        await self.tasks.cancel(keep={"config"})
        if self.datapath is not None:
            self.released = True
            self.datapath.stop()
        if self.tunnel is not None:
            await self.tunnel.drain(self.s.drain_timeout)
        await self.tasks.cancel()
        if self.handoff is not None:
            self.handoff.close()
        await self.config.flush()  # the newest config, for a restart without the controller
        await self.identities.close()
        await self.node.close()
        self.access.close()
        log.info("agent stopped")

    # ---- endpoints ---------------------------------------------------------------------

    async def _endpoints(self) -> None:
        api = AdminApi(self)
        admin, metrics, ready = api.admin_routes(), api.metrics_routes(), api.ready_routes()
        s = self.s
        for listen, routes in (
            (s.admin_listen, admin),
            (s.metrics_listen, metrics),
            (s.ready_listen, ready),
        ):
            host, port = AgentSettings.split(listen)
            if port:
                srv = HttpServer(routes)
                await srv.listen_tcp(host, port)
                self.http.servers += srv.servers
        if s.admin_socket is not None:
            srv = HttpServer({**admin, **metrics, **ready})
            await srv.listen_unix(s.admin_socket)
            self.http.servers += srv.servers
        if s.workload_socket is not None:
            # Any local process may connect (mode 0666): the answer depends on who it is,
            # which the agent attests from the caller's cgroup, not from file permissions.
            srv = HttpServer(self.workload_api.routes())
            await srv.listen_unix(s.workload_socket, mode=0o666)
            self.http.servers += srv.servers


def _destroy_socket(netns: str, local: tuple[str, int], remote: tuple[str, int]) -> None:
    """SOCK_DESTROY the TCP socket local -> remote inside `netns` (iproute2's `ss -K`)."""
    cmd = ["ss", "-K", "-tn", "src", f"{local[0]}:{local[1]}", "dst", f"{remote[0]}:{remote[1]}"]
    try:
        call_in(netns, subprocess.run, cmd, capture_output=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("could not close %s:%d -> %s:%d: %s", *local, *remote, e)


async def run(settings: AgentSettings) -> None:
    cache_running_loop(asyncio.get_running_loop())
    agent = Agent(settings)
    try:
        await agent.start()
    except EnvironmentProblem:
        await agent.stop()
        raise
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, agent.stop_requested.set)
    await agent.stop_requested.wait()
    log.info("stopping: draining the tunnel for up to %.0fs", settings.drain_timeout)
    signalled = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, signalled.set)
    if not agent.superseded:
        signalled.set()
    await agent.stop()
    if not signalled.is_set():
        # Handed over: exiting now would have a DaemonSet's kubelet restart this (old)
        # container, which would take the node back from its successor. Wait, not
        # ready, until the pod is deleted.
        log.info("handed over to a successor; waiting for SIGTERM")
        await signalled.wait()
    if agent.failure is not None:
        raise agent.failure  # exit non-zero: the kubelet restarts a pod that crashed


def main(settings: AgentSettings) -> None:
    # uvloop: libuv's event loop is measurably lighter per event than asyncio's default,
    # and the tunnel is an event loop doing little else.
    import uvloop

    memtrim.one_arena()  # before any thread starts
    uvloop.run(run(settings))
