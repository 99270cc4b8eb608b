"""The node agent's eBPF data path: load, pin, attach to pod cgroups, configure, read.

    Datapath(settings).start()        compile (or reuse the cache), open or create the
                                      pinned maps, reuse or load the programs, adopt the
                                      cgroups a previous process attached
    .attach_pod(cgroup, ip, ...)      configure a pod and attach its programs
    .set_fastpath_pairs(...)          which same-node pairs may be spliced
    .original_destination(ip, port)   what the tunnel asks for each accepted connection
    .flows() .counters() .drop_counters()
    .stop()                           the process goes; the kernel keeps everything
    .uninstall()                      detach everything, remove every pin

Restart semantics: maps and programs are pinned under settings.pin_root and attached to
cgroups with legacy attach, which outlives the process. A new process finds the same maps
(origdst entries, flows, the fast-path sockhash) and, when the build hash matches, the same
programs, so an agent restart changes nothing in the kernel and spliced connections keep
flowing. A different build replaces each attachment atomically (BPF_F_REPLACE).

Two agents may share a kernel (the lab): all state is per pin root, and an agent only
touches cgroups listed in its own attachment registry (map weft_attachments_v1).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import ipaddress
import logging
import os
import struct
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from agent import cgroups
from agent.datapath import abi, bpfsys, compiler, preflight
from agent.datapath.maps import Map
from agent.datapath.reasons import Counter, DropReason
from agent.datapath.settings import DatapathSettings
from controller.errors import EnvironmentProblem, NotFound

log = logging.getLogger(__name__)

MAPS_DIR = "maps"
PROGS_DIR = "progs"
LINKS_DIR = "links"
LISTENERS = "weft_tunnel_listeners_v1"
PROG_PREFIX = "weft_"


@dataclass(frozen=True)
class Hook:
    """One program and where it attaches."""

    program: str
    prog_type: int
    expected_attach_type: int
    attach_type: int
    on_sockhash: bool = False  # attached to weft_fastpath_socks_v1 rather than a cgroup
    on_tunnel: bool = False  # attached to the tunnel's cgroup rather than pods'
    on_netns: bool = False  # a pinned link on the agent's network namespace (sk_lookup)


HOOKS: tuple[Hook, ...] = (
    Hook(
        "weft_connect4",
        bpfsys.PROG_CGROUP_SOCK_ADDR,
        bpfsys.ATTACH_CGROUP_INET4_CONNECT,
        bpfsys.ATTACH_CGROUP_INET4_CONNECT,
    ),
    Hook(
        "weft_connect6",
        bpfsys.PROG_CGROUP_SOCK_ADDR,
        bpfsys.ATTACH_CGROUP_INET6_CONNECT,
        bpfsys.ATTACH_CGROUP_INET6_CONNECT,
    ),
    Hook("weft_sockops", bpfsys.PROG_SOCK_OPS, 0, bpfsys.ATTACH_CGROUP_SOCK_OPS),
    Hook(
        "weft_inbound",
        bpfsys.PROG_CGROUP_SKB,
        bpfsys.ATTACH_CGROUP_INET_INGRESS,
        bpfsys.ATTACH_CGROUP_INET_INGRESS,
    ),
    Hook(
        "weft_fastpath_msg",
        bpfsys.PROG_SK_MSG,
        0,
        bpfsys.ATTACH_SK_MSG_VERDICT,
        on_sockhash=True,
    ),
    Hook(
        "weft_tunnel_egress",
        bpfsys.PROG_CGROUP_SKB,
        bpfsys.ATTACH_CGROUP_INET_EGRESS,
        bpfsys.ATTACH_CGROUP_INET_EGRESS,
        on_tunnel=True,
    ),
    Hook(
        "weft_original_dst",
        bpfsys.PROG_CGROUP_SOCKOPT,
        bpfsys.ATTACH_CGROUP_GETSOCKOPT,
        bpfsys.ATTACH_CGROUP_GETSOCKOPT,
        on_tunnel=True,
    ),
    Hook(
        "weft_tunnel_lookup",
        bpfsys.PROG_SK_LOOKUP,
        bpfsys.ATTACH_SK_LOOKUP,
        bpfsys.ATTACH_SK_LOOKUP,
        on_netns=True,
    ),
)
POD_HOOKS = tuple(h for h in HOOKS if not (h.on_sockhash or h.on_tunnel or h.on_netns))
TUNNEL_HOOKS = tuple(h for h in HOOKS if h.on_tunnel)
CGROUP_HOOKS = POD_HOOKS + TUNNEL_HOOKS
PROGRAM_NAMES = tuple(h.program for h in HOOKS)
SOCKHASH = "weft_fastpath_socks_v1"
FLOW_BATCH = 256  # flow records decoded at a time (flow_batches)


# ---- what callers get back ---------------------------------------------------------------


@dataclass(frozen=True)
class PodAttachment:
    """A meshed pod as the data path knows it."""

    cgroup: str
    """The pod's cgroup v2 directory (in Kubernetes the pod-level slice)."""
    ip: str
    strict: bool = False
    """Drop inbound TCP to the pod's listeners that did not come through the tunnel."""
    capture: bool = True
    """Redirect the pod's outbound TCP to the tunnel."""
    fastpath: bool = True
    """May be spliced with same-node peers (when policy and the node switch allow)."""
    inbound_exception_ports: frozenset[int] = frozenset()
    """Listening ports STRICT leaves open to anyone (portLevelMtls PERMISSIVE or DISABLE)."""
    probe_ports: frozenset[int] = frozenset()
    """Listening ports STRICT leaves open to the node itself only: the kubelet's probes
    come from the node's address, not through the tunnel."""
    excluded_ports: frozenset[int] = frozenset()
    """Destination ports the pod reaches directly, never through the tunnel."""
    excluded_cidrs: frozenset[str] = frozenset()
    """Destination networks the pod reaches directly."""
    cgroup_id: int = 0
    """Filled in by the data path: the cgroup's inode number."""


