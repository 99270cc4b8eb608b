"""The controller process: CA, config store and its sources, and the gRPC services.

Three listeners, kept apart on purpose:
- bootstrap (TLS, server-authenticated): a node proves itself with a token and gets a
  node certificate; nothing else is served there;
- main (mutual TLS, node certificates): CSR signing and the config stream;
- admin (a Unix socket): the operator API behind `weft policy ...`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import yaml
from cryptography import x509
from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from controller.api import keepalive
from controller.api.gen import (
    admin_pb2,
    admin_pb2_grpc,
    config_pb2,
    config_pb2_grpc,
    identity_pb2,
    identity_pb2_grpc,
)
from controller.ca.authority import (
    CertificateAuthority,
    CertificateRequestRejected,
    FileCAStore,
)
from controller.ca.spiffe import key_pem, make_csr, new_key, parse_node_id, spiffe_id_of
from controller.model.base import ResourceKey, kind_named
from controller.model.loader import duplicates, parse_text
from controller.model.problems import Problem
from controller.model.status import conditions
from controller.model.workloads import Workload
from controller.settings import ControllerSettings
from controller.sources.files import APPLIED_DIR, FileSource
from controller.store import ConfigStore, Entry
from controller.tokens import TokenStore

# The largest admin request (an apply): the CLI checks files against APPLY_LIMITS first,
# so a user sees which file is too large instead of a gRPC size error.
ADMIN_MAX_MESSAGE = 20 * 1024 * 1024
log = logging.getLogger("weft.controller")

SERVER_CERT_TTL = 24 * 3600


class ControllerMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.leader = Gauge(
            "weft_controller_leader",
            "1 while this replica leads (writes status, judges canaries); always 1 without "
            "leader election.",
            registry=registry,
        )
        self.leader.set(1)
        self.revision = Gauge(
            "weft_controller_config_revision",
            "Current revision of the controller's config store.",
            registry=registry,
        )
        self.agents = Gauge(
            "weft_controller_connected_agents",
            "Agents with an open config stream.",
            registry=registry,
        )
        self.acks = Counter(
            "weft_controller_config_acks_total",
            "Config responses acknowledged by agents.",
            registry=registry,
        )
        self.nacks = Counter(
            "weft_controller_config_nacks_total",
            "Config responses rejected by agents, by node.",
            ["node"],
            registry=registry,
        )
        self.certs = Counter(
            "weft_controller_certs_issued_total",
            "Certificates signed, by kind (workload, node, server).",
            ["kind"],
            registry=registry,
        )
        self.refused = Counter(
            "weft_controller_requests_refused_total",
            "Refused identity requests, by reason.",
            ["reason"],
            registry=registry,
        )
        self.rejected = Gauge(
            "weft_controller_rejected_resources",
            "Resources whose latest version failed validation.",
            registry=registry,
        )


@dataclass
class NodeSession:
    node: str
    peer: str
    agent_version: str = ""
    connected: bool = True
    acked_revision: int = 0
    sent_revision: int = 0
    last_nack: str = ""
    last_seen: float = field(default_factory=time.time)


def _problem_info(p: Problem) -> admin_pb2.ProblemInfo:
    return admin_pb2.ProblemInfo(
        file=p.file or "",
        line=p.line or 0,
        resource=p.resource or "",
        field=p.field or "",
        reason=p.reason,
    )


def _peer_certificate(context: grpc.aio.ServicerContext) -> x509.Certificate | None:
    auth = context.auth_context() or {}
    pems = auth.get("x509_pem_cert") or []
    return x509.load_pem_x509_certificate(pems[0]) if pems else None


class Controller:
    def __init__(self, settings: ControllerSettings) -> None:
        self.settings = settings
        self.registry = CollectorRegistry()
        self.metrics = ControllerMetrics(self.registry)
        self.store = ConfigStore()
        settings.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        # Kubernetes: the API client, the Secret CA store, the Kubernetes source and
        # service-account token bootstrap. Files (the default) need none of them.
        kube: Any = None
        if settings.config_source == "kubernetes" or settings.ca_store == "kubernetes":
            from controller.sources.kubernetes import KubeRest

            kube = KubeRest.connect(str(settings.kubeconfig) if settings.kubeconfig else None)
        if settings.ca_store == "kubernetes":
            from controller.ca.kubernetes_store import SecretCAStore

            ca_store: Any = SecretCAStore(kube, settings.ca_secret, settings.ca_bundle_configmap)
        else:
            ca_store = FileCAStore(settings.state_dir / "ca.json")
        self.ca = CertificateAuthority.load_or_create(
            ca_store,
            settings.trust_domain,
            workload_ttl=settings.workload_cert_ttl,
        )
        self.tokens = TokenStore(settings.state_dir / "node-tokens.json")
        self.sa_auth: Any = None
        files = FileSource(settings.config_dir, self.store, interval=settings.poll_interval)
        if settings.config_source == "kubernetes":
            from controller.auth.kubernetes import ServiceAccountAuthenticator
            from controller.sources.kubernetes import KubernetesSource

            self.source: Any = KubernetesSource(kube, self.store, files=files)
            self.sa_auth = ServiceAccountAuthenticator(
                kube,
                audience=settings.sa_audience,
                agent_service_account=settings.agent_service_account,
            )
        else:
            self.source = files
        self.sessions: dict[str, NodeSession] = {}
        self._servers: list[grpc.aio.Server] = []
        self._tasks: list[asyncio.Task[Any]] = []
        self._changed: asyncio.Condition | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server_key = new_key()
        self._server_cert: bytes = b""
        self._server_cert_renew_at = 0.0
        self._served_bundle: bytes = b""
        self.generation = 0  # bumped on every store change and root rotation
        # Leader's work (status write-back, canary judging) happens on this replica only
        # while it leads; without leader election the one replica always does.
        self.leading = not settings.leader_elect
        self._workloads_rev = -1
        self._identities_by_node: dict[str, set[tuple[str, str]]] = {}
        self.store.subscribe(self._on_change)

    # ---- lifecycle ---------------------------------------------------------------------

    def trust_bundle_path(self) -> Path:
        return self.settings.state_dir / "trust-bundle.pem"

    def _write_bundle(self) -> None:
        # World-readable on purpose: the bundle is public, and agents read it to trust us.
        path = self.trust_bundle_path()
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(self.ca.bundle_pem())
        tmp.chmod(0o644)
        tmp.replace(path)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._changed = asyncio.Condition()
        self._write_bundle()
        await asyncio.to_thread(self.source.scan)
        self._refresh_metrics()
        main = grpc.aio.server(options=keepalive.SERVER_OPTIONS)
        identity_pb2_grpc.add_IdentityServicer_to_server(IdentityService(self), main)
        config_pb2_grpc.add_ConfigDiscoveryServicer_to_server(ConfigService(self), main)
        self.ports: dict[str, int] = {}
        self.ports["main"] = main.add_secure_port(
            self.settings.listen, self._credentials(require_client=True)
        )
        boot = grpc.aio.server()
        identity_pb2_grpc.add_NodeBootstrapServicer_to_server(BootstrapService(self), boot)
        self.ports["bootstrap"] = boot.add_secure_port(
            self.settings.bootstrap_listen, self._credentials(require_client=False)
        )
        admin = grpc.aio.server(options=[("grpc.max_receive_message_length", ADMIN_MAX_MESSAGE)])
        admin_pb2_grpc.add_AdminServicer_to_server(AdminService(self), admin)
        sock = self.settings.admin_socket
        sock.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            sock.unlink()
        admin.add_insecure_port(f"unix:{sock}")
        for s in (main, boot, admin):
            await s.start()
            self._servers.append(s)
        sock.chmod(0o600)
        host, _, port = self.settings.metrics_listen.rpartition(":")
        if port and port != "0":
            start_http_server(int(port), addr=host or "0.0.0.0", registry=self.registry)
        self._tasks.append(asyncio.create_task(self.source.run(), name="file-source"))
        if self.settings.config_source == "kubernetes":
            self._tasks.append(asyncio.create_task(self._write_status(), name="status"))
            if self.settings.leader_elect:
                self._tasks.append(asyncio.create_task(self._elect(), name="leader"))
        from controller.rollouts import Prometheus, RolloutController

        url = self.settings.prometheus_url
        in_cluster = self.settings.config_source == "kubernetes"

        def write_rollout(ns: str, name: str, state: dict[str, Any]) -> None:
            self.source.api.request(
                "PATCH",
                f"/apis/weft.dev/v1alpha1/namespaces/{ns}/rollouts/{name}/status",
                body={"status": {"rollout": state}},
            )

        self.rollouts = RolloutController(
            self.store,
            Prometheus(url) if url else None,
            # In a cluster the state lives in each Rollout's status, shared by the replicas.
            state_file=None if in_cluster else self.settings.state_dir / "rollouts.json",
            leading=lambda: self.leading,
            write_status=write_rollout if in_cluster else None,
        )
        self._tasks.append(asyncio.create_task(self.rollouts.run(), name="rollouts"))
        log.info(
            "controller up: agents on %s, bootstrap on %s, admin on %s, revision %d",
            self.settings.listen,
            self.settings.bootstrap_listen,
            sock,
            self.store.revision,
        )

    async def _write_status(self) -> None:
        """Conditions back to the Kubernetes objects (controller/statuswriter.py), at most
        every STATUS_EVERY seconds, on a thread (the calls block)."""
        from controller.statuswriter import StatusWriter

        writer = StatusWriter(self.source.api, self.store, self.source.kinds)
        while True:
            await asyncio.sleep(STATUS_EVERY)
            if not self.leading:
                writer.revision = -1  # a new leader writes everything once
                continue
            try:
                await asyncio.to_thread(writer.sync)
            except Exception:  # a failed round is logged; the next one tries again
                log.exception("writing resource status failed")

    async def _elect(self) -> None:
        import os
        import socket

        from controller.leader import LeaseElector

        ns, _, name = self.settings.lease.partition("/")
        identity = self.settings.identity or os.environ.get("POD_NAME") or socket.gethostname()
        elector = LeaseElector(self.source.api, ns, name, identity)

        self.metrics.leader.set(0)

        def changed(leading: bool) -> None:
            self.leading = leading
            self.metrics.leader.set(1 if leading else 0)

        await elector.run(changed)

    async def stop(self, grace: float = 5.0) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        await asyncio.gather(*(s.stop(grace) for s in self._servers))
        with contextlib.suppress(FileNotFoundError):
            self.settings.admin_socket.unlink()
        log.info("controller stopped")

    # ---- TLS ---------------------------------------------------------------------------

    def _issue_server_cert(self) -> None:
        issued = self.ca.sign_server(
            make_csr(self._server_key, self.settings.server_id),
            self.settings.server_id,
            self.settings.server_names,
            self.settings.server_ips,
            SERVER_CERT_TTL,
        )
        self.metrics.certs.labels("server").inc()
        self._server_cert = issued.chain_pem
        self._server_cert_renew_at = time.time() + SERVER_CERT_TTL / 2
        self._served_bundle = self.ca.bundle_pem()

    def _cert_config(self) -> Any:
        return grpc.ssl_server_certificate_configuration(
            [(key_pem(self._server_key), self._server_cert)], root_certificates=self._served_bundle
        )

    def _credentials(self, *, require_client: bool) -> grpc.ServerCredentials:
        if not self._server_cert:
            self._issue_server_cert()

        def fetch() -> Any:
            # Called by gRPC as connections arrive: renew at half-life, and pick up a root
            # rotation so nodes with certificates from the new root are accepted.
            if time.time() >= self._server_cert_renew_at or (
                self.ca.bundle_pem() != self._served_bundle
            ):
                self._issue_server_cert()
                return self._cert_config()
            return None

        return grpc.dynamic_ssl_server_credentials(
            self._cert_config(), fetch, require_client_authentication=require_client
        )

    # ---- config changes ----------------------------------------------------------------

    def _on_change(self, revision: int) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._notify()))

    async def _notify(self) -> None:
        assert self._changed is not None
        self._refresh_metrics()
        async with self._changed:
            self.generation += 1
            self._changed.notify_all()

    async def wait_change(self, seen: int, max_wait: float | None = None) -> None:
        """Wait until something changed after generation `seen` (or the timeout)."""
        assert self._changed is not None
        async with self._changed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._changed.wait_for(lambda: self.generation != seen), max_wait
                )

    def _refresh_metrics(self) -> None:
        self.metrics.revision.set(self.store.revision)
        self.metrics.rejected.set(len(self.store.rejections()))

    def identities_on(self, node: str) -> set[tuple[str, str]]:
        """(namespace, service account) of every workload scheduled on `node`."""
        if self._workloads_rev != self.store.revision:
            index: dict[str, set[tuple[str, str]]] = {}
            for w in self.store.resources("Workload"):
                assert isinstance(w, Workload)
                index.setdefault(w.spec.node, set()).add((w.namespace, w.spec.service_account))
            self._identities_by_node = index
            self._workloads_rev = self.store.revision
        return self._identities_by_node.get(node, set())

    # ---- node authentication -----------------------------------------------------------

    def node_of(self, context: grpc.aio.ServicerContext) -> str:
        cert = _peer_certificate(context)
        uri = spiffe_id_of(cert) if cert else None
        parsed = parse_node_id(uri) if uri else None
        if parsed is None or parsed[0] != self.settings.trust_domain:
            self.metrics.refused.labels("not_a_node").inc()
            log.warning(
                "refused %s: peer %s is not a node of %s",
                context.peer(),
                uri,
                self.settings.trust_domain,
            )
            raise _Abort(
                grpc.StatusCode.UNAUTHENTICATED,
                f"caller {uri or 'without a SPIFFE ID'} is not a weft node identity",
            )
        return parsed[1]


class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


async def _abort(context: grpc.aio.ServicerContext, e: _Abort) -> None:
    await context.abort(e.code, e.message)


class BootstrapService(identity_pb2_grpc.NodeBootstrapServicer):
    def __init__(self, c: Controller) -> None:
        self.c = c

    async def Bootstrap(
        self, request: identity_pb2.BootstrapRequest, context: grpc.aio.ServicerContext
    ) -> identity_pb2.BootstrapResponse:
        c = self.c
        which = request.WhichOneof("credential")
        if which == "token":
            ok = await asyncio.to_thread(c.tokens.verify, request.token, request.node)
        elif which == "service_account_jwt" and c.sa_auth is not None:
            # Kubernetes: a TokenReview decides (controller/auth/kubernetes.py).
            ok = await asyncio.to_thread(
                c.sa_auth.verify, request.service_account_jwt, request.node
            )
        else:
            ok = False  # a JWT without the Kubernetes source, or no credential at all
        if not ok:
            c.metrics.refused.labels("bad_bootstrap_credential").inc()
            log.warning(
                "refused bootstrap of node %r from %s: %s credential not valid for that node",
                request.node,
                context.peer(),
                which or "no",
            )
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                f"bootstrap credential is not valid for node {request.node!r}",
            )
        try:
            issued = c.ca.sign_node(request.csr_pem, request.node)
        except CertificateRequestRejected as e:
            c.metrics.refused.labels("bad_csr").inc()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        c.metrics.certs.labels("node").inc()
        log.info("bootstrapped node %s (%s)", request.node, context.peer())
        return identity_pb2.BootstrapResponse(
            certificate_chain_pem=issued.chain_pem,
            trust_bundle_pem=c.ca.bundle_pem(),
            not_after_unix=int(issued.not_after),
            spiffe_id=issued.spiffe_id,
        )


class IdentityService(identity_pb2_grpc.IdentityServicer):
    def __init__(self, c: Controller) -> None:
        self.c = c

    async def SignWorkloadCertificate(
        self,
        request: identity_pb2.SignRequest,
        context: grpc.aio.ServicerContext,
    ) -> identity_pb2.SignResponse:
        c = self.c
        try:
            node = c.node_of(context)
        except _Abort as e:
            await _abort(context, e)
            raise
        ident = (request.namespace, request.service_account)
        if ident not in c.identities_on(node):
            c.metrics.refused.labels("not_on_node").inc()
            log.warning(
                "refused certificate for ns/%s/sa/%s to node %s: no such workload is "
                "scheduled on that node",
                request.namespace,
                request.service_account,
                node,
            )
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"node {node} hosts no workload with namespace "
                f"{request.namespace!r} and service account "
                f"{request.service_account!r}",
            )
        try:
            issued = c.ca.sign_workload(
                request.csr_pem,
                request.namespace,
                request.service_account,
                int(request.ttl_seconds),
            )
        except CertificateRequestRejected as e:
            c.metrics.refused.labels("bad_csr").inc()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        c.metrics.certs.labels("workload").inc()
        return identity_pb2.SignResponse(
            certificate_chain_pem=issued.chain_pem,
            trust_bundle_pem=c.ca.bundle_pem(),
            not_after_unix=int(issued.not_after),
            spiffe_id=issued.spiffe_id,
            serial_hex=issued.serial_hex,
        )

    async def RenewNodeCertificate(
        self,
        request: identity_pb2.RenewNodeRequest,
        context: grpc.aio.ServicerContext,
    ) -> identity_pb2.BootstrapResponse:
        try:
            node = self.c.node_of(context)
        except _Abort as e:
            await _abort(context, e)
            raise
        try:
            issued = self.c.ca.sign_node(request.csr_pem, node)
        except CertificateRequestRejected as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        self.c.metrics.certs.labels("node").inc()
        return identity_pb2.BootstrapResponse(
            certificate_chain_pem=issued.chain_pem,
            trust_bundle_pem=self.c.ca.bundle_pem(),
            not_after_unix=int(issued.not_after),
            spiffe_id=issued.spiffe_id,
        )

    async def GetTrustBundle(
        self, request: identity_pb2.TrustBundleRequest, context: grpc.aio.ServicerContext
    ) -> identity_pb2.TrustBundle:
        return identity_pb2.TrustBundle(
            pem=self.c.ca.bundle_pem(), trust_domain=self.c.settings.trust_domain
        )


def _resource_pb(e: Entry) -> config_pb2.Resource:
    k = e.key
    return config_pb2.Resource(
        kind=k.kind, namespace=k.namespace, name=k.name, revision=e.revision, body=e.body
    )


class ConfigService(config_pb2_grpc.ConfigDiscoveryServicer):
    """One stream per agent; one response in flight at a time (as in xDS), so a burst of
    changes coalesces into the next response and every delta is computed from what the
    agent has acknowledged."""

    def __init__(self, c: Controller) -> None:
        self.c = c

    async def Stream(
        self,
        request_iterator: AsyncIterator[config_pb2.ConfigRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[config_pb2.ConfigResponse]:
        c = self.c
        try:
            node = c.node_of(context)
        except _Abort as e:
            await _abort(context, e)
            return
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("kind") != "subscribe":
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "first message must be a Subscribe"
            )
            return
        sub = first.subscribe
        if sub.node != node:
            c.metrics.refused.labels("wrong_node").inc()
            log.warning(
                "refused config stream: certificate of node %s subscribed as %r", node, sub.node
            )
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"certificate is for node {node}, not {sub.node!r}",
            )
            return
        session = NodeSession(node=node, peer=context.peer(), agent_version=sub.agent_version)
        c.sessions[node] = session
        c.metrics.agents.set(sum(s.connected for s in c.sessions.values()))
        acked = sub.revision if sub.epoch == c.store.epoch else None
        session.acked_revision = acked or 0
        log.info(
            "node %s subscribed (epoch %s, revision %d; ours %s/%d)",
            node,
            sub.epoch or "-",
            sub.revision,
            c.store.epoch,
            c.store.revision,
        )
        replies: asyncio.Queue[config_pb2.ConfigRequest | None] = asyncio.Queue()

        async def read() -> None:
            try:
                async for msg in request_iterator:
                    await replies.put(msg)
            finally:
                await replies.put(None)

        reader = asyncio.create_task(read(), name=f"config-read-{node}")
        sent_bundle = b""
        try:
            while True:
                seen = c.generation
                resp = self._response(acked, sent_bundle)
                if resp is None:
                    # Nothing new for this agent: wait for the store or the bundle to move on.
                    await c.wait_change(seen, max_wait=30)
                    if reader.done():
                        return
                    continue
                session.sent_revision = resp.revision
                sent_bundle = resp.trust_bundle_pem or sent_bundle
                yield resp
                reply = await replies.get()
                if reply is None:
                    return
                session.last_seen = time.time()
                kind = reply.WhichOneof("kind")
                if kind == "ack" and reply.ack.nonce == resp.nonce:
                    acked = reply.ack.revision
                    session.acked_revision = acked
                    session.last_nack = ""
                    c.metrics.acks.inc()
                elif kind == "nack":
                    text = (
                        "; ".join(
                            f"{p.resource}: {p.field}: {p.reason}".strip(": ")
                            for p in reply.nack.problems
                        )
                        or "no reason given"
                    )
                    session.last_nack = text
                    c.metrics.nacks.labels(node).inc()
                    log.error(
                        "node %s rejected config revision %d: %s (it keeps running revision %d)",
                        node,
                        resp.revision,
                        text,
                        reply.nack.revision,
                    )
                    # `acked` stays: the agent still runs what it last acknowledged. Do not
                    # resend the same thing; wait for the config to change.
                    await c.wait_change(seen)
        finally:
            reader.cancel()
            session.connected = False
            c.metrics.agents.set(sum(s.connected for s in c.sessions.values()))
            log.info("node %s disconnected (acked revision %d)", node, session.acked_revision)

    def _response(self, acked: int | None, sent_bundle: bytes) -> config_pb2.ConfigResponse | None:
        c = self.c
        bundle = c.ca.bundle_pem()
        new_bundle = bundle if bundle != sent_bundle else b""
        delta = c.store.delta_since(acked) if acked is not None else None
        common: dict[str, Any] = {
            "nonce": uuid.uuid4().hex[:12],
            "epoch": c.store.epoch,
            "trust_bundle_pem": new_bundle,
            "trust_domain": c.settings.trust_domain,
        }
        if delta is not None:
            if not delta.upserts and not delta.removed and not new_bundle:
                return None
            return config_pb2.ConfigResponse(
                revision=delta.revision,
                full=False,
                base_revision=delta.base,
                resources=[_resource_pb(e) for e in delta.upserts],
                removed=[
                    config_pb2.ResourceKey(kind=k.kind, namespace=k.namespace, name=k.name)
                    for k in delta.removed
                ],
                **common,
            )
        revision, entries = c.store.snapshot()
        return config_pb2.ConfigResponse(
            revision=revision, full=True, resources=[_resource_pb(e) for e in entries], **common
        )


class AdminService(admin_pb2_grpc.AdminServicer):
    def __init__(self, c: Controller) -> None:
        self.c = c

    def _applied_path(self, key: ResourceKey) -> Path:
        ns = key.namespace or "_cluster"
        return self.c.settings.config_dir / APPLIED_DIR / f"{key.kind}.{ns}.{key.name}.yaml"

    async def Apply(
        self, request: admin_pb2.ApplyRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ApplyResponse:
        c = self.c
        problems: list[Problem] = []
        resources = []
        offers = []
        for doc in request.documents:
            offer = parse_text(
                doc.text, doc.file or "<stdin>", default_namespace=request.namespace or None
            )
            offers.append(offer)
            problems += offer.problems
            resources += offer.resources
        problems += duplicates(offers)
        for r in resources:
            owner = c.store.owner(r.key)
            mine = c.source.source_id(self._applied_path(r.key))
            if owner is not None and owner != mine:
                problems.append(
                    Problem(f"already defined by {owner}; edit it there", resource=str(r.key))
                )
        if problems:
            return admin_pb2.ApplyResponse(
                problems=[_problem_info(p) for p in problems], revision=c.store.revision
            )
        applied = []
        for r in resources:
            cur = c.store.get(r.key)
            action = (
                "created"
                if cur is None
                else "unchanged"
                if cur.body == r.to_json().encode()
                else "configured"
            )
            applied.append(
                admin_pb2.Applied(
                    kind=r.key.kind, namespace=r.key.namespace, name=r.key.name, action=action
                )
            )
            if request.dry_run or action == "unchanged":
                continue
            path = self._applied_path(r.key)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(yaml.safe_dump(r.to_dict(), sort_keys=False))
            tmp.replace(path)
        if not request.dry_run:
            await asyncio.to_thread(c.source.scan)
        # Applied, but will it take effect? Judged on the config as it is with these in it.
        mine = {r.key: r for r in resources}
        everything = {e.key: e.resource for e in c.store.entries()} | mine
        status = conditions(everything.values())
        warnings = [
            _problem_info(
                Problem(f"{cd.type} is False ({cd.reason}): {cd.message}", resource=str(k))
            )
            for k in mine
            for cd in status.get(k, ())
            if not cd.status
        ]
        return admin_pb2.ApplyResponse(
            applied=applied, revision=c.store.revision, warnings=warnings
        )

    async def Delete(
        self, request: admin_pb2.DeleteRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.DeleteResponse:
        c = self.c
        cls = kind_named(request.kind)
        if cls is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unknown kind {request.kind!r}")
            raise AssertionError
        key = ResourceKey(
            cls.KIND,
            (request.namespace or cls.DEFAULT_NAMESPACE) if cls.NAMESPACED else "",
            request.name,
        )
        owner = c.store.owner(key)
        path = self._applied_path(key)
        if owner is None:
            return admin_pb2.DeleteResponse(deleted=False, revision=c.store.revision)
        if owner != c.source.source_id(path):
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION, f"{key} is defined by {owner}; remove it there"
            )
        path.unlink()
        await asyncio.to_thread(c.source.scan)
        return admin_pb2.DeleteResponse(deleted=True, revision=c.store.revision)

    async def Get(
        self, request: admin_pb2.GetRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.GetResponse:
        c = self.c
        kind = None
        if request.kind:
            cls = kind_named(request.kind)
            if cls is None:
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT, f"unknown kind {request.kind!r}"
                )
                raise AssertionError
            kind = cls.KIND
        status = conditions(r.resource for r in c.store.entries())
        out = [
            admin_pb2.StoredResource(
                kind=e.key.kind,
                namespace=e.key.namespace,
                name=e.key.name,
                revision=e.revision,
                source=e.source,
                body=e.body,
                conditions=[
                    admin_pb2.ConditionInfo(
                        type=cd.type, status=cd.status, reason=cd.reason, message=cd.message
                    )
                    for cd in status.get(e.key, ())
                ],
            )
            for e in c.store.entries(kind)
            if (not request.namespace or e.key.namespace == request.namespace)
            and (not request.name or e.key.name == request.name)
        ]
        return admin_pb2.GetResponse(resources=out, revision=c.store.revision)

    async def ListNodes(
        self, request: admin_pb2.ListNodesRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ListNodesResponse:
        c = self.c
        return admin_pb2.ListNodesResponse(
            nodes=[
                admin_pb2.NodeInfo(
                    node=s.node,
                    connected=s.connected,
                    acked_revision=s.acked_revision,
                    sent_revision=s.sent_revision,
                    last_nack=s.last_nack,
                    last_seen_unix=int(s.last_seen),
                    agent_version=s.agent_version,
                    peer=s.peer,
                )
                for s in sorted(c.sessions.values(), key=lambda s: s.node)
            ],
            revision=c.store.revision,
            epoch=c.store.epoch,
        )

    async def ListRejections(
        self, request: admin_pb2.ListRejectionsRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ListRejectionsResponse:
        return admin_pb2.ListRejectionsResponse(
            problems=[_problem_info(p) for r in self.c.store.rejections() for p in r.problems]
        )

    async def CreateNodeToken(
        self, request: admin_pb2.CreateNodeTokenRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.CreateNodeTokenResponse:
        token, expires = self.c.tokens.create(
            request.node, request.ttl_seconds or self.c.settings.node_token_ttl
        )
        log.info("created a bootstrap token for node %s", request.node)
        return admin_pb2.CreateNodeTokenResponse(token=token, expires_unix=int(expires))

    async def RotateRoot(
        self, request: admin_pb2.RotateRootRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.RotateRootResponse:
        kw = {"overlap": float(request.overlap_seconds)} if request.overlap_seconds else {}
        await asyncio.to_thread(self.c.ca.rotate, **kw)
        self.c._write_bundle()
        await self.c._notify()  # streams send the new bundle with their next response
        return admin_pb2.RotateRootResponse(trust_bundle_pem=self.c.ca.bundle_pem())


STATUS_EVERY = 2.0  # seconds between rounds of status write-back


async def serve(settings: ControllerSettings) -> None:
    import signal

    c = Controller(settings)
    await c.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down: draining streams for up to 5 s")
    await c.stop(5.0)
