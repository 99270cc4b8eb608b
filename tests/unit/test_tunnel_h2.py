"""The tunnel's HTTP/2 core, sans-IO: against the `h2` library as an independent peer, and
against itself with adversarial input. No sockets; memory speed."""

from __future__ import annotations

import contextlib

import h2.config
import h2.connection
import h2.events
import pytest
from hpack import Encoder
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.tunnel import h2 as hb


def h2_server() -> h2.connection.H2Connection:
    c = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=False, header_encoding="utf-8")
    )
    c.initiate_connection()
    return c


def h2_client() -> h2.connection.H2Connection:
    c = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
    )
    c.initiate_connection()
    return c


def pair() -> tuple[hb.H2Connection, hb.H2Connection]:
    c, s = hb.H2Connection(client=True), hb.H2Connection(client=False)
    c.initiate()
    s.initiate()
    return c, s


def pump(a: hb.H2Connection, b: hb.H2Connection) -> tuple[list[hb.Event], list[hb.Event]]:
    """Exchange bytes until both sides are quiet; events seen by a and by b."""
    ea: list[hb.Event] = []
    eb: list[hb.Event] = []
    for _ in range(20):
        x, y = a.data_to_send(), b.data_to_send()
        if not x and not y:
            break
        if x:
            eb += b.receive_data(x)
        if y:
            ea += a.receive_data(y)
    return ea, eb


def test_connect_against_h2_server_then_bytes_both_ways():
    """Our client opens a CONNECT that h2 understands; DATA and END_STREAM map to TCP."""
    ours, theirs = hb.H2Connection(client=True), h2_server()
    ours.initiate()
    sid = ours.open_stream("10.244.2.4:8000", [("x-weft-test", "1")])
    evs = theirs.receive_data(ours.data_to_send())
    req = next(e for e in evs if isinstance(e, h2.events.RequestReceived))
    assert dict(req.headers)[":method"] == "CONNECT"
    assert dict(req.headers)[":authority"] == "10.244.2.4:8000"
    theirs.send_headers(sid, [(":status", "200")])
    theirs.send_data(sid, b"pong")
    got = ours.receive_data(theirs.data_to_send())
    assert [type(e) for e in got if not isinstance(e, hb.SettingsAcked | hb.WindowOpened)] == [
        hb.StreamResponse,
        hb.Data,
    ]
    ours.send_data(sid, b"ping", end_stream=True)
    evs = theirs.receive_data(ours.data_to_send())
    data = [e.data for e in evs if isinstance(e, h2.events.DataReceived)]
    assert data == [b"ping"] and any(isinstance(e, h2.events.StreamEnded) for e in evs)


@pytest.mark.parametrize("status", ["\u00b200", "\u0662\u0660\u0660", "20", "2000", "+20"])
def test_a_status_that_is_not_three_ascii_digits_resets_the_stream(status: str) -> None:
    """A CONNECT answered with a :status Python's isdigit() takes ("²00", Arabic-Indic
    "٢٠٠") or of the wrong length is a stream error, neither an exception out of
    receive_data nor a 200."""
    ours, theirs = hb.H2Connection(client=True), h2_server()
    ours.initiate()
    sid = ours.open_stream("10.244.2.4:8000")
    theirs.receive_data(ours.data_to_send())
    theirs.send_headers(sid, [(":status", status)])
    got = ours.receive_data(theirs.data_to_send())
    assert not any(isinstance(e, hb.StreamResponse) for e in got)
    (reset,) = [e for e in got if isinstance(e, hb.StreamReset)]
    assert (reset.stream_id, reset.code, reset.remote) == (sid, hb.Err.PROTOCOL_ERROR, False)


def test_h2_client_against_our_server_with_refusal():
    """An h2 client's CONNECT arrives as StreamRequest; a 401 ends the stream."""
    ours, theirs = hb.H2Connection(client=False), h2_client()
    ours.initiate()
    theirs.send_headers(1, [(":method", "CONNECT"), (":authority", "10.1.1.1:80")])
    evs = ours.receive_data(theirs.data_to_send())
    (req,) = [e for e in evs if isinstance(e, hb.StreamRequest)]
    assert req.authority == "10.1.1.1:80"
    ours.respond(1, 401)
    evs = theirs.receive_data(ours.data_to_send())
    resp = next(e for e in evs if isinstance(e, h2.events.ResponseReceived))
    assert dict(resp.headers)[":status"] == "401"
    assert any(isinstance(e, h2.events.StreamEnded) for e in evs)
    assert 1 not in ours.streams


