"""One HTTP/1.1 request and its response over an asyncio stream, framed by Http1Connection.

The waypoint's own small clients (the Workload API link, the OTLP exporter) need nothing
more than "ask once, read the whole answer, hang up", and they should not parse HTTP a
second way beside the codec. A peer that goes away mid-answer (the node agent restarting,
a collector being redeployed) or breaks HTTP is a ConnectionError, which callers already
retry or count; it is never an IndexError from half a status line.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from pathlib import Path

from agent.waypoint.codec import events as ev
from agent.waypoint.codec.config import Limits, Role
from agent.waypoint.codec.errors import ProtocolError
from agent.waypoint.codec.headers import Headers
from agent.waypoint.codec.http1 import Http1Connection

CONNECT_TIMEOUT = 5.0  # seconds; both peers are local or near, a slow connect is a dead one


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    headers: Headers
    body: bytes


async def request(
    address: Path | tuple[str, int],
    method: str,
    target: str,
    authority: str,
    *,
    peer: str,
    limit: float,
    headers: Headers | None = None,
    body: bytes = b"",
) -> Response:
    """Send one request to `address` (a unix socket path, or a TCP host and port) and read
    its response within `limit` seconds. `peer` names the other side in errors ("the node
    agent"). A body is sent with its Content-Length."""
    codec = Http1Connection(Role.CLIENT, Limits())
    sid = codec.next_stream_id()
    fields = Headers(list(headers.fields) if headers else [])
    if body:
        fields.set(b"content-length", str(len(body)).encode())
    wire = codec.send_request_head(sid, method, target, authority, "http", fields, not body)
    if body:
        wire += codec.send_data(sid, body, end_stream=True)
    if isinstance(address, Path):
        opening = asyncio.open_unix_connection(str(address))
    else:
        opening = asyncio.open_connection(*address)
    reader, writer = await asyncio.wait_for(opening, CONNECT_TIMEOUT)
    head: ev.ResponseHead | None = None
    received, done = bytearray(), False
    try:
        writer.write(wire)
        await writer.drain()
        async with asyncio.timeout(limit):
            while not done:
                data = await reader.read(65536)
                try:
                    events = codec.receive_data(data)
                except ProtocolError as err:
                    raise ConnectionError(f"{peer} broke HTTP: {err}") from err
                for e in events:
                    if isinstance(e, ev.ResponseHead) and not e.informational:
                        head = e
                        done = e.end_stream
                    elif isinstance(e, ev.Data):
                        received += e.data
                        done = e.end_stream
                    elif isinstance(e, ev.StreamReset):
                        raise ConnectionError(f"{peer}'s answer was cut: {e.reason}")
                    elif isinstance(e, ev.ConnectionClosed):
                        done = True
                if not data and not done:
                    raise ConnectionError(f"{peer} closed the connection mid-answer")
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    if head is None:
        raise ConnectionError(f"{peer} closed the connection without an answer")
    return Response(head.status, head.headers, bytes(received))
