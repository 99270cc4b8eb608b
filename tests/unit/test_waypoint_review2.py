"""A second review of the waypoint's request path (after d8a34ab..52801b7): the pool
accounting of a try that never begins, and the HTTP/1.1 read-ahead bound over HBONE.

Driven in process like tests/unit/test_waypoint_try_review.py (whose stand-ins are reused):
a real Downstream, Proxy.run and UpstreamPool; the backend is plain TCP on loopback, or,
where HBONE flow control matters, a scripted backend behind a real tunnel `Stream` and
`StreamTransport` whose HTTP/2 connection is a stand-in that counts the credit given back.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from agent.tunnel.localstream import StreamTransport
from agent.tunnel.streams import Stream
from agent.waypoint.upstream import READ_AHEAD, Endpoint, UpstreamConnection
from tests.unit.test_waypoint_try_review import CALLER, GET, H1Backend, Pool, Rig, until

# ---- pool accounting: an OPEN admission whose try never begins ------------------------------


def test_an_open_admission_whose_deadline_has_passed_is_given_back():
    """The route's deadline is already past when the try would begin (a retry's backoff or
    a stage's admission wait overran it): the try fails with a timeout and nothing is
    dialled. The connection the pool counted for it (Admission.OPEN) must be released, or
    every such request leaks one of maxConnections for good and the backend ends up
    answering 503 Overflow to everyone."""

    async def ok(b: H1Backend) -> None:
        b.t.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")

    async def main() -> None:
        async with Rig(False, ok, per_try=1.0) as r:
            r.fwd.deadline = time.monotonic() - 1.0  # already past
            r.send(GET)
            assert await until(lambda: r.flags)
            assert r.out.out.startswith(b"HTTP/1.1 504 ")
            assert not r.pool.dialled
            assert r.fwd.backend.pool.connections == 0

    asyncio.run(main())


def test_a_reused_connection_whose_deadline_has_passed_goes_back_idle():
    """Guard for d8a34ab: an idle connection taken for a try that never begins goes back
    to the idle list, and the count of open connections is the one connection."""

    async def ok(b: H1Backend) -> None:
        b.t.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")

    async def main() -> None:
        async with Rig(False, ok, per_try=1.0) as r:
            r.send(GET)
            assert await until(lambda: len(r.flags) == 1)
            up = r.pool.dialled[0]
            assert r.pool.has_idle(up.ep, CALLER.client_ip)  # type: ignore[arg-type]
            r.fwd.deadline = time.monotonic() - 1.0
            r.send(GET)
            assert await until(lambda: len(r.flags) == 2)
            assert r.pool.has_idle(up.ep, CALLER.client_ip)  # type: ignore[arg-type]
            assert len(r.pool.dialled) == 1 and not up.closed
            assert r.fwd.backend.pool.connections == 1

    asyncio.run(main())


def test_a_caller_that_leaves_while_the_backend_is_dialled_gives_its_slot_back():
    """The caller's connection goes away while its try's connection is being dialled (a
    slow or unreachable endpoint): the handler is cancelled inside the dial. The pool
    counted the connection (Admission.OPEN); it was never made, so the count must go back,
    or each such caller leaks one of maxConnections for good."""
    release = asyncio.Event

    class SlowPool(Pool):
        async def _dial(self, ep: Endpoint, client_ip: str) -> UpstreamConnection:
            self.dialling = True
            await self.never.wait()
            raise AssertionError("unreachable")

    async def main() -> None:
        async with Rig(False, None, per_try=30.0) as r:
            pool = SlowPool(r.pool.port)
            pool.never = release()  # type: ignore[attr-defined]
            pool.dialling = False  # type: ignore[attr-defined]
            r.proxy.upstream = pool
            r.send(GET)
            assert await until(lambda: pool.dialling)  # type: ignore[attr-defined]
            assert r.fwd.backend.pool.connections == 1
            r.caller.connection_lost(None)  # the caller leaves mid-dial
            assert await until(lambda: not r.caller.tasks)
            assert r.fwd.backend.pool.connections == 0

    asyncio.run(main())


# ---- READ_AHEAD over HBONE --------------------------------------------------------------------


class FakeH2:
    """The HBONE connection's HTTP/2 state as a Stream uses it: counts credit given back."""

    def __init__(self) -> None:
        self.sent = bytearray()
        self.credited = 0

    def send_data(self, sid: int, data: bytes, end_stream: bool = False) -> int:
        self.sent += data
        return len(data)

    def end_stream(self, sid: int) -> None:
        pass

    def reset(self, sid: int, code: Any = None) -> None:
        pass

    def consumed(self, sid: int, n: int) -> None:
        self.credited += n


class FakeHbone:
    write_paused = False

    def __init__(self) -> None:
        self.h2 = FakeH2()

    def flush(self) -> None:
        pass

    def maybe_done(self, s: Any) -> None:
        pass

    def forget(self, s: Any) -> None:
        pass