@dataclass(frozen=True)
class OriginalDestination:
    ip: str
    port: int
    cgroup_id: int
    """The pod that connected (map it to a workload identity)."""
    cookie: int
    """Its socket's cookie: the key of its flow record."""


@dataclass(frozen=True)
class Flow:
    """One socket of a meshed pod. Times are CLOCK_MONOTONIC ns (see unix_time)."""

    cookie: int
    cgroup_id: int
    direction: str  # "outbound" (the pod connected) or "inbound" (the pod accepted)
    local: tuple[str, int]
    remote: tuple[str, int]
    original_dst: tuple[str, int] | None
    bytes_sent: int
    """Sent over TCP and acknowledged."""
    bytes_received: int
    """Received over TCP."""
    fastpath_bytes_sent: int
    """Handed straight to the peer socket by the fast path (never on TCP)."""
    srtt_us: int
    total_retrans: int
    start_ns: int
    end_ns: int  # 0 while open
    redirected: bool
    fastpath: bool

    @property
    def closed(self) -> bool:
        return self.end_ns != 0

    def pack(self) -> bytes:
        """The record in PACKED_SIZE (83) bytes, for keeping many (the agent's ring of
        recently closed flows): as Flow objects they cost about 860 bytes each."""
        odst = self.original_dst
        return _PACKED.pack(
            self.cookie,
            self.cgroup_id,
            self.direction == "outbound",
            abi.ip_bytes(self.local[0]),
            self.local[1],
            abi.ip_bytes(self.remote[0]),
            self.remote[1],
            odst is not None,
            abi.ip_bytes(odst[0]) if odst else bytes(4),
            odst[1] if odst else 0,
            self.bytes_sent,
            self.bytes_received,
            self.fastpath_bytes_sent,
            self.srtt_us,
            self.total_retrans,
            self.start_ns,
            self.end_ns,
            self.redirected,
            self.fastpath,
        )

    @classmethod
    def unpack(cls, raw: bytes | bytearray | memoryview, offset: int = 0) -> Flow:
        v = _PACKED.unpack_from(raw, offset)
        cookie, cg, out, lip, lport, rip, rport, has_odst, oip, oport = v[:10]
        return cls(
            cookie,
            cg,
            "outbound" if out else "inbound",
            (abi.ip_str(lip), lport),
            (abi.ip_str(rip), rport),
            (abi.ip_str(oip), oport) if has_odst else None,
            *v[10:],
        )

    @property
    def started_at(self) -> float:
        return unix_time(self.start_ns)

    @property
    def ended_at(self) -> float | None:
        return unix_time(self.end_ns) if self.end_ns else None


# Flow.pack: cookie, cgroup, outbound, local, remote, original destination (present, ip,
# port), bytes sent / received / by the fast path, srtt, retransmits, start, end, flags.
_PACKED = struct.Struct("=QQ?4sH4sH?4sHQQQIIQQ??")
PACKED_SIZE = _PACKED.size


def unix_time(monotonic_ns: int) -> float:
    """bpf_ktime_get_ns() (CLOCK_MONOTONIC, since boot) to Unix seconds."""
    return (monotonic_ns + time.time_ns() - time.monotonic_ns()) / 1e9


@dataclass
class _Program:
    hook: Hook
    fd: int
    id: int


@dataclass
class StartReport:
    """What start() did, for logs and tests."""

    build: str
    compiled: bool
    """False when the bytecode came from the cache."""
    compile_seconds: float
    reused_programs: bool
    """True when the pinned programs of this build were kept (a plain restart)."""
    adopted_pods: int
    removed_stale: list[str] = field(default_factory=list)


# ---- the data path -----------------------------------------------------------------------


