"""Handing captured connections to a waypoint on the same node (agent/tunnel/handoff.py and
agent/waypoint/handoff.py), in-process over a real Unix SOCK_SEQPACKET socket and real TCP
connections on loopback: descriptors really move, and the connection outlives the agent's
copy."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from pathlib import Path

import pytest
import uvloop

from agent.tunnel.handoff import Handoff, HandoffServer
from agent.waypoint.handoff import HandoffReceiver

pytestmark = pytest.mark.timeout(60)
WHAT = Handoff("spiffe://cluster.local/ns/apps/sa/client", "10.244.1.2", "10.96.0.10:80")


@pytest.fixture
def sock_path():
    """A socket path short enough for AF_UNIX (108 bytes; tmp_path can be longer)."""
    import shutil
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="weft-ho-"))
    yield d / "handoff.sock"
    shutil.rmtree(d, ignore_errors=True)


async def _wait(cond, limit: float = 5.0) -> None:
    for _ in range(int(limit / 0.01)):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


class _Pod(asyncio.Protocol):
    """The agent's side of a captured connection: hands it over on accept, like the tunnel."""

    def __init__(self, server: HandoffServer, results: list[bool]) -> None:
        self.server = server
        self.results = results

    def connection_made(self, transport) -> None:
        ok = self.server.hand_off("127.0.0.30", transport.get_extra_info("socket"), WHAT)
        self.results.append(ok)
        if ok:
            transport.abort()  # the agent's descriptor goes; the connection must not

    def data_received(self, data: bytes) -> None:  # only when not handed over
        self.results.append(False)


def test_a_handed_connection_is_served_by_the_waypoint_and_outlives_the_agents_copy(sock_path):
    """The waypoint gets the descriptor and what the agent knows of the caller; the pod's
    bytes (sent before and after the handoff) reach the waypoint, its answers reach the pod,
    and closing the agent's copy neither resets nor ends the connection."""

    async def main() -> None:
        path = sock_path
        server = HandoffServer(path, attest=lambda pid: "127.0.0.30")
        server.start()
        got: list[tuple[Handoff, socket.socket]] = []
        rx = HandoffReceiver(path, lambda what, sock: got.append((what, sock)))
        task = asyncio.create_task(rx.run())
        results: list[bool] = []
        tcp = await asyncio.get_running_loop().create_server(
            lambda: _Pod(server, results), "127.0.0.1", 0
        )
        try:
            await _wait(lambda: server.has("127.0.0.30"))
            port = tcp.sockets[0].getsockname()[1]
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(b"GET / HTTP/1.1\r\n")
            await _wait(lambda: got)
            what, sock = got[0]
            assert what == WHAT and results == [True]
            sock.setblocking(False)
            loop = asyncio.get_running_loop()
            w.write(b"Host: x\r\n\r\n")
            await w.drain()
            data = b""
            while not data.endswith(b"\r\n\r\n"):
                data += await loop.sock_recv(sock, 1024)
            assert data == b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
            await loop.sock_sendall(sock, b"HTTP/1.1 204 No Content\r\n\r\n")
            assert await r.readuntil(b"\r\n\r\n") == b"HTTP/1.1 204 No Content\r\n\r\n"
            sock.close()
            assert await r.read() == b""  # the waypoint's close ends it, cleanly
            w.close()
            assert server.handed == 1 and rx.received == 1
        finally:
            tcp.close()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            server.close()

    uvloop.run(main())


def test_no_channel_means_no_handoff_and_a_closed_channel_is_forgotten(sock_path):
    """Without a channel from that waypoint the agent keeps the connection (HBONE then
    serves it); when the waypoint goes away its channel is dropped, and when it comes back
    (the receiver reconnects) connections are handed to it again."""

    async def main() -> None:
        path = sock_path
        server = HandoffServer(path, attest=lambda pid: "127.0.0.30")
        server.start()
        a, b = socket.socketpair()
        try:
            assert not server.hand_off("127.0.0.30", a, WHAT) and server.handed == 0
            rx = HandoffReceiver(path, lambda what, sock: sock.close())
            task = asyncio.create_task(rx.run())
            await _wait(lambda: server.has("127.0.0.30"))
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await _wait(lambda: not server.has("127.0.0.30"))
            assert not server.hand_off("127.0.0.30", a, WHAT)
            task = asyncio.create_task(rx.run())
            await _wait(lambda: server.has("127.0.0.30"))
            assert server.hand_off("127.0.0.30", a, WHAT)
            await _wait(lambda: rx.received == 1)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        finally:
            a.close()
            b.close()
            server.close()

    uvloop.run(main())


