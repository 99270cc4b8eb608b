"""Install weft on a lab: the controller, one agent per node, and the lab's resources.

    fabric netns   controller  10.0.0.1:15012 (mTLS) / :15010 (bootstrap) / :15014 metrics
    node netns     agent       <node ip>:15001 / :15008 / :15020 / :15021
                               admin API on <run dir>/nodes/<node>/admin.sock

The lab writes what a Kubernetes source would derive from the API server: a Node per lab
node (its tunnel address) and a Workload per pod (identity, address, labels, cgroup), and
the lab's Services, into the controller's config directory. Each agent bootstraps with a
token the lab creates for its node.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
import urllib.parse
from pathlib import Path
from typing import Any

import yaml

from agent.keeper import KEEPER_SOCKET
from agent.lab.topology import SHM_ROOT, Lab, LabState, ProcessState, wait_exit
from agent.netns import call_in
from controller.errors import NotFound, WeftError
from controller.model.workloads import WAYPOINT_LABEL
from controller.tokens import TokenStore

CONTROLLER = "controller"
SERVER_NAME = "weft-controller.weft-system.svc"


def paths(state: LabState) -> dict[str, Path]:
    run = Path(state.run_dir)
    return {
        "config": run / "controller" / "config",
        "state": run / "controller" / "state",
        "admin": run / "controller.sock",
        "bundle": run / "controller" / "state" / "trust-bundle.pem",
    }


def node_dir(state: LabState, node: str) -> Path:
    return Path(state.run_dir) / "nodes" / node


def identity_dir(state: LabState, node: str) -> Path:
    """The node agent's identity store: memory-backed (agent/identity/store.py)."""
    return SHM_ROOT / state.name / node


def admin_socket(state: LabState, node: str) -> Path:
    return node_dir(state, node) / "admin.sock"


def workload_socket(state: LabState, node: str) -> Path:
    return node_dir(state, node) / "workload.sock"


def lab_resources(state: LabState) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for n in state.nodes:
        docs.append(
            {
                "apiVersion": "weft.dev/v1alpha1",
                "kind": "Node",
                "metadata": {"name": n.name},
                "spec": {"addresses": [n.ip]},
            }
        )
    cg_root = Path(state.cgroup).parents[1]  # <cgroup2 root>/weft/<lab> -> <cgroup2 root>
    for p in state.pods:
        docs.append(
            {
                "apiVersion": "weft.dev/v1alpha1",
                "kind": "Workload",
                "metadata": {"name": p.name, "namespace": p.namespace, "labels": p.labels},
                "spec": {
                    "serviceAccount": p.service_account,
                    "node": p.node,
                    "addresses": [p.ip],
                    "mesh": p.meshed,
                    "cgroup": str(Path(p.cgroup).relative_to(cg_root)),
                    "probePorts": p.probe_ports,
                },
            }
        )
    for s in state.services:
        docs.append(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {
                    "name": s["name"],
                    "namespace": s["namespace"],
                    "labels": s.get("labels", {}),
                },
                "spec": {
                    "selector": s["selector"],
                    "clusterIP": s["clusterIP"],
                    "ports": s["ports"],
                },
            }
        )
    return docs


def write_resources(state: LabState) -> Path:
    p = paths(state)["config"]
    p.mkdir(parents=True, exist_ok=True)
    f = p / "lab.yaml"
    tmp = f.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump_all(lab_resources(state), sort_keys=False))
    tmp.replace(f)
    return f


