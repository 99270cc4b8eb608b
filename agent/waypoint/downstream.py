"""A caller's HTTP connection into the waypoint (carried by one HBONE stream).

The protocol is detected from the first bytes (h2c prior knowledge or HTTP/1.x); every
request becomes an `Exchange` handled by its own task, so a slow stream never blocks
another. Request bodies stream into the exchange through a bounded queue (reading pauses
when it is full); responses stream out as they arrive.

What the shell answers itself, before any handler runs:

- CONNECT (RFC 9110 section 9.3.6) gets 405: the waypoint forwards HTTP requests, not
  tunnels. On HTTP/1.1 the codec refuses it and the connection closes; on HTTP/2 only that
  stream is answered, the others carry on. Extended CONNECT (RFC 8441) is reset by the
  codec as malformed, since the waypoint does not advertise
  SETTINGS_ENABLE_CONNECT_PROTOCOL.
- `Expect: 100-continue` gets its 100 at once and is removed from the request, as Envoy
  does: the body is streamed anyway, so a client waiting for the 100 would only stall.

An HTTP/1.1 upgrade offer (h2c from `curl --http2`, WebSocket) is declined by the codec:
the request is served over HTTP/1.1 without its Upgrade fields.

On HTTP/2, a stream whose response is complete while its request is still arriving is
reset with NO_ERROR (RFC 9113 section 8.1): the client stops sending, and the bytes nobody
will read go back to the connection window.

Slowloris: a connection that has not sent a complete request head within
`head_timeout` gets 408 and is closed; an idle keep-alive connection is closed after
`idle_timeout`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from agent.waypoint.chanq import Channel
from agent.waypoint.codec import events as ev
from agent.waypoint.codec.config import Limits, Role
from agent.waypoint.codec.detect import detect_protocol
from agent.waypoint.codec.errors import ErrorCode, ProtocolError
from agent.waypoint.codec.headers import Headers
from agent.waypoint.codec.http1 import Http1Connection
from agent.waypoint.codec.http2 import Http2Connection
from agent.waypoint.deadline import LazyTimer
from agent.waypoint.engine.respond import Respond, plain
from agent.waypoint.errors import Style, render, style_of

log = logging.getLogger("weft.waypoint.downstream")

BODY_QUEUE = 16  # chunks buffered per request before reading pauses (backpressure)
NO_TUNNELS = b"CONNECT is not allowed: the waypoint forwards HTTP requests, not tunnels\n"


@dataclass(frozen=True)
class CallerInfo:
    """Who is calling and what they dialled, from the HBONE layer."""

    principal: str | None  # SPIFFE ID from the client's certificate
    client_ip: str
    service_ns: str
    service: str
    vip: str
    port: int


@dataclass(eq=False)
class Exchange:
    """One request/response through the waypoint.

    The fields after `annotations` are class attributes until a request changes them
    (`init=False`): the generated __init__ assigns seven fields per request, not
    twenty-two (and there are no __slots__, which would rule the class attributes out)."""

    conn: Downstream
    sid: int
    head: ev.RequestHead
    caller: CallerInfo
    started: float = field(default_factory=time.monotonic)
    # Unbounded on purpose: the connection pauses reading once BODY_QUEUE chunks wait, and a
    # put must never fail for the few chunks already in flight.
    body: Channel[bytes | None] = field(default_factory=Channel)
    annotations: dict[str, Any] = field(default_factory=dict)

    body_done: bool = field(default=False, init=False)
    trailers: Headers | None = field(default=None, init=False)
    reset: bool = field(default=False, init=False)
    responded: bool = field(default=False, init=False)
    response_done: bool = field(default=False, init=False)
    status: int = field(default=0, init=False)
    bytes_in: int = field(default=0, init=False)
    bytes_out: int = field(default=0, init=False)
    first_byte_at: float | None = field(default=None, init=False)
    # Set by the handler: whether the Service has AI policies, for `style`; None: unknown
    # (the mesh's answers are plain text).
    ai_service: bool | None = field(default=None, init=False)
    _style: Style | None = field(default=None, init=False)  # `style` once worked out or set
    # HTTP/2: the handler waits here for the caller's window on this stream to reopen.
    _window_waiter: asyncio.Future[None] | None = field(default=None, init=False)
    # cancels the upstream try (caller_gone)
    on_reset: Callable[[], None] | None = field(default=None, init=False)
    span: Any = field(default=None, init=False)  # the SERVER span (agent/waypoint/tracing.py)
    trace: Any = field(default=None, init=False)  # the request's TraceContext

    @property
    def style(self) -> Style:
        """How the mesh's own answers are written (errors.py): what style_of says for the
        request's headers once the handler set `ai_service`, else TEXT. Worked out when an
        answer first needs it (rarely: most come from the backend), not per request."""
        s = self._style
        if s is None:
            ai = self.ai_service
            s = self._style = Style.TEXT if ai is None else style_of(self.head.headers, ai)
        return s

    @style.setter
    def style(self, style: Style) -> None:
        self._style = style

    # ---- response side -----------------------------------------------------------------

    def respond_head(self, status: int, headers: Headers, end: bool = False) -> None:
        if self.reset or self.responded:
            return
        self.responded = True
        self.status = status
        codec = self.conn.codec
        if self.conn.draining and isinstance(codec, Http1Connection):
            # The process is draining: this response says "Connection: close", so the
            # caller sends its next request on a new connection (to a successor), instead
            # of on one that is closed under it.
            codec.close()
        self.conn.write(codec.send_response_head(self.sid, status, headers, end))
        if end:
            self._done()

    def respond_data(self, data: bytes, end: bool = False) -> None:
        if self.reset or self.response_done:
            return
        if self.first_byte_at is None and data:
            self.first_byte_at = time.monotonic()
        self.bytes_out += len(data)
        self.conn.write(self.conn.codec.send_data(self.sid, data, end))
        if end:
            self._done()

    def respond_trailers(self, headers: Headers) -> None:
        if self.reset or self.response_done:
            return
        self.conn.write(self.conn.codec.send_trailers(self.sid, headers))
        self._done()

    def local_reply(self, status: int, body: bytes = b"", headers: Headers | None = None) -> None:
        h = headers or Headers()
        if body:
            h.set(b"content-type", h.get(b"content-type") or b"text/plain")
        h.set(b"content-length", str(len(body)).encode())
        self.respond_head(status, h, end=not body)
        if body:
            self.respond_data(body, end=True)

    def reply(self, resp: Respond) -> None:
        """Answer with a response the mesh makes itself, in the caller's protocol."""
        status, h, body = render(self.style, resp)
        self.respond_head(status, h, end=not body)
        if body:
            self.respond_data(body, end=True)

    def caller_gone(self) -> None:
        """The caller reset the stream or closed the connection: whatever is in flight
        upstream for this exchange is cancelled now (`on_reset`), not when the backend
        next speaks."""
        self.reset = True
        self.window_opened()  # a handler waiting to write sees the reset
        cb, self.on_reset = self.on_reset, None
        if cb is not None:
            cb()

    def window_closed(self) -> bool:
        """HTTP/2: the caller's flow-control window on this stream is used up (what is
        written now would be queued in the waypoint): the handler waits in `writable()`
        before writing more, so a caller that reads slowly slows the backend down instead
        of growing the waypoint's memory. HTTP/1.1 has only the transport's own pause."""
        conn = self.conn
        return conn._h2 and not self.reset and conn.codec.send_window(self.sid) <= 0

    def window_opened(self) -> None:
        w, self._window_waiter = self._window_waiter, None
        if w is not None and not w.done():
            w.set_result(None)

    def abort(self) -> None:
        if not self.response_done:
            self.conn.write(self.conn.codec.reset_stream(self.sid))
            self.reset = True
            self._done()

    def _done(self) -> None:
        self.response_done = True
        self.conn.finished(self)

    async def writable(self) -> None:
        """Until the caller can take more: its connection's transport is writing again and
        (HTTP/2) this stream's window is open; at once if the caller is gone."""
        conn = self.conn
        while not self.reset and not conn.closed:
            if conn.write_paused:
                await conn.write_ready.wait()
            elif self.window_closed():
                conn.codec.wait_for_window(self.sid)
                w = self._window_waiter = conn._loop.create_future()
                await w
            else:
                return