class Datapath:
    def __init__(self, settings: DatapathSettings) -> None:
        self.settings = settings
        self.pin_root = Path(settings.pin_root)
        self._maps: dict[str, Map] = {}
        self._progs: dict[str, _Program] = {}
        self._lock_fd = -1
        self._artifact: compiler.Artifact | None = None
        self.report: StartReport | None = None

    # ---- lifecycle -------------------------------------------------------------------

    @classmethod
    def open_pins(cls, pin_root: Path) -> Datapath:
        """A view over the pinned maps of an agent (running or not) for inspection:
        counters, flows, drops, attached pods. Loads no program, takes no lock."""
        root = Path(pin_root) / MAPS_DIR
        if not root.is_dir():
            raise NotFound(
                f"no weft data path pinned under {pin_root}",
                hint="is the agent running? its pin root is DatapathSettings.pin_root",
            )
        maps = {}
        for pin in sorted(root.iterdir()):
            fd = bpfsys.obj_get(str(pin))
            info = bpfsys.map_info(fd)
            maps[pin.name] = Map(pin.name, fd, info.type, info.key_size, info.value_size)
        dp = cls(DatapathSettings(tunnel_ip="0.0.0.0", pin_root=Path(pin_root)))
        dp._maps = maps
        with contextlib.suppress(RuntimeError, KeyError):
            node = dp.node_config()
            dp.settings = DatapathSettings(
                tunnel_ip=node.tunnel_ip,
                pin_root=Path(pin_root),
                outbound_port=node.outbound_port,
                inbound_port=node.inbound_port,
                socket_mark=node.socket_mark,
                fastpath=abi.NodeFlag.FASTPATH in node.flags,
            )
        return dp

    def start(
        self, pods: Iterable[PodAttachment] | None = None, *, lock_wait: float = 0.0
    ) -> StartReport:
        """Bring the data path up for this agent.

        `pods`: the pods that should be attached now; others a previous process attached
        are detached. None keeps every pod the previous process attached (an agent that
        restarts before it knows its pods must not open a window without capture), and
        only brings their programs up to this build; call reconcile() later.

        `lock_wait`: seconds to wait for a predecessor that is handing the data path over
        (agent/restart.py) to release the pin root's lock.
        """
        artifact = self.prepare()
        try:
            self._take_lock(lock_wait)
            self._check_layouts(artifact)
            self._open_maps(artifact)
            reused = self._load_programs(artifact)
            self._write_node_config(fastpath=self.settings.fastpath)
            sockhash = self._maps[SOCKHASH].fd
            msg = self._progs["weft_fastpath_msg"]
            bpfsys.prog_attach(msg.fd, sockhash, msg.hook.attach_type)
            self._attach_netns_link()
            report = StartReport(
                build=artifact.key,
                compiled=not artifact.from_cache,
                compile_seconds=artifact.compile_seconds,
                reused_programs=reused,
                adopted_pods=0,
            )
            report.adopted_pods, gone = self._adopt_registered()
            report.removed_stale += gone
            if pods is not None:
                self.reconcile(pods)
            report.removed_stale += self._remove_stale_pins(artifact)
        except BaseException:
            self.stop()
            raise
        self.report = report
        log.info("data path up: %s", report)
        return report

    def prepare(self) -> compiler.Artifact:
        """What can fail before this agent touches the kernel's state: the preflight checks
        and the build (from the cache, or compiled in a child process, so that bcc and
        LLVM never enter the agent). A restarting agent does this before it asks its
        predecessor to let go."""
        if self._artifact is None:
            s = self.settings
            preflight.check(self.pin_root, need_compiler=not compiler.cached(s, PROGRAM_NAMES))
            self._artifact = compiler.build(s, PROGRAM_NAMES, in_child=True)
        return self._artifact

    def stop(self) -> None:
        """Close this process's handles. Pins and attachments stay: traffic keeps flowing
        and a new agent process picks everything up."""
        for m in self._maps.values():
            m.close()
        for p in self._progs.values():
            with contextlib.suppress(OSError):
                os.close(p.fd)
        self._maps.clear()
        self._progs.clear()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def uninstall(self) -> list[str]:
        """Detach every program this agent attached and remove all its pins."""
        self.stop()
        return uninstall(self.pin_root)

    def __enter__(self) -> Datapath:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- pods ------------------------------------------------------------------------

    def attach_pod(
        self,
        cgroup: str | os.PathLike[str],
        pod_ip: str,
        *,
        strict: bool = False,
        capture: bool = True,
        fastpath: bool = True,
        inbound_exception_ports: Iterable[int] = (),
        probe_ports: Iterable[int] = (),
        excluded_ports: Iterable[int] = (),
        excluded_cidrs: Iterable[str] = (),
    ) -> PodAttachment:
        """Configure a pod and attach the programs to its cgroup. Idempotent: calling it
        again updates the configuration; a changed setting applies to new connections."""
        pod = PodAttachment(
            cgroup=str(cgroup),
            ip=str(ipaddress.IPv4Address(pod_ip)),
            strict=strict,
            capture=capture,
            fastpath=fastpath,
            inbound_exception_ports=frozenset(_port(p) for p in inbound_exception_ports),
            probe_ports=frozenset(_port(p) for p in probe_ports),
            excluded_ports=frozenset(_port(p) for p in excluded_ports),
            excluded_cidrs=frozenset(str(ipaddress.IPv4Network(c)) for c in excluded_cidrs),
        )
        return self._attach(pod)

    def detach_pod(self, cgroup: str | os.PathLike[str] | int) -> bool:
        """Detach a pod's programs and forget its configuration. False if it was unknown.

        `cgroup` is the cgroup path or its id (the directory may already be gone). Also
        undoes attach_tunnel for the tunnel's cgroup."""
        cgroup_id = cgroup if isinstance(cgroup, int) else self._cgroup_id_of(cgroup)
        if cgroup_id is None:
            return False
        raw = self._map("weft_attachments_v1").get(abi.U64.pack(cgroup_id))
        path = _attachment_path(raw) if raw else None
        if path is not None:
            _detach_cgroup(path)
        self._forget(cgroup_id)
        return raw is not None

    def attached_pods(self) -> list[PodAttachment]:
        """Every pod this agent (this process or an earlier one) attached."""
        ports: dict[int, dict[int, set[int]]] = {}
        for key, _ in self._map("weft_pod_ports_v1").items():
            cg, port, kind = abi.PORT_KEY.unpack(key)
            ports.setdefault(cg, {}).setdefault(kind, set()).add(port)
        cidrs: dict[int, set[str]] = {}
        for key, _ in self._map("weft_excluded_cidrs_v1").items():
            cg, net = abi.cidr_from_key(key)
            cidrs.setdefault(cg, set()).add(str(net))
        pods = []
        for key, value in self._map("weft_attachments_v1").items():
            (cg,) = abi.U64.unpack(key)
            conf = self._map("weft_pods_v1").get(key)
            if conf is None or _attachment(value)[0] != abi.AttachKind.POD:
                continue
            ip, flags = abi.POD_CONFIG.unpack(conf)
            f = abi.PodFlag(flags)
            mine = ports.get(cg, {})
            pods.append(
                PodAttachment(
                    cgroup=_attachment_path(value) or "",
                    ip=abi.ip_str(ip),
                    strict=abi.PodFlag.STRICT in f,
                    capture=abi.PodFlag.CAPTURE in f,
                    fastpath=abi.PodFlag.FASTPATH in f,
                    inbound_exception_ports=frozenset(mine.get(abi.PortKind.INBOUND_EXCEPTION, ())),
                    probe_ports=frozenset(mine.get(abi.PortKind.PROBE, ())),
                    excluded_ports=frozenset(mine.get(abi.PortKind.OUTBOUND_EXCLUDED, ())),
                    excluded_cidrs=frozenset(cidrs.get(cg, ())),
                    cgroup_id=cg,
                )
            )
        return sorted(pods, key=lambda p: p.cgroup)

    def reconcile(self, pods: Iterable[PodAttachment]) -> None:
        """Make the attached set exactly `pods`: attach or update these, detach the rest."""
        wanted = {cgroups.cgroup_id(Path(p.cgroup)): p for p in pods}
        for key, value in self._map("weft_attachments_v1").items():
            (cg,) = abi.U64.unpack(key)
            if cg not in wanted and _attachment(value)[0] == abi.AttachKind.POD:
                self.detach_pod(cg)
        for pod in wanted.values():
            self._attach(pod)

    def attach_tunnel(self, cgroup: str | os.PathLike[str]) -> None:
        """Answer getsockopt(SOL_IP, SO_ORIGINAL_DST) for sockets created in `cgroup`
        (the tunnel's own cgroup), so a proxy that speaks SO_ORIGINAL_DST finds the
        original destination of each connection it accepts on the outbound port."""
        path = Path(cgroup)
        cg = self._cgroup_id_of(path)
        if cg is None:
            raise NotFound(f"cgroup {path} does not exist")
        self._register(cg, abi.AttachKind.TUNNEL, str(path).encode())
        self._attach_programs(str(path), TUNNEL_HOOKS)

    # ---- policy and switches ---------------------------------------------------------

    def set_fastpath_pairs(self, pairs: Iterable[tuple[str, str, int]]) -> int:
        """Replace the set of (src pod ip, dst pod ip, dst port) the fast path may splice.
        Fill it with same-node pairs L4 policy allows; returns how many are set."""
        m = self._map("weft_fastpath_pairs_v1")
        wanted = {
            abi.PAIR_KEY.pack(abi.ip_bytes(src), abi.ip_bytes(dst), _port(port))
            for src, dst, port in pairs
        }
        for key in wanted:
            m.put(key, abi.U8.pack(1))
        for key in m.all_keys():
            if key not in wanted:
                m.delete(key)
        return len(wanted)

    def fastpath_pairs(self) -> set[tuple[str, str, int]]:
        out = set()
        for key in self._map("weft_fastpath_pairs_v1").all_keys():
            src, dst, port = abi.PAIR_KEY.unpack(key)
            out.add((abi.ip_str(src), abi.ip_str(dst), port))
        return out

    def set_fastpath_enabled(self, enabled: bool) -> None:
        """The node-wide switch. Off: new connections go through the tunnel; connections
        already spliced stay spliced until they close."""
        self._write_node_config(fastpath=enabled)

    def set_global_exclusions(self, ports: Iterable[int] = (), cidrs: Iterable[str] = ()) -> None:
        """Destination ports and networks no meshed pod's connects are captured for."""
        self._sync_ports(0, abi.PortKind.OUTBOUND_EXCLUDED, {_port(p) for p in ports})
        self._sync_cidrs(0, {ipaddress.IPv4Network(c) for c in cidrs})

    # ---- reading ---------------------------------------------------------------------

    def original_destination(self, src_ip: str, src_port: int) -> OriginalDestination | None:
        """The destination a pod asked for, given the peer address of a connection the
        tunnel accepted on its outbound port. Reading deletes the entry."""
        m = self._map("weft_origdst_v1")
        key = abi.ENDPOINT.pack(abi.ip_bytes(src_ip), _port(src_port))
        raw = m.get(key)
        if raw is None:
            return None
        m.delete(key)
        ip, port, cg, cookie = abi.ORIGDST.unpack(raw)
        return OriginalDestination(abi.ip_str(ip), port, cg, cookie)

    def flows(self, *, reap_closed: bool = False) -> list[Flow]:
        """Every flow record; with reap_closed, closed ones are deleted once read (export
        them from the returned list). Open flows show values at most flow_sample_ms old."""
        return [f for batch in self.flow_batches(reap_closed=reap_closed) for f in batch]

    def flow_batches(
        self, *, reap_closed: bool = False, size: int = FLOW_BATCH
    ) -> Iterator[list[Flow]]:
        """The flow records in lists of at most `size`, each read (and, with reap_closed,
        its closed records deleted) when the one before it has been taken. A reader that
        handles a list before asking for the next holds a few hundred records at a time:
        a burst of new connections leaves tens of thousands of closed records between two
        reads, and decoded at once they were megabytes of objects, whose memory Python's
        allocator then kept for the few long-lived objects made meanwhile."""
        flows_map = self._map("weft_flows_v1")
        fast = self._map("weft_fastpath_state_v1")
        keys = flows_map.all_keys()  # the walk first: deleting during it would restart it
        for i in range(0, len(keys), size):
            batch = []
            for key in keys[i : i + size]:
                raw = flows_map.get(key)
                if raw is None:  # deleted since the walk listed it
                    continue
                flow, closed = self._flow(key, raw, fast)
                batch.append(flow)
                if reap_closed and closed:
                    flows_map.delete(key)
            yield batch

    @staticmethod
    def _flow(key: bytes, raw: bytes, fast: Map) -> tuple[Flow, bool]:
        """A record decoded, and whether the kernel marked it closed."""
        (cookie,) = abi.U64.unpack(key)
        (
            cg,
            start,
            end,
            _sampled,
            acked,
            received,
            fast_bytes,
            lip,
            rip,
            oip,
            lport,
            rport,
            oport,
            direction,
            flags,
            srtt,
            retrans,
            _pad,
        ) = abi.FLOW.unpack(raw)
        f = abi.FlowFlag(flags)
        if abi.FlowFlag.FASTPATH in f and abi.FlowFlag.CLOSED not in f:
            live = fast.get(abi.SOCK_KEY.pack(lip, rip, lport, rport))
            if live is not None:
                fast_bytes = abi.FASTPATH_SOCK.unpack(live)[1]
        flow = Flow(
            cookie=cookie,
            cgroup_id=cg,
            direction="outbound" if direction == abi.FLOW_OUTBOUND else "inbound",
            local=(abi.ip_str(lip), lport),
            remote=(abi.ip_str(rip), rport),
            original_dst=(abi.ip_str(oip), oport) if abi.FlowFlag.REDIRECTED in f else None,
            bytes_sent=acked,
            bytes_received=received,
            fastpath_bytes_sent=fast_bytes,
            srtt_us=srtt,
            total_retrans=retrans,
            start_ns=start,
            end_ns=end,
            redirected=abi.FlowFlag.REDIRECTED in f,
            fastpath=abi.FlowFlag.FASTPATH in f,
        )
        return flow, abi.FlowFlag.CLOSED in f

    def counters(self) -> dict[Counter, int]:
        m = self._map("weft_counters_v1")
        return {c: m.get_percpu_sum(abi.U32.pack(c)) for c in Counter}

    def drop_counters(self) -> dict[tuple[int, DropReason | int], int]:
        """Dropped packets by (cgroup id, reason). A reason this Python does not know
        (newer C) stays a plain int rather than being hidden."""
        out: dict[tuple[int, DropReason | int], int] = {}
        for key, value in self._map("weft_drops_v1").items():
            cg, reason = abi.DROP_KEY.unpack(key)
            code: DropReason | int
            try:
                code = DropReason(reason)
            except ValueError:
                code = reason
            out[(cg, code)] = abi.U64.unpack(value)[0]
        return out

    def program_ids(self) -> dict[str, int]:
        return {name: p.id for name, p in self._progs.items()}

    def map_ids(self) -> dict[str, int]:
        return {name: bpfsys.map_info(m.fd).id for name, m in self._maps.items()}

    # ---- internals: start ------------------------------------------------------------

    def _take_lock(self, wait: float = 0.0) -> None:
        """One agent per pin root: an flock on the directory (released if we die, and by
        an agent handing over to its successor as it starts draining)."""
        self.pin_root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.pin_root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(0.02)
                    continue
                os.close(fd)
                raise EnvironmentProblem(
                    f"another agent process holds {self.pin_root}"
                    + (f" (waited {wait:.0f}s for it to hand over)" if wait else ""),
                    hint="stop it first, or give this agent its own pin root",
                ) from None
        self._lock_fd = fd

    @staticmethod
    def _check_layouts(artifact: compiler.Artifact) -> None:
        for spec in artifact.maps:
            want = abi.LAYOUTS.get(spec.name)
            if want != (spec.key_size, spec.value_size):
                raise RuntimeError(
                    f"map {spec.name}: the C says key/value {spec.key_size}/{spec.value_size} "
                    f"bytes, agent/datapath/abi.py says {want}; update abi.py (and bump the "
                    "map's _vN if its layout changed)"
                )

    def _open_maps(self, artifact: compiler.Artifact) -> None:
        root = self.pin_root / MAPS_DIR
        root.mkdir(parents=True, exist_ok=True)
        for spec in artifact.maps:
            path = root / spec.name
            fd = -1
            if path.exists():
                fd = bpfsys.obj_get(str(path))
                info = bpfsys.map_info(fd)
                shape = (info.type, info.key_size, info.value_size, info.max_entries, info.flags)
                if shape != (
                    spec.type,
                    spec.key_size,
                    spec.value_size,
                    spec.max_entries,
                    spec.flags,
                ):
                    # Only map sizes can differ here (layouts carry a version in the name):
                    # the settings changed, so this map starts empty.
                    log.warning("map %s changed shape %s -> %s; recreating", spec.name, shape, spec)
                    os.close(fd)
                    path.unlink()
                    fd = -1
            if fd < 0:
                fd = bpfsys.map_create(
                    spec.type,
                    spec.key_size,
                    spec.value_size,
                    spec.max_entries,
                    spec.flags,
                    spec.name,
                )
                bpfsys.obj_pin(fd, str(path))
            self._maps[spec.name] = Map(spec.name, fd, spec.type, spec.key_size, spec.value_size)

    def _load_programs(self, artifact: compiler.Artifact) -> bool:
        """Reuse this build's pinned programs when they use our maps; else load and pin.
        True when reused."""
        build = self.pin_root / PROGS_DIR / artifact.key
        map_ids = {bpfsys.map_info(m.fd).id for m in self._maps.values()}
        if all((build / h.program).exists() for h in HOOKS):
            progs = {}
            for h in HOOKS:
                fd = bpfsys.obj_get(str(build / h.program))
                info = bpfsys.prog_info(fd)
                progs[h.program] = _Program(h, fd, info.id)
                if not set(info.map_ids) <= map_ids:
                    break
            else:
                self._progs = progs
                return True
            for p in progs.values():
                os.close(p.fd)
            _remove_pins(build)
        fds = {name: m.fd for name, m in self._maps.items()}
        build.mkdir(parents=True, exist_ok=True)
        for h in HOOKS:
            spec = artifact.program(h.program)
            try:
                fd = bpfsys.prog_load(
                    h.prog_type,
                    spec.relocated(fds),
                    h.program,
                    expected_attach_type=h.expected_attach_type,
                )
            except bpfsys.BpfError as e:
                raise RuntimeError(
                    f"the kernel rejected {h.program}: {e}\n{e.log}".rstrip()
                ) from None
            bpfsys.obj_pin(fd, str(build / h.program))
            self._progs[h.program] = _Program(h, fd, bpfsys.prog_info(fd).id)
        return False

    def _attach_netns_link(self) -> None:
        """weft_tunnel_lookup on this process's network namespace, through a link pinned
        under the pin root: it outlives the agent (a crashed agent's successor finds it;
        uninstall removes it), and a new build swaps its program in place."""
        prog = self._progs["weft_tunnel_lookup"]
        pin = self.pin_root / LINKS_DIR / prog.hook.program
        if pin.exists():
            fd = bpfsys.obj_get(str(pin))
            try:
                bpfsys.link_update(fd, prog.fd)
            finally:
                os.close(fd)
            return
        pin.parent.mkdir(parents=True, exist_ok=True)
        netns = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            fd = bpfsys.link_create(prog.fd, netns, prog.hook.attach_type)
        finally:
            os.close(netns)
        try:
            bpfsys.obj_pin(fd, str(pin))
        finally:
            os.close(fd)

    def set_tunnel_listener(self, sock_fd: int) -> None:
        """Register the tunnel's outbound listener: captured connects go to it only."""
        self._map(LISTENERS).put(abi.U32.pack(0), abi.U64.pack(sock_fd))

    def tunnel_listener_registered(self) -> bool:
        """Whether some listener is registered (the kernel drops the entry when its socket
        closes: a successor that registered and then failed leaves none)."""
        return self._map(LISTENERS).get(abi.U32.pack(0)) is not None

    def _write_node_config(self, *, fastpath: bool) -> None:
        s = self.settings
        conf = abi.NodeConfig(
            tunnel_ip=s.tunnel_ip,
            outbound_port=s.outbound_port,
            inbound_port=s.inbound_port,
            flags=abi.NodeFlag.FASTPATH if fastpath else abi.NodeFlag(0),
            socket_mark=s.socket_mark,
        )
        self._map("weft_node_v1").put(abi.U32.pack(0), conf.pack())

    def node_config(self) -> abi.NodeConfig:
        raw = self._map("weft_node_v1").get(abi.U32.pack(0))
        assert raw is not None  # an array map always has its slot
        return abi.NodeConfig.unpack(raw)

    def _adopt_registered(self) -> tuple[int, list[str]]:
        """Bring every registered cgroup's attachments to this build; forget vanished ones."""
        adopted, gone = 0, []
        for key, value in self._map("weft_attachments_v1").items():
            (cg,) = abi.U64.unpack(key)
            kind, path = _attachment(value)
            if path is None or self._cgroup_id_of(path) != cg:
                gone.append(f"cgroup {path or cg} (gone)")
                self._forget(cg)
                continue
            if kind == abi.AttachKind.TUNNEL:
                self._attach_programs(path, TUNNEL_HOOKS)
            else:
                self._attach_programs(path, POD_HOOKS)
                adopted += 1
        return adopted, gone

    def _remove_stale_pins(self, artifact: compiler.Artifact) -> list[str]:
        """Pins of other builds and of map versions this build does not use. Run after
        every attachment moved to this build, so nothing still needs them."""
        removed = []
        progs = self.pin_root / PROGS_DIR
        for build in progs.iterdir() if progs.is_dir() else ():
            if build.name != artifact.key:
                _remove_pins(build)
                removed.append(f"programs {build}")
        wanted = {m.name for m in artifact.maps}
        for pin in (self.pin_root / MAPS_DIR).iterdir():
            if pin.name not in wanted:
                pin.unlink()
                removed.append(f"map {pin}")
        return removed

    # ---- internals: pods -------------------------------------------------------------

    def _attach(self, pod: PodAttachment) -> PodAttachment:
        path = Path(pod.cgroup)
        try:
            cg = cgroups.cgroup_id(path)
        except FileNotFoundError:
            raise NotFound(
                f"cgroup {path} does not exist", hint="is the pod running? (weft lab status)"
            ) from None
        encoded = str(path).encode()
        pod = replace(pod, cgroup_id=cg)
        flags = abi.PodFlag(0)
        if pod.capture:
            flags |= abi.PodFlag.CAPTURE
        if pod.strict:
            flags |= abi.PodFlag.STRICT
        if pod.fastpath:
            flags |= abi.PodFlag.FASTPATH
        # Register first: a crash after attaching must still leave the attachment findable.
        self._register(cg, abi.AttachKind.POD, encoded)
        old = self._map("weft_pods_v1").get(abi.U64.pack(cg))
        if old is not None and abi.POD_CONFIG.unpack(old)[0] != abi.ip_bytes(pod.ip):
            self._map("weft_pod_ips_v1").delete(abi.POD_CONFIG.unpack(old)[0])
        # Configuration before programs: the first connect after attach must find it.
        self._sync_ports(cg, abi.PortKind.INBOUND_EXCEPTION, set(pod.inbound_exception_ports))
        self._sync_ports(cg, abi.PortKind.PROBE, set(pod.probe_ports))
        self._sync_ports(cg, abi.PortKind.OUTBOUND_EXCLUDED, set(pod.excluded_ports))
        self._sync_cidrs(cg, {ipaddress.IPv4Network(c) for c in pod.excluded_cidrs})
        self._map("weft_pods_v1").put(
            abi.U64.pack(cg), abi.POD_CONFIG.pack(abi.ip_bytes(pod.ip), int(flags))
        )
        self._map("weft_pod_ips_v1").put(abi.ip_bytes(pod.ip), abi.U64.pack(cg))
        self._attach_programs(str(path), POD_HOOKS)
        return pod

    def _register(self, cgroup_id: int, kind: int, path: bytes) -> None:
        if len(path) >= abi.CGROUP_PATH_MAX:
            raise ValueError(f"cgroup path longer than {abi.CGROUP_PATH_MAX - 1} bytes: {path!r}")
        self._map("weft_attachments_v1").put(
            abi.U64.pack(cgroup_id), abi.ATTACHMENT.pack(time.monotonic_ns(), kind, path)
        )

    def _attach_programs(self, cgroup: str, hooks: tuple[Hook, ...]) -> None:
        fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for hook in hooks:
                _attach_one(fd, self._progs[hook.program], cgroup)
        finally:
            os.close(fd)

    def _forget(self, cgroup_id: int) -> None:
        key = abi.U64.pack(cgroup_id)
        conf = self._map("weft_pods_v1").get(key)
        if conf is not None:
            ip = abi.POD_CONFIG.unpack(conf)[0]
            self._map("weft_pod_ips_v1").delete(ip)
            pairs = self._map("weft_fastpath_pairs_v1")
            for pair in pairs.all_keys():
                src, dst, _ = abi.PAIR_KEY.unpack(pair)
                if ip in (src, dst):
                    pairs.delete(pair)
        self._map("weft_pods_v1").delete(key)
        self._sync_ports(cgroup_id, abi.PortKind.INBOUND_EXCEPTION, set())
        self._sync_ports(cgroup_id, abi.PortKind.PROBE, set())
        self._sync_ports(cgroup_id, abi.PortKind.OUTBOUND_EXCLUDED, set())
        self._sync_cidrs(cgroup_id, set())
        drops = self._map("weft_drops_v1")
        for dk in drops.all_keys():
            if abi.DROP_KEY.unpack(dk)[0] == cgroup_id:
                drops.delete(dk)
        self._map("weft_attachments_v1").delete(key)

    def _sync_ports(self, cgroup_id: int, kind: int, ports: set[int]) -> None:
        m = self._map("weft_pod_ports_v1")
        for port in ports:
            m.put(abi.PORT_KEY.pack(cgroup_id, port, kind), abi.U8.pack(1))
        for key in m.all_keys():
            cg, port, k = abi.PORT_KEY.unpack(key)
            if cg == cgroup_id and k == kind and port not in ports:
                m.delete(key)

    def _sync_cidrs(self, cgroup_id: int, nets: set[ipaddress.IPv4Network]) -> None:
        m = self._map("weft_excluded_cidrs_v1")
        for net in nets:
            m.put(abi.cidr_key(cgroup_id, net), abi.U8.pack(1))
        for key in m.all_keys():
            cg, net = abi.cidr_from_key(key)
            if cg == cgroup_id and net not in nets:
                m.delete(key)

    def _map(self, name: str) -> Map:
        try:
            return self._maps[name]
        except KeyError:
            raise RuntimeError("the data path is not started (call start())") from None

    @staticmethod
    def _cgroup_id_of(cgroup: str | os.PathLike[str]) -> int | None:
        try:
            return cgroups.cgroup_id(Path(cgroup))
        except FileNotFoundError:
            return None


