"""Byte layouts of the map keys and values in bpf/lib/common.h, and their codecs.

Addresses travel as the 4 network-order bytes the kernel stores (__be32); ports as
host-order u16. The loader checks every size here against what bcc reports for the
compiled C, so a C struct changed without this file fails loudly at start-up.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import dataclass
from enum import IntFlag

NODE_CONFIG = struct.Struct("=4sHHII")  # struct weft_node_config
POD_CONFIG = struct.Struct("=4sI")  # struct weft_pod_config
PORT_KEY = struct.Struct("=QHB5x")  # struct weft_port_key
CIDR_KEY = struct.Struct("=III4s")  # struct weft_cidr_key
ENDPOINT = struct.Struct("=4sHxx")  # struct weft_endpoint
ORIGDST = struct.Struct("=4sHxxQQ")  # struct weft_origdst
PAIR_KEY = struct.Struct("=4s4sHxx")  # struct weft_pair_key
SOCK_KEY = struct.Struct("=4s4sHH")  # struct weft_sock_key
FASTPATH_SOCK = struct.Struct("=QQQI4x")  # struct weft_fastpath_sock
FLOW = struct.Struct("=QQQQQQQ4s4s4sHHHBBIII")  # struct weft_flow
DROP_KEY = struct.Struct("=QI4x")  # struct weft_drop_key
CGROUP_PATH_MAX = 496  # WEFT_CGROUP_PATH_MAX
ATTACHMENT = struct.Struct(f"=QI4x{CGROUP_PATH_MAX}s")  # struct weft_attachment
U8 = struct.Struct("=B")
U32 = struct.Struct("=I")
U64 = struct.Struct("=Q")
IP = struct.Struct("=4s")

# (key, value) layout of every map, by name: what the loader checks bcc's sizes against.
LAYOUTS: dict[str, tuple[int, int]] = {
    "weft_node_v1": (U32.size, NODE_CONFIG.size),
    "weft_pods_v1": (U64.size, POD_CONFIG.size),
    "weft_pod_ips_v1": (IP.size, U64.size),
    "weft_pod_ports_v1": (PORT_KEY.size, U8.size),
    "weft_excluded_cidrs_v1": (CIDR_KEY.size, U8.size),
    "weft_origdst_cookie_v1": (U64.size, ORIGDST.size),
    "weft_origdst_v1": (ENDPOINT.size, ORIGDST.size),
    "weft_fastpath_pairs_v1": (PAIR_KEY.size, U8.size),
    "weft_fastpath_socks_v1": (SOCK_KEY.size, 4),
    "weft_fastpath_state_v1": (SOCK_KEY.size, FASTPATH_SOCK.size),
    "weft_tunnel_syns_v1": (SOCK_KEY.size, U8.size),
    "weft_flows_v1": (U64.size, FLOW.size),
    "weft_counters_v1": (U32.size, U64.size),
    "weft_drops_v1": (DROP_KEY.size, U64.size),
    "weft_attachments_v1": (U64.size, ATTACHMENT.size),
    "weft_tunnel_listeners_v1": (U32.size, U64.size),
}


class NodeFlag(IntFlag):
    FASTPATH = 1 << 0  # WEFT_NODE_FASTPATH


class PodFlag(IntFlag):
    CAPTURE = 1 << 0  # WEFT_POD_CAPTURE
    STRICT = 1 << 1  # WEFT_POD_STRICT
    FASTPATH = 1 << 2  # WEFT_POD_FASTPATH


class PortKind:
    INBOUND_EXCEPTION = 1  # WEFT_PORT_INBOUND_EXCEPTION
    OUTBOUND_EXCLUDED = 2  # WEFT_PORT_OUTBOUND_EXCLUDED
    PROBE = 3  # WEFT_PORT_PROBE


class AttachKind:
    POD = 1  # WEFT_ATTACH_POD
    TUNNEL = 2  # WEFT_ATTACH_TUNNEL


class FlowFlag(IntFlag):
    REDIRECTED = 1 << 0
    FASTPATH = 1 << 1
    CLOSED = 1 << 2


FLOW_OUTBOUND = 1
FLOW_INBOUND = 2
FASTPATH_TCP_ONLY = 1 << 0


def ip_bytes(ip: str | ipaddress.IPv4Address) -> bytes:
    return ipaddress.IPv4Address(ip).packed


def ip_str(raw: bytes) -> str:
    """Dotted IPv4 text of 4 bytes in network order (by the C library: an IPv4Address
    object per address was most of a flow record's decoding)."""
    return socket.inet_ntoa(raw)


def cidr_key(cgroup_id: int, network: ipaddress.IPv4Network) -> bytes:
    return CIDR_KEY.pack(
        64 + network.prefixlen,
        cgroup_id & 0xFFFFFFFF,
        cgroup_id >> 32,
        network.network_address.packed,
    )


def cidr_from_key(raw: bytes) -> tuple[int, ipaddress.IPv4Network]:
    prefixlen, lo, hi, ip = CIDR_KEY.unpack(raw)
    return (hi << 32) | lo, ipaddress.IPv4Network((ip, prefixlen - 64))


@dataclass(frozen=True)
class NodeConfig:
    tunnel_ip: str
    outbound_port: int
    inbound_port: int
    flags: NodeFlag
    socket_mark: int

    def pack(self) -> bytes:
        return NODE_CONFIG.pack(
            ip_bytes(self.tunnel_ip),
            self.outbound_port,
            self.inbound_port,
            int(self.flags),
            self.socket_mark,
        )

    @classmethod
    def unpack(cls, raw: bytes) -> NodeConfig:
        ip, out, inb, flags, mark = NODE_CONFIG.unpack(raw)
        return cls(ip_str(ip), out, inb, NodeFlag(flags), mark)