def install(
    lab: Lab,
    state: LabState,
    *,
    wait: float = 60.0,
    fastpath: bool = True,
    datapath: str = "ebpf",
    extra_env: dict[str, str] | None = None,
) -> None:
    """Start the controller and an agent per node; wait until every agent is ready."""
    p = paths(state)
    write_resources(state)
    p["state"].mkdir(parents=True, exist_ok=True, mode=0o700)
    tokens = TokenStore(p["state"] / "node-tokens.json")
    env = {
        "WEFT_LOG_LEVEL": os.environ.get("WEFT_LOG_LEVEL", "INFO"),
        "WEFT_FLOW_EXPORT_INTERVAL": "1",  # the lab is watched closely: fresher flow metrics
        **(extra_env or {}),
    }
    fabric = state.fabric_ip
    extra: list[str] = []
    if state.prometheus:
        extra = ["--prometheus-url", start_prometheus(lab, state, wait)]
    lab.start_process(
        state,
        CONTROLLER,
        [
            sys.executable,
            "-m",
            "controller",
            "--trust-domain",
            state.trust_domain,
            "--config-dir",
            str(p["config"]),
            "--state-dir",
            str(p["state"]),
            "--listen",
            f"{fabric}:15012",
            "--bootstrap-listen",
            f"{fabric}:15010",
            "--admin-socket",
            str(p["admin"]),
            "--metrics-listen",
            f"{fabric}:15014",
            "--server-name",
            SERVER_NAME,
            "--server-ip",
            fabric,
            "--poll-interval",
            "0.2",
            *extra,
        ],
        env=env,
    )
    _wait(
        lambda: p["bundle"].exists() and p["admin"].exists(),
        wait,
        "the controller to start",
        lab,
        state,
        CONTROLLER,
    )
    for n in state.nodes:
        d = node_dir(state, n.name)
        d.mkdir(parents=True, exist_ok=True)
        token, _ = tokens.create(n.name, 24 * 3600)
        tf = d / "token"
        tf.write_text(token)
        tf.chmod(0o600)
        start_keeper(lab, state, n.name, env=env)
        start_agent(lab, state, n.name, fastpath=fastpath, datapath=datapath, env=env)
    for n in state.nodes:
        wait_ready(lab, state, n.name, wait)
    waypoint_pods = [pod.key for pod in state.pods if WAYPOINT_LABEL in pod.labels]
    for key in waypoint_pods:
        start_keeper(lab, state, pod=key, env=env)
        start_waypoint(lab, state, key, env=env)
    for key in waypoint_pods:
        wait_waypoint(lab, state, key, wait)


PROMETHEUS = "prometheus"


def start_prometheus(lab: Lab, state: LabState, wait: float = 60.0) -> str:
    """Debian's Prometheus in the fabric, scraping the controller, every agent and every
    waypoint each second; returns its URL."""
    import shutil
    import urllib.request

    if shutil.which("prometheus") is None:
        raise WeftError(
            "the lab manifest asks for a Prometheus (spec.prometheus) and none is installed",
            hint="make setup installs Debian's prometheus",
        )
    d = paths(state)["state"].parent / "prometheus"
    d.mkdir(parents=True, exist_ok=True)
    jobs = {
        "weft-controller": [f"{state.fabric_ip}:15014"],
        "weft-agents": [f"{n.ip}:15020" for n in state.nodes],
        "weft-waypoints": [f"{p.ip}:15020" for p in state.pods if WAYPOINT_LABEL in p.labels],
    }
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [
            {"job_name": job, "static_configs": [{"targets": targets}]}
            for job, targets in jobs.items()
            if targets
        ],
    }
    (d / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))
    addr = f"{state.fabric_ip}:9090"
    lab.start_process(
        state,
        PROMETHEUS,
        [
            "prometheus",
            f"--config.file={d / 'prometheus.yml'}",
            f"--storage.tsdb.path={d / 'data'}",
            f"--web.listen-address={addr}",
            "--storage.tsdb.retention.time=2h",
        ],
    )
    url = f"http://{addr}"

    def ready() -> bool:
        def get() -> bool:
            try:
                with urllib.request.urlopen(url + "/-/ready", timeout=2) as r:
                    return r.status == 200
            except OSError:
                return False

        return call_in(state.fabric_netns, get)

    _wait(ready, wait, "Prometheus to be ready", lab, state, PROMETHEUS)
    return url


