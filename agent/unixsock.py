"""Unix-socket listeners served from the event loop, and who is on the other end.

The node agent's handoff channel (tunnel/handoff.py) and its handover socket (restart.py)
are both listeners at a path that a successor process binds again while this one still
runs: start() replaces whatever is at the path, close() removes the path only while it is
still this socket's.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
from collections.abc import Callable
from pathlib import Path

_UCRED = struct.Struct("3i")


def peer_cred(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a Unix socket (SO_PEERCRED)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return int(pid), int(uid), int(gid)


class UnixListener:
    def __init__(
        self,
        path: Path,
        kind: int,
        mode: int,
        on_connection: Callable[[socket.socket], None],
        backlog: int = 64,
    ) -> None:
        self.path = path
        self.kind = kind
        self.mode = mode
        self.on_connection = on_connection
        self.backlog = backlog
        self._sock: socket.socket | None = None
        self._inode = 0

    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        s = socket.socket(socket.AF_UNIX, self.kind)
        s.setblocking(False)
        s.bind(str(self.path))
        os.chmod(self.path, self.mode)
        self._inode = self.path.stat().st_ino
        s.listen(self.backlog)
        self._sock = s
        asyncio.get_running_loop().add_reader(s.fileno(), self._accept)

    def _accept(self) -> None:
        assert self._sock is not None
        while True:
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            self.on_connection(conn)

    def close(self) -> None:
        if self._sock is None:
            return
        with contextlib.suppress(ValueError, OSError):
            asyncio.get_running_loop().remove_reader(self._sock.fileno())
        self._sock.close()
        self._sock = None
        # A successor may have bound the path since (agent/restart.py): leave its.
        with contextlib.suppress(FileNotFoundError):
            if self.path.stat().st_ino == self._inode:
                self.path.unlink()
