"""The waypoint's end of the node agent's handoff channel (agent/tunnel/handoff.py).

The waypoint connects to its node agent's handoff socket and receives pod connections the
agent captured for Services this waypoint serves, each with what the agent knows of it.
If the agent restarts, the channel closes and the waypoint connects again (with a short,
jittered backoff); connections already handed over are the waypoint's and carry on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
from collections.abc import Callable
from pathlib import Path

from agent.tunnel.handoff import MAX_MESSAGE, Handoff

log = logging.getLogger("weft.waypoint.handoff")

RETRY_MIN = 0.2  # seconds before reconnecting to a restarted agent
RETRY_MAX = 2.0


class HandoffReceiver:
    """Receives connections; `on_connection(handoff, sock)` owns the socket it is given."""

    def __init__(self, path: Path, on_connection: Callable[[Handoff, socket.socket], None]) -> None:
        self.path = path
        self.on_connection = on_connection
        self.received = 0
        self.malformed = 0
        self.connected = asyncio.Event()
        self.stopped = False
        self._closed: asyncio.Future[None] | None = None
        self._ch: socket.socket | None = None

    def stop(self) -> None:
        """Close the channel and do not reconnect: the waypoint is draining, and the agent
        hands new connections to a successor (or over HBONE)."""
        self.stopped = True
        ch, closed = self._ch, self._closed
        if ch is None or closed is None or closed.done():
            return
        # Refuse further hand-overs first (the agent's send fails and it falls back), then
        # take the ones already queued on the channel: none is dropped in between.
        with contextlib.suppress(OSError):
            ch.shutdown(socket.SHUT_RD)
        self._readable(ch, closed)
        if not closed.done():
            closed.set_result(None)

    async def run(self) -> None:
        """Keep the channel open for as long as the waypoint runs (until stop())."""
        delay = RETRY_MIN
        while not self.stopped:
            try:
                await self._serve()
                delay = RETRY_MIN
            except OSError as e:
                log.debug("handoff channel %s: %s", self.path, e)
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, RETRY_MAX)

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        ch = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ch.setblocking(False)
        closed: asyncio.Future[None] = loop.create_future()
        self._closed, self._ch = closed, ch
        try:
            await loop.sock_connect(ch, str(self.path))
            loop.add_reader(ch.fileno(), self._readable, ch, closed)
            self.connected.set()
            log.info("handoff channel to the node agent is open (%s)", self.path)
            await closed
            if not self.stopped:
                log.info("the node agent closed the handoff channel; reconnecting")
        finally:
            self.connected.clear()
            with contextlib.suppress(ValueError, OSError):
                loop.remove_reader(ch.fileno())
            ch.close()

    def _readable(self, ch: socket.socket, closed: asyncio.Future[None]) -> None:
        while True:
            try:
                msg, fds, _flags, _ = socket.recv_fds(ch, MAX_MESSAGE, 4)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                msg, fds = b"", []
            if not msg and not fds:
                if not closed.done():
                    closed.set_result(None)
                return
            socks = [socket.socket(fileno=fd) for fd in fds]
            try:
                what = Handoff.decode(msg)
                if len(socks) != 1:
                    raise ValueError(f"handoff message carries {len(socks)} descriptors, not 1")
            except ValueError as e:
                self.malformed += 1
                log.warning("handoff from the node agent refused: %s", e)
                for s in socks:
                    s.close()
                continue
            self.received += 1
            self.on_connection(what, socks[0])
