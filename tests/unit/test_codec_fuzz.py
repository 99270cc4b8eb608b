"""Properties of the waypoint codecs under arbitrary input (hypothesis).

- Whatever bytes a peer sends, a codec raises nothing but ProtocolError, and returns.
- A valid byte stream split at arbitrary points gives the same events as in one piece.
- What one role serializes, the other role parses back to the same message.
"""

from __future__ import annotations

import string

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.waypoint.codec import (
    H2_PREFACE,
    Data,
    Headers,
    Http1Connection,
    ProtocolError,
    RequestHead,
    ResponseHead,
    Role,
    StreamReset,
    Trailers,
)
from agent.waypoint.codec.http2 import Http2Connection

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

HEAD_PREFIXES = [
    b"",
    b"GET / HTTP/1.1\r\nHost: a\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc",
]
RESPONSE_PREFIXES = [
    b"",
    b"HTTP/1.1 200 OK\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"HTTP/1.1 100 Continue\r\n\r\n",
]

token = st.text(alphabet=string.ascii_lowercase + string.digits + "-", min_size=1, max_size=10)
value = st.text(alphabet=string.ascii_letters + string.digits + " ;=/.,-", max_size=24).map(
    str.strip
)
fields = st.lists(st.tuples(token.map(lambda t: "x-" + t), value), max_size=5)
path = st.text(alphabet=string.ascii_letters + string.digits + "/-._~?=&%", max_size=30)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces = [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]
    return [p for p in pieces if p]  # an empty read would mean EOF


def merged(events: list) -> list:
    """Events with consecutive Data of one stream joined (read boundaries are not
    meaningful for body bytes)."""
    out: list = []
    for e in events:
        last = out[-1] if out else None
        if isinstance(e, Data) and isinstance(last, Data) and last.stream_id == e.stream_id:
            out[-1] = Data(e.stream_id, bytes(last.data) + bytes(e.data), e.end_stream)
        else:
            out.append(e)
    return out


def serve(chunks: list[bytes]) -> list:
    """Feed chunks to a server-role HTTP/1.1 connection, answering each request as it
    completes (which releases pipelined ones); return every event."""
    conn = Http1Connection(Role.SERVER)
    events: list = []
    for chunk in [*chunks, b""]:
        queue = conn.receive_data(chunk)
        while queue:
            e = queue.pop(0)
            events.append(e)
            if getattr(e, "end_stream", False) or isinstance(e, Trailers):
                conn.send_response_head(e.stream_id, 204, Headers(), end_stream=True)
                queue += conn.next_events()
    return events


# ------------------------------------------------------------------- arbitrary bytes


@FUZZ
@given(st.sampled_from(HEAD_PREFIXES), st.binary(max_size=300), st.lists(st.integers(0, 400)))
def test_http1_server_takes_any_bytes(prefix, tail, cuts):
    """Arbitrary request bytes: events or ProtocolError, never another exception."""
    try:
        serve(split(prefix + tail, cuts))
    except ProtocolError as err:
        assert err.side == "remote" and 400 <= err.status < 600


@FUZZ
@given(st.sampled_from(RESPONSE_PREFIXES), st.binary(max_size=300), st.booleans())
def test_http1_client_takes_any_bytes(prefix, tail, head):
    """Arbitrary response bytes (to GET or HEAD): events or ProtocolError only."""
    conn = Http1Connection(Role.CLIENT)
    conn.send_request_head(1, "HEAD" if head else "GET", "/", "a", "http", Headers(), True)
    try:
        conn.receive_data(prefix + tail)
        conn.receive_data(b"")
    except ProtocolError as err:
        assert err.side == "remote" and err.status == 502


frame = st.builds(
    lambda kind, flags, sid, payload: (
        len(payload).to_bytes(3, "big") + bytes([kind, flags]) + sid.to_bytes(4, "big") + payload
    ),
    st.integers(0, 10),
    st.integers(0, 255),
    st.sampled_from([0, 1, 2, 3, 5, 0x7FFFFFFF]),
    st.binary(max_size=40),
)


