"""One request through the waypoint: the engine decides, this module does the I/O.

The sequence follows docs/waypoint-engine.md: route (or answer locally), fault delay,
request rewrites, mirrors, then tries: attempt -> admit (reuse, open, queue or overflow)
-> send -> read the response head within the per-try timeout and the route's deadline ->
observe -> maybe back off and retry. The response then streams to the caller; for a
stream, the timeouts count from the last byte received, so a long generation is never cut
while tokens keep arriving.

What the engine cannot see and the shell therefore owns:
- retries and mirrors need the whole request body: bodies up to RETRY_BUFFER are held
  until the first try has an answer; a larger (streaming) body disables both;
- no retry once any response byte has gone to the caller;
- a mirror never changes the caller's answer: it is fire-and-forget and only counted.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from agent.waypoint.codec import events as ev
from agent.waypoint.codec.headers import Headers
from agent.waypoint.downstream import Exchange
from agent.waypoint.engine.engine import Forward
from agent.waypoint.engine.outcome import Failure
from agent.waypoint.engine.pool import OVERFLOW_RESPONSE, Admission
from agent.waypoint.engine.respond import Respond
from agent.waypoint.upstream import Endpoint, UpstreamConnection, UpstreamError, UpstreamPool

if TYPE_CHECKING:
    from agent.waypoint.engine.backend import Attempt

log = logging.getLogger("weft.waypoint.proxy")

RETRY_BUFFER = 64 << 10  # request bodies up to this size are held so they can be replayed
DEFAULT_HEAD_TIMEOUT = 300.0  # seconds to a response head when no route timeout is set

_FAILURE_OF = {
    "connect-failure": Failure.CONNECT_FAILURE,
    "reset": Failure.RESET,
    "refused-stream": Failure.REFUSED_STREAM,
    "protocol": Failure.RESET,
}
_FLAGS = {
    Failure.CONNECT_FAILURE: "UF",
    Failure.RESET: "UR",
    Failure.REFUSED_STREAM: "UR",
    Failure.TIMEOUT: "UT",
}


@dataclass
class Body:
    """The request body as the tries see it: fully held, or a held prefix and a stream."""

    held: bytearray = field(default_factory=bytearray)
    complete: bool = False  # `held` is the whole body
    trailers: Headers | None = None

    @property
    def replayable(self) -> bool:
        return self.complete


async def hold_body(x: Exchange, limit: int = RETRY_BUFFER) -> Body:
    """Read the request body into memory up to `limit`; stop early if it is larger."""
    b = Body()
    while len(b.held) <= limit:
        chunk = await x.body.get()
        if chunk is None:
            b.complete = not x.reset
            b.trailers = x.trailers
            return b
        b.held += chunk
        x.conn.consumed(x, len(chunk))
    return b


@dataclass
class TryResult:
    outcome: int  # HTTP status or a negative Failure
    up: UpstreamConnection | None = None
    sid: int = 0
    head: ev.ResponseHead | None = None
    events: Any = None  # the async iterator, positioned after the head
    pump: asyncio.Task[None] | None = None  # still sending a streaming request body


class Proxy:
    def __init__(
        self,
        upstream: UpstreamPool,
        endpoint_of: Callable[[Any, int], Endpoint | None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.upstream = upstream
        self.endpoint_of = endpoint_of
        self.clock = clock
        self.mirrors_sent = 0
        self.mirrors_failed = 0
        self.mirrors_skipped = 0
        self._released: dict[str, asyncio.Event] = {}

    # ---- the whole exchange ------------------------------------------------------------

    async def run(
        self,
        x: Exchange,
        fwd: Forward,
        headers: Headers,
        on_attempt: Callable[[Endpoint, int], Awaitable[Any]] | None = None,
        before_try: Callable[[Endpoint, Headers], Any] | None = None,
        after_try: Callable[[Any, int], None] | None = None,
        held: Body | None = None,
    ) -> str:
        """Forward one request as the engine decided; returns Envoy-style response flags.

        `before_try(endpoint, headers)` runs before each try (it may set per-try headers
        such as traceparent); its result goes to `after_try(result, outcome)`."""
        if fwd.delay:
            await asyncio.sleep(fwd.delay)
        fwd.rewrite_request(headers)
        target = fwd.target or x.head.target
        authority = fwd.authority or x.head.authority
        # Hold the body when it has all arrived already (free), or when a retry or a mirror
        # may need to send it again; otherwise stream it straight through.
        if held is not None:
            body = held  # read already (the AI layer had to see it)
        elif x.body_done or fwd.rule.retry.attempts > 0 or fwd.mirrors:
            body = await hold_body(x)
        else:
            body = Body()
        for m in fwd.mirrors:
            self._mirror(m, x, target, authority, headers, body)
        last: TryResult | None = None
        att: Attempt | None = None
        while True:
            chosen = fwd.attempt()
            if isinstance(chosen, Respond):
                self.reply(x, chosen)
                return chosen.code
            att = chosen
            ep = self.endpoint_of(att.endpoint.workload, att.endpoint.port)
            if ep is None:
                att.finish(Failure.CONNECT_FAILURE)
                last = TryResult(Failure.CONNECT_FAILURE)
                if (wait := fwd.retry_after(Failure.CONNECT_FAILURE)) is None:
                    break
                await asyncio.sleep(wait)
                continue
            admission = att.admit(reusable=self.upstream.has_idle(ep))
            if admission is Admission.OVERFLOW:
                self.reply(x, OVERFLOW_RESPONSE)
                return "UO"
            if admission is Admission.QUEUE:
                if not await self._wait_for_connection(fwd, att):
                    att.finish(Failure.TIMEOUT)
                    self.reply(x, OVERFLOW_RESPONSE)
                    return "UO"
                att.dequeued()
            token = before_try(ep, headers) if before_try is not None else None
            last = await self._try(
                x, fwd, att, ep, target, authority, headers, body, fresh=admission is Admission.OPEN
            )
            if after_try is not None:
                after_try(token, last.outcome)
            att.observe(last.outcome)

            if on_attempt is not None:
                await on_attempt(ep, last.outcome)
            wait = fwd.retry_after(last.outcome) if body.replayable else None
            if wait is None:
                break
            self._discard(last)
            att.release()
            self._notify(fwd)
            await asyncio.sleep(wait)
        assert last is not None
        try:
            if last.outcome < 0:
                resp = fwd.failure_response(last.outcome)
                self.reply(x, resp)
                return _FLAGS.get(Failure(last.outcome), "UF")
            await self._stream(x, fwd, last)
            return "-"
        finally:
            if att is not None:
                att.release()
            self._notify(fwd)

    # ---- one try -----------------------------------------------------------------------

    async def _try(
        self,
        x: Exchange,
        fwd: Forward,
        att: Attempt,
        ep: Endpoint,
        target: str,
        authority: str,
        headers: Headers,
        body: Body,
        *,
        fresh: bool,
    ) -> TryResult:
        deadline = fwd.deadline
        per_try = fwd.per_try_timeout
        limit = _min(per_try, None if deadline is None else deadline - self.clock())
        if limit is not None and limit <= 0:
            return TryResult(Failure.TIMEOUT)
        # asyncio.timeout, not wait_for: in Python 3.11 wait_for wraps the await in a new
        # Task, which costs more than the rest of a request's bookkeeping.
        try:
            async with asyncio.timeout(limit):
                up = await self.upstream.acquire(
                    ep,
                    x.caller.client_ip,
                    fresh=fresh,
                    on_close=fwd.backend.pool.closed if fresh else None,
                )
        except UpstreamError as e:
            return TryResult(_FAILURE_OF.get(e.kind, Failure.CONNECT_FAILURE))
        except TimeoutError:
            return TryResult(Failure.TIMEOUT)
        rest_streams = not body.complete  # the rest of the body is still in the queue
        end_now = body.complete and not body.held and body.trailers is None

        sid = up.start(x.head.method, target, authority, headers, end_stream=end_now)
        pump: asyncio.Task[None] | None = None
        if rest_streams or not up.write_ready.is_set():
            # The body is still arriving, or the connection cannot take it now: send it in
            # a task, so the answer (an early 413, a timeout) is read meanwhile.
            pump = asyncio.create_task(self._send_body(x, up, sid, body, rest_streams, end_now))
        else:
            # Complete and writable: the sends below do not wait, so no task is needed.
            await self._send_body(x, up, sid, body, False, end_now)
        events = up.events(sid)
        try:
            async with asyncio.timeout(_min(limit, DEFAULT_HEAD_TIMEOUT)):
                head = await _next_head(events)
        except TimeoutError:
            if pump is not None:
                pump.cancel()
            up.cancel(sid)
            return TryResult(Failure.TIMEOUT)
        except UpstreamError as e:
            if pump is not None:
                pump.cancel()
            return TryResult(_FAILURE_OF.get(e.kind, Failure.RESET))
        if head is None:
            if pump is not None:
                pump.cancel()
            return TryResult(Failure.RESET)
        r = TryResult(head.status, up, sid, head, events, pump)
        up.served += 1
        if fwd.backend.pool.retire_after(up.served):
            up.retire = True
        return r

    async def _send_body(
        self,
        x: Exchange,
        up: UpstreamConnection,
        sid: int,
        body: Body,
        rest_streams: bool,
        ended: bool,
    ) -> None:
        if ended:
            return
        if body.held:
            await up.send(sid, bytes(body.held), end=not rest_streams and body.trailers is None)
        if rest_streams:
            while (chunk := await x.body.get()) is not None:
                await up.send(sid, chunk, False)
                x.conn.consumed(x, len(chunk))
            if x.reset:
                up.cancel(sid)
                return
            if x.trailers is not None:
                up.trailers(sid, x.trailers)
            else:
                await up.send(sid, b"", True)
        elif body.trailers is not None:
            up.trailers(sid, body.trailers)
        elif not body.held:
            await up.send(sid, b"", True)

    # ---- the response ------------------------------------------------------------------

    async def _stream(self, x: Exchange, fwd: Forward, r: TryResult) -> None:
        assert r.head is not None and r.up is not None
        h = r.head.headers.copy()
        h.strip_hop_by_hop()
        fwd.rewrite_response(h)
        x.respond_head(r.head.status, h, r.head.end_stream)
        idle = _min(fwd.per_try_timeout, fwd.remaining()) or DEFAULT_HEAD_TIMEOUT
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(idle) as deadline:
                while not r.head.end_stream:
                    e = await anext(r.events, None)
                    # A stream's timeouts count from the last byte received, not the start.
                    deadline.reschedule(loop.time() + idle)
                    if e is None:
                        break
                    if x.reset:
                        r.up.cancel(r.sid)
                        break
                    if isinstance(e, ev.Data):
                        await x.writable()
                        x.respond_data(bytes(e.data), e.end_stream)
                        if e.end_stream:
                            break
                    elif isinstance(e, ev.Trailers):
                        x.respond_trailers(e.headers)
                        break
                    elif isinstance(e, ev.StreamReset):
                        x.abort()
                        break
        except TimeoutError:
            r.up.cancel(r.sid)
            x.abort()
        except UpstreamError:
            x.abort()
        finally:
            if r.pump is not None and not r.pump.done():
                r.pump.cancel()
            self.upstream.release_conn(r.up)

    def _discard(self, r: TryResult) -> None:
        if r.pump is not None and not r.pump.done():
            r.pump.cancel()
        if r.up is not None:
            r.up.cancel(r.sid)

    def reply(self, x: Exchange, resp: Respond) -> None:
        """Answer the caller from the waypoint itself (after the response's delay)."""

        async def answer() -> None:
            if resp.delay:
                await asyncio.sleep(resp.delay)
            h = Headers()
            for k, v in resp.final_headers:
                h.add(k, v)
            x.local_reply(resp.status, resp.body, h)

        if resp.delay:
            asyncio.get_running_loop().create_task(answer())
        else:
            h = Headers()
            for k, v in resp.final_headers:
                h.add(k, v)
            x.local_reply(resp.status, resp.body, h)

    # ---- queueing for a connection -----------------------------------------------------

    async def _wait_for_connection(self, fwd: Forward, att: Attempt) -> bool:
        ev_ = self._released.setdefault(fwd.backend.name, asyncio.Event())
        limit = _min(fwd.per_try_timeout, fwd.remaining()) or 10.0
        try:
            await asyncio.wait_for(ev_.wait(), limit)
            return True
        except TimeoutError:
            return False

    def _notify(self, fwd: Forward) -> None:
        e = self._released.pop(fwd.backend.name, None)
        if e is not None:
            e.set()

    # ---- mirrors -----------------------------------------------------------------------

    def _mirror(
        self, backend: Any, x: Exchange, target: str, authority: str, headers: Headers, body: Body
    ) -> None:
        if not body.complete and not x.body_done:
            self.mirrors_skipped += 1  # a streaming body cannot be copied without holding it
            return
        att = backend.attempt()
        if isinstance(att, Respond):
            self.mirrors_skipped += 1
            return
        ep = self.endpoint_of(att.endpoint.workload, att.endpoint.port)
        if ep is None:
            att.release()
            self.mirrors_skipped += 1
            return
        h = headers.copy()
        h.set(b"x-weft-mirror", b"1")

        async def send() -> None:
            outcome: int = Failure.RESET
            try:
                up = await asyncio.wait_for(self.upstream.acquire(ep, x.caller.client_ip), 10)
                sid = up.start(x.head.method, target, authority, h, end_stream=not body.held)
                if body.held:
                    await up.send(sid, bytes(body.held), True)
                async for e in up.events(sid):
                    if isinstance(e, ev.ResponseHead) and not e.informational:
                        outcome = e.status
                self.upstream.release_conn(up)
                self.mirrors_sent += 1
            except (UpstreamError, TimeoutError, OSError):
                self.mirrors_failed += 1
            finally:
                att.finish(outcome)

        task = asyncio.get_running_loop().create_task(send())
        task.add_done_callback(lambda t: t.exception() if not t.cancelled() else None)


async def _next_head(events: Any) -> ev.ResponseHead | None:
    async for e in events:
        if isinstance(e, ev.ResponseHead):
            if e.informational:
                continue
            return e
        if isinstance(e, ev.StreamReset):
            raise UpstreamError(
                "refused-stream" if e.error_code == 7 else "reset",
                "backend reset the stream before answering",
            )
    return None


def _min(*xs: float | None) -> float | None:
    vals = [v for v in xs if v is not None]
    return min(vals) if vals else None