def test_a_process_that_is_not_a_waypoint_of_this_node_gets_no_channel(sock_path):
    """The agent attests whoever connects (by its cgroup, here a stub): a refused caller
    is disconnected and never receives a connection."""

    async def main() -> None:
        path = sock_path
        seen: list[int] = []

        def attest(pid: int) -> str | None:
            seen.append(pid)
            return None

        server = HandoffServer(path, attest=attest)
        server.start()
        ch = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ch.setblocking(False)
        try:
            loop = asyncio.get_running_loop()
            await loop.sock_connect(ch, str(path))
            assert await asyncio.wait_for(loop.sock_recv(ch, 16), 5) == b""  # closed on us
            import os

            assert seen == [os.getpid()] and not server.channels
        finally:
            ch.close()
            server.close()

    uvloop.run(main())


def test_a_malformed_message_is_refused_and_its_descriptors_closed(sock_path):
    """A message that is not the agent's format (bad JSON, a missing field, two
    descriptors) is counted and logged, its descriptors are closed, nothing is served."""

    async def main() -> None:
        path = sock_path
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        listener.bind(str(path))
        listener.listen(1)
        listener.setblocking(False)
        got: list[Handoff] = []
        rx = HandoffReceiver(path, lambda what, sock: (got.append(what), sock.close()))
        task = asyncio.create_task(rx.run())
        loop = asyncio.get_running_loop()
        ch, _ = await loop.sock_accept(listener)
        a, b = socket.socketpair()
        try:
            for msg, fds in (
                (b"{not json", [a.fileno()]),
                (json.dumps({"source": "x", "clientIp": "1.2.3.4"}).encode(), [a.fileno()]),
                (WHAT.encode(), [a.fileno(), b.fileno()]),
                (WHAT.encode(), [a.fileno()]),
            ):
                socket.send_fds(ch, [msg], fds)
            await _wait(lambda: got)
            assert rx.malformed == 3 and got == [WHAT]
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            for s in (a, b, ch, listener):
                s.close()

    uvloop.run(main())


@pytest.mark.parametrize(
    "raw",
    [b"", b"[]", b'{"source": 1, "clientIp": "a", "destination": "b"}', b"\xff\xfe"],
)
def test_decode_names_what_is_wrong(raw):
    """Handoff.decode raises ValueError for anything but the three string fields."""
    with pytest.raises(ValueError, match="handoff message"):
        Handoff.decode(raw)
    assert Handoff.decode(WHAT.encode()) == WHAT


def test_connections_queued_on_the_channel_are_served_when_the_waypoint_drains(tmp_path):
    """A waypoint that starts draining (a restart) takes the hand-overs already queued on
    its channel and serves them (answered with Connection: close) instead of closing them;
    the agent's later sends fail and fall back. The real Waypoint.drain, around stubs."""
    import types

    from agent.tunnel.handoff import Handoff
    from agent.waypoint.server import Waypoint

    what = Handoff("spiffe://cluster.local/ns/apps/sa/client", "10.244.1.2", "10.96.0.10:80")
    path = tmp_path / "handoff.sock"
    served: list[object] = []
    closed: list[int] = []

    async def main() -> None:
        server = HandoffServer(path, attest=lambda pid: "127.0.0.30")
        server.start()
        wp = Waypoint.__new__(Waypoint)
        wp.draining = False
        wp._servers, wp.inbound, wp._handoffs = [], set(), set()
        wp.s = types.SimpleNamespace(drain_timeout=0.1, name="wp")
        wp._caller = lambda *a: object()

        class Served(asyncio.Protocol):
            closed = True

            def drain(self) -> None:
                pass

        wp._downstream = lambda caller: served.append(caller) or Served()

        async def close() -> None:
            pass

        wp.close = close

        def handed(h: Handoff, sock: socket.socket) -> None:
            Waypoint._handed(wp, h, sock)
            if sock.fileno() == -1:
                closed.append(1)

        wp.receiver = HandoffReceiver(path, handed)
        task = asyncio.create_task(wp.receiver.run())
        for _ in range(500):
            if server.has("127.0.0.30"):
                break
            await asyncio.sleep(0.01)
        lsock = socket.create_server(("127.0.0.1", 0))
        pairs = []
        for _ in range(2):  # pod connections, as the agent accepted them
            c = socket.create_connection(lsock.getsockname())
            pairs.append((lsock.accept()[0], c))
        lsock.close()
        for a, _b in pairs:
            assert server.hand_off("127.0.0.30", a, what)
        await wp.drain()  # before the loop has read the two queued hand-overs
        assert not server.hand_off("127.0.0.30", pairs[0][0], what)  # refused from now on
        task.cancel()
        server.close()
        assert wp.receiver.received == 2
        assert not closed and len(served) == 2
        for a, b in pairs:
            a.close()
            b.close()

    uvloop.run(main())