def test_flow_control_stops_the_sender_until_credit_returns():
    """A sender can have at most the peer's window in flight; consumed() reopens it."""
    c = hb.H2Connection(client=True)
    s = hb.H2Connection(
        client=False, settings=hb.Settings(initial_window=65535, connection_window=65535)
    )
    c.initiate()
    s.initiate()
    sid = c.open_stream("1.2.3.4:5")
    pump(c, s)
    s.respond(sid, 200)
    pump(c, s)
    big = b"x" * 200_000
    taken = c.send_data(sid, big)
    assert taken == 65535 and c.send_capacity(sid) == 0
    _, got = pump(c, s)
    n = sum(len(e.data) for e in got if isinstance(e, hb.Data))
    assert n == 65535
    s.consumed(sid, n)
    ea, _ = pump(c, s)
    assert any(isinstance(e, hb.WindowOpened) and e.stream_id == sid for e in ea)
    assert c.send_capacity(sid) > 0


def test_a_window_below_zero_sends_nothing_and_stays_below_zero():
    """The peer lowers SETTINGS_INITIAL_WINDOW_SIZE with data in flight: the stream's
    window goes negative (RFC 9113 §6.9.2), and a send neither goes out nor grows it."""
    c, s = pair()
    sid = c.open_stream("1.2.3.4:5")
    pump(c, s)
    s.respond(sid, 200)
    pump(c, s)
    assert c.send_data(sid, b"x" * 1000) == 1000
    pump(c, s)
    lower = hb._SETTING.pack(hb.S_INITIAL_WINDOW_SIZE, 0)
    c.receive_data(hb._HDR.pack(0, len(lower), hb.Frame.SETTINGS, 0, 0) + lower)
    conn_window = c.send_window
    assert c.streams[sid].send_window == -1000
    c.data_to_send()
    assert c.send_data(sid, b"y" * 10) == 0
    assert c.send_data(sid, b"y" * 10, end_stream=True) == 0
    assert c.streams[sid].send_window == -1000 and c.send_window == conn_window
    assert not c.streams[sid].local_closed and c.data_to_send() == b""
    c.end_stream(sid)  # END_STREAM alone needs no window
    assert c.streams[sid].local_closed


def test_our_pair_carries_large_payload_in_big_frames():
    c, s = pair()
    sid = c.open_stream("1.2.3.4:5")
    pump(c, s)
    s.respond(sid, 200)
    pump(c, s)
    payload = bytes(range(256)) * 3000
    assert c.send_data(sid, payload, end_stream=True) == len(payload)
    _, got = pump(c, s)
    datas = [e for e in got if isinstance(e, hb.Data)]
    assert b"".join(e.data for e in datas) == payload
    assert len(datas) == 1  # 768 KB fits one frame under our 1 MiB SETTINGS_MAX_FRAME_SIZE
    assert isinstance(got[-1], hb.StreamEnded)


def test_reset_of_one_stream_leaves_the_others_alone():
    c, s = pair()
    a, b = c.open_stream("1.1.1.1:1"), c.open_stream("2.2.2.2:2")
    pump(c, s)
    s.respond(a, 200)
    s.respond(b, 200)
    pump(c, s)
    c.reset(a, hb.Err.CANCEL)
    c.send_data(b, b"still here")
    _, got = pump(c, s)
    assert hb.StreamReset(a, hb.Err.CANCEL, remote=True) in got
    assert [e.data for e in got if isinstance(e, hb.Data)] == [b"still here"]


