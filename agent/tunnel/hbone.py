"""An HBONE connection: the sans-IO HTTP/2 core on an asyncio TLS transport.

Client connections are pooled per (source identity, destination identity, destination
node) and carry many CONNECT streams; server connections are accepted on :15008. The
protocol object only moves events between `H2Connection` and the `Stream`s; what a new
inbound stream means (authorization, connecting the pod) is the tunnel's business, via
`on_request`.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable
from typing import cast

from agent.tunnel import h2 as hb
from agent.tunnel.streams import Stream
from controller.ca.spiffeid import peer_spiffe_id

log = logging.getLogger("weft.tunnel.hbone")


class HboneConnection(asyncio.Protocol):
    def __init__(
        self,
        *,
        client: bool,
        settings: hb.Settings,
        on_request: Callable[[HboneConnection, hb.StreamRequest], None] | None = None,
        on_lost: Callable[[HboneConnection], None] | None = None,
        label: str = "",
        coalesce: bool = False,
    ) -> None:
        self.h2 = hb.H2Connection(client=client, settings=settings)
        # coalesce: writes made outside data_received (by tasks: the waypoint's proxy) are
        # gathered and written once at the end of the loop turn, so a response's HEADERS,
        # DATA and END_STREAM, or a WINDOW_UPDATE and the next request, share one TLS record
        # and one write(2). The node tunnel leaves it off: its writes come from
        # data_received callbacks, which already end with one write.
        self.coalesce = coalesce
        self._flush_scheduled = False
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, Stream] = {}
        self.responses: dict[int, asyncio.Future[hb.StreamResponse]] = {}
        self.on_request = on_request
        self.on_lost = on_lost
        self.write_paused = False
        self.closed = False
        self.peer_id: str | None = None  # the peer's SPIFFE ID (from its certificate)
        self.local_id: str | None = None  # ours on this connection (SNI choice, server side)
        self.label = label
        self.last_active = time.monotonic()
        self.ready = asyncio.get_running_loop().create_future()
        self.streams_opened = 0

    # ---- asyncio.Protocol --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.peer_id = peer_spiffe_id(transport.get_extra_info("ssl_object"))
        self.h2.initiate()
        self.flush()
        if not self.ready.done():
            self.ready.set_result(None)

    def data_received(self, data: bytes) -> None:
        self.last_active = time.monotonic()
        try:
            events = self.h2.receive_data(data)
        except hb.ConnectionError as e:
            log.warning("HBONE connection %s with %s closed: %s", self.label, self.peer_id, e)
            self.flush()
            self.abort_all()
            return
        streams = self.streams
        for ev in events:
            if type(ev) is hb.Data:  # most events: handled here, without a call to _event
                s = streams.get(ev.stream_id)
                if s is not None:
                    s.on_data(ev.data, ev.flow_length)
                else:
                    self.h2.consumed(ev.stream_id, ev.flow_length)
            else:
                self._event(ev)
        self._write_out()

    def _event(self, ev: hb.Event) -> None:
        """Every event but Data (data_received handles those)."""
        s: Stream | None
        if isinstance(ev, hb.WindowOpened):
            if ev.stream_id == 0:
                for s in list(self.streams.values()):
                    s.on_window()
            else:
                s = self.streams.get(ev.stream_id)
                if s is not None:
                    s.on_window()
        elif isinstance(ev, hb.StreamEnded):
            s = self.streams.get(ev.stream_id)
            if s is not None:
                s.on_end()
        elif isinstance(ev, hb.StreamReset):
            fut = self.responses.pop(ev.stream_id, None)
            if fut is not None and not fut.done():
                fut.set_exception(
                    ConnectionResetError(
                        f"stream reset by {'peer' if ev.remote else 'us'} ({hb.Err(ev.code).name})"
                        if ev.code in hb.Err._value2member_map_
                        else f"stream reset ({ev.code})"
                    )
                )
            s = self.streams.get(ev.stream_id)
            if s is not None:
                s.on_reset()
        elif isinstance(ev, hb.StreamResponse):
            fut = self.responses.pop(ev.stream_id, None)
            if fut is not None and not fut.done():
                fut.set_result(ev)
        elif isinstance(ev, hb.StreamRequest):
            if self.on_request is None:
                self.h2.respond(ev.stream_id, 400)
            else:
                self.on_request(self, ev)
        elif isinstance(ev, hb.GoAway):
            log.info(
                "HBONE %s: peer %s sent GOAWAY (%s); no new streams on it",
                self.label,
                self.peer_id,
                ev.code,
            )
            for sid, fut in list(self.responses.items()):
                if sid > ev.last_stream_id and not fut.done():
                    fut.set_exception(ConnectionRefusedError("GOAWAY before the stream began"))
            self.maybe_close_idle()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.abort_all()
        if self.on_lost is not None:
            self.on_lost(self)

    def pause_writing(self) -> None:
        # The TLS connection's buffer is full: stop reading every pod feeding it.
        self.write_paused = True
        for s in self.streams.values():
            if s.pod is not None:
                s.pod.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        for s in self.streams.values():
            if s.pod is not None and not s.pending:
                s.pod.resume_reading()

    # ---- used by streams and the tunnel ------------------------------------------------

    def flush(self) -> None:
        if not self.coalesce:
            self._write_out()
        elif not self._flush_scheduled and self.h2.out:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._write_out)

    def _write_out(self) -> None:
        self._flush_scheduled = False
        out = self.h2.out
        if out and self.transport is not None and not self.closed:
            self.transport.write(bytes(out))
            out.clear()

    def open(
        self, authority: str, headers: list[tuple[str, str]]
    ) -> tuple[Stream, asyncio.Future[hb.StreamResponse]]:
        sid = self.h2.open_stream(authority, headers)
        self.streams_opened += 1
        stream = Stream(self, sid, None)
        self.streams[sid] = stream
        fut: asyncio.Future[hb.StreamResponse] = asyncio.get_running_loop().create_future()
        self.responses[sid] = fut
        self.flush()
        return stream, fut

    def accept_stream(self, sid: int) -> Stream:
        stream = Stream(self, sid, None)
        self.streams[sid] = stream
        return stream

    def respond(self, sid: int, status: int, headers: list[tuple[str, str]] | None = None) -> None:
        try:
            self.h2.respond(sid, status, headers)
        except hb.StreamGone:
            return
        if not 200 <= status < 300:
            self.streams.pop(sid, None)
        self.flush()

    def maybe_done(self, s: Stream) -> None:
        if s.sid not in self.h2.streams:
            self.forget(s)

    def forget(self, s: Stream) -> None:
        self.streams.pop(s.sid, None)
        self.last_active = time.monotonic()
        self.maybe_close_idle()

    def maybe_close_idle(self) -> None:
        if not self.streams and (self.h2.goaway_received or self.h2.goaway_sent):
            self.close()

    def can_open(self) -> bool:
        return not self.closed and self.h2.can_open()

    def goaway(self) -> None:
        self.h2.goaway()
        self._write_out()
        self.maybe_close_idle()

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self._write_out()  # what a coalescing connection still holds goes first
            self.transport.close()

    def abort_all(self) -> None:
        for fut in self.responses.values():
            if not fut.done():
                fut.set_exception(ConnectionResetError("HBONE connection lost"))
        self.responses.clear()
        for s in list(self.streams.values()):
            if s.pod is not None:
                s.pod.abort()
        self.streams.clear()
        if self.transport is not None and not self.closed:
            self.transport.abort()

    def open_streams(self) -> int:
        return len(self.streams)
