"""A review of the waypoint's per-try objects (proxy.Try, upstream.StreamEvents), driven
end to end in one process: a real Downstream (the caller's connection, over a recording
transport), Proxy.run, a real UpstreamPool whose dial opens plain TCP to a scripted
backend on loopback (HTTP/1.1 raw bytes, or the waypoint's own HTTP/2 codec in the
server role). The engine's decision is a stand-in (per-try timeout, retriable statuses).

What is checked after each exchange: the backend stream is reset or its connection closed
when the answer is abandoned, no stream is left in UpstreamConnection.queues, no try's
Deadline is still armed, and an HTTP/1.1 connection is reused only after a complete
exchange. Found by the review: an HTTP/2 backend stream whose answer ended while the
request body was still being sent was left half-open (never reset), so every such request
took one of the shared connection's concurrent streams for good.
"""

from __future__ import annotations

import asyncio
import types
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from agent.waypoint import proxy as P
from agent.waypoint.codec import events as ev
from agent.waypoint.codec.config import Limits, Role
from agent.waypoint.codec.headers import Headers
from agent.waypoint.codec.http2 import Http2Connection
from agent.waypoint.deadline import Deadline
from agent.waypoint.downstream import CallerInfo, Downstream
from agent.waypoint.engine.outcome import Failure
from agent.waypoint.engine.pool import ConnectionPool
from agent.waypoint.engine.respond import plain
from agent.waypoint.upstream import Endpoint, UpstreamConnection, UpstreamPool

CALLER = CallerInfo(
    "spiffe://cluster.local/ns/apps/sa/client", "10.0.0.9", "ai", "llm", "10.96.0.1", 8000
)
GET = b"GET / HTTP/1.1\r\nhost: llm\r\n\r\n"


# ---- the stand-ins ------------------------------------------------------------------------


class Pool(UpstreamPool):
    """The real pool (idle lists, the shared HTTP/2 connection); dialling is plain TCP."""

    def __init__(self, port: int) -> None:
        super().__init__(None, lambda: "", lambda: None)  # type: ignore[arg-type]
        self.port = port
        self.dialled: list[UpstreamConnection] = []

    async def _dial(self, ep: Endpoint, client_ip: str) -> UpstreamConnection:
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(
            lambda: UpstreamConnection(h2=ep.h2), "127.0.0.1", self.port
        )
        self.dialled.append(conn)
        return conn


class CallerTransport:
    def __init__(self) -> None:
        self.out = bytearray()
        self.closed = False

    def write(self, data: bytes) -> None:
        self.out += data

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_extra_info(self, *a: Any, **k: Any) -> None:
        return None


def forward(*, per_try: float, attempts: int = 0, retriable: tuple[int, ...] = ()) -> Any:
    """What Proxy.run reads of an engine Forward and its Attempts."""
    cpool = ConnectionPool(types.SimpleNamespace(overflow=0))  # type: ignore[arg-type]
    fwd = types.SimpleNamespace(observed=[], tries=0)

    class Att:
        def __init__(self) -> None:
            self.endpoint = types.SimpleNamespace(workload="w", port=8000)
            self.observed = self.released = self.retry = False

        def admit(self, reusable: bool) -> Any:
            return cpool.admit(reusable)

        def dequeued(self) -> None:
            cpool.dequeued()

        def observe(self, outcome: int) -> None:
            fwd.observed.append(int(outcome))

        def abandon(self) -> None:
            self.released = True

        release = abandon

    def attempt(picker: Any = None) -> Att:
        fwd.tries += 1
        return Att()

    def retry_after(outcome: int, last: Any = None) -> float | None:
        return 0.01 if outcome in retriable and fwd.tries <= attempts else None

    fwd.__dict__.update(
        delay=0,
        rewrite_request=lambda h: None,
        rewrite_response=lambda h: None,
        target=None,
        authority=None,
        mirrors=(),
        rule=types.SimpleNamespace(retry=types.SimpleNamespace(attempts=attempts)),
        attempt=attempt,
        retry_after=retry_after,
        deadline=None,
        per_try_timeout=per_try,
        backend=types.SimpleNamespace(pool=cpool, name="llm"),
        remaining=lambda: None,
        failure_response=lambda o: plain(
            504 if o == Failure.TIMEOUT else 503, "UpstreamFailure", f"no answer ({o})"
        ),
    )
    return fwd