# ---- attachments, outside any Datapath (uninstall needs no compiler) ----------------------


def _is_weft_program(prog_id: int) -> tuple[int, bool]:
    """(fd, is ours by name); the caller closes fd. fd -1 when the program vanished."""
    try:
        fd = bpfsys.prog_fd_by_id(prog_id)
    except bpfsys.BpfError:
        return -1, False
    return fd, bpfsys.prog_info(fd).name.startswith(PROG_PREFIX)


def _attach_one(cgroup_fd: int, prog: _Program, cgroup: str) -> None:
    """Attach prog to a cgroup: keep it if there, else replace an older weft program
    atomically, else add it. BPF_F_ALLOW_MULTI so other cgroup programs (a CNI's socket
    load balancer, say) keep running alongside."""
    attach_type = prog.hook.attach_type
    attached = bpfsys.prog_query(cgroup_fd, attach_type)
    stale: list[int] = []
    for pid in attached:
        if pid == prog.id:
            continue
        fd, ours = _is_weft_program(pid)
        if ours:
            stale.append(fd)
        elif fd >= 0:
            os.close(fd)
    try:
        if prog.id not in attached:
            try:
                if stale:
                    bpfsys.prog_attach(
                        prog.fd,
                        cgroup_fd,
                        attach_type,
                        bpfsys.F_ALLOW_MULTI | bpfsys.F_REPLACE,
                        stale.pop(0),
                    )
                else:
                    bpfsys.prog_attach(prog.fd, cgroup_fd, attach_type, bpfsys.F_ALLOW_MULTI)
            except bpfsys.BpfError as e:
                if e.errno == errno.EPERM:
                    raise EnvironmentProblem(
                        f"cannot attach {prog.hook.program} to {cgroup}: a program attached "
                        "without BPF_F_ALLOW_MULTI there or above it forbids sharing the hook",
                        hint=f"inspect with: bpftool cgroup tree {cgroup}",
                    ) from None
                raise
        for fd in stale:
            bpfsys.prog_detach(fd, cgroup_fd, attach_type)
    finally:
        for fd in stale:
            os.close(fd)


