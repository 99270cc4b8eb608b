"""The real waypoint in one process over loopback, between two real node tunnels.

    client pod ──"capture"──▶ node-1 tunnel ──HBONE──▶ Waypoint :15008 ──HBONE──▶ node-N tunnel
    ──▶ backend (ModelServer / echo / grpc.aio server)

Like tests/unit/test_tunnel_loopback.py: real CA-issued certificates, TLS 1.3 HBONE and
authorization; only the capture is replaced (a "pod" dials its node's outbound port and the
original destination comes from a dict). The waypoint gets its identity and config through
the real Workload API server (agent/workloadapi.py) on a Unix socket, so AgentLink is
exercised; the only stand-in there is the caller's cgroup (SO_PEERCRED is real, but every
caller is this process, so /proc/PID/cgroup is replaced by `WaypointMesh.attest_as`).

Each mesh takes its own 127.A.B.0/24 (random A, B): the waypoint must listen on port 15008
of its own address, and meshes of concurrent test runs must not collide.

    async with WaypointMesh(tmp_path, grpc=True) as m:
        status, headers, body = await m.http("GET", "/debug/headers")
        port = await m.listen("llm")        # for curl, aiohttp, a grpcio channel...
        await m.apply("route.yaml", HTTPROUTE)

Not a test module (no test_ prefix): tests import it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import json
import os
import random
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

from agent import workloadapi
from agent.discovery import CgroupResolver
from agent.httpserver import HttpServer
from agent.identity.manager import WorkloadCert
from agent.identity.node import TrustBundle
from agent.lab.workloads.model_server import Behaviour, ModelServer, ServerConfig
from agent.state import ConfigSnapshot
from agent.tunnel.resolve import WAYPOINT_PORT
from agent.tunnel.tunnel import Tunnel, TunnelSettings
from agent.waypoint.server import Waypoint, WaypointSettings
from benchmarks.httpecho import Echo
from controller.ca.authority import CertificateAuthority, FileCAStore
from controller.ca.spiffe import key_pem, load_chain, make_csr, new_key
from controller.model.loader import parse_text
from controller.model.workloads import USE_WAYPOINT_LABEL, WAYPOINT_LABEL, WEFT_API

TRUST_DOMAIN = "cluster.local"
GRPC_SERVICE = "weft.test.Echo"
GRPC_UNARY = f"/{GRPC_SERVICE}/Unary"
GRPC_STREAM = f"/{GRPC_SERVICE}/ServerStream"
GRPC_CLIENT_STREAM = f"/{GRPC_SERVICE}/ClientStream"
GRPC_BIDI = f"/{GRPC_SERVICE}/Bidi"
GRPC_SLOW = f"/{GRPC_SERVICE}/Slow"
GRPC_ABORT = f"/{GRPC_SERVICE}/Abort"
GRPC_HEALTH_CHECK = "/grpc.health.v1.Health/Check"


def free_port(host: str = "0.0.0.0") -> int:
    s = socket.socket()
    s.bind((host, 0))
    p = int(s.getsockname()[1])
    s.close()
    return p


def new_threads(before: set[threading.Thread], limit: float = 5.0) -> list[str]:
    """Threads started since `before` that are still running after `limit` seconds. Call it
    once the event loop has ended: grpc.aio's poller thread stops only when its servers and
    channels are garbage (a test coroutine's frame may hold them until then)."""
    end = time.monotonic() + limit
    while True:
        gc.collect()
        extra = [t.name for t in threading.enumerate() if t not in before and t.is_alive()]
        if not extra or time.monotonic() > end:
            return sorted(extra)
        time.sleep(0.02)


# ---- identities and capture ---------------------------------------------------------------


class Identities:
    """Certificates issued by the real CA, handed over directly (a node agent's holdings)."""

    def __init__(self, ca: CertificateAuthority, idents: Sequence[tuple[str, str]]) -> None:
        self.trust = TrustBundle(ca.bundle_pem())
        self._certs: dict[tuple[str, str], WorkloadCert] = {}
        for ns, sa in idents:
            key = new_key()
            issued = ca.sign_workload(make_csr(key, None), ns, sa)
            leaf = load_chain(issued.chain_pem)[0]
            self._certs[(ns, sa)] = WorkloadCert(
                issued.spiffe_id,
                ns,
                sa,
                issued.chain_pem,
                key_pem(key),
                leaf.not_valid_before_utc.timestamp(),
                issued.not_after,
                issued.serial_hex,
            )

    def get(self, ns: str, sa: str) -> WorkloadCert | None:
        return self._certs.get((ns, sa))

    async def wait_for(self, ns: str, sa: str, limit: float = 10.0) -> WorkloadCert | None:
        return self.get(ns, sa)

    def certs(self) -> list[WorkloadCert]:
        return list(self._certs.values())


class OrigDst(dict[tuple[str, int], tuple[str, int]]):
    """The eBPF map's job: original destination by the pod socket's (ip, port)."""

    def original_destination(self, ip: str, port: int) -> tuple[str, int] | None:
        return self.pop((ip, port), None)


class _NodeAgent:
    """What agent/workloadapi.py reads of an Agent (agent/main.py), and nothing more."""

    def __init__(
        self, node: str, snap: ConfigSnapshot, ids: Identities, resolver: CgroupResolver
    ) -> None:
        self.s = type("S", (), {"node": node})()
        self.snapshot = snap
        self.identities = ids
        self.trust = ids.trust
        self.resolver = resolver


# ---- topology -----------------------------------------------------------------------------


@dataclasses.dataclass
class Backend:
    """One backend pod. kind: "model" (agent/lab/workloads/model_server.py, OpenAI API, SSE,
    x-weft-served-by: NAMESPACE/NAME, /debug/headers, /control), "echo" (body echo,
    benchmarks/httpecho.py) or "grpc" (grpc.aio, see `_grpc_server`: GRPC_UNARY echoes,
    GRPC_STREAM yields int(request) messages "NAME-i", client-streaming, bidi, a slow call,
    an aborting call, and grpc.health.v1.Health answering `grpc_health`).

    Pods with the same `app` form Service `app` (through the waypoint unless waypoint=False);
    pods with a version also form Service `app-version` (direct, for HTTPRoute backendRefs).
    HTTP Services listen on port 8000, gRPC ones on 9000."""

    name: str
    app: str = "llm"
    version: str | None = None
    node: str = "node-2"
    kind: Literal["model", "echo", "grpc"] = "model"
    model: str = "llama"
    behaviour: Behaviour | None = None  # model kind; default: no latency, no queueing
    namespace: str = "ai"
    service_account: str | None = None  # default: app
    waypoint: bool = True  # Service `app` has weft.dev/use-waypoint (versioned ones never)
    # Filled in by the mesh:
    ip: str = ""
    server: Any = None  # ModelServer | asyncio.Server | grpc.aio.Server
    grpc_metadata: list[dict[str, str]] = dataclasses.field(default_factory=list)
    # grpc kind: grpc.health.v1 status by service name ("" = the server), settable at run
    # time (health_pb2.HealthCheckResponse.SERVING / NOT_SERVING); a service missing from
    # the dict is NOT_FOUND. grpc_events records what the slow call saw ("slow-started",
    # "slow-cancelled", "slow-finished") and health checks ("health-check").
    grpc_health: dict[str, int] = dataclasses.field(default_factory=lambda: {"": 1})
    grpc_events: list[str] = dataclasses.field(default_factory=list)

    @property
    def sa(self) -> str:
        return self.service_account or self.app

    @property
    def served_by(self) -> str:
        return f"{self.namespace}/{self.name}"


def default_backends() -> list[Backend]:
    return [Backend("llm-v1", version="v1"), Backend("llm-v2", version="v2")]


def grpc_backend() -> Backend:
    return Backend("grpc-echo", app="grpc-echo", kind="grpc")


@dataclasses.dataclass(frozen=True)
class Pod:
    name: str
    namespace: str
    service_account: str
    node: str
    ip: str
    labels: Mapping[str, str]
    mesh: bool = True


class HttpResponse(NamedTuple):
    status: int
    headers: dict[str, str]  # lower-case names; repeated headers joined with ", "
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


# ---- the mesh -----------------------------------------------------------------------------


class WaypointMesh:
    """Two node tunnels, a waypoint fed by the real Workload API, and backends.

    tmp:        a directory for the CA store (the Workload API socket goes under /tmp,
                for the 108-byte sun_path limit).
    backends:   Backend pods (default: ai/llm-v1 and ai/llm-v2, model servers on node-2).
    grpc:       add grpc_backend() (Service ai/grpc-echo, appProtocol grpc, via the waypoint).
    frontends:  pod-less Services through the waypoint, port 8000 (the AI lab's ai/llm, whose
                ModelRoute picks backend Services).
    extra:      resources a test adds, as {name: yaml} (like the lab's apply) or one yaml text.
    waypoint:   the waypoint's name (Services use it through weft.dev/use-waypoint).
    seed:       seeds the waypoint engine's random.Random in place (splits, balancing).
    settings:   extra WaypointSettings fields (head_timeout, idle_timeout, quota_store...).

    Pods: apps/client (node-1) and apps/batch (node-2) call; ai/waypoint runs on node-1.
    Services are in namespace `ai`; `service` arguments take "name" or "ns/name".
    """

    def __init__(
        self,
        tmp: Path,
        *,
        backends: Sequence[Backend] | None = None,
        grpc: bool = False,
        frontends: Sequence[str] = (),
        extra: Mapping[str, str] | str = "",
        waypoint: str = "ai-waypoint",
        seed: int | None = None,
        settings: Mapping[str, Any] | None = None,
    ) -> None:
        self.tmp = tmp
        self.waypoint_name = waypoint
        self.seed = seed
        self.frontends = tuple(frontends)
        self.backends = [dataclasses.replace(b) for b in (backends or default_backends())]
        if grpc:
            self.backends.append(grpc_backend())
        if isinstance(extra, str):
            self.extra = {"extra.yaml": extra} if extra else {}
        else:
            self.extra = dict(extra)
        self.ports = {k: free_port("127.0.0.1") for k in ("out1", "in1", "out2", "in2")}
        self.backend_port = free_port()  # every backend listens on its own ip:backend_port
        self.net = self._pick_net()
        self.pods: dict[str, Pod] = {}
        self._add_pod("client", "apps", "client", "node-1", 11, {"app": "client"})
        self._add_pod("batch", "apps", "batch", "node-2", 12, {"app": "batch"})
        self._add_pod(
            "waypoint", "ai", "waypoint", "node-1", 30, {WAYPOINT_LABEL: waypoint}, mesh=False
        )
        for i, b in enumerate(self.backends):
            labels = {"app": b.app, **({"version": b.version} if b.version else {})}
            b.ip = self._add_pod(b.name, b.namespace, b.sa, b.node, 21 + i, labels).ip
        self.services = self._services()
        self.revision = 0
        self.snap = ConfigSnapshot.empty()
        self._build()
        self.ca = CertificateAuthority.load_or_create(FileCAStore(tmp / "ca.json"), TRUST_DOMAIN)
        self.orig = OrigDst()
        self.identities = {
            node: Identities(
                self.ca,
                sorted(
                    {(p.namespace, p.service_account) for p in self.pods.values() if p.node == node}
                ),
            )
            for node in ("node-1", "node-2")
        }
        self.tunnels = {
            "node-1": self._tunnel("node-1", self.ports["out1"], self.ports["in1"]),
            "node-2": self._tunnel("node-2", self.ports["out2"], self.ports["in2"]),
        }
        self.sockdir = Path(tempfile.mkdtemp(prefix="wpm-", dir="/tmp"))
        self.cgroot = tmp / "cgroup"
        for p in self.pods.values():
            (self.cgroot / self._cgroup(p).lstrip("/")).mkdir(parents=True, exist_ok=True)
        # Who the Workload API believes is calling (every caller is this process).
        self.attest_as: str | None = "ai/waypoint"
        self.agent = _NodeAgent(
            "node-1", self.snap, self.identities["node-1"], CgroupResolver("lab", self.cgroot)
        )
        self.api = workloadapi.WorkloadApi(self.agent)  # type: ignore[arg-type]
        self._api_http: HttpServer | None = None
        opts: dict[str, Any] = {
            "metrics_listen": "127.0.0.1:0",  # port 0: no metrics listener
            "access_log": "off",
            "drain_timeout": 1.0,
            **(settings or {}),
        }
        self.waypoint = Waypoint(
            WaypointSettings(
                name=waypoint,
                listen=f"{self.pods['waypoint'].ip}:{WAYPOINT_PORT}",
                workload_socket=self.sockdir / "workload.sock",
                **opts,
            )
        )
        if seed is not None:
            self.waypoint.engine.rng.seed(seed)  # shared with its Backends: seed in place
        self._forwarders: list[asyncio.AbstractServer] = []
        self._channels: list[Any] = []
        self._tasks_before: set[asyncio.Task[Any]] = set()
        self._saved_cgroup_of_pid: Any = None

    # ---- topology helpers ----------------------------------------------------------------

    @staticmethod
    def _pick_net() -> str:
        """A 127.A.B.0/24 whose waypoint address has port 15008 free."""
        for _ in range(50):
            net = f"127.{random.randint(64, 250)}.{random.randint(1, 254)}"
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the waypoint does
            try:
                s.bind((f"{net}.30", WAYPOINT_PORT))
            except OSError:
                continue
            finally:
                s.close()
            return net
        raise RuntimeError("no free 127.A.B.30:15008 found")

    def _add_pod(
        self,
        name: str,
        ns: str,
        sa: str,
        node: str,
        host: int,
        labels: Mapping[str, str],
        mesh: bool = True,
    ) -> Pod:
        key = f"{ns}/{name}"
        if key in self.pods:
            raise ValueError(f"duplicate pod {key}")
        pod = Pod(name, ns, sa, node, f"{self.net}.{host}", dict(labels), mesh)
        self.pods[key] = pod
        self.pods.setdefault(name, pod)
        return pod

    @staticmethod
    def _cgroup(p: Pod) -> str:
        return f"/weft-test/{p.namespace}/{p.name}"

    def _services(self) -> dict[str, dict[str, Any]]:
        """(ns/name) -> {vip, port, app_protocol, selector, waypoint}"""
        out: dict[str, dict[str, Any]] = {}
        for b in self.backends:
            port, proto = (9000, "grpc") if b.kind == "grpc" else (8000, "http")
            base = {"port": port, "app_protocol": proto}
            out.setdefault(
                f"{b.namespace}/{b.app}",
                {
                    **base,
                    "selector": {"app": b.app},
                    "waypoint": self.waypoint_name if b.waypoint else None,
                },
            )
            if b.version:
                out.setdefault(
                    f"{b.namespace}/{b.app}-{b.version}",
                    {**base, "selector": {"app": b.app, "version": b.version}, "waypoint": None},
                )
        for name in self.frontends:
            key = name if "/" in name else f"ai/{name}"
            out[key] = {
                "port": 8000,
                "app_protocol": "http",
                "selector": {"app": f"{key.split('/')[1]}-front"},  # no pods: ModelRoute's job
                "waypoint": self.waypoint_name,
            }
        for i, svc in enumerate(out.values()):
            svc["vip"] = f"10.96.0.{10 + i}"
        return out

    def _docs(self) -> list[dict[str, Any]]:
        docs: list[dict[str, Any]] = []
        for node, port in (("node-1", self.ports["in1"]), ("node-2", self.ports["in2"])):
            docs.append(
                {
                    "apiVersion": WEFT_API,
                    "kind": "Node",
                    "metadata": {"name": node},
                    "spec": {"addresses": ["127.0.0.1"], "tunnelPort": port},
                }
            )
        for key, p in self.pods.items():
            if "/" not in key:
                continue
            docs.append(
                {
                    "apiVersion": WEFT_API,
                    "kind": "Workload",
                    "metadata": {"name": p.name, "namespace": p.namespace, "labels": p.labels},
                    "spec": {
                        "serviceAccount": p.service_account,
                        "node": p.node,
                        "addresses": [p.ip],
                        "mesh": p.mesh,
                        "cgroup": self._cgroup(p),
                    },
                }
            )
        for key, s in self.services.items():
            ns, name = key.split("/")
            port = {
                "name": s["app_protocol"],
                "port": s["port"],
                "targetPort": self.backend_port,
                "appProtocol": s["app_protocol"],
            }
            docs.append(
                {
                    "apiVersion": "v1",
                    "kind": "Service",
                    "metadata": {
                        "name": name,
                        "namespace": ns,
                        "labels": {USE_WAYPOINT_LABEL: s["waypoint"]} if s["waypoint"] else {},
                    },
                    "spec": {"selector": s["selector"], "clusterIP": s["vip"], "ports": [port]},
                }
            )
        return docs

    def config_text(self) -> str:
        parts = [json.dumps(d) for d in self._docs()]
        parts += [t.strip().removeprefix("---").strip() for t in self.extra.values() if t.strip()]
        return "\n---\n".join(parts) + "\n"

    def _build(self) -> ConfigSnapshot:
        offer = parse_text(self.config_text(), "mesh.yaml")
        if offer.problems:
            raise ValueError(f"config problems: {offer.problems}")
        self.revision += 1
        self.snap = ConfigSnapshot.build(
            "loopback", self.revision, TRUST_DOMAIN, {r.key: r for r in offer.resources}
        )
        return self.snap

    def _tunnel(self, node: str, out: int, inb: int) -> Tunnel:
        return Tunnel(
            TunnelSettings(
                node=node,
                node_ip="127.0.0.1",
                outbound_port=out,
                inbound_host="127.0.0.1",
                inbound_port=inb,
                mark=0,
            ),
            config=lambda: self.snap,
            identities=self.identities[node],
            original=self.orig,
        )

    def vip(self, service: str = "llm") -> str:
        """The Service's cluster IP (also for Services a test added with apply)."""
        return str(self._service(service).spec.vips()[0])

    def service_port(self, service: str = "llm") -> int:
        """The Service's first port."""
        return int(self._service(service).spec.ports[0].port)

    def _service(self, service: str) -> Any:
        ns, _, name = service.rpartition("/")
        svc = self.snap.services.get((ns or "ai", name))
        if svc is None:
            raise KeyError(f"no Service {ns or 'ai'}/{name}; have {sorted(self.snap.services)}")
        return svc

    def backend(self, name: str) -> Backend:
        return next(b for b in self.backends if name in (b.name, b.served_by))

    def engine_backend(self, service: str = "llm", port: int | None = None) -> Any:
        """The waypoint engine's Backend for a Service port (created on first use, as a
        request would): counters, pool accounting, endpoints."""
        ns, _, name = service.rpartition("/")
        key = (ns or "ai", name, port or self.service_port(service))
        b = self.waypoint.engine.backend(key)
        if b is None:
            raise KeyError(f"no Service port {key}")
        return b

    async def stop_backend(self, name: str) -> None:
        """Kill a backend pod's server: its address stays in the config (the Service still
        lists it), but nothing listens there any more, and open connections are closed."""
        b = self.backend(name)
        if b.server is None:
            return
        if b.kind == "model":
            await b.server.shutdown(0.5)
        elif b.kind == "echo":
            b.server.close()
            await b.server.wait_closed()
        else:
            await b.server.stop(None)
        b.server = None

    # ---- lifecycle -----------------------------------------------------------------------

    async def __aenter__(self) -> WaypointMesh:
        self._tasks_before = set(asyncio.all_tasks())
        try:
            await self._start()
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        return self

    async def _start(self) -> None:
        self._saved_cgroup_of_pid = workloadapi.cgroup_of_pid
        real = self._saved_cgroup_of_pid
        me = os.getpid()

        def cgroup_of_pid(pid: int) -> str | None:
            if pid != me:
                return real(pid)  # type: ignore[no-any-return]
            pod = self.pods.get(self.attest_as or "")
            return self._cgroup(pod) if pod else None

        workloadapi.cgroup_of_pid = cgroup_of_pid
        self._api_http = HttpServer(self.api.routes())
        await self._api_http.listen_unix(self.waypoint.s.workload_socket, mode=0o600)
        for t in self.tunnels.values():
            await t.start()
        for b in self.backends:
            await self._start_backend(b)
        await self.waypoint.start()
        await self.wait_revision(self.revision)

    async def _start_backend(self, b: Backend) -> None:
        if b.kind == "model":
            srv = ModelServer(
                ServerConfig(model=b.model, name=b.served_by),
                b.behaviour or Behaviour(ttft=0.0, tpot=0.0, max_concurrency=0),
            )
            await srv.start(b.ip, self.backend_port)
            b.server = srv
        elif b.kind == "echo":
            loop = asyncio.get_running_loop()
            b.server = await loop.create_server(Echo, b.ip, self.backend_port)
        elif b.kind == "grpc":
            b.server = await _grpc_server(b, f"{b.ip}:{self.backend_port}")
        else:
            raise ValueError(f"unknown backend kind {b.kind!r}")

    async def __aexit__(self, *exc: object) -> None:
        errors: list[BaseException] = []

        async def step(coro: Any) -> None:
            try:
                await asyncio.wait_for(coro, 10)
            except Exception as e:  # keep cleaning up; raise the first at the end
                errors.append(e)

        for ch in self._channels:
            await step(ch.close())
        for f in self._forwarders:
            f.close()
        await step(self.waypoint.drain())
        for t in self.tunnels.values():
            await step(t.close())
        for b in self.backends:
            if b.server is None:
                continue
            if b.kind == "model":
                await step(b.server.shutdown(0.5))
            elif b.kind == "echo":
                b.server.close()
            elif b.kind == "grpc":
                await step(b.server.stop(None))
            b.server = None
        self._channels.clear()
        if self._api_http is not None:
            self._api_http.close()
        # Whatever is still running was started by the mesh (server connection handlers,
        # the Workload API's long polls, tunnel relays, waypoint timers): cancel and await.
        me = asyncio.current_task()
        left = [t for t in asyncio.all_tasks() if t not in self._tasks_before and t is not me]
        for t in left:
            t.cancel()
        if left:
            _, pending = await asyncio.wait(left, timeout=10)
            if pending:
                errors.append(RuntimeError(f"tasks did not stop: {pending}"))
        if self._saved_cgroup_of_pid is not None:
            workloadapi.cgroup_of_pid = self._saved_cgroup_of_pid
        shutil.rmtree(self.sockdir, ignore_errors=True)
        if errors and exc[0] is None:
            raise errors[0]

    # ---- config --------------------------------------------------------------------------

    async def apply(self, name: str, text: str) -> ConfigSnapshot:
        """Add or replace test resources `name` (one YAML text, several documents allowed),
        publish a new revision through the Workload API, and wait for the waypoint to apply it."""
        self.extra[name] = text
        return await self._publish()

    async def remove(self, name: str) -> ConfigSnapshot:
        self.extra.pop(name, None)
        return await self._publish()

    async def _publish(self) -> ConfigSnapshot:
        snap = self._build()
        self.agent.snapshot = snap
        await self.api.notify()
        await self.wait_revision(snap.revision)
        return snap

    async def wait_revision(self, revision: int, limit: float = 15.0) -> None:
        end = time.monotonic() + limit
        while self.waypoint.snapshot.revision < revision:
            if time.monotonic() > end:
                raise TimeoutError(
                    f"the waypoint is at revision {self.waypoint.snapshot.revision}, not {revision}"
                )
            await asyncio.sleep(0.01)

    # ---- clients -------------------------------------------------------------------------

    async def dial(
        self, src: str, dst: tuple[str, int]
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A captured connect() of pod `src` to `dst`: a connection to its node's outbound
        port, with the original destination recorded for its source address."""
        pod = self.pods[src]
        out = self.ports["out1" if pod.node == "node-1" else "out2"]
        sock = socket.socket()
        try:
            sock.bind((pod.ip, 0))
            self.orig[sock.getsockname()] = dst
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", out))
        except BaseException:
            sock.close()
            raise
        return await asyncio.open_connection(sock=sock, limit=1 << 20)

    async def connect(
        self, service: str = "llm", *, src: str = "client", port: int | None = None
    ) -> HttpConnection:
        """An HTTP/1.1 client connection from pod `src` to Service VIP:port (keep-alive)."""
        vip, p = self.vip(service), port or self.service_port(service)
        r, w = await self.dial(src, (vip, p))
        return HttpConnection(r, w, f"{service.rpartition('/')[2]}:{p}")

    async def http(
        self,
        method: str,
        path: str,
        body: bytes | str | None = None,
        headers: Mapping[str, str] | Sequence[tuple[str, str]] | None = None,
        *,
        service: str = "llm",
        src: str = "client",
        port: int | None = None,
        limit: float = 30.0,
    ) -> HttpResponse:
        """One request on a fresh connection: capture -> tunnel -> waypoint -> backend."""
        async with await self.connect(service, src=src, port=port) as c:
            return await c.request(method, path, body, headers, limit=limit)

    async def listen(
        self, service: str = "llm", *, src: str = "client", port: int | None = None
    ) -> int:
        """A port on 127.0.0.1 whose connections behave as pod `src` dialling the Service:
        each accepted connection is dialled through the capture path and spliced. For real
        clients (curl, aiohttp, grpcio)."""
        dst = (self.vip(service), port or self.service_port(service))

        async def accepted(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            try:
                ur, uw = await self.dial(src, dst)
            except OSError:
                w.transport.abort()
                return
            try:
                await asyncio.gather(_pump(r, uw), _pump(ur, w))
            finally:
                w.close()
                uw.close()

        srv = await asyncio.start_server(accepted, "127.0.0.1", 0)
        self._forwarders.append(srv)
        return int(srv.sockets[0].getsockname()[1])

    async def grpc_channel(self, service: str = "grpc-echo", *, src: str = "client") -> Any:
        """A grpc.aio channel (h2c prior knowledge) to the Service through the mesh; closed
        by the mesh on exit."""
        import grpc

        port = await self.listen(service, src=src)
        ch = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        self._channels.append(ch)
        return ch


async def _pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    try:
        while data := await src.read(65536):
            dst.write(data)
            await dst.drain()
        if not dst.is_closing() and dst.can_write_eof():
            dst.write_eof()
    except (ConnectionError, OSError, RuntimeError):  # uvloop: RuntimeError once closed
        dst.transport.abort()


class HttpConnection:
    """A minimal HTTP/1.1 client on one connection (content-length, chunked, or EOF bodies)."""

    def __init__(self, r: asyncio.StreamReader, w: asyncio.StreamWriter, host: str) -> None:
        self.r, self.w, self.host = r, w, host

    async def __aenter__(self) -> HttpConnection:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        self.w.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.w.wait_closed(), 5)

    async def request(
        self,
        method: str,
        path: str,
        body: bytes | str | None = None,
        headers: Mapping[str, str] | Sequence[tuple[str, str]] | None = None,
        *,
        limit: float = 30.0,
    ) -> HttpResponse:
        """Send one request and read its whole response (within `limit` seconds)."""
        raw = body.encode() if isinstance(body, str) else body
        items = list(headers.items() if isinstance(headers, Mapping) else headers or ())
        names = {k.lower() for k, _ in items}
        head = [f"{method} {path} HTTP/1.1"]
        if "host" not in names:
            head.append(f"host: {self.host}")
        head += [f"{k}: {v}" for k, v in items]
        if raw is not None and "content-length" not in names:
            head.append(f"content-length: {len(raw)}")
        self.w.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + (raw or b""))
        await self.w.drain()
        return await asyncio.wait_for(read_response(self.r, method), limit)


async def read_response(r: asyncio.StreamReader, method: str = "GET") -> HttpResponse:
    while True:
        head = await r.readuntil(b"\r\n\r\n")
        lines = head[:-4].split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            k, _, v = line.partition(b":")
            key, val = k.strip().lower().decode("latin-1"), v.strip().decode("latin-1")
            headers[key] = f"{headers[key]}, {val}" if key in headers else val
        if not (100 <= status < 200 and status != 101):
            break
    if method == "HEAD" or status in (204, 304):
        return HttpResponse(status, headers, b"")
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = bytearray()
        while True:
            size = int((await r.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
            if size == 0:
                while await r.readuntil(b"\r\n") != b"\r\n":  # trailers
                    pass
                return HttpResponse(status, headers, bytes(body))
            body += await r.readexactly(size)
            await r.readexactly(2)
    if "content-length" in headers:
        return HttpResponse(status, headers, await r.readexactly(int(headers["content-length"])))
    return HttpResponse(status, headers, await r.read())


# ---- gRPC backend -------------------------------------------------------------------------


async def _grpc_server(b: Backend, address: str) -> Any:
    """A grpc.aio server without protos: raw-bytes messages.

    GRPC_UNARY: answers the request bytes, with initial metadata x-served-by.
    GRPC_STREAM: the request is an ASCII count; answers that many messages "NAME-i".
    GRPC_CLIENT_STREAM: answers "NAME:" and the request messages joined with "+".
    GRPC_BIDI: answers each request message m with "NAME:m", as it arrives.
    GRPC_SLOW: sleeps float(request) seconds (default 30), silent (no response headers),
        then answers "slow"; a request "h:SECONDS" sends its initial metadata first. Records
        slow-started / slow-cancelled / slow-finished in b.grpc_events.
    GRPC_ABORT: the request is "CODE_NAME:details"; aborts with that status and details
        (trailers-only), after trailing metadata x-abort-trailer: yes.
    grpc.health.v1.Health/Check: b.grpc_health[service], NOT_FOUND when missing.
    Each Echo call's invocation metadata is appended to b.grpc_metadata."""
    import grpc

    from controller.api.gen.grpc.health.v1 import health_pb2, health_pb2_grpc

    async def unary(req: bytes, ctx: Any) -> bytes:
        b.grpc_metadata.append(dict(ctx.invocation_metadata()))
        await ctx.send_initial_metadata((("x-served-by", b.served_by),))
        return req

    async def server_stream(req: bytes, ctx: Any) -> Any:
        b.grpc_metadata.append(dict(ctx.invocation_metadata()))
        for i in range(int(req or b"3")):
            yield f"{b.name}-{i}".encode()

    async def client_stream(reqs: Any, ctx: Any) -> bytes:
        b.grpc_metadata.append(dict(ctx.invocation_metadata()))
        got = [m async for m in reqs]
        return f"{b.name}:".encode() + b"+".join(got)

    async def bidi(reqs: Any, ctx: Any) -> Any:
        b.grpc_metadata.append(dict(ctx.invocation_metadata()))
        async for m in reqs:
            yield f"{b.name}:".encode() + m

    async def slow(req: bytes, ctx: Any) -> bytes:
        b.grpc_metadata.append(dict(ctx.invocation_metadata()))
        if req.startswith(b"h:"):
            req = req[2:]
            await ctx.send_initial_metadata((("x-served-by", b.served_by),))
        b.grpc_events.append("slow-started")
        try:
            await asyncio.sleep(float(req or b"30"))
        except asyncio.CancelledError:
            b.grpc_events.append("slow-cancelled")
            raise
        b.grpc_events.append("slow-finished")
        return b"slow"

    async def abort(req: bytes, ctx: Any) -> bytes:
        b.grpc_metadata.append(dict(ctx.invocation_metadata()))
        code, _, details = req.decode().partition(":")
        ctx.set_trailing_metadata((("x-abort-trailer", "yes"),))
        await ctx.abort(grpc.StatusCode[code], details)
        return b""  # not reached: abort raises

    class Health(health_pb2_grpc.HealthServicer):  # type: ignore[misc]
        async def Check(self, req: Any, ctx: Any) -> Any:
            b.grpc_events.append("health-check")
            status = b.grpc_health.get(req.service)
            if status is None:
                await ctx.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {req.service!r}")
            return health_pb2.HealthCheckResponse(status=status)

    handler = grpc.method_handlers_generic_handler(
        GRPC_SERVICE,
        {
            "Unary": grpc.unary_unary_rpc_method_handler(unary),
            "ServerStream": grpc.unary_stream_rpc_method_handler(server_stream),
            "ClientStream": grpc.stream_unary_rpc_method_handler(client_stream),
            "Bidi": grpc.stream_stream_rpc_method_handler(bidi),
            "Slow": grpc.unary_unary_rpc_method_handler(slow),
            "Abort": grpc.unary_unary_rpc_method_handler(abort),
        },
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    health_pb2_grpc.add_HealthServicer_to_server(Health(), server)
    if not server.add_insecure_port(address):
        raise OSError(f"grpc server could not bind {address}")
    await server.start()
    return server


@contextlib.asynccontextmanager
async def openai_client(m: WaypointMesh, service: str = "llm") -> AsyncIterator[Any]:
    """The official `openai` SDK pointed at the Service through the mesh, without its own
    retries."""
    import openai

    port = await m.listen(service)
    async with openai.AsyncOpenAI(
        base_url=f"http://127.0.0.1:{port}/v1", api_key="test", max_retries=0, timeout=30.0
    ) as client:
        yield client