class HboneBackend:
    """An HTTP/1.1 backend at the far end of one HBONE stream that sends a long chunked
    answer as fast as the stream's window allows (and, like most servers, finishes it even
    after the waypoint half-closed)."""

    WINDOW = 64 << 10

    def __init__(self, chunks: int) -> None:
        self.hbone = FakeHbone()
        self.stream = Stream(self.hbone, 1, None)  # type: ignore[arg-type]
        self.chunks = chunks
        self.received = 0  # bytes the waypoint's side was given
        self.done = False

    async def run(self) -> None:
        h2 = self.hbone.h2
        if not await until(lambda: b"\r\n\r\n" in h2.sent):
            return
        self._send(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        for i in range(self.chunks):
            piece = b"400\r\n" + bytes([65 + i % 26]) * 1024 + b"\r\n"
            room = self.WINDOW - len(piece)
            # Out of window: wait for credit (given up after a while: stalled for good).
            if not await until(lambda room=room: self.received - h2.credited <= room):
                return
            self._send(piece)
            await asyncio.sleep(0)
        self._send(b"0\r\n\r\n")
        self.stream.on_end()
        self.done = True

    def _send(self, data: bytes) -> None:
        self.received += len(data)
        self.stream.on_data(data, len(data))


def test_an_abandoned_h1_answer_read_ahead_over_hbone_gives_its_credit_back():
    """The caller stops reading, so the try's reader pauses its HTTP/1.1 backend connection
    (READ_AHEAD), which over HBONE withholds the stream's flow-control credit; then the
    stream's idle timeout ends the answer and the connection is closed. Closing must not
    leave reading paused: the credit of what the backend sent since is never given back
    otherwise, so the backend stalls, its HBONE stream never ends, and each such answer
    takes up to a stream window out of the tunnel connection's shared window (16 MiB):
    after a few, every stream to that node stalls."""
    backends: list[HboneBackend] = []

    class HbonePool(Pool):
        async def _dial(self, ep: Endpoint, client_ip: str) -> UpstreamConnection:
            b = HboneBackend(chunks=400)
            backends.append(b)
            conn = UpstreamConnection(h2=False)
            StreamTransport(conn).bind(b.stream)
            self.dialled.append(conn)
            asyncio.get_running_loop().create_task(b.run())
            return conn

    async def main() -> None:
        async with Rig(False, None, per_try=0.3) as r:
            r.proxy.upstream = pool = HbonePool(r.pool.port)
            r.caller.pause_writing()  # the caller reads nothing
            r.send(GET)
            assert await until(lambda: pool.dialled and pool.dialled[0].queues)
            t = pool.dialled[0].queues[1]
            assert await until(lambda: t.paused)
            assert t.qsize() >= READ_AHEAD
            assert await until(lambda: r.flags)  # the idle timeout ended the answer
            up, b = pool.dialled[0], backends[0]
            assert up.closed
            # What the backend still sends is read and dropped, its credit given back.
            assert await until(lambda: b.done and b.hbone.h2.credited == b.received), (
                b.done,
                b.received,
                b.hbone.h2.credited,
            )

    asyncio.run(main())


def test_a_caller_answered_early_while_its_body_was_paused_gets_its_credit_back():
    """The caller's side of the same: a request body fills its queue, so the caller's
    connection stops being read (BODY_QUEUE), which over HBONE withholds the caller
    stream's credit; the handler answers without reading the body (an authorization
    denial, a 413) and the HTTP/1.1 connection closes. Closing must not leave reading
    paused: a caller that keeps sending its body would otherwise hold its stream open for
    good and take up to a stream window out of the node's tunnel connection to the
    waypoint, which every caller on that node shares."""
    from agent.waypoint.downstream import BODY_QUEUE, Downstream

    async def main() -> None:
        hbone = FakeHbone()
        stream = Stream(hbone, 1, None)  # type: ignore[arg-type]

        async def deny(x: Any) -> None:
            x.local_reply(403, b"denied\n")

        caller = Downstream(CALLER, deny)
        StreamTransport(caller).bind(stream)
        sent = 0

        def send(data: bytes) -> None:
            nonlocal sent
            sent += len(data)
            stream.on_data(data, len(data))

        size = 256 << 10
        send(b"POST /up HTTP/1.1\r\nhost: llm\r\ncontent-length: %d\r\n\r\n" % size)
        for _ in range(BODY_QUEUE + 4):  # one burst, before the handler runs
            send(b"x" * 1024)
        assert caller._reading_paused
        assert await until(lambda: caller.closed)  # answered, and closed (body unread)
        while sent < size:  # the caller sends the rest of its body anyway
            send(b"x" * 1024)
            await asyncio.sleep(0)
        assert await until(lambda: hbone.h2.credited == sent), (sent, hbone.h2.credited)

    asyncio.run(main())
