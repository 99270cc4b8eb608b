"""The one-request HTTP/1.1 client (agent/waypoint/codec/client.py) against real sockets."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from agent.waypoint.codec import client
from agent.waypoint.codec.headers import Headers

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _read_request(r: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await r.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return head, await r.readexactly(length)


def _over_tcp(handler: Handler, check: Callable[[tuple[str, int]], Awaitable[None]]) -> None:
    async def main() -> None:
        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        try:
            await check(server.sockets[0].getsockname()[:2])
        finally:
            server.close()
            await server.wait_closed()

    asyncio.run(main())


def test_a_post_sends_its_body_with_a_length_and_reads_the_whole_answer() -> None:
    """The request carries host, the caller's fields and Content-Length; the response's
    status, fields and body (chunked here) come back whole."""
    seen: list[tuple[bytes, bytes]] = []

    async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        seen.append(await _read_request(r))
        w.write(
            b"HTTP/1.1 202 Accepted\r\nx-kind: test\r\ntransfer-encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
        )
        await w.drain()
        w.close()

    async def check(addr: tuple[str, int]) -> None:
        answer = await client.request(
            addr,
            "POST",
            "/v1/traces",
            "collector:4318",
            peer="the collector",
            limit=5,
            headers=Headers.of(("content-type", "application/json")),
            body=b'{"a":1}',
        )
        assert (answer.status, answer.body) == (202, b"abcde")
        assert answer.headers.get(b"x-kind") == b"test"

    _over_tcp(serve, check)
    head, body = seen[0]
    assert head.startswith(b"POST /v1/traces HTTP/1.1\r\nhost: collector:4318\r\n")
    assert b"content-type: application/json\r\n" in head
    assert b"content-length: 7\r\n" in head
    assert body == b'{"a":1}'


def test_an_answer_delimited_by_close_is_read_to_the_end(tmp_path: Path) -> None:
    """Over a unix socket, a response without a length ends when the peer closes."""
    sock = tmp_path / "s.sock"

    async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await _read_request(r)
        w.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n{}")
        await w.drain()
        w.close()

    async def main() -> None:
        server = await asyncio.start_unix_server(serve, path=str(sock))
        try:
            answer = await client.request(sock, "GET", "/", "agent", peer="the agent", limit=5)
        finally:
            server.close()
            await server.wait_closed()
        assert (answer.status, answer.body) == (200, b"{}")

    asyncio.run(main())


@pytest.mark.parametrize(
    ("answer", "says"),
    [
        (b"", "answer was cut"),
        (b"HTTP/1.", "answer was cut"),
        (b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n{}", "answer was cut"),
        (b"HTTP/1.1 200 OK\r\ncontent-length: x\r\n\r\n", "broke HTTP"),
    ],
)
def test_a_truncated_or_broken_answer_is_a_connection_error_naming_the_peer(
    answer: bytes, says: str
) -> None:
    """Nothing, half a status line, a body cut short, or a malformed head: each is a
    ConnectionError that names the peer, never a parse error leaking out."""

    async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await _read_request(r)
        w.write(answer)
        await w.drain()
        w.close()

    async def check(addr: tuple[str, int]) -> None:
        with pytest.raises(ConnectionError, match=f"the collector.*{says}"):
            await client.request(addr, "GET", "/", "c", peer="the collector", limit=5)

    _over_tcp(serve, check)


def test_a_silent_peer_runs_into_the_limit() -> None:
    """A peer that accepts and never answers costs `limit` seconds, then TimeoutError."""

    async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await _read_request(r)
        await asyncio.sleep(5)

    async def check(addr: tuple[str, int]) -> None:
        with pytest.raises(TimeoutError):
            await client.request(addr, "GET", "/", "c", peer="the collector", limit=0.1)

    _over_tcp(serve, check)


@pytest.mark.parametrize(("status", "exported", "failures"), [(200, 1, 0), (503, 0, 1)])
def test_the_otlp_exporter_posts_through_it(status: int, exported: int, failures: int) -> None:
    """A span batch reaches the collector as JSON at /v1/traces; a non-2xx answer counts as
    a failed export rather than raising out of flush."""
    from agent.waypoint.tracing import SERVER, Exporter, Span

    bodies: list[bytes] = []

    async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        head, body = await _read_request(r)
        assert head.startswith(b"POST /v1/traces ")
        bodies.append(body)
        w.write(b"HTTP/1.1 %d X\r\ncontent-length: 0\r\n\r\n" % status)
        await w.drain()
        w.close()

    async def check(addr: tuple[str, int]) -> None:
        exporter = Exporter(f"http://{addr[0]}:{addr[1]}", "svc")
        exporter.record(Span("GET /", "1" * 32, "2" * 16, None, SERVER))
        await exporter.flush()
        assert (exporter.exported, exporter.failures) == (exported, failures)

    _over_tcp(serve, check)
    assert b'"service.name"' in bodies[0]