def test_goaway_refuses_new_streams_but_lets_open_ones_finish():
    c, s = pair()
    a = c.open_stream("1.1.1.1:1")
    pump(c, s)
    s.respond(a, 200)
    s.goaway()
    ea, _ = pump(c, s)
    assert any(isinstance(e, hb.GoAway) for e in ea)
    assert not c.can_open()
    s.send_data(a, b"bye", end_stream=True)
    ea, _ = pump(c, s)
    assert [e.data for e in ea if isinstance(e, hb.Data)] == [b"bye"]


def test_too_many_streams_are_refused_per_stream():
    c = hb.H2Connection(client=True)
    s = hb.H2Connection(client=False, settings=hb.Settings(max_concurrent_streams=2))
    c.initiate()
    s.initiate()
    c.peer_max_streams = 10  # a client that ignores our SETTINGS
    ids = [c.open_stream(f"1.1.1.{i}:1") for i in range(3)]
    ea, eb = pump(c, s)
    assert len([e for e in eb if isinstance(e, hb.StreamRequest)]) == 2
    assert hb.StreamReset(ids[2], hb.Err.REFUSED_STREAM, remote=True) in ea


def test_not_http2_is_a_connection_error_with_goaway():
    s = hb.H2Connection(client=False)
    s.initiate()
    with pytest.raises(hb.ConnectionError, match="preface missing"):
        s.receive_data(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert b"\x07" in s.data_to_send()  # a GOAWAY frame was queued


def test_oversized_frame_is_refused():
    c, s = pair()
    pump(c, s)
    hdr = (2 << 20).to_bytes(3, "big") + bytes([0, 0]) + (1).to_bytes(4, "big")
    with pytest.raises(hb.ConnectionError, match="exceeds our SETTINGS_MAX_FRAME_SIZE"):
        s.receive_data(hdr)


def test_continuation_flood_is_cut_off():
    """A HEADERS without END_HEADERS followed by endless CONTINUATION (CVE-2024-27316)."""
    c, s = pair()
    pump(c, s)
    frame = hb._HDR.pack(0, 10, hb.Frame.HEADERS, 0, 1) + b"\x00" * 10
    s.receive_data(frame)
    cont = hb._HDR.pack(0, 255, hb.Frame.CONTINUATION, 0, 1) + b"\x00" * 255
    with pytest.raises(hb.ConnectionError, match="across CONTINUATION"):
        for _ in range(100):
            s.receive_data(cont)


def test_rapid_reset_is_cut_off():
    """Open-and-reset in a loop (CVE-2023-44487) ends with ENHANCE_YOUR_CALM."""
    c = hb.H2Connection(client=True)
    s = hb.H2Connection(client=False, settings=hb.Settings(max_resets_per_window=10))
    c.initiate()
    s.initiate()
    with pytest.raises(hb.ConnectionError, match="rapid reset"):
        for i in range(50):
            sid = c.open_stream(f"1.1.1.1:{i + 1}")
            c.reset(sid)
            s.receive_data(c.data_to_send())


def test_data_beyond_the_window_resets_the_stream():
    c, s = pair()
    sid = c.open_stream("1.1.1.1:1")
    pump(c, s)
    s.respond(sid, 200)
    pump(c, s)
    c.streams[sid].send_window = 10 << 20  # pretend the peer granted more than it did
    c.send_window = 10 << 20
    c.send_data(sid, b"x" * (2 << 20))  # over the 1 MiB stream window, under the 16 MiB one
    evs = s.receive_data(c.data_to_send())
    assert hb.StreamReset(sid, hb.Err.FLOW_CONTROL_ERROR, remote=False) in evs


def test_data_beyond_the_connection_window_is_a_connection_error():
    c = hb.H2Connection(client=True)
    s = hb.H2Connection(
        client=False, settings=hb.Settings(initial_window=64 << 20, connection_window=1 << 20)
    )
    c.initiate()
    s.initiate()
    sid = c.open_stream("1.1.1.1:1")
    pump(c, s)
    s.respond(sid, 200)
    pump(c, s)
    c.send_window = 64 << 20  # a sender that ignores the connection window
    c.send_data(sid, b"x" * (2 << 20))
    with pytest.raises(hb.ConnectionError, match="connection window"):
        s.receive_data(c.data_to_send())


def test_malformed_connect_without_authority_is_a_stream_error():
    ours, theirs = hb.H2Connection(client=False), h2_client()
    ours.initiate()
    theirs.send_headers(1, [(":method", "CONNECT"), (":authority", "x:1")])
    ours.receive_data(theirs.data_to_send())
    raw = hb.H2Connection(client=True)
    raw._next_id = 3
    block = raw._encoder.encode([(":method", "CONNECT")])
    frame = hb._HDR.pack(0, len(block), hb.Frame.HEADERS, hb.END_HEADERS, 3) + block
    evs = ours.receive_data(frame)
    assert hb.StreamReset(3, hb.Err.PROTOCOL_ERROR, remote=False) in evs


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(min_value=1, max_value=200), min_size=1, max_size=30),
    st.binary(min_size=1, max_size=5000),
)
def test_any_chunking_of_the_byte_stream_gives_the_same_events(cuts, payload):
    """TCP may split frames anywhere; the events must not depend on where."""
    c, s = pair()
    sid = c.open_stream("9.9.9.9:9")
    c.send_data(sid, payload, end_stream=True)
    wire = c.data_to_send()
    whole = hb.H2Connection(client=False)
    whole.initiate()
    expected = whole.receive_data(wire)
    pieces, i = [], 0
    for k in cuts:
        pieces.append(wire[i : i + k])
        i += k
    pieces.append(wire[i:])
    got = []
    for p in pieces:
        got += s.receive_data(p)
    assert got == expected


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400))
def test_garbage_after_the_preface_only_ever_raises_connection_error(junk):
    s = hb.H2Connection(client=False)
    s.initiate()
    with contextlib.suppress(hb.ConnectionError):
        s.receive_data(hb.PREFACE + junk)


