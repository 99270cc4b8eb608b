"""The controller process: CA, config store and its sources, and the gRPC services.

Three listeners, kept apart on purpose:
- bootstrap (TLS, server-authenticated): a node proves itself with a token and gets a
  node certificate; nothing else is served there;
- main (mutual TLS, node certificates): CSR signing and the config stream;
- admin (a Unix socket): the operator API behind `weft policy ...`.

Each gRPC service is a module of controller/services/; this one holds the Controller
(state they share, listeners, background tasks) and `serve`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from controller.api import keepalive
from controller.api.gen import admin_pb2_grpc, identity_pb2_grpc
from controller.ca.authority import CertificateAuthority, FileCAStore
from controller.ca.signer import Signer
from controller.ca.spiffe import key_pem, make_csr, new_key, parse_node_id, spiffe_id_of
from controller.model.base import build_validators
from controller.model.workloads import Workload
from controller.services import Abort
from controller.services.admin import ADMIN_MAX_MESSAGE, AdminService
from controller.services.bootstrap import BootstrapService
from controller.services.config import ConfigService, NodeSession
from controller.services.config import add_to_server as add_config_service
from controller.services.identity import IdentityService
from controller.settings import ControllerSettings
from controller.sources.files import FileSource
from controller.store import ConfigStore
from controller.tokens import TokenStore

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
        self.signers = Gauge(
            "weft_controller_signer_processes",
            "Signer processes ready to sign certificates (0: the controller's own process "
            "signs, slower).",
            registry=registry,
        )
        self.rejected = Gauge(
            "weft_controller_rejected_resources",
            "Resources whose latest version failed validation.",
            registry=registry,
        )


def _peer_pem(context: grpc.aio.ServicerContext) -> bytes | None:
    auth = context.auth_context() or {}
    pems = auth.get("x509_pem_cert") or []
    return pems[0] if pems else None


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
        self.signer = Signer(self.ca, settings.signer_processes)
        self.metrics.signers.set_function(lambda: self.signer.ready_children)
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
        self._peer_ids: dict[bytes, str] = {}  # peer certificate PEM -> its SPIFFE ID
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
        build_validators()  # before any thread validates (sources scan in threads)
        self._loop = asyncio.get_running_loop()
        self._changed = asyncio.Condition()
        self._write_bundle()
        await asyncio.to_thread(self.source.scan)
        self._refresh_metrics()
        await self.signer.start()
        main = grpc.aio.server(options=keepalive.SERVER_OPTIONS)
        identity_pb2_grpc.add_IdentityServicer_to_server(IdentityService(self), main)
        add_config_service(ConfigService(self), main)
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
        await self.signer.stop()
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
        # The certificate gRPC verified in the handshake; parsed once per certificate
        # (an agent calls with the same one until it renews it).
        pem = _peer_pem(context)
        uri = self._peer_ids.get(pem) if pem else None
        if pem and uri is None:
            uri = spiffe_id_of(x509.load_pem_x509_certificate(pem)) or ""
            if len(self._peer_ids) >= 4096:
                self._peer_ids.clear()
            self._peer_ids[pem] = uri
        parsed = parse_node_id(uri) if uri else None
        if parsed is None or parsed[0] != self.settings.trust_domain:
            self.metrics.refused.labels("not_a_node").inc()
            log.warning(
                "refused %s: peer %s is not a node of %s",
                context.peer(),
                uri,
                self.settings.trust_domain,
            )
            raise Abort(
                grpc.StatusCode.UNAUTHENTICATED,
                f"caller {uri or 'without a SPIFFE ID'} is not a weft node identity",
            )
        return parsed[1]


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
