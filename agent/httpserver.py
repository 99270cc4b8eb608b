"""A small HTTP/1.1 server for the agent's control endpoints (admin, readiness, metrics).

Not the data path: these endpoints answer operators and Prometheus, a few requests a
second. GET and POST only, bodies up to 1 MiB, keep-alive, parsed by httptools (llhttp).
Handlers are async callables returning (status, body, content type).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, cast
from urllib.parse import parse_qs, urlsplit

import httptools

log = logging.getLogger("weft.http")

MAX_BODY = 1 << 20
MAX_HEAD = 32 << 10


class HttpRequest:
    __slots__ = ("body", "headers", "method", "path", "query", "transport")

    def __init__(
        self, method: str, target: str, headers: dict[str, str], body: bytes, transport: Any = None
    ) -> None:
        u = urlsplit(target)
        self.transport = transport  # for peer credentials on Unix sockets
        self.method = method
        self.path = u.path
        self.query = {k: v[-1] for k, v in parse_qs(u.query).items()}
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        return json.loads(self.body or b"null")


Response = tuple[int, bytes | str | dict[str, Any] | list[Any], str]
Handler = Callable[[HttpRequest], Awaitable[Response]]

REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    413: "Content Too Large",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


def json_response(status: int, body: Any) -> Response:
    return status, body, "application/json"


class _Conn(asyncio.Protocol):
    def __init__(self, routes: Mapping[str, Handler]) -> None:
        self.routes = routes
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self._url = b""
        self._headers: dict[str, str] = {}
        self._body = bytearray()
        self._head_bytes = 0
        self._queue: asyncio.Queue[HttpRequest | None] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self._task = asyncio.create_task(self._serve())

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._error(400)
        except httptools.HttpParserError:
            self._error(400)
        except _TooBig as e:
            self._error(e.status)

    def connection_lost(self, exc: Exception | None) -> None:
        self._queue.put_nowait(None)

    # httptools callbacks
    def on_message_begin(self) -> None:
        self._url, self._headers, self._body, self._head_bytes = b"", {}, bytearray(), 0

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._head_bytes += len(url)
        if self._head_bytes > MAX_HEAD:
            raise _TooBig(431)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_bytes += len(name) + len(value)
        if self._head_bytes > MAX_HEAD:
            raise _TooBig(431)
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_body(self, body: bytes) -> None:
        self._body += body
        if len(self._body) > MAX_BODY:
            raise _TooBig(413)

    def on_message_complete(self) -> None:
        method = self.parser.get_method().decode()
        self._queue.put_nowait(
            HttpRequest(
                method,
                self._url.decode("latin-1"),
                self._headers,
                bytes(self._body),
                self.transport,
            )
        )

    def _error(self, status: int) -> None:
        if self.transport is not None:
            self.transport.write(
                _render(
                    status,
                    {"error": REASONS.get(status, "error")},
                    "application/json",
                    keep_alive=False,
                )
            )
            self.transport.close()

    async def _serve(self) -> None:
        while (req := await self._queue.get()) is not None:
            handler = self.routes.get(req.path)
            try:
                if handler is None:
                    resp: Response = json_response(
                        404, {"error": f"no endpoint {req.path}", "endpoints": sorted(self.routes)}
                    )
                else:
                    resp = await handler(req)
            except Exception as e:  # a handler bug must not kill the connection loop
                log.exception("handler for %s failed", req.path)
                resp = json_response(500, {"error": f"{type(e).__name__}: {e}"})
            keep = req.headers.get("connection", "").lower() != "close"
            if self.transport is None or self.transport.is_closing():
                return
            self.transport.write(_render(*resp, keep_alive=keep))
            if not keep:
                self.transport.close()
                return


class _TooBig(Exception):
    def __init__(self, status: int) -> None:
        self.status = status


def _render(
    status: int, body: bytes | str | dict[str, Any] | list[Any], ctype: str, *, keep_alive: bool
) -> bytes:
    if isinstance(body, dict | list):
        raw = (json.dumps(body, indent=1, default=str) + "\n").encode()
    elif isinstance(body, str):
        raw = body.encode()
    else:
        raw = body
    head = (
        f"HTTP/1.1 {status} {REASONS.get(status, 'Status')}\r\ncontent-type: {ctype}\r\n"
        f"content-length: {len(raw)}\r\n"
        f"connection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n"
    )
    return head.encode() + raw


def _prepare_socket_path(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


class HttpServer:
    def __init__(self, routes: Mapping[str, Handler]) -> None:
        self.routes = routes
        self.servers: list[asyncio.AbstractServer] = []

    async def listen_tcp(self, host: str, port: int) -> int:
        loop = asyncio.get_running_loop()
        # reuse_port: a restarting agent's successor binds the same ports while this one
        # drains (agent/restart.py).
        srv = await loop.create_server(
            lambda: _Conn(self.routes), host, port, reuse_address=True, reuse_port=True
        )
        self.servers.append(srv)
        return int(srv.sockets[0].getsockname()[1])

    async def listen_unix(self, path: Path, mode: int = 0o600) -> None:
        _prepare_socket_path(path)
        loop = asyncio.get_running_loop()
        srv = await loop.create_unix_server(lambda: _Conn(self.routes), str(path))
        os.chmod(path, mode)

        self.servers.append(srv)

    def close(self) -> None:
        for s in self.servers:
            s.close()
