"""A lean, sans-IO HTTP/2 connection for HBONE (RFC 9113 §8.5 CONNECT tunnels).

HBONE uses a small part of HTTP/2: the preface and SETTINGS, one HEADERS exchange per
stream (CONNECT and its status), DATA both ways with flow control, RST_STREAM, PING and
GOAWAY. This module implements exactly that part, because it sits on every byte the mesh
carries: a general HTTP/2 library costs tens of microseconds per DATA frame in Python,
this costs a few. HPACK comes from the `hpack` package (the one `h2` uses).

Bytes go in through `receive_data`, which returns events; everything to send accumulates
in an outbound buffer read with `data_to_send`. No sockets, no clocks, no asyncio.

What is refused, and how (RFC 9113 §5.4): a connection-level violation raises
`ConnectionError`, after queueing GOAWAY with the error code; a stream-level one resets
only that stream (RST_STREAM) and reports `StreamReset(remote=False)`.
"""

from __future__ import annotations

import struct
from collections import deque
from dataclasses import dataclass, field
from enum import IntEnum

from hpack import Decoder, Encoder
from hpack.exceptions import HPACKError

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_HDR = struct.Struct(">HBBBL")  # 24-bit length as (16 high bits, 8 low bits), type, flags, id
_U32 = struct.Struct(">L")
_SETTING = struct.Struct(">HL")
MAX_WINDOW = 2**31 - 1


class Frame(IntEnum):
    DATA = 0
    HEADERS = 1
    PRIORITY = 2
    RST_STREAM = 3
    SETTINGS = 4
    PUSH_PROMISE = 5
    PING = 6
    GOAWAY = 7
    WINDOW_UPDATE = 8
    CONTINUATION = 9


class Err(IntEnum):
    """HTTP/2 error codes (RFC 9113 section 7); the waypoint codec's ErrorCode too."""

    NO_ERROR = 0x0
    PROTOCOL_ERROR = 0x1
    INTERNAL_ERROR = 0x2
    FLOW_CONTROL_ERROR = 0x3
    SETTINGS_TIMEOUT = 0x4
    STREAM_CLOSED = 0x5
    FRAME_SIZE_ERROR = 0x6
    REFUSED_STREAM = 0x7
    CANCEL = 0x8
    COMPRESSION_ERROR = 0x9
    CONNECT_ERROR = 0xA
    ENHANCE_YOUR_CALM = 0xB
    INADEQUATE_SECURITY = 0xC
    HTTP_1_1_REQUIRED = 0xD


END_STREAM = 0x1
ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
PRIORITY_FLAG = 0x20

S_HEADER_TABLE_SIZE = 0x1
S_ENABLE_PUSH = 0x2
S_MAX_CONCURRENT_STREAMS = 0x3
S_INITIAL_WINDOW_SIZE = 0x4
S_MAX_FRAME_SIZE = 0x5
S_MAX_HEADER_LIST_SIZE = 0x6


@dataclass(frozen=True)
class Settings:
    """What we announce. Each default is chosen for a node tunnel, and says why."""

    # Streams one peer may open on one connection. ztunnel's pool targets 100 streams per
    # connection; above that a second connection spreads load over more TLS sessions.
    max_concurrent_streams: int = 100
    # Per-stream receive window: bytes a sender may have in flight before we drain them
    # into the pod. 1 MiB keeps a single stream near line rate on a LAN while bounding
    # what a slow pod can make us buffer.
    initial_window: int = 1 << 20
    # Connection-wide receive window (all streams together): bounds memory per tunnel
    # connection at 16 MiB.
    connection_window: int = 16 << 20
    # Largest DATA frame we accept. 1 MiB means one read of a pod socket becomes one frame,
    # so per-frame Python work is paid per read, not per 16 KiB.
    max_frame_size: int = 1 << 20
    # HBONE header blocks are tiny (CONNECT, authority, a few identity headers); 16 KiB
    # leaves room and caps what a peer can make us decompress. Also the cap across
    # CONTINUATION frames (the 2024 CONTINUATION-flood CVEs).
    max_header_list_size: int = 16 << 10
    # RST_STREAMs a peer may send per `reset_budget_window` frames before we treat it as a
    # rapid-reset attack (CVE-2023-44487) and GOAWAY with ENHANCE_YOUR_CALM.
    max_resets_per_window: int = 200
    reset_budget_window: int = 1000


