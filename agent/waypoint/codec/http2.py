"""Sans-IO HTTP/2 (h2c prior knowledge, gRPC): the `h2` state machine, translated to weft's
event vocabulary.

One Http2Connection per transport connection. Bytes go in through `receive_data`, events
come out; afterwards write `data_to_send()` (SETTINGS and PING acks, WINDOW_UPDATEs, resets).
The `send_*` methods return everything there is to write.

Stream errors stay on their stream (RFC 9113 section 5.4.2): a malformed request or
response becomes RST_STREAM(PROTOCOL_ERROR) plus a StreamReset event and every other stream
carries on; that matters most on a backend connection shared by many clients. Connection
errors send GOAWAY and raise ProtocolError.

Header validation is done here instead of in h2 (which checks field values byte by byte in
Python): names, values and pseudo-headers are checked over a whole header block with a
few regular-expression scans.

Flow control, receiving: the window only reopens when the core calls `consumed(stream, n)`
for data it has passed on, so a slow reader slows its sender instead of growing buffers.
Sending: `send_data` never refuses data; what the peer's window does not admit is queued and
sent as WINDOW_UPDATEs arrive. The core stops reading its source while `send_window(stream)`
is <= 0 and resumes on WindowUpdated(stream).
"""

from __future__ import annotations

import contextlib
import re
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Final

import h2.events as h2e
import h2.exceptions as h2x
from h2.config import H2Configuration
from h2.connection import ConnectionState, H2Connection
from h2.errors import ErrorCodes
from h2.frame_buffer import FrameBuffer
from h2.settings import SettingCodes, Settings
from hpack import Encoder, NeverIndexedHeaderTuple
from hpack.exceptions import HPACKError
from hyperframe.frame import DataFrame, GoAwayFrame, HeadersFrame

from agent.waypoint.codec.config import DEFAULT_LIMITS, Limits, Role
from agent.waypoint.codec.errors import ErrorCode, ProtocolError, local_error
from agent.waypoint.codec.events import (
    ConnectionClosed,
    Data,
    Event,
    GoAway,
    RequestHead,
    ResponseHead,
    StreamReset,
    Trailers,
    WindowUpdated,
)
from agent.waypoint.codec.headers import Field, Headers
from agent.waypoint.codec.http1 import HOST_RE

_TOKEN: Final = rb"[!#$%&'*+\-.^_`|~0-9a-z]+"
# Regular field names of a block joined by spaces: lowercase tokens only (RFC 9113 8.2.1).
_NAMES_RE: Final = re.compile(_TOKEN + rb"(?: " + _TOKEN + rb")*")
# Values are checked joined by NUL, with HTAB folded into SP and LF into CR, so that a few
# substring searches find CR, LF, and whitespace at either end of a value (RFC 9113
# 8.2.1): ~1 µs a block where a regular expression took ~9 µs.
_FOLD: Final = bytes.maketrans(b"\t\n", b" \r")
_METHOD_RE: Final = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_PATH_RE: Final = re.compile(rb"[\x21-\x7e\x80-\xff]+")
_REQUEST_PSEUDO: Final = frozenset({b":method", b":scheme", b":authority", b":path"})
# RFC 9113 section 8.2.2: connection-specific fields make a message malformed.
_CONNECTION_SPECIFIC: Final = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade", b"te"}
)
# Not forwarded onto HTTP/2 (HOP_BY_HOP, plus Host, which :authority carries).
_NOT_SENT: Final = _CONNECTION_SPECIFIC | {b"host"}
# HPACK must never index credentials (RFC 7541 section 7.1.3), as h2 itself does.
_SECRET: Final = frozenset({b"authorization", b"proxy-authorization"})
_STATUS: Final = {s: b"%d" % s for s in range(100, 600)}
_HTTP_SCHEMES: Final = frozenset({b"http", b"https"})
_NEVER: Final = 1 << 62


class _Malformed(h2e.Event):
    """A stream-level violation the h2 machine caught and answered with RST_STREAM."""

    def __init__(self, stream_id: int, reason: str) -> None:
        self.stream_id = stream_id
        self.reason = reason


