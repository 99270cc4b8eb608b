"""Backend connections of the waypoint: HTTP over HBONE streams to the backend's node.

Each backend endpoint gets a small pool of keep-alive HTTP/1.1 connections (one HBONE
stream each, multiplexed by the tunnel's connection pool onto one TLS connection per
node) or one shared HTTP/2 connection for gRPC/h2c backends. The TLS connection presents
the waypoint's identity and accepts only the backend workload's SPIFFE ID, exactly as a
node tunnel would, so mTLS holds end to end across the waypoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from agent.tunnel.localstream import StreamTransport
from agent.tunnel.pool import ConnectionPool
from agent.tunnel.tunnel import FORWARDED, sni_for
from agent.waypoint.chanq import EMPTY, Channel
from agent.waypoint.codec import events as ev
from agent.waypoint.codec.config import Limits, Role
from agent.waypoint.codec.errors import ProtocolError
from agent.waypoint.codec.headers import Headers
from agent.waypoint.codec.http1 import Http1Connection
from agent.waypoint.codec.http2 import Http2Connection

log = logging.getLogger("weft.waypoint.upstream")

IDLE_TIMEOUT = 60.0  # seconds an idle keep-alive backend connection is kept (Envoy: 1 h)
# Events a stream's reader may lag behind before an HTTP/1.1 backend connection stops
# being read (resumed at half): a caller that stops reading must not make the waypoint
# hold a whole large answer. HTTP/2 streams are bounded by their flow-control window
# (credit is given back only as the reader takes the data).
READ_AHEAD = 16


class UpstreamError(Exception):
    """The backend could not be reached or broke the exchange; `kind` classifies it for
    retries and outlier detection: connect-failure, reset, refused-stream, protocol."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(eq=False)
