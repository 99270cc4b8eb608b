"""The HTTP/1.1 codec compiled against its source where test_compiled.py does not look: the
send side (request and response heads from arbitrary method, target, authority, status and
fields; bodies as bytes or memoryview), and the objects other code hands it, e.g. a request
head decoded by the interpreted HTTP/2 codec (h2's HeaderTuple fields) forwarded to an
HTTP/1.1 backend.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent import compiled
from tests.unit.source_world import source_world

if not compiled.is_compiled("agent.waypoint.codec.http1"):
    pytest.skip("the codec is not compiled here (make compiled)", allow_module_level=True)

import agent.waypoint.codec.headers as c_headers
import agent.waypoint.codec.http1 as c_http1
from agent.waypoint.codec import Http2Connection, RequestHead, Role

SRC = source_world()
s_http1 = SRC["agent.waypoint.codec.http1"]
s_headers = SRC["agent.waypoint.codec.headers"]
FUZZ = settings(
    max_examples=400,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)

texts = st.one_of(
    st.sampled_from(
        [
            "GET",
            "POST",
            "HEAD",
            "CONNECT",
            "get",
            "M-SEARCH",
            "/",
            "/a?b=c",
            "*",
            "a",
            "a:80",
            "[::1]:8",
            "é",
            "\xff",
            "日",
            "a b",
            "a\r\nb",
            "",
        ]
    ),
    st.text(max_size=8),
)
field_values = st.one_of(
    st.sampled_from([b"1", b"close", b"keep-alive", b"5", b"x\r\ny", b"\xff", b"", b" 5"]),
    st.binary(max_size=6),
)
field_lists = st.lists(
    st.tuples(
        st.sampled_from(
            [
                b"host",
                b"content-length",
                b"connection",
                b"x-a",
                b"transfer-encoding",
                b"keep-alive",
                b"te",
            ]
        ),
        field_values,
    ),
    max_size=4,
)


def outcome(f: Any, *args: Any) -> Any:
    try:
        return ("ok", f(*args))
    except Exception as e:
        return (type(e).__name__, str(e), getattr(e, "status", None))


def client_trace(
    mod: Any,
    hmod: Any,
    method: str,
    target: str,
    authority: str,
    fields: list[Any],
    end: bool,
    bodies: list[Any],
) -> list[Any]:
    conn = mod.Http1Connection(Role.CLIENT)
    out = [
        outcome(
            conn.send_request_head,
            1,
            method,
            target,
            authority,
            "http",
            hmod.Headers(list(fields)),
            end,
        )
    ]
    for body, last in bodies:
        out.append(outcome(conn.send_data, 1, body, last))
    out.append((conn.keep_alive, conn.idle, conn.should_close, conn.next_stream_id()))
    return out


@FUZZ
@given(
    texts,
    texts,
    texts,
    field_lists,
    st.booleans(),
    st.lists(st.tuples(st.sampled_from([b"", b"ab", b"\xff" * 5]), st.booleans()), max_size=3),
)
def test_request_heads_and_bodies_are_serialized_as_the_source_does(
    method: str, target: str, authority: str, fields: list[Any], end: bool, bodies: list[Any]
) -> None:
    for view in (False, True):
        bs = [(memoryview(b) if view else b, e) for b, e in bodies]
        assert client_trace(c_http1, c_headers, method, target, authority, fields, end, bs) == (
            client_trace(s_http1, s_headers, method, target, authority, fields, end, bs)
        )


def server_trace(
    mod: Any,
    hmod: Any,
    request: bytes,
    status: int,
    fields: list[Any],
    end: bool,
    bodies: list[Any],
) -> list[Any]:
    conn = mod.Http1Connection(Role.SERVER)
    out = [repr(outcome(conn.receive_data, request))]
    out.append(outcome(conn.send_response_head, 1, status, hmod.Headers(list(fields)), end))
    for body, last in bodies:
        out.append(outcome(conn.send_data, 1, body, last))
    out.append(outcome(conn.send_trailers, 1, hmod.Headers([(b"x-t", b"1")])))
    out.append((conn.keep_alive, conn.idle, conn.should_close, conn.paused))
    return out


@FUZZ
@given(
    st.sampled_from(
        [
            b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
            b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\n",
            b"GET / HTTP/1.0\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        ]
    ),
    st.sampled_from([100, 101, 103, 200, 204, 304, 404, 599, 600, 999, 1000, 99, 0, -1, 2**70]),
    field_lists,
    st.booleans(),
    st.lists(st.tuples(st.sampled_from([b"", b"ab", b"\xff" * 5]), st.booleans()), max_size=3),
)
def test_response_heads_and_bodies_are_serialized_as_the_source_does(
    request: bytes, status: int, fields: list[Any], end: bool, bodies: list[Any]
) -> None:
    for view in (False, True):
        bs = [(memoryview(b) if view else b, e) for b, e in bodies]
        assert server_trace(c_http1, c_headers, request, status, fields, end, bs) == (
            server_trace(s_http1, s_headers, request, status, fields, end, bs)
        )


def h2_request(*extra: tuple[bytes, bytes]) -> RequestHead:
    """A request head as the waypoint's HTTP/2 codec decodes it (h2's HeaderTuple fields)."""
    from h2.config import H2Configuration
    from h2.connection import H2Connection

    client = H2Connection(H2Configuration(client_side=True, header_encoding=None))
    client.initiate_connection()
    client.send_headers(
        1,
        [
            (b":method", b"POST"),
            (b":path", b"/v1/x"),
            (b":scheme", b"http"),
            (b":authority", b"llm.ai:8000"),
            (b"cookie", b"a=1"),
            (b"cookie", b"b=2"),
            *extra,
        ],
        end_stream=True,
    )
    server = Http2Connection(Role.SERVER)
    events = server.receive_data(client.data_to_send())
    heads = [e for e in events if isinstance(e, RequestHead)]
    assert heads, events
    return heads[0]


def test_an_http2_request_head_goes_through_the_compiled_headers_and_http1() -> None:
    head = h2_request((b"x-secret", b"s"), (b"te", b"trailers"), (b"connection", b"x"))
    assert type(head.headers) is c_headers.Headers
    h = head.headers.copy()
    assert h.get(b"cookie") == b"a=1; b=2"
    h.strip_hop_by_hop()
    h.set(b"x-request-id", b"1")
    h.update([(b"x-a", b"b")])
    wire = c_http1.Http1Connection(Role.CLIENT).send_request_head(
        1, head.method, head.target, head.authority, head.scheme, h, True
    )
    assert wire.startswith(b"POST /v1/x HTTP/1.1\r\nhost: llm.ai:8000\r\n")


# ---- absolute-form targets (found: compiled answers 400 where the source parses) ------------

ABSOLUTE = [
    b"http://h/",
    b"http://h:8/",
    b"http://h:0/",
    b"http://h:8/?q=1",
    b"http://h:8",
    b"http://h:8?q=1",
    b"http://h",
    b"HTTP://h:8/",
    b"https://h/x?y",
    b"http://u:p@h:8/x",
    b"http://h:8/x#f",
    b"http://h:81/p?q=1",
    b"http:///x",
    b"http://[::1]:8/",
]


def parse(mod: Any, chunks: list[bytes]) -> list[Any]:
    conn = mod.Http1Connection(Role.SERVER)
    out: list[Any] = []
    for chunk in chunks:
        try:
            out += [repr(e) for e in conn.receive_data(chunk)]
        except Exception as e:
            out.append((type(e).__name__, getattr(e, "status", None)))
            break
    return out


@pytest.mark.parametrize("url", ABSOLUTE)
def test_absolute_form_targets_parse_as_the_source_does(url: bytes) -> None:
    """`GET http://host/path HTTP/1.1` (a client configured with a proxy): httptools' stub
    says URL.port is int and path/query are bytes, but absent parts are None; compiled code
    trusts the stub and raises TypeError in the callback, so the waypoint answers 400."""
    request = b"GET " + url + b" HTTP/1.1\r\nHost: a\r\n\r\n"
    assert parse(c_http1, [request]) == parse(s_http1, [request])


@FUZZ
@given(
    st.sampled_from(["http", "https", "HTTP", "Https"]),
    st.sampled_from(["", "u@", "u:p@"]),
    st.sampled_from(["h", "a.b", "10.0.0.1", "x-y.svc"]),
    st.sampled_from(["", ":1", ":80", ":0", ":65535"]),
    st.sampled_from(["", "/", "/a/b", "/%41", "/a;b"]),
    st.sampled_from(["", "?", "?q=1", "?a=b&c"]),
    st.sampled_from(["", "#f"]),
    st.lists(st.integers(0, 80), max_size=2),
)
def test_absolute_form_fuzz(
    scheme: str,
    user: str,
    host: str,
    port: str,
    path: str,
    query: str,
    frag: str,
    cuts_at: list[int],
) -> None:
    url = f"{scheme}://{user}{host}{port}{path}{query}{frag}".encode()
    request = b"GET " + url + b" HTTP/1.1\r\nHost: a\r\n\r\n"
    at = sorted({c % (len(request) + 1) for c in cuts_at})
    chunks = [
        request[a:b] for a, b in zip([0, *at], [*at, len(request)], strict=True) if request[a:b]
    ]
    assert parse(c_http1, chunks) == parse(s_http1, chunks)