class _FrameBuffer(FrameBuffer):
    """h2's frame buffer, checking a frame's length as soon as its 9-byte header is in.

    h2 checks the length against SETTINGS_MAX_FRAME_SIZE only once the whole frame is
    buffered, so a peer announcing an oversized frame is buffered up to the 16 MiB the
    24-bit length allows before it is refused, and a peer that does not speak HTTP/2 at all
    (b"HTTP/1.1 400 ..." reads as a 4.7 MB frame) is waited on until it closes. RFC 9113
    section 4.2: a frame over the limit is a FRAME_SIZE_ERROR, known from the header.
    """

    def __next__(self) -> Any:
        if len(self._data) >= 9:
            self._validate_frame_length(int.from_bytes(self._data[:3], "big"))
        return super().__next__()


class _H2Machine(H2Connection):
    """h2's connection, changed in how it takes two kinds of received frame:

    - a malformed message (bad content-length, body longer or shorter than it, trailers
      without END_STREAM, ...) resets its stream instead of the whole connection, once the
      header block is decoded and HPACK state is intact (RFC 9113 section 8.1.1);
    - GOAWAY reports ConnectionTerminated without closing h2's state machine, so streams
      the peer still processes (up to its last stream id) can finish: h2 would otherwise
      drop them and their responses.

    Its frame buffer also refuses oversized frames from their header (see _FrameBuffer).
    """

    def __init__(self, config: H2Configuration) -> None:
        super().__init__(config)
        self.incoming_buffer = _FrameBuffer(server=not config.client_side)

    def _receive_frame(self, frame: Any) -> list[h2e.Event]:
        if type(frame) is GoAwayFrame:
            ev = h2e.ConnectionTerminated()
            ev.error_code = _code(frame.error_code)
            ev.last_stream_id = frame.last_stream_id
            ev.additional_data = frame.additional_data or None
            return [ev]
        try:
            return super()._receive_frame(frame)
        except (h2x.InvalidBodyLengthError, h2x.ProtocolError) as exc:
            sid = frame.stream_id
            stream = self.streams.get(sid)
            if (
                type(exc) not in (h2x.ProtocolError, h2x.InvalidBodyLengthError)
                or type(frame) not in (HeadersFrame, DataFrame)
                or isinstance(exc.__cause__, HPACKError)
                or self.state_machine.state is ConnectionState.CLOSED
                or stream is None
                or stream.closed
            ):
                raise
            self.reset_stream(sid, ErrorCodes.PROTOCOL_ERROR)
            if type(frame) is DataFrame:  # give its bytes back to the connection window
                self.acknowledge_received_data(frame.flow_controlled_length, sid)
            if type(exc) is h2x.InvalidBodyLengthError:
                reason = f"body of stream {sid} does not match its content-length ({exc})"
            else:
                reason = f"malformed message on stream {sid}: {exc}"
            return [_Malformed(sid, reason)]


def _code(value: int) -> int:
    try:
        return ErrorCode(value)
    except ValueError:
        return value


class _PlainEncoder(Encoder):
    """HPACK without Huffman coding of literals (RFC 7541 section 5.2 makes it optional).
    hpack's Huffman coder is pure Python at ~0.3 µs a byte, about 15 µs for a bearer
    token on every request, while it saves only ~20% of literal bytes, and the dynamic
    table already absorbs repeated fields. Decoding Huffman from peers is unaffected."""

    def encode(self, headers: Any, huffman: bool = True) -> bytes:
        return super().encode(headers, huffman=False)


class _Outbox:
    """Data the peer's window has not admitted yet, and what ends the stream after it."""

    __slots__ = ("chunks", "end", "size", "trailers")

    def __init__(self) -> None:
        self.chunks: deque[memoryview] = deque()
        self.size = 0
        self.end = False
        self.trailers: list[Field] | None = None