# ---- the hot paths against their plain forms ---------------------------------------------


def _send_data_reference(
    c: hb.H2Connection, sid: int, data: bytes | bytearray, end_stream: bool
) -> int:
    """send_data as a plain loop over frames, for every case (its form before it was
    reworked for speed, with the window-below-zero fix)."""
    s = c.streams.get(sid)
    if s is None or s.local_closed:
        raise hb.StreamGone(sid)
    n = max(0, min(len(data), s.send_window, c.send_window))
    taken = 0
    while taken < n:
        k = min(c.peer_max_frame, n - taken)
        last = taken + k == len(data) and end_stream
        c._frame(hb.Frame.DATA, hb.END_STREAM if last else 0, sid, data[taken : taken + k])
        taken += k
    s.send_window -= n
    c.send_window -= n
    if end_stream and taken == len(data):
        if not data:
            c._frame(hb.Frame.DATA, hb.END_STREAM, sid)
        s.local_closed = True
        c._maybe_forget(s)
    return taken


def _open_pair() -> tuple[hb.H2Connection, hb.H2Connection, int]:
    c, s = pair()
    sid = c.open_stream("1.2.3.4:5")
    pump(c, s)
    s.respond(sid, 200)
    pump(c, s)
    return c, s, sid


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(min_value=0, max_value=70_000),  # bytes to send
            st.booleans(),  # end_stream
            st.sampled_from([bytes, bytearray, memoryview]),
        ),
        min_size=1,
        max_size=6,
    ),
    st.integers(min_value=-5000, max_value=120_000),  # the stream's send window
    st.integers(min_value=-5000, max_value=120_000),  # the connection's
    st.sampled_from([16384, 20000, 1 << 20]),  # the peer's SETTINGS_MAX_FRAME_SIZE
)
def test_send_data_writes_what_a_plain_frame_loop_writes(sends, window, conn_window, maxf):
    """Frames, windows, amounts taken and stream state, send after send, whatever the
    windows (below zero too) and frame size: the same as the plain loop."""
    results = []
    for fast in (True, False):
        c, _, sid = _open_pair()
        c.data_to_send()
        c.streams[sid].send_window = window
        c.send_window = conn_window
        c.peer_max_frame = maxf
        log = []
        for size, end, kind in sends:
            data = kind(bytes(range(256)) * (size // 256) + bytes(size % 256))
            try:
                if fast:
                    taken = c.send_data(sid, data, end_stream=end)
                else:
                    taken = _send_data_reference(c, sid, data, end)
            except hb.StreamGone:
                taken = -1
            st_ = c.streams.get(sid)
            log.append(
                (
                    taken,
                    c.data_to_send(),
                    c.send_window,
                    None if st_ is None else (st_.send_window, st_.local_closed),
                )
            )
        results.append(log)
    assert results[0] == results[1]


def _frame(ftype: int, flags: int, sid: int, payload: bytes) -> bytes:
    return hb._HDR.pack(len(payload) >> 8, len(payload) & 0xFF, ftype, flags, sid) + payload


_frames = st.one_of(
    # DATA on the open stream, plain or padded (the padding sometimes too long)
    st.tuples(
        st.just("data"),
        st.integers(min_value=0, max_value=3000),
        st.sampled_from([0, hb.PADDED, hb.END_STREAM]),
        st.integers(min_value=0, max_value=255),
    ),
    st.tuples(st.just("ping"), st.just(0), st.just(0), st.just(0)),
    st.tuples(st.just("window"), st.integers(min_value=0, max_value=1000), st.just(0), st.just(0)),
    st.tuples(st.just("stray"), st.integers(min_value=0, max_value=100), st.just(0), st.just(0)),
)


def _wire(sid: int, spec: tuple[str, int, int, int]) -> bytes:
    kind, size, flags, pad = spec
    if kind == "data":
        body = b"d" * size
        if flags & hb.PADDED:
            body = bytes([pad]) + body + b"\0" * min(pad, size)
        return _frame(hb.Frame.DATA, flags, sid, body)
    if kind == "ping":
        return _frame(hb.Frame.PING, 0, 0, b"12345678")
    if kind == "window":
        return _frame(hb.Frame.WINDOW_UPDATE, 0, sid, hb._U32.pack(size))
    return _frame(hb.Frame.DATA, 0, sid + 2, b"s" * size)  # a stream that was never opened


@settings(max_examples=200, deadline=None)
@given(st.lists(_frames, min_size=1, max_size=12), st.randoms(use_true_random=False))
def test_reads_of_whole_frames_and_of_any_pieces_give_the_same_result(specs, rnd):
    """A read of whole frames with nothing buffered is parsed out of the read itself; any
    other read goes through the buffer. Events, errors, what is queued to send and the
    flow-control windows must not tell them apart."""
    outcomes = []
    for whole in (True, False):
        _, s, sid = _open_pair()
        s.data_to_send()
        frames = [_wire(sid, spec) for spec in specs]
        if whole:
            reads = frames
        else:
            wire = b"".join(frames)
            cuts = sorted(rnd.sample(range(1, len(wire)), min(len(wire) - 1, 8)))
            reads = [wire[i:j] for i, j in zip([0, *cuts], [*cuts, len(wire)], strict=True)]
        events: list[object] = []
        for r in reads:
            if whole:
                assert not s._buf  # each read takes the in-place path
            try:
                events += s.receive_data(r)
            except hb.ConnectionError as e:
                # A failing read's events are lost, and which events a read holds depends
                # on the cuts: only the error is compared.
                events = [("error", e.code)]
                break
        st_ = s.streams.get(sid)
        outcomes.append(
            (
                events,
                s.data_to_send(),
                s.recv_window,
                s._frames_seen,
                None if st_ is None else (st_.recv_window, st_.remote_closed),
            )
        )
    assert outcomes[0] == outcomes[1]


def test_data_between_headers_and_its_continuation_is_a_connection_error():
    """RFC 9113 §6.10: nothing but CONTINUATION may follow a HEADERS without END_HEADERS,
    DATA on the way that skips _dispatch included."""
    _, s, sid = _open_pair()
    block = Encoder().encode([(":method", "CONNECT"), (":authority", "1.1.1.1:1")])
    half = _frame(hb.Frame.HEADERS, 0, sid + 2, block[:3])
    with pytest.raises(hb.ConnectionError, match="CONTINUATION"):
        s.receive_data(half + _frame(hb.Frame.DATA, 0, sid, b"x"))
