"""The modules weft runs compiled by mypyc (agent/compiled.py).

- CI tests what ships: every listed module is imported compiled there.
- An extension older than its source is named, so it cannot silently run old code.
- Compiled and interpreted, the HTTP/1.1 codec and the tunnel's HTTP/2 give the same
  events and the same errors for the same bytes (a differential fuzz: mypyc checks types
  at run time where the interpreter does not, so a wrong annotation would show here).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import string
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent import compiled
from agent.waypoint.codec import Data, Headers, Role

REQUIRE = os.environ.get("WEFT_REQUIRE_KERNEL") == "1"  # CI: .ci/run builds with make test
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def interpreted(module: str) -> ModuleType:
    """`module` loaded from its Python source under another name, beside the compiled one
    (its own imports resolve as usual)."""
    name = "_weft_source_" + module.replace(".", "_")
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, compiled.source(module))
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def built(module: str) -> ModuleType:
    mod = importlib.import_module(module)
    if not compiled.is_compiled(module):
        pytest.skip(f"{module} is not compiled here (make compiled builds it)")
    return mod


def test_every_listed_module_has_its_source_and_the_makefile_builds_the_list() -> None:
    for m in compiled.MODULES:
        assert compiled.source(m).is_file(), m
    makefile = (compiled.ROOT / "Makefile").read_text()
    assert "python3 agent/compiled.py" in makefile


@pytest.mark.skipif(not REQUIRE, reason="only CI (WEFT_REQUIRE_KERNEL=1) must test the build")
def test_ci_imports_every_listed_module_compiled() -> None:
    missing = [m for m in compiled.MODULES if not compiled.is_compiled(m)]
    for m in compiled.MODULES:
        importlib.import_module(m)
    missing = [m for m in compiled.MODULES if not compiled.is_compiled(m)]
    assert not missing, f"not compiled: {missing} (make compiled)"


def test_an_extension_older_than_its_source_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(compiled, "ROOT", tmp_path)
    mod = compiled.MODULES[0]
    src = compiled.source(mod)
    src.parent.mkdir(parents=True)
    src.write_text("x = 1\n")
    ext = src.with_name(src.stem + importlib.machinery.EXTENSION_SUFFIXES[0])
    ext.write_bytes(b"")
    os.utime(ext, (1_000, 1_000))
    assert compiled.stale() == [mod]
    assert "OLDER THAN THEIR SOURCE" in compiled.describe()
    os.utime(ext, None)
    os.utime(src, (1_000, 1_000))
    assert compiled.stale() == []


# ---- the HTTP/1.1 codec, compiled against interpreted ---------------------------------------

token = st.text(alphabet=string.ascii_lowercase + "-", min_size=1, max_size=8)
value = st.text(alphabet=string.ascii_letters + string.digits + " ;=/.,-\t", max_size=20)
REQUESTS = [
    b"GET /a HTTP/1.1\r\nHost: a\r\n\r\n",
    b"POST /m HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello",
    b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"3\r\nabc\r\n0\r\nx-t: 1\r\n\r\n",
    b"GET http://h:81/p?q=1 HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET / HTTP/1.0\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\n"
    b"HTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n\r\n",
]
RESPONSES = [
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n",
    b"HTTP/1.1 200 OK\r\n\r\nuntil close",
]


@st.composite
def streams(draw: Any, corpus: list[bytes]) -> tuple[bytes, list[int]]:
    """Messages from `corpus` with extra fields, then mutated bytes, cut at random."""
    out = b""
    for _ in range(draw(st.integers(1, 3))):
        msg = draw(st.sampled_from(corpus))
        extra = draw(st.lists(st.tuples(token, value), max_size=3))
        at = msg.index(b"\r\n") + 2
        fields = b"".join(b"%s: %s\r\n" % (n.encode(), v.encode()) for n, v in extra)
        out += msg[:at] + fields + msg[at:]
    for pos, byte in draw(
        st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=2)
    ):
        i = pos % len(out)
        out = out[:i] + bytes([byte]) + out[i + 1 :]
    cuts = draw(st.lists(st.integers(0, 10_000), max_size=4))
    return out, cuts


def pieces(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [
        p for p in (data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)) if p
    ]


def run(module: ModuleType, role: Role, chunks: list[bytes], method: str = "GET") -> list[Any]:
    """What a connection of `module`'s codec makes of `chunks`: events (body bytes as
    given, requests answered so pipelined ones go on; client role: the answers to one
    request of `method`) and errors, as plain values."""
    conn = module.Http1Connection(role)
    if role is Role.CLIENT:
        conn.send_request_head(1, method, "/", "a", "http", Headers(), end_stream=True)
    out: list[Any] = []
    for chunk in [*chunks, b""]:
        try:
            events = conn.receive_data(chunk)
            while events:
                e = events.pop(0)
                out.append(
                    ("data", e.stream_id, bytes(e.data), e.end_stream) if isinstance(e, Data) else e
                )
                if role is Role.SERVER and getattr(e, "end_stream", False):
                    conn.send_response_head(e.stream_id, 204, Headers(), end_stream=True)
                    events += conn.next_events()
        except Exception as exc:  # compared, type and all
            out.append((type(exc).__name__, str(exc), getattr(exc, "status", None)))
            break
    return out


@FUZZ
@given(streams(REQUESTS))
def test_the_compiled_codec_parses_requests_as_its_source_does(
    case: tuple[bytes, list[int]],
) -> None:
    native, source = built("agent.waypoint.codec.http1"), interpreted("agent.waypoint.codec.http1")
    chunks = pieces(*case)
    assert run(native, Role.SERVER, chunks) == run(source, Role.SERVER, chunks)


@FUZZ
@given(streams(RESPONSES))
def test_the_compiled_codec_parses_responses_as_its_source_does(
    case: tuple[bytes, list[int]],
) -> None:
    native, source = built("agent.waypoint.codec.http1"), interpreted("agent.waypoint.codec.http1")
    chunks = pieces(*case)
    assert run(native, Role.CLIENT, chunks) == run(source, Role.CLIENT, chunks)


# ---- the tunnel's HTTP/2, compiled against interpreted -------------------------------------


@FUZZ
@given(
    st.lists(st.binary(min_size=1, max_size=200), min_size=1, max_size=4),
    st.lists(st.tuples(st.integers(0, 5), st.binary(max_size=300)), max_size=4),
)
def test_the_compiled_tunnel_h2_answers_bytes_as_its_source_does(
    junk: list[bytes], sends: list[tuple[int, bytes]]
) -> None:
    native, source = built("agent.tunnel.h2"), interpreted("agent.tunnel.h2")

    def trace(module: ModuleType) -> list[Any]:
        client = module.H2Connection(client=True)
        server = module.H2Connection(client=False)
        out: list[Any] = []
        try:
            client.initiate()
            server.initiate()
            sid = client.open_stream("10.0.0.1:80")
            out.append(repr(server.receive_data(bytes(client.data_to_send()))))
            out.append(repr(client.receive_data(bytes(server.data_to_send()))))
            for n, payload in sends:
                out.append(client.send_data(sid, payload, end_stream=n == 0))
            out.append(repr(server.receive_data(bytes(client.data_to_send()))))
            for j in junk:
                out.append(repr(server.receive_data(j)))
        except Exception as exc:  # compared, type and all
            out.append((type(exc).__name__, str(exc)))
        out.append(bytes(server.data_to_send()))
        return out

    assert trace(native) == trace(source)
