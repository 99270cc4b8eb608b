"""Moving bytes between a pod's TCP connection and its other end, with backpressure.

A `PodSide` is the plaintext TCP connection to or from a pod. Its `peer` is where its bytes
go: an HBONE `Stream` (cross-node) or another `PodSide` through a `Pipe` (same node).

Backpressure, both ways, so a slow reader never makes the tunnel buffer without bound:
- pod -> tunnel: when the HBONE stream has no flow-control window (or the TLS connection's
  write buffer is full), the pod's socket stops being read; it resumes when credit
  arrives. The kernel then pushes back on the pod with a zero TCP window.
- tunnel -> pod: bytes received on a stream are credited back to the sender (WINDOW_UPDATE)
  only once the pod's socket has taken them; a pod that stops reading stalls its sender.

Half-close is TCP's: EOF from the pod becomes END_STREAM and END_STREAM becomes a FIN
(write_eof) toward the pod; the connection closes when both directions are done. A reset
on either side becomes a reset on the other (RST_STREAM(CONNECT_ERROR) / TCP RST).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from typing import TYPE_CHECKING, Protocol, cast

from agent.tunnel import h2 as hb

if TYPE_CHECKING:
    from agent.tunnel.hbone import HboneConnection

# Bytes a PodSide may hold before its peer exists (the CONNECT is under way): one read.
EARLY_LIMIT = 256 << 10


class Peer(Protocol):
    def send(self, data: bytes) -> None: ...

    def send_eof(self) -> None: ...

    def reset(self) -> None: ...

    def drained(self) -> None: ...


class FlowRecord:
    """Per-connection counters; plain ints on the hot path, exported when it closes."""

    __slots__ = ("closed", "opened", "received", "sent")

    def __init__(self) -> None:
        self.sent = 0  # bytes from the pod side toward the other end
        self.received = 0  # bytes delivered to the pod side
        self.opened = time.monotonic()
        self.closed: float | None = None


class PodSide(asyncio.Protocol):
    def __init__(self, on_close: asyncio.Future[None] | None = None) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: Peer | None = None
        self._early = bytearray()
        self._early_eof = False
        self.read_paused = False  # paused because the peer cannot take more
        self.write_paused = False  # our socket's buffer is full: the peer should wait
        self.local_eof = False  # we got EOF from the pod
        self.remote_eof = False  # we sent EOF to the pod
        self.closed = False
        self.reset_seen = False
        self.on_close = on_close
        self.flow = FlowRecord()
        self.connected = asyncio.get_running_loop().create_future()

    # ---- asyncio.Protocol --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if not self.connected.done():
            self.connected.set_result(None)

    def data_received(self, data: bytes) -> None:
        self.flow.sent += len(data)
        if self.peer is not None:
            self.peer.send(data)
            return
        self._early += data
        if len(self._early) >= EARLY_LIMIT:
            self.pause_reading()

    def eof_received(self) -> bool:
        self.local_eof = True
        if self.peer is not None:
            self.peer.send_eof()
        else:
            self._early_eof = True
        self._maybe_close()
        return True  # keep the other direction open (half-close)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.flow.closed = time.monotonic()
        if not self.connected.done():
            self.connected.set_exception(exc or ConnectionError("closed before connecting"))
        if self.peer is not None and not (self.local_eof and self.remote_eof):
            # Gone before both directions finished: an abort (or RST) from the pod.
            self.peer.reset()
        if self.on_close is not None and not self.on_close.done():
            self.on_close.set_result(None)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.peer is not None:
            self.peer.drained()

    # ---- as the far end's sink ---------------------------------------------------------

    def attach(self, peer: Peer) -> None:
        """Connect to the far end and hand over what arrived meanwhile."""
        self.peer = peer
        if self._early:
            data = bytes(self._early)
            self._early.clear()
            peer.send(data)
        if self._early_eof:
            peer.send_eof()
        if self.read_paused and not self._early:
            self.resume_reading()

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.flow.received += len(data)
            self.transport.write(data)

    def write_eof(self) -> None:
        self.remote_eof = True
        t = self.transport
        if t is not None and not self.closed:
            if t.can_write_eof():
                t.write_eof()
            self._maybe_close()

    def abort(self) -> None:
        """Reset the pod's connection (SO_LINGER 0 makes close send a RST)."""
        self.reset_seen = True
        t = self.transport
        if t is not None and not self.closed:
            sock = t.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
            t.abort()

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()

    def pause_reading(self) -> None:
        if not self.read_paused and self.transport is not None and not self.closed:
            self.read_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.read_paused and self.transport is not None and not self.closed:
            self.read_paused = False
            self.transport.resume_reading()

    def _maybe_close(self) -> None:
        if self.local_eof and self.remote_eof and self.transport is not None:
            self.transport.close()


