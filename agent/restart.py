"""Handing a node from one agent process to the next: restarts and upgrades without a
refused connection (issue 18, Envoy's hot-restart model without a shared-memory parent).

The new process (the successor):
  1. listens on the tunnel ports beside the old one (SO_REUSEPORT, keeper.listener_socket)
     without accepting yet: connections the kernel gives it wait in its backlog;
  2. does everything that can fail (identity store, build, admin listeners), registers its
     listener for captured connects (bpf/weft.c weft_tunnel_lookup), and asks the old
     process to let go, over the handover socket in the state directory
     (HandoverListener: as SIGTERM does, but answered, and across PID namespaces);
  3. takes the data path lock as the old process releases it, adopts the pinned programs
     and maps, loads the cached config and the identities the old process kept in a
     memory-backed store (identity/store.py), and starts accepting.

The old process, asked (or on SIGTERM), closes its listeners (the kernel moves
connections still queued on them to the successor's listener: that is what
net.ipv4.tcp_migrate_req=1, set here, does; without it they would be reset), releases
the data path, and keeps relaying the connections it holds until they end or its drain
deadline passes; asked by a successor, it then waits for SIGTERM rather than exit.

Without a successor, SIGTERM is a plain drain. A SIGKILLed agent loses the connections it
held. Connects made before a new process listens wait in the backlog of the listeners the
node's socket keeper holds (agent/keeper.py), and the new process takes those sockets;
without a keeper they are refused (no listener is registered then, and weft_tunnel_lookup
gives them to no other socket). With a keeper, an agent asked to let go has it drop what
it holds, and the successor gives it its own listeners once it holds the data path lock.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path

from agent.unixsock import UnixListener, peer_cred

log = logging.getLogger("weft.restart")

MIGRATE_REQ = Path("/proc/sys/net/ipv4/tcp_migrate_req")
HANDOVER_SOCKET = "handover.sock"  # in the agent's state directory


def enable_request_migration(knob: Path = MIGRATE_REQ) -> bool:
    """Let the kernel move connections queued on a closing listener to another listener
    of its SO_REUSEPORT group (Linux 5.14+), in this network namespace."""
    try:
        if knob.read_text().strip() != "1":
            knob.write_text("1")
        return True
    except OSError as e:
        log.warning(
            "cannot set %s (%s): on a restart, connections queued on the old agent's "
            "listener will be reset instead of moving to the new one",
            knob,
            e.strerror or e,
        )
        return False


class HandoverListener:
    """The running agent's end: a Unix socket in its state directory (mode 0600, and the
    peer's uid checked) where a successor asks it to let go. Connecting is the request;
    the successor then waits for the data path lock. Works across PID namespaces (two
    pods of a DaemonSet during a surge update), where a pid file would not."""

    def __init__(self, path: Path, on_request: Callable[[], None]) -> None:
        self.path = path
        self.on_request = on_request
        self._listener = UnixListener(path, socket.SOCK_STREAM, 0o600, self._accepted, 4)

    def start(self) -> None:
        self._listener.start()

    def close(self) -> None:
        self._listener.close()

    def _accepted(self, conn: socket.socket) -> None:
        with conn:
            pid, uid, _gid = peer_cred(conn)
            if uid != os.geteuid():
                log.warning("handover request from uid %d (pid %d) refused", uid, pid)
                return
            log.info("a new agent process (pid %d) takes this node over", pid)
            with contextlib.suppress(OSError):
                conn.sendall(b"ok\n")
            self.on_request()


def ask_predecessor(path: Path, timeout: float = 5.0) -> bool:
    """Ask the agent process serving this node, if any, to let go. True: one answered
    (it is releasing the data path and closing its listeners)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(str(path))
        return s.recv(16).startswith(b"ok")
    except OSError:
        return False  # none listening (no predecessor, or one that crashed)
    finally:
        s.close()