def start_waypoint(lab: Lab, state: LabState, pod: str, env: dict[str, str] | None = None) -> None:
    """A waypoint runs in its pod like any workload, and speaks HBONE on the pod's address."""
    p = state.pod(pod)
    lab.start_process(
        state,
        f"waypoint-{p.namespace}-{p.name}",
        [
            sys.executable,
            "-m",
            "agent.cli",
            "waypoint",
            "run",
            "--name",
            p.labels[WAYPOINT_LABEL],
            "--listen",
            f"{p.ip}:15008",
            "--workload-socket",
            str(workload_socket(state, p.node)),
            "--metrics-listen",
            f"{p.ip}:15020",
            "--quota-store",
            quota_store(state, p.node),
            "--keeper-socket",
            str(pod_keeper_socket(state, pod)),
            *access_log_args(state, f"waypoint-{p.namespace}-{p.name}"),
        ],
        pod=pod,
        env=env,
    )


def quota_store(state: LabState, node: str) -> str:
    """The waypoints' --quota-store: the manifest's spec.quotaStore with a Service name
    (`redis.ai`, `redis.ai.svc.cluster.local`) resolved to its first pod's address and
    target port (the lab has no DNS), or a SQLite file per node."""
    spec = state.quota_store
    if spec is None:
        return str(node_dir(state, node) / "waypoint-quota.db")
    u = urllib.parse.urlsplit(spec)
    host = u.hostname or ""
    parts = host.split(".")
    if len(parts) < 2 or not u.port:
        return spec
    svc = next(
        (s for s in state.services if s["name"] == parts[0] and s["namespace"] == parts[1]),
        None,
    )
    if svc is None:
        return spec
    pods = [
        p
        for p in state.pods
        if p.namespace == svc["namespace"]
        and all(p.labels.get(k) == v for k, v in svc["selector"].items())
    ]
    if not pods:
        raise WeftError(
            f"spec.quotaStore {spec}: Service {parts[1]}/{parts[0]} selects no pod",
            hint="add a pod running redis-server with the Service's selector labels",
        )
    port = next((p for p in svc["ports"] if p["port"] == u.port), None)
    target = port.get("targetPort", u.port) if port else u.port
    auth = u.netloc.rpartition("@")[0]
    netloc = (auth + "@" if auth else "") + f"{pods[0].ip}:{target}"
    return urllib.parse.urlunsplit(u._replace(netloc=netloc))


def wait_waypoint(lab: Lab, state: LabState, pod: str, wait: float = 60.0) -> None:
    import urllib.request

    p = state.pod(pod)

    def ready() -> bool:
        def fetch() -> bool:
            try:
                with urllib.request.urlopen(f"http://{p.ip}:15020/healthz/ready", timeout=2) as r:
                    return r.status == 200
            except OSError:
                return False

        return call_in(p.netns, fetch)

    _wait(
        ready, wait, f"waypoint {pod} to be ready", lab, state, f"waypoint-{p.namespace}-{p.name}"
    )


def agent_argv(
    state: LabState, node: str, *, fastpath: bool = True, datapath: str = "ebpf"
) -> list[str]:
    p = paths(state)
    n = state.node(node)
    d = node_dir(state, node)
    return [
        sys.executable,
        "-m",
        "agent.cli",
        "agent",
        "run",
        "--node",
        node,
        "--node-ip",
        n.ip,
        "--trust-domain",
        state.trust_domain,
        "--controller",
        f"{state.fabric_ip}:15012",
        "--bootstrap",
        f"{state.fabric_ip}:15010",
        "--controller-name",
        SERVER_NAME,
        "--ca-bundle",
        str(p["bundle"]),
        "--token-file",
        str(d / "token"),
        "--pin-root",
        n.bpffs,
        "--cgroup-mode",
        "lab",
        "--metrics-listen",
        f"{n.ip}:15020",
        "--ready-listen",
        f"{n.ip}:15021",
        "--admin-listen",
        "127.0.0.1:15000",
        "--admin-socket",
        str(admin_socket(state, node)),
        "--workload-socket",
        str(workload_socket(state, node)),
        "--state-dir",
        str(d / "state"),
        "--identity-dir",
        str(identity_dir(state, node)),
        # Holds the tunnel listeners across a crash (weft lab restart agent --kill).
        "--keeper-socket",
        str(keeper_socket(state, node)),
        # A restarted agent's predecessor relays its connections until they end or this
        # passes (weft lab restart agent); lab down kills whatever is left.
        "--drain-timeout",
        "60",
        "--datapath",
        datapath,
        *([] if fastpath else ["--no-fastpath"]),
        *access_log_args(state, f"agent-{node}"),
    ]


