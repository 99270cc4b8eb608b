"""The waypoint's sans-IO HTTP/2 codec (h2c, gRPC): h2 underneath, weft's events on top."""

from __future__ import annotations

import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection
from hyperframe.frame import DataFrame

from agent.waypoint.codec import (
    H2_PREFACE,
    ConnectionClosed,
    Data,
    ErrorCode,
    GoAway,
    Headers,
    Limits,
    ProtocolError,
    RequestHead,
    ResponseHead,
    Role,
    StreamReset,
    Trailers,
    WindowUpdated,
    detect_protocol,
)
from agent.waypoint.codec.http2 import Http2Connection

GRPC = Headers.of(("content-type", "application/grpc"), ("te", "trailers"))


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def pair(server_limits: Limits | None = None, client_limits: Limits | None = None, clock=None):
    """A server-role and a client-role connection, past the preface and SETTINGS."""
    srv = Http2Connection(Role.SERVER, server_limits or Limits(), clock=clock or Clock())
    cli = Http2Connection(Role.CLIENT, client_limits or Limits())
    srv.receive_data(cli.data_to_send())
    cli.receive_data(srv.data_to_send())
    srv.receive_data(cli.data_to_send())
    return srv, cli


def raw_peer(srv: Http2Connection, handshake: bool = True) -> H2Connection:
    """A bare h2 client that sends whatever it is told: the misbehaving peer (without
    the handshake it has not heard the server's limits either)."""
    raw = H2Connection(
        H2Configuration(
            client_side=True,
            header_encoding=None,
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
        )
    )
    raw.initiate_connection()
    srv.receive_data(raw.data_to_send())
    if not handshake:
        return raw
    raw.receive_data(srv.data_to_send())
    srv.receive_data(raw.data_to_send())
    return raw


def request(cli: Http2Connection, end_stream: bool = False) -> tuple[int, bytes]:
    """Open a gRPC-style stream; return its id and the bytes to deliver."""
    sid = cli.next_stream_id()
    return sid, cli.send_request_head(
        sid, "POST", "/v1/chat", "llm:8000", "http", GRPC.copy(), end_stream
    )


REQ = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"llm"), (b":path", b"/")]


# ---------------------------------------------------------------------------- detection


@pytest.mark.parametrize(
    ("first", "verdict"),
    [
        (H2_PREFACE, "h2"),
        (H2_PREFACE + b"\x00\x00", "h2"),
        (H2_PREFACE[:10], None),
        (b"", None),
        (b"GET / HTTP/1.1\r\n", "http1"),
        (b"PO", "http1"),
        (b"PRI * HTTP/1.1\r\n", "http1"),
    ],
)
def test_detects_h2_prior_knowledge(first, verdict):
    """The 24-byte preface means h2c; anything else is HTTP/1.x; a prefix needs more."""
    assert detect_protocol(first) == verdict


# ------------------------------------------------------------------ requests, responses


def test_request_and_response_round_trip():
    """A request and its response cross intact: pseudo-headers become head fields."""
    srv, cli = pair()
    sid, wire = request(cli)
    events = srv.receive_data(wire + cli.send_data(sid, b"hello", end_stream=True))
    assert events == [
        RequestHead(sid, "POST", "/v1/chat", "llm:8000", "http", GRPC, False),
        Data(sid, b"hello", True),
    ]
    out = srv.send_response_head(sid, 200, Headers.of(("x-a", "1")), end_stream=True)
    assert cli.receive_data(out) == [ResponseHead(sid, 200, Headers.of(("x-a", "1")), True)]
    assert srv.idle and cli.idle


def test_grpc_response_ends_with_trailers():
    """gRPC: te: trailers reaches the server; grpc-status arrives as Trailers."""
    srv, cli = pair()
    sid, wire = request(cli, end_stream=True)
    assert srv.receive_data(wire)[0].headers.get(b"te") == b"trailers"
    out = srv.send_response_head(sid, 200, Headers.of(("content-type", "application/grpc")))
    out += srv.send_data(sid, b"\x00\x00\x00\x00\x02hi")
    out += srv.send_trailers(sid, Headers.of(("grpc-status", "0"), ("grpc-message", "ok")))
    events = cli.receive_data(out)
    assert events[-1] == Trailers(sid, Headers.of(("grpc-status", "0"), ("grpc-message", "ok")))
    assert [type(e) for e in events] == [ResponseHead, Data, Trailers]


