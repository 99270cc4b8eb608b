"""The waypoint's caller side (`Downstream`) over real loopback TCP, driven by clients weft
did not write: curl (HTTP/1.1, the h2c upgrade offer of `--http2`, h2c prior knowledge, a
proxy CONNECT) and the `h2` library (HTTP/2 CONNECT and extended CONNECT, sent by hand).

The handler echoes what it got (method, target, body length, headers) as JSON, so no mesh is
needed. Every client call has a timeout, and after each exchange no `Exchange` is left."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import h2.events as h2e
import pytest
import uvloop
from h2.config import H2Configuration
from h2.connection import H2Connection

from agent.waypoint.codec import ErrorCode, Headers
from agent.waypoint.downstream import BODY_QUEUE, NO_TUNNELS, CallerInfo, Downstream, Exchange

pytestmark = pytest.mark.timeout(60)

CURL = shutil.which("curl")
NGHTTP = shutil.which("nghttp")
needs_curl = pytest.mark.skipif(CURL is None, reason="curl is not installed")
CALLER = CallerInfo("spiffe://cluster.local/ns/apps/sa/client", "10.0.0.7", "ai", "llm", "", 80)
TIMEOUT = 10.0  # seconds any one client call may take; they take milliseconds
BODY = b"0123456789" * 300  # 3,000 bytes


async def echo(x: Exchange) -> None:
    """Read the whole body, then answer with what arrived; /early answers 403 at once and
    never reads the body (as an authorization deny would)."""
    if x.head.target == "/early":
        x.local_reply(403, b"denied\n")
        return
    if x.head.target == "/early-big":  # a large answer, complete before the body is read
        x.local_reply(200, b"a" * 300_000)
        return
    if x.head.target == "/deny-when-full":
        # Answered without reading, once the body has filled its queue (the connection
        # has stopped reading by then).
        async with asyncio.timeout(TIMEOUT):
            while x.body.qsize() < BODY_QUEUE - 1:  # noqa: ASYNC110 - no event for it
                await asyncio.sleep(0.005)
        x.local_reply(403, b"denied\n")
        return
    n = 0
    while (chunk := await x.body.get()) is not None:
        n += len(chunk)
        x.conn.consumed(x, len(chunk))
    if x.reset:
        return
    seen = {
        "method": x.head.method,
        "target": x.head.target,
        "length": n,
        "headers": {k.decode(): v.decode("latin-1") for k, v in x.head.headers},
    }
    body = json.dumps(seen).encode() + b"\n"
    x.local_reply(200, body, Headers.of(("content-type", "application/json")))


class Server:
    def __init__(self) -> None:
        self.conns: list[Downstream] = []
        self.port = 0

    def protocol(self) -> Downstream:
        d = Downstream(CALLER, echo)
        self.conns.append(d)
        return d

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def settled(self) -> None:
        """Every connection is left with no exchange and no handler task running."""
        for _ in range(200):
            if not any(d.tasks for d in self.conns):
                break
            await asyncio.sleep(0.01)
        assert [d.exchanges for d in self.conns if d.exchanges] == []
        assert not any(d.tasks for d in self.conns)


@asynccontextmanager
async def serving() -> AsyncIterator[Server]:
    s = Server()
    srv = await asyncio.get_running_loop().create_server(s.protocol, "127.0.0.1", 0)
    s.port = srv.sockets[0].getsockname()[1]
    try:
        yield s
    finally:
        srv.close()
        for d in s.conns:
            d.close()
        await srv.wait_closed()


def run(main: Any) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(45):
            await main()

    uvloop.run(bounded())


@pytest.fixture(autouse=True)
def no_tracebacks(caplog: pytest.LogCaptureFixture) -> Any:
    """Nothing here may log an error or a traceback: refusals are logged at INFO."""
    caplog.set_level(logging.INFO, logger="weft")
    yield
    bad = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert bad == [], [r.getMessage() for r in bad]


async def curl(*args: str) -> tuple[int, str, str]:
    """curl's exit code, stdout and stderr; killed if it outlives TIMEOUT."""
    assert CURL is not None
    proc = await asyncio.create_subprocess_exec(
        CURL, "-sS", "-m", str(TIMEOUT - 2), *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(proc.communicate(), TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"curl {' '.join(args)} hung") from None
    return proc.returncode or 0, out.decode(), err.decode()


WRITE_OUT = "## %{http_code} %{http_version} %{num_connects}\n"


def replies(stdout: str) -> list[tuple[dict[str, Any], str, str, str]]:
    """The echoed JSON, status, HTTP version and new connections of each transfer: each
    echoed body is one line, and WRITE_OUT's line follows it (a -w that starts with @
    would name a file, hence ##)."""
    lines = stdout.splitlines()
    return [
        (json.loads(lines[i - 1]), *line.split()[1:])
        for i, line in enumerate(lines)
        if line.startswith("## ")
    ]


UPGRADE_FIELDS = {"upgrade", "http2-settings", "connection", "expect"}


# ------------------------------------------------------------------------ curl: HTTP/1.1


@needs_curl
@pytest.mark.parametrize("post", [False, True], ids=["GET", "POST"])
def test_http11_get_and_post(tmp_path: Path, post: bool) -> None:
    """curl --http1.1: a GET and a POST with a body are answered, keep-alive, with the
    whole body seen by the handler."""
    (tmp_path / "body").write_bytes(BODY)
    data = ["--data-binary", f"@{tmp_path / 'body'}"] if post else []

    async def main() -> None:
        async with serving() as s:
            url = s.url + "/v1/x?a=1"
            rc, out, err = await curl("--http1.1", *data, "-w", WRITE_OUT, url, url)
            assert rc == 0, err
            for seen, status, version, _ in replies(out):
                assert (status, version) == ("200", "1.1")
                assert seen["method"] == ("POST" if post else "GET")
                assert seen["target"] == "/v1/x?a=1"
                assert seen["length"] == (len(BODY) if post else 0)
            assert [r[3] for r in replies(out)] == ["1", "0"]  # one connection, reused
            await s.settled()

    run(main)


@needs_curl
def test_expect_100_continue_is_answered_at_once(tmp_path: Path) -> None:
    """`Expect: 100-continue` gets its 100 straight away (curl is told to wait 30 s for
    it, far past its -m limit) and the expectation is not passed on to the handler."""
    (tmp_path / "body").write_bytes(BODY)

    async def main() -> None:
        async with serving() as s:
            rc, out, err = await curl(
                "-v", "--http1.1", "-H", "Expect: 100-continue", "--expect100-timeout", "30",
                "--data-binary", f"@{tmp_path / 'body'}", "-w", WRITE_OUT, s.url + "/up",
            )  # fmt: skip
            assert rc == 0, err
            assert "< HTTP/1.1 100 Continue" in err
            ((seen, status, _, _),) = replies(out)
            assert status == "200" and seen["length"] == len(BODY)
            assert "expect" not in seen["headers"]
            await s.settled()

    run(main)


# ------------------------------------------------------------- curl: the h2c upgrade offer


@needs_curl
@pytest.mark.parametrize(
    "args, method, length",
    [
        ([], "GET", 0),
        (["-d", "hello"], "POST", 5),
        (["--data-binary", "@BODY"], "POST", len(BODY)),
        (["-H", "Transfer-Encoding: chunked", "--data-binary", "@BODY"], "POST", len(BODY)),
        (
            ["-H", "Expect: 100-continue", "--expect100-timeout", "30", "--data-binary", "@BODY"],
            "POST",
            len(BODY),
        ),
    ],
    ids=["GET", "POST-small", "POST-3000", "POST-chunked", "POST-expect-100"],
)
def test_h2c_upgrade_offer_is_declined_and_served_over_http11(
    tmp_path: Path, args: list[str], method: str, length: int
) -> None:
    """curl --http2 offers h2c (Upgrade, Connection, HTTP2-Settings). The offer is
    ignored (RFC 9113 section 3.1): the request is answered over HTTP/1.1 with its whole
    body, whatever its framing, none of the offer reaches the handler, and the connection
    carries a second request. (The body used to be cut off at the head and read as the
    next request: the handler got an empty body for a Content-Length that promised more.)"""
    (tmp_path / "body").write_bytes(BODY)
    args = [f"@{tmp_path / 'body'}" if a == "@BODY" else a for a in args]

    async def main() -> None:
        async with serving() as s:
            url = s.url + "/v1/chat"
            rc, out, err = await curl("--http2", *args, "-w", WRITE_OUT, url, url)
            assert rc == 0, err
            got = replies(out)
            assert len(got) == 2
            for seen, status, version, _ in got:
                assert (status, version) == ("200", "1.1")
                assert (seen["method"], seen["target"], seen["length"]) == (
                    method,
                    "/v1/chat",
                    length,
                )
                assert UPGRADE_FIELDS.isdisjoint(seen["headers"]), seen["headers"]
            assert [r[3] for r in got] == ["1", "0"]
            await s.settled()

    run(main)


# ---------------------------------------------------------- curl: h2c prior knowledge


@needs_curl
@pytest.mark.parametrize("post", [False, True], ids=["GET", "POST"])
def test_h2c_prior_knowledge_get_and_post(tmp_path: Path, post: bool) -> None:
    """curl --http2-prior-knowledge: GET and POST are served over HTTP/2. (One URL per
    curl: curl 7.88 itself fails to reuse a prior-knowledge connection, curl/curl#10634.)"""
    (tmp_path / "body").write_bytes(BODY)
    data = ["--data-binary", f"@{tmp_path / 'body'}"] if post else []

    async def main() -> None:
        async with serving() as s:
            rc, out, err = await curl(
                "--http2-prior-knowledge", *data, "-w", WRITE_OUT, s.url + "/v1/x"
            )
            assert rc == 0, err
            ((seen, status, version, _),) = replies(out)
            assert (status, version) == ("200", "2")
            assert seen["method"] == ("POST" if post else "GET")
            assert seen["length"] == (len(BODY) if post else 0)
            await s.settled()

    run(main)


@pytest.mark.skipif(NGHTTP is None, reason="nghttp (nghttp2-client) is not installed")
@pytest.mark.parametrize("post", [False, True], ids=["GET", "POST"])
def test_h2c_prior_knowledge_streams_share_a_connection(tmp_path: Path, post: bool) -> None:
    """nghttp sends two requests at once on one h2c connection (with a 100,000-byte body
    each for POST, more than the initial 65,535-byte window); both are answered."""
    (tmp_path / "body").write_bytes(b"b" * 100_000)
    data = ["-d", str(tmp_path / "body")] if post else []

    async def main() -> None:
        async with serving() as s:
            assert NGHTTP is not None
            proc = await asyncio.create_subprocess_exec(
                NGHTTP, "-t", f"{TIMEOUT - 2:.0f}s", *data, s.url + "/a", s.url + "/b",
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            out, err = await asyncio.wait_for(proc.communicate(), TIMEOUT)
            assert proc.returncode == 0, err.decode()
            seen = [json.loads(line) for line in out.decode().splitlines()]
            assert sorted(x["target"] for x in seen) == ["/a", "/b"]
            assert {x["length"] for x in seen} == {100_000 if post else 0}
            assert len(s.conns) == 1
            await s.settled()

    run(main)


# --------------------------------------------------------------------- CONNECT, HTTP/1.1


@needs_curl
def test_http11_connect_from_curl_gets_405(tmp_path: Path) -> None:
    """curl using the waypoint as a proxy tunnel (CONNECT llm:443) is told 405 and gives up
    cleanly (exit 56: the tunnel failed), with no traceback on our side."""

    async def main() -> None:
        async with serving() as s:
            rc, _, err = await curl("-v", "-p", "-x", s.url, "http://llm:443/")
            assert rc == 56, err
            assert "> CONNECT llm:443 HTTP/1.1" in err
            assert "< HTTP/1.1 405 Method Not Allowed" in err
            await s.settled()

    run(main)


def test_http11_connect_gets_405_and_the_connection_closes() -> None:
    """A raw `CONNECT host:443 HTTP/1.1` gets one 405 with a short text body, then the
    connection is closed (what follows a CONNECT head is tunnel bytes, not HTTP)."""

    async def main() -> None:
        async with serving() as s:
            r, w = await asyncio.open_connection("127.0.0.1", s.port)
            w.write(b"CONNECT llm:443 HTTP/1.1\r\nHost: llm:443\r\n\r\n\x16\x03\x01tls bytes")
            reply = await asyncio.wait_for(r.read(), TIMEOUT)  # to EOF: the server closes
            w.close()
            head, _, body = reply.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 405 Method Not Allowed\r\n")
            assert b"connection: close" in head
            assert body == NO_TUNNELS
            await s.settled()

    run(main)


# ------------------------------------------------------------------ CONNECT, HTTP/2 (h2)


class H2Client:
    """A hand-driven h2 client (h2c prior knowledge) over an asyncio stream."""

    def __init__(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.r, self.w = r, w
        # Outbound validation off so a CONNECT with :protocol can be sent at all.
        self.h2 = H2Connection(
            H2Configuration(client_side=True, header_encoding=None, validate_outbound_headers=False)
        )
        self.h2.initiate_connection()
        self.flush()
        self.status: dict[int, int] = {}
        self.body: dict[int, bytes] = {}
        self.ended: set[int] = set()
        self.resets: dict[int, int] = {}

    @classmethod
    async def connect(cls, port: int) -> H2Client:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    def flush(self) -> None:
        self.w.write(self.h2.data_to_send())

    def request(
        self, method: str, path: str | None, body: bytes = b"", end: bool = True, **pseudo: str
    ) -> int:
        sid = self.h2.get_next_available_stream_id()
        fields = [(":method", method), (":authority", "llm:443" if path is None else "llm")]
        if path is not None:
            fields += [(":scheme", "http"), (":path", path)]
        fields += [(f":{k}", v) for k, v in pseudo.items()]
        self.h2.send_headers(sid, fields, end_stream=end and not body)
        for i in range(0, len(body), 16384):  # the default SETTINGS_MAX_FRAME_SIZE
            chunk = body[i : i + 16384]
            self.h2.send_data(sid, chunk, end_stream=end and i + len(chunk) == len(body))
        self.flush()
        return sid

    async def until_done(self, *sids: int) -> None:
        """Read until each stream has ended or been reset."""
        await self._until(lambda: all(s in self.ended or s in self.resets for s in sids))

    async def until_reset(self, sid: int) -> int:
        """Read until the waypoint resets `sid`; its error code."""
        await self._until(lambda: sid in self.resets)
        return self.resets[sid]

    async def _until(self, done: Any) -> None:
        async with asyncio.timeout(TIMEOUT):
            while not done():
                data = await self.r.read(65536)
                assert data, "the waypoint closed the connection"
                for e in self.h2.receive_data(data):
                    if isinstance(e, h2e.ResponseReceived):
                        self.status[e.stream_id] = int(dict(e.headers)[b":status"])
                    elif isinstance(e, h2e.DataReceived):
                        self.body[e.stream_id] = self.body.get(e.stream_id, b"") + e.data
                        self.h2.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
                    elif isinstance(e, h2e.StreamEnded):
                        self.ended.add(e.stream_id)
                    elif isinstance(e, h2e.StreamReset):
                        self.resets[e.stream_id] = e.error_code
                self.flush()

    def close(self) -> None:
        self.w.close()


@pytest.mark.parametrize("end", [False, True], ids=["tunnel-open", "headers-only"])
def test_h2_connect_gets_405_on_its_stream_and_other_streams_carry_on(end: bool) -> None:
    """An HTTP/2 CONNECT gets 405 with a short text body on its own stream, and is reset
    with NO_ERROR if the client was still sending (RFC 9113 section 8.1); streams opened
    before and after it are answered on the same connection. The handler never sees it."""

    async def main() -> None:
        async with serving() as s:
            c = await H2Client.connect(s.port)
            before = c.request("POST", "/before", b"x" * 1000)
            tunnel = c.request("CONNECT", None, b"\x16\x03\x01hello" if not end else b"", end=end)
            after = c.request("GET", "/after")
            await c.until_done(before, tunnel, after)
            assert c.status[tunnel] == 405
            assert c.body[tunnel] == NO_TUNNELS
            assert tunnel in c.ended
            if not end:  # the client was still sending: asked to stop, without an error
                assert await c.until_reset(tunnel) == ErrorCode.NO_ERROR
            else:
                assert tunnel not in c.resets
            assert (c.status[before], json.loads(c.body[before])["length"]) == (200, 1000)
            assert (c.status[after], json.loads(c.body[after])["target"]) == (200, "/after")
            await s.settled()
            c.close()

    run(main)


def test_h2_extended_connect_is_reset_and_other_streams_carry_on() -> None:
    """Extended CONNECT (:protocol websocket, RFC 8441) without our having offered
    SETTINGS_ENABLE_CONNECT_PROTOCOL is a malformed request: RST_STREAM(PROTOCOL_ERROR) on
    that stream alone, no traceback, and the connection goes on serving."""

    async def main() -> None:
        async with serving() as s:
            c = await H2Client.connect(s.port)
            ws = c.request("CONNECT", "/chat", end=False, protocol="websocket")
            after = c.request("GET", "/after")
            await c.until_done(ws, after)
            assert c.resets[ws] == ErrorCode.PROTOCOL_ERROR and ws not in c.status
            assert c.status[after] == 200
            await s.settled()
            c.close()

    run(main)


def test_h2_early_answer_resets_the_stream_and_returns_its_window() -> None:
    """A response complete before its request body (a deny, say) resets the stream with
    NO_ERROR, and the body bytes nobody read go back to the connection window: 20 such
    requests of 60,000 bytes each (more than the 1 MiB connection window) and a normal POST
    after them all get through on one connection."""

    async def main() -> None:
        async with serving() as s:
            c = await H2Client.connect(s.port)
            for _ in range(20):
                sid = c.request("POST", "/early", b"y" * 60_000, end=False)
                assert await c.until_reset(sid) == ErrorCode.NO_ERROR
                assert (c.status[sid], c.body[sid]) == (403, b"denied\n")
            last = c.request("POST", "/last", b"z" * 100_000)
            await c.until_done(last)
            assert json.loads(c.body[last])["length"] == 100_000
            await s.settled()
            c.close()

    run(main)


def test_h2_early_answer_larger_than_the_window_arrives_whole_before_the_reset() -> None:
    """A complete answer of 300,000 bytes while the client is still sending its body, over
    a 65,535-byte window: all of it arrives, ended, and only then is the stream reset with
    NO_ERROR (RFC 9113 8.1: after sending a complete response). The reset used to go out at
    once and drop what waited for the window: the client got 65,535 bytes."""

    async def main() -> None:
        async with serving() as s:
            c = await H2Client.connect(s.port)
            sid = c.request("POST", "/early-big", b"y" * 1000, end=False)
            await c._until(lambda: sid in c.ended or sid in c.resets)
            assert sid in c.ended and len(c.body[sid]) == 300_000
            assert await c.until_reset(sid) == ErrorCode.NO_ERROR
            await s.settled()
            c.close()

    run(main)


def test_an_idle_h2_connection_is_closed_with_goaway_after_the_idle_timeout() -> None:
    """As an HTTP/1.1 one between requests: once its last stream is done, an HTTP/2
    connection runs the idle timeout, and is closed with GOAWAY(NO_ERROR) when it passes
    (it used to stay open for good once its first stream had disarmed the head timer)."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        srv = await loop.create_server(
            lambda: Downstream(CALLER, echo, idle_timeout=0.3), "127.0.0.1", 0
        )
        port = srv.sockets[0].getsockname()[1]
        try:
            c = await H2Client.connect(port)
            sid = c.request("GET", "/x")
            await c.until_done(sid)
            goaway = []
            async with asyncio.timeout(TIMEOUT):
                while data := await c.r.read(65536):
                    goaway += [
                        e
                        for e in c.h2.receive_data(data)
                        if isinstance(e, h2e.ConnectionTerminated)
                    ]
            assert [g.error_code for g in goaway] == [ErrorCode.NO_ERROR]
            c.close()
        finally:
            srv.close()
            await srv.wait_closed()

    run(main)


def test_h2_early_answer_to_a_body_that_paused_the_connection_reads_on() -> None:
    """A stream's body fills its queue, so the connection stops reading (backpressure), and
    then the stream is answered without its body being read (a deny): the connection reads
    on, and the next request on it is served (before the fix it was never read)."""

    async def main() -> None:
        async with serving() as s:
            c = await H2Client.connect(s.port)
            await c._until(lambda: c.h2.remote_settings.initial_window_size > 65535)
            # BODY_QUEUE frames of 16 KB, within the stream's window: more than the queue
            # holds before the connection pauses.
            sid = c.request("POST", "/deny-when-full", b"y" * (BODY_QUEUE * 16384), end=False)
            assert await c.until_reset(sid) == ErrorCode.NO_ERROR
            last = c.request("POST", "/last", b"z" * 1000)
            await c.until_done(last)
            assert json.loads(c.body[last])["length"] == 1000
            await s.settled()
            c.close()

    run(main)


def test_the_style_of_the_mesh_answers_follows_the_request_once_the_handler_says() -> None:
    """Exchange.style: TEXT until the handler sets ai_service, then what style_of says for
    the request's content type (worked out when first read); setting it wins."""
    from agent.waypoint.codec import events as ev
    from agent.waypoint.errors import Style

    caller = CallerInfo(None, "10.0.0.1", "ns", "svc", "10.96.0.1", 80)

    def exchange(ctype: bytes) -> Exchange:
        head = ev.RequestHead(
            1, "POST", "/", "svc", "http", Headers([(b"content-type", ctype)]), False
        )
        return Exchange(None, 1, head, caller)  # type: ignore[arg-type]

    x = exchange(b"application/grpc+proto")
    assert x.style is Style.TEXT  # the handler has not said
    for ai, ctype, style in (
        (False, b"application/grpc", Style.GRPC),
        (True, b"application/grpc", Style.GRPC),
        (True, b"application/json", Style.OPENAI),
        (False, b"application/json", Style.TEXT),
    ):
        x = exchange(ctype)
        x.ai_service = ai
        assert x.style is style
    x = exchange(b"application/json")
    x.ai_service = True
    x.style = Style.TEXT
    assert x.style is Style.TEXT


def test_a_failed_handler_gets_its_request_answered_and_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A handler that raises before answering: 500 and the connection carries on; one that
    raises past its response head: the response is cut (HTTP/1.1 closes). Both are logged
    with their traceback, and no handler task is left."""

    async def failing(x: Exchange) -> None:
        if x.head.target == "/late":
            x.respond_head(200, Headers.of(("content-length", "10")))
            await asyncio.sleep(0)
        raise RuntimeError("handler bug")

    async def main() -> None:
        d: list[Downstream] = []

        def protocol() -> Downstream:
            d.append(Downstream(CALLER, failing))
            return d[-1]

        srv = await asyncio.get_running_loop().create_server(protocol, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"GET /early HTTP/1.1\r\nhost: a\r\n\r\n")
        head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), TIMEOUT)
        assert head.startswith(b"HTTP/1.1 500"), head
        n = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        assert b"internal error" in await r.readexactly(n)
        w.write(b"GET /late HTTP/1.1\r\nhost: a\r\n\r\n")  # same connection
        head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), TIMEOUT)
        assert head.startswith(b"HTTP/1.1 200"), head
        assert await asyncio.wait_for(r.read(), TIMEOUT) == b""  # cut short: closed
        w.close()
        srv.close()
        await srv.wait_closed()
        assert not d[0].tasks

    run(main)
    failed = [r for r in caplog.records if r.getMessage().startswith("waypoint handler failed")]
    assert [r.getMessage() for r in failed] == [
        "waypoint handler failed for GET /early",
        "waypoint handler failed for GET /late",
    ]
    assert all(r.exc_info and r.exc_info[0] is RuntimeError for r in failed)
    caplog.clear()  # expected errors: the no_tracebacks fixture looks at what is left
