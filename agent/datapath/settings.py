"""Settings of the data path, grouped by concern; each says its unit and why its default."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

SOURCE_DIR = Path(__file__).resolve().parents[2] / "bpf"


@dataclass(frozen=True)
class MapSizes:
    """Entries per map (compiled in with -D flags). Each bounds kernel memory; the LRU maps
    evict their oldest entries when full instead of failing."""

    pods: int = 1024
    """Meshed pods on one node. kubelet's default limit is 110 pods; 1024 leaves room."""
    ports: int = 16384
    """Port exceptions and exclusions of all pods together (16 per pod at 1024 pods)."""
    cidrs: int = 4096
    """Excluded outbound CIDRs, per pod and global together."""
    origdst: int = 65536
    """Redirected connects not yet picked up by the tunnel (LRU). The tunnel reads and
    deletes each entry on accept, so this only needs to cover an accept backlog."""
    pairs: int = 65536
    """Same-node pod pairs L4 policy lets the fast path splice: pods x peers x ports."""
    fastpath_sockets: int = 65536
    """Spliced sockets, two per same-node connection."""
    flows: int = 65536
    """Flow records (LRU). At a 15 s export interval this holds 4,000 new flows a second."""


@dataclass(frozen=True)
class DatapathSettings:
    """One agent's data path.

    Two agents may share a kernel (the lab runs one per node on one machine), so every
    kernel object an agent owns lives under its own `pin_root`.
    """

    tunnel_ip: str
    """The node tunnel's IPv4 address: redirected connects go to tunnel_ip:outbound_port,
    and a STRICT pod's listeners accept TCP only from this address."""
    pin_root: Path = Path("/sys/fs/bpf/weft/agent")
    """bpffs directory for this agent's maps (maps/) and programs (progs/<build>/). The
    pins are what a restarted agent reuses; `uninstall` removes them."""

    # ---- the tunnel's ports (docs/ARCHITECTURE.md, "Ports") ----------------------------
    outbound_port: int = 15001
    """Where redirected connects land (the tunnel's outbound listener), as in Istio."""
    inbound_port: int = 15008
    """HBONE (mTLS) port of the tunnel; IANA's registered HBONE port."""
    socket_mark: int = 0x5746
    """SO_MARK the tunnel sets on its own sockets ("WF"); connect4 never captures a socket
    carrying it. 0 turns the check off."""

    # ---- behaviour ---------------------------------------------------------------------
    fastpath: bool = True
    """Global switch of the same-node fast path at start; see Datapath.set_fastpath_enabled."""
    flow_sample_ms: int = 100
    """Minimum interval between two writes of one flow's record (ms). RTT callbacks fire on
    every ACK; 100 ms caps the cost at 10 writes a second per flow, still far finer than a
    15 s Prometheus scrape. Final values are always written at close."""
    map_sizes: MapSizes = field(default_factory=MapSizes)

    # ---- build -------------------------------------------------------------------------
    source_dir: Path = SOURCE_DIR
    """Where weft.c and lib/*.h live."""
    cache_dir: Path = Path("/var/cache/weft/bpf")
    """Compiled bytecode by hash of (sources, -D flags, kernel, headers, bcc). bcc takes
    2-3 s per compile; a hit makes start-up take milliseconds. Safe to delete."""

    def cflags(self) -> list[str]:
        """The -D flags this configuration compiles with (documented in bpf/lib/config.h)."""
        s = self.map_sizes
        return [
            f"-DWEFT_PODS_MAX={s.pods}",
            f"-DWEFT_PORTS_MAX={s.ports}",
            f"-DWEFT_CIDRS_MAX={s.cidrs}",
            f"-DWEFT_ORIGDST_MAX={s.origdst}",
            f"-DWEFT_PAIRS_MAX={s.pairs}",
            f"-DWEFT_FASTPATH_SOCKS_MAX={s.fastpath_sockets}",
            f"-DWEFT_FLOWS_MAX={s.flows}",
            f"-DWEFT_FLOW_SAMPLE_NS={self.flow_sample_ms * 1_000_000}ULL",
        ]