def _detach_cgroup(cgroup: str) -> int:
    """Detach every weft program from a cgroup; how many. A vanished cgroup has none."""
    try:
        cfd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        return 0
    detached = 0
    try:
        for hook in CGROUP_HOOKS:
            for pid in bpfsys.prog_query(cfd, hook.attach_type):
                fd, ours = _is_weft_program(pid)
                try:
                    if ours:
                        bpfsys.prog_detach(fd, cfd, hook.attach_type)
                        detached += 1
                finally:
                    if fd >= 0:
                        os.close(fd)
    finally:
        os.close(cfd)
    return detached


def _attachment(raw: bytes) -> tuple[int, str | None]:
    """(kind, cgroup path) of a registry entry."""
    _, kind, path = abi.ATTACHMENT.unpack(raw)
    text = path.split(b"\0", 1)[0].decode(errors="replace")
    return kind, text or None


def _attachment_path(raw: bytes) -> str | None:
    return _attachment(raw)[1]


def _remove_pins(directory: Path) -> None:
    if not directory.is_dir():
        return
    for pin in directory.iterdir():
        if pin.is_dir():
            _remove_pins(pin)
        else:
            pin.unlink()
    with contextlib.suppress(OSError):
        directory.rmdir()


def registered_cgroups(pin_root: Path) -> list[str]:
    """Cgroups in an agent's attachment registry, read from its pins alone."""
    path = Path(pin_root) / MAPS_DIR / "weft_attachments_v1"
    if not path.exists():
        return []
    fd = bpfsys.obj_get(str(path))
    try:
        m = Map("weft_attachments_v1", fd, bpfsys.MAP_HASH, *abi.LAYOUTS["weft_attachments_v1"])
        return [p for _, v in m.items() if (p := _attachment_path(v))]
    finally:
        os.close(fd)