class UpstreamConnection(asyncio.Protocol):
    """One HTTP connection to a backend, over one HBONE stream."""

    h2: bool = False
    codec: Any = None
    transport: Any = None
    queues: dict[int, StreamEvents] = field(default_factory=dict)
    closed: bool = False
    last_used: float = field(default_factory=time.monotonic)
    requests: int = 0
    served: int = 0  # responses received (max requests per connection)
    retire: bool = False  # close instead of reusing once the current exchange ends
    ep: Endpoint | None = None
    client_ip: str = ""  # the caller this connection's HBONE stream was authorized for
    on_close: Callable[[], None] | None = None  # tells the engine's pool accounting
    write_ready: asyncio.Event = field(default_factory=asyncio.Event)
    write_paused: bool = False  # write_ready's opposite, read without a call on the hot path
    # HTTP/2: senders of request bodies waiting for a stream's window to reopen, by stream.
    window_waiters: dict[int, asyncio.Future[None]] = field(default_factory=dict)
    error: UpstreamError | None = None  # why the connection failed (the first reason)

    def __post_init__(self) -> None:
        self.codec = (
            Http2Connection(Role.CLIENT, Limits())
            if self.h2
            else Http1Connection(Role.CLIENT, Limits())
        )
        self.write_ready.set()

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self._write(self.codec.data_to_send())

    def _write(self, data: bytes) -> None:
        if data and self.transport is not None and not self.closed:
            self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        try:
            events = self.codec.receive_data(data)
        except ProtocolError as err:
            self._fail(UpstreamError("protocol", f"backend broke HTTP: {err}"))
            return
        except Exception as err:
            # A fault of ours reading what the backend sent: it ends this connection (its
            # streams get the error), never the HBONE connection it rides on, which other
            # callers' streams share.
            log.exception("backend connection to %s: reading its answer failed", self.ep)
            self._fail(UpstreamError("protocol", f"reading the backend's answer failed: {err}"))
            self.close()
            return
        if self.h2:  # HTTP/1.1 never writes as a side effect of reading
            self._write(self.codec.data_to_send())
        for e in events:
            sid = getattr(e, "stream_id", None)
            if sid is None:
                if isinstance(e, ev.ConnectionClosed | ev.GoAway):
                    self.closed = self.closed or isinstance(e, ev.ConnectionClosed)
                continue
            if type(e) is ev.WindowUpdated:
                self._window_opened(sid)  # for the sender of its body, not its reader
                continue
            q = self.queues.get(sid)
            if q is None:
                continue
            if q.put_nowait(e) >= READ_AHEAD and not self.h2 and not q.paused:
                # The reader lags READ_AHEAD events behind (its caller stopped reading):
                # stop reading this connection until it catches up (StreamEvents._took).
                q.paused = True
                if self.transport is not None:
                    self.transport.pause_reading()

    def eof_received(self) -> bool:
        try:
            events = self.codec.receive_data(b"")
        except ProtocolError as err:
            self._fail(UpstreamError("protocol", f"backend broke HTTP: {err}"))
            return False
        for e in events:
            sid = getattr(e, "stream_id", None)
            if sid is not None and sid in self.queues:
                self.queues[sid].put_nowait(e)
        self._fail(UpstreamError("reset", "backend closed the connection"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(UpstreamError("reset", f"backend connection lost: {exc or 'closed'}"))

    def pause_writing(self) -> None:
        self.write_paused = True
        self.write_ready.clear()

    def resume_writing(self) -> None:
        self.write_paused = False
        self.write_ready.set()

    def _window_opened(self, sid: int) -> None:
        w = self.window_waiters.pop(sid, None)
        if w is not None and not w.done():
            w.set_result(None)

    def _fail(self, err: UpstreamError) -> None:
        self.closed = True
        for sid in list(self.window_waiters):
            self._window_opened(sid)
        if self.error is None:
            self.error = err
        for q in self.queues.values():
            q.put_nowait(err)
        self.queues.clear()
        self._closed_once()

    def _closed_once(self) -> None:
        cb, self.on_close = self.on_close, None
        if cb is not None:
            cb()

    # ---- used by the proxy -------------------------------------------------------------

    def reusable(self) -> bool:
        if self.closed or self.retire:
            return False
        if self.h2:
            return bool(self.codec.available_streams > 0)
        return bool(self.codec.keep_alive and self.codec.idle and not self.queues)

    def start(
        self,
        method: str,
        target: str,
        authority: str,
        headers: Headers,
        end_stream: bool,
        body: bytes = b"",
        rx: StreamEvents | None = None,
    ) -> int:
        """Send a request head (and, with `body`, the whole body after it, in one write:
        the request ends with it). The stream's events go to `rx` (the proxy's try), or to
        a new StreamEvents that `events(sid)` returns."""
        sid = self.codec.next_stream_id()
        if rx is None:
            rx = StreamEvents()
        rx.conn = self
        rx.sid = sid
        self.queues[sid] = rx
        self.requests += 1
        if self.closed or (self.h2 and not self.codec.keep_alive):
            # The backend broke the connection (or sent GOAWAY) before this request went
            # out, e.g. a server that is not HTTP/2 greeting first. The codec would raise
            # "going away" here, hiding why; the stream's events report the cause instead.
            rx.put_nowait(self._refusal())
            return sid
        if body:
            self._write(
                self.codec.send_request_head(sid, method, target, authority, "http", headers, False)
                + self.codec.send_data(sid, body, True)
            )
            return sid
        self._write(
            self.codec.send_request_head(
                sid, method, target, authority, "http", headers, end_stream
            )
        )
        return sid

    async def send(self, sid: int, data: bytes, end: bool) -> None:
        """Send body bytes once the backend can take them: the transport is writing and
        (HTTP/2) the stream's window is open, so a backend that reads slowly slows the
        caller's upload (its credit comes back as the body is sent) instead of growing
        the waypoint's memory. At most one piece waits queued beyond the window."""
        await self.write_ready.wait()
        if self.h2 and data:
            codec = self.codec
            while not self.closed and sid in self.queues and codec.send_window(sid) <= 0:
                codec.wait_for_window(sid)  # woken by its WindowUpdated, whichever window
                w = self.window_waiters[sid] = asyncio.get_running_loop().create_future()
                try:
                    await w
                finally:
                    if self.window_waiters.get(sid) is w:
                        del self.window_waiters[sid]
        if not self.closed:  # else the stream's events report why; the codec is dead
            self._write(self.codec.send_data(sid, data, end))

    def trailers(self, sid: int, headers: Headers) -> None:
        if not self.closed:
            self._write(self.codec.send_trailers(sid, headers))

    def _refusal(self) -> UpstreamError:
        """The error for a request started on a connection that cannot take it."""
        if self.error is not None:
            return UpstreamError(self.error.kind, str(self.error))
        if self.closed:
            return UpstreamError("reset", "backend connection already closed")
        return UpstreamError("refused-stream", "backend sent GOAWAY; request not sent")

    def events(self, sid: int) -> StreamEvents:
        """The events of stream `sid`, to iterate with `async for` or `await .next()`."""
        q = self.queues.get(sid)
        if q is None:
            raise UpstreamError("reset", "backend connection already closed")
        return q

    def cancel(self, sid: int) -> None:
        """Abandon stream `sid`: reset it toward the backend, and wake whoever waits for
        its events with a "reset" error."""
        if sid in self.queues or not self.closed:
            with contextlib.suppress(Exception):
                self._write(self.codec.reset_stream(sid))
        self._window_opened(sid)
        q = self.queues.pop(sid, None)
        if q is not None:
            q.put_nowait(UpstreamError("reset", "the exchange was cancelled"))
        if not self.h2:
            self.close()  # an HTTP/1.1 connection cannot abandon one response and go on

    def close(self) -> None:
        self.closed = True
        self._closed_once()
        if self.transport is not None:
            # A stream's reader may have paused reading (READ_AHEAD): what the backend still
            # sends is read and dropped, or an HBONE stream withholds its credit for good.
            self.transport.resume_reading()
            self.transport.close()


class StreamEvents(Channel[ev.Event | BaseException]):
    """The events of one request's stream, in order: the connection puts each one here as
    it is parsed (a Channel: one producer, one consumer), the request's task reads them.
    The last one (the end of the response, trailers or a reset) finishes the exchange on
    the connection before it is handed out, so the caller can release the connection
    right after it. Reading an event gives its HTTP/2 flow-control credit back, and resumes
    an HTTP/1.1 connection its reader had fallen READ_AHEAD events behind.

    A class rather than an async generator: a generator left suspended after the last
    event (the caller stops reading there) is finalized by the event loop, which costs a
    thread-safe wake-up of the loop (an eventfd write and read) and a Task running its
    aclose() for every request (seen with strace on the lab's waypoint). The proxy's
    try (proxy.py) is a subclass: one object per try for the stream, its timer and its
    outcome."""

    __slots__ = ("conn", "done", "paused", "sid")

    conn: UpstreamConnection
    sid: int

    def __init__(self) -> None:
        # conn and sid are set by UpstreamConnection.start
        super().__init__()
        self.done = False
        self.paused = False  # the HTTP/1.1 connection's reading, paused for this reader

    def __aiter__(self) -> StreamEvents:
        return self

    async def __anext__(self) -> ev.Event:
        e = await self.next()
        if e is None:
            raise StopAsyncIteration
        return e

    async def next(self) -> ev.Event | None:
        """The next event; None once the stream has ended. Raises what broke it."""
        if self.done:
            return None
        try:
            e = await self.get()
        except BaseException:
            self.close()  # cancelled while waiting: the exchange is over for this reader
            raise
        return self._took(e)

    def ready(self) -> ev.Event | None:
        """The next event if one is queued already (no waiting), else None."""
        if self.done:
            return None
        e = self.poll()
        return None if e is EMPTY else self._took(e)

    def _took(self, e: ev.Event | BaseException) -> ev.Event:
        if isinstance(e, BaseException):
            self.close()
            raise e
        if self.paused and self.qsize() <= READ_AHEAD // 2:
            self._resume()
        if type(e) is ev.Data:
            conn = self.conn
            if conn.h2:  # HTTP/1.1 has no window to reopen
                conn._write(conn.codec.consumed(self.sid, len(e.data)))
            if e.end_stream:
                self.close()
        elif type(e) is ev.ResponseHead:
            if e.end_stream and not e.informational:
                self.close()
        elif type(e) is ev.Trailers or type(e) is ev.StreamReset:
            self.close()
        return e

    def close(self) -> None:
        """Done with this exchange (read to its end, or abandoned): the stream no longer
        holds the connection."""
        if not self.done:
            self.done = True
            conn = self.conn
            if conn.queues.get(self.sid) is self:
                del conn.queues[self.sid]
            conn.last_used = time.monotonic()
            if self.paused:
                self._resume()

    def _resume(self) -> None:
        self.paused = False
        t = self.conn.transport
        if t is not None and not self.conn.closed:
            t.resume_reading()


@dataclass(frozen=True)
class Endpoint:
    ip: str
    port: int
    identity: str
    node_host: str
    node_port: int
    h2: bool = False
    key: str = field(init=False, compare=False)  # "ip:port", made once (looked up per try)

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", f"{self.ip}:{self.port}")


def _fresh(c: UpstreamConnection, now: float) -> bool:
    """An idle HTTP/1.1 connection that can take a request: reusable, and not idle for so
    long that the backend may be closing it."""
    return c.reusable() and now - c.last_used < IDLE_TIMEOUT


class UpstreamPool:
    def __init__(
        self,
        tunnel_pool: ConnectionPool,
        local_id: Callable[[], str],
        client_ctx: Callable[[], Any],
        connect_timeout: float = 5.0,
    ) -> None:
        self.tunnel_pool = tunnel_pool
        self.local_id = local_id
        self.client_ctx = client_ctx
        self.connect_timeout = connect_timeout
        self._idle: dict[tuple[str, str], deque[UpstreamConnection]] = {}
        self._h2: dict[tuple[str, str], UpstreamConnection] = {}
        self.active: dict[str, int] = {}  # connections per endpoint, for pool limits

    def has_idle(self, ep: Endpoint, client_ip: str) -> bool:
        """A connection to `ep` for this caller can take a request now; `take` returns it
        (the proxy takes it before the engine's pool admission, which counts it as a
        reuse). Connections are per caller address: the destination authorized each HBONE
        stream for the caller it was opened for, so it never serves another."""
        key = (ep.key, client_ip)
        if ep.h2:
            c = self._h2.get(key)
            return c is not None and c.reusable()
        now = time.monotonic()
        return any(_fresh(c, now) for c in self._idle.get(key, ()))

    def take(self, ep: Endpoint, client_ip: str) -> UpstreamConnection | None:
        """A connection to `ep` for this caller that can take a request now, or None. Stale
        ones met on the way are closed."""
        key = (ep.key, client_ip)
        if ep.h2:
            c = self._h2.get(key)
            return c if c is not None and c.reusable() else None
        idle = self._idle.get(key)
        if not idle:
            return None
        now = time.monotonic()
        while idle:
            c = idle.pop()
            if _fresh(c, now):
                return c
            c.close()  # stale: its close is counted back by on_close
        return None

    async def acquire(
        self,
        ep: Endpoint,
        client_ip: str,
        *,
        fresh: bool = False,
        on_close: Callable[[], None] | None = None,
    ) -> UpstreamConnection:
        """A connection for one request: an idle one unless `fresh`, else a new dial.
        `on_close` runs once when a newly dialled connection closes."""
        if not fresh and (c := self.take(ep, client_ip)) is not None:
            return c
        c = await self._dial(ep, client_ip)
        c.ep = ep
        c.client_ip = client_ip
        c.on_close = on_close
        if ep.h2:
            self._h2[(ep.key, client_ip)] = c
        return c

    async def dial(
        self, ep: Endpoint, client_ip: str = "0.0.0.0", *, h2: bool | None = None
    ) -> UpstreamConnection:
        """A new connection to `ep` that the pool neither shares nor keeps (active health
        probes): unlike acquire(fresh=True) it does not replace the endpoint's shared
        HTTP/2 connection. `h2` overrides the endpoint's protocol (gRPC probes need HTTP/2).
        The caller closes it."""
        if h2 is not None and h2 != ep.h2:
            ep = replace(ep, h2=h2)
        c = await self._dial(ep, client_ip)
        c.ep = ep
        return c

    def release_conn(self, c: UpstreamConnection) -> None:
        """The exchange on `c` is over: keep it for reuse, or close it."""
        ep = c.ep
        if ep is None or ep.h2:
            if c.retire:
                c.close()
            return
        if c.reusable():
            self._idle.setdefault((ep.key, c.client_ip), deque()).append(c)
        else:
            c.close()

    async def _dial(self, ep: Endpoint, client_ip: str) -> UpstreamConnection:
        try:
            conn = await self.tunnel_pool.get(
                (self.local_id(), ep.identity, ep.node_host, ep.node_port),
                self.client_ctx(),
                sni_for(ep.identity),
            )
            stream, response = conn.open(ep.key, [(FORWARDED, f"for={client_ip}")])
            resp = await asyncio.wait_for(response, self.connect_timeout)
        except (OSError, TimeoutError, ConnectionError) as e:
            raise UpstreamError("connect-failure", f"cannot reach {ep.key}: {e}") from e
        if resp.status != 200:
            conn.forget(stream)
            raise UpstreamError(
                "connect-failure", f"{ep.key}: its node answered {resp.status} to the tunnel"
            )
        proto = UpstreamConnection(h2=ep.h2)
        t = StreamTransport(proto, {"peername": (ep.ip, ep.port)})
        t.bind(stream)
        self.active[ep.key] = self.active.get(ep.key, 0) + 1
        return proto

    def close(self) -> None:
        for q in self._idle.values():
            for c in q:
                c.close()
        for c in self._h2.values():
            c.close()