class H1Backend(asyncio.Protocol):
    """Runs `script(self)` for each request head (and content-length body) received."""

    def __init__(self, script: Callable[[H1Backend], Awaitable[None]]) -> None:
        self.script = script
        self.buf = b""
        self.closed = False

    def connection_made(self, t: Any) -> None:
        self.t = t

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while b"\r\n\r\n" in self.buf:
            head, _, rest = self.buf.partition(b"\r\n\r\n")
            n = 0
            for line in head.split(b"\r\n")[1:]:
                k, _, v = line.partition(b":")
                if k.strip().lower() == b"content-length":
                    n = int(v)
            if len(rest) < n:
                return
            self.buf = rest[n:]
            asyncio.get_running_loop().create_task(self.script(self))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True


class H2Backend(asyncio.Protocol):
    """Runs `script(self, sid)` for each request stream; records the streams reset."""

    def __init__(self, script: Callable[[H2Backend, int], Awaitable[None]]) -> None:
        self.script = script
        self.codec = Http2Connection(Role.SERVER, Limits())
        self.closed = False
        self.resets: list[int] = []

    def connection_made(self, t: Any) -> None:
        self.t = t
        t.write(self.codec.data_to_send())

    def data_received(self, data: bytes) -> None:
        events = self.codec.receive_data(data)
        self.t.write(self.codec.data_to_send())
        for e in events:
            if isinstance(e, ev.RequestHead):
                asyncio.get_running_loop().create_task(self.script(self, e.stream_id))
            elif isinstance(e, ev.Data):
                self.t.write(self.codec.consumed(e.stream_id, len(e.data)))
            elif isinstance(e, ev.StreamReset):
                self.resets.append(e.stream_id)

    def send(self, data: bytes) -> None:
        if not self.closed:
            self.t.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True


