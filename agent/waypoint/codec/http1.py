"""Sans-IO HTTP/1.1: llhttp (via httptools) parses, this module frames and keeps state.

One Http1Connection per transport connection, in the SERVER role (the peer is a client) or
the CLIENT role (the peer is a backend). Bytes go in through `receive_data`, events come
out; the `send_*` methods return the bytes to write. Requests are streams 1, 3, 5, ... so
the proxy core can treat both protocols alike.

Pipelining (server role): a response must be complete before the next request is handed
over. Events of a pipelined request that arrived in the same read as the previous request
are parsed and held; later reads are buffered unparsed while `paused` is true (the shell
should stop reading then). After finishing a response, call `next_events()`.

llhttp runs in strict mode (no dangerous leniencies): bare LF, obs-fold, whitespace before
the colon, invalid characters, Content-Length with Transfer-Encoding, and duplicate
Content-Length are all errors. On top of it this module rejects any Transfer-Encoding
but plain `chunked` (501), HTTP versions other than 1.0 and 1.1 (505), a missing or
repeated Host on HTTP/1.1, and enforces `Limits`.
"""

from __future__ import annotations

import re
from collections import deque
from http import HTTPStatus
from types import SimpleNamespace
from typing import Any, Final

import httptools

from agent.waypoint.codec.config import DEFAULT_LIMITS, Limits, Role
from agent.waypoint.codec.errors import ErrorCode, ProtocolError, local_error
from agent.waypoint.codec.events import (
    ConnectionClosed,
    Data,
    Event,
    RequestHead,
    ResponseHead,
    StreamReset,
    Trailers,
)
from agent.waypoint.codec.headers import Field, Headers

# Body framing of one direction of one exchange.
_NONE: Final = 0  # no body at all (HEAD response, 204, 304, or a request without one)
_LENGTH: Final = 1  # Content-Length
_CHUNKED: Final = 2  # Transfer-Encoding: chunked
_UNTIL_CLOSE: Final = 3  # delimited by closing the connection (HTTP/1.0 peers)

_NEVER: Final = 1 << 62  # a stream id larger than any real one

_STATUS_LINES: Final = {
    s.value: b"HTTP/1.1 %d %s\r\n" % (s.value, s.phrase.encode()) for s in HTTPStatus
}
# Fields the serializer owns: framing and connection management.
_FRAMING: Final = frozenset({b"content-length", b"transfer-encoding", b"connection", b"keep-alive"})
_FRAMING_HOST: Final = _FRAMING | {b"host"}  # a request head's: Host goes with the request line
_BODY_METHODS: Final = frozenset({"POST", "PUT", "PATCH"})
# Host / :authority: reg-name, IPv4 or [IPv6], optional port (RFC 3986 section 3.2.2).
HOST_RE: Final = re.compile(
    rb"[A-Za-z0-9._~!$&'()*+,;=%-]*(?::[0-9]*)?|\[[0-9A-Fa-f:.]+\](?::[0-9]*)?"
)
# What may go on a request line: no whitespace, controls or DEL (no request splitting).
_TOKEN_RE: Final = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_TARGET_RE: Final = re.compile(r"[\x21-\x7e\x80-\xff]+")
# An upgrade offer (RFC 9110 section 7.8; h2c's HTTP2-Settings, RFC 7540 section 3.2.1):
# the fields, and the Connection tokens naming them, that a declined upgrade leaves out.
_UPGRADE_OFFER: Final = frozenset({b"upgrade", b"http2-settings"})


class _Exchange:
    """One request and its response."""

    __slots__ = (
        "discard",
        "http10",
        "keep_alive",
        "method",
        "remaining",
        "request_done",
        "response_done",
        "response_final",
        "send_framing",
        "sid",
    )

    def __init__(self, sid: int, method: str = "") -> None:
        self.sid = sid
        self.method = method
        self.http10 = False
        self.keep_alive = True
        self.request_done = False
        self.response_final = False  # a final (non-1xx) response head was sent or received
        self.response_done = False
        self.send_framing = _NONE
        self.remaining = 0  # Content-Length bytes still to send
        self.discard = False  # answered early: drop the rest of the request body