ACCESS_LOG_MB = 16  # a lab process's access log rotates past this; one older file is kept


def access_log_path(state: LabState, process: str) -> Path:
    """Where a lab process's access log goes (rotated: PATH and PATH.1)."""
    return Path(state.run_dir) / "logs" / f"{process}.access.log"


def access_log_args(state: LabState, process: str) -> list[str]:
    return [
        "--access-log",
        str(access_log_path(state, process)),
        "--access-log-max-mb",
        str(ACCESS_LOG_MB),
    ]


def keeper_socket(state: LabState, node: str) -> Path:
    return node_dir(state, node) / KEEPER_SOCKET


def pod_keeper_socket(state: LabState, pod: str) -> Path:
    p = state.pod(pod)
    return Path(state.run_dir) / "keepers" / f"{p.namespace}_{p.name}.sock"


def start_keeper(
    lab: Lab,
    state: LabState,
    node: str | None = None,
    *,
    pod: str | None = None,
    env: dict[str, str] | None = None,
) -> ProcessState:
    """The socket keeper (agent/keeper.py) of a node's agent, or of a waypoint `pod`, which
    the lab never restarts: it holds the listeners while the process is replaced or has
    crashed (in Kubernetes, a native sidecar in the agent's or the waypoint's pod)."""
    if pod is not None:
        p = state.pod(pod)
        name, sock = f"keeper-{p.namespace}-{p.name}", pod_keeper_socket(state, pod)
    else:
        assert node is not None
        name, sock = f"keeper-{node}", keeper_socket(state, node)
    proc = lab.start_process(
        state,
        name,
        [sys.executable, "-m", "agent.keeper", "--socket", str(sock)],
        node=node,
        pod=pod,
        env=env,
    )
    _wait(sock.exists, 10.0, f"the socket keeper {name}", lab, state, name)
    return proc


def start_agent(
    lab: Lab,
    state: LabState,
    node: str,
    *,
    fastpath: bool = True,
    datapath: str = "ebpf",
    env: dict[str, str] | None = None,
) -> ProcessState:
    return lab.start_process(
        state,
        f"agent-{node}",
        agent_argv(state, node, fastpath=fastpath, datapath=datapath),
        node=node,
        env=env,
    )


def wait_ready(
    lab: Lab, state: LabState, node: str, wait: float = 60.0, pid: int | None = None
) -> None:
    """Until the node's agent (the process `pid`, if given) says it is ready."""
    sock = admin_socket(state, node)

    def ready() -> bool:
        try:
            health = admin_get(sock, "/healthz")
        except (OSError, ValueError):
            return False
        return bool(health.get("ready")) and (pid is None or health.get("pid") == pid)

    _wait(ready, wait, f"the agent on {node} to be ready", lab, state, f"agent-{node}")


def admin_get(sock: Path, path: str, timeout: float = 5.0) -> Any:
    """GET a JSON document from an agent's (or anything's) admin Unix socket."""
    import http.client
    import socket

    class UnixConn(http.client.HTTPConnection):
        def connect(self) -> None:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(timeout)
            s.connect(str(sock))
            self.sock = s

    c = UnixConn("localhost", timeout=timeout)
    try:
        c.request("GET", path)
        r = c.getresponse()
        body = r.read()
        if r.status >= 400:
            raise ValueError(f"{path}: HTTP {r.status}: {body[:200]!r}")
        ctype = r.getheader("content-type", "")
        return json.loads(body) if "json" in ctype else body.decode()
    finally:
        c.close()


def node_get(state: LabState, node: str, url_path: str, port: int = 15020) -> str:
    """GET from a node's TCP endpoint (metrics, readiness) inside its netns."""
    import urllib.request

    n = state.node(node)

    def fetch() -> str:
        with urllib.request.urlopen(f"http://{n.ip}:{port}{url_path}", timeout=5) as r:
            return r.read().decode()

    return call_in(n.netns, fetch)