# ---- events ---------------------------------------------------------------------------


@dataclass(slots=True)
class StreamRequest:
    """The peer opened a stream (server side): a CONNECT to `authority`."""

    stream_id: int
    method: str
    authority: str
    headers: list[tuple[str, str]]


@dataclass(slots=True)
class StreamResponse:
    """The peer answered our CONNECT (client side)."""

    stream_id: int
    status: int
    headers: list[tuple[str, str]]
    end_stream: bool


@dataclass(slots=True)
class Data:
    stream_id: int
    data: bytes
    flow_length: int  # what this frame cost against flow control (incl. padding)


@dataclass(slots=True)
class StreamEnded:
    """The peer half-closed: no more data from it on this stream (TCP FIN)."""

    stream_id: int


@dataclass(slots=True)
class StreamReset:
    stream_id: int
    code: int
    remote: bool


@dataclass(slots=True)
class WindowOpened:
    """Flow-control credit arrived; stream 0 means the connection window."""

    stream_id: int


@dataclass(slots=True)
class Ping:
    payload: bytes
    ack: bool


@dataclass(slots=True)
class GoAway:
    last_stream_id: int
    code: int
    debug: bytes


@dataclass(slots=True)
class SettingsAcked:
    pass


Event = (
    StreamRequest
    | StreamResponse
    | Data
    | StreamEnded
    | StreamReset
    | WindowOpened
    | Ping
    | GoAway
    | SettingsAcked
)


class ConnectionError(Exception):
    """A connection-level protocol violation; GOAWAY has been queued."""

    def __init__(self, code: Err, message: str, *, remote: bool = True) -> None:
        super().__init__(f"{'peer' if remote else 'local'} HTTP/2 {code.name}: {message}")
        self.code = code
        self.remote = remote


class StreamGone(Exception):
    """Local misuse: sending on a stream that is closed or unknown."""


@dataclass(slots=True)
class _Stream:
    id: int
    send_window: int
    recv_window: int
    local_closed: bool = False
    remote_closed: bool = False
    headers_done: bool = False
    unacked: int = 0  # bytes the application consumed that we have not credited yet


@dataclass
class _Pending:
    stream_id: int
    end_stream: bool
    block: bytearray = field(default_factory=bytearray)


