"""Pooled outbound HBONE connections, keyed by (source identity, destination identity,
destination node): streams of one workload pair share a TLS session, as in ztunnel.

- A connection takes new streams until the peer's concurrent-stream limit (or ours,
  `max_streams`); then the next stream dials another connection.
- Dialing is deduplicated: callers that need a connection for a key while one is being
  established wait for it instead of opening their own.
- Idle connections (no stream for `idle_timeout`) are closed; connections the peer
  GOAWAYs take no new streams and close once their streams finish.
- Keepalive: an idle connection is PINGed every `keepalive` seconds; one that does not
  answer within the next period is dropped, so a dead peer does not eat new streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
from dataclasses import dataclass

from agent.tunnel import h2 as hb
from agent.tunnel.hbone import HboneConnection

log = logging.getLogger("weft.tunnel.pool")

PoolKey = tuple[str, str, str, int]  # (src id, dst id, node ip, port)


@dataclass(frozen=True)
class PoolSettings:
    max_streams: int = 100  # per connection; also capped by the peer's SETTINGS
    idle_timeout: float = 60.0  # seconds without streams before a connection is closed
    keepalive: float = 30.0  # seconds between PINGs on a quiet connection
    connect_timeout: float = 5.0  # TCP + TLS handshake to the peer node
    coalesce_writes: bool = False  # see HboneConnection: on for the waypoint's task writes


class PeerIdentityMismatch(Exception):
    pass


class ConnectionPool:
    def __init__(
        self,
        settings: PoolSettings,
        h2_settings: hb.Settings,
        *,
        mark: int = 0,
        source: str | None = None,
    ) -> None:
        self.settings = settings
        self.h2_settings = h2_settings
        self.mark = mark
        # The address connections come from (a waypoint's own: the destination checks
        # that a waypoint's identity arrives from a waypoint instance's address).
        self.source = source
        self._conns: dict[PoolKey, list[HboneConnection]] = {}
        self._dialing: dict[PoolKey, asyncio.Future[HboneConnection]] = {}
        self._task: asyncio.Task[None] | None = None
        self.dials = 0
        self.dial_failures = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._maintain(), name="hbone-pool")

    async def get(self, key: PoolKey, ctx: ssl.SSLContext, sni: str) -> HboneConnection:
        """A connection for `key` with room for one more stream."""
        for c in self._conns.get(key, ()):
            if c.can_open() and c.open_streams() < self.settings.max_streams:
                return c
        pending = self._dialing.get(key)
        if pending is not None:
            c = await asyncio.shield(pending)
            if c.can_open() and c.open_streams() < self.settings.max_streams:
                return c
        fut: asyncio.Future[HboneConnection] = asyncio.get_running_loop().create_future()
        self._dialing[key] = fut
        try:
            c = await self._dial(key, ctx, sni)
            fut.set_result(c)
            return c
        except BaseException as e:
            fut.set_exception(e)
            fut.exception()  # retrieved: waiters re-raise it themselves
            raise
        finally:
            if self._dialing.get(key) is fut:
                del self._dialing[key]

    async def _dial(self, key: PoolKey, ctx: ssl.SSLContext, sni: str) -> HboneConnection:
        src, dst, host, port = key
        loop = asyncio.get_running_loop()
        self.dials += 1

        def lost(c: HboneConnection) -> None:
            conns = self._conns.get(key)
            if conns and c in conns:
                conns.remove(c)
                if not conns:
                    del self._conns[key]

        proto = HboneConnection(
            client=True,
            settings=self.h2_settings,
            on_lost=lost,
            label=f"{src} -> {dst} @{host}",
            coalesce=self.settings.coalesce_writes,
        )
        try:
            sock = _socket(host, port, self.mark)
            if self.source is not None and (":" in self.source) == (":" in host):
                sock.bind((self.source, 0))
            await asyncio.wait_for(
                loop.sock_connect(sock, (host, port)), self.settings.connect_timeout
            )
            await asyncio.wait_for(
                loop.create_connection(
                    lambda: proto,
                    sock=sock,
                    ssl=ctx,
                    server_hostname=sni,
                    ssl_handshake_timeout=self.settings.connect_timeout,
                ),
                self.settings.connect_timeout,
            )
        except (OSError, TimeoutError, ssl.SSLError) as e:
            self.dial_failures += 1
            raise ConnectionError(_explain(e, host, port)) from e
        if proto.peer_id != dst:
            # The server proved *an* identity from our CA, but not the one we meant to
            # reach: a misrouted or spoofed node. Never send the stream there.
            proto.close()
            self.dial_failures += 1
            raise PeerIdentityMismatch(
                f"node {host}:{port} presented {proto.peer_id}, expected {dst}"
            )
        self._conns.setdefault(key, []).append(proto)
        return proto

    def connections(self) -> list[HboneConnection]:
        return [c for cs in self._conns.values() for c in cs]

    async def _maintain(self) -> None:
        s = self.settings
        pinged: dict[int, float] = {}
        while True:
            await asyncio.sleep(min(s.keepalive, s.idle_timeout) / 2)
            now = time.monotonic()
            for c in self.connections():
                idle = now - c.last_active
                if not c.streams and idle > s.idle_timeout:
                    c.goaway()
                    c.close()
                    continue
                sent = pinged.get(id(c))
                if sent is not None and c.last_active < sent and now - sent > s.keepalive:
                    log.warning("HBONE %s: no answer to keepalive PING; dropping it", c.label)
                    c.abort_all()
                    continue
                if idle > s.keepalive and (sent is None or c.last_active >= sent):
                    c.h2.ping()
                    c.flush()
                    pinged[id(c)] = now
            live = {id(c) for c in self.connections()}
            for k in [k for k in pinged if k not in live]:
                del pinged[k]

    def drain(self) -> None:
        for c in self.connections():
            c.goaway()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for c in self.connections():
            c.abort_all()


def _socket(host: str, port: int, mark: int) -> socket.socket:
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(fam, socket.SOCK_STREAM)
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if mark:
        # The capture program skips sockets with the agent's mark: the tunnel's own
        # connections must never be redirected back into it.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
    return sock


def _explain(e: BaseException, host: str, port: int) -> str:
    if isinstance(e, TimeoutError):
        return (
            f"connecting to the tunnel at {host}:{port} timed out; maybe a firewall or "
            "NetworkPolicy blocks HBONE port 15008, or that node's agent is down"
        )
    if isinstance(e, ConnectionRefusedError):
        return f"tunnel at {host}:{port} refused the connection: is weft's agent running there?"
    if isinstance(e, ssl.SSLError):
        return (
            f"TLS with the tunnel at {host}:{port} failed ({e.reason}): the nodes may "
            "not share a trust bundle (root rotation in progress?)"
        )
    return f"cannot reach the tunnel at {host}:{port}: {e}"
