"""The lab benchmarks: every scenario and workload, side by side in one lab, in one run.

The bench lab (built here, torn down in `finally`):

    node-1  plain/client  plain/near  mesh/client  mesh/near  mesh/near-nofp
    node-2  plain/far                 mesh/far  mesh/far-l7

`plain` pods are outside the mesh (the direct floor and the sidecar baselines, whose proxies
run inside the plain pods); `mesh` pods are captured by weft. Every server pod runs the same
four servers: TCP echo :8000, HTTP echo :8080, iperf3 :5201, model server :8001 (SSE); the
`far` pods also run a gRPC echo :50051 and a second model server :8002 that answers at
once (the AI policy workloads). mesh/far-l7 backs the waypoint-bound Services (far-l7,
far-ai): a port of a Service that uses a waypoint is reachable only through it.
mesh/near-nofp carries the `weft.dev/fastpath: "false"` annotation, so same-node traffic to
it goes through the agent while traffic to mesh/near is spliced in the kernel: fast path on
and off run side by side with one agent configuration.

Scenarios and workloads are registries: a scenario is a name, a baseline and a function that
starts what it needs and returns where the client connects; a workload is a client command
line and a parser. The weft waypoint scenario sends HTTP, SSE, gRPC and OpenAI-style calls
through a Service bound to the waypoint pod mesh/waypoint, so it is compared with the HAProxy
pair on the same workloads; weft-waypoint-ai sends the OpenAI calls through a second such
Service (far-ai) that has a TokenRateLimit and a ModelRoute, so the AI stages' cost is the
difference between the two.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import yaml

from agent.lab import mesh
from agent.lab.manifest import plan
from agent.lab.topology import Lab, LabState
from agent.netns import call_in
from benchmarks import proxies
from benchmarks.stats import histogram, per_thousand, summarize_us
from controller.model.yamldoc import load_documents

LAB_NAME = "weft-bench"
FASTPATH_ANNOTATION = "weft.dev/fastpath"

MANIFEST = """
apiVersion: weft.dev/v1alpha1
kind: Lab
metadata: {name: weft-bench}
spec:
  trustDomain: cluster.local
  nodes: [{name: node-1}, {name: node-2}]
  namespaces:
    - {name: plain}
    - {name: mesh, labels: {weft.dev/mesh: enabled}}
  pods:
    - {name: client, namespace: plain, node: node-1, labels: {app: plain-client}}
    - {name: near, namespace: plain, node: node-1, labels: {app: plain-near}}
    - {name: far, namespace: plain, node: node-2, labels: {app: plain-far}}
    - {name: client, namespace: mesh, node: node-1, serviceAccount: client, labels: {app: client}}
    - {name: near, namespace: mesh, node: node-1, serviceAccount: server, labels: {app: near}}
    - {name: near-nofp, namespace: mesh, node: node-1, serviceAccount: server,
       labels: {app: near-nofp}}
    - {name: far, namespace: mesh, node: node-2, serviceAccount: server, labels: {app: far}}
    - {name: far-l7, namespace: mesh, node: node-2, serviceAccount: server, labels: {app: far-l7}}
    - {name: waypoint, namespace: mesh, node: node-1, serviceAccount: waypoint,
       labels: {weft.dev/waypoint: bench-waypoint, weft.dev/mesh: disabled}}
  services:
    - {name: near, namespace: mesh, selector: {app: near}, ports: __PORTS__}
    - {name: near-nofp, namespace: mesh, selector: {app: near-nofp}, ports: __PORTS__}
    - {name: far, namespace: mesh, selector: {app: far}, ports: __PORTS__}
    - {name: far-l7, namespace: mesh, selector: {app: far-l7},
       labels: {weft.dev/use-waypoint: bench-waypoint}, ports: __HTTP_PORTS__}
    - {name: far-ai, namespace: mesh, selector: {app: far-l7},
       labels: {weft.dev/use-waypoint: bench-waypoint}, ports: __AI_PORTS__}