class Http2Connection:
    """One HTTP/2 connection; see the module docstring."""

    def __init__(
        self,
        role: Role,
        limits: Limits = DEFAULT_LIMITS,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.role = role
        self.limits = limits
        self._server = role is Role.SERVER
        self._clock = clock
        h2 = self._h2 = _H2Machine(
            H2Configuration(
                client_side=not self._server,
                header_encoding=None,
                validate_inbound_headers=False,  # done here, per block (see module doc)
                normalize_inbound_headers=False,
                validate_outbound_headers=False,
                normalize_outbound_headers=False,
                split_outbound_cookies=False,
            )
        )
        settings = {
            SettingCodes.MAX_CONCURRENT_STREAMS: limits.max_concurrent_streams,
            SettingCodes.INITIAL_WINDOW_SIZE: limits.stream_window,
            SettingCodes.MAX_HEADER_LIST_SIZE: limits.max_header_bytes,
        }
        if not self._server:
            settings[SettingCodes.ENABLE_PUSH] = 0
        h2.local_settings = Settings(client=not self._server, initial_values=settings)
        h2.encoder = _PlainEncoder()
        h2.initiate_connection()
        if limits.connection_window > 65535:
            h2.increment_flow_control_window(limits.connection_window - 65535)
        self._hpack_cap()
        self._unacked: dict[int, int] = {}  # bytes handed to the core, not yet consumed
        self._outbox: dict[int, _Outbox] = {}
        # Client role: streams whose answer can have no content (a HEAD request, or a 204
        # or 304 final status): DATA on them is malformed (RFC 9113 8.1.1).
        self._bodiless: set[int] = set()
        self._blocked: set[int] = set()  # streams told to stop (send_window <= 0)
        self._tokens = float(limits.reset_burst)
        self._refilled = clock()
        self._keep_alive = True
        self._dead = False
        self._goaway_sent: int | None = None  # last stream id of our graceful GOAWAY
        self._extra = b""  # bytes h2 does not know about (our graceful GOAWAY)
        self._dispatch: dict[type, Callable[[Any, list[Any]], None]] = {
            h2e.RequestReceived: self._on_request,
            h2e.ResponseReceived: self._on_response,
            h2e.InformationalResponseReceived: self._on_response,  # 1xx: never ends a stream
            h2e.TrailersReceived: self._on_trailers,
            h2e.DataReceived: self._on_data,
            h2e.StreamReset: self._on_reset,
            h2e.WindowUpdated: self._on_window,
            h2e.RemoteSettingsChanged: self._on_window,
            h2e.SettingsAcknowledged: self._on_settings_ack,
            h2e.ConnectionTerminated: self._on_goaway,
            _Malformed: self._on_malformed,
        }

    # ------------------------------------------------------------------ state for the shell

    @property
    def keep_alive(self) -> bool:
        """New streams may still be opened (no GOAWAY either way, no error)."""
        return self._keep_alive

    @property
    def idle(self) -> bool:
        """No stream is open."""
        return self._h2.open_inbound_streams + self._h2.open_outbound_streams == 0

    @property
    def should_close(self) -> bool:
        """Close the transport once `data_to_send()` is written."""
        return self._dead or (not self._keep_alive and self.idle)

    @property
    def available_streams(self) -> int:
        """Client role: streams that may be opened now under the peer's concurrency limit."""
        if not self._keep_alive:
            return 0
        return self._h2.remote_settings.max_concurrent_streams - self._h2.open_outbound_streams

    def next_stream_id(self) -> int:
        """Client role: the stream id for the next send_request_head."""
        return self._h2.get_next_available_stream_id()

    def send_window(self, stream_id: int) -> int:
        """Bytes the peer admits on `stream_id` now, less what is already queued; the core
        should stop reading the stream's source while this is <= 0."""
        try:
            window = self._h2.local_flow_control_window(stream_id)
        except h2x.ProtocolError:
            return 0
        box = self._outbox.get(stream_id)
        return window - box.size if box is not None else window

    def data_to_send(self) -> bytes:
        """Bytes to write produced by receiving (acks, window updates, resets, GOAWAY)."""
        out = self._h2.data_to_send()
        if self._extra:
            out, self._extra = out + self._extra, b""
        return out

    # ------------------------------------------------------------------------ receiving

    def receive_data(self, data: bytes) -> list[Event]:
        """Feed bytes read from the transport (b"" at EOF); return the events they complete.

        Raises ProtocolError on a connection error (GOAWAY is then in data_to_send()).
        """
        if self._dead:
            return []
        if not data:
            return self._on_eof()
        try:
            h2_events = self._h2.receive_data(data)
        except h2x.ProtocolError as exc:
            self._dead = True
            self._keep_alive = False
            raise ProtocolError(
                f"HTTP/2 connection error from the {'client' if self._server else 'backend'}: "
                f"{exc}",
                status=400 if self._server else 502,
                error_code=_code(exc.error_code),
            ) from exc
        out: list[Event] = []
        dispatch = self._dispatch
        for ev in h2_events:
            handler = dispatch.get(type(ev))
            if handler is not None:
                handler(ev, out)
        return out

    def consumed(self, stream_id: int, n: int) -> bytes:
        """The core has passed on `n` bytes of Data from `stream_id`: let the peer send that
        much more. Returns the WINDOW_UPDATE bytes to write (h2 batches them)."""
        unacked = self._unacked.get(stream_id, 0)
        n = min(n, unacked)
        if n <= 0:
            return b""
        if n == unacked:
            del self._unacked[stream_id]
        else:
            self._unacked[stream_id] = unacked - n
        self._h2.acknowledge_received_data(n, stream_id)
        return self.data_to_send()

    def _on_request(self, ev: Any, out: list[Any]) -> None:
        sid = ev.stream_id
        if self._goaway_sent is not None and sid > self._goaway_sent:
            self._h2.reset_stream(sid, ErrorCodes.REFUSED_STREAM)  # opened after our GOAWAY
            return
        head = self._request_head(sid, ev.headers, ev.stream_ended is not None)
        if type(head) is str:
            self._reject(sid, head, out)
        else:
            out.append(head)

    def _on_response(self, ev: Any, out: list[Any]) -> None:
        sid = ev.stream_id
        fields = ev.headers
        problem = None
        if not fields or fields[0][0] != b":status":
            problem = "response without :status first"
        else:
            status = fields[0][1]
            rest = fields[1:]
            if len(status) != 3 or not status.isdigit() or not b"100" <= status <= b"599":
                # RFC 9110 15: codes are 100-599; anything else is no answer at all.
                problem = f"invalid :status {status[:16]!r}"
            else:
                problem = _check_block(rest, len(status) + 39, self.limits, "response")
        if problem is not None:
            self._reject(sid, problem, out)
            return
        ended = getattr(ev, "stream_ended", None) is not None
        code = int(status)
        if ended:
            self._bodiless.discard(sid)
        elif code in (204, 304):
            self._bodiless.add(sid)
        out.append(ResponseHead(sid, code, Headers(rest), ended))

    def _on_trailers(self, ev: Any, out: list[Any]) -> None:
        sid = ev.stream_id
        fields = ev.headers
        problem = _check_block(fields, 0, self.limits, "trailer")
        self._bodiless.discard(sid)
        if problem is not None:
            self._reject(sid, problem, out)
        else:
            out.append(Trailers(sid, Headers(fields)))

    def _on_data(self, ev: Any, out: list[Any]) -> None:
        sid = ev.stream_id
        data = ev.data
        n = len(data)
        padding = ev.flow_controlled_length - n
        if padding:  # the core never sees padding, so it is given back at once
            self._h2.acknowledge_received_data(padding, sid)
        bodiless = self._bodiless
        if bodiless and sid in bodiless:
            if n:
                self._reject(sid, "DATA in a response that has no content", out)
                return
            if ev.stream_ended is not None:
                bodiless.discard(sid)
        if n:
            self._unacked[sid] = self._unacked.get(sid, 0) + n
        out.append(Data(sid, data, ev.stream_ended is not None))

    def _on_reset(self, ev: Any, out: list[Any]) -> None:
        sid = ev.stream_id
        self._forget(sid)
        out.append(StreamReset(sid, _code(ev.error_code), ev.remote_reset))
        if self._server and ev.remote_reset:
            self._spend_reset_token("reset")

    def _on_malformed(self, ev: Any, out: list[Any]) -> None:
        self._forget(ev.stream_id)
        out.append(StreamReset(ev.stream_id, ErrorCode.PROTOCOL_ERROR, False, ev.reason))
        if self._server:
            self._spend_reset_token("malformed")

    def _on_window(self, ev: Any, out: list[Any]) -> None:
        if self._outbox:
            self._flush()
        if self._blocked:
            for sid in list(self._blocked):
                if self.send_window(sid) > 0:
                    self._blocked.discard(sid)
                    out.append(WindowUpdated(sid))

    def _on_settings_ack(self, ev: Any, out: list[Any]) -> None:
        self._hpack_cap()

    def _hpack_cap(self) -> None:
        # h2 sets the HPACK decoder's hard limit to what we advertise, and going over it
        # is a connection error. Twice that keeps the advertised limit a stream error
        # (checked per block here) while still bounding what one header block can cost.
        self._h2.decoder.max_header_list_size = 2 * self.limits.max_header_bytes

    def _on_goaway(self, ev: Any, out: list[Any]) -> None:
        last = ev.last_stream_id
        code = _code(ev.error_code)
        self._keep_alive = False
        out.append(GoAway(last, code, ev.additional_data or b""))
        mine = 0 if self._server else 1
        for sid, stream in list(self._h2.streams.items()):
            if stream.closed:
                continue
            if sid > last and sid % 2 == mine:
                reason = "not processed: above the peer's GOAWAY last stream id"
                self._reset(sid, ErrorCode.REFUSED_STREAM, reason, out)
            elif code != ErrorCode.NO_ERROR:
                self._reset(sid, code, "connection aborted by the peer's GOAWAY", out)
        if code != ErrorCode.NO_ERROR:
            self._dead = True

    def _on_eof(self) -> list[Event]:
        out: list[Any] = []
        for sid, stream in list(self._h2.streams.items()):
            if not stream.closed:
                out.append(StreamReset(sid, ErrorCode.CANCEL, True, "connection closed mid-stream"))
                self._forget(sid)
        out.append(ConnectionClosed())
        self._dead = True
        self._keep_alive = False
        return out

    def _reset(self, sid: int, code: int, reason: str, out: list[Any]) -> None:
        with contextlib.suppress(h2x.ProtocolError):
            self._h2.reset_stream(sid, code)
        self._forget(sid)
        out.append(StreamReset(sid, code, True, reason))

    def _reject(self, sid: int, reason: str, out: list[Any]) -> None:
        """A stream-level violation: RST_STREAM(PROTOCOL_ERROR), others carry on. A stream
        the block closed (END_STREAM) cannot be reset any more; it is reported reset here
        all the same, so the malformed message is never passed on."""
        with contextlib.suppress(h2x.ProtocolError):  # StreamClosedError: closed already
            self._h2.reset_stream(sid, ErrorCodes.PROTOCOL_ERROR)
        self._forget(sid)
        out.append(StreamReset(sid, ErrorCode.PROTOCOL_ERROR, False, reason))
        if self._server:
            self._spend_reset_token("malformed")

    def _forget(self, sid: int) -> None:
        """The stream is gone: hand its unconsumed bytes back to the connection window
        and drop what was queued for it."""
        unacked = self._unacked.pop(sid, 0)
        if unacked:
            self._h2.acknowledge_received_data(unacked, sid)
        self._outbox.pop(sid, None)
        self._blocked.discard(sid)
        self._bodiless.discard(sid)

    def _spend_reset_token(self, why: str) -> None:
        """CVE-2023-44487 (rapid reset): resets cost tokens from a refilling bucket."""
        now = self._clock()
        limits = self.limits
        tokens = min(
            float(limits.reset_burst), self._tokens + (now - self._refilled) * limits.reset_rate
        )
        self._refilled = now
        self._tokens = tokens - 1.0
        if self._tokens < 0:
            self._h2.close_connection(
                ErrorCodes.ENHANCE_YOUR_CALM, last_stream_id=self._h2.highest_inbound_stream_id
            )
            self._dead = True
            self._keep_alive = False
            raise ProtocolError(
                f"client exceeded the stream reset budget ({limits.reset_burst} at once, "
                f"{limits.reset_rate:g}/s; last one: {why}): rapid reset, CVE-2023-44487",
                status=429,
                error_code=ErrorCode.ENHANCE_YOUR_CALM,
            )

    def _request_head(self, sid: int, fields: list[Any], end_stream: bool) -> RequestHead | str:
        """The RequestHead for a decoded block, or why the request is malformed."""
        pseudo: dict[bytes, bytes] = {}
        i = 0
        for n, v in fields:
            if n[:1] != b":":
                break
            if n not in _REQUEST_PSEUDO:
                if n == b":protocol":  # RFC 8441 section 3: malformed unless we offered it
                    return (
                        "extended CONNECT (:protocol) is not supported: "
                        "SETTINGS_ENABLE_CONNECT_PROTOCOL was not sent"
                    )
                return f"pseudo-header {n[:32]!r} is not allowed in a request"
            if n in pseudo:
                return f"duplicate {n.decode()}"
            pseudo[n] = v
            i += 1
        regular = fields[i:]
        problem = _check_block(regular, sum(map(len, pseudo)), self.limits, "request", fields)
        if problem is not None:
            return problem
        method = pseudo.get(b":method")
        if method is None or not _METHOD_RE.fullmatch(method):
            return "request without a valid :method"
        authority = pseudo.get(b":authority")
        host = None
        for n, v in regular:
            if n == b"host":
                host = v
                break
        if method == b"CONNECT":
            if authority is None or b":scheme" in pseudo or b":path" in pseudo:
                return "CONNECT needs :authority and no :scheme or :path"
            target = authority
            scheme = b""
        else:
            scheme = pseudo.get(b":scheme", b"")
            target = pseudo.get(b":path", b"")
            if scheme not in _HTTP_SCHEMES:
                return f"request :scheme {scheme[:16]!r} is not http or https"
            if not (target[:1] == b"/" or (target == b"*" and method == b"OPTIONS")):
                return f"request :path {target[:64]!r} is not absolute (must start with /)"
            if not _PATH_RE.fullmatch(target):
                return "request :path contains whitespace or control characters"
            if len(target) > self.limits.max_target_bytes:
                return (
                    f"request :path of {len(target):,} bytes exceeds the "
                    f"{self.limits.max_target_bytes:,}-byte limit"
                )
        if authority is None:
            if host is None:
                return "request has neither :authority nor host"
            authority = host
        elif host is not None and host != authority:
            return "request :authority and host differ"
        if not HOST_RE.fullmatch(authority):
            return f"invalid :authority {authority[:64]!r}"
        return RequestHead(
            sid,
            method.decode("ascii"),
            target.decode("latin-1"),
            authority.decode("latin-1"),
            scheme.decode("ascii"),
            Headers(_join_cookies(regular)),
            end_stream,
        )

    # -------------------------------------------------------------------------- sending

    def send_request_head(
        self,
        stream_id: int,
        method: str,
        target: str,
        authority: str,
        scheme: str,
        headers: Headers,
        end_stream: bool = False,
    ) -> bytes:
        """Client role: open `stream_id` (from next_stream_id()) with a request."""
        if self._server:
            raise local_error("send_request_head on a server-role connection", stream_id)
        if not self._keep_alive:
            raise local_error("connection is going away; open a new one", stream_id)
        if method == "CONNECT":
            fields = [(b":method", b"CONNECT"), (b":authority", authority.encode("latin-1"))]
        else:
            fields = [
                (b":method", method.encode("ascii")),
                (b":scheme", scheme.encode("ascii")),
                (b":authority", authority.encode("latin-1")),
                (b":path", target.encode("latin-1")),
            ]
        _outbound(fields, headers)
        if method == "HEAD":
            self._bodiless.add(stream_id)
        return self._send_headers(stream_id, fields, end_stream)

    def send_response_head(
        self, stream_id: int, status: int, headers: Headers, end_stream: bool = False
    ) -> bytes:
        """Server role: answer `stream_id` (1xx heads may precede the final one)."""
        code = _STATUS.get(status)
        if code is None:
            raise local_error(f"invalid status {status}", stream_id)
        fields = [(b":status", code)]
        _outbound(fields, headers)
        return self._send_headers(stream_id, fields, end_stream)

    def send_data(
        self, stream_id: int, data: bytes | memoryview, end_stream: bool = False
    ) -> bytes:
        """Send body bytes; what the peer's window does not admit now is queued (see
        send_window and WindowUpdated)."""
        box = self._outbox.get(stream_id)
        if box is None:
            h2 = self._h2
            n = len(data)
            try:
                window = h2.local_flow_control_window(stream_id)
            except h2x.StreamClosedError:
                return b""  # reset meanwhile; the core has or will have a StreamReset
            except h2x.ProtocolError as exc:
                raise local_error(f"cannot send on stream {stream_id}: {exc}", stream_id) from exc
            if n <= window and n <= h2.max_outbound_frame_size:
                h2.send_data(stream_id, data, end_stream=end_stream)
                if n == window:
                    self._blocked.add(stream_id)
                return h2.data_to_send()
            box = self._outbox[stream_id] = _Outbox()
        if len(data):
            box.chunks.append(memoryview(data))
            box.size += len(data)
        box.end = box.end or end_stream
        self._flush()
        if self.send_window(stream_id) <= 0:
            self._blocked.add(stream_id)
        return self._h2.data_to_send()

    def send_trailers(self, stream_id: int, headers: Headers) -> bytes:
        """End the stream with trailers (after any queued data)."""
        fields: list[Field] = []
        _outbound(fields, headers, trailers=True)
        box = self._outbox.get(stream_id)
        if box is not None:
            box.trailers = fields
            box.end = True
            return b""
        return self._send_headers(stream_id, fields, True)

    def wait_for_window(self, stream_id: int) -> None:
        """The core waits to send on `stream_id` (send_window <= 0): a WindowUpdated event
        reports when it may go on, whichever window held it (its own, or the connection's,
        which another stream may have used up)."""
        self._blocked.add(stream_id)

    def queued(self, stream_id: int) -> bool:
        """Whether anything for `stream_id` (data, its end, trailers) still waits for the
        peer's window."""
        return stream_id in self._outbox

    def reset_stream(self, stream_id: int, error_code: int = ErrorCode.CANCEL) -> bytes:
        """RST_STREAM: abandon one stream, the others carry on."""
        self._forget(stream_id)
        try:
            self._h2.reset_stream(stream_id, error_code)
        except h2x.StreamClosedError:
            pass
        except h2x.ProtocolError as exc:
            raise local_error(f"cannot reset stream {stream_id}: {exc}", stream_id) from exc
        return self._h2.data_to_send()

    def close(
        self, error_code: int = ErrorCode.NO_ERROR, last_stream_id: int | None = None
    ) -> bytes:
        """GOAWAY. NO_ERROR drains: streams up to `last_stream_id` (default: the highest the
        peer opened) finish, newer ones are refused. Any other code ends the connection."""
        self._keep_alive = False
        h2 = self._h2
        last = h2.highest_inbound_stream_id if last_stream_id is None else last_stream_id
        if error_code != ErrorCode.NO_ERROR:
            self._dead = True
            h2.close_connection(error_code, last_stream_id=last)
            return h2.data_to_send()
        frame = GoAwayFrame(0)
        frame.last_stream_id = last
        frame.error_code = 0
        self._goaway_sent = last
        return h2.data_to_send() + frame.serialize()

    def _send_headers(self, stream_id: int, fields: list[Any], end_stream: bool) -> bytes:
        h2 = self._h2
        try:
            h2.send_headers(stream_id, fields, end_stream=end_stream)
        except h2x.StreamClosedError:
            return b""
        except h2x.ProtocolError as exc:
            raise local_error(
                f"cannot send headers on stream {stream_id}: {exc}", stream_id
            ) from exc
        return h2.data_to_send()

    def _flush(self) -> None:
        """Send queued data as far as windows allow; then END_STREAM or trailers."""
        h2 = self._h2
        frame_max = h2.max_outbound_frame_size
        for sid in list(self._outbox):
            box = self._outbox[sid]
            try:
                window = h2.local_flow_control_window(sid)
            except h2x.ProtocolError:
                del self._outbox[sid]
                continue
            chunks = box.chunks
            end_with_data = box.end and box.trailers is None
            while chunks and window > 0:
                chunk = chunks[0]
                n = min(len(chunk), window, frame_max)
                whole = n == len(chunk)
                last = whole and len(chunks) == 1 and end_with_data
                h2.send_data(sid, chunk[:n], end_stream=last)
                window -= n
                box.size -= n
                if whole:
                    chunks.popleft()
                else:
                    chunks[0] = chunk[n:]
                if last:
                    box.end = False  # sent with the data
            if chunks:
                continue
            del self._outbox[sid]
            if box.end:
                try:
                    if box.trailers is not None:
                        h2.send_headers(sid, box.trailers, end_stream=True)
                    else:
                        h2.end_stream(sid)
                except h2x.StreamClosedError:
                    pass


def _check_block(
    fields: list[Any],
    extra_size: int,
    limits: Limits,
    what: str,
    all_fields: list[Any] | None = None,
) -> str | None:
    """Why a block of regular fields is malformed or over the limits, or None. The size is
    counted as HPACK does (RFC 7541 section 4.1: name + value + 32 per field)."""
    count = len(all_fields) if all_fields is not None else len(fields)
    if count > limits.max_header_count:
        return f"{what} has {count} header fields, over the limit of {limits.max_header_count}"
    names = [f[0] for f in fields]
    values = [f[1] for f in (all_fields if all_fields is not None else fields)]
    joined_names = b" ".join(names)
    joined_values = b"\x00".join(values)
    size = len(joined_names) + len(joined_values) + 32 * count + extra_size
    if size > limits.max_header_bytes:
        return (
            f"{what} header block of {size:,} bytes exceeds the "
            f"{limits.max_header_bytes:,}-byte limit"
        )
    # Joined by spaces: a space inside a name (not a token character) shows as one
    # separator too many, which the count catches ("x a" would read as two names).
    if names and (
        not _NAMES_RE.fullmatch(joined_names) or joined_names.count(b" ") != len(names) - 1
    ):
        return f"{what} has an invalid header name (not a lowercase token, or a pseudo-header)"
    if values:
        folded = joined_values.translate(_FOLD)
        if (
            b"\r" in folded
            or b"\x00 " in folded
            or b" \x00" in folded
            or folded[:1] == b" "
            or folded[-1:] == b" "
            or folded.count(b"\x00") != len(values) - 1
        ):
            return f"{what} has a header value with CR, LF, NUL or surrounding whitespace"
    specific = _CONNECTION_SPECIFIC.intersection(names)
    if specific:
        if specific != {b"te"} or what != "request":
            return f"{what} has connection-specific header {sorted(specific)[0].decode()!r}"
        for n, v in fields:
            if n == b"te" and v.lower() != b"trailers":
                return "request has te other than trailers"
    return None


def _join_cookies(fields: list[Any]) -> list[Field]:
    """RFC 9113 section 8.2.3: HTTP/2 may split cookies; join them for HTTP/1.1 backends."""
    cookies = [v for n, v in fields if n == b"cookie"]
    if len(cookies) < 2:
        return fields
    out = [f for f in fields if f[0] != b"cookie"]
    out.append((b"cookie", b"; ".join(cookies)))
    return out


def _outbound(fields: list[Any], headers: Headers, trailers: bool = False) -> None:
    """Append `headers` for HTTP/2: no connection-specific fields or Host (te: trailers
    excepted), and credentials marked never to be indexed by HPACK."""
    for f in headers.fields:
        n = f[0]
        if n in _NOT_SENT and (n != b"te" or trailers or f[1].lower() != b"trailers"):
            continue
        if n in _SECRET:
            fields.append(NeverIndexedHeaderTuple(n, f[1]))
        elif n[:1] == b":":
            raise local_error(f"pseudo-header {n!r} among regular headers")
        else:
            fields.append(f)
