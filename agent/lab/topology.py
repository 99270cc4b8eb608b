"""Build and remove a lab: nodes and pods as network namespaces, pods in their own cgroups.

    fabric netns  ── bridge br0 10.0.0.1/24 (the node network; .1 also routes "outside")
        │ veth
    node netns    ── eth0 10.0.0.11/24, forwards between pods and the fabric
        │ veth (node side wp<hash>, no address, rp_filter=1)
    pod netns     ── eth0 10.244.1.2/32, default via 169.254.1.1 (static neighbour)

Pods get /32 addresses and a link-local gateway (the Calico pattern), so routing is the
same whether two pods share a node or not, and the node's strict reverse-path filter
stops a pod from spoofing another pod's or the node's address — which the STRICT inbound
check relies on.

Every kernel object is named from the lab name, so `down` (and `up` after a crash) can
find leftovers without the state file: netns `<lab>_*`, cgroups under weft/<lab>, bpffs
pins under /sys/fs/bpf/weft/<lab>.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent import cgroups
from agent.lab.manifest import LabPlan, PodPlan
from agent.netns import NETNS_RUN_DIR, spawn, write_sysctl
from controller.errors import EnvironmentProblem, NotFound, WeftError

if TYPE_CHECKING:
    from pyroute2 import IPRoute

GATEWAY = "169.254.1.1"  # pods' link-local next hop; answered by a static neighbour entry
GATEWAY_MAC = "ee:ee:ee:ee:ee:ee"  # the node-side veth of every pod carries this address
RUN_ROOT = Path(os.environ.get("WEFT_RUN_DIR", "/run/weft"))
# Memory-backed on any Linux (the agents' identity stores must be, agent/identity/store.py;
# /run is tmpfs on most distributions, not in every container).
SHM_ROOT = Path(os.environ.get("WEFT_SHM_DIR", "/dev/shm/weft"))
BPFFS_ROOT = Path("/sys/fs/bpf/weft")


def _ifname(prefix: str, *parts: str) -> str:
    # Interface names are at most 15 bytes; a hash keeps them unique across labs.
    return prefix + hashlib.sha1("/".join(parts).encode()).hexdigest()[:11]


@dataclass
class NodeState:
    name: str
    ip: str
    pod_cidr: str
    netns: str
    cgroup: str
    bpffs: str


@dataclass
class PodState:
    name: str
    namespace: str
    node: str
    ip: str
    service_account: str
    labels: dict[str, str]
    meshed: bool
    netns: str
    cgroup: str
    cgroup_id: int
    node_iface: str
    probe_ports: list[int] = field(default_factory=list)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass
class ProcessState:
    name: str
    pid: int
    log: str
    argv: list[str]


@dataclass
class LabState:
    name: str
    trust_domain: str
    fabric_netns: str
    fabric_ip: str
    node_network: str
    source: str
    run_dir: str
    cgroup: str
    nodes: list[NodeState] = field(default_factory=list)
    pods: list[PodState] = field(default_factory=list)
    services: list[dict[str, Any]] = field(default_factory=list)
    namespaces: dict[str, dict[str, str]] = field(default_factory=dict)
    processes: list[ProcessState] = field(default_factory=list)
    quota_store: str | None = None  # the manifest's spec.quotaStore
    prometheus: bool = False  # the manifest's spec.prometheus

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> LabState:
        raw = json.loads(text)
        raw["nodes"] = [NodeState(**n) for n in raw["nodes"]]
        raw["pods"] = [PodState(**p) for p in raw["pods"]]
        raw["processes"] = [ProcessState(**p) for p in raw["processes"]]
        return cls(**raw)

    def pod(self, ref: str) -> PodState:
        """A pod by `namespace/name`, or by bare name when that is unique."""
        if "/" in ref:
            found = [p for p in self.pods if p.key == ref]
        else:
            found = [p for p in self.pods if p.name == ref]
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise NotFound(
                f"pod name {ref!r} is ambiguous",
                hint="use namespace/name: " + ", ".join(p.key for p in found),
            )
        raise NotFound(
            f"no pod {ref!r} in lab {self.name}",
            hint="pods: " + ", ".join(p.key for p in self.pods),
        )

    def node(self, name: str) -> NodeState:
        for n in self.nodes:
            if n.name == name:
                return n
        raise NotFound(
            f"no node {name!r} in lab {self.name}",
            hint="nodes: " + ", ".join(n.name for n in self.nodes),
        )


def require_root() -> None:
    if os.geteuid() != 0:
        raise EnvironmentProblem(
            "the lab needs root (network namespaces, veth links and cgroups)",
            hint="run as root, e.g. sudo weft lab up",
        )


class CommandNotRunnable(WeftError):
    """`weft lab exec` was given a command that does not exist or cannot be executed."""


class Lab:
    """One lab on this machine, addressed by name."""

    def __init__(self, name: str = "weft", run_root: Path = RUN_ROOT) -> None:
        self.name = name
        self.run_dir = run_root / "lab" / name
        self.state_file = self.run_dir / "state.json"
        self.ns_prefix = f"{name}_"

    @property
    def cgroup(self) -> Path:
        return cgroups.cgroup2_root() / cgroups.WEFT_PARENT / self.name

    @property
    def bpffs(self) -> Path:
        return BPFFS_ROOT / self.name

    @property
    def shm_dir(self) -> Path:
        return SHM_ROOT / self.name

    # ---- reading -------------------------------------------------------------------

    def state(self) -> LabState:
        try:
            return LabState.from_json(self.state_file.read_text())
        except FileNotFoundError:
            raise NotFound(
                f"lab {self.name!r} is not up", hint=f"start it with: weft lab up --lab {self.name}"
            ) from None

    def exists(self) -> bool:
        return self.state_file.exists()

    # ---- up ------------------------------------------------------------------------

    def up(self, plan: LabPlan) -> LabState:
        require_root()
        if plan.name != self.name:
            raise ValueError(f"plan is for lab {plan.name}, not {self.name}")
        self.down()  # a crashed earlier run must not leave links or addresses behind
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "logs").mkdir(exist_ok=True)
        root = cgroups.make(self.cgroup)
        state = LabState(
            name=plan.name,
            trust_domain=plan.trust_domain,
            fabric_netns=f"{self.ns_prefix}fabric",
            fabric_ip=str(plan.fabric_ip),
            node_network=str(plan.node_network),
            source=plan.source,
            run_dir=str(self.run_dir),
            cgroup=str(root),
            namespaces=plan.namespaces,
            quota_store=plan.quota_store,
            prometheus=plan.prometheus,
            services=[
                {
                    "name": s.name,
                    "namespace": s.namespace,
                    "clusterIP": str(s.cluster_ip),
                    "selector": s.selector,
                    "labels": s.labels,
                    "ports": [p.model_dump(by_alias=True, exclude_none=True) for p in s.ports],
                }
                for s in plan.services
            ],
        )
        try:
            self._build_fabric(plan, state)
            for node in plan.nodes:
                self._build_node(plan, node.name, state)
            for pod in plan.pods:
                self._build_pod(plan, pod, state)
            self._route_between_nodes(plan, state)
            self._save(state)
            for pod in plan.pods:
                if pod.command:
                    argv = list(pod.command)
                    if argv[0] == "python":  # the Python weft runs on, with its packages
                        argv[0] = sys.executable
                    self.start_process(state, f"pod-{pod.namespace}-{pod.name}", argv, pod=pod.key)
        except BaseException:
            self.down()
            raise
        return state

    def _save(self, state: LabState) -> None:
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(state.to_json())
        tmp.replace(self.state_file)

    def _build_fabric(self, plan: LabPlan, state: LabState) -> None:
        from pyroute2 import IPRoute, netns  # pyroute2: about 20 MB, lab set-up only

        ns = state.fabric_netns
        netns.create(ns)
        with IPRoute(netns=ns) as ip:
            _up(ip, "lo")
            ip.link("add", ifname="br0", kind="bridge")
            br = ip.link_lookup(ifname="br0")[0]
            ip.addr("add", index=br, address=state.fabric_ip, prefixlen=plan.node_network.prefixlen)
            ip.link("set", index=br, state="up")

    def _build_node(self, plan: LabPlan, name: str, state: LabState) -> None:
        from pyroute2 import IPRoute, netns  # pyroute2: about 20 MB, lab set-up only

        node = plan.node(name)
        ns = f"{self.ns_prefix}node_{name}"
        netns.create(ns)
        outer = _ifname("wn", self.name, name)
        with IPRoute(netns=state.fabric_netns) as fab:
            fab.link("add", ifname=outer, kind="veth", peer={"ifname": "eth0", "net_ns_fd": ns})
            idx = fab.link_lookup(ifname=outer)[0]
            br = fab.link_lookup(ifname="br0")[0]
            fab.link("set", index=idx, master=br, state="up")
        with IPRoute(netns=ns) as ip:
            _up(ip, "lo")
            eth = ip.link_lookup(ifname="eth0")[0]
            ip.addr("add", index=eth, address=str(node.ip), prefixlen=plan.node_network.prefixlen)
            ip.link("set", index=eth, state="up")
            ip.route("add", dst="default", gateway=state.fabric_ip)
        write_sysctl(ns, "net/ipv4/ip_forward", "1")
        cg = cgroups.make(Path(state.cgroup) / "nodes" / name)
        state.nodes.append(
            NodeState(
                name=name,
                ip=str(node.ip),
                pod_cidr=str(node.pod_cidr),
                netns=ns,
                cgroup=str(cg),
                bpffs=str(self.bpffs / name),
            )
        )

    def _build_pod(self, plan: LabPlan, pod: PodPlan, state: LabState) -> None:
        from pyroute2 import IPRoute, netns  # pyroute2: about 20 MB, lab set-up only

        node_ns = f"{self.ns_prefix}node_{pod.node}"
        ns = f"{self.ns_prefix}pod_{pod.namespace}_{pod.name}"
        netns.create(ns)
        outer = _ifname("wp", self.name, pod.namespace, pod.name)
        with IPRoute(netns=node_ns) as ip:
            ip.link(
                "add",
                ifname=outer,
                kind="veth",
                address=GATEWAY_MAC,
                peer={"ifname": "eth0", "net_ns_fd": ns},
            )
            idx = ip.link_lookup(ifname=outer)[0]
            ip.link("set", index=idx, state="up")
        # Anti-spoofing: a pod may only send from its own address (see module docstring).
        write_sysctl(node_ns, f"net/ipv4/conf/{outer}/rp_filter", "1")
        with IPRoute(netns=node_ns) as ip:
            ip.route("add", dst=f"{pod.ip}/32", oif=ip.link_lookup(ifname=outer)[0], scope=253)
        with IPRoute(netns=ns) as ip:
            _up(ip, "lo")
            eth = ip.link_lookup(ifname="eth0")[0]
            ip.addr("add", index=eth, address=str(pod.ip), prefixlen=32)
            ip.link("set", index=eth, state="up")
            ip.route("add", dst=f"{GATEWAY}/32", oif=eth, scope=253)
            ip.neigh("add", dst=GATEWAY, lladdr=GATEWAY_MAC, ifindex=eth, state=0x80)  # PERMANENT
            ip.route("add", dst="default", gateway=GATEWAY, oif=eth)
        cg = cgroups.make(Path(state.cgroup) / "pods" / f"{pod.namespace}_{pod.name}")
        state.pods.append(
            PodState(
                name=pod.name,
                namespace=pod.namespace,
                node=pod.node,
                ip=str(pod.ip),
                service_account=pod.service_account,
                labels=pod.labels,
                meshed=pod.meshed,
                netns=ns,
                cgroup=str(cg),
                cgroup_id=cgroups.cgroup_id(cg),
                node_iface=outer,
                probe_ports=list(pod.probe_ports),
            )
        )

    def _route_between_nodes(self, plan: LabPlan, state: LabState) -> None:
        from pyroute2 import IPRoute  # pyroute2: about 20 MB, lab set-up only

        for node in plan.nodes:
            with IPRoute(netns=f"{self.ns_prefix}node_{node.name}") as ip:
                for other in plan.nodes:
                    if other.name != node.name:
                        ip.route("add", dst=str(other.pod_cidr), gateway=str(other.ip))
        # The fabric is the cluster network: it reaches every pod through the pod's node
        # (how Prometheus, running there, scrapes waypoint pods).
        with IPRoute(netns=state.fabric_netns) as ip:
            for node in plan.nodes:
                ip.route("add", dst=str(node.pod_cidr), gateway=str(node.ip))

    # ---- processes -----------------------------------------------------------------

    def start_process(
        self,
        state: LabState,
        name: str,
        argv: list[str],
        *,
        pod: str | None = None,
        node: str | None = None,
        env: dict[str, str] | None = None,
    ) -> ProcessState:
        """Start a long-running lab process (pod entrypoint, agent, controller) with a log.

        Pod processes run in the pod's netns and cgroup; node processes in the node's;
        anything else in the fabric netns under the lab's control cgroup. `down` kills them
        all through the cgroup tree, so nothing outlives the lab.
        """
        if pod is not None:
            p = state.pod(pod)
            where, cg = p.netns, Path(p.cgroup)
        elif node is not None:
            n = state.node(node)
            where, cg = n.netns, Path(n.cgroup)
        else:
            where, cg = state.fabric_netns, cgroups.make(Path(state.cgroup) / "control")
        log = Path(state.run_dir) / "logs" / f"{name}.log"
        with open(log, "ab") as out:
            proc = spawn(
                argv,
                netns=where,
                cgroup=cg,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})},
                new_session=True,
            )
        ps = ProcessState(name=name, pid=proc.pid, log=str(log), argv=argv)
        state.processes = [p for p in state.processes if p.name != name] + [ps]
        self._save(state)
        return ps

    def stop_process(self, state: LabState, name: str, timeout: float = 10.0) -> None:
        for p in state.processes:
            if p.name == name:
                _terminate(p.pid, timeout)
        state.processes = [p for p in state.processes if p.name != name]
        self._save(state)

    def exec(self, pod: str, argv: list[str]) -> int:
        """Run argv in the pod's netns and cgroup with this terminal's stdio; its exit code."""
        require_root()
        p = self.state().pod(pod)
        try:
            proc = spawn(argv, netns=p.netns, cgroup=Path(p.cgroup))
        except (FileNotFoundError, PermissionError) as e:
            # As a shell says it: 127 not found, 126 not executable.
            err = CommandNotRunnable(f"{argv[0]}: {e.strerror} (in pod {p.key})")
            err.exit_code = 127 if isinstance(e, FileNotFoundError) else 126
            raise err from None
        try:
            return proc.wait()
        except KeyboardInterrupt:
            proc.send_signal(signal.SIGINT)
            return proc.wait()

    def run(
        self, pod: str, argv: list[str], *, timeout: float = 30.0, input: bytes | None = None
    ) -> subprocess.CompletedProcess[bytes]:
        """Run argv in a pod and capture its output (for tests and the demo)."""
        p = self.state().pod(pod)
        proc = spawn(
            argv,
            netns=p.netns,
            cgroup=Path(p.cgroup),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            out, err = proc.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            raise TimeoutError(
                f"{argv[0]} in pod {pod} did not finish in {timeout}s: "
                f"{err.decode(errors='replace')[-500:]}"
            ) from None
        return subprocess.CompletedProcess(argv, proc.returncode, out, err)

    # ---- down ----------------------------------------------------------------------

    def down(self) -> list[str]:
        """Remove every process, netns, link, cgroup and pin of this lab. Idempotent."""
        from pyroute2 import netns  # pyroute2: about 20 MB, lab set-up only

        require_root()
        removed: list[str] = []
        with contextlib.suppress(EnvironmentProblem):
            cg = self.cgroup
            if cg.exists():
                cgroups.remove_tree(cg)
                removed.append(f"cgroup {cg}")
            with contextlib.suppress(OSError):
                cg.parent.rmdir()  # the shared weft/ parent, once no lab is left in it
        # Deleting a netns destroys its veths, and with them their peers.
        for ns in sorted(self._leftover_netns(), key=lambda n: "_fabric" in n):
            with contextlib.suppress(FileNotFoundError):
                netns.remove(ns)
            removed.append(f"netns {ns}")
        if self.bpffs.exists():
            shutil.rmtree(self.bpffs, ignore_errors=True)
            removed.append(f"bpffs {self.bpffs}")
        if self.run_dir.exists():
            shutil.rmtree(self.run_dir, ignore_errors=True)
            removed.append(f"state {self.run_dir}")
        if self.shm_dir.exists():
            shutil.rmtree(self.shm_dir, ignore_errors=True)
            removed.append(f"identity stores {self.shm_dir}")
        with contextlib.suppress(OSError):
            self.shm_dir.parent.rmdir()
        for empty in (self.bpffs.parent, self.run_dir.parent, self.run_dir.parent.parent):
            with contextlib.suppress(OSError):
                empty.rmdir()
        return removed

    def _leftover_netns(self) -> list[str]:
        try:
            return [n for n in os.listdir(NETNS_RUN_DIR) if n.startswith(self.ns_prefix)]
        except FileNotFoundError:
            return []


def all_lab_names(run_root: Path = RUN_ROOT) -> list[str]:
    """Labs known from state dirs, cgroups or netns names (for `weft lab down --all`)."""
    names: set[str] = set()
    with contextlib.suppress(FileNotFoundError):
        names.update(os.listdir(run_root / "lab"))
    with contextlib.suppress(EnvironmentProblem, FileNotFoundError):
        parent = cgroups.cgroup2_root() / cgroups.WEFT_PARENT
        # A cgroup directory also holds its interface files (cgroup.procs, ...): only
        # child cgroups (directories) are labs.
        names.update(e.name for e in os.scandir(parent) if e.is_dir(follow_symlinks=False))
    with contextlib.suppress(FileNotFoundError):
        for n in os.listdir(NETNS_RUN_DIR):
            m = _LAB_NETNS.match(n)
            if m:
                names.add(m.group(1))
    return sorted(names)


_LAB_NETNS = re.compile(r"^([a-z][a-z0-9-]*)_(fabric$|node_|pod_)")


def _up(ip: IPRoute, ifname: str) -> None:
    ip.link("set", index=ip.link_lookup(ifname=ifname)[0], state="up")


def wait_exit(pid: int, timeout: float) -> bool:
    """Whether process `pid` exited within `timeout` seconds (reaped if it is our child)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            waited, _ = os.waitpid(pid, os.WNOHANG)
            if waited == pid:
                return True
        except ChildProcessError:
            # Not our child (started by another weft command): poll for its exit instead.
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)


def _terminate(pid: int, timeout: float) -> None:
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    if not wait_exit(pid, timeout):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