Handler = Callable[[Exchange], Coroutine[Any, Any, None]]  # run as a task per request


class Downstream(asyncio.Protocol):
    def __init__(
        self,
        caller: CallerInfo,
        handle: Handler,
        *,
        limits: Limits | None = None,
        head_timeout: float = 10.0,
        idle_timeout: float = 60.0,
    ) -> None:
        self.caller = caller
        self.handle = handle
        self.limits = limits or Limits()
        self.codec: Any = None
        self.transport: Any = None
        self.exchanges: dict[int, Exchange] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self.write_ready = asyncio.Event()
        self.write_ready.set()
        self.write_paused = False  # write_ready's opposite, read without a call
        self._first = b""
        self._h2 = False
        self._reading_paused = False  # paused for a request body's full queue
        self.head_timeout = head_timeout
        self.idle_timeout = idle_timeout
        # The connection's one timer, for its head or idle timeout (deadline.py): a
        # keep-alive connection moves its idle deadline on every request.
        self._timer: LazyTimer | None = None
        self._on_due: Callable[[], None] | None = None  # which timeout is running
        self.closed = False
        self.draining = False
        self._out: list[bytes] | None = None  # written this loop turn, not yet flushed
        # HTTP/2 streams answered in full while the caller still sends: reset (NO_ERROR)
        # once the rest of their answer has gone out (finished).
        self._reset_when_sent: set[int] = set()
        self._loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self._loop = asyncio.get_running_loop()
        self._timer = LazyTimer(self._timed_out, self._loop)
        self._arm(self.head_timeout, self._head_timed_out)

    def _arm(self, delay: float, fn: Callable[[], None]) -> None:
        """Run `fn` after `delay` s unless re-armed or disarmed first."""
        if self._timer is not None:
            self._on_due = fn
            self._timer.arm(self._loop.time() + delay)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.arm(None)

    def _timed_out(self) -> None:
        if self._on_due is not None and not self.closed:
            self._on_due()

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.close()

    def _head_timed_out(self) -> None:
        if isinstance(self.codec, Http1Connection) or self.codec is None:
            codec = self.codec or Http1Connection(Role.SERVER, self.limits)
            with contextlib.suppress(Exception):
                self.write(
                    codec.error_response(
                        ProtocolError(
                            f"no complete request head within {self.head_timeout:.0f} s", status=408
                        )
                    )
                )
        self.close()

    def _idle_timed_out(self) -> None:
        if not self.exchanges:
            if self._h2:
                with contextlib.suppress(Exception):
                    self.write(self.codec.close())  # GOAWAY(NO_ERROR): nothing was lost
            self.close()

    def write(self, data: bytes) -> None:
        """Queue bytes for the caller; they go out in one write at the end of this loop
        turn, so a response head and its body (or several streams' frames) share a
        system call and a TCP segment instead of one each."""
        if data and self.transport is not None and not self.closed:
            out = self._out
            if out is None:
                self._out = [data]
                self._loop.call_soon(self._flush)
            else:
                out.append(data)

    def _flush(self) -> None:
        out, self._out = self._out, None
        if out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))

    def drain(self) -> None:
        """The process is going away: HTTP/1.1 answers each request from now on with
        Connection: close and then closes (an idle keep-alive connection stays open for its
        next request rather than being closed as a request may be on its way); HTTP/2
        sends GOAWAY and finishes its open streams."""
        self.draining = True
        if self.codec is not None and not isinstance(self.codec, Http1Connection):
            self.write(self.codec.close())
            if self.codec.should_close and not self.exchanges:
                self.close()

    def close(self) -> None:
        if not self.closed and self.transport is not None:
            self._flush()
            self.closed = True
            self._stop_timer()
            # Paused for a body no one reads now: what the caller still sends is read and
            # dropped, or an HBONE stream withholds its credit for good.
            self._resume_reading()
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self.codec is None:
            self._first += data
            proto = detect_protocol(self._first)
            if proto is None:
                return
            self._h2 = proto == "h2"
            self.codec = (
                Http2Connection(Role.SERVER, self.limits)
                if self._h2
                else Http1Connection(Role.SERVER, self.limits)
            )
            data, self._first = self._first, b""
        try:
            events = self.codec.receive_data(data)
        except ProtocolError as e:
            self._protocol_error(e)
            return
        if self._h2:  # HTTP/1.1 never writes as a side effect of reading
            self.write(self.codec.data_to_send())
            if self._reset_when_sent:
                self._reset_sent_streams()
        self._dispatch(events)

    def _reset_sent_streams(self) -> None:
        codec = self.codec
        for sid in [s for s in self._reset_when_sent if not codec.queued(s)]:
            self._reset_when_sent.discard(sid)
            self.write(codec.reset_stream(sid, ErrorCode.NO_ERROR))

    def _protocol_error(self, e: ProtocolError) -> None:
        log.info("caller %s broke HTTP: %s", self.caller.principal, e)
        if isinstance(self.codec, Http1Connection) and e.status:
            with contextlib.suppress(Exception):
                self.write(self.codec.error_response(e))
        else:
            self.write(self.codec.data_to_send())
        for x in list(self.exchanges.values()):
            x.caller_gone()
        self.close()

    def _dispatch(self, events: list[ev.Event]) -> None:
        for e in events:
            if isinstance(e, ev.RequestHead):
                self._disarm()
                x = Exchange(self, e.stream_id, e, self.caller)
                self.exchanges[e.stream_id] = x
                if e.end_stream:
                    x.body_done = True
                    x.body.put_nowait(None)
                if e.method == "CONNECT":
                    self._refuse_tunnel(x)
                    continue
                if not e.end_stream:
                    expect = e.headers.get(b"expect")
                    if expect is not None:
                        self._continue(x, expect)
                t = self._loop.create_task(self.handle(x))
                self.tasks.add(t)
                t.add_done_callback(partial(self._handled, x))
            elif isinstance(e, ev.Data):
                x2 = self.exchanges.get(e.stream_id)
                if x2 is None:
                    # answered already (or refused): drop the bytes, but give them back to
                    # the HTTP/2 connection window, or the connection would starve.
                    self.write(self.codec.consumed(e.stream_id, len(e.data)))
                    continue
                x2.bytes_in += len(e.data)
                body = x2.body
                # put_nowait says how many chunks wait: qsize() only when nothing is put.
                queued = body.put_nowait(bytes(e.data)) if e.data else body.qsize()
                if e.end_stream:
                    x2.body_done = True
                    queued = body.put_nowait(None)
                if queued >= BODY_QUEUE - 1 and self.transport is not None:
                    self._reading_paused = True  # until consumed() drains the queue
                    self.transport.pause_reading()
            elif isinstance(e, ev.Trailers):
                x3 = self.exchanges.get(e.stream_id)
                if x3 is not None:
                    x3.trailers = e.headers
                    x3.body_done = True
                    x3.body.put_nowait(None)
            elif type(e) is ev.WindowUpdated:
                x6 = self.exchanges.get(e.stream_id)
                if x6 is not None:
                    x6.window_opened()
            elif isinstance(e, ev.StreamReset):
                x4 = self.exchanges.pop(e.stream_id, None)
                if x4 is not None:
                    x4.caller_gone()
                    x4.body.put_nowait(None)
            elif isinstance(e, ev.ConnectionClosed):
                for x5 in self.exchanges.values():
                    if not x5.body_done:
                        x5.caller_gone()
                        x5.body.put_nowait(None)

    def _continue(self, x: Exchange, expect: bytes) -> None:
        """A request with a body came with an `Expect` field: if it is `100-continue`,
        answer at once and drop it from the request (RFC 9110 section 10.1.1 lets an
        intermediary do so): the body is streamed to the backend as it comes, so nothing is
        gained by waiting for the backend's 100, and a client would stall (curl for 1 s,
        others until their timeout)."""
        if expect.strip().lower() != b"100-continue":
            return
        x.head.headers.remove(b"expect")
        self.write(self.codec.send_response_head(x.sid, 100, Headers()))

    def _refuse_tunnel(self, x: Exchange) -> None:
        """CONNECT over HTTP/2 (over HTTP/1.1 the codec refuses it): 405 on its stream only
        (`finished` then resets it with NO_ERROR if the client is still sending). The
        handler never sees it."""
        log.info("caller %s sent CONNECT %s: refused with 405", x.caller.principal, x.head.target)
        x.local_reply(405, NO_TUNNELS)

    def _handled(self, x: Exchange, t: asyncio.Task[None]) -> None:
        """The handler's task for `x` ended: if the handler failed, the request is answered
        with 500 (or reset, past its response head). A done callback rather than a coroutine
        awaiting the handler, which cost two Python calls per request (its start and its
        resumption) where this costs one."""
        self.tasks.discard(t)
        if t.cancelled():
            return
        if self._h2 and not self.exchanges and not self.closed:
            # Its stream was reset (finished() was not reached): the connection idles now.
            self._arm(self.idle_timeout, self._idle_timed_out)
        e = t.exception()
        if isinstance(e, Exception):
            log.error("waypoint handler failed for %s %s", x.head.method, x.head.target, exc_info=e)
            if not x.responded:
                x.reply(plain(500, "InternalError", "internal error in the waypoint"))
            else:
                x.abort()

    def consumed(self, x: Exchange, n: int) -> None:
        """The handler passed n request-body bytes on: credit HTTP/2, resume reading."""
        if self._h2:
            self.write(self.codec.consumed(x.sid, n))
        if self._reading_paused and x.body.qsize() < BODY_QUEUE // 2:
            self._resume_reading()

    def _resume_reading(self) -> None:
        """Read the caller again, if a request body's full queue had stopped it."""
        if self._reading_paused and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()

    def finished(self, x: Exchange) -> None:
        self.exchanges.pop(x.sid, None)
        if isinstance(self.codec, Http1Connection):
            # The answer is complete: it goes out now (its head and body in one write, as
            # write() queued them this turn), not after what the handler still does for
            # it (the access log, metrics, releasing the backend connection). HTTP/2 keeps
            # the end-of-turn write, which carries the frames of every stream that
            # answered in the turn.
            self._flush()
            if self.codec.should_close:
                self.close()
                return
            try:
                more = self.codec.next_events()
            except ProtocolError as e:  # the next pipelined request was malformed
                self._protocol_error(e)
                return
            if more:
                self._dispatch(more)
            elif not self.exchanges:
                if self.codec.reading_head:  # part of the next head came already
                    self._arm(self.head_timeout, self._head_timed_out)
                else:
                    self._arm(self.idle_timeout, self._idle_timed_out)
        else:
            if not x.body_done and not x.reset:
                # The response is complete and the rest of the request is of no use: ask
                # the client to stop sending, without an error (RFC 9113 section 8.1; Go
                # and grpc-go do the same). This also gives the stream's unread bytes back
                # to the connection window, which would otherwise shrink for good. Only
                # once all of the response has gone: NO_ERROR before its end would cut it
                # (the reset drops what waits for the caller's window).
                if self.codec.queued(x.sid):
                    self._reset_when_sent.add(x.sid)
                else:
                    self.write(self.codec.reset_stream(x.sid, ErrorCode.NO_ERROR))
            # Perhaps paused for this stream's body, which no one reads now: read on (a
            # stream whose queue is still full pauses the connection again).
            self._resume_reading()
            if self.codec.should_close and not self.exchanges:
                self.close()
            elif not self.exchanges:
                # No stream open: the idle timeout runs until the next one (as HTTP/1.1's
                # between requests); a new stream disarms it (_dispatch).
                self._arm(self.idle_timeout, self._idle_timed_out)

    def eof_received(self) -> bool:
        if self.codec is not None:
            with contextlib.suppress(ProtocolError):
                self._dispatch(self.codec.receive_data(b""))
        if not self.exchanges:
            self.close()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._stop_timer()
        for x in list(self.exchanges.values()):
            x.caller_gone()
            x.body.put_nowait(None)
        for t in self.tasks:
            t.cancel()

    def pause_writing(self) -> None:
        self.write_paused = True
        self.write_ready.clear()

    def resume_writing(self) -> None:
        self.write_paused = False
        self.write_ready.set()