def test_interim_response_does_not_end_the_stream():
    """A 100 Continue is an informational head; the final one follows."""
    srv, cli = pair()
    sid, wire = request(cli)
    srv.receive_data(wire)
    (interim,) = cli.receive_data(srv.send_response_head(sid, 100, Headers()))
    assert interim.informational and not interim.end_stream
    (final,) = cli.receive_data(srv.send_response_head(sid, 200, Headers(), end_stream=True))
    assert final.status == 200 and final.end_stream


def test_connection_specific_headers_are_not_sent():
    """Forwarding HTTP/1.1 headers onto HTTP/2 drops hop-by-hop fields and Host."""
    srv, cli = pair()
    sid = cli.next_stream_id()
    hdrs = Headers.of(
        ("host", "llm"), ("connection", "keep-alive"), ("keep-alive", "5"), ("upgrade", "x"),
        ("transfer-encoding", "chunked"), ("te", "trailers"), ("x-model", "llama"),
    )  # fmt: skip
    (head,) = srv.receive_data(cli.send_request_head(sid, "GET", "/", "llm", "http", hdrs, True))
    assert head.headers == Headers.of(("te", "trailers"), ("x-model", "llama"))


def test_split_cookies_are_joined():
    """HTTP/2 may send one cookie per field; they are joined for HTTP/1.1 backends."""
    srv = Http2Connection(Role.SERVER)
    raw = raw_peer(srv)
    raw.send_headers(1, [*REQ, (b"cookie", b"a=1"), (b"cookie", b"b=2")], end_stream=True)
    (head,) = srv.receive_data(raw.data_to_send())
    assert head.headers.get_all(b"cookie") == [b"a=1; b=2"]


# ------------------------------------------------------------------ stream-level errors


def test_rst_stream_is_isolated_to_its_stream():
    """A client resetting one stream does not disturb another."""
    srv, cli = pair()
    (one, wire1), (two, wire2) = request(cli), request(cli)
    srv.receive_data(wire1 + wire2)
    events = srv.receive_data(cli.reset_stream(one) + cli.send_data(two, b"x", end_stream=True))
    assert events == [StreamReset(one, ErrorCode.CANCEL, True), Data(two, b"x", True)]
    assert srv.send_response_head(one, 200, Headers()) == b""  # late answer is dropped
    out = srv.send_response_head(two, 200, Headers(), end_stream=True)
    assert cli.receive_data(out)[0] == ResponseHead(two, 200, Headers(), True)


MALFORMED = {
    "uppercase-name": [*REQ, (b"X-Model", b"a")],
    "space-in-name": [*REQ, (b"x a", b"1")],
    "space-in-smuggled-name": [*REQ, (b"transfer-encoding x", b"chunked")],
    "empty-name": [*REQ, (b"", b"1")],
    "connection-header": [*REQ, (b"connection", b"close")],
    "te-gzip": [*REQ, (b"te", b"gzip")],
    "no-path": REQ[:3],
    "relative-path": [*REQ[:3], (b":path", b"v1")],
    "space-in-path": [*REQ[:3], (b":path", b"/a b")],
    "pseudo-after-regular": [*REQ[:3], (b"x", b"1"), (b":path", b"/")],
    "unknown-pseudo": [*REQ, (b":protocol", b"websocket")],
    "duplicate-pseudo": [*REQ, (b":path", b"/x")],
    "crlf-in-value": [*REQ, (b"x", b"a\r\nb")],
    "nul-in-value": [*REQ, (b"x", b"a\x00b")],
    "padded-value": [*REQ, (b"x", b" a")],
    "authority-host-differ": [*REQ, (b"host", b"other")],
    "no-authority": [REQ[0], REQ[1], REQ[3]],
    "bad-scheme": [REQ[0], (b":scheme", b"ftp"), *REQ[2:]],
}