def register_tunnel_listener(pin_root: Path, sock_fd: int) -> bool:
    """Register the tunnel's outbound listener in the pinned map a running (or crashed)
    agent left, before this agent holds the data path: a restarting agent does this just
    before it asks its predecessor to let go (after everything that can fail), so captured
    connects never find the map empty while the predecessor closes its listener. False
    when there is no such map yet (a first start)."""
    pin = Path(pin_root) / MAPS_DIR / LISTENERS
    if not pin.exists():
        return False
    fd = bpfsys.obj_get(str(pin))
    try:
        bpfsys.map_update(fd, abi.U32.pack(0), abi.U64.pack(sock_fd))
    finally:
        os.close(fd)
    return True


def uninstall(pin_root: Path) -> list[str]:
    """Detach what the agent of `pin_root` attached and remove its pins. Needs neither
    the compiler nor the agent process; refuses while an agent holds the pin root;
    idempotent. What it did, one line per step."""
    pin_root = Path(pin_root)
    done: list[str] = []
    if not pin_root.exists():
        return done
    lock = os.open(pin_root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(lock)
        raise EnvironmentProblem(
            f"an agent process is running on {pin_root}", hint="stop the agent first"
        ) from None
    try:
        return _uninstall_locked(pin_root, done)
    finally:
        os.close(lock)


def _uninstall_locked(pin_root: Path, done: list[str]) -> list[str]:
    for cgroup in registered_cgroups(pin_root):
        n = _detach_cgroup(cgroup)
        done.append(f"detached {n} programs from {cgroup}")
    if pin_root.exists():
        _remove_pins(pin_root)
        done.append(f"removed pins under {pin_root}")
    return done


def _port(value: int) -> int:
    port = int(value)
    if not 0 < port < 65536:
        raise ValueError(f"not a TCP port: {value}")
    return port
