"""Codes shared with the C programs: drop reasons (bpf/lib/drop.h) and event counters
(bpf/lib/counters.h).

Both are append-only on the C side; these enums mirror them number for number, and
tests/unit/test_datapath_reasons.py parses the headers to prove it.
"""

from __future__ import annotations

from enum import IntEnum


class DropReason(IntEnum):
    """Why inbound enforcement dropped a packet (enum weft_drop_reason)."""

    NOT_FROM_TUNNEL = 1
    """STRICT pod: TCP to a listening socket from a source other than the node tunnel."""
    NODE_UNCONFIGURED = 2
    """STRICT pod, but the agent has not set the tunnel address yet: fail closed."""
    MALFORMED = 3
    """The IPv4 header could not be read."""
    NOT_TUNNEL_SOCKET = 4
    """STRICT pod: TCP from the node's address, but not from a socket of the node tunnel
    (another process in the node's network namespace)."""
    UDP_NOT_MESHED = 5
    """STRICT pod: UDP to an unconnected socket from another source (UDP is not meshed);
    DNS answers (source port 53, to an ephemeral port) and inbound exception ports pass."""
    IPV6_NOT_MESHED = 6
    """STRICT pod: native IPv6 to a listening or unconnected socket from outside the pod's
    network namespace (weft meshes IPv4 only); inbound exception ports and DNS answers pass."""
    PROTOCOL_NOT_MESHED = 7
    """STRICT pod: a protocol weft neither meshes nor reads (SCTP, ...) from another source;
    ICMP and raw sockets pass, inbound exception ports pass."""

    @property
    def label(self) -> str:
        """The Prometheus label value: lower-case, stable across releases."""
        return self.name.lower()


class Counter(IntEnum):
    """Event counters of the data path (enum weft_counter, map weft_counters_v1)."""

    CONNECTS = 0
    REDIRECTED = 1
    EXCLUDED = 2
    FASTPATH_CONNECTS = 3
    ORIGDST_REKEYED = 4
    FASTPATH_SOCKETS = 5
    FASTPATH_MSGS = 6
    FASTPATH_BYTES = 7
    FASTPATH_FALLBACK = 8
    FASTPATH_INSERT_ERRORS = 9
    FLOWS_OPENED = 10
    FLOWS_CLOSED = 11
    IPV6_PASSED = 12
    INBOUND_DROPS = 13