@FUZZ
@given(st.lists(frame, max_size=8), st.booleans())
def test_http2_server_takes_any_frames(frames, with_request):
    """Arbitrary frames after a valid preface: events or ProtocolError only."""
    srv = Http2Connection(Role.SERVER)
    cli = Http2Connection(Role.CLIENT)
    wire = cli.data_to_send()
    if with_request:
        wire += cli.send_request_head(1, "POST", "/", "a", "http", Headers())
    try:
        for chunk in [wire, *frames, b""]:
            for e in srv.receive_data(chunk):
                if isinstance(e, Data):
                    srv.consumed(e.stream_id, len(e.data))
            srv.data_to_send()
    except ProtocolError as err:
        assert err.side == "remote" and err.stream_id == 0


@FUZZ
@given(st.binary(max_size=200))
def test_http2_server_takes_any_bytes_after_the_preface(tail):
    """Raw garbage after the preface is a connection error, never a crash."""
    srv = Http2Connection(Role.SERVER)
    try:
        srv.receive_data(H2_PREFACE + tail)
    except ProtocolError as err:
        assert err.side == "remote"


# ------------------------------------------------------------ split at arbitrary points

request_spec = st.tuples(
    st.sampled_from(["GET", "POST", "PUT", "DELETE"]),
    path,
    fields,
    st.binary(max_size=200),
    st.sampled_from(["length", "chunked"]),
    st.integers(1, 64),
    st.lists(st.tuples(token.map(lambda t: "x-" + t), value), max_size=2),
)


