"""The waypoint's sans-IO HTTP/1.1 codec: bytes in, events out; calls in, bytes out."""

from __future__ import annotations

import pytest

from agent.waypoint.codec import (
    ConnectionClosed,
    Data,
    Headers,
    Http1Connection,
    Limits,
    ProtocolError,
    RequestHead,
    ResponseHead,
    Role,
    StreamReset,
    Trailers,
)

GET = b"GET /v1/models HTTP/1.1\r\nHost: llm\r\n\r\n"


def server(**limits: int) -> Http1Connection:
    return Http1Connection(Role.SERVER, Limits(**limits))


def client() -> Http1Connection:
    return Http1Connection(Role.CLIENT)


def feed(conn: Http1Connection, *chunks: bytes) -> list:
    out: list = []
    for chunk in chunks:
        out += conn.receive_data(chunk)
    return out


def reject(conn: Http1Connection, *chunks: bytes) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        feed(conn, *chunks)
    return info.value


def ok(conn: Http1Connection, sid: int, body: bytes = b"ok") -> bytes:
    h = Headers.of(("content-length", str(len(body))))
    return conn.send_response_head(sid, 200, h) + conn.send_data(sid, body, end_stream=True)


def get(conn: Http1Connection, method: str = "GET") -> bytes:
    sid = conn.next_stream_id()
    return conn.send_request_head(sid, method, "/", "llm", "http", Headers(), end_stream=True)


# --------------------------------------------------------------------------- requests


def test_get_request_is_one_head_that_ends_the_stream():
    """A bodiless request is a single RequestHead with end_stream, names lowercased."""
    (head,) = feed(server(), b"GET /v1/models?x=1 HTTP/1.1\r\nHost: llm:8000\r\nX-A: b \r\n\r\n")
    assert head == RequestHead(
        1,
        "GET",
        "/v1/models?x=1",
        "llm:8000",
        "http",
        Headers([(b"host", b"llm:8000"), (b"x-a", b"b")]),
        True,
    )


