"""Active health probes (agent/waypoint/probes.py) against real servers on 127.0.0.1: a
grpcio server with the standard grpc.health.v1 servicer, scripted HTTP/2 servers for the
odd answers grpcio never gives, and tiny asyncio servers for HTTP/1.1 and for peers that
are not HTTP/2 at all. The waypoint's UpstreamConnection is the client, over plain TCP."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent import futures
from typing import Any

import grpc
import h2.events as h2e
import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection

from agent.waypoint.codec.errors import ProtocolError
from agent.waypoint.codec.headers import Headers
from agent.waypoint.engine.balancer import Endpoint
from agent.waypoint.engine.health import Probe
from agent.waypoint.probes import (
    Prober,
    ProbeResult,
    decode_messages,
    encode_message,
    run_probe,
)
from agent.waypoint.upstream import UpstreamConnection, UpstreamError
from controller.api.gen.grpc.health.v1 import health_pb2, health_pb2_grpc

pytestmark = pytest.mark.timeout(60)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
LONG_NAME = "weft.test." + "x" * 190  # 200 bytes: needs a two-byte protobuf length


class HealthServicer(health_pb2_grpc.HealthServicer):
    """The standard Check semantics: NOT_FOUND for a service the server does not know."""

    def __init__(self) -> None:
        self.statuses: dict[str, int] = {"": SERVING}
        self.seen: list[str] = []

    def Check(self, request: Any, context: Any) -> Any:
        self.seen.append(request.service)
        status = self.statuses.get(request.service)
        if status is None:
            context.abort(grpc.StatusCode.NOT_FOUND, "unknown service")
        return health_pb2.HealthCheckResponse(status=status)


@pytest.fixture(scope="module")
def grpc_server() -> Iterator[tuple[int, HealthServicer]]:
    servicer = HealthServicer()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield port, servicer
    server.stop(0)


@pytest.fixture
def health(grpc_server: tuple[int, HealthServicer]) -> Iterator[tuple[int, HealthServicer]]:
    port, servicer = grpc_server
    servicer.statuses = {"": SERVING}
    servicer.seen.clear()
    yield port, servicer


def probe(port: int, kind: str = "grpc", *, service: str = "", path: str = "/", timeout=2.0):
    return Probe(
        "ai/llm:8000",
        ("ai", "llm", 8000),
        Endpoint("127.0.0.1", port),
        kind,
        path,
        service,
        timeout,
        None,
    )


def dialer(port: int, *, h2: bool = True, opened: list[UpstreamConnection] | None = None):
    """An `acquire` that dials 127.0.0.1:port directly (no HBONE) and remembers the conn."""

    async def acquire() -> UpstreamConnection:
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(lambda: UpstreamConnection(h2=h2), "127.0.0.1", port)
        if opened is not None:
            opened.append(conn)
        return conn

    return acquire


def run(body: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(body())


def check(port: int, **kw: Any) -> ProbeResult:
    return run(lambda: run_probe(dialer(port), probe(port, **kw)))


async def serve(factory: Callable[[], asyncio.Protocol]) -> tuple[asyncio.Server, int]:
    server = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


# ---- gRPC against grpcio ---------------------------------------------------------------


def test_grpc_serving_passes_not_serving_fails_and_serving_again_passes(health):
    """Only SERVING passes; NOT_SERVING fails with the status as the reason; the endpoint
    is probed again afterwards and passes once it serves again."""
    port, servicer = health
    assert check(port) == ProbeResult(True, "")
    servicer.statuses[""] = NOT_SERVING
    assert check(port) == ProbeResult(False, "NOT_SERVING")
    servicer.statuses[""] = SERVING
    assert check(port).ok
    assert servicer.seen == ["", "", ""]


@pytest.mark.parametrize(
    "status",
    [health_pb2.HealthCheckResponse.UNKNOWN, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN],
)
def test_grpc_unknown_statuses_fail(health, status):
    """UNKNOWN and SERVICE_UNKNOWN are not SERVING: the probe fails and names the status."""
    port, servicer = health
    servicer.statuses["svc"] = status
    r = check(port, service="svc")
    assert not r.ok
    assert r.reason == health_pb2.HealthCheckResponse.ServingStatus.Name(status)


def test_grpc_service_name_of_200_bytes_is_encoded_exactly(health):
    """A service name >= 128 bytes (a two-byte protobuf length) reaches the server intact
    and passes when that service is SERVING."""
    port, servicer = health
    servicer.statuses[LONG_NAME] = SERVING
    assert len(LONG_NAME.encode()) == 200
    assert check(port, service=LONG_NAME).ok
    assert servicer.seen == [LONG_NAME]


def test_grpc_unknown_service_fails_with_not_found(health):
    """A service the server does not know is answered NOT_FOUND (trailers-only): a failed
    probe whose reason carries the grpc-status and its message."""
    port, servicer = health
    r = check(port, service=LONG_NAME)
    assert r == ProbeResult(False, "grpc-status 5 (NOT_FOUND): unknown service")
    assert servicer.seen == [LONG_NAME]


def test_probe_connection_is_closed_afterwards(health):
    """Each probe uses its own connection and closes it, passed or failed."""
    port, servicer = health
    opened: list[UpstreamConnection] = []

    async def body() -> None:
        assert (await run_probe(dialer(port, opened=opened), probe(port))).ok
        servicer.statuses[""] = NOT_SERVING
        assert not (await run_probe(dialer(port, opened=opened), probe(port))).ok

    run(body)
    assert len(opened) == 2
    assert all(c.closed and c.transport.is_closing() for c in opened)


def test_grpc_probe_over_http1_connection_fails(health):
    """A gRPC probe handed an HTTP/1.1 connection fails instead of speaking gRPC over it."""
    port, _ = health
    r = run(lambda: run_probe(dialer(port, h2=False), probe(port)))
    assert r == ProbeResult(False, "a gRPC probe needs an HTTP/2 connection")


# ---- gRPC answers grpcio does not give: a scripted HTTP/2 server -------------------------


GRPC_HEAD = [(b":status", b"200"), (b"content-type", b"application/grpc")]


class ScriptedH2(asyncio.Protocol):
    """An h2c server that answers each request with `script(h2, stream_id)`."""

    def __init__(self, script: Callable[[H2Connection, int], None]) -> None:
        self.script = script
        self.h2 = H2Connection(H2Configuration(client_side=False, header_encoding=None))
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.h2.initiate_connection()
        transport.write(self.h2.data_to_send())

    def data_received(self, data: bytes) -> None:
        for e in self.h2.receive_data(data):
            if isinstance(e, h2e.DataReceived):
                self.h2.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
            elif isinstance(e, h2e.StreamEnded):
                self.script(self.h2, e.stream_id)
        self.transport.write(self.h2.data_to_send())


def scripted(script: Callable[[H2Connection, int], None]) -> ProbeResult:
    async def body() -> ProbeResult:
        server, port = await serve(lambda: ScriptedH2(script))
        async with server:
            return await run_probe(dialer(port), probe(port))

    return run(body)


def answer(
    message: bytes,
    *,
    flag: int = 0,
    chunk: int = 0,
    trailers: bool = True,
    raw: bytes | None = None,
):
    """A script: the response message (prefixed with `flag`; or `raw` bytes as they are),
    split into DATA frames of `chunk` bytes (0: one frame), then grpc-status 0 trailers
    unless not `trailers`."""
    framed = raw if raw is not None else bytes([flag]) + encode_message(message)[1:]

    def script(h2: H2Connection, sid: int) -> None:
        h2.send_headers(sid, GRPC_HEAD)
        pieces = (
            [framed[i : i + chunk] for i in range(0, len(framed), chunk)] if chunk else [framed]
        )
        for i, p in enumerate(pieces):
            h2.send_data(sid, p, end_stream=not trailers and i == len(pieces) - 1)
        if trailers:
            h2.send_headers(sid, [(b"grpc-status", b"0")], end_stream=True)

    return script


SERVING_MSG = health_pb2.HealthCheckResponse(status=SERVING).SerializeToString()


def test_grpc_response_split_across_data_frames_is_reassembled():
    """The 5-byte prefix and the message may arrive over several DATA frames (here one byte
    each): the probe reassembles them and passes."""
    assert scripted(answer(SERVING_MSG, chunk=1)) == ProbeResult(True, "")


@pytest.mark.parametrize(
    ("script", "reason"),
    [
        (answer(SERVING_MSG, flag=1), "gRPC message with compressed flag 1"),
        (answer(b"\x08"), "malformed HealthCheckResponse"),
        (answer(SERVING_MSG, trailers=False), "response ended without trailers"),
        (answer(b"", raw=b"\x00\x00\x00\x00\x05\x08\x01"), "truncated gRPC message (2 of 5"),
    ],
    ids=["compressed", "malformed", "no-trailers", "truncated"],
)
def test_malformed_grpc_answers_fail_with_a_reason(script, reason):
    """A compressed message, bytes that are not a HealthCheckResponse, a response without
    trailers, or a cut-off message all fail, even where the bytes say SERVING."""
    r = scripted(script)
    assert not r.ok
    assert r.reason.startswith(reason), r.reason


def test_non_zero_grpc_status_fails_with_its_decoded_message():
    """A non-zero grpc-status in the trailers fails, with the percent-decoded grpc-message,
    even after a SERVING message."""

    def script(h2: H2Connection, sid: int) -> None:
        h2.send_headers(sid, GRPC_HEAD)
        h2.send_data(sid, encode_message(SERVING_MSG))
        trailers = [(b"grpc-status", b"14"), (b"grpc-message", b"draining%20now")]
        h2.send_headers(sid, trailers, end_stream=True)

    assert scripted(script) == ProbeResult(False, "grpc-status 14 (UNAVAILABLE): draining now")


def test_non_200_or_non_grpc_answers_fail():
    """An HTTP error status, or a 200 that is not application/grpc, is no health answer."""

    def unavailable(h2: H2Connection, sid: int) -> None:
        h2.send_headers(sid, [(b":status", b"503")], end_stream=True)

    def html(h2: H2Connection, sid: int) -> None:
        h2.send_headers(sid, [(b":status", b"200"), (b"content-type", b"text/html")])
        h2.send_data(sid, b"<p>ok</p>", end_stream=True)

    assert scripted(unavailable) == ProbeResult(False, "HTTP 503 instead of a gRPC answer")
    assert scripted(html) == ProbeResult(False, "content-type b'text/html' is not gRPC")


def test_stream_reset_by_backend_fails():
    """RST_STREAM instead of an answer is a failed probe, not an exception."""

    def reset(h2: H2Connection, sid: int) -> None:
        h2.reset_stream(sid, 2)

    r = scripted(reset)
    assert r == ProbeResult(False, "stream reset by the backend (code 2)")


def test_decode_messages_splits_and_checks_prefixes():
    """Length-prefixed messages are split at their 4-byte big-endian lengths; a prefix cut
    short fails."""
    two = encode_message(b"a" * 300) + encode_message(b"")
    assert decode_messages(two) == [b"a" * 300, b""]
    assert decode_messages(b"") == []
    with pytest.raises(Exception, match="truncated gRPC message prefix"):
        decode_messages(b"\x00\x00\x00")


# ---- peers that are not HTTP/2, or do not answer -----------------------------------------


class Http1Garbage(asyncio.Protocol):
    """A plain HTTP/1.1 server: answers 400 to anything (here: an HTTP/2 preface), at once
    on connecting when `greet`."""

    REPLY = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 3\r\nConnection: close\r\n\r\nno\n"

    def __init__(self, greet: bool) -> None:
        self.greet = greet
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        if self.greet:
            transport.write(self.REPLY)

    def data_received(self, data: bytes) -> None:
        if not self.greet:
            self.transport.write(self.REPLY)
            self.transport.close()


@pytest.mark.parametrize("greet", [False, True], ids=["answers", "greets-first"])
def test_server_that_is_not_http2_fails_the_probe(greet):
    """An HTTP/1.1 server's bytes are an HTTP/2 connection error: a failed probe with the
    protocol error as its reason, never an escaping exception. When the garbage arrives
    before the request is started, the reason is still the backend's error (not the codec's
    "connection is going away")."""

    async def body() -> ProbeResult:
        server, port = await serve(lambda: Http1Garbage(greet))
        plain = dialer(port)

        async def acquire() -> UpstreamConnection:
            conn = await plain()
            if greet:  # let the greeting arrive and kill the connection first
                await until_closed(conn)
            return conn

        async with server:
            return await run_probe(acquire, probe(port))

    r = run(body)
    assert not r.ok
    assert r.reason.startswith("protocol: backend broke HTTP: HTTP/2 connection error"), r.reason


async def until_closed(conn: UpstreamConnection) -> None:
    for _ in range(500):
        if conn.closed:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the connection did not fail")


class Silent(asyncio.Protocol):
    """Accepts, reads, never answers."""


def test_server_that_never_answers_fails_within_the_timeout():
    """The exchange is bounded by probe.timeout: a silent server fails the probe in time."""

    async def body() -> tuple[ProbeResult, float]:
        server, port = await serve(Silent)
        async with server:
            # Connected beforehand, so however slow the machine the timeout can only come
            # while waiting for the answer. The silent server would wait forever: ending
            # at all (within a generous 10 s) is the probe's own timeout at work.
            conn = await dialer(port)()

            async def connected() -> UpstreamConnection:
                return conn

            t0 = time.monotonic()
            async with asyncio.timeout(10):
                r = await run_probe(connected, probe(port, timeout=0.3))
            return r, time.monotonic() - t0

    r, took = run(body)
    assert r == ProbeResult(False, "timed out after 0.3s waiting for the answer")
    assert took >= 0.3 - 0.01  # not before the timeout either


def test_connecting_counts_against_the_timeout():
    """Acquiring the connection is inside probe.timeout too."""

    async def hang() -> UpstreamConnection:
        await asyncio.sleep(30)
        raise AssertionError("unreachable")

    r = run(lambda: run_probe(hang, probe(1, timeout=0.2)))
    assert r == ProbeResult(False, "timed out after 0.2s connecting")


def test_refused_connection_fails():
    """Nothing listening: a connect failure, not an exception."""

    async def body() -> ProbeResult:
        server, port = await serve(Silent)
        server.close()
        await server.wait_closed()
        return await run_probe(dialer(port), probe(port))

    r = run(body)
    assert not r.ok and r.reason.startswith("connect failure:"), r.reason


@pytest.mark.parametrize(
    "exc",
    [
        UpstreamError("connect-failure", "cannot reach 10.0.0.1:80"),
        ProtocolError("bad frame"),
        RuntimeError("boom"),
    ],
    ids=["upstream", "protocol", "other"],
)
def test_any_exception_becomes_a_failed_result(exc):
    """Whatever acquire (or the exchange) raises is a failed probe with its reason."""

    async def broken() -> UpstreamConnection:
        raise exc

    r = run(lambda: run_probe(broken, probe(1)))
    assert not r.ok and str(exc) in r.reason


def test_cancellation_propagates():
    """Cancelling a probe (shutdown) cancels it: CancelledError is not a probe result."""

    async def body() -> None:
        async def hang() -> UpstreamConnection:
            await asyncio.sleep(30)
            raise AssertionError("unreachable")

        task = asyncio.create_task(run_probe(hang, probe(1, timeout=10)))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(body)


# ---- HTTP probes -----------------------------------------------------------------------


class TinyHttp(asyncio.Protocol):
    """HTTP/1.1: 200 for /healthz, 500 for anything else; records request lines."""

    requests: list[bytes] = []

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if b"\r\n\r\n" not in self.buf:
            return
        line = self.buf.split(b"\r\n", 1)[0]
        TinyHttp.requests.append(self.buf.split(b"\r\n\r\n", 1)[0])
        status = b"200 OK" if line.split()[1] == b"/healthz" else b"500 Internal Server Error"
        self.transport.write(b"HTTP/1.1 " + status + b"\r\nContent-Length: 2\r\n\r\nok")


def test_http_probe_passes_on_200_and_fails_on_500():
    """HTTP probes GET the path over HTTP/1.1 with the endpoint as Host: 200 passes, 500
    fails with the status as the reason."""
    TinyHttp.requests.clear()

    async def body() -> tuple[ProbeResult, ProbeResult]:
        server, port = await serve(TinyHttp)
        async with server:
            ok = await run_probe(dialer(port, h2=False), probe(port, "http", path="/healthz"))
            bad = await run_probe(dialer(port, h2=False), probe(port, "http", path="/broken"))
            return ok, bad

    ok, bad = run(body)
    assert ok == ProbeResult(True, "")
    assert bad == ProbeResult(False, "HTTP 500")
    head = TinyHttp.requests[0].lower()
    assert head.startswith(b"get /healthz http/1.1") and b"\r\nhost: 127.0.0.1:" in head


# ---- logging ---------------------------------------------------------------------------


def test_prober_logs_a_failing_endpoint_once_per_change(health, caplog):
    """Repeated failures with the same reason log once; a new reason logs again; passing
    again logs once; steady success logs nothing."""
    port, servicer = health
    prober = Prober("wp")
    p = probe(port)

    async def probes(n: int) -> list[ProbeResult]:
        return [await prober.run(dialer(port), p) for _ in range(n)]

    caplog.set_level(logging.INFO, logger="weft.waypoint.probes")
    run(lambda: probes(2))
    assert caplog.records == []
    servicer.statuses[""] = NOT_SERVING
    run(lambda: probes(3))
    servicer.statuses.pop("")
    run(lambda: probes(2))
    assert prober.failing() == {
        ("ai/llm:8000", f"127.0.0.1:{port}"): "grpc-status 5 (NOT_FOUND): unknown service"
    }
    servicer.statuses[""] = SERVING
    run(lambda: probes(3))
    lines = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert lines == [
        (
            "WARNING",
            f"waypoint wp: grpc probe of 127.0.0.1:{port} (ai/llm:8000) failed: NOT_SERVING",
        ),
        (
            "WARNING",
            f"waypoint wp: grpc probe of 127.0.0.1:{port} (ai/llm:8000) failed: "
            "grpc-status 5 (NOT_FOUND): unknown service",
        ),
        ("INFO", f"waypoint wp: grpc probe of 127.0.0.1:{port} passes again"),
    ]
    assert prober.failing() == {}


def test_prober_forgets_the_oldest_failing_endpoint_beyond_its_limit():
    """The per-endpoint memory is bounded: endpoints that left while failing do not pile up."""
    prober = Prober(max_tracked=2)
    for port in (1, 2, 3):
        assert prober.note(probe(port), ProbeResult(False, "down"))
    assert [k[1] for k in prober.failing()] == ["127.0.0.1:2", "127.0.0.1:3"]
    assert not prober.note(probe(3), ProbeResult(False, "down"))


# ---- the upstream connection itself ----------------------------------------------------


def test_request_on_a_connection_the_backend_already_broke_reports_why():
    """UpstreamConnection.start on an HTTP/2 connection that failed before the request
    (the peer is not HTTP/2) does not raise the codec's "going away": the stream's events
    raise the backend's UpstreamError, and sending on it is a no-op."""

    async def body() -> None:
        server, port = await serve(lambda: Http1Garbage(greet=True))
        async with server:
            conn = await dialer(port)()
            await until_closed(conn)
            h = Headers.of(("content-type", "application/grpc"))
            sid = conn.start("POST", "/x", "a", h, end_stream=False)
            await conn.send(sid, b"\x00\x00\x00\x00\x00", True)
            with pytest.raises(UpstreamError) as err:
                async for _ in conn.events(sid):
                    pass
            assert err.value.kind == "protocol"
            conn.close()

    run(body)


