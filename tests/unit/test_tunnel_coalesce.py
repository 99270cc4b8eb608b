"""Write coalescing on an HBONE connection (the waypoint's): frames queued by tasks in one
loop turn leave in one write, in order, and nothing queued is lost at close.

Two HboneConnections are wired back to back through in-memory transports that deliver on
the next loop turn, as a socket would; TLS and sockets are covered in
test_tunnel_loopback.py and on the lab."""

from __future__ import annotations

import asyncio
from typing import Any

from agent.tunnel import h2 as hb
from agent.tunnel.hbone import HboneConnection


class Wire(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.peer: HboneConnection | None = None
        self.writes: list[bytes] = []
        self.closed = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert not self.closed, "write after close"
        self.writes.append(bytes(data))
        peer = self.peer
        assert peer is not None
        asyncio.get_running_loop().call_soon(peer.data_received, bytes(data))

    def close(self) -> None:
        self.closed = True


def pair(coalesce: bool) -> tuple[HboneConnection, HboneConnection, Wire]:
    accepted: list[Any] = []

    def on_request(conn: HboneConnection, req: hb.StreamRequest) -> None:
        accepted.append(conn.accept_stream(req.stream_id))
        conn.respond(req.stream_id, 200)

    client = HboneConnection(client=True, settings=hb.Settings(), coalesce=coalesce)
    server = HboneConnection(client=False, settings=hb.Settings(), on_request=on_request)
    cw, sw = Wire(), Wire()
    cw.peer, sw.peer = server, client
    server.connection_made(sw)
    client.connection_made(cw)
    return client, server, cw


def test_frames_sent_by_a_task_in_one_turn_share_one_write() -> None:
    async def main() -> tuple[int, int]:
        out = []
        for coalesce in (False, True):
            client, _server, wire = pair(coalesce)
            await asyncio.sleep(0.01)
            stream, resp = client.open("10.0.0.1:80", [])
            await asyncio.wait_for(resp, 10)
            before = len(wire.writes)
            for chunk in (b"GET / HTTP/1.1\r\n", b"host: x\r\n", b"\r\n"):
                stream.send(chunk)
            stream.send_eof()
            await asyncio.sleep(0.01)
            out.append(len(wire.writes) - before)
        return out[0], out[1]

    plain, coalesced = asyncio.run(main())
    assert plain >= 4  # a write per send and one for END_STREAM
    assert coalesced == 1


def test_close_writes_what_a_coalescing_connection_still_holds() -> None:
    async def main() -> bytes:
        client, _server, wire = pair(True)
        await asyncio.sleep(0.01)
        stream, resp = client.open("10.0.0.1:80", [])
        await asyncio.wait_for(resp, 10)
        n = len(wire.writes)
        stream.send(b"last words")
        client.close()  # before the turn ends
        assert wire.closed and len(wire.writes) == n + 1
        return wire.writes[-1]

    last = asyncio.run(main())
    assert last.endswith(b"last words")