"""

# Workload protocol -> server port (grpc and ai: in the far pods only, see FAR_PODS).
PORTS: dict[str, int] = {
    "tcp": 8000,
    "http": 8080,
    "bulk": 5201,
    "sse": 8001,
    "grpc": 50051,
    "ai": 8002,
}
# The appProtocol of each port on the waypoint-bound Services: grpc makes the waypoint
# speak HTTP/2 to the backend.
APP_PROTOCOL = {"http": "http", "sse": "http", "grpc": "grpc", "ai": "http"}


def _ports(protocols: Iterable[str], app: bool) -> str:
    return (
        "["
        + ", ".join(
            f"{{name: {k}, port: {PORTS[k]}"
            + (f", appProtocol: {APP_PROTOCOL[k]}}}" if app else "}")
            for k in protocols
        )
        + "]"
    )


MANIFEST = (
    MANIFEST.replace("__PORTS__", _ports(PORTS, app=False))
    .replace("__HTTP_PORTS__", _ports(("http", "sse", "grpc", "ai"), app=True))
    .replace("__AI_PORTS__", _ports(("ai",), app=True))
)
# mesh/far-l7 backs the waypoint-bound Services only: a port of a Service that uses a
# waypoint is reachable only through it (docs/security.md), so weft-l4 dials mesh/far,
# which no waypoint fronts.
SERVER_PODS = ("plain/near", "plain/far", "mesh/near", "mesh/near-nofp", "mesh/far", "mesh/far-l7")
# FAR_PODS also run the gRPC echo and the AI model server.
FAR_PODS = ("plain/far", "mesh/far", "mesh/far-l7")
FAR_ONLY = ("grpc", "ai")  # protocols served only in FAR_PODS
SSE_SERVER = {"ttft": 0.001, "tpot": 0.0005, "tokens": 4}
# The AI policy workloads' model server: answers at once, so the tables show the path's
# cost (what the waypoint's AI stages add), not a made-up generation time.
AI_MODEL = "bench-model"
AI_SERVER: dict[str, Any] = {"model": AI_MODEL, "ttft": 0.0, "tpot": 0.0, "tokens": 8}
AI_PATH = "/v1/chat/completions"


def ai_policy(namespace: str, service: str, backend: str, port: int) -> str:
    """The AI workloads' policies on Service namespace/service: a token and request limit
    per caller that never denies at benchmark rates, and a ModelRoute sending AI_MODEL to
    Service backend:port (also benchmarks/hopcost.py's, in process)."""
    return f"""\
apiVersion: weft.dev/v1alpha1
kind: TokenRateLimit
metadata: {{name: bench-tokens, namespace: {namespace}}}
spec:
  targetRefs: [{{name: {service}}}]
  limits:
    - {{name: per-caller, by: principal, tokensPerMinute: 1000000000,
       requestsPerMinute: 1000000000}}
---
apiVersion: weft.dev/v1alpha1
kind: ModelRoute
metadata: {{name: bench-models, namespace: {namespace}}}
spec:
  targetRefs: [{{name: {service}}}]
  rules:
    - {{name: bench, models: [{AI_MODEL}], backendRefs: [{{name: {backend}, port: {port}}}]}}
"""


# Policies on Service mesh/far-ai (the waypoint's AI stages), the model sent to the far pods'
# model server through Service mesh/far. Same shapes as docs/ai-traffic.md.
AI_POLICY = ai_policy("mesh", "far-ai", "far", PORTS["ai"])
AI_POLICY_FILE = "bench-ai.yaml"


def _model_server(port: int, spec: Mapping[str, Any]) -> list[str]:
    """The lab model server's command line for one of the server specs above."""
    argv = [sys.executable, "-m", "agent.lab.workloads.model_server", "--port", str(port)]
    for flag in ("model", "ttft", "tpot", "tokens"):
        if flag in spec:
            argv += [f"--{flag}", str(spec[flag])]
    return [*argv, "--max-concurrency", "0"]


def ai_chat_body(stream: bool = False) -> bytes:
    """An OpenAI chat completion request of about 1 KB (a system and a user message), as the
    AI workloads send it; `stream` asks for SSE."""
    text = "the mesh routes every model call through the waypoint and counts its tokens "
    prompt = (text * 13)[:900]
    body: dict[str, Any] = {
        "model": AI_MODEL,
        "messages": [
            {"role": "system", "content": "You are a benchmark. Answer briefly."},
            {"role": "user", "content": prompt},
        ],
        "max_tokens": AI_SERVER["tokens"],
        "temperature": 0,
    }
    if stream:
        body["stream"] = True
    return json.dumps(body, separators=(",", ":")).encode()


# Workload protocol -> the name (before the pod) of the lab process serving it.
SERVER_PROCESS = {
    "tcp": "echo",
    "http": "http",
    "bulk": "iperf",
    "sse": "sse",
    "grpc": "grpc",
    "ai": "ai",
}

Progress = Callable[[str], None]


class Unavailable(Exception):
    """A scenario that cannot run here (yet); the report lists it with this reason."""


# --------------------------------------------------------------------------- registries


@dataclass(frozen=True)
class Target:
    """Where a scenario's client runs and connects (per workload protocol)."""

    client_pod: str
    host: str
    ports: Mapping[str, int]
    server_pod: str


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    baseline: str | None  # the scenario whose latency this one's "added" is measured over
    protocols: frozenset[str]  # which workloads apply (keys of PORTS)
    components: tuple[str, ...]  # lab processes counted as the mesh's or proxy's cost
    setup: Callable[[Bench], Target]
    description: str


SCENARIOS: dict[str, Scenario] = {}


def scenario(
    name: str,
    *,
    title: str,
    baseline: str | None,
    protocols: Iterable[str],
    components: Iterable[str] = (),
    description: str,
) -> Callable[[Callable[[Bench], Target]], Callable[[Bench], Target]]:
    def register(fn: Callable[[Bench], Target]) -> Callable[[Bench], Target]:
        SCENARIOS[name] = Scenario(
            name,
            title,
            baseline,
            frozenset(protocols),
            tuple(components),
            fn,
            description,
        )
        return fn

    return register


ALL = ("tcp", "http", "bulk", "sse")
L7 = ("http", "sse", "grpc", "ai")  # what the L7 proxies (waypoint, HAProxy) are measured on
AGENTS = ("agent-node-1", "agent-node-2")
WAYPOINT = (*AGENTS, "waypoint-mesh-waypoint")


@scenario(
    "direct",
    title="direct (cross node)",
    baseline=None,
    protocols=(*ALL, *FAR_ONLY),
    description="plain/client -> plain/far over the node link: no mesh, no proxy; the floor.",
)
def _direct(b: Bench) -> Target:
    return b.pod_target("plain/client", "plain/far")


@scenario(
    "direct-same",
    title="direct (same node)",
    baseline=None,
    protocols=("tcp", "bulk"),
    description="plain/client -> plain/near on one node: the floor for same-node scenarios.",
)
def _direct_same(b: Bench) -> Target:
    return b.pod_target("plain/client", "plain/near")


@scenario(
    "weft-l4",
    title="weft L4 (cross node, 2 tunnel hops)",
    baseline="direct",
    protocols=ALL,
    components=AGENTS,
    description="mesh/client -> mesh/far: captured by eBPF on node-1, HBONE (HTTP/2 CONNECT "
    "over mTLS 1.3) between the two agents, delivered to the pod by the node-2 agent.",
)
def _weft_l4(b: Bench) -> Target:
    b.require_mesh()
    return b.pod_target("mesh/client", "mesh/far")


@scenario(
    "weft-same-fastpath",
    title="weft same node, fast path on",
    baseline="direct-same",
    protocols=("tcp", "bulk"),
    components=("agent-node-1",),
    description="mesh/client -> mesh/near: policy allows it, so the eBPF fast path splices "
    "the two pod sockets in the kernel (sockmap) after the first connect.",
)
def _weft_same_fast(b: Bench) -> Target:
    b.require_mesh()
    return b.pod_target("mesh/client", "mesh/near")


@scenario(
    "weft-same-nofastpath",
    title="weft same node, fast path off",
    baseline="direct-same",
    protocols=("tcp", "bulk"),
    components=("agent-node-1",),
    description="mesh/client -> mesh/near-nofp (annotated weft.dev/fastpath=false): "
    "captured and relayed by the node-1 agent's userspace tunnel, no TLS (same node).",
)
def _weft_same_nofast(b: Bench) -> Target:
    b.require_mesh()
    return b.pod_target("mesh/client", "mesh/near-nofp")


@scenario(
    "stunnel",
    title="stunnel sidecars (mTLS, L4)",
    baseline="direct",
    protocols=ALL,
    components=("stunnel-client", "stunnel-server"),
    description="plain/client -> stunnel in plain/client (loopback) -> mTLS 1.3 -> stunnel "
    "in plain/far -> loopback -> server: a C sidecar pair, the L4 baseline.",
)
def _stunnel(b: Bench) -> Target:
    return b.start_stunnel()


@scenario(
    "haproxy",
    title="HAProxy sidecars (mTLS, L7 HTTP)",
    baseline="direct",
    protocols=L7,
    components=("haproxy-client", "haproxy-server"),
    description="plain/client -> HAProxy (HTTP mode) in plain/client -> mTLS 1.3 -> HAProxy "
    "in plain/far -> loopback -> server: a C L7 sidecar pair, the waypoint's baseline.",
)
def _haproxy(b: Bench) -> Target:
    return b.start_haproxy()


@scenario(
    "weft-waypoint",
    title="weft waypoint (L7)",
    baseline="direct",
    protocols=L7,
    components=WAYPOINT,
    description="mesh/client -> Service mesh/far-l7 (weft.dev/use-waypoint): node-1's agent "
    "hands the captured connection to the waypoint pod on its node (HTTP parsed, routed, "
    "re-originated) -> HBONE -> node-2 tunnel -> mesh/far-l7: an L7 proxy and one HBONE "
    "hop (docs/ARCHITECTURE.md, node-local L7).",
)
def _weft_waypoint(b: Bench) -> Target:
    b.require_mesh()
    return Target("mesh/client", b.vip("far-l7"), dict(PORTS), "mesh/far-l7")


@scenario(
    "weft-waypoint-ai",
    title="weft waypoint + AI policy",
    baseline="direct",
    protocols=("ai",),
    components=WAYPOINT,
    description="mesh/client -> Service mesh/far-ai (weft.dev/use-waypoint) with a "
    "TokenRateLimit (never denies) and a ModelRoute: the waypoint path of weft-waypoint plus "
    "the AI stages (read the OpenAI body, route by model, admit and charge tokens in the "
    "node's SQLite quota store, read usage from the JSON or SSE answer, GenAI metrics).",
)
def _weft_waypoint_ai(b: Bench) -> Target:
    b.require_mesh()
    b.apply_ai_policy()
    return Target("mesh/client", b.vip("far-ai"), dict(PORTS), "mesh/far-l7")


@dataclass(frozen=True)
class Workload:
    key: str
    title: str
    kind: str  # rr | max | sse | bulk | connrate
    protocol: str  # a key of PORTS: which server and which scenarios
    rate: float = 0.0  # requests/s (rr); 0 = closed loop
    connections: int = 1
    duration: float = 4.0
    pinned: bool = True  # every lab process (and the client) on one CPU
    count: int = 0  # sse: streams
    headline: bool = False
    messages: int = 0  # grpc: server-streaming messages per call (0: unary)
    group: str = ""  # a report section of its own ("grpc", "ai"); "" = the general tables

    @property
    def fixed_rate(self) -> bool:
        return self.kind == "rr" and self.rate > 0


def workloads(quick: bool = False) -> list[Workload]:
    """The run's workloads, in order. Pinned ones first (the cost of the path, stable run to
    run), then the unpinned ones that need both CPUs (capacity)."""
    d = 1.5 if quick else 4.0
    out: list[Workload] = []

    def rr(
        proto: str, rate: float, conns: int, pinned: bool = True, headline: bool = False
    ) -> None:
        pin = "pinned" if pinned else "2 CPUs"
        what = "TCP echo" if proto == "tcp" else "HTTP/1.1"
        out.append(
            Workload(
                f"{proto}-rr-{int(rate)}-c{conns}" + ("" if pinned else "-unpinned"),
                f"{what} 1 KB, {int(rate):,} req/s, {conns} conn ({pin})",
                "rr",
                proto,
                rate,
                conns,
                d,
                pinned,
                headline=headline,
            )
        )

    if quick:
        rr("tcp", 1000, 4, headline=True)
        rr("tcp", 100, 1)
        rr("http", 1000, 4)
    else:
        rr("tcp", 100, 1)
        rr("tcp", 100, 64)
        rr("tcp", 1000, 1)
        rr("tcp", 1000, 4, headline=True)
        rr("tcp", 1000, 64)
        rr("http", 100, 1)
        rr("http", 1000, 4)
        rr("http", 1000, 64)
    out.append(
        Workload(
            "sse-ttft",
            "SSE stream, time to first token (pinned)",
            "sse",
            "sse",
            count=60 if quick else 300,
        )
    )
    # gRPC and AI at 200 calls/s: the waypoint spends about 1 ms of CPU on a gRPC call, so
    # at 500/s the one pinned CPU (waypoint, agents, grpcio client and server) runs near 90 %
    # and p90/p99 measure queueing rather than the path.
    out += [
        Workload(
            "grpc-unary-200-c4",
            "gRPC unary 1 KB, 200 req/s, 4 conn (pinned)",
            "rr",
            "grpc",
            200,
            4,
            d,
            group="grpc",
        ),
        Workload(
            "grpc-stream-100-c4",
            "gRPC server streaming, 10 x 1 KB messages, 100 streams/s, 4 conn (pinned)",
            "rr",
            "grpc",
            100,
            4,
            d,
            messages=10,
            group="grpc",
        ),
        Workload(
            "ai-chat-200-c4",
            "OpenAI chat completion, 1 KB body, 200 req/s, 4 conn (pinned)",
            "rr",
            "ai",
            200,
            4,
            d,
            group="ai",
        ),
        Workload(
            "ai-sse-ttft",
            "OpenAI chat completion stream, time to first token (pinned)",
            "sse",
            "ai",
            count=60 if quick else 300,
            group="ai",
        ),
    ]
    rr("tcp", 1000, 4, pinned=False, headline=not quick)
    for proto in ("tcp", "http"):
        for conns in (1, 64) if not quick else (64,):
            what = "TCP echo (loadgen)" if proto == "tcp" else "HTTP/1.1 (wrk)"
            out.append(
                Workload(
                    f"{proto}-max-c{conns}",
                    f"{what} 1 KB, closed loop, {conns} conn (2 CPUs)",
                    "max",
                    proto,
                    0.0,
                    conns,
                    d,
                    pinned=False,
                )
            )
    out.append(
        Workload(
            "bulk",
            "bulk, one stream (iperf3, 2 CPUs)",
            "bulk",
            "bulk",
            duration=2.0 if quick else 3.0,
            pinned=False,
        )
    )
    for proto in ("tcp",) if quick else ("tcp", "http"):
        out.append(
            Workload(
                f"{proto}-connrate",
                f"new connections, {'TCP echo' if proto == 'tcp' else 'HTTP'} 1 KB, 8 workers "
                "(2 CPUs)",
                "connrate",
                proto,
                connections=8,
                duration=d if not quick else 1.5,
                pinned=False,
            )
        )
    return out


# --------------------------------------------------------------------------- the bench


@dataclass
class Measurement:
    scenario: str
    workload: str
    ok: bool = True
    error: str = ""
    requests: int = 0  # counted requests (streams, connections)
    work: int = 0  # requests including warm-up: the CPU denominator
    rps: float = math.nan
    errors: int = 0
    seconds: float = math.nan
    latency_us: dict[str, float] = field(default_factory=dict)
    histogram: dict[str, int] = field(default_factory=dict)
    cpu_s: dict[str, float] = field(default_factory=dict)  # component -> CPU seconds
    server_cpu_s: float = math.nan
    extra: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items()}
        out["cpu_per_1k"] = {c: per_thousand(s, self.work) for c, s in self.cpu_s.items()}
        out["cpu_per_1k_total"] = per_thousand(sum(self.cpu_s.values()), self.work)
        return out