class FakeStream:
    """The HBONE stream a tunnel connection opens: records what is written."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.pending = b""

    def bind(self, end: Any) -> None:
        self.end = end

    def send(self, data: bytes) -> None:
        self.sent.append(data)

    def send_eof(self) -> None:
        self.sent.append(b"<eof>")

    def reset(self) -> None:
        self.sent.append(b"<reset>")


class FakeTunnel:
    """A tunnel pool whose node always answers 200 to CONNECT."""

    def __init__(self) -> None:
        self.streams: list[FakeStream] = []

    async def get(self, *args: Any) -> FakeTunnel:
        return self

    def open(self, target: str, headers: Any) -> tuple[FakeStream, asyncio.Future[Any]]:
        stream = FakeStream()
        self.streams.append(stream)
        answered = asyncio.get_running_loop().create_future()
        answered.set_result(type("Resp", (), {"status": 200})())
        return stream, answered


def test_pool_dial_opens_a_private_connection_for_probes():
    """UpstreamPool.dial gives a new connection the pool does not share (the endpoint's
    shared HTTP/2 connection stays), can force HTTP/2 for a gRPC probe, and the HTTP/2
    preface is the first thing written to the HBONE stream."""
    from agent.waypoint.codec import H2_PREFACE
    from agent.waypoint.upstream import Endpoint as UpstreamEndpoint
    from agent.waypoint.upstream import UpstreamPool

    async def body() -> None:
        tunnel = FakeTunnel()
        pool = UpstreamPool(tunnel, lambda: "spiffe://w", lambda: None)  # type: ignore[arg-type]
        ep = UpstreamEndpoint(
            "10.0.0.1", 50051, "spiffe://cluster.local/ns/ai/sa/llm", "192.0.2.1", 15008, h2=False
        )
        shared = UpstreamConnection(h2=True)
        pool._h2[(ep.key, "0.0.0.0")] = shared
        conn = await pool.dial(ep, h2=True)
        assert conn is not shared and conn.h2 and conn.ep is not None and conn.ep.h2
        assert pool._h2[(ep.key, "0.0.0.0")] is shared and not pool.has_idle(ep, "0.0.0.0")
        assert tunnel.streams[0].sent[0].startswith(H2_PREFACE)
        conn.close()
        assert tunnel.streams[0].sent[-1] == b"<eof>"

    run(body)