def request_bytes(spec) -> bytes:
    method, p, hdrs, body, framing, chunk, trailers = spec
    lines = [f"{method} /{p} HTTP/1.1", "Host: llm:8000", *(f"{n}: {v}" for n, v in hdrs)]
    if framing == "length":
        lines.append(f"Content-Length: {len(body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + body
    lines.append("Transfer-Encoding: chunked")
    out = [("\r\n".join(lines) + "\r\n\r\n").encode()]
    for i in range(0, len(body), chunk):
        piece = body[i : i + chunk]
        out.append(b"%x\r\n%s\r\n" % (len(piece), piece))
    out.append(b"0\r\n" + b"".join(f"{n}: {v}\r\n".encode() for n, v in trailers) + b"\r\n")
    return b"".join(out)


@FUZZ
@given(st.lists(request_spec, min_size=1, max_size=3), st.lists(st.integers(0, 2000)))
def test_http1_requests_split_anywhere_parse_the_same(specs, cuts):
    """Pipelined requests, cut at arbitrary points, give the same events as whole, and
    the messages that were sent."""
    wire = b"".join(request_bytes(s) for s in specs)
    whole = merged(serve([wire]))
    assert merged(serve(split(wire, cuts))) == whole
    heads = [e for e in whole if isinstance(e, RequestHead)]
    assert [(h.method, h.target) for h in heads] == [(s[0], "/" + s[1]) for s in specs]
    for h, spec in zip(heads, specs, strict=True):
        body = b"".join(e.data for e in whole if isinstance(e, Data) and e.stream_id == h.stream_id)
        assert body == spec[3]


response_spec = st.tuples(
    st.sampled_from([200, 201, 404, 503]),
    fields,
    st.lists(st.binary(min_size=1, max_size=40), max_size=6),
    st.sampled_from(["length", "chunked", "close"]),
)


@FUZZ
@given(response_spec, st.lists(st.integers(0, 600)))
def test_http1_response_split_anywhere_parses_the_same(spec, cuts):
    """A response (length, chunked as SSE pieces, or close-delimited) cut anywhere gives
    the same events as whole."""
    status, hdrs, pieces, framing = spec
    head = f"HTTP/1.1 {status} X\r\n" + "".join(f"{n}: {v}\r\n" for n, v in hdrs)
    body = b"".join(pieces)
    if framing == "length":
        wire = (head + f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    elif framing == "chunked":
        wire = (head + "Transfer-Encoding: chunked\r\n\r\n").encode()
        wire += b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"
    else:
        wire = (head + "\r\n").encode() + body

    def run(chunks: list[bytes]) -> list:
        conn = Http1Connection(Role.CLIENT)
        conn.send_request_head(1, "GET", "/", "llm", "http", Headers(), end_stream=True)
        return merged([e for c in [*chunks, b""] for e in conn.receive_data(c)])

    whole = run([wire])
    assert run(split(wire, cuts)) == whole
    assert whole[0].status == status
    assert b"".join(e.data for e in whole if isinstance(e, Data)) == body


@FUZZ
@given(st.lists(st.tuples(path, fields, st.binary(max_size=300)), min_size=1, max_size=3),
       st.lists(st.integers(0, 3000)))  # fmt: skip
def test_http2_split_anywhere_parses_the_same(requests, cuts):
    """HTTP/2 client bytes cut anywhere give the server the same events as whole."""
    cli = Http2Connection(Role.CLIENT)
    wire = cli.data_to_send()
    for p, hdrs, body in requests:
        sid = cli.next_stream_id()
        wire += cli.send_request_head(sid, "POST", "/" + p, "llm", "http", Headers.of(*hdrs))
        wire += cli.send_data(sid, body, end_stream=True)

    def run(chunks: list[bytes]) -> list:
        srv = Http2Connection(Role.SERVER)
        return merged([e for c in chunks for e in srv.receive_data(c)])

    whole = run([wire])
    assert run(split(wire, cuts)) == whole
    assert [bytes(e.data) for e in whole if isinstance(e, Data)] == [r[2] for r in requests]


# ---------------------------------------------------------------------------- round trips


@FUZZ
@given(request_spec, st.sampled_from(["h1", "h2"]))
def test_client_serializer_round_trips_through_server_parser(spec, proto):
    """What the client role writes, the server role reads back: method, target,
    authority, fields, body and trailers."""
    method, p, hdrs, body, framing, chunk, trailers = spec
    headers = Headers.of(*hdrs)
    if framing == "length":
        headers.add(b"content-length", str(len(body)).encode())
    cls = Http1Connection if proto == "h1" else Http2Connection
    cli, srv = cls(Role.CLIENT), cls(Role.SERVER)
    wire = cli.data_to_send()
    wire += cli.send_request_head(1, method, "/" + p, "llm:8000", "http", headers.copy())
    for i in range(0, len(body), chunk):
        wire += cli.send_data(1, body[i : i + chunk])
    wire += cli.send_trailers(1, Headers.of(*trailers)) if trailers else cli.send_data(1, b"", True)
    events = merged(srv.receive_data(wire))
    head = events[0]
    assert (head.method, head.target, head.authority) == (method, "/" + p, "llm:8000")
    assert [f for f in head.headers if f[0].startswith(b"x-")] == headers.fields[: len(hdrs)]
    got = b"".join(e.data for e in events if isinstance(e, Data))
    assert got == body
    if trailers and (proto == "h2" or framing == "chunked"):  # HTTP/1.1 needs chunked
        assert events[-1] == Trailers(1, Headers.of(*trailers))
    assert not any(isinstance(e, StreamReset) for e in events)


@FUZZ
@given(response_spec, st.sampled_from(["h1", "h2"]))
def test_server_serializer_round_trips_through_client_parser(spec, proto):
    """What the server role writes, the client role reads back: status, fields, body."""
    status, hdrs, pieces, framing = spec
    cls = Http1Connection if proto == "h1" else Http2Connection
    cli, srv = cls(Role.CLIENT), cls(Role.SERVER)
    wire = cli.data_to_send() + cli.send_request_head(1, "GET", "/", "a", "http", Headers(), True)
    srv.receive_data(wire)
    ack = srv.data_to_send()
    if ack:  # (b"" would mean EOF)
        cli.receive_data(ack)
    headers = Headers.of(*hdrs)
    if framing == "length":
        headers.add(b"content-length", str(sum(map(len, pieces))).encode())
    wire = srv.send_response_head(1, status, headers)
    wire += b"".join(srv.send_data(1, p) for p in pieces) + srv.send_data(1, b"", True)
    events = merged(cli.receive_data(wire))
    assert isinstance(events[0], ResponseHead) and events[0].status == status
    assert [f for f in events[0].headers if f[0].startswith(b"x-")] == headers.fields[: len(hdrs)]
    body = b"".join(pieces)
    if events[0].end_stream:  # HTTP/1.1 content-length: 0
        assert (body, len(events)) == (b"", 1)
    else:
        assert events[1:] == [Data(1, body, True)]