def memory_mb(p: psutil.Process) -> dict[str, float]:
    """A process's RSS, PSS and USS in MB (PSS and USS read its smaps)."""
    m = p.memory_full_info()
    return {"rss_mb": m.rss / 2**20, "pss_mb": m.pss / 2**20, "uss_mb": m.uss / 2**20}


class Bench:
    def __init__(
        self,
        out_dir: Path,
        *,
        quick: bool,
        only: Iterable[str] = (),
        progress: Progress = print,
        profile: bool = False,
        workloads: Iterable[str] = (),
    ) -> None:
        self.out_dir = out_dir
        self.only_workloads = set(workloads)
        self.quick = quick
        self.only = set(only)
        self.progress = progress
        self.profile = profile
        self.lab = Lab(LAB_NAME)
        self.state: LabState | None = None
        self.mesh_up = False
        self.all_cpus = sorted(os.sched_getaffinity(0))
        self.pin_cpu = self.all_cpus[-1]
        self.pinned: bool | None = None
        self.samples: dict[tuple[str, str], list[float]] = {}
        self.rss: dict[str, dict[str, float]] = {}
        self.procs: dict[str, psutil.Process] = {}
        self.cgroups: dict[str, Path] = {}
        self.work = Path(LAB_NAME)  # replaced by the lab's run dir once up

    # ---- setup ----------------------------------------------------------------------------

    def selected(self) -> list[Scenario]:
        if not self.only:
            return list(SCENARIOS.values())
        return [s for s in SCENARIOS.values() if s.name in self.only]

    def up(self) -> LabState:
        t = time.monotonic()
        self.state = self.lab.up(plan(load_documents(MANIFEST, "bench-lab.yaml")[0]))
        self.work = Path(self.state.run_dir) / "bench"
        self.work.mkdir(parents=True, exist_ok=True)
        for pod in SERVER_PODS:
            self._start_servers(pod)
        for pod in SERVER_PODS:
            for proto, port in PORTS.items():
                if proto not in FAR_ONLY or pod in FAR_PODS:
                    self.wait_port(pod, port)
        self.progress(
            f"lab {LAB_NAME} up with servers in {len(SERVER_PODS)} pods "
            f"({time.monotonic() - t:.1f}s)"
        )
        return self.state

    def _start_servers(self, pod: str) -> None:
        assert self.state is not None
        tag = pod.replace("/", "-")
        py = sys.executable
        for name, argv in (
            (f"echo-{tag}", [py, "-m", "agent.lab.workloads.echo", "--port", str(PORTS["tcp"])]),
            (f"http-{tag}", [py, "-m", "benchmarks.httpecho", "--port", str(PORTS["http"])]),
            (f"iperf-{tag}", ["iperf3", "-s", "-p", str(PORTS["bulk"])]),
            (f"sse-{tag}", _model_server(PORTS["sse"], SSE_SERVER)),
        ):
            self.lab.start_process(self.state, name, argv, pod=pod)
        if pod not in FAR_PODS:
            return
        for name, argv in (
            (
                f"grpc-{tag}",
                [py, "-m", "agent.lab.workloads.grpc_echo", "--port", str(PORTS["grpc"])],
            ),
            (f"ai-{tag}", _model_server(PORTS["ai"], AI_SERVER)),
        ):
            self.lab.start_process(self.state, name, argv, pod=pod)

    def vip(self, service: str) -> str:
        assert self.state is not None
        return str(next(s["clusterIP"] for s in self.state.services if s["name"] == service))

    def wait_port(self, pod: str, port: int, host: str | None = None, limit: float = 20) -> None:
        assert self.state is not None
        p = self.state.pod(pod)
        addr = host or p.ip

        def probe() -> bool:
            import socket

            try:
                socket.create_connection((addr, port), timeout=0.5).close()
                return True
            except OSError:
                return False

        end = time.monotonic() + limit
        while time.monotonic() < end:
            if call_in(p.netns, probe):
                return
            time.sleep(0.05)
        raise RuntimeError(f"nothing listening on {addr}:{port} in {pod} after {limit}s")

    def pod_target(self, client: str, server: str) -> Target:
        assert self.state is not None
        return Target(client, self.state.pod(server).ip, dict(PORTS), server)

    def require_mesh(self) -> None:
        if self.mesh_up:
            return
        assert self.state is not None
        t = time.monotonic()
        mesh.install(self.lab, self.state, wait=90)
        self._annotate_nofastpath()
        self.mesh_up = True
        self.progress(f"weft installed: controller + 2 agents ({time.monotonic() - t:.1f}s)")

    def _annotate_nofastpath(self) -> None:
        """Rewrite the lab's Workloads with mesh/near-nofp annotated fastpath=false; wait
        until node-1 attaches mesh/near with the fast path and mesh/near-nofp without."""
        assert self.state is not None
        docs = mesh.lab_resources(self.state)
        for d in docs:
            m = d["metadata"]
            if d["kind"] == "Workload" and (m.get("namespace"), m["name"]) == ("mesh", "near-nofp"):
                m["annotations"] = {FASTPATH_ANNOTATION: "false"}
        f = mesh.paths(self.state)["config"] / "lab.yaml"
        tmp = f.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump_all(docs, sort_keys=False))
        tmp.replace(f)
        near = self.state.pod("mesh/near").ip
        nofp = self.state.pod("mesh/near-nofp").ip
        end = time.monotonic() + 30
        pods: dict[str, bool] = {}
        while time.monotonic() < end:
            dp = self.admin("node-1", "/datapath")
            pods = {p["ip"]: bool(p.get("fastpath")) for p in dp.get("pods", [])}
            if pods.get(near) is True and pods.get(nofp) is False:
                return
            time.sleep(0.1)
        raise RuntimeError(f"node-1 never attached {nofp} without the fast path: {pods}")

    def apply_ai_policy(self, limit: float = 30.0) -> None:
        """Write the TokenRateLimit and ModelRoute for mesh/far-ai where the controller reads
        config (beside the lab's resources), then call far-ai from mesh/client until the
        answer shows both stages at work: `x-weft-model-served` (ModelRoute) and the
        `x-ratelimit-*` headers (TokenRateLimit). Unavailable if that never happens."""
        assert self.state is not None
        f = mesh.paths(self.state)["config"] / AI_POLICY_FILE
        if not f.exists():
            tmp = f.with_suffix(".tmp")
            tmp.write_text(AI_POLICY)
            tmp.replace(f)
        body = self.work / "ai-probe.json"
        body.write_bytes(ai_chat_body())
        url = f"http://{self.vip('far-ai')}:{PORTS['ai']}{AI_PATH}"
        argv = [sys.executable, "-m", "agent.lab.workloads.llm_client", url, "--all-headers"]
        argv += ["--body", f"@{body}", "--timeout", "5"]
        seen: dict[str, Any] = {}
        end = time.monotonic() + limit
        while time.monotonic() < end:
            out = self.lab.run("mesh/client", argv, timeout=30)
            lines = [x for x in out.stdout.decode(errors="replace").splitlines() if x.strip()]
            with contextlib.suppress(ValueError, IndexError):
                seen = json.loads(lines[-1])
            if ai_policy_active(seen):
                self.progress("AI policy on mesh/far-ai active (ModelRoute, TokenRateLimit)")
                return
            time.sleep(0.5)
        raise Unavailable(f"the AI policy on mesh/far-ai never took effect; last answer {seen}")

    def admin(self, node: str, path: str) -> Any:
        assert self.state is not None
        return mesh.admin_get(mesh.admin_socket(self.state, node), path)

    def _certs(self) -> dict[str, proxies.CertFiles]:
        d = self.work / "certs"
        if not (d / "root.pem").exists():
            return proxies.make_certs(d)
        return {
            r: proxies.CertFiles(d / "root.pem", d / f"{r}.crt", d / f"{r}.key", d / f"{r}.pem")
            for r in ("client", "server")
        }

    def start_stunnel(self) -> Target:
        assert self.state is not None
        if not shutil.which("stunnel4") and not shutil.which("stunnel"):
            raise Unavailable("stunnel is not installed (make setup installs stunnel4)")
        exe = shutil.which("stunnel4") or shutil.which("stunnel") or "stunnel"
        certs = self._certs()
        far = self.state.pod("plain/far").ip
        client_routes, server_routes, ports = [], [], {}
        for proto, port in PORTS.items():
            if proto not in ALL:
                continue  # stunnel is measured on the L4 workloads (ALL) only
            local = {"tcp": 18000, "http": 18080, "bulk": 15201, "sse": 18001}[proto]
            tls = {"tcp": 19000, "http": 19080, "bulk": 19201, "sse": 19001}[proto]
            client_routes.append(proxies.Route(proto, f"127.0.0.1:{local}", f"{far}:{tls}"))
            server_routes.append(proxies.Route(proto, f"0.0.0.0:{tls}", f"127.0.0.1:{port}"))
            ports[proto] = local
        for role, pod, routes in (
            ("server", "plain/far", server_routes),
            ("client", "plain/client", client_routes),
        ):
            conf = self.work / f"stunnel-{role}.conf"
            conf.write_text(proxies.stunnel_config(role, routes, certs[role]))
            self.lab.start_process(self.state, f"stunnel-{role}", [exe, str(conf)], pod=pod)
            self.isolate(f"stunnel-{role}", pod)
        for r in server_routes:
            self.wait_port("plain/far", int(r.listen.rsplit(":", 1)[1]))
        for r in client_routes:
            self.wait_port("plain/client", int(r.listen.rsplit(":", 1)[1]), host="127.0.0.1")
        return Target("plain/client", "127.0.0.1", ports, "plain/far")

    def start_haproxy(self) -> Target:
        assert self.state is not None
        exe = shutil.which("haproxy")
        if exe is None:
            raise Unavailable("haproxy is not installed (make setup installs it)")
        certs = self._certs()
        far = self.state.pod("plain/far").ip
        locals_ = {"http": 28080, "sse": 28001, "grpc": 28051, "ai": 28002}
        tls = {"http": 29080, "sse": 29001, "grpc": 29051, "ai": 29002}
        client_routes = [
            proxies.Route(p, f"127.0.0.1:{locals_[p]}", f"{far}:{tls[p]}", h2=p == "grpc")
            for p in locals_
        ]
        server_routes = [
            proxies.Route(p, f"0.0.0.0:{tls[p]}", f"127.0.0.1:{PORTS[p]}", h2=p == "grpc")
            for p in locals_
        ]
        for role, pod, routes in (
            ("server", "plain/far", server_routes),
            ("client", "plain/client", client_routes),
        ):
            conf = self.work / f"haproxy-{role}.cfg"
            conf.write_text(proxies.haproxy_config(role, routes, certs[role]))
            check = subprocess.run(
                [exe, "-c", "-q", "-f", str(conf)], capture_output=True, check=False
            )
            if check.returncode != 0:
                raise RuntimeError(f"haproxy rejects {conf}: {check.stderr.decode()[-800:]}")
            self.lab.start_process(
                self.state, f"haproxy-{role}", [exe, "-db", "-f", str(conf)], pod=pod
            )
            self.isolate(f"haproxy-{role}", pod)
        for r in server_routes:
            self.wait_port("plain/far", int(r.listen.rsplit(":", 1)[1]))
        for r in client_routes:
            self.wait_port("plain/client", int(r.listen.rsplit(":", 1)[1]), host="127.0.0.1")
        return Target("plain/client", "127.0.0.1", dict(locals_), "plain/far")

    # ---- processes: CPU, memory, pinning ---------------------------------------------------

    def proc(self, name: str) -> psutil.Process | None:
        assert self.state is not None
        p = self.procs.get(name)
        if p is not None and p.is_running():
            return p
        for ps in self.lab.state().processes:
            if ps.name == name:
                with contextlib.suppress(psutil.Error):
                    self.procs[name] = psutil.Process(ps.pid)
                    return self.procs[name]
        return None

    def isolate(self, name: str, pod: str) -> None:
        """Move a baseline proxy into its own cgroup under its (unmeshed) pod's, so its CPU
        time is read exactly from cpu.stat, dead threads included. Only for plain pods: in
        a meshed pod the agent knows processes by their cgroup."""
        assert self.state is not None
        p = self.state.pod(pod)
        if p.meshed:
            raise ValueError(f"{pod} is meshed: its processes must stay in the pod's cgroup")
        proc = self.proc(name)
        if proc is None:
            raise RuntimeError(f"{name} is not running")
        cg = Path(p.cgroup) / f"bench-{name}"
        cg.mkdir(exist_ok=True)
        (cg / "cgroup.procs").write_text(f"{proc.pid}\n")
        self.cgroups[name] = cg

    def cpu_seconds(self, names: Iterable[str]) -> dict[str, float]:
        """CPU seconds (user + system) so far of each named lab process: from cgroup
        cpu.stat (µs resolution) for the agents (alone in their node's cgroup) and the
        isolated proxies, else from psutil (10 ms ticks)."""
        assert self.state is not None
        out = {}
        for n in names:
            cg = self.cgroups.get(n)
            if cg is None and n.startswith("agent-"):
                cg = Path(self.state.node(n.removeprefix("agent-")).cgroup)
            if cg is not None:
                with contextlib.suppress(OSError, ValueError):
                    out[n] = cgroup_cpu_seconds(cg)
                    continue
            p = self.proc(n)
            if p is None:
                continue
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                out[n] = t.user + t.system
        return out

    def record_memory(self, names: Iterable[str]) -> None:
        for n in names:
            p = self.proc(n)
            if p is None:
                continue
            with contextlib.suppress(psutil.Error):
                cur = self.rss.setdefault(n, {"rss_mb": 0.0, "pss_mb": 0.0, "uss_mb": 0.0})
                for k, v in memory_mb(p).items():
                    cur[k] = max(cur[k], v)
                cur["threads"] = float(p.num_threads())

    def pin(self, pinned: bool) -> None:
        """Put every thread of every lab process on one CPU (or back on all of them).

        Affinity is per thread, and threads and children inherit it, so new connection
        threads of the echo server and the proxies' workers follow. (cgroup cpusets would be
        simpler, but the lab's cgroup v2 hierarchy has no cpuset controller here.)"""
        if self.pinned == pinned:
            return
        assert self.state is not None
        cpus = {self.pin_cpu} if pinned else set(self.all_cpus)
        for procs in Path(self.state.cgroup).rglob("cgroup.procs"):
            for line in procs.read_text().split():
                for task in Path(f"/proc/{line}/task").glob("*"):
                    with contextlib.suppress(OSError, ValueError):
                        os.sched_setaffinity(int(task.name), cpus)
        self.pinned = pinned

    # ---- running -----------------------------------------------------------------------

    def client(self, w: Workload, t: Target, samples: Path) -> list[str]:
        py = sys.executable
        host, port = t.host, t.ports[w.protocol]
        if w.kind == "rr" or (w.kind == "max" and w.protocol == "tcp"):
            if w.protocol == "tcp":
                argv = [py, "-m", "agent.lab.workloads.loadgen", host, str(port), "--warmup", "100"]
            elif w.protocol == "grpc":
                mode = "stream" if w.messages else "unary"
                argv = [py, "-m", "benchmarks.grpc_client", mode, host, str(port)]
                argv += ["--warmup", "100"]
                argv += ["--messages", str(w.messages)] if w.messages else []
            else:
                argv = [py, "-m", "benchmarks.clients", "http", host, str(port), "--warmup", "100"]
                if w.protocol == "ai":
                    body = self.work / "ai-chat.json"
                    body.write_bytes(ai_chat_body())
                    argv += ["--path", AI_PATH, "--body-file", str(body)]
                    argv += ["--content-type", "application/json"]
            argv += ["--rate", f"{w.rate:g}", "-c", str(w.connections)]
            argv += ["--duration", f"{w.duration:g}", "--samples", str(samples)]
        elif w.kind == "max":
            script = self.work / "post.lua"
            script.write_text(proxies.WRK_POST_LUA)
            threads = 1 if w.connections == 1 else 2
            secs = f"{max(1, round(w.duration))}s"  # wrk takes whole seconds
            argv = ["wrk", "-t", str(threads), "-c", str(w.connections), "-d", secs]
            argv += ["--latency", "-s", str(script), f"http://{host}:{port}/echo"]
        elif w.kind == "sse" and w.protocol == "ai":
            body = self.work / "ai-chat-stream.json"
            body.write_bytes(ai_chat_body(stream=True))
            argv = [py, "-m", "agent.lab.workloads.llm_client", f"http://{host}:{port}{AI_PATH}"]
            argv += ["-n", str(w.count), "-c", "1", "--body", f"@{body}", "--timeout", "10"]
        elif w.kind == "sse":
            argv = [py, "-m", "agent.lab.workloads.llm_client", f"http://{host}:{port}"]
            argv += ["-n", str(w.count), "-c", "1", "--stream", "--max-tokens", "4"]
            argv += ["--timeout", "10", "--prompt", "hello mesh"]
        elif w.kind == "bulk":
            argv = ["iperf3", "-c", host, "-p", str(port), "-t", f"{w.duration:g}", "-J"]
        elif w.kind == "connrate":
            argv = [py, "-m", "benchmarks.clients", "connrate", host, str(port)]
            argv += ["-c", str(w.connections), "--duration", f"{w.duration:g}"]
            argv += ["--samples", str(samples)] + (["--http"] if w.protocol == "http" else [])
        else:
            raise ValueError(f"unknown workload kind {w.kind}")
        if w.pinned:
            argv = ["taskset", "-c", str(self.pin_cpu), *argv]
        return argv

    def measure(self, w: Workload, s: Scenario, t: Target) -> Measurement:
        assert self.state is not None
        self.pin(w.pinned)
        m = Measurement(s.name, w.key)
        samples = self.work / f"samples-{s.name}-{w.key}.txt"
        server = SERVER_PROCESS[w.protocol]
        server_proc = f"{server}-{t.server_pod.replace('/', '-')}"
        names = [*s.components, server_proc]
        argv = self.client(w, t, samples)
        before = self.cpu_seconds(names)
        timeout = w.duration + 60 + w.count * 0.2
        try:
            out = self.lab.run(t.client_pod, argv, timeout=timeout)
        except TimeoutError as e:
            m.ok, m.error = False, str(e)
            return m
        after = self.cpu_seconds(names)
        cpu = {n: after[n] - before[n] for n in after if n in before}
        m.server_cpu_s = cpu.pop(server_proc, math.nan)
        m.cpu_s = cpu
        stdout = out.stdout.decode(errors="replace")
        try:
            self._parse(w, m, stdout, samples)
        except (ValueError, KeyError, IndexError) as e:
            m.ok = False
            m.error = f"{e}: exit {out.returncode}: {stdout[-300:]} {out.stderr.decode()[-500:]}"
        if out.returncode != 0 and m.ok and not m.errors:
            m.ok = False
            m.error = f"exit {out.returncode}: {out.stderr.decode(errors='replace')[-500:]}"
        with contextlib.suppress(FileNotFoundError):
            samples.unlink()
        self.record_memory(s.components)
        return m

    def _parse(self, w: Workload, m: Measurement, stdout: str, samples: Path) -> None:
        if w.kind in ("rr", "connrate") or (w.kind == "max" and w.protocol == "tcp"):
            r = json.loads(stdout.strip().splitlines()[-1])
            m.requests = int(r["requests"])
            m.work = m.requests + (100 if w.kind != "connrate" else 0)
            m.rps = float(r["rps"])
            m.errors = int(r["errors"])
            m.seconds = float(r["seconds"])
            if r.get("first_error"):
                m.extra["first_error"] = r["first_error"]
            if not m.requests:
                raise ValueError(f"no request succeeded: {r.get('first_error', '?')}")
            for k in ("client_cpu_s", "first_message_us", "messages"):
                if k in r:
                    m.extra[k] = r[k]
            us = [int(x) / 1000.0 for x in samples.read_text().split()]
            self._keep(w, m, us)
        elif w.kind == "max":
            r = parse_wrk(stdout)
            m.requests = m.work = int(r["requests"])
            m.rps = r["rps"]
            m.errors = int(r["errors"])
            m.seconds = r["seconds"]
            m.latency_us = r["latency_us"]
            m.extra["latency_note"] = "wrk: closed loop, not corrected for coordinated omission"
        elif w.kind == "sse":
            ttft, errors = [], 0
            for line in stdout.splitlines():
                if not line.startswith("{"):
                    continue
                r = json.loads(line)
                if r.get("status") == 200 and r.get("ttft_s") is not None and r.get("done"):
                    ttft.append(float(r["ttft_s"]) * 1e6)
                else:
                    errors += 1
            m.requests = m.work = len(ttft)
            m.errors = errors
            m.extra["server"] = dict(AI_SERVER if w.protocol == "ai" else SSE_SERVER)
            self._keep(w, m, ttft)
        elif w.kind == "bulk":
            r = json.loads(stdout)
            if "error" in r:
                raise ValueError(f"iperf3: {r['error']}")
            end = r["end"]
            rx = end["sum_received"]
            m.seconds = float(rx["seconds"])
            m.extra["bytes"] = int(rx["bytes"])
            m.extra["MBps"] = float(rx["bits_per_second"]) / 8 / 1e6
            m.extra["retransmits"] = end.get("sum_sent", {}).get("retransmits")
            gb = int(rx["bytes"]) / 1e9
            m.extra["cpu_s_per_GB"] = {c: v / gb for c, v in m.cpu_s.items()} if gb else {}
            m.requests = m.work = 0

    def _keep(self, w: Workload, m: Measurement, us: list[float]) -> None:
        us.sort()
        m.latency_us = summarize_us(us)
        m.histogram = histogram(us)
        self.samples[(w.key, m.scenario)] = us

    # ---- the whole run -----------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        started = time.monotonic()
        try:
            self.up()
            targets: dict[str, Target] = {}
            skipped: dict[str, str] = {}
            for s in self.selected():
                try:
                    targets[s.name] = s.setup(self)
                except Unavailable as e:
                    skipped[s.name] = str(e)
                    self.progress(f"scenario {s.name}: skipped ({e})")
            plan_ = [
                (w, [SCENARIOS[n] for n in targets if w.protocol in SCENARIOS[n].protocols])
                for w in workloads(self.quick)
                if not self.only_workloads or w.key in self.only_workloads
            ]
            plan_ = [(w, ss) for w, ss in plan_ if ss]
            total = sum(len(ss) for _, ss in plan_)
            self.progress(f"{len(targets)} scenarios, {len(plan_)} workloads, {total} measurements")
            results: list[Measurement] = []
            i = 0
            for w, ss in plan_:
                for s in ss:
                    i += 1
                    m = self.measure(w, s, targets[s.name])
                    results.append(m)
                    self.progress(
                        f"[{i}/{total} {time.monotonic() - started:5.0f}s] {w.key:22} "
                        f"{s.name:21} {_brief(w, m)}"
                    )
            mesh_state = self._mesh_state() if self.mesh_up else {}
            profile = self._profile(targets) if self.profile else {}
            return {
                "scenarios": {
                    s.name: {
                        "title": s.title,
                        "baseline": s.baseline,
                        "protocols": sorted(s.protocols),
                        "components": list(s.components),
                        "description": s.description,
                        **({"skipped": skipped[s.name]} if s.name in skipped else {}),
                    }
                    for s in self.selected()
                },
                "workloads": [w.__dict__ for w, _ in plan_],
                "measurements": [m.as_json() for m in results],
                "memory": self.rss,
                "mesh": mesh_state,
                "profile": profile,
                "pinned_cpu": self.pin_cpu,
                "sse_server": SSE_SERVER,
                "ai_server": AI_SERVER,
                "ai_policy": AI_POLICY if "weft-waypoint-ai" in targets else "",
                "seconds": time.monotonic() - started,
            }
        finally:
            self.lab.down()

    def _mesh_state(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for node in ("node-1", "node-2"):
            with contextlib.suppress(OSError, ValueError):
                out[node] = {
                    "datapath_counters": self.admin(node, "/datapath").get("counters", {}),
                    "tunnel_pool": self.admin(node, "/tunnel").get("pool", []),
                }
        return out

    def _profile(self, targets: Mapping[str, Target]) -> dict[str, Any]:
        """py-spy on weft's processes during extra runs (not the measured ones) of each weft
        scenario present: the agents under weft-l4 (TCP echo), the agents and the waypoint
        under weft-waypoint (HTTP). Once sampling Python frames (non-blocking; py-spy leaves
        out idle threads; a C call is charged to the Python function making it), once with
        native frames (the process is paused per sample, so fewer samples; idle leaves such
        as epoll_wait are dropped)."""
        spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        if not Path(spy).exists():
            self.progress("profile: py-spy not found (pip install py-spy); skipped")
            return {"skipped": "py-spy not installed"}
        out: dict[str, Any] = {}
        for name, proto in (("weft-l4", "tcp"), ("weft-waypoint", "http")):
            if name in targets:
                out[name] = self._profile_one(spy, SCENARIOS[name], targets[name], proto)
        return out

    def _profile_one(self, spy: str, s: Scenario, t: Target, proto: str) -> dict[str, Any]:
        w = Workload("profile", "profile", "rr", proto, 1000, 4, 8.0 if not self.quick else 3.0)
        out: dict[str, Any] = {}
        for mode, opts in (
            ("python", ["--rate", "1000", "--nonblocking"]),
            ("native", ["--rate", "250", "--native"]),
        ):
            spies = {}
            for comp in s.components:
                p = self.proc(comp)
                if p is None:
                    continue
                f = self.work / f"profile-{s.name}-{mode}-{comp}.txt"
                argv = [spy, "record", "--pid", str(p.pid), *opts, "--format", "raw"]
                argv += ["--output", str(f), "--duration", f"{w.duration + 3:g}"]
                spies[comp] = (
                    f,
                    subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
                )
            time.sleep(1.0)
            m = self.measure(w, s, t)
            res: dict[str, Any] = {"requests": m.work, "cpu_s": m.cpu_s, "latency_us": m.latency_us}
            for comp, (f, proc) in spies.items():
                try:
                    proc.wait(timeout=w.duration + 30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                if f.exists():
                    res[comp] = profile_summary(f.read_text(), m.cpu_s.get(comp, 0.0), m.work)
                    shutil.copy(f, self.out_dir / f.name)
            out[mode] = res
            self.progress(f"profile {s.name} ({mode} frames) written: py-spy, {m.work} requests")
        return out


def _brief(w: Workload, m: Measurement) -> str:
    if not m.ok:
        return f"FAILED: {m.error[:200]}"
    lat = m.latency_us
    cpu = per_thousand(sum(m.cpu_s.values()), m.work)
    err = f" errors={m.errors}" if m.errors else ""
    if w.kind == "bulk":
        return f"{m.extra.get('MBps', math.nan):8.1f} MB/s"
    rate = f"{m.rps:8.0f}/s" if w.kind in ("max", "connrate") else ""
    return (
        f"p50 {lat.get('p50', math.nan):7.0f} p99 {lat.get('p99', math.nan):7.0f} µs "
        f"{rate} cpu/1k {cpu:.3f}s{err}"
    )


# --------------------------------------------------------------------------- parsers


def ai_policy_active(answer: Mapping[str, Any]) -> bool:
    """An llm_client result (with --all-headers) answered through the waypoint's AI stages:
    200, the ModelRoute's x-weft-model-served and the TokenRateLimit's x-ratelimit-*."""
    headers = {str(k).lower() for k in (answer.get("headers") or {})}
    return (
        answer.get("status") == 200
        and "x-weft-model-served" in headers
        and any(h.startswith("x-ratelimit-") for h in headers)
    )


def cgroup_cpu_seconds(cg: Path) -> float:
    """usage_usec from a cgroup v2 cpu.stat (present even without the cpu controller)."""
    for line in (cg / "cpu.stat").read_text().splitlines():
        k, _, v = line.partition(" ")
        if k == "usage_usec":
            return int(v) / 1e6
    raise ValueError(f"no usage_usec in {cg}/cpu.stat")


_UNITS = {"us": 1.0, "ms": 1000.0, "s": 1e6, "m": 60e6, "h": 3600e6}


def _duration_us(text: str) -> float:
    for unit in ("us", "ms", "s", "m", "h"):
        if text.endswith(unit):
            return float(text[: -len(unit)]) * _UNITS[unit]
    return float(text)


def parse_wrk(text: str) -> dict[str, Any]:
    """Requests, errors, req/s and latency percentiles (µs) from `wrk --latency` output."""
    lat: dict[str, float] = {}
    requests = errors = 0
    rps = seconds = math.nan
    in_dist = False
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("Latency Distribution"):
            in_dist = True
            continue
        if in_dist:
            parts = line.split()
            if len(parts) == 2 and parts[0].endswith("%"):
                p = float(parts[0][:-1])
                lat["p" + f"{p:g}".replace(".", "_")] = _duration_us(parts[1])
                continue
            in_dist = False
        if " requests in " in line:
            head, _, rest = line.partition(" requests in ")
            requests = int(head)
            seconds = _duration_us(rest.split(",")[0].strip()) / 1e6
        elif line.startswith("Requests/sec:"):
            rps = float(line.split(":", 1)[1])
        elif line.startswith("Socket errors:"):
            errors += sum(int(x.split()[-1]) for x in line.split(":", 1)[1].split(","))
        elif line.startswith("Non-2xx or 3xx responses:"):
            errors += int(line.split(":", 1)[1])
    if "p99" not in lat:
        raise ValueError("no latency distribution in wrk output (was --latency given?)")
    return {
        "requests": requests,
        "errors": errors,
        "rps": rps,
        "seconds": seconds,
        "latency_us": lat,
    }


# Leaf frames of a thread blocked waiting (native profiles): not CPU time.
IDLE_LEAVES = frozenset(
    {
        "epoll_wait",
        "epoll_pwait",
        "epoll_pwait2",
        "poll",
        "ppoll",
        "select",
        "pselect",
        "pselect6",
        "futex",
        "syscall",
        "nanosleep",
        "clock_nanosleep",
        "pthread_cond_wait",
        "pthread_cond_timedwait",
        "sem_wait",
        "sem_timedwait",
        "accept",
        "accept4",
    }
)


def profile_summary(raw: str, cpu_s: float, requests: int, top: int = 20) -> dict[str, Any]:
    """Top functions by self and inclusive samples from py-spy's raw (collapsed) output,
    with µs of agent CPU per request each stands for (share x CPU seconds / requests)."""
    self_n: dict[str, int] = {}
    incl_n: dict[str, int] = {}
    total = idle = 0
    for line in raw.splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        count = int(n)
        frames = [_frame(f) for f in stack.split(";")]
        frames = [f for f in frames if f]
        if not frames:
            continue
        if frames[-1].split(" (")[0] in IDLE_LEAVES:
            idle += count
            continue
        total += count
        self_n[frames[-1]] = self_n.get(frames[-1], 0) + count
        for f in set(frames):
            incl_n[f] = incl_n.get(f, 0) + count
    us_per_sample = cpu_s / requests * 1e6 / total if total and requests else math.nan

    def rows(d: dict[str, int]) -> list[dict[str, Any]]:
        best = sorted(d.items(), key=lambda kv: -kv[1])[:top]
        return [
            {
                "function": f,
                "share": n / total,
                "us_per_request": n * us_per_sample,
            }
            for f, n in best
        ]

    return {
        "samples": total,
        "idle_samples_dropped": idle,
        "cpu_us_per_request": cpu_s / requests * 1e6 if requests else math.nan,
        "self": rows(self_n),
        "inclusive": rows(incl_n),
    }


def _frame(f: str) -> str:
    """'recv (socket.py:123)' or 'process 123:"python"' -> 'recv (socket.py)'; drops
    py-spy's thread and process pseudo-frames."""
    f = f.strip()
    if f.startswith(("process ", "thread ")):
        return ""
    name, _, where = f.partition(" (")
    if where:
        path = where.rstrip(")").rsplit(":", 1)[0]
        short = "/".join(path.split("/")[-2:])
        return f"{name} ({short})"
    return name