def test_body_streams_as_it_arrives():
    """Body bytes become Data events per read; the last one carries end_stream."""
    conn = server()
    head, first = feed(conn, b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nhello")
    assert not head.end_stream
    assert first == Data(1, b"hello", False)
    assert feed(conn, b"world") == [Data(1, b"world", True)]


def test_chunked_request_with_trailers():
    """A chunked body ends with a Trailers event carrying the trailer fields."""
    events = feed(
        server(),
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"5\r\nhello\r\n0\r\nX-Checksum: 42\r\n\r\n",
    )
    assert events[1:] == [Data(1, b"hello", False), Trailers(1, Headers([(b"x-checksum", b"42")]))]


def test_absolute_form_target_gives_authority_and_path():
    """A proxy-style absolute target is split into authority, scheme and path."""
    (head,) = feed(server(), b"GET http://llm:8000/a?b=c HTTP/1.1\r\nHost: other\r\n\r\n")
    assert (head.authority, head.target, head.scheme) == ("llm:8000", "/a?b=c", "http")


@pytest.mark.parametrize(
    ("target", "authority", "path"),
    [
        (b"http://llm/", "llm", "/"),  # no port
        (b"http://llm:8000", "llm:8000", "/"),  # no path
        (b"HTTPS://llm:0/x", "llm:0", "/x"),
        (b"http://[fd00::1]:8000/v1?x=1", "[fd00::1]:8000", "/v1?x=1"),  # brackets kept
        (b"http://[::1]/", "[::1]", "/"),
    ],
)
def test_absolute_form_targets_with_parts_missing(target: bytes, authority: str, path: str):
    """Every absolute form that names a host parses: an absent port, path or query is not
    an error, and an IPv6 literal keeps its brackets (it is refused as a Host otherwise)."""
    (head,) = feed(server(), b"GET %s HTTP/1.1\r\nHost: other\r\n\r\n" % target)
    assert (head.authority, head.target) == (authority, path)


@pytest.mark.parametrize("target", [b"http:///x", b"http://:80/", b"http://"])
def test_absolute_form_without_a_host_is_a_400_that_says_so(target: bytes):
    with pytest.raises(ProtocolError, match="not a URL with a host") as err:
        feed(server(), b"GET %s HTTP/1.1\r\nHost: a\r\n\r\n" % target)
    assert err.value.status == 400


def test_keep_alive_numbers_requests_like_http2_streams():
    """Requests on one connection are streams 1, 3, ... once each response completes."""
    conn = server()
    assert feed(conn, GET)[0].stream_id == 1
    ok(conn, 1)
    assert conn.keep_alive and conn.idle and not conn.should_close
    assert feed(conn, GET)[0].stream_id == 3


def test_connection_close_request_ends_the_connection():
    """After `Connection: close` the response says close and later bytes are ignored."""
    conn = server()
    feed(conn, b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n" + GET)
    assert b"connection: close\r\n" in ok(conn, 1)
    assert conn.should_close
    assert conn.next_events() == []


def test_http10_client_gets_close_delimited_body():
    """An HTTP/1.0 client cannot take chunked: the body runs until the connection closes."""
    conn = server()
    feed(conn, b"GET / HTTP/1.0\r\n\r\n")
    head = conn.send_response_head(1, 200, Headers())
    assert b"transfer-encoding" not in head and b"connection: close" in head
    assert conn.send_data(1, b"abc", end_stream=True) == b"abc"
    assert conn.should_close


def test_http10_keep_alive_with_content_length():
    """HTTP/1.0 keep-alive is honoured when the body length is known."""
    conn = server()
    feed(conn, b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    assert b"connection: keep-alive\r\n" in ok(conn, 1)
    assert conn.keep_alive


def test_upgrade_is_ignored_and_parsing_goes_on():
    """weft does not switch protocols: an Upgrade request is an ordinary request."""
    conn = server()
    (head,) = feed(conn, b"GET / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: ws\r\n\r\n")
    head.headers.strip_hop_by_hop()
    assert head.headers == Headers([(b"host", b"a")])
    ok(conn, 1)
    assert feed(conn, GET)[0].stream_id == 3


H2C = (
    b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
    b"HTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n"
)


def test_h2c_upgrade_offer_is_dropped_from_the_head():
    """curl --http2's offer (Upgrade, HTTP2-Settings, and their Connection tokens) is
    declined: the RequestHead reads as plain HTTP/1.1, other Connection tokens stay."""
    conn = server()
    (head,) = feed(
        conn,
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, Upgrade, HTTP2-Settings\r\n"
        b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n",
    )
    assert head.headers == Headers([(b"host", b"a"), (b"connection", b"keep-alive")])
    assert head.end_stream


@pytest.mark.parametrize(
    "framing, body",
    [
        (b"Content-Length: 11\r\n", b"hello world"),
        (b"Transfer-Encoding: chunked\r\n", b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"),
    ],
    ids=["content-length", "chunked"],
)
def test_upgrade_offer_with_a_body_keeps_its_body(framing, body):
    """A POST offering h2c has its body read as its body, however the bytes are split,
    and the request after it is parsed. llhttp (through httptools) ends such a request at
    its head; the body used to be lost and misread as the next request, leaving a backend
    waiting for the Content-Length it was promised."""
    wire = b"POST /v1 HTTP/1.1\r\nHost: a\r\n" + H2C + framing + b"\r\n" + body + GET
    for cut in range(1, len(wire)):
        conn = server()
        events = feed(conn, wire[:cut], wire[cut:])
        head = events[0]
        assert (head.method, head.end_stream, b"upgrade" in head.headers) == ("POST", False, False)
        assert b"".join(e.data for e in events[1:]) == b"hello world"
        assert events[-1].end_stream, cut
        conn.send_response_head(1, 200, Headers(), end_stream=True)
        (nxt,) = conn.next_events()
        assert (nxt.stream_id, nxt.target) == (3, "/v1/models")


def test_upgrade_offer_with_expect_gets_its_body_after_the_100():
    """With Expect: 100-continue the body of an upgrade offer arrives only after the 100:
    it is still this request's body."""
    conn = server()
    (head,) = feed(
        conn,
        b"POST / HTTP/1.1\r\nHost: a\r\n" + H2C
        + b"Expect: 100-continue\r\nContent-Length: 3\r\n\r\n",
    )  # fmt: skip
    assert not head.end_stream and head.headers.get(b"expect") == b"100-continue"
    assert conn.send_response_head(1, 100, Headers()) == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert feed(conn, b"abc") == [Data(1, b"abc", True)]
    assert conn.send_response_head(1, 200, Headers(), end_stream=True).startswith(b"HTTP/1.1 200")
    assert conn.keep_alive


def test_upgrade_offer_body_is_checked_like_any_body():
    """The body of an upgrade offer goes through llhttp's chunked parser: a bad chunk size
    is a 400 for that request, not something passed on."""
    err = reject(
        server(),
        b"POST / HTTP/1.1\r\nHost: a\r\n" + H2C + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n",
    )
    assert (err.status, err.stream_id) == (400, 1)


def test_upgrade_offer_that_closes_ignores_what_follows_its_body():
    """Connection: close, upgrade: the body is read, the offer dropped, `close` kept, and
    bytes after the body are ignored (RFC 9112 section 9.6)."""
    conn = server()
    events = feed(
        conn,
        b"POST / HTTP/1.1\r\nHost: a\r\nConnection: close, upgrade\r\nUpgrade: websocket\r\n"
        b"Content-Length: 3\r\n\r\nabcGARBAGE",
    )
    assert events[0].headers.get(b"connection") == b"close"
    assert events[1:] == [Data(1, b"abc", True)] and not conn.keep_alive


def test_connect_is_refused_with_405():
    """CONNECT asks for a tunnel, which the waypoint does not make: 405 with a short
    reason, closing the connection (the bytes after the head would be tunnel data)."""
    conn = server()
    err = reject(conn, b"CONNECT llm:443 HTTP/1.1\r\nHost: llm:443\r\n\r\n\x16\x03\x01")
    assert err.status == 405
    out = conn.error_response(err)
    assert out.startswith(b"HTTP/1.1 405 Method Not Allowed\r\n")
    assert b"connection: close\r\n" in out and out.endswith(b"not tunnels\n")


# -------------------------------------------------------------------------- responses


def test_response_head_frames_chunked_when_length_unknown():
    """Without Content-Length a streaming response is chunked; trailers end it."""
    conn = server()
    feed(conn, GET)
    head = conn.send_response_head(1, 200, Headers.of(("content-type", "text/event-stream")))
    assert head.endswith(b"transfer-encoding: chunked\r\n\r\n")
    assert conn.send_data(1, b"data: hi\n\n") == b"a\r\ndata: hi\n\n\r\n"
    assert conn.send_trailers(1, Headers.of(("x-tokens", "7"))) == b"0\r\nx-tokens: 7\r\n\r\n"
    assert conn.idle


def test_empty_response_gets_content_length_zero():
    """A response ended by its head says content-length: 0 so the client need not wait."""
    conn = server()
    feed(conn, GET)
    head = conn.send_response_head(1, 404, Headers(), end_stream=True)
    assert head == b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n"


def test_response_to_head_has_no_body():
    """Answering HEAD keeps Content-Length but sends no body."""
    conn = server()
    feed(conn, b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\n")
    head = conn.send_response_head(1, 200, Headers.of(("content-length", "100")))
    assert b"content-length: 100\r\n" in head
    with pytest.raises(ProtocolError, match="no body"):
        conn.send_data(1, b"x")
    assert conn.send_data(1, b"", end_stream=True) == b""


def test_hundred_continue_then_final_response():
    """A 100 Continue is written as an interim head; the final head follows."""
    conn = server()
    feed(conn, b"POST / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n")
    assert conn.send_response_head(1, 100, Headers()) == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert feed(conn, b"hi") == [Data(1, b"hi", True)]
    assert ok(conn, 1).startswith(b"HTTP/1.1 200 OK\r\n")


def test_early_response_drops_rest_of_request_and_closes():
    """Answering before the request body is in stops reuse; the rest of it is dropped."""
    conn = server()
    feed(conn, b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nabc")
    conn.send_response_head(1, 413, Headers(), end_stream=True)
    assert feed(conn, b"defghij") == []
    assert not conn.keep_alive and conn.should_close


def test_header_value_with_newline_is_refused():
    """The serializer refuses CR/LF in a value: no response splitting via the core."""
    conn = server()
    feed(conn, GET)
    with pytest.raises(ProtocolError) as info:
        conn.send_response_head(1, 200, Headers([(b"x", b"a\r\nset-cookie: evil")]))
    assert info.value.side == "local"


def test_line_breaks_in_any_serialized_block_are_refused():
    """CR or LF in a field of a request head, an interim or final response head, or a
    trailer block (or in a Content-Length a HEAD response copies) is refused."""
    bad = [(b"x", b"a\rb")], [(b"x", b"a\nb")], [(b"x\r\ny", b"1")]
    for fields in bad:
        with pytest.raises(ProtocolError, match="CR or LF"):
            client().send_request_head(1, "GET", "/", "a", "http", Headers(fields), True)
        for status in (103, 200):
            conn = server()
            feed(conn, GET)
            with pytest.raises(ProtocolError, match="CR or LF"):
                conn.send_response_head(1, status, Headers(fields))
        conn = server()
        feed(conn, GET)
        conn.send_response_head(1, 200, Headers())
        with pytest.raises(ProtocolError, match="CR or LF"):
            conn.send_trailers(1, Headers(fields))
    conn = server()
    feed(conn, b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\n")
    with pytest.raises(ProtocolError, match="CR or LF"):
        conn.send_response_head(1, 200, Headers([(b"content-length", b"1\r\nx: y")]))


def test_sending_out_of_turn_is_a_local_error():
    """The serializer refuses what the core must not do: a response head on a client-role
    connection or for a stream not being answered, body before the head or after its
    end, or on another stream; body for an exchange already answered is dropped."""
    conn = server()
    feed(conn, GET + GET)
    for call, match in [
        (lambda: conn.send_response_head(3, 200, Headers()), "not the request being answered"),
        (lambda: conn.send_data(1, b"x"), "no response head yet"),
        (lambda: conn.send_data(3, b"x"), "not the request being answered"),
        (lambda: client().send_response_head(1, 200, Headers()), "client-role connection"),
    ]:
        with pytest.raises(ProtocolError, match=match) as info:
            call()
        assert info.value.side == "local"
    conn.send_response_head(1, 200, Headers(), end_stream=True)
    with pytest.raises(ProtocolError, match="not the request being answered"):
        conn.send_data(1, b"")
    cli = client()
    cli.send_request_head(1, "POST", "/", "a", "http", Headers())
    assert cli.send_data(3, b"x") == b""  # no such exchange (answered already): dropped
    assert cli.send_data(1, b"x", end_stream=True) == b"1\r\nx\r\n0\r\n\r\n"
    with pytest.raises(ProtocolError, match="already ended"):
        cli.send_data(1, b"x")
    feed(cli, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert cli.idle and cli.send_data(1, b"x") == b""


def test_content_length_mismatch_is_a_local_error():
    """Sending more (or less) than the declared Content-Length is a core bug."""
    conn = server()
    feed(conn, GET)
    conn.send_response_head(1, 200, Headers.of(("content-length", "2")))
    with pytest.raises(ProtocolError, match="too many"):
        conn.send_data(1, b"abc")


# ---------------------------------------------------------------------------- pipelining


def test_pipelined_requests_wait_for_the_previous_response():
    """Two requests in one read: the second is held until the first is answered."""
    conn = server()
    assert [e.stream_id for e in feed(conn, GET + GET)] == [1]
    assert conn.paused
    assert conn.next_events() == []
    ok(conn, 1)
    assert [e.stream_id for e in conn.next_events()] == [3]


def test_pipelined_bodies_in_the_same_read_are_held_with_their_ends():
    """Requests with bodies behind one being answered, all in one read: their heads, body
    pieces, ends of stream and trailers wait, in order, until their turn."""
    conn = server()
    post = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello"
    chunked = (
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\nhi\r\n0\r\nX-Sum: 1\r\n\r\n"
    )
    first = feed(conn, post + post + chunked)
    assert [type(e) for e in first] == [RequestHead, Data] and first[1] == Data(1, b"hello", True)
    assert conn.next_events() == []
    ok(conn, 1)
    second = conn.next_events()
    assert [type(e) for e in second] == [RequestHead, Data]
    assert second[1] == Data(3, b"hello", True)
    ok(conn, 3)
    third = conn.next_events()
    assert [type(e) for e in third] == [RequestHead, Data, Trailers]
    assert third[1:] == [Data(5, b"hi", False), Trailers(5, Headers([(b"x-sum", b"1")]))]


def test_bytes_read_while_paused_are_parsed_later():
    """Bytes that arrive while a response is pending are buffered, then parsed."""
    conn = server()
    feed(conn, GET)
    assert feed(conn, b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\n\r\nx", b"") == []
    ok(conn, 1)
    events = conn.next_events()
    assert [type(e) for e in events] == [RequestHead, Data]
    ok(conn, 3)
    assert conn.next_events() == [ConnectionClosed()]


def test_malformed_pipelined_request_is_raised_after_the_good_one():
    """An error in a pipelined request does not lose the complete request before it."""
    conn = server()
    assert len(feed(conn, GET + b"BAD\x00 / HTTP/1.1\r\n\r\n")) == 1
    ok(conn, 1)
    with pytest.raises(ProtocolError) as info:
        conn.next_events()
    assert (info.value.stream_id, info.value.status) == (3, 400)


# ------------------------------------------------------------------------ client role


def test_sse_response_arrives_event_by_event():
    """Server-sent events: each chunk is a Data event before the stream ends."""
    conn = client()
    get(conn)
    head = (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    assert feed(conn, head)[0].status == 200
    assert feed(conn, b"e\r\ndata: token1\n\n\r\n") == [Data(1, b"data: token1\n\n", False)]
    assert feed(conn, b"e\r\ndata: token2\n\n\r\n") == [Data(1, b"data: token2\n\n", False)]
    assert feed(conn, b"0\r\n\r\n") == [Data(1, b"", True)]
    assert conn.idle and conn.keep_alive


def test_response_to_head_ends_at_its_head():
    """A HEAD response's Content-Length describes no body: the next response follows it."""
    conn = client()
    get(conn, "HEAD")
    (head,) = feed(conn, b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")
    assert head.end_stream and conn.idle
    get(conn)
    assert feed(conn, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")[1] == Data(3, b"ok", True)


@pytest.mark.parametrize("status", [204, 304])
def test_no_body_statuses(status):
    """204 and 304 have no body whatever their headers say."""
    conn = client()
    get(conn)
    (head,) = feed(conn, b"HTTP/1.1 %d X\r\nContent-Length: 5\r\n\r\n" % status)
    assert head == ResponseHead(1, status, Headers([(b"content-length", b"5")]), True)
    assert conn.idle


def test_interim_responses_precede_the_final_one():
    """1xx responses are informational heads on the same stream."""
    conn = client()
    sid = conn.next_stream_id()
    hdrs = Headers.of(("expect", "100-continue"), ("content-length", "2"))
    conn.send_request_head(sid, "POST", "/", "llm", "http", hdrs)
    (cont,) = feed(conn, b"HTTP/1.1 100 Continue\r\n\r\n")
    assert cont.informational and not cont.end_stream
    assert conn.send_data(sid, b"hi", end_stream=True) == b"hi"
    assert feed(conn, b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")[0].status == 201


def test_close_delimited_response_ends_at_eof():
    """A response without length runs to EOF; the connection is not reusable."""
    conn = client()
    get(conn)
    assert feed(conn, b"HTTP/1.1 200 OK\r\n\r\nabc")[1] == Data(1, b"abc", False)
    assert not conn.keep_alive
    assert feed(conn, b"") == [Data(1, b"", True), ConnectionClosed()]


def test_backend_closing_mid_response_resets_the_stream():
    """EOF before the response is complete is a remote reset (retriable by the core)."""
    conn = client()
    get(conn)
    feed(conn, b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nabc")
    reset, closed = feed(conn, b"")
    assert isinstance(reset, StreamReset) and reset.remote and reset.stream_id == 1
    assert closed == ConnectionClosed()


def test_client_closing_mid_request_resets_the_stream():
    """A client that hangs up mid-body resets its stream."""
    conn = server()
    feed(conn, b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 9\r\n\r\nabc")
    assert [type(e) for e in feed(conn, b"")] == [StreamReset, ConnectionClosed]


def test_request_framing_on_the_client_side():
    """Requests: chunked without length; content-length: 0 for an empty POST; Host first."""
    conn = client()
    head = conn.send_request_head(1, "POST", "/v1/chat", "llm:8000", "http", Headers())
    assert head == b"POST /v1/chat HTTP/1.1\r\nhost: llm:8000\r\ntransfer-encoding: chunked\r\n\r\n"
    assert conn.send_data(1, b"{}", end_stream=True) == b"2\r\n{}\r\n0\r\n\r\n"
    feed(conn, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    empty = conn.send_request_head(3, "POST", "/", "llm", "http", Headers(), end_stream=True)
    assert empty.endswith(b"content-length: 0\r\n\r\n")


def test_busy_connection_refuses_a_second_request():
    """No client-side pipelining: a pool must wait for `idle`."""
    conn = client()
    get(conn)
    with pytest.raises(ProtocolError, match="busy"):
        get(conn)


# ------------------------------------------------------------------- limits and errors


@pytest.mark.parametrize(
    ("request_bytes", "limits", "status"),
    [
        (
            b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"v" * 2000 + b"\r\n\r\n",
            {"max_header_bytes": 1024},
            431,
        ),
        (
            b"GET / HTTP/1.1\r\nHost: a\r\n" + b"X: 1\r\n" * 11 + b"\r\n",
            {"max_header_count": 10},
            431,
        ),
        (b"GET /" + b"a" * 100 + b" HTTP/1.1\r\nHost: a\r\n\r\n", {"max_target_bytes": 64}, 414),
        (b"GET / HTTP/1.2\r\nHost: a\r\n\r\n", {}, 505),
        (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", {}, 505),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n", {}, 501),
        # two field lines are one list, "gzip, chunked": the same refusal as the one line
        (
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            {},
            501,
        ),
        (b"CONNECT llm:443 HTTP/1.1\r\nHost: llm:443\r\n\r\n", {}, 405),
    ],
    ids=[
        "header-bytes",
        "header-count",
        "uri",
        "http-1.2",
        "http-2.0",
        "te-gzip",
        "te-gzip-then-chunked",
        "connect",
    ],
)
def test_limits_and_unsupported_features_answer_the_right_status(request_bytes, limits, status):
    """Each limit and unsupported feature maps to its HTTP status."""
    err = reject(server(**limits), request_bytes)
    assert (err.status, err.side, err.stream_id) == (status, "remote", 1)


def test_header_size_error_says_how_big():
    """The error names the limit and the size seen."""
    err = reject(server(max_header_bytes=1024), GET[:-2] + b"X: " + b"v" * 2000 + b"\r\n\r\n")
    assert err.message == (
        "request header block exceeds the 1,024-byte limit (at least 2,026 bytes)"
    )


def test_slowloris_head_is_cut_off_at_the_limit():
    """A head trickled in small reads is refused once it passes the limit, and
    `reading_head` tells the shell to time it meanwhile."""
    conn = server(max_header_bytes=1024)
    feed(conn, b"GET / HTTP/1.1\r\nHost: a\r\nX-Long: ")
    assert conn.reading_head
    with pytest.raises(ProtocolError) as info:
        for _ in range(200):
            feed(conn, b"vvvvvvvvvv")
    assert info.value.status == 431


POST = b"POST / HTTP/1.1\r\nHost: a\r\n"
GET_A = b"GET / HTTP/1.1\r\nHost: a\r\n"
SMUGGLING = {
    "cl-and-te": POST + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
    "te-and-cl": POST + b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
    "two-cl": POST + b"Content-Length: 5\r\nContent-Length: 6\r\n\r\n",
    "same-cl-twice": POST + b"Content-Length: 5\r\nContent-Length: 5\r\n\r\n",
    "cl-list": POST + b"Content-Length: 5, 5\r\n\r\n",
    "cl-plus": POST + b"Content-Length: +5\r\n\r\n",
    "te-not-final": POST + b"Transfer-Encoding: chunked, gzip\r\n\r\n",
    "te-twice": POST + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: x\r\n\r\n",
    "obs-fold": GET_A + b"X: a\r\n b\r\n\r\n",
    "space-before-colon": b"GET / HTTP/1.1\r\nHost : a\r\n\r\n",
    "bare-lf": b"GET / HTTP/1.1\nHost: a\n\n",
    "bare-lf-in-headers": b"GET / HTTP/1.1\r\nHost: a\nX: 1\r\n\r\n",
    "ctl-in-value": GET_A + b"X: a\x01b\r\n\r\n",
    "ctl-in-name": GET_A + b"X\x01: b\r\n\r\n",
    "no-host": b"GET / HTTP/1.1\r\n\r\n",
    "two-hosts": GET_A + b"Host: b\r\n\r\n",
    "bad-host": b"GET / HTTP/1.1\r\nHost: a/b@c\r\n\r\n",
    "chunk-size-lf": POST + b"Transfer-Encoding: chunked\r\n\r\n5\nhello\r\n0\r\n\r\n",
}


@pytest.mark.parametrize("request_bytes", SMUGGLING.values(), ids=SMUGGLING.keys())
def test_request_smuggling_defences(request_bytes):
    """Ambiguous framing and sloppy syntax are refused with 400 (or 501), never guessed."""
    err = reject(server(), request_bytes)
    assert err.status in (400, 501) and err.side == "remote"


def test_error_response_explains_and_closes():
    """error_response renders the error's status and message and closes."""
    conn = server()
    err = reject(conn, b"GET / HTTP/1.1\r\n\r\n")
    out = conn.error_response(err)
    assert out.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert b"connection: close\r\n" in out and out.endswith(b"without a Host header\n")
    assert conn.should_close


def test_backend_errors_map_to_bad_gateway():
    """A malformed response is the backend's fault: status 502 for the client."""
    conn = client()
    get(conn)
    err = reject(conn, b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n")
    assert (err.status, err.stream_id) == (502, 1)


# --------------------------------------------------------------------------- round trips


def test_round_trip_request_through_both_serializers():
    """What the client role writes, the server role reads back as the same request."""
    out = client()
    hdrs = Headers.of(("content-type", "application/json"), ("x-model", "llama"))
    wire = out.send_request_head(1, "POST", "/v1/chat?s=1", "llm:8000", "http", hdrs)
    wire += out.send_data(1, b'{"a":') + out.send_data(1, b"1}", end_stream=True)
    events = feed(server(), wire)
    assert events[0].headers.get(b"x-model") == b"llama"
    assert (events[0].method, events[0].target, events[0].authority) == (
        "POST",
        "/v1/chat?s=1",
        "llm:8000",
    )
    assert b"".join(e.data for e in events[1:]) == b'{"a":1}' and events[-1].end_stream


def test_round_trip_response_with_trailers():
    """A chunked response with trailers reads back with the same trailers."""
    srv, cli = server(), client()
    feed(srv, get(cli))
    wire = srv.send_response_head(1, 200, Headers.of(("grpc-encoding", "identity")))
    wire += srv.send_data(1, b"abc") + srv.send_trailers(1, Headers.of(("grpc-status", "0")))
    head, data, trailers = feed(cli, wire)
    assert (head.status, data.data, trailers.headers.get(b"grpc-status")) == (200, b"abc", b"0")
    assert cli.idle and srv.idle


@pytest.mark.parametrize("status", [b"000", b"099", b"600", b"999"])
def test_a_status_outside_100_to_599_is_a_broken_response(status):
    """RFC 9110 15: codes run 100-599. A 099 read as informational would leave the caller
    waiting for a final answer that never comes, and 6xx-9xx cannot be relayed to an
    HTTP/2 caller: either is the backend breaking HTTP (502), not an answer."""
    c = client()
    c.send_request_head(c.next_stream_id(), "GET", "/", "llm", "http", Headers(), True)
    err = reject(c, b"HTTP/1.1 " + status + b" X\r\ncontent-length: 0\r\n\r\n")
    assert err.status == 502 and "invalid status" in str(err)