def _wait(pred: Any, limit: float, what: str, lab: Lab, state: LabState, proc: str) -> None:
    end = time.monotonic() + limit
    while time.monotonic() < end:
        if pred():
            return
        alive = next((p for p in lab.state().processes if p.name == proc), None)
        if alive is not None and not Path(f"/proc/{alive.pid}").exists():
            break
        time.sleep(0.1)
    log = next((p.log for p in lab.state().processes if p.name == proc), None)
    tail = Path(log).read_text(errors="replace")[-3000:] if log and Path(log).exists() else ""
    raise WeftError(f"timed out waiting for {what}", hint=f"its log ({log}) ends with:\n{tail}")


def restart_agent(
    lab: Lab, state: LabState, node: str, *, kill: bool = False, wait: float = 60.0
) -> tuple[int | None, int]:
    """What a DaemonSet's rolling update does to one node: start a new agent, which takes
    the node over from the running one (agent/restart.py: listens beside it, tells it to
    let go, adopts the data path); the old one drains its connections and exits. With
    `kill`, the old agent is SIGKILLed first (a crash), then the new one starts.
    (old pid, new pid)."""
    state.node(node)  # NotFound, naming the lab's nodes
    return _roll(
        lab,
        state,
        f"agent-{node}",
        f"no agent runs on node {node!r}",
        kill,
        lambda argv: lab.start_process(state, f"agent-{node}", argv, node=node),
        lambda new: wait_ready(lab, state, node, wait, pid=new.pid),
    )


def _roll(
    lab: Lab,
    state: LabState,
    name: str,
    missing: str,
    kill: bool,
    start: Any,
    ready: Any,
) -> tuple[int | None, int]:
    """A rolling update of one lab process: start its successor (after a SIGKILL of the
    running one with `kill`), wait until the successor is ready, then SIGTERM the old one,
    as deleting the old pod does; it drains what it holds and exits."""
    old = next((p for p in state.processes if p.name == name), None)
    if old is None:
        raise NotFound(missing, hint="weft lab status")
    if kill:
        with contextlib.suppress(ProcessLookupError):
            os.kill(old.pid, signal.SIGKILL)
        wait_exit(old.pid, 10.0)
    new = start(old.argv)
    ready(new)
    if not kill:
        with contextlib.suppress(ProcessLookupError):
            os.kill(old.pid, signal.SIGTERM)
    return old.pid, new.pid


def restart_waypoint(
    lab: Lab, state: LabState, pod: str, *, kill: bool = False, wait: float = 60.0
) -> tuple[int | None, int]:
    """What a Deployment's rolling update does to a waypoint, in the lab's one pod: start
    the new process beside the old one (it listens on the same port, SO_REUSEPORT, and
    registers its own handoff channel, which the agent prefers), wait until it is ready,
    then SIGTERM the old one, which stops taking connections and drains. With `kill`, the
    old one is SIGKILLed first. (old pid, new pid)."""
    p = state.pod(pod)
    name = f"waypoint-{p.namespace}-{p.name}"
    return _roll(
        lab,
        state,
        name,
        f"no waypoint runs in pod {pod!r}",
        kill,
        lambda argv: lab.start_process(state, name, argv, pod=pod),
        lambda new: _wait(
            lambda: _waypoint_ready(p, new.pid), wait, f"{pod} to be ready", lab, state, name
        ),
    )


def _waypoint_ready(p: Any, pid: int) -> bool:
    """Whether the waypoint process `pid` answers ready. Its old and new processes share the
    port during a restart, so ask a few times: each connection goes to one of them."""
    import urllib.request

    def ask() -> bool:
        for _ in range(8):
            try:
                with urllib.request.urlopen(f"http://{p.ip}:15020/config", timeout=2) as r:
                    doc = json.loads(r.read())
            except (OSError, ValueError):
                continue
            if doc.get("pid") == pid:
                return bool(doc.get("ready"))
        return False

    return bool(call_in(p.netns, ask))
