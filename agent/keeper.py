"""The socket keeper: holds the node agent's listening sockets, so a crashed agent's
connects wait instead of being refused (issue 18).

A listening socket lives as long as some process has it open. The keeper is a tiny
process that never restarts with the agent (a lab process of its own; in Kubernetes a
native sidecar container of the agent's pod, sharing an emptyDir with it) and keeps a
duplicate of each listener the agent makes. When the agent is SIGKILLed or OOM-killed,
its listeners stay open in the keeper: the kernel completes new connects into their
backlog (and the data path keeps steering captured connects to the registered listener,
bpf/weft.c weft_tunnel_lookup, whose entry lives as long as the socket), and the next agent
takes the same sockets from the keeper and accepts what queued. A crash then costs the
connections the dead process held, not the connects made while no agent ran. This is
systemd's file descriptor store, reduced to what the agent needs.

Protocol, one request per connection on a Unix stream socket (mode 0600; the peer must be
the keeper's own uid, checked with SO_PEERCRED):

    take          -> JSON list of names, with that many descriptors (SCM_RIGHTS)
    keep NAME     with one descriptor -> "ok" (a listening TCP socket; replaces NAME's)
    drop          -> "ok": close every held socket (an agent that a successor asked to let
                  go sends it, so that sockets only it used close and their queued
                  connects move to the successor's, agent/restart.py; the successor then
                  gives the keeper its own again)

The keeper accepts only listening TCP sockets, and the agent checks that what it takes
is one, bound where it wants to listen; anything else is closed and made afresh.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import re
import socket
from pathlib import Path
from typing import Protocol

from agent.unixsock import UnixListener, peer_cred

log = logging.getLogger("weft.keeper")

KEEPER_SOCKET = "keeper.sock"
_NAME = re.compile(r"^[a-z][a-z0-9-]{0,31}$")
_MAX_HELD = 16


class HasFileno(Protocol):
    def fileno(self) -> int: ...


def _is_listening_tcp(s: socket.socket) -> bool:
    try:
        return (
            s.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE) == socket.SOCK_STREAM
            and s.family in (socket.AF_INET, socket.AF_INET6)
            and bool(s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
        )
    except OSError:
        return False


class Keeper:
    """The keeper's state and its request handler (served by `serve`)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.held: dict[str, socket.socket] = {}
        self._listener = UnixListener(path, socket.SOCK_STREAM, 0o600, self.handle, 16)

    def start(self) -> None:
        self._listener.start()

    def close(self) -> None:
        self._listener.close()
        for s in self.held.values():
            s.close()
        self.held.clear()

    def handle(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(1.0)  # a request is one small message; nobody holds us up
            try:
                _pid, uid, _gid = peer_cred(conn)
                if uid != os.geteuid():
                    log.warning("refused a keeper request from uid %d", uid)
                    return
                msg, fds, _flags, _addr = socket.recv_fds(conn, 256, 2)
            except OSError as e:
                log.warning("keeper request failed: %s", e)
                return
            try:
                self._request(conn, msg.decode("ascii", "replace").strip(), fds)
            except OSError as e:
                log.warning("keeper answer failed: %s", e)
            finally:
                for fd in fds:
                    with contextlib.suppress(OSError):
                        os.close(fd)

    def _request(self, conn: socket.socket, msg: str, fds: list[int]) -> None:
        if msg == "take":
            names = sorted(self.held)
            data = json.dumps(names).encode()
            socket.send_fds(conn, [data], [self.held[n].fileno() for n in names])
            return
        if msg == "drop":
            for held in self.held.values():
                held.close()
            log.info("dropped %d socket(s): a successor holds its own", len(self.held))
            self.held.clear()
            conn.sendall(b"ok")
            return
        verb, _, name = msg.partition(" ")
        if verb != "keep" or not _NAME.match(name) or len(fds) != 1:
            conn.sendall(b"error: expected 'take' or 'keep NAME' with one descriptor")
            return
        fd = os.dup(fds[0])
        try:
            s = socket.socket(fileno=fd)
        except OSError:  # not a socket at all
            os.close(fd)
            conn.sendall(b"error: not a listening TCP socket")
            return
        if not _is_listening_tcp(s):
            s.close()
            conn.sendall(b"error: not a listening TCP socket")
            return
        if name not in self.held and len(self.held) >= _MAX_HELD:
            s.close()
            conn.sendall(b"error: the keeper holds enough sockets")
            return
        old = self.held.get(name)
        self.held[name] = s
        if old is not None:
            old.close()
        log.info("holding %s (%s)", name, s.getsockname())
        conn.sendall(b"ok")


# ---- the agent's side -------------------------------------------------------------------


def take(path: Path, timeout: float = 2.0) -> dict[str, socket.socket]:
    """The listening sockets the keeper at `path` holds, by name ({} when no keeper runs
    there: the agent then makes its own)."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
            c.settimeout(timeout)
            c.connect(str(path))
            c.sendall(b"take")
            msg, fds, _flags, _addr = socket.recv_fds(c, 4096, _MAX_HELD)
    except (FileNotFoundError, ConnectionRefusedError):
        return {}
    except OSError as e:
        log.warning("the socket keeper at %s did not answer (%s); listening afresh", path, e)
        return {}
    socks = [socket.socket(fileno=fd) for fd in fds]
    try:
        names = json.loads(msg)
        if not isinstance(names, list) or len(names) != len(socks):
            raise ValueError("names and descriptors differ")
    except ValueError as e:
        for s in socks:
            s.close()
        log.warning("the socket keeper at %s answered nonsense (%s)", path, e)
        return {}
    return dict(zip((str(n) for n in names), socks, strict=True))


def _ask(path: Path, request: str, fds: list[int], timeout: float) -> bool:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
            c.settimeout(timeout)
            c.connect(str(path))
            socket.send_fds(c, [request.encode()], fds)
            answer = c.recv(256)
    except OSError as e:
        log.warning("the socket keeper at %s did not do %r: %s", path, request, e)
        return False
    if answer != b"ok":
        log.warning("the socket keeper refused %r: %s", request, answer.decode("ascii", "replace"))
        return False
    return True


def keep(path: Path, name: str, sock: HasFileno, timeout: float = 2.0) -> bool:
    """Give the keeper a duplicate of `sock` to hold as `name`; False (logged) if it
    cannot (then a crash of this agent refuses connects until the next one listens)."""
    return _ask(path, f"keep {name}", [sock.fileno()], timeout)


def drop(path: Path, timeout: float = 2.0) -> bool:
    """Ask the keeper to close what it holds (see the protocol above)."""
    return _ask(path, "drop", [], timeout)


def adopt(held: dict[str, socket.socket], name: str, host: str, port: int) -> socket.socket | None:
    """The held socket `name` if it is a listening TCP socket bound to host:port (then it
    is removed from `held`), else None (and a mismatching one is closed)."""
    s = held.pop(name, None)
    if s is None:
        return None
    try:
        addr = s.getsockname()
        ok = (
            _is_listening_tcp(s)
            and ipaddress.ip_address(addr[0]) == ipaddress.ip_address(host)
            and addr[1] == port
        )
    except (OSError, ValueError):
        addr, ok = None, False
    if not ok:
        log.info(
            "the kept %s (%s) is not a listener on %s:%d: listening afresh", name, addr, host, port
        )
        s.close()
        return None
    s.setblocking(False)
    return s


def listener_socket(host: str, port: int) -> socket.socket:
    """A listening socket that a successor process can share (SO_REUSEPORT): during a
    restart the new process listens beside the old one, and when the old one closes its
    socket the kernel moves connections still queued on it to the new one
    (net.ipv4.tcp_migrate_req, agent/restart.py). Only a process of the same user may join
    a port's group."""
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind((host, port))
    # Listen now: the event loop's server calls listen() only when it starts serving, and
    # a bound socket that does not listen is not in the port's group (connects to it are
    # refused).
    s.listen(4096)
    s.setblocking(False)
    return s


def listener(
    path: Path | None,
    held: dict[str, socket.socket],
    name: str,
    host: str,
    port: int,
    *,
    keep_new: bool = True,
) -> socket.socket:
    """The listener `name` on host:port: the one the keeper kept (connects made while no
    process listened are queued on it), else a new one, given to the keeper to hold unless
    `keep_new` is False (a node agent gives it only once it has taken the node over: a
    successor that fails to start must not leave a listener in its port group that nobody
    accepts on)."""
    s = adopt(held, name, host, port)
    if s is not None:
        log.info("took the %s listener %s:%d from the socket keeper", name, host, port)
        return s
    s = listener_socket(host, port)
    if path is not None and keep_new:
        keep(path, name, s)
    return s


async def serve(path: Path) -> None:
    """Run a keeper at `path` until SIGTERM or SIGINT."""
    import asyncio
    import signal

    keeper = Keeper(path)
    keeper.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("socket keeper at %s", path)
    try:
        await stop.wait()
    finally:
        keeper.close()


def main(argv: list[str] | None = None) -> None:
    """`python -m agent.keeper --socket PATH`: the keeper without the CLI's imports (it
    runs beside every agent, so it stays a few MB; `weft agent keeper` is the same)."""
    import argparse
    import asyncio

    ap = argparse.ArgumentParser(prog="python -m agent.keeper", description=__doc__.split("\n")[0])
    ap.add_argument(
        "--socket",
        type=Path,
        default=Path(os.environ.get("WEFT_KEEPER_SOCKET", "/run/weft/keeper/keeper.sock")),
    )
    args = ap.parse_args(argv)
    logging.basicConfig(
        level=os.environ.get("WEFT_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    asyncio.run(serve(args.socket))


if __name__ == "__main__":
    main()
