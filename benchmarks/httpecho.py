"""A tiny HTTP/1.1 echo server for the HTTP scenarios: the response body is the request body.

    python -m benchmarks.httpecho [--port 8080]

asyncio on uvloop, keep-alive and pipelining, `connection: close` honoured, bodies framed by
content-length only (what the benchmark clients, wrk and HAProxy send). It does no other
work, so its cost is the same small constant under every scenario.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket

MAX_HEAD = 16 * 1024


def parse_head(head: bytes) -> tuple[int, bool]:
    """(content-length, close requested) of a request head (without the blank line)."""
    length = 0
    close = False
    lines = head.split(b"\r\n")
    if lines and lines[0].endswith(b"HTTP/1.0"):
        close = True
    for line in lines[1:]:
        k, _, v = line.partition(b":")
        name = k.strip().lower()
        if name == b"content-length":
            length = int(v.strip())
        elif name == b"connection":
            token = v.strip().lower()
            if token == b"close":
                close = True
            elif token == b"keep-alive":
                close = False
    return length, close


def response(body: bytes, close: bool) -> bytes:
    head = b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\n"
    head += b"content-length: %d\r\n" % len(body)
    if close:
        head += b"connection: close\r\n"
    return head + b"\r\n" + body


class Echo(asyncio.Protocol):
    def __init__(self) -> None:
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        out = []
        close = False
        while True:
            i = self.buf.find(b"\r\n\r\n")
            if i < 0:
                if len(self.buf) > MAX_HEAD:
                    close = True
                break
            try:
                length, close = parse_head(self.buf[:i])
            except ValueError:
                out.append(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
                close = True
                break
            end = i + 4 + length
            if len(self.buf) < end:
                break
            out.append(response(self.buf[i + 4 : end], close))
            self.buf = self.buf[end:]
            if close:
                break
        assert self.transport is not None
        if out:
            self.transport.write(b"".join(out))
        if close:
            self.transport.close()

    def eof_received(self) -> bool:
        return False


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Echo, host, port, backlog=1024, reuse_address=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--host", default="0.0.0.0")
    ap.add_argument("--port", type=int, default=8080)
    args = ap.parse_args()
    try:
        import uvloop

        uvloop.run(serve(args.host, args.port))
    except ImportError:
        asyncio.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
