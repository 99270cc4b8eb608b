"""The modules weft runs compiled by mypyc (agent/compiled.py).

- CI tests what ships: every listed module is imported compiled there.
- An extension older than its source is named, so it cannot silently run old code.
- Compiled and interpreted, the HTTP/1.1 codec parses the same bytes into the same events
  and errors (a differential fuzz: mypyc checks types at run time where the interpreter
  does not, so a wrong annotation shows here). test_compiled_http1.py, _h2.py and
  _engine.py do the same for serializing, the tunnel's HTTP/2, paths, routes and headers.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import os
import string
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent import compiled
from agent.waypoint.codec import Role
from tests.unit.source_world import source_world

REQUIRE = os.environ.get("WEFT_REQUIRE_KERNEL") == "1"  # CI: .ci/run builds with make test
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def interpreted(module: str) -> ModuleType:
    """`module` as its Python source, with the other listed modules' source beside it."""
    return source_world()[module]


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


def test_the_compiled_modules_import_from_any_working_directory(tmp_path: Path) -> None:
    """Not only from the checkout's root: `weft agent run` is a console script, and lab
    processes start elsewhere. (mypyc leaves the modules' shared runtime at the root of the
    tree; `make compiled` moves it into the venv.)"""
    built("agent.tunnel.h2")
    code = (
        "from agent import compiled; import agent.tunnel.h2, agent.waypoint.codec.http1;"
        "print(all(map(compiled.is_compiled, compiled.MODULES)))"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr[-600:]
    assert r.stdout.strip() == "True"


def test_header_names_a_route_filter_removes_are_tokens() -> None:
    """A name that is not a token cannot reach the compiled engine: mypyc's str.lower()
    maps code points one at a time (a final capital sigma lowers to U+03C3 where Python's
    gives U+03C2), so non-ASCII names would compile to different bytes."""
    from pydantic import ValidationError

    from controller.model.routing import HeaderModifier

    assert HeaderModifier(remove=["X-Debug"]).remove == ["X-Debug"]
    for bad in ("AΣ", "x y", "", "a:b"):
        with pytest.raises(ValidationError, match="remove"):
            HeaderModifier(remove=[bad])


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
    b"GET http://h/ HTTP/1.1\r\nHost: a\r\n\r\n",  # no port: parse_url gives None
    b"GET https://[::1]:8 HTTP/1.1\r\nHost: a\r\n\r\n",  # no path, no query
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


def plain(event: Any) -> Any:
    """An event as values (the two sides' Headers and event classes are distinct)."""
    fields = getattr(event, "__dataclass_fields__", {})
    values = [getattr(event, f) for f in fields]
    return (
        type(event).__name__,
        *[list(v) if type(v).__name__ == "Headers" else v for v in values],
    )


def run(module: ModuleType, role: Role, chunks: list[bytes], method: str = "GET") -> list[Any]:
    """What a connection of `module`'s codec makes of `chunks`: events (requests answered so
    pipelined ones go on; client role: the answers to one request of `method`) and errors,
    as plain values."""
    conn = module.Http1Connection(role)
    if role is Role.CLIENT:
        conn.send_request_head(1, method, "/", "a", "http", module.Headers(), end_stream=True)
    out: list[Any] = []
    for chunk in [*chunks, b""]:
        try:
            events = conn.receive_data(chunk)
            while events:
                e = events.pop(0)
                out.append(plain(e))
                if role is Role.SERVER and getattr(e, "end_stream", False):
                    conn.send_response_head(e.stream_id, 204, module.Headers(), end_stream=True)
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