class Stream:
    """One HBONE stream bound to one PodSide (pod bytes <-> DATA frames)."""

    __slots__ = ("conn", "early", "eof_pending", "h2", "owed", "pending", "pod", "sid")

    def __init__(self, conn: HboneConnection, sid: int, pod: PodSide | None) -> None:
        self.conn = conn
        self.h2 = conn.h2  # the connection's codec, one attribute load nearer (hot path)
        self.sid = sid
        self.pod = pod
        self.pending = bytearray()  # pod bytes waiting for flow-control credit
        self.eof_pending = False
        self.owed = 0  # credit to return once the pod socket drains
        self.early: list[tuple[bytes, int]] = []  # peer data before the pod connected

    # pod -> tunnel (Peer interface)

    def send(self, data: bytes) -> None:
        if self.pending:
            self.pending += data
        else:
            try:
                taken = self.h2.send_data(self.sid, data)
            except hb.StreamGone:
                return
            if taken < len(data):
                self.pending += data[taken:]
        if self.pending and self.pod is not None:
            self.pod.pause_reading()
        self.conn.flush()

    def send_eof(self) -> None:
        if self.pending:
            self.eof_pending = True
            return
        try:
            self.h2.end_stream(self.sid)
        except hb.StreamGone:
            return
        self.conn.flush()
        self.conn.maybe_done(self)

    def reset(self) -> None:
        self.h2.reset(self.sid, hb.Err.CONNECT_ERROR)
        self._give_back()
        self.conn.flush()
        self.conn.forget(self)

    def _give_back(self) -> None:
        """The stream is going away: credit what was received and never relayed (owed to a
        paused pod, or held before the pod connected). The connection's window is shared
        by every stream on it; what a reset stream kept would be lost to all of them."""
        n = self.owed + sum(flow for _, flow in self.early)
        self.owed = 0
        self.early = []
        if n:
            self.h2.consumed(self.sid, n)

    def drained(self) -> None:
        if self.owed:
            self.h2.consumed(self.sid, self.owed)
            self.owed = 0
            self.conn.flush()

    # tunnel -> pod (driven by HboneConnection events)

    def on_data(self, data: bytes, flow: int) -> None:
        pod = self.pod
        if pod is None or pod.transport is None:
            # Peer sent before we finished connecting the pod: hold it, uncredited, so the
            # sender's window bounds how much we hold.
            self.early.append((data, flow))
            return
        pod.write(data)
        if pod.write_paused:
            self.owed += flow
        else:
            self.h2.consumed(self.sid, flow)

    def bind(self, pod: PodSide) -> None:
        """The pod connection is up: deliver what the peer sent meanwhile, then relay."""
        self.pod = pod
        early, self.early = self.early, []
        for data, flow in early:
            self.on_data(data, flow)
        pod.attach(self)

    def on_end(self) -> None:
        if self.pod is not None:
            self.pod.write_eof()
        self.conn.maybe_done(self)

    def on_reset(self) -> None:
        if self.pod is not None:
            self.pod.abort()
        self._give_back()
        self.conn.flush()
        self.conn.forget(self)

    def on_window(self) -> None:
        if not self.pending:
            return
        h2 = self.h2
        try:
            taken = h2.send_data(self.sid, self.pending)
        except hb.StreamGone:
            self.pending.clear()
            return
        del self.pending[:taken]
        if not self.pending:
            if self.eof_pending:
                self.eof_pending = False
                h2.end_stream(self.sid)
            if self.pod is not None and not self.conn.write_paused:
                self.pod.resume_reading()
        self.conn.flush()


class Pipe:
    """Same-node delivery: one PodSide's bytes straight into another's socket."""

    __slots__ = ("dst", "src")

    def __init__(self, src: PodSide, dst: PodSide) -> None:
        self.src = src
        self.dst = dst

    def send(self, data: bytes) -> None:
        self.dst.write(data)
        if self.dst.write_paused:
            self.src.pause_reading()

    def send_eof(self) -> None:
        self.dst.write_eof()

    def reset(self) -> None:
        self.dst.abort()

    def drained(self) -> None:
        # Called on src's own resume_writing: src's socket can take more, so the side that
        # writes into it (dst, through the reverse pipe) may be read again.
        self.dst.resume_reading()


def splice(a: PodSide, b: PodSide) -> None:
    """Connect two pod connections both ways (each side's drained() resumes the other)."""
    a.attach(Pipe(a, b))
    b.attach(Pipe(b, a))