class Http1Connection:
    """One HTTP/1.1 connection; see the module docstring."""

    def __init__(
        self, role: Role, limits: Limits = DEFAULT_LIMITS, *, scheme: str = "http"
    ) -> None:
        self.role = role
        self.limits = limits
        self._server = role is Role.SERVER
        self._scheme = scheme
        self._callbacks = SimpleNamespace(
            on_message_begin=self._on_message_begin,
            on_url=self._on_url,
            on_status=self._on_status,
            on_header=self._on_header,
            on_headers_complete=self._on_headers_complete,
            on_body=self._on_body,
            on_message_complete=self._on_message_complete,
        )
        self._parser: Any = self._new_parser()
        self._exchanges: deque[_Exchange] = deque()  # responses not yet complete, in order
        self._reading: _Exchange | None = None  # the exchange whose message is being parsed
        self._next_sid = 1
        # The connection may carry further requests after the current ones: for the shell
        # to read, and only the codec to set.
        self.keep_alive = True
        self._stopped = False  # no more bytes will be parsed (closing, error or EOF)
        self._stop_requested = False
        self._eof = False
        self._pending_eof = False
        self._out: list[Any] = []
        self._held: list[Any] = []  # events of pipelined requests, in stream order
        self._pending = bytearray()  # bytes read while paused, unparsed
        self._deferred: ProtocolError | None = None
        self._cb_error: ProtocolError | None = None
        # server role, a request carrying Upgrade and a body: its framing (see _resume_body)
        self._upgrade_body: bytes | None = None
        self._synthetic = False  # the parser is reading the head _resume_body made up
        # per-message parse state
        self._in_head = False
        self._head_new = False
        self._head_size = 0
        self._head_raw = 0
        self._url = b""
        self._fields: list[Field] = []
        self._trailers: list[Field] | None = None
        self._body_expected = False
        self._reading_framing = _NONE
        self._informational = False
        # client role: responses to HEAD are fed to llhttp one head at a time (see _feed)
        self._head_only = False
        self._head_buf = b""
        self._head_done = False

    # ------------------------------------------------------------------ state for the shell

    @property
    def idle(self) -> bool:
        """No exchange is in flight (client role: a pool may reuse it if `keep_alive`)."""
        return not self._exchanges and self._reading is None

    @property
    def should_close(self) -> bool:
        """Close the transport once the bytes returned so far are written."""
        return not self.keep_alive and not self._exchanges

    @property
    def paused(self) -> bool:
        """Server role: a complete request awaits its response; bytes read now are only
        buffered, so the shell should stop reading until `next_events()` is called."""
        ex = self._exchanges
        if not self._server or not ex:
            return False
        return len(ex) > 1 or ex[0].request_done

    @property
    def reading_head(self) -> bool:
        """Part of a message head has arrived but not all of it: the window a slowloris
        client holds open. The shell times this (e.g. 10 s) and answers 408."""
        return self._in_head and not self._stopped

    def next_stream_id(self) -> int:
        """Client role: the stream id the next send_request_head must use."""
        return self._next_sid

    def send_window(self, stream_id: int) -> int:
        """HTTP/1.1 has no flow control of its own: backpressure is the transport's (pause
        reading while the other side's writes are paused)."""
        return _NEVER

    def consumed(self, stream_id: int, n: int) -> bytes:
        """HTTP/1.1 has no window to reopen; here for symmetry with Http2Connection."""
        return b""

    def data_to_send(self) -> bytes:
        """HTTP/1.1 never writes as a side effect of reading."""
        return b""

    # ------------------------------------------------------------------------ receiving

    def receive_data(self, data: bytes) -> list[Event]:
        """Feed bytes read from the transport (b"" at EOF); return the events they complete.

        Raises ProtocolError when the peer broke HTTP/1.1; its `status` is the answer to
        send (see error_response). Events of complete earlier requests are never lost: an
        error in a pipelined request is raised by the `next_events()` that reaches it.
        """
        if self._deferred is not None and not self._server:
            raise self._deferred
        if self._eof or self._pending_eof:
            return []
        out: list[Event] = []
        self._out = out
        if not data:
            if self.paused:
                self._pending_eof = True  # handled when the pipeline drains
            else:
                self._receive_eof()
            return out
        if self._stopped:
            return out
        if self._server and self.paused:  # (a client-role connection never pauses)
            self._pending += data
            return out
        self._feed(data)
        return out

    def next_events(self) -> list[Event]:
        """Server role: after a response is complete, the events of the next pipelined
        request (held or buffered while paused). Raises a deferred ProtocolError when the
        next request was malformed."""
        out: list[Event] = []
        self._out = out
        held = self._held
        while held and not self._held_blocked(held[0].stream_id):
            out.append(held.pop(0))
        deferred = self._deferred
        if deferred is not None and not self._held_blocked(deferred.stream_id):
            self._deferred = None
            raise deferred
        if not self.paused:
            if self._pending and not self._stopped:
                data = bytes(self._pending)
                self._pending.clear()
                self._feed(data)
            if self._pending_eof and not self.paused:
                self._pending_eof = False
                self._receive_eof()
        return out

    def _held_blocked(self, sid: int) -> bool:
        ex = self._exchanges
        return bool(ex) and sid > ex[0].sid

    def _sink(self, sid: int) -> list[Any]:
        """Where the events of stream `sid` go: `_held` for a pipelined request behind the
        one being answered (server role), else `_out`."""
        return self._held if self._server and self._held_blocked(sid) else self._out

    def _new_parser(self) -> httptools.HttpRequestParser | httptools.HttpResponseParser:
        cls = httptools.HttpRequestParser if self._server else httptools.HttpResponseParser
        parser = cls(self._callbacks)
        # Strict parsing is the default in llhttp 9; set it anyway so a future default
        # cannot reopen request smuggling (bare LF, obs-fold, CL with TE, ...).
        parser.set_dangerous_leniencies(
            lenient_headers=False,
            lenient_chunked_length=False,
            lenient_keep_alive=False,
            lenient_transfer_encoding=False,
            lenient_version=False,
            lenient_data_after_close=False,
            lenient_optional_lf_after_cr=False,
            lenient_optional_cr_before_lf=False,
            lenient_optional_crlf_after_chunk=False,
            lenient_spaces_after_chunk_size=False,
        )
        return parser

    def _feed(self, data: bytes) -> None:
        try:
            if self._head_only:
                self._feed_heads(data)
            else:
                self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            # llhttp stops after a request carrying Upgrade. weft does not switch
            # protocols (the offer was dropped from the head), so parse on as HTTP/1.1,
            # starting with the request's own body if it has one.
            rest = data[upgrade.args[0] :]
            if self._upgrade_body is not None:
                self._resume_body()
            if rest:
                self._feed(rest)
            return
        except httptools.HttpParserError as exc:
            # httptools re-raises what a callback raised as its own callback error.
            if self._stop_requested or (
                self._cb_error is None and not self.keep_alive and self._reading is None
            ):
                # Bytes after a message that closes the connection (llhttp: "Data after
                # Connection: close"): RFC 9112 section 9.6 says to ignore them.
                self._stopped = True
                return
            err = self._cb_error or self._parser_error(exc)
            self._cb_error = None
            self._fail(err)
            return  # deferred: it concerns a pipelined message
        if self._in_head:
            if self._head_new:
                self._head_new = False  # callbacks counted this read's part of the head
            else:
                # Every byte of a read that neither began nor finished the head is head:
                # the only bound on a field that arrives a few bytes at a time.
                self._head_raw += len(data)
                if self._head_raw > self.limits.max_header_bytes:
                    self._fail(self._too_large(self._head_raw))

    def _resume_body(self) -> None:
        """Parse the body of a request that offered an upgrade (curl --http2 -X POST).

        httptools tells llhttp to skip the body of any request carrying Upgrade, so llhttp
        ends the request at its head and would take the body for the next request (the
        request was cut short and its body misread as garbage: a backend then waited for
        a body that never came). A fresh parser is given a made-up head with the same
        framing, which the callbacks ignore, and then parses the body with all of its
        checks (chunk syntax, trailers) as the body of the request being read."""
        framing = self._upgrade_body
        self._upgrade_body = None
        self._parser = self._new_parser()
        self._synthetic = True
        self._parser.feed_data(b"PUT / HTTP/1.1\r\n%s\r\n\r\n" % framing)

    def _feed_heads(self, data: bytes) -> None:
        """Client role, awaiting a response to HEAD: llhttp cannot be told that such a
        response has no body (httptools does not expose it), so feed it one head at a
        time, then start a fresh parser for whatever follows."""
        buf = self._head_buf + data
        while self._head_only:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > self.limits.max_header_bytes:
                    self._fail(self._too_large(len(buf)))
                self._head_buf = buf
                return
            self._parser.feed_data(buf[: end + 4])
            buf = buf[end + 4 :]
            if self._head_done:
                self._head_done = False
                self._head_only = False
                self._parser = self._new_parser()
        self._head_buf = b""
        if buf:
            self._parser.feed_data(buf)

    def _receive_eof(self) -> None:
        self._eof = True
        self._stopped = True
        self.keep_alive = False
        out = self._out
        if self._server:
            ex = self._reading
            if ex is not None and not ex.request_done and not self._in_head and not ex.discard:
                out.append(
                    StreamReset(
                        ex.sid, ErrorCode.CANCEL, True, "client closed the connection mid-request"
                    )
                )
                if ex in self._exchanges:
                    self._exchanges.remove(ex)
        elif self._exchanges:
            ex = self._exchanges[0]
            if (
                ex.response_final
                and not self._in_head
                and self._body_expected
                and self._reading_framing == _UNTIL_CLOSE
            ):
                _end_stream(self._out, ex.sid)
                self._response_received(ex)
            else:
                self._exchanges.popleft()
                out.append(
                    StreamReset(
                        ex.sid,
                        ErrorCode.CANCEL,
                        True,
                        "backend closed the connection before the response was complete",
                    )
                )
        out.append(ConnectionClosed())

    # ------------------------------------------------------------------ parser callbacks

    def _on_message_begin(self) -> None:
        if self._synthetic:  # the head _resume_body made up: no message of its own
            self._in_head = True
            self._fields = []
            self._url = b""
            self._head_size = 0
            return
        # (The target is a request's and the 1xx flag a response's: each is reset in its
        # role's branch.)
        if self._server:
            if not self.keep_alive:
                # RFC 9112 section 9.6: nothing after a request that asked to close.
                self._stop_requested = True
                raise ConnectionAbortedError("stop")
            ex = _Exchange(self._next_sid)
            self._next_sid += 2
            self._exchanges.append(ex)
            self._url = b""
        else:
            if not self._exchanges:
                raise self._error("backend sent a response with no request outstanding", 502)
            ex = self._exchanges[0]
            self._informational = False
        self._reading = ex
        self._in_head = True
        self._head_new = True
        self._head_size = 0
        self._head_raw = 0
        self._fields = []
        self._trailers = None

    def _on_url(self, piece: bytes) -> None:
        url = self._url = self._url + piece
        if len(url) > self.limits.max_target_bytes:
            raise self._error(
                f"request target of at least {len(url):,} bytes exceeds the "
                f"{self.limits.max_target_bytes:,}-byte limit",
                414,
            )
        self._head_size += len(piece)

    def _on_status(self, piece: bytes) -> None:
        self._head_size += len(piece)

    def _on_header(self, name: bytes, value: bytes) -> None:
        # (Written so that a head field, the usual case, jumps nowhere: a bytecode fewer.)
        fields = self._fields
        if not self._in_head:  # a trailer field of a chunked body
            if self._trailers is None:
                self._trailers = []
                self._head_size = 0
            fields = self._trailers
        # llhttp strips leading whitespace of a value but keeps trailing whitespace.
        fields.append((name.lower(), value.rstrip(b" \t")))
        size = self._head_size = self._head_size + len(name) + len(value) + 4
        if size > self.limits.max_header_bytes:
            raise self._too_large(size)
        if len(fields) > self.limits.max_header_count:
            what = "request" if self._server else "response"
            if fields is self._trailers:
                what += " trailer"
            raise self._error(
                f"{what} has more than {self.limits.max_header_count} header fields", 431
            )

    def _on_headers_complete(self) -> None:
        self._in_head = False
        if self._synthetic:
            self._synthetic = False
            return
        parser = self._parser
        ex = self._reading
        assert ex is not None
        version = parser.get_http_version()
        if version not in {"1.1", "1.0"}:
            raise self._error(f"HTTP/{version} is not supported (HTTP/1.0 and 1.1 are)", 505)
        fields = self._fields
        te = cl = host = None
        hosts = 0
        for n, v in fields:
            if n == b"content-length":
                cl = v
            elif n == b"transfer-encoding":
                # Field lines of one name are one comma-separated list (RFC 9110 5.3):
                # "gzip" then "chunked" is "gzip, chunked", refused below like the one line.
                te = v if te is None else te + b", " + v
            elif n == b"host":
                host = v
                hosts += 1
        if te is not None and te.lower() != b"chunked":
            raise self._error(
                f"Transfer-Encoding {te.decode('latin-1')!r} is not supported (only chunked)", 501
            )
        keep = parser.should_keep_alive()
        headers = Headers(fields)  # the parsed list, adopted
        if self._server:
            self._request_head(ex, version, headers, te is not None, cl, host, hosts, keep)
        else:
            self._response_head(ex, headers, te is not None, cl, keep)

    def _request_head(
        self,
        ex: _Exchange,
        version: str,
        headers: Headers,
        chunked: bool,
        cl: bytes | None,
        host: bytes | None,
        hosts: int,
        keep: bool,
    ) -> None:
        parser = self._parser
        method = parser.get_method().decode("ascii")
        if method == "CONNECT":
            # A tunnel request: what follows the head would be raw bytes, not HTTP, so the
            # connection closes after the answer.
            raise self._error(
                "CONNECT is not allowed: the waypoint forwards HTTP requests, not tunnels", 405
            )
        url = self._url
        scheme = self._scheme
        if url[:1] == b"/" or (url == b"*" and method == "OPTIONS"):
            target = url.decode("latin-1")
            authority = host
        elif url[:7].lower() == b"http://" or url[:8].lower() == b"https://":
            # absolute form, as sent to a forward proxy; its authority wins over Host
            # Untyped on purpose: httptools' stub says bytes and int, but a part the URL
            # lacks (port, path, query, even host) is None, which compiled code refuses.
            try:
                parsed: Any = httptools.parse_url(url)
            except httptools.HttpParserInvalidURLError:
                parsed = None
            host_part: bytes | None = parsed and parsed.host
            if not host_part:
                raise self._error(f"request target {url[:64]!r} is not a URL with a host", 400)
            if b":" in host_part:  # an IPv6 literal: llhttp hands it over without brackets
                host_part = b"[" + host_part + b"]"
            scheme = parsed.schema.decode("ascii").lower()
            authority = host_part + (b":%d" % parsed.port if parsed.port is not None else b"")
            target = (parsed.path or b"/").decode("latin-1")
            if parsed.query:
                target += "?" + parsed.query.decode("latin-1")
        else:
            raise self._error(f"request target {url[:64]!r} is not origin or absolute form", 400)
        if version == "1.1" and hosts != 1:
            raise self._error(
                "HTTP/1.1 request without a Host header"
                if hosts == 0
                else f"request has {hosts} Host headers",
                400,
            )
        if authority is None:
            authority = b""
        elif not HOST_RE.fullmatch(authority):
            raise self._error(f"invalid Host {authority[:64]!r}", 400)
        ex.method = method
        ex.http10 = version == "1.0"
        ex.keep_alive = keep
        if not keep:
            self.keep_alive = False
        body = self._body_expected = chunked or (cl is not None and cl != b"0")
        if parser.should_upgrade():
            # RFC 9110 section 7.8 lets a server ignore Upgrade (and RFC 9113 section 3.1
            # deprecates h2c's): answer over HTTP/1.1, and drop the offer so that no
            # Upgrade or HTTP2-Settings reaches a backend.
            _decline_upgrade(headers)
            if body:
                self._upgrade_body = (
                    b"transfer-encoding: chunked" if chunked else b"content-length: %s" % cl
                )
        self._sink(ex.sid).append(
            RequestHead(
                ex.sid, method, target, authority.decode("latin-1"), scheme, headers, not body
            )
        )

    def _response_head(
        self, ex: _Exchange, headers: Headers, chunked: bool, cl: bytes | None, keep: bool
    ) -> None:
        status = self._parser.get_status_code()
        if not 100 <= status <= 599:
            # RFC 9110 15: codes are 100-599. A 0xx read as informational would leave the
            # caller waiting for a final answer; 6xx-9xx cannot be relayed over HTTP/2.
            raise self._error(f"backend sent an invalid status {status}", 502)
        if status < 200:
            if status == 101:
                raise self._error("backend switched protocols (101); weft does not", 502)
            self._informational = True
            self._body_expected = False
            self._out.append(ResponseHead(ex.sid, status, headers, False))
            return
        ex.response_final = True
        no_body = ex.method == "HEAD" or status in {204, 304}
        body = not no_body and (chunked or cl != b"0")
        self._body_expected = body
        self._reading_framing = _CHUNKED if chunked else _LENGTH if cl is not None else _UNTIL_CLOSE
        if not keep:
            self.keep_alive = False
            ex.keep_alive = False
        self._out.append(ResponseHead(ex.sid, status, headers, not body))
        if self._head_only:
            self._head_done = True
            self._response_received(ex)

    def _on_body(self, piece: bytes) -> None:
        ex = self._reading
        assert ex is not None
        if not ex.discard:
            self._sink(ex.sid).append(Data(ex.sid, piece, False))

    def _on_message_complete(self) -> None:
        ex = self._reading
        assert ex is not None
        if self._informational:
            self._informational = False
            return
        if self._upgrade_body is not None:
            return  # llhttp's early end of a request offering an upgrade (see _resume_body)
        if self._body_expected and not ex.discard:
            sid = ex.sid
            sink = self._sink(sid)
            if self._trailers:
                sink.append(Trailers(sid, Headers(self._trailers)))
            else:
                _end_stream(sink, sid)
        if self._server:
            ex.request_done = True
            self._reading = None
        else:
            self._response_received(ex)

    def _response_received(self, ex: _Exchange) -> None:
        """Client role: the response to `ex` is complete."""
        if self._exchanges and self._exchanges[0] is ex:
            self._exchanges.popleft()
        ex.response_done = True
        self._reading = None
        if not ex.request_done:
            # answered before we finished sending: the rest of the body is dropped, and the
            # connection cannot be reused (the backend may not have read it).
            self.keep_alive = False

    # ---------------------------------------------------------------------------- errors

    def _error(self, message: str, status: int) -> ProtocolError:
        """A remote error in the message being parsed (raised inside llhttp callbacks, so
        also kept to re-raise it as itself rather than as llhttp's wrapper)."""
        sid = self._reading.sid if self._reading is not None else self._next_sid
        if not self._server:
            status = 502
        err = ProtocolError(message, status=status, stream_id=sid)
        self._cb_error = err
        return err

    def _too_large(self, size: int) -> ProtocolError:
        what = "request" if self._server else "response"
        if not self._in_head and self._trailers is not None:
            what += " trailer"
        else:
            what += " header"
        return self._error(
            f"{what} block exceeds the {self.limits.max_header_bytes:,}-byte limit "
            f"(at least {size:,} bytes)",
            431,
        )

    def _parser_error(self, exc: httptools.HttpParserError) -> ProtocolError:
        reason = str(exc)
        status = 400
        if "Transfer-Encoding" in reason and "Content-Length" not in reason:
            status = 501
        elif "HTTP version" in reason:
            status = 505
        what = "request" if self._server else "response"
        if self._reading is not None:
            what += f" on stream {self._reading.sid}"
        return self._error(f"malformed {what}: {reason}", status)

    def _fail(self, err: ProtocolError) -> None:
        """The peer broke the protocol: stop parsing; raise now, or when the stream it
        concerns comes up (a pipelined request behind a response still in flight, or
        bytes after a complete response from a backend)."""
        self._stopped = True
        self.keep_alive = False
        self._pending.clear()
        if self._server:
            if self._held_blocked(err.stream_id):
                self._deferred = err
                return
        elif not self._exchanges:
            self._deferred = err
            return
        raise err

    def error_response(self, error: ProtocolError) -> bytes:
        """Server role: the bytes of a `error.status` response (closing the connection)
        explaining `error`, or b"" when a response is already under way."""
        self.keep_alive = False
        if not self._server or any(
            e.response_final for e in self._exchanges if e.sid <= error.stream_id
        ):
            return b""
        self.keep_alive = False
        self._exchanges.clear()
        body = (error.message + "\n").encode()
        return b"".join(
            (
                _status_line(error.status),
                b"content-type: text/plain; charset=utf-8\r\ncontent-length: %d\r\n"
                b"connection: close\r\n\r\n" % len(body),
                body,
            )
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
        """Client role: serialize a request head. Framing: Content-Length when `headers`
        has one, none when `end_stream`, else chunked. `scheme` is implied by the
        transport on HTTP/1.1 and not written."""
        if self._server:
            raise local_error("send_request_head on a server-role connection", stream_id)
        if self._exchanges or not self.keep_alive or self._stopped:
            raise local_error(
                "HTTP/1.1 connection is busy or closing; check idle and keep_alive first",
                stream_id,
            )
        if stream_id != self._next_sid:
            raise local_error(f"next stream id is {self._next_sid}, not {stream_id}", stream_id)
        if not _TOKEN_RE.fullmatch(method) or not _TARGET_RE.fullmatch(target):
            raise local_error(f"invalid request line {method!r} {target[:64]!r}", stream_id)
        if method == "CONNECT":
            raise local_error("CONNECT over HTTP/1.1 is not supported", stream_id)
        try:
            host = authority.encode("latin-1")
        except UnicodeEncodeError:
            host = b"\n"
        if not HOST_RE.fullmatch(host):
            raise local_error(f"invalid authority {authority[:64]!r}", stream_id)
        self._next_sid += 2
        ex = _Exchange(stream_id, method)
        parts = [
            b"%s %s HTTP/1.1\r\nhost: %s\r\n"
            % (method.encode("ascii"), target.encode("latin-1"), host)
        ]
        cl, close = _fields(parts, headers, skip_host=True)
        if cl is not None:
            ex.send_framing = _LENGTH
            ex.remaining = int(cl) if cl.isdigit() else _content_length(cl, stream_id)
            parts.append(b"content-length: %s\r\n" % cl)
        elif end_stream:
            if method in _BODY_METHODS:
                parts.append(b"content-length: 0\r\n")
        else:
            ex.send_framing = _CHUNKED
            parts.append(b"transfer-encoding: chunked\r\n")
        if close:
            self.keep_alive = False
            parts.append(b"connection: close\r\n")
        parts.append(b"\r\n")
        head = b"".join(parts)
        _check_lines(head, len(parts) + 1, stream_id)  # the first part holds two lines
        self._exchanges.append(ex)
        if method == "HEAD":
            self._head_only = True
        if end_stream:
            ex.request_done = True
        return head

    def send_response_head(
        self, stream_id: int, status: int, headers: Headers, end_stream: bool = False
    ) -> bytes:
        """Server role: serialize a response head (1xx heads may precede the final one).
        Framing: none for HEAD/204/304, Content-Length when `headers` has one or when
        `end_stream` (0), else chunked, or close-delimited for HTTP/1.0 clients."""
        ex = self._current(stream_id)
        if ex.response_final:
            raise local_error(f"stream {stream_id} already has a response", stream_id)
        if status < 200:
            if status == 101 or end_stream:
                raise local_error(f"cannot send {status} as an interim response", stream_id)
            if ex.http10:
                return b""  # RFC 9110 section 15.2: no 1xx to HTTP/1.0 clients
            parts = [_status_line(status)]
            _fields(parts, headers)
            parts.append(b"\r\n")
            head = b"".join(parts)
            _check_lines(head, len(parts), stream_id)
            return head
        ex.response_final = True
        parts = [_STATUS_LINES.get(status) or _status_line(status)]
        cl, close = _fields(parts, headers)
        if ex.method == "HEAD" or status == 304:
            if cl is not None:  # describes the body a GET would get
                parts.append(b"content-length: %s\r\n" % cl)
        elif status == 204:
            pass  # RFC 9110 section 8.6: no Content-Length in a 204
        elif cl is not None:
            ex.send_framing = _LENGTH
            ex.remaining = int(cl) if cl.isdigit() else _content_length(cl, stream_id)
            parts.append(b"content-length: %s\r\n" % cl)
        elif end_stream:
            ex.send_framing = _LENGTH
            parts.append(b"content-length: 0\r\n")
        elif not ex.http10:
            ex.send_framing = _CHUNKED
            parts.append(b"transfer-encoding: chunked\r\n")
        else:
            ex.send_framing = _UNTIL_CLOSE
            close = True
        if close or not ex.keep_alive or not self.keep_alive:
            self.keep_alive = False
            parts.append(b"connection: close\r\n")
        elif ex.http10:
            parts.append(b"connection: keep-alive\r\n")
        parts.append(b"\r\n")
        head = b"".join(parts)
        _check_lines(head, len(parts), stream_id)
        if end_stream:
            self._response_sent(ex)
        return head

    def send_data(
        self, stream_id: int, data: bytes | memoryview, end_stream: bool = False
    ) -> bytes:
        """Frame body bytes for the wire (chunked, Content-Length or close-delimited)."""
        ex = self._sending(stream_id)
        if ex is None:
            return b""
        framing = ex.send_framing
        n = len(data)
        if framing == _CHUNKED:
            if n:
                out = b"".join((b"%x\r\n" % n, data, b"\r\n0\r\n\r\n" if end_stream else b"\r\n"))
            else:
                out = b"0\r\n\r\n" if end_stream else b""
        elif framing == _LENGTH:
            left = ex.remaining = ex.remaining - n
            if left < 0 or (end_stream and left):
                raise local_error(
                    f"body of stream {stream_id} does not match its Content-Length "
                    f"({-left:,} bytes too many)"
                    if left < 0
                    else f"body of stream {stream_id} ended {left:,} bytes short of its "
                    "Content-Length",
                    stream_id,
                )
            out = data if type(data) is bytes else bytes(data)
        elif framing == _UNTIL_CLOSE:
            out = data if type(data) is bytes else bytes(data)
        else:
            if n:
                raise local_error(f"stream {stream_id} has no body to send", stream_id)
            out = b""
        if end_stream:
            self._sent_end(ex)
        return out

    def send_trailers(self, stream_id: int, headers: Headers) -> bytes:
        """End the body with trailer fields. Only chunked framing can carry them: with
        any other framing they are dropped and the body simply ends."""
        ex = self._sending(stream_id)
        if ex is None:
            return b""
        if ex.send_framing != _CHUNKED:
            return self.send_data(stream_id, b"", True)
        parts = [b"0\r\n"]
        _fields(parts, headers)
        parts.append(b"\r\n")
        out = b"".join(parts)
        _check_lines(out, len(parts), stream_id)
        self._sent_end(ex)
        return out

    def reset_stream(self, stream_id: int, error_code: int = ErrorCode.CANCEL) -> bytes:
        """HTTP/1.1 cannot reset one exchange: the connection must close (should_close)."""
        self.keep_alive = False
        self._stopped = True
        self._exchanges.clear()
        return b""

    def close(self, error_code: int = ErrorCode.NO_ERROR) -> bytes:
        """Stop taking new requests; close once the current ones are done."""
        self.keep_alive = False
        return b""

    def _current(self, stream_id: int) -> _Exchange:
        if not self._server:
            raise local_error("send_response_head on a client-role connection", stream_id)
        if not self._exchanges or self._exchanges[0].sid != stream_id:
            raise local_error(
                f"stream {stream_id} is not the request being answered (HTTP/1.1 answers in order)",
                stream_id,
            )
        return self._exchanges[0]

    def _sending(self, stream_id: int) -> _Exchange | None:
        if self._server:
            ex = self._current(stream_id)
            if not ex.response_final:
                raise local_error(f"stream {stream_id} has no response head yet", stream_id)
            return ex
        for ex in self._exchanges:
            if ex.sid == stream_id:
                if ex.request_done:
                    raise local_error(f"request on stream {stream_id} already ended", stream_id)
                return ex
        return None  # answered already (early response): the rest is dropped

    def _sent_end(self, ex: _Exchange) -> None:
        """The last bytes of our side of `ex` were serialized."""
        if self._server:
            self._response_sent(ex)
        else:
            ex.request_done = True

    def _response_sent(self, ex: _Exchange) -> None:
        """Server role: the response to `ex` is complete."""
        ex.response_done = True
        self._exchanges.popleft()
        if ex.send_framing == _UNTIL_CLOSE:
            self.keep_alive = False
        if not ex.request_done:
            # answered before the request body arrived: drop the rest of it and close
            # afterwards (reading it to the end could take forever).
            ex.discard = True
            self.keep_alive = False


def _status_line(status: int) -> bytes:
    line = _STATUS_LINES.get(status)
    if line is None:
        if not 100 <= status <= 999:
            raise local_error(f"invalid status {status}")
        line = b"HTTP/1.1 %d \r\n" % status
    return line


def _fields(
    parts: list[bytes], headers: Headers, skip_host: bool = False
) -> tuple[bytes | None, bool]:
    """Append `headers` as field lines, leaving out the ones the serializer writes itself;
    return the Content-Length given (if any) and whether Connection asked to close."""
    cl: bytes | None = None
    close = False
    # Host is left out with the framing fields (one set test per field, not two).
    owned = _FRAMING_HOST if skip_host else _FRAMING
    for n, v in headers.fields:
        if n in owned:
            if n == b"content-length":
                if cl is not None and cl != v:
                    raise local_error(f"conflicting Content-Length {cl!r} and {v!r}")
                cl = v
            elif n == b"connection" and b"close" in v.lower():
                close = True
            continue
        parts.append(b"%s: %s\r\n" % (n, v))
    return cl, close


def _decline_upgrade(headers: Headers) -> None:
    """Drop an upgrade offer from a request head in place: Upgrade, HTTP2-Settings, and
    their tokens in Connection (the field goes if nothing else is left in it)."""
    out: list[Field] = []
    for n, v in headers.fields:
        if n in _UPGRADE_OFFER:
            continue
        if n == b"connection":
            tokens = [t.strip() for t in v.split(b",")]
            kept = [t for t in tokens if t and t.lower() not in _UPGRADE_OFFER]
            if kept:
                out.append((n, b", ".join(kept) if len(kept) != len(tokens) else v))
            continue
        out.append((n, v))
    headers.fields = out


def _end_stream(sink: list[Any], sid: int) -> None:
    """End stream `sid` in `sink`: on the Data event last added, if it is the stream's."""
    if sink:
        last = sink[-1]
        if type(last) is Data and last.stream_id == sid:
            sink[-1] = Data(sid, last.data, True)
            return
    sink.append(Data(sid, b"", True))


def _content_length(value: bytes, stream_id: int) -> int:
    if not value.isdigit():
        raise local_error(f"invalid Content-Length {value!r}", stream_id)
    return int(value)


def _check_lines(block: bytes, lines: int, stream_id: int) -> None:
    """Every CR and LF in a serialized head must be a line end we wrote: a field value with
    its own would split the message (response splitting, request smuggling)."""
    if block.count(b"\n") != lines or block.count(b"\r") != lines:
        raise local_error(f"a header value for stream {stream_id} contains CR or LF", stream_id)