@pytest.mark.parametrize("fields", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_request_resets_only_its_stream(fields):
    """A malformed request is a stream error (RST_STREAM PROTOCOL_ERROR); the next
    stream on the connection is served."""
    srv = Http2Connection(Role.SERVER)
    raw = raw_peer(srv)
    raw.send_headers(1, fields, end_stream=True)
    raw.send_headers(3, REQ, end_stream=True)
    reset, head = srv.receive_data(raw.data_to_send())
    assert (reset.stream_id, reset.error_code, reset.remote) == (1, ErrorCode.PROTOCOL_ERROR, False)
    assert reset.reason and head.stream_id == 3
    (peer_view,) = [e for e in raw.receive_data(srv.data_to_send()) if hasattr(e, "error_code")]
    assert peer_view.stream_id == 1


def test_body_longer_than_content_length_resets_only_its_stream():
    """Content-Length disagreeing with the body is malformed: that stream alone is reset."""
    srv = Http2Connection(Role.SERVER)
    raw = raw_peer(srv)
    raw.send_headers(1, [*REQ, (b"content-length", b"2")])
    raw.send_headers(3, REQ, end_stream=True)
    raw.send_data(1, b"abc", end_stream=True)
    events = srv.receive_data(raw.data_to_send())
    assert [type(e) for e in events] == [RequestHead, RequestHead, StreamReset]
    assert events[2].stream_id == 1 and "content-length" in events[2].reason.lower()


@pytest.mark.parametrize(
    ("limits", "extra"),
    [
        (Limits(max_header_bytes=1024), [(b"x", b"v" * 1500)]),
        (Limits(max_header_count=10), [(b"x-%d" % i, b"1") for i in range(10)]),
        (Limits(max_target_bytes=64), []),
    ],
    ids=["header-bytes", "header-count", "path"],
)
def test_header_limits_reset_the_stream(limits, extra):
    """Over-limit heads are stream errors on HTTP/2, saying which limit."""
    srv = Http2Connection(Role.SERVER, limits)
    raw = raw_peer(srv)
    fields = [*REQ[:3], (b":path", b"/" + b"a" * 100), *extra]
    raw.send_headers(1, fields, end_stream=True)
    (reset,) = srv.receive_data(raw.data_to_send())
    assert reset.error_code == ErrorCode.PROTOCOL_ERROR and "limit" in reset.reason


# ------------------------------------------------------------------- connection errors


def test_garbage_is_a_connection_error_with_goaway():
    """A broken frame layer raises ProtocolError and queues GOAWAY."""
    srv, cli = pair()
    with pytest.raises(ProtocolError) as info:
        srv.receive_data(b"\x00\x00\x01\x09\x00\x00\x00\x00\x07\x00")  # CONTINUATION alone
    assert info.value.stream_id == 0 and info.value.status == 400
    assert any(isinstance(e, GoAway) for e in cli.receive_data(srv.data_to_send()))
    assert srv.should_close


def test_oversized_frame_is_refused_from_its_header():
    """A frame announced longer than SETTINGS_MAX_FRAME_SIZE is a FRAME_SIZE_ERROR as soon
    as its 9-byte header arrives, not after up to 16 MiB of it were buffered."""
    srv, cli = pair()
    header = (1 << 20).to_bytes(3, "big") + b"\x00\x00\x00\x00\x00\x01"  # DATA, 1 MiB
    with pytest.raises(ProtocolError, match="overlong frame") as info:
        srv.receive_data(header)
    assert info.value.error_code == ErrorCode.FRAME_SIZE_ERROR
    (goaway,) = cli.receive_data(srv.data_to_send())
    assert isinstance(goaway, GoAway) and goaway.error_code == ErrorCode.FRAME_SIZE_ERROR


def test_backend_that_is_not_http2_is_a_connection_error_at_once():
    """A backend answering in HTTP/1.1 (a 400 to the preface, connection left open) is a
    connection error on its first bytes: they read as a 4.7 MB frame, which used to be
    waited for until the backend closed, leaving the request hanging."""
    cli = Http2Connection(Role.CLIENT, Limits())
    cli.data_to_send()
    with pytest.raises(ProtocolError) as info:
        cli.receive_data(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
    assert info.value.status == 502 and info.value.error_code == ErrorCode.FRAME_SIZE_ERROR
    assert not cli.keep_alive and cli.should_close


def test_exceeding_max_concurrent_streams_is_a_connection_error():
    """Opening more streams than advertised is refused by h2 as a connection error."""
    srv = Http2Connection(Role.SERVER, Limits(max_concurrent_streams=2))
    raw = raw_peer(srv, handshake=False)
    for sid in (1, 3, 5):
        raw.send_headers(sid, REQ)
    with pytest.raises(ProtocolError, match="streams"):
        srv.receive_data(raw.data_to_send())


def test_rapid_reset_is_stopped():
    """CVE-2023-44487: a burst of open-then-reset streams beyond the budget ends the
    connection with GOAWAY(ENHANCE_YOUR_CALM)."""
    srv, cli = pair(Limits(reset_burst=10, reset_rate=1.0))
    with pytest.raises(ProtocolError) as info:
        for _ in range(11):
            sid, wire = request(cli)
            srv.receive_data(wire + cli.reset_stream(sid))
    assert info.value.error_code == ErrorCode.ENHANCE_YOUR_CALM
    (goaway,) = cli.receive_data(srv.data_to_send())[:1]
    assert goaway.error_code == ErrorCode.ENHANCE_YOUR_CALM


def test_resets_within_the_refill_rate_are_fine():
    """Cancelling streams at a sustainable rate never trips the reset budget."""
    clock = Clock()
    srv, cli = pair(Limits(reset_burst=10, reset_rate=10.0), clock=clock)
    for _ in range(50):
        clock.now += 0.2
        sid, wire = request(cli)
        assert isinstance(srv.receive_data(wire + cli.reset_stream(sid))[-1], StreamReset)


# ---------------------------------------------------------------------------- GOAWAY


def test_goaway_refuses_streams_above_last_id_and_lets_others_finish():
    """Streams the peer did not take are reset as REFUSED_STREAM (safe to retry); the
    ones it took still complete."""
    srv, cli = pair()
    (one, wire1), (two, wire2) = request(cli, True), request(cli, True)
    srv.receive_data(wire1 + wire2)
    events = cli.receive_data(srv.close(last_stream_id=one))
    assert events == [
        GoAway(one, ErrorCode.NO_ERROR),
        StreamReset(two, ErrorCode.REFUSED_STREAM, True, events[1].reason),
    ]
    assert not cli.keep_alive and cli.available_streams == 0
    out = srv.send_response_head(one, 200, Headers(), end_stream=True)
    assert cli.receive_data(out) == [ResponseHead(one, 200, Headers(), True)]
    assert cli.should_close


def test_after_graceful_goaway_new_streams_are_refused():
    """Draining: a stream opened after our GOAWAY is refused without reaching the core."""
    srv = Http2Connection(Role.SERVER)
    raw = raw_peer(srv)
    srv.close()
    raw.send_headers(1, REQ, end_stream=True)
    assert srv.receive_data(raw.data_to_send()) == []
    (reset,) = [e for e in raw.receive_data(srv.data_to_send()) if hasattr(e, "error_code")]
    assert reset.error_code == ErrorCode.REFUSED_STREAM


def test_eof_resets_open_streams():
    """Losing the transport resets every open stream, then reports the close."""
    srv, cli = pair()
    sid, wire = request(cli)
    srv.receive_data(wire)
    events = srv.receive_data(b"")
    assert events == [
        StreamReset(sid, ErrorCode.CANCEL, True, events[0].reason),
        ConnectionClosed(),
    ]


# ---------------------------------------------------------------------- flow control


def test_send_window_exhaustion_queues_then_window_updated():
    """Data beyond the peer's window is queued and the stream reports a closed window;
    as the peer consumes, the queue drains (then END_STREAM), and WindowUpdated fires
    once the core may send again."""
    srv, cli = pair(client_limits=Limits(stream_window=100))
    sid, wire = request(cli, end_stream=True)
    srv.receive_data(wire)
    out = srv.send_response_head(sid, 200, Headers()) + srv.send_data(sid, b"x" * 250, True)
    assert srv.send_window(sid) == -150
    got = [e for e in cli.receive_data(out) if isinstance(e, Data)]
    assert srv.receive_data(cli.consumed(sid, 100)) == []  # 100 more sent, 50 still queued
    got += cli.receive_data(srv.data_to_send())
    assert srv.receive_data(cli.consumed(sid, 100)) == [WindowUpdated(sid)]
    got += cli.receive_data(srv.data_to_send())
    assert [len(e.data) for e in got] == [100, 100, 50] and got[-1].end_stream


def test_unconsumed_data_holds_the_sender_back():
    """The receive window reopens only when the core says the data was consumed."""
    srv, cli = pair(server_limits=Limits(stream_window=1000))
    sid, wire = request(cli)
    srv.receive_data(wire + cli.send_data(sid, b"x" * 1000))
    assert cli.send_window(sid) == 0
    assert srv.data_to_send() == b""  # nothing consumed, no update
    update = srv.consumed(sid, 1000)
    assert cli.receive_data(update) == [WindowUpdated(sid)]
    assert cli.send_window(sid) == 1000


def test_consumed_never_gives_back_more_than_was_received():
    """Over-acknowledging is clamped, so a confused core cannot inflate windows."""
    srv, cli = pair()
    sid, wire = request(cli)
    srv.receive_data(wire + cli.send_data(sid, b"abc"))
    srv.consumed(sid, 3)
    assert srv.consumed(sid, 10_000) == b""


def test_reset_stream_returns_its_unconsumed_bytes_to_the_connection():
    """Data of a stream that is reset is given back to the connection window."""
    srv, cli = pair(server_limits=Limits(stream_window=65535, connection_window=65535))
    sid, wire = request(cli)
    srv.receive_data(wire + cli.send_data(sid, b"x" * 40000))
    cli.receive_data(srv.reset_stream(sid))
    other, _ = request(cli)
    assert cli.send_window(other) == 65535


# ------------------------------------------------------------------------------ CONNECT


def test_connect_is_a_request_head_that_can_be_refused_on_its_stream():
    """CONNECT (RFC 9113 section 8.5) reaches the core as a RequestHead whose target is the
    authority, so the shell can refuse it: a 405 and RST_STREAM(NO_ERROR) end that stream
    cleanly for the peer, and a stream opened after it is served."""
    srv = Http2Connection(Role.SERVER)
    raw = raw_peer(srv)
    raw.send_headers(1, [(b":method", b"CONNECT"), (b":authority", b"llm:443")])
    raw.send_data(1, b"\x16\x03\x01")
    raw.send_headers(3, REQ, end_stream=True)
    head, data, other = srv.receive_data(raw.data_to_send())
    assert head == RequestHead(1, "CONNECT", "llm:443", "llm:443", "", Headers(), False)
    assert data == Data(1, b"\x16\x03\x01", False) and other.stream_id == 3
    h = Headers.of(("content-type", "text/plain"), ("content-length", "3"))
    out = srv.send_response_head(1, 405, h) + srv.send_data(1, b"no\n", end_stream=True)
    out += srv.reset_stream(1, ErrorCode.NO_ERROR)
    out += srv.send_response_head(3, 200, Headers(), end_stream=True)
    seen = [(type(e).__name__, e.stream_id) for e in raw.receive_data(out) if e.stream_id]
    assert seen == [
        ("ResponseReceived", 1),
        ("DataReceived", 1),
        ("StreamEnded", 1),
        ("StreamReset", 1),
        ("ResponseReceived", 3),
        ("StreamEnded", 3),
    ]
    late = DataFrame(1)  # DATA the peer had in flight when the reset came: dropped
    late.data = b"more"
    assert srv.receive_data(late.serialize()) == []
    assert srv.keep_alive


def test_extended_connect_is_malformed_and_resets_only_its_stream():
    """Extended CONNECT (:protocol, RFC 8441) without SETTINGS_ENABLE_CONNECT_PROTOCOL
    from us is a malformed request: RST_STREAM(PROTOCOL_ERROR) on its stream, with a
    reason that names it, and the next stream is served."""
    srv = Http2Connection(Role.SERVER)
    raw = raw_peer(srv)
    ws = [(b":method", b"CONNECT"), (b":protocol", b"websocket"), *REQ[1:]]
    raw.send_headers(1, ws)
    raw.send_headers(3, REQ, end_stream=True)
    reset, head = srv.receive_data(raw.data_to_send())
    assert (reset.stream_id, reset.error_code, reset.remote) == (1, ErrorCode.PROTOCOL_ERROR, False)
    assert ":protocol" in reset.reason and head.stream_id == 3
    (peer_view,) = [e for e in raw.receive_data(srv.data_to_send()) if hasattr(e, "error_code")]
    assert (peer_view.stream_id, peer_view.error_code) == (1, ErrorCode.PROTOCOL_ERROR)


@pytest.mark.parametrize(
    "bad",
    [
        [("grpc-status", "3"), ("grpc-message", "bad value ")],  # trailing whitespace
        [("X-Upper", "1")],
        [("connection", "close")],
    ],
    ids=["trailing-space", "uppercase-name", "connection-specific"],
)
def test_a_malformed_block_that_ends_a_closed_stream_is_a_reset_not_an_exception(bad):
    """A backend's malformed trailers (or head) with END_STREAM, after the request ended:
    the stream is closed both ways, so no RST_STREAM can go out, but the message is still
    malformed (RFC 9113 §8.1.1). The codec reports the stream reset (not forwarded) and
    raises nothing: an exception here used to escape into the HBONE connection and tear
    down every caller's streams to that node."""
    srv, cli = pair()
    sid, wire = request(cli, end_stream=True)
    srv.receive_data(wire)
    head = srv.send_response_head(sid, 200, Headers.of(("content-type", "application/grpc")))
    assert [type(e) for e in cli.receive_data(head)] == [ResponseHead]
    enc = srv._h2.encoder  # the server's HPACK state, so the client can decode the block
    block = enc.encode([(k.encode(), v.encode()) for k, v in bad])
    frame = len(block).to_bytes(3, "big") + bytes([1, 0x5]) + sid.to_bytes(4, "big") + block
    events = cli.receive_data(frame)
    assert [type(e) for e in events] == [StreamReset]
    assert events[0].stream_id == sid and events[0].error_code == 1
    assert cli.receive_data(b"") is not None  # the connection is still usable


@pytest.mark.parametrize("status", ["099", "600", "999"])
def test_a_status_outside_100_to_599_resets_the_stream(status):
    """A backend's :status outside 100-599 (RFC 9110 15) is a malformed response: the stream
    is reset, never taken for a 1xx (the caller would wait for good) nor relayed."""
    srv, cli = pair()
    sid, wire = request(cli, end_stream=True)
    srv.receive_data(wire)
    enc = srv._h2.encoder
    block = enc.encode([(b":status", status.encode()), (b"content-length", b"0")])
    frame = len(block).to_bytes(3, "big") + bytes([1, 0x5]) + sid.to_bytes(4, "big") + block
    events = cli.receive_data(frame)
    assert [type(e) for e in events] == [StreamReset]
    assert "invalid :status" in events[0].reason


@pytest.mark.parametrize(("method", "status"), [("GET", 204), ("GET", 304), ("HEAD", 200)])
def test_data_in_a_response_that_has_no_content_resets_the_stream(method, status):
    """RFC 9113 8.1.1: a response to HEAD, or a 204 or 304, has no content; a backend that
    sends DATA on it anyway sends a malformed response. The stream is reset and the bytes
    are never passed on (an HTTP/2 caller used to receive them; an HTTP/1.1 caller's
    connection broke with a traceback)."""
    srv, cli = pair()
    sid = cli.next_stream_id()
    wire = cli.send_request_head(sid, method, "/", "llm", "http", Headers(), end_stream=True)
    srv.receive_data(wire)
    enc = srv._h2.encoder
    block = enc.encode([(b":status", str(status).encode())])
    head = len(block).to_bytes(3, "big") + bytes([1, 0x4]) + sid.to_bytes(4, "big") + block
    body = b"should-not-be-here"
    data = len(body).to_bytes(3, "big") + bytes([0, 0x1]) + sid.to_bytes(4, "big") + body
    events = cli.receive_data(head + data)
    assert [type(e) for e in events] == [ResponseHead, StreamReset]
    assert not any(isinstance(e, Data) for e in events)


def test_an_empty_end_of_a_204_is_not_malformed():
    """A 204 whose END_STREAM comes on an empty DATA frame is well formed."""
    srv, cli = pair()
    sid = cli.next_stream_id()
    srv.receive_data(cli.send_request_head(sid, "GET", "/", "llm", "http", Headers(), True))
    out = srv.send_response_head(sid, 204, Headers()) + srv.send_data(sid, b"", True)
    events = cli.receive_data(out)
    assert [type(e) for e in events] == [ResponseHead, Data]
    assert events[1].end_stream and not cli._bodiless