class Rig:
    """One caller connection into Proxy.run, and the backend it reaches."""

    def __init__(self, h2: bool, script: Any, **fwd: Any) -> None:
        self.h2 = h2
        self.script = script
        self.fwd = forward(**fwd)
        self.flags: list[str] = []
        self.backends: list[Any] = []
        self.run_kw: dict[str, Any] = {}  # more arguments to Proxy.run (stage, after_try...)

    async def __aenter__(self) -> Rig:
        loop = asyncio.get_running_loop()

        def make() -> Any:
            b = H2Backend(self.script) if self.h2 else H1Backend(self.script)
            self.backends.append(b)
            return b

        self.server = await loop.create_server(make, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        self.pool = Pool(port)
        ep = Endpoint("127.0.0.1", port, "spiffe://cluster.local/ns/ai/sa/llm", "n", 1, h2=self.h2)
        self.proxy = P.Proxy(self.pool, lambda w, p: ep)

        async def handle(x: Any) -> None:
            self.flags.append(
                await self.proxy.run(x, self.fwd, x.head.headers.copy(), **self.run_kw)
            )

        self.caller = Downstream(CALLER, handle)
        self.out = CallerTransport()
        self.caller.connection_made(self.out)
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self.server.close()
        self.pool.close()

    def send(self, data: bytes) -> None:
        self.caller.data_received(data)

    def armed_deadlines(self) -> list[Any]:
        loop = asyncio.get_running_loop()
        return [
            h
            for h in loop._scheduled  # type: ignore[attr-defined]
            if not h.cancelled() and isinstance(getattr(h._callback, "__self__", None), Deadline)
        ]


async def until(pred: Callable[[], Any], limit: float = 5.0) -> bool:
    loop = asyncio.get_running_loop()
    end = loop.time() + limit
    while not pred():
        if loop.time() > end:
            return False
        await asyncio.sleep(0.01)
    return True


# ---- the finding ----------------------------------------------------------------------------


def test_an_h2_stream_answered_before_its_request_body_ended_is_reset():
    """The backend answers (an early 413, a gRPC error status) while the caller is still
    sending the body. The answer is relayed and the body pump stops; the backend stream
    must then be reset, or it stays half-open on the shared connection: each such request
    takes one of the backend's concurrent streams (100 on most servers) for good, and then
    the pool dials a new connection and leaks the old one open."""

    async def early(b: H2Backend, sid: int) -> None:
        b.send(b.codec.send_response_head(sid, 413, Headers(), False))
        b.send(b.codec.send_data(sid, b"too big", True))

    async def main() -> None:
        async with Rig(True, early, per_try=1.0) as r:
            r.send(b"POST /up HTTP/1.1\r\nhost: llm\r\ntransfer-encoding: chunked\r\n\r\n")
            r.send(b"5\r\nhello\r\n")  # ... and the rest never comes
            assert await until(lambda: r.flags)
            assert b"too big" in r.out.out
            up = r.pool.dialled[0]
            assert await until(lambda: r.backends[0].resets == [1])  # the stream is reset
            assert up.codec._h2.open_outbound_streams == 0  # no stream held open
            assert not up.queues and not r.armed_deadlines()

    asyncio.run(main())


# ---- what the refactor kept (guards) ---------------------------------------------------------


@pytest.mark.parametrize("h2", [False, True], ids=["h1", "h2"])
def test_a_caller_that_stops_reading_is_held_to_the_idle_timeout(h2):
    """The backend keeps sending, the caller stops reading: the stream ends at the per-try
    (idle) timeout, the backend stream is reset (HTTP/2) or its connection closed
    (HTTP/1.1), and nothing is left armed or queued."""

    async def h1(b: H1Backend) -> None:
        b.t.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        while not b.closed:
            b.t.write(b"400\r\n" + b"x" * 1024 + b"\r\n")
            await asyncio.sleep(0.005)

    async def h2s(b: H2Backend, sid: int) -> None:
        b.send(b.codec.send_response_head(sid, 200, Headers(), False))
        while not b.closed and sid not in b.resets:
            b.send(b.codec.send_data(sid, b"x" * 1024, False))
            await asyncio.sleep(0.005)

    async def main() -> None:
        async with Rig(h2, h2s if h2 else h1, per_try=0.2) as r:
            r.send(GET)
            assert await until(lambda: len(r.out.out) > 4000)
            r.caller.pause_writing()  # the caller stops reading
            assert await until(lambda: r.flags)
            up = r.pool.dialled[0]
            if h2:
                assert await until(lambda: r.backends[0].resets == [1])
                assert not up.closed and not up.codec._unacked  # window credit given back
            else:
                assert up.closed and not r.pool.has_idle(up.ep, CALLER.client_ip)  # type: ignore[arg-type]
            assert not up.queues and not r.armed_deadlines()

    asyncio.run(main())


@pytest.mark.parametrize("h2", [False, True], ids=["h1", "h2"])
def test_a_retried_try_is_reset_and_forgotten(h2):
    """A 503 (with a body still coming), then a timeout, then a 200: the discarded tries'
    streams are reset and forgotten, their timers closed; the answer is the 200."""
    n = [0]

    async def h1(b: H1Backend) -> None:
        n[0] += 1
        if n[0] == 1:
            b.t.write(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 9\r\n\r\nbusy")
        elif n[0] == 2:
            return  # no answer: the per-try timeout
        else:
            b.t.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")

    async def h2s(b: H2Backend, sid: int) -> None:
        n[0] += 1
        if n[0] == 1:
            b.send(b.codec.send_response_head(sid, 503, Headers(), False))
            b.send(b.codec.send_data(sid, b"busy", False))
        elif n[0] == 3:
            b.send(b.codec.send_response_head(sid, 200, Headers(), False))
            b.send(b.codec.send_data(sid, b"ok", True))

    async def main() -> None:
        async with Rig(h2, h2s if h2 else h1, per_try=0.2, attempts=2, retriable=(503, -4)) as r:
            r.send(GET)
            assert await until(lambda: r.flags)
            assert r.fwd.observed == [503, Failure.TIMEOUT, 200]
            assert r.out.out.endswith(b"ok\r\n0\r\n\r\n" if h2 else b"\r\n\r\nok")
            if h2:
                assert await until(lambda: r.backends[0].resets == [1, 3])
                assert len(r.pool.dialled) == 1 and not r.pool.dialled[0].codec._unacked
            else:
                assert [c.closed for c in r.pool.dialled] == [True, True, False]
            assert not any(c.queues for c in r.pool.dialled) and not r.armed_deadlines()

    asyncio.run(main())


def test_an_h1_connection_is_reused_only_after_a_complete_exchange():
    """Two requests in a row share the backend connection; a caller that leaves mid-stream
    has it closed (an HTTP/1.1 exchange cannot be abandoned and the connection reused)."""
    n = [0]

    async def h1(b: H1Backend) -> None:
        n[0] += 1
        if n[0] < 3:
            b.t.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        else:
            b.t.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n")

    async def main() -> None:
        async with Rig(False, h1, per_try=1.0) as r:
            for i in (1, 2):
                r.send(GET)
                assert await until(lambda i=i: len(r.flags) == i)
            assert len(r.pool.dialled) == 1 and not r.pool.dialled[0].closed
            r.send(GET)
            assert await until(lambda: r.out.out.endswith(b"hello\r\n"))
            r.caller.connection_lost(None)  # the caller leaves mid-stream
            up = r.pool.dialled[0]
            assert await until(lambda: up.closed and not r.caller.tasks)
            assert not up.queues and not r.armed_deadlines()
            assert not r.pool.has_idle(up.ep, CALLER.client_ip)  # type: ignore[arg-type]

    asyncio.run(main())


# ---- bounds and failures found by the review, fixed after it ---------------------------------


def test_an_h1_backend_is_not_read_ahead_of_a_caller_that_stops_reading():
    """The caller stops reading while an HTTP/1.1 backend keeps sending: the backend
    connection stops being read once the try holds READ_AHEAD events (HTTP/2 is bounded by
    its window), so the waypoint never holds the whole answer; when the caller reads
    again, the rest comes through, byte for byte."""
    from agent.waypoint.upstream import READ_AHEAD

    chunks = 400

    async def h1(b: H1Backend) -> None:
        b.t.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        for i in range(chunks):
            b.t.write(b"400\r\n" + bytes([65 + i % 26]) * 1024 + b"\r\n")
            if i % 8 == 0:
                await asyncio.sleep(0.001)  # several reads, not one
        b.t.write(b"0\r\n\r\n")

    async def main() -> None:
        async with Rig(False, h1, per_try=30.0) as r:
            r.caller.pause_writing()  # the caller reads nothing from the start
            r.send(GET)
            assert await until(lambda: r.pool.dialled and r.pool.dialled[0].queues)
            up = r.pool.dialled[0]
            t = up.queues[1]
            assert await until(lambda: t.paused)
            await asyncio.sleep(0.2)  # the backend has written everything meanwhile
            held = t.qsize()
            # One read's events may land past the mark, never the whole answer.
            assert READ_AHEAD <= held < chunks // 2, held
            r.caller.resume_writing()
            assert await until(lambda: r.flags)
            body = bytes(r.out.out).split(b"\r\n\r\n", 1)[1]
            want = b"".join(bytes([65 + i % 26]) * 1024 for i in range(chunks))
            got = bytearray()
            while body and not body.startswith(b"0\r\n"):
                size, _, rest = body.partition(b"\r\n")
                n = int(size, 16)
                got += rest[:n]
                body = rest[n + 2 :]
            assert bytes(got) == want
            assert r.flags == ["-"] and not t.paused and not up.queues

    asyncio.run(main())


async def failed_and_reset(r: Rig) -> None:
    """A GET whose handler fails after its try got a head: a 500 to the caller, the try's
    stream reset at the backend, nothing left queued or armed."""
    r.send(GET)
    assert await until(lambda: r.out.out.startswith(b"HTTP/1.1 500 "))
    assert await until(lambda: r.backends[0].resets == [1])
    up = r.pool.dialled[0]
    assert not up.queues and not r.armed_deadlines()


def test_a_try_whose_callback_fails_is_reset_not_left_open():
    """A callback after the try's head (here the caller's after_try) raises: the handler
    fails with a 500, and the try that will never stream is reset at the backend and its
    timer stopped, not left open until the head deadline."""

    async def h2s(b: H2Backend, sid: int) -> None:
        b.send(b.codec.send_response_head(sid, 200, Headers(), False))
        b.send(b.codec.send_data(sid, b"part", False))  # ... and more would follow

    async def main() -> None:
        async with Rig(True, h2s, per_try=30.0) as r:

            def broken(token: Any, outcome: int) -> None:
                raise RuntimeError("telemetry bug")

            r.run_kw = {"after_try": broken}
            await failed_and_reset(r)

    asyncio.run(main())


def test_a_stage_that_fails_deciding_a_fallback_leaves_no_try_open():
    """A stage's fallback decision raises (a bug) after a try got its head: the handler
    answers 500, the try is reset at the backend, its timer stops and its attempt is
    released, rather than left open until the head deadline."""

    class Target:
        backend = ("ai", "llm", 8000)
        model = "m"

    class BrokenStage:
        max_body = 1 << 20
        targets = [Target(), Target()]
        finished: list[bool] = []

        def reads(self, target: str) -> bool:
            return True

        def prepare(self, body: Any, fwd: Any) -> None:
            return None

        async def admit(self, target: Any, fwd: Any) -> None:
            return None

        def falls_back(self, kind: str) -> bool:
            raise RuntimeError("stage bug")

        def picker(self, target: Any, backend: Any) -> None:
            return None

        def body_for(self, target: Any, body: Any) -> Any:
            return body

        def headers_for(self, target: Any, headers: Any, body: Any) -> Any:
            return headers

        def try_started(self, endpoint: str) -> None:
            pass

        def failed(self, target: Any, outcome: int) -> None:
            pass

        def finish(self, ok: bool) -> None:
            self.finished.append(ok)

    async def h2s(b: H2Backend, sid: int) -> None:
        b.send(b.codec.send_response_head(sid, 503, Headers(), False))
        b.send(b.codec.send_data(sid, b"busy", False))  # ... and more would follow

    async def main() -> None:
        async with Rig(True, h2s, per_try=30.0) as r:
            r.fwd.backend.key = Target.backend
            released: list[bool] = []
            attempt = r.fwd.attempt

            def tracked(picker: Any = None) -> Any:
                a = attempt(picker)
                release = a.release
                a.release = lambda: (released.append(True), release())
                return a

            r.fwd.attempt = tracked

            r.run_kw = {"stage": BrokenStage()}
            await failed_and_reset(r)
            assert released == [True]

    asyncio.run(main())


@pytest.mark.parametrize("h2", [False, True], ids=["h1", "h2"])
def test_a_handler_cancelled_mid_answer_resets_the_backend_stream(h2):
    """The waypoint shuts down (or anything else cancels the request's task) while an
    answer streams and the task waits for the backend's next piece, with the caller still
    there: the backend stream is reset (HTTP/2: one of the shared connection's concurrent
    streams would stay open for good) or its connection closed (HTTP/1.1), and nothing is
    left armed or queued."""

    async def h1(b: H1Backend) -> None:
        b.t.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nfirst\r\n")

    async def h2s(b: H2Backend, sid: int) -> None:
        b.send(b.codec.send_response_head(sid, 200, Headers(), False))
        b.send(b.codec.send_data(sid, b"first", False))

    async def main() -> None:
        async with Rig(h2, h2s if h2 else h1, per_try=5.0) as r:
            r.send(GET)
            assert await until(lambda: b"first" in r.out.out)
            await asyncio.sleep(0.05)  # the task waits for more
            (task,) = r.caller.tasks
            task.cancel()
            assert await until(task.done)
            up = r.pool.dialled[0]
            if h2:
                assert await until(lambda: r.backends[0].resets == [1])
                assert not up.closed and up.codec._h2.open_outbound_streams == 0
            else:
                assert await until(lambda: r.backends[0].closed)
                assert up.closed and not r.pool.has_idle(up.ep, CALLER.client_ip)  # type: ignore[arg-type]
            assert not up.queues and not r.armed_deadlines()

    asyncio.run(main())


def test_a_complete_h1_exchange_keeps_its_connection_when_the_task_is_cancelled():
    """The backend's whole answer is in (the last piece taken: the exchange is complete on
    the backend connection) while the caller reads nothing, so the task waits to write it;
    the task is cancelled there (shutdown). The backend's stream is over: its HTTP/1.1
    connection goes back to the pool, not closed as if the answer had been abandoned."""

    async def h1(b: H1Backend) -> None:
        b.t.write(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello")

    async def main() -> None:
        async with Rig(False, h1, per_try=5.0) as r:
            r.caller.pause_writing()  # the task waits in writable() with the answer taken
            r.send(GET)
            assert await until(
                lambda: r.pool.dialled and not r.pool.dialled[0].queues and r.caller.tasks
            )
            await asyncio.sleep(0.05)
            up = r.pool.dialled[0]
            assert up.codec.idle
            (task,) = r.caller.tasks
            task.cancel()
            assert await until(task.done)
            assert not up.closed
            assert r.pool.has_idle(up.ep, CALLER.client_ip)  # type: ignore[arg-type]
            assert not up.queues and not r.armed_deadlines()

    asyncio.run(main())


class _EndFails:
    """A stage whose end() raises (a bug) at the backend's last piece."""

    def __init__(self) -> None:
        self.finished: list[bool] = []

    def response_head(self, target: Any, status: int, upstream: Any, out: Any) -> None:
        pass

    def feed(self, data: bytes) -> bytes:
        return data

    def cut(self) -> None:
        return None

    def end(self) -> bytes:
        raise RuntimeError("stage bug at the end")

    def finish(self, ok: bool) -> None:
        self.finished.append(ok)


def test_a_complete_h1_exchange_keeps_its_connection_when_the_stage_fails_at_its_end():
    """The backend's answer is complete; the stage then fails on its last piece. The caller
    gets the failure, but the backend's exchange finished: its connection stays reusable."""

    async def h1(b: H1Backend) -> None:
        b.t.write(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello")

    async def main() -> None:
        async with Rig(False, h1, per_try=5.0) as r:
            stage = _EndFails()
            plain_stream = r.proxy._stream

            async def with_stage(x: Any, fwd: Any, t: Any, _stage: Any, target: Any) -> None:
                await plain_stream(x, fwd, t, stage, target)

            r.proxy._stream = with_stage  # type: ignore[method-assign]
            r.send(GET)
            assert await until(lambda: r.pool.dialled and not r.caller.tasks)
            up = r.pool.dialled[0]
            assert len(stage.finished) == 1
            assert not up.closed
            assert r.pool.has_idle(up.ep, CALLER.client_ip)  # type: ignore[arg-type]

    asyncio.run(main())
