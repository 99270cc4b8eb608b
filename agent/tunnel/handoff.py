"""Handing a captured connection to a waypoint on the same node, without re-encrypting it.

A pod's connection to a Service that uses a waypoint is captured by the node agent like any
other. When an instance of that waypoint runs on the same node, the agent does not open an
HBONE stream (TLS, HTTP/2 framing, a relay in both processes for every byte) to it: it
passes the accepted socket itself to the waypoint process over a Unix socket
(SCM_RIGHTS), with what the agent alone knows about it, and forgets it. The waypoint then
reads the pod's plaintext HTTP from the socket as it would from an HBONE stream, and the
agent spends nothing more on that connection. docs/ARCHITECTURE.md ("Node-local L7") has
the measurements that justify it.

Trust: the channel is the agent's. A waypoint connects to the agent's handoff socket and
the agent attests it from its cgroup, as the Workload API does: only a pod of this node
labelled `weft.dev/waypoint` gets a channel, and it only ever gets connections to Services
that use that waypoint (the same choice HBONE would have made). What the message says
(the caller's SPIFFE ID and address, the destination the pod dialled) is what the agent
established on capture; the waypoint believes it because it comes over that channel.

Wire format: one SOCK_SEQPACKET message per connection, a JSON object with one file
descriptor attached. A waypoint whose channel is full or gone simply gets no handoffs: the
agent falls back to HBONE for that connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.unixsock import UnixListener, peer_cred

log = logging.getLogger("weft.tunnel.handoff")

MAX_MESSAGE = 4096  # bytes of metadata per connection; far more than it needs


def socket_beside(workload_socket: Path) -> Path:
    """The handoff socket sits beside the agent's Workload API socket (same mount)."""
    return workload_socket.with_name("handoff.sock")


@dataclass(frozen=True, slots=True)
class Handoff:
    """What the agent tells the waypoint about a connection it hands over."""

    source: str  # the caller's SPIFFE ID (the pod the agent captured it from)
    client_ip: str  # the caller's pod address
    destination: str  # "ip:port" the pod dialled (a Service VIP of the waypoint)

    def encode(self) -> bytes:
        return json.dumps(
            {"source": self.source, "clientIp": self.client_ip, "destination": self.destination},
            separators=(",", ":"),
        ).encode()

    @classmethod
    def decode(cls, data: bytes) -> Handoff:
        """Parse one message; ValueError names what is wrong."""
        try:
            obj = json.loads(data)
        except ValueError as e:
            raise ValueError(f"handoff message is not JSON: {e}") from e
        if not isinstance(obj, dict):
            raise ValueError("handoff message is not a JSON object")
        fields = {}
        for key in ("source", "clientIp", "destination"):
            v = obj.get(key)
            if not isinstance(v, str) or not v:
                raise ValueError(f"handoff message has no string {key!r}")
            fields[key] = v
        return cls(fields["source"], fields["clientIp"], fields["destination"])


class HandoffServer:
    """The agent's end: accepts waypoints' channels and hands connections to them.

    `attest(pid)` returns the address of the waypoint instance the process is (a pod of
    this node labelled weft.dev/waypoint), or None to refuse the channel."""

    def __init__(self, path: Path, attest: Callable[[int], str | None]) -> None:
        self.path = path
        self.attest = attest
        # Waypoint instance address -> its open channels, newest last. The newest gets the
        # connections: during a waypoint restart the new process registers beside the old
        # one, which keeps its channel (and, draining, closes it) instead of being cut off
        # and reconnecting against its successor.
        self.channels: dict[str, list[socket.socket]] = {}
        self.handed = 0
        self.failed = 0
        # Any local process may connect: the agent decides by attesting it, not by mode.
        self._listener = UnixListener(path, socket.SOCK_SEQPACKET, 0o666, self._accepted)

    def start(self) -> None:
        self._listener.start()

    def close(self) -> None:
        self._listener.close()
        for chs in list(self.channels.values()):
            for ch in list(chs):
                self._drop(ch)

    def has(self, address: str) -> bool:
        return address in self.channels

    def hand_off(self, address: str, sock: Any, what: Handoff) -> bool:
        """Pass the connection `sock` (a socket or a transport's socket) to the waypoint
        instance at `address`. True: it owns the connection now, the caller closes its own
        descriptor without shutting the connection down. False: nothing happened."""
        chs = self.channels.get(address)
        if not chs:
            return False
        ch = chs[-1]
        try:
            socket.send_fds(ch, [what.encode()], [sock.fileno()])
        except BlockingIOError:
            self.failed += 1  # the waypoint is not keeping up: this one goes over HBONE
            return False
        except OSError as e:
            log.info("handoff channel of waypoint %s failed: %s", address, e)
            self._drop(ch)
            self.failed += 1
            return False
        self.handed += 1
        return True

    def _accepted(self, ch: socket.socket) -> None:
        ch.setblocking(False)
        address = None
        with contextlib.suppress(OSError):
            address = self.attest(peer_cred(ch)[0])
        if address is None:
            log.warning("handoff channel refused: the caller is not a waypoint of this node")
            ch.close()
            return
        self.channels.setdefault(address, []).append(ch)
        asyncio.get_running_loop().add_reader(ch.fileno(), self._readable, address, ch)
        log.info("waypoint %s connected its handoff channel", address)

    def _readable(self, address: str, ch: socket.socket) -> None:
        # A waypoint sends nothing: readable means it closed (or broke) its end.
        try:
            data = ch.recv(1)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            log.info("waypoint %s closed its handoff channel", address)
            self._drop(ch)

    def _drop(self, ch: socket.socket) -> None:
        for addr, chs in list(self.channels.items()):
            if ch in chs:
                chs.remove(ch)
            if not chs:
                del self.channels[addr]
        with contextlib.suppress(ValueError, OSError):
            asyncio.get_running_loop().remove_reader(ch.fileno())
        ch.close()