class H2Connection:
    def __init__(self, *, client: bool, settings: Settings | None = None) -> None:
        self.client = client
        self.local = settings or Settings()
        self.out = bytearray()
        self.streams: dict[int, _Stream] = {}
        self._next_id = 1 if client else 2
        self._last_peer_id = 0
        self._buf = bytearray()
        self._preface_pending = not client  # a server first reads the client's magic
        self._encoder = Encoder()
        self._decoder = Decoder(max_header_list_size=self.local.max_header_list_size)
        self._decoder.max_allowed_table_size = 4096
        self._continuation: _Pending | None = None
        # Peer's settings, as RFC 9113 defaults until its SETTINGS arrive.
        self.peer_max_streams = 100
        self.peer_initial_window = 65535
        self.peer_max_frame = 16384
        self.send_window = 65535  # connection-level, what the peer lets us send
        self.recv_window = 65535  # connection-level, what we let the peer send
        self._conn_unacked = 0
        # consumed() returns credit once a quarter of a window was used: the thresholds,
        # worked out once (consumed runs on every DATA frame).
        self._conn_credit_batch = self.local.connection_window // 4
        self._stream_credit_batch = self.local.initial_window // 4
        self.goaway_received: GoAway | None = None
        self.goaway_sent = False
        self.closed = False
        self._resets: deque[int] = deque()
        self._frames_seen = 0

    # ---- setup ---------------------------------------------------------------------

    def initiate(self) -> None:
        """Queue the connection preface (client) and our SETTINGS, and open the window."""
        if self.client:
            self.out += PREFACE
        s = self.local
        payload = b"".join(
            _SETTING.pack(k, v)
            for k, v in (
                (S_ENABLE_PUSH, 0),
                (S_MAX_CONCURRENT_STREAMS, s.max_concurrent_streams),
                (S_INITIAL_WINDOW_SIZE, s.initial_window),
                (S_MAX_FRAME_SIZE, s.max_frame_size),
                (S_MAX_HEADER_LIST_SIZE, s.max_header_list_size),
            )
        )
        self._frame(Frame.SETTINGS, 0, 0, payload)
        grow = s.connection_window - self.recv_window
        if grow > 0:
            self.recv_window += grow
            self._frame(Frame.WINDOW_UPDATE, 0, 0, _U32.pack(grow))

    def data_to_send(self) -> bytes:
        if not self.out:
            return b""
        data = bytes(self.out)
        self.out.clear()
        return data

    def _frame(
        self, ftype: int, flags: int, stream_id: int, payload: bytes | bytearray | memoryview = b""
    ) -> None:
        n = len(payload)
        self.out += _HDR.pack(n >> 8, n & 0xFF, ftype, flags, stream_id)
        self.out += payload

    # ---- opening and answering streams ---------------------------------------------

    def can_open(self) -> bool:
        open_local = sum(1 for s in self.streams.values() if (s.id & 1) == (self._next_id & 1))
        return (
            not self.closed
            and self.goaway_received is None
            and not self.goaway_sent
            and open_local < self.peer_max_streams
            and self._next_id < MAX_WINDOW
        )

    def open_stream(self, authority: str, headers: list[tuple[str, str]] | None = None) -> int:
        """Client: send a CONNECT for `authority` (ip:port); returns the stream id."""
        if not self.can_open():
            raise StreamGone("connection cannot open more streams (limit, GOAWAY or closed)")
        sid = self._next_id
        self._next_id += 2
        block = self._encoder.encode(
            [(":method", "CONNECT"), (":authority", authority), *(headers or [])]
        )
        self.streams[sid] = _Stream(sid, self.peer_initial_window, self.local.initial_window)
        self._headers(sid, block, end_stream=False)
        return sid

    def respond(
        self, stream_id: int, status: int, headers: list[tuple[str, str]] | None = None
    ) -> None:
        """Server: answer a CONNECT. A non-2xx status also closes the stream."""
        s = self.streams.get(stream_id)
        if s is None:
            raise StreamGone(f"stream {stream_id} is not open")
        block = self._encoder.encode([(":status", str(status)), *(headers or [])])
        end = not 200 <= status < 300
        self._headers(stream_id, block, end_stream=end)
        if end:
            # A refused CONNECT is over for both sides; whatever the client still sends
            # is answered with RST_STREAM(STREAM_CLOSED) by the DATA path.
            s.local_closed = s.remote_closed = True
            self._maybe_forget(s)

    def _headers(self, sid: int, block: bytes, *, end_stream: bool) -> None:
        maxf = self.peer_max_frame
        flags = END_STREAM if end_stream else 0
        if len(block) <= maxf:
            self._frame(Frame.HEADERS, flags | END_HEADERS, sid, block)
            return
        self._frame(Frame.HEADERS, flags, sid, block[:maxf])
        rest = block[maxf:]
        while rest:
            chunk, rest = rest[:maxf], rest[maxf:]
            self._frame(Frame.CONTINUATION, 0 if rest else END_HEADERS, sid, chunk)

    # ---- data ------------------------------------------------------------------------

    def send_capacity(self, stream_id: int) -> int:
        s = self.streams.get(stream_id)
        if s is None or s.local_closed:
            return 0
        return max(0, min(s.send_window, self.send_window))

    def send_data(
        self, stream_id: int, data: bytes | bytearray | memoryview, *, end_stream: bool = False
    ) -> int:
        """Queue as much of `data` as flow control allows; returns how much was taken.

        The caller keeps the rest and retries after a WindowOpened event. `end_stream` is
        only honoured when everything was taken.
        """
        s = self.streams.get(stream_id)
        if s is None or s.local_closed:
            raise StreamGone(f"stream {stream_id} is closed for sending")
        size = len(data)
        n = min(size, s.send_window, self.send_window)
        if n > 0:
            s.send_window -= n
            self.send_window -= n
            # Frames of the peer's maximum size while more than that remains, then the
            # rest, with END_STREAM if it ends `data`.
            pos = 0
            while n - pos > self.peer_max_frame:
                end = pos + self.peer_max_frame
                self._frame(Frame.DATA, 0, stream_id, data[pos:end])
                pos = end
            last = END_STREAM if end_stream and n == size else 0
            self._frame(Frame.DATA, last, stream_id, data[pos:n])
        else:
            # No window; it can be below zero (the peer lowered SETTINGS_INITIAL_WINDOW_SIZE
            # with data in flight, RFC 9113 §6.9.2): nothing is sent and nothing charged.
            n = 0
            if end_stream and not size:
                self._frame(Frame.DATA, END_STREAM, stream_id)  # END_STREAM needs no window
        if end_stream and n == size:
            s.local_closed = True
            self._maybe_forget(s)
        return n

    def end_stream(self, stream_id: int) -> None:
        """Half-close our side (TCP FIN from the local socket)."""
        self.send_data(stream_id, b"", end_stream=True)

    def consumed(self, stream_id: int, n: int) -> None:
        """The application has taken `n` received bytes: return flow-control credit.

        Credit is batched: a WINDOW_UPDATE goes out once a quarter of the window was used,
        which keeps the sender streaming without a frame per DATA frame.
        """
        if n <= 0:
            return
        unacked = self._conn_unacked + n
        if unacked >= self._conn_credit_batch:
            self.recv_window += unacked
            self._frame(Frame.WINDOW_UPDATE, 0, 0, _U32.pack(unacked))
            unacked = 0
        self._conn_unacked = unacked
        s = self.streams.get(stream_id)
        if s is None or s.remote_closed:
            return
        unacked = s.unacked + n
        if unacked >= self._stream_credit_batch:
            s.recv_window += unacked
            self._frame(Frame.WINDOW_UPDATE, 0, stream_id, _U32.pack(unacked))
            unacked = 0
        s.unacked = unacked

    def reset(self, stream_id: int, code: Err = Err.CANCEL) -> None:
        s = self.streams.pop(stream_id, None)
        if s is not None:
            self._frame(Frame.RST_STREAM, 0, stream_id, _U32.pack(code))

    def ping(self, payload: bytes = b"\0" * 8) -> None:
        self._frame(Frame.PING, 0, 0, payload[:8].ljust(8, b"\0"))

    def goaway(self, code: Err = Err.NO_ERROR, debug: bytes = b"") -> None:
        """Stop accepting new streams from the peer; the ones it opened so far may finish."""
        if not self.goaway_sent:
            self.goaway_sent = True
            self._frame(Frame.GOAWAY, 0, 0, _U32.pack(self._last_peer_id) + _U32.pack(code) + debug)

    def _maybe_forget(self, s: _Stream) -> None:
        if s.local_closed and s.remote_closed:
            self.streams.pop(s.id, None)

    # ---- receiving -------------------------------------------------------------------

    def receive_data(self, data: bytes) -> list[Event]:
        if self.closed:
            return []
        events: list[Event] = []
        buf = self._buf
        pos = 0
        src: bytes | memoryview
        if buf or self._preface_pending:
            # Bytes are left from an earlier read (a partial frame), or the preface is yet
            # to come: the frames are read out of _buf.
            buf += data
            if self._preface_pending:
                if len(buf) < len(PREFACE):
                    if not PREFACE.startswith(bytes(buf)):
                        self._fail(Err.PROTOCOL_ERROR, "connection preface missing (not HTTP/2?)")
                    return events
                if bytes(buf[: len(PREFACE)]) != PREFACE:
                    self._fail(Err.PROTOCOL_ERROR, "connection preface missing (not HTTP/2?)")
                pos = len(PREFACE)
                self._preface_pending = False
            src = memoryview(buf)  # each payload is copied out of it once
        else:
            # The usual read: nothing buffered, so the frames start at data[0]. They are
            # read out of `data` itself rather than after copying it into _buf (speed);
            # the loop below is the same, and `finally` buffers only what is left over.
            src = data
        maxf = self.local.max_frame_size
        n = len(src)
        try:
            while n - pos >= 9:
                hi, lo, ftype, flags, sid = _HDR.unpack_from(src, pos)
                length = (hi << 8) | lo
                sid &= 0x7FFFFFFF
                if length > maxf:
                    self._fail(
                        Err.FRAME_SIZE_ERROR,
                        f"frame of {length} bytes exceeds our SETTINGS_MAX_FRAME_SIZE of {maxf}",
                    )
                end = pos + 9 + length
                if end > n:
                    break
                # A copy out of the memoryview; out of bytes, the slice is already a copy
                # and bytes() returns it as it is.
                payload = bytes(src[pos + 9 : end])
                pos = end
                self._frames_seen += 1
                self._dispatch(ftype, flags, sid, payload, events)
        finally:
            if src is data:
                if pos < n:
                    buf += data[pos:]  # a partial frame: the next read completes it
            else:
                src.release()  # type: ignore[union-attr]
                del buf[:pos]
        return events

    def _fail(self, code: Err, message: str) -> None:
        self.goaway(code, message.encode()[:256])
        self.closed = True
        raise ConnectionError(code, message)

    def _dispatch(
        self, ftype: int, flags: int, sid: int, payload: bytes, events: list[Event]
    ) -> None:
        if self._continuation is not None and ftype != Frame.CONTINUATION:
            self._fail(Err.PROTOCOL_ERROR, "expected CONTINUATION after HEADERS")
        if ftype == Frame.DATA:
            self._on_data(flags, sid, payload, events)
        elif ftype == Frame.HEADERS:
            self._on_headers(flags, sid, payload, events)
        elif ftype == Frame.CONTINUATION:
            self._on_continuation(flags, sid, payload, events)
        elif ftype == Frame.WINDOW_UPDATE:
            self._on_window_update(sid, payload, events)
        elif ftype == Frame.SETTINGS:
            self._on_settings(flags, sid, payload, events)
        elif ftype == Frame.RST_STREAM:
            self._on_rst(sid, payload, events)
        elif ftype == Frame.PING:
            if sid != 0 or len(payload) != 8:
                self._fail(Err.PROTOCOL_ERROR if sid else Err.FRAME_SIZE_ERROR, "bad PING")
            if not flags & ACK:
                self._frame(Frame.PING, ACK, 0, payload)
            events.append(Ping(payload, bool(flags & ACK)))
        elif ftype == Frame.GOAWAY:
            if sid != 0 or len(payload) < 8:
                self._fail(Err.PROTOCOL_ERROR, "bad GOAWAY")
            last = _U32.unpack_from(payload)[0] & 0x7FFFFFFF
            code = _U32.unpack_from(payload, 4)[0]
            ev = GoAway(last, code, payload[8:])
            self.goaway_received = ev
            events.append(ev)
        elif ftype == Frame.PRIORITY:
            if sid == 0 or len(payload) != 5:
                self._fail(Err.PROTOCOL_ERROR, "bad PRIORITY")
        elif ftype == Frame.PUSH_PROMISE:
            self._fail(Err.PROTOCOL_ERROR, "PUSH_PROMISE, but we disabled push")
        # Unknown frame types are ignored (RFC 9113 §4.1).

    def _on_data(self, flags: int, sid: int, payload: bytes, events: list[Event]) -> None:
        if sid == 0:
            self._fail(Err.PROTOCOL_ERROR, "DATA on stream 0")
        flow = len(payload)
        if flags & PADDED:
            if not payload or payload[0] >= len(payload):
                self._fail(Err.PROTOCOL_ERROR, "DATA padding longer than the frame")
            payload = payload[1 : len(payload) - payload[0]]
        self.recv_window -= flow
        if self.recv_window < 0:
            self._fail(Err.FLOW_CONTROL_ERROR, "peer overran the connection window")
        s = self.streams.get(sid)
        if s is None or s.remote_closed:
            # Credit the connection anyway (RFC 9113 §6.9) and tell the peer to stop.
            self.consumed(0, flow)
            if s is None and sid > self._max_known_id():
                self._fail(Err.PROTOCOL_ERROR, f"DATA on idle stream {sid}")
            self._frame(Frame.RST_STREAM, 0, sid, _U32.pack(Err.STREAM_CLOSED))
            return
        if not s.headers_done:
            self._stream_error(s, Err.PROTOCOL_ERROR, events)
            self.consumed(0, flow)
            return
        s.recv_window -= flow
        if s.recv_window < 0:
            self._stream_error(s, Err.FLOW_CONTROL_ERROR, events)
            self.consumed(0, flow)
            return
        if payload:
            events.append(Data(sid, payload, flow))
        elif flow:
            self.consumed(sid, flow)  # padding only: nothing for the application to take
        if flags & END_STREAM:
            s.remote_closed = True
            events.append(StreamEnded(sid))
            self._maybe_forget(s)

    def _max_known_id(self) -> int:
        return max(self._last_peer_id, self._next_id - 2)

    def _on_headers(self, flags: int, sid: int, payload: bytes, events: list[Event]) -> None:
        if sid == 0:
            self._fail(Err.PROTOCOL_ERROR, "HEADERS on stream 0")
        p = 0
        pad = 0
        if flags & PADDED:
            if not payload:
                self._fail(Err.PROTOCOL_ERROR, "empty padded HEADERS")
            pad = payload[0]
            p = 1
        if flags & PRIORITY_FLAG:
            p += 5
        if p + pad > len(payload):
            self._fail(Err.PROTOCOL_ERROR, "HEADERS padding longer than the frame")
        pending = _Pending(
            sid, bool(flags & END_STREAM), bytearray(payload[p : len(payload) - pad])
        )
        if flags & END_HEADERS:
            self._headers_complete(pending, events)
        else:
            self._continuation = pending

    def _on_continuation(self, flags: int, sid: int, payload: bytes, events: list[Event]) -> None:
        pending = self._continuation
        if pending is None or pending.stream_id != sid:
            self._fail(Err.PROTOCOL_ERROR, "CONTINUATION without a HEADERS to continue")
            return
        pending.block += payload
        if len(pending.block) > self.local.max_header_list_size:
            self._fail(
                Err.ENHANCE_YOUR_CALM,
                f"header block over "
                f"{self.local.max_header_list_size} bytes across CONTINUATION frames",
            )
        if flags & END_HEADERS:
            self._continuation = None
            self._headers_complete(pending, events)

    def _headers_complete(self, pending: _Pending, events: list[Event]) -> None:
        sid = pending.stream_id
        if len(pending.block) > self.local.max_header_list_size:
            self._fail(Err.ENHANCE_YOUR_CALM, "header block too large")
        try:
            headers = [
                (k.decode(), v.decode())
                for k, v in self._decoder.decode(bytes(pending.block), raw=True)
            ]
        except (HPACKError, UnicodeDecodeError) as e:
            self._fail(Err.COMPRESSION_ERROR, f"HPACK: {e}")
            return
        s = self.streams.get(sid)
        if self.client:
            if s is None:
                # Trailers or a response for a stream we already reset: ignore politely.
                return
            self._client_response(s, headers, pending.end_stream, events)
            return
        if s is not None:
            # Trailers on a CONNECT stream are meaningless; treat as a stream error.
            self._stream_error(s, Err.PROTOCOL_ERROR, events)
            return
        if sid % 2 == 0 or sid <= self._last_peer_id:
            self._fail(Err.PROTOCOL_ERROR, f"client opened stream {sid} out of order")
        self._last_peer_id = sid
        if self.goaway_sent:
            self._frame(Frame.RST_STREAM, 0, sid, _U32.pack(Err.REFUSED_STREAM))
            return
        peer_open = sum(1 for st in self.streams.values() if st.id % 2 == 1)
        if peer_open >= self.local.max_concurrent_streams:
            self._frame(Frame.RST_STREAM, 0, sid, _U32.pack(Err.REFUSED_STREAM))
            return
        pseudo = {k: v for k, v in headers if k.startswith(":")}
        regular = [(k, v) for k, v in headers if not k.startswith(":")]
        s = _Stream(
            sid,
            self.peer_initial_window,
            self.local.initial_window,
            headers_done=True,
            remote_closed=pending.end_stream,
        )
        self.streams[sid] = s
        method = pseudo.get(":method", "")
        authority = pseudo.get(":authority", "")
        if (
            not method
            or any(k.isupper() for k, _ in headers)
            or (method == "CONNECT" and (":path" in pseudo or ":scheme" in pseudo or not authority))
        ):
            # Malformed request (RFC 9113 §8.1.1): a stream error; the server answers 400
            # itself for well-formed non-CONNECT methods.
            self._stream_error(s, Err.PROTOCOL_ERROR, events)
            return
        events.append(StreamRequest(sid, method, authority, regular))

    def _client_response(
        self, s: _Stream, headers: list[tuple[str, str]], end: bool, events: list[Event]
    ) -> None:
        status_s = next((v for k, v in headers if k == ":status"), None)
        if s.headers_done:
            # Trailers: only meaningful as the end of the stream.
            if end:
                s.remote_closed = True
                events.append(StreamEnded(s.id))
                self._maybe_forget(s)
            return
        # Three ASCII digits: str.isdigit() alone takes superscripts (which int() refuses)
        # and other scripts' digits (which int() reads as 200).
        if status_s is None or not (
            len(status_s) == 3 and status_s.isascii() and status_s.isdigit()
        ):
            self._stream_error(s, Err.PROTOCOL_ERROR, events)
            return
        status = int(status_s)
        if 100 <= status < 200:
            return  # informational: the final response follows
        s.headers_done = True
        events.append(
            StreamResponse(s.id, status, [(k, v) for k, v in headers if not k.startswith(":")], end)
        )
        if end:
            s.remote_closed = True
            s.local_closed = True  # a refused CONNECT is over for both sides
            self._maybe_forget(s)

    def _stream_error(self, s: _Stream, code: Err, events: list[Event]) -> None:
        self.streams.pop(s.id, None)
        self._frame(Frame.RST_STREAM, 0, s.id, _U32.pack(code))
        events.append(StreamReset(s.id, int(code), remote=False))  # a plain int, as received

    def _on_window_update(self, sid: int, payload: bytes, events: list[Event]) -> None:
        if len(payload) != 4:
            self._fail(Err.FRAME_SIZE_ERROR, "WINDOW_UPDATE must be 4 bytes")
        inc = _U32.unpack(payload)[0] & 0x7FFFFFFF
        if sid == 0:
            if inc == 0:
                self._fail(Err.PROTOCOL_ERROR, "WINDOW_UPDATE of 0 on the connection")
            self.send_window += inc
            if self.send_window > MAX_WINDOW:
                self._fail(Err.FLOW_CONTROL_ERROR, "connection window above 2^31-1")
            events.append(WindowOpened(0))
            return
        s = self.streams.get(sid)
        if s is None:
            return  # may arrive after we closed the stream
        if inc == 0:
            self._stream_error(s, Err.PROTOCOL_ERROR, events)
            return
        s.send_window += inc
        if s.send_window > MAX_WINDOW:
            self._stream_error(s, Err.FLOW_CONTROL_ERROR, events)
            return
        events.append(WindowOpened(sid))

    def _on_settings(self, flags: int, sid: int, payload: bytes, events: list[Event]) -> None:
        if sid != 0:
            self._fail(Err.PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & ACK:
            if payload:
                self._fail(Err.FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")
            events.append(SettingsAcked())
            return
        if len(payload) % 6:
            self._fail(Err.FRAME_SIZE_ERROR, "SETTINGS length not a multiple of 6")
        for i in range(0, len(payload), 6):
            key, val = _SETTING.unpack_from(payload, i)
            if key == S_INITIAL_WINDOW_SIZE:
                if val > MAX_WINDOW:
                    self._fail(Err.FLOW_CONTROL_ERROR, "SETTINGS_INITIAL_WINDOW_SIZE too big")
                delta = val - self.peer_initial_window
                self.peer_initial_window = val
                for s in self.streams.values():
                    s.send_window += delta
                if delta > 0:
                    events.extend(WindowOpened(s.id) for s in self.streams.values())
            elif key == S_MAX_FRAME_SIZE:
                if not 16384 <= val <= 16777215:
                    self._fail(Err.PROTOCOL_ERROR, "SETTINGS_MAX_FRAME_SIZE out of range")
                self.peer_max_frame = val
            elif key == S_MAX_CONCURRENT_STREAMS:
                self.peer_max_streams = val
            elif key == S_ENABLE_PUSH:
                if val > 1:
                    self._fail(Err.PROTOCOL_ERROR, "SETTINGS_ENABLE_PUSH must be 0 or 1")
            elif key == S_HEADER_TABLE_SIZE:
                self._encoder.header_table_size = min(val, 4096)
        self._frame(Frame.SETTINGS, ACK, 0)

    def _on_rst(self, sid: int, payload: bytes, events: list[Event]) -> None:
        if sid == 0:
            self._fail(Err.PROTOCOL_ERROR, "RST_STREAM on stream 0")
        if len(payload) != 4:
            self._fail(Err.FRAME_SIZE_ERROR, "RST_STREAM must be 4 bytes")
        # Rapid reset (CVE-2023-44487): count peer resets over the last N frames.
        self._resets.append(self._frames_seen)
        while self._resets and self._resets[0] < self._frames_seen - self.local.reset_budget_window:
            self._resets.popleft()
        if len(self._resets) > self.local.max_resets_per_window:
            self._fail(Err.ENHANCE_YOUR_CALM, "too many stream resets (rapid reset)")
        s = self.streams.pop(sid, None)
        if s is not None:
            events.append(StreamReset(sid, _U32.unpack(payload)[0], remote=True))
