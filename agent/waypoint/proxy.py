"""One request through the waypoint: the engine decides, this module does the I/O.

This is the waypoint's one request path; every request takes it, with or without AI policy.
The sequence (docs/waypoint-engine.md, "One request path") is: route (or answer locally),
fault delay, request rewrites, mirrors; then, when a policy stage applies (AI policy), the
stage reads the held body and plans targets (a model route's primary and fallbacks); for
each target: the stage's admission (token budget, priority), then the engine's tries:
attempt -> admit to the connection pool (reuse, open, queue or overflow) -> send -> read
the response head within the per-try timeout and the route's deadline -> observe (latency,
outlier detection) -> maybe back off and retry within the budget. A target whose tries all
failed in a way the model route falls back on gives way to the next. The response then
streams to the caller through the stage (usage accounting); for a stream, the timeouts
count from the last byte received, so a long generation is never cut while tokens arrive.

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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from agent.frozen import frozen
from agent.waypoint.ai.router import failure_kind
from agent.waypoint.chanq import EMPTY
from agent.waypoint.codec import events as ev
from agent.waypoint.codec.headers import Headers
from agent.waypoint.deadline import Deadline
from agent.waypoint.downstream import Exchange
from agent.waypoint.engine.engine import Forward
from agent.waypoint.engine.outcome import Failure
from agent.waypoint.engine.pool import OVERFLOW_RESPONSE, Admission
from agent.waypoint.engine.respond import Respond, plain
from agent.waypoint.errors import Style
from agent.waypoint.upstream import (
    Endpoint,
    StreamEvents,
    UpstreamConnection,
    UpstreamError,
    UpstreamPool,
)

if TYPE_CHECKING:
    from agent.waypoint.engine.backend import Attempt, Backend, Picker

log = logging.getLogger("weft.waypoint.proxy")

RETRY_BUFFER = 64 << 10  # request bodies up to this size are held so they can be replayed
DEFAULT_HEAD_TIMEOUT = 300.0  # seconds to a response head when no route timeout is set
MIRROR_TIMEOUT = 30.0  # seconds a mirrored copy may take from dial to the end of its answer

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
# Answers the waypoint makes itself, as Envoy-style response flags (a bounded label set).
RESPOND_FLAGS = {
    "NoMatchingRoute": "NR",
    "BackendNotFound": "NR",
    "FilterNotFound": "NR",
    "IncompatibleFilters": "NR",
    "ModelNotFound": "NR",
    "Redirect": "-",
    "CacheHit": "-",
    "BadRequest": "-",
    "PayloadTooLarge": "-",
    "FaultAbort": "FI",
    "Overflow": "UO",
    "NoHealthyEndpoint": "UH",
    "Fallback": "UH",
    "RateLimited": "RL",
    "QuotaStoreUnavailable": "RL",
    "Shed": "SH",
    "RBACAccessDenied": "UAEX",
    "UpstreamFailure": "UF",
    "UpstreamTimeout": "UT",
}
DEADLINE_TRAILERS = Headers.of(
    ("grpc-status", "4"), ("grpc-message", "upstream timeout: no data within the route timeout")
)
TOO_LARGE = plain(413, "PayloadTooLarge", "request body too large for model routing")
NOTHING_TRIED = plain(503, "NoHealthyEndpoint", "no target of the model route could be tried")


def _declared_small(headers: Headers) -> bool:
    """The request says its body fits the retry buffer (a content-length within it)."""
    n = headers.get(b"content-length")
    return n is not None and n.isdigit() and int(n) <= RETRY_BUFFER


# A try that got no response head, as the condition it is (fallbackOn's vocabulary; the
# AI stage's GenAI metrics use the same words for error.type).
FAILURE_KIND: dict[int, str] = {
    Failure.CONNECT_FAILURE: "connect-failure",
    Failure.TIMEOUT: "timeout",
    Failure.RESET: "reset",
    Failure.REFUSED_STREAM: "reset",  # a reset (REFUSED_STREAM) before the response head
}


def _kind(outcome: int) -> str | None:
    """The fallbackOn condition of a try's outcome, or None when it is an answer to send."""
    if outcome < 0:
        return FAILURE_KIND.get(outcome, "connect-failure")
    return failure_kind(outcome)


def _kind_of_answer(r: Respond) -> str:
    """The fallbackOn condition of an answer the mesh made instead of a try."""
    if r.code == "RateLimited":
        return "over-quota"
    if r.code in ("NoHealthyEndpoint", "Overflow", "BackendNotFound", "Fallback"):
        return "connect-failure"
    return "5xx" if r.status >= 500 else str(r.status)


@dataclass
class Body:
    """The request body as the tries see it: fully held, or a held prefix and a stream."""

    held: bytearray = field(default_factory=bytearray)
    complete: bool = False  # `held` is the whole body
    trailers: Headers | None = None
    # While the body streams to the first try, a copy is kept up to RETRY_BUFFER: if it
    # ends within that, it becomes `complete` and a retry can send it again.
    teeing: bool = True


async def hold_body(x: Exchange, limit: int = RETRY_BUFFER) -> Body:
    """Read the request body into memory up to `limit`; stop early if it is larger."""
    b = Body()
    q = x.body
    while len(b.held) <= limit:
        # Usually the whole body came with the head: take it without awaiting.
        chunk = q.poll()
        if chunk is EMPTY:
            chunk = await q.get()
        if chunk is None:
            b.complete = not x.reset
            b.trailers = x.trailers
            return b
        b.held += chunk
        x.conn.consumed(x, len(chunk))
    return b


@frozen
class Failed:
    """A try that got no response head: why (a negative Failure)."""

    outcome: int


class Try(StreamEvents):
    """One try on a backend connection, from its request to the end of its answer: the
    stream's events (the connection puts them here), the try's timer (the head's timeout,
    then the stream's idle timeout) and its outcome. One object and its timer per try on
    the common path, where there were four (an event queue, its reader, the timer and a
    result)."""

    __slots__ = ("deadline", "head", "idle", "outcome", "pump")

    def __init__(self) -> None:
        super().__init__()
        self.deadline = Deadline()
        self.head: ev.ResponseHead | None = None
        self.outcome = 0  # the head's status, once it came
        self.pump: asyncio.Task[None] | None = None  # still sending a streaming body
        self.idle = 0.0  # the answer's idle timeout, worked out when it first has to wait

    def arm_idle(self, fwd: Forward) -> None:
        """About to wait while streaming the answer (for the backend, or for a caller that
        stops reading): the timer runs the idle timeout from now. Once its head is relayed,
        an answer runs as long as bytes keep coming: it is cut when none came for the
        per-try timeout, else the route's request timeout, else DEFAULT_HEAD_TIMEOUT, the
        same whenever the head arrived (the request deadline bounded the way to the head;
        a long generation is never cut while its tokens arrive). Everything received so far
        was relayed just now (moving the deadline later is an assignment: Deadline re-arms
        lazily)."""
        idle = self.idle
        if not idle:
            idle = self.idle = (
                fwd.per_try_timeout or fwd.rule.request_timeout or DEFAULT_HEAD_TIMEOUT
            )
        dl = self.deadline
        dl.arm(dl.loop.time() + idle)

    async def response_head(self) -> ev.ResponseHead | None:
        """The final response head (1xx heads are skipped); None if the stream ended
        without one. Raises UpstreamError when the backend reset the stream first."""
        while True:
            e = self.ready()
            if e is None:
                e = await self.next()
                if e is None:
                    return None
            if type(e) is ev.ResponseHead:
                if not e.informational:
                    return e
            elif type(e) is ev.StreamReset:
                raise UpstreamError(
                    "refused-stream" if e.error_code == 7 else "reset",
                    "backend reset the stream before answering",
                )

    def discard(self) -> None:
        """Not streamed to the caller (retried, or fallen back from): the stream is reset
        and the timer and body pump stop."""
        self.deadline.close()
        if self.pump is not None and not self.pump.done():
            self.pump.cancel()
        self.conn.cancel(self.sid)


class Stage(Protocol):
    """What a request's policy layer (AI policy) adds to the one request path.

    The proxy calls these in this order: `reads` with the request's target, and if it says
    the stage reads the request, `prepare` once, with the whole body held; then for
    each of `targets` (the primary, then fallbacks) `admit`, `body_for` / `headers_for` and
    `picker`, then the engine's tries (`try_started` before each); a target whose last try
    failed in a way `falls_back` accepts is given up with `failed` and the next target is
    tried; the answer's head goes through `response_head`, its body through `feed` and
    `end` (or ends early with what `cut` returns), and `finish(ok)` closes the request. A
    request that ends before an answer streams (answered by the mesh, the caller gone, the
    task cancelled) ends with `abandoned`, which gives back what is still held and must
    do nothing after `failed` or a refusal."""

    max_body: int
    targets: list[Any]

    def reads(self, target: str) -> bool: ...
    def prepare(self, body: Body, fwd: Forward) -> Respond | None: ...
    async def admit(self, target: Any, fwd: Forward) -> Respond | None: ...
    def falls_back(self, kind: str) -> bool: ...
    def picker(self, target: Any, backend: Any) -> Picker | None: ...
    def body_for(self, target: Any, body: Body) -> Body: ...
    def headers_for(self, target: Any, headers: Headers, body: Body) -> Headers: ...
    def try_started(self, endpoint: str) -> None: ...
    def failed(self, target: Any, outcome: int) -> None: ...
    def abandoned(self) -> None: ...
    def response_head(self, target: Any, status: int, upstream: Headers, out: Headers) -> None: ...
    def feed(self, data: bytes) -> bytes: ...
    def cut(self) -> bytes | None: ...
    def end(self) -> bytes: ...
    def finish(self, ok: bool) -> None: ...


class Proxy:
    def __init__(
        self,
        upstream: UpstreamPool,
        endpoint_of: Callable[[Any, int], Endpoint | None],
        backend_of: Callable[[tuple[str, str, int]], Backend | None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.upstream = upstream
        self.endpoint_of = endpoint_of
        self.backend_of = backend_of
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
        *,
        stage: Stage | None = None,
        before_try: Callable[[Endpoint, Headers], Any] | None = None,
        after_try: Callable[[Any, int], None] | None = None,
    ) -> str:
        """Forward one request as the engine decided; returns Envoy-style response flags.

        This is the waypoint's one request path: every request, with or without AI policy,
        goes through it (the composition is documented in docs/waypoint-engine.md).
        `before_try(endpoint, headers)` runs before each try (it may set per-try headers
        such as traceparent); its result goes to `after_try(result, outcome)`."""
        if fwd.delay:
            await asyncio.sleep(fwd.delay)
        fwd.rewrite_request(headers)
        target = fwd.target or x.head.target
        authority = fwd.authority or x.head.authority
        # Hold the body when it has all arrived already (free), when a retry or a mirror may
        # need to send it again, or when a policy must read it; else stream it through.
        if stage is not None and not stage.reads(target):
            stage = None  # not a request the policy reads (a gRPC call, an upload, ...)
        if stage is not None:
            body = await hold_body(x, stage.max_body)
            if not body.complete:
                if x.reset:
                    return "DC"
                await self.reply(x, TOO_LARGE)
                return "-"
            answer = stage.prepare(body, fwd)
            if answer is not None:
                await self.reply(x, answer)
                return RESPOND_FLAGS.get(answer.code, "-")
            if not stage.targets:
                stage = None  # not a request the policy reads (GET /v1/models, ...)
        elif x.body_done or (
            (fwd.rule.retry.attempts > 0 or fwd.mirrors) and _declared_small(x.head.headers)
        ):
            body = await hold_body(x)
        else:
            # Streamed to the first try as it arrives (a gRPC stream, a large upload): never
            # waited for, or bidirectional calls would deadlock. A copy kept on the way
            # (Body.teeing) still lets a retry resend a body that turned out small.
            body = Body()
        for m in fwd.mirrors:
            self._mirror(m, x, target, authority, headers, body)

        plan: list[Any] = stage.targets if stage is not None else [None]
        last: Try | Failed | Respond = NOTHING_TRIED
        att: Attempt | None = None
        chosen: Any = None
        tfwd = fwd
        streamed = False  # the try is _stream's from then on (it ends it)
        try:
            for i, chosen in enumerate(plan):
                more = i + 1 < len(plan)
                if stage is None:
                    send_body, send_headers, picker = body, headers, None
                else:
                    routed = self._retarget(fwd, chosen.backend)
                    if isinstance(routed, Respond):
                        last = routed
                        continue
                    tfwd = routed
                    refused = await stage.admit(chosen, tfwd)
                    if refused is not None:
                        if more and stage.falls_back(_kind_of_answer(refused)):
                            continue
                        await self.reply(x, refused)
                        return RESPOND_FLAGS.get(refused.code, "-")
                    send_body = stage.body_for(chosen, body)
                    send_headers = stage.headers_for(chosen, headers, send_body)
                    picker = stage.picker(chosen, tfwd.backend)
                last, att = await self._tries(
                    x,
                    tfwd,
                    target,
                    authority,
                    send_headers,
                    send_body,
                    picker,
                    stage,
                    before_try,
                    after_try,
                )
                if stage is None:
                    break
                if x.reset:
                    # The caller left: no fallback is tried for it, and its going says
                    # nothing about the target (no failure recorded, no canary observed).
                    # An answer already there is streamed, which ends it at once and
                    # settles it as a cut answer (finish).
                    if not isinstance(last, Try):
                        return "DC"  # the stage is settled on the way out (abandoned)
                    break
                kind = _kind_of_answer(last) if isinstance(last, Respond) else _kind(last.outcome)
                if kind is None:
                    break  # an answer to stream
                falls = more and stage.falls_back(kind)
                if falls or isinstance(last, Respond) or last.outcome < 0:
                    # Given up (a failed response that is answered is the stage's to finish).
                    stage.failed(chosen, -1 if isinstance(last, Respond) else last.outcome)
                if not falls:
                    break
                x.annotations.setdefault("fallbacks", []).append(getattr(chosen, "model", None))
                if isinstance(last, Try):
                    last.discard()
                    last = NOTHING_TRIED  # every way on sets it again (or answers)
                if att is not None:
                    att.release()
                    self._notify(tfwd)
                att = None
            if isinstance(last, Respond):
                await self.reply(x, last)
                return RESPOND_FLAGS.get(last.code, last.code)
            if last.outcome < 0:
                await self.reply(x, tfwd.failure_response(last.outcome))
                return _FLAGS.get(Failure(last.outcome), "UF")
            assert isinstance(last, Try)  # a Failed one has a negative outcome
            streamed = True
            await self._stream(x, tfwd, last, stage, chosen)
            return "-"
        finally:
            if isinstance(last, Try) and not streamed:
                # Neither streamed nor given up (a stage's callback raised): its stream
                # is reset and its timer stops.
                last.discard()
            if att is not None:
                att.release()
            self._notify(tfwd)
            if stage is not None and not streamed:
                # However the request ended before an answer streamed (answered by the
                # mesh, the caller gone, the task cancelled with its connection), what the
                # stage still holds (a quota reservation, an endpoint counted in flight)
                # is given back; after failed() or a refusal there is nothing left.
                stage.abandoned()

    def _retarget(self, fwd: Forward, key: tuple[str, str, int]) -> Forward | Respond:
        """The route's decision sent to a model route's target backend."""
        if key == fwd.backend.key:
            return fwd
        b = self.backend_of(key) if self.backend_of is not None else None
        if b is None:
            return plain(500, "BackendNotFound", f"no Service port {key[0]}/{key[1]}:{key[2]}")
        return fwd.to_backend(b)

    # ---- the tries at one backend --------------------------------------------------------

    async def _tries(
        self,
        x: Exchange,
        fwd: Forward,
        target: str,
        authority: str,
        headers: Headers,
        body: Body,
        picker: Picker | None,
        stage: Stage | None,
        before_try: Callable[[Endpoint, Headers], Any] | None,
        after_try: Callable[[Any, int], None] | None,
    ) -> tuple[Try | Failed | Respond, Attempt | None]:
        """The engine's tries at one backend: attempt, admit, send, observe, retry. Returns
        the last try (still holding its attempt) or the answer the engine chose instead."""
        last: Try | Failed = Failed(Failure.CONNECT_FAILURE)
        while True:
            chosen = fwd.attempt(picker)
            if isinstance(chosen, Respond):
                return chosen, None
            att = chosen
            up: UpstreamConnection | None = None
            try:
                ep = self.endpoint_of(att.endpoint.workload, att.endpoint.port)
                if ep is None:
                    att.observe(Failure.CONNECT_FAILURE)
                    last = Failed(Failure.CONNECT_FAILURE)
                    if (wait := fwd.retry_after(Failure.CONNECT_FAILURE, att)) is None:
                        return last, att
                    await asyncio.sleep(wait)
                    continue
                # An idle connection for this caller is taken now (nothing awaits before
                # the try uses it); none: the pool decides whether one may be opened.
                up = self.upstream.take(ep, x.caller.client_ip)
                admission = att.admit(reusable=up is not None)
                while admission is Admission.QUEUE:
                    # Wait for a connection to be released or closed, then ask again: reuse it,
                    # or open one in the slot a closed one left (counted like any other).
                    if not await self._wait_for_connection(fwd, att):
                        att.abandon()  # waiting says nothing about the endpoint
                        return OVERFLOW_RESPONSE, None
                    att.dequeued()
                    up = self.upstream.take(ep, x.caller.client_ip)
                    admission = att.admit(reusable=up is not None)
                if admission is Admission.OVERFLOW:
                    return OVERFLOW_RESPONSE, None
                if stage is not None:
                    stage.try_started(ep.key)
                token = before_try(ep, headers) if before_try is not None else None
                last = await self._try(
                    x,
                    fwd,
                    att,
                    ep,
                    target,
                    authority,
                    headers,
                    body,
                    up=up,
                )
                up = None  # the try's now (kept for the answer, closed or shared)
                if after_try is not None:
                    after_try(token, last.outcome)
                if x.reset:
                    att.observed = True  # the caller left: says nothing about the endpoint
                att.observe(last.outcome)
                replay = body.complete and not x.reset  # a body held whole can go again
                wait = fwd.retry_after(last.outcome, att) if replay else None
                if wait is None:
                    return last, att
                if isinstance(last, Try):
                    last.discard()
                self._notify(fwd)
                await asyncio.sleep(wait)
            except BaseException:
                # Cancelled (the caller's connection went away) or broken mid-try: the
                # attempt is released unjudged, and whoever waits for a connection
                # is told, as a finished try would. A connection taken for a try that
                # never began goes back (release_conn closes it if it is mid-exchange).
                if up is not None:
                    self.upstream.release_conn(up)
                if isinstance(last, Try):
                    # A try with a head that neither streams nor was given up (a callback
                    # above raised): its stream is reset and its timer stops.
                    last.discard()
                att.abandon()
                self._notify(fwd)
                raise

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
        up: UpstreamConnection | None,
    ) -> Try | Failed:
        """One try on `up` (an idle connection taken for it), or on a connection dialled
        now (`up` None: the pool admitted a new one)."""
        deadline = fwd.deadline
        per_try = fwd.per_try_timeout
        limit = per_try if deadline is None else _min(per_try, deadline - self.clock())
        if limit is not None and limit <= 0:
            if up is not None:
                self.upstream.release_conn(up)  # taken for this try, which never began
            else:
                fwd.backend.pool.closed()  # the connection admitted for it is never opened
            return Failed(Failure.TIMEOUT)
        t = Try()
        started = t.deadline.loop.time()  # the try's time runs from here, dial included
        if up is None:
            # asyncio.timeout, not wait_for: in Python 3.11 wait_for wraps the await in a
            # new Task, which costs more than the rest of a request's bookkeeping.
            try:
                async with asyncio.timeout(limit):
                    up = await self.upstream.acquire(
                        ep, x.caller.client_ip, fresh=True, on_close=fwd.backend.pool.closed
                    )
            except UpstreamError as e:
                fwd.backend.pool.closed()
                return Failed(_FAILURE_OF.get(e.kind, Failure.CONNECT_FAILURE))
            except TimeoutError:
                fwd.backend.pool.closed()
                return Failed(Failure.TIMEOUT)
            except asyncio.CancelledError:
                fwd.backend.pool.closed()  # the caller left mid-dial: no connection was made
                raise
        rest_streams = not body.complete  # the rest of the body is still in the queue
        end_now = body.complete and not body.held and body.trailers is None

        method = x.head.method
        writable = not up.write_paused
        if body.complete and body.held and body.trailers is None and writable:
            # The common case: a whole body that the connection can take now goes out with
            # its head in one write.
            sid = up.start(method, target, authority, headers, True, bytes(body.held), t)
        elif rest_streams or not writable:
            sid = up.start(method, target, authority, headers, end_now, rx=t)
            # The body is still arriving, or the connection cannot take it now: send it in
            # a task, so the answer (an early 413, a timeout) is read meanwhile.
            t.pump = asyncio.create_task(self._send_body(x, up, sid, body, rest_streams, end_now))
        else:
            # Complete and writable: the sends below do not wait, so no task is needed.
            sid = up.start(method, target, authority, headers, end_now, rx=t)
            await self._send_body(x, up, sid, body, False, end_now)
        # The caller leaving resets the backend's stream, unless its answer is all in.
        x.on_reset = lambda: None if t.done else up.cancel(sid)
        if x.reset:  # gone while the try was being set up
            up.cancel(sid)
        # One timer for the try: the head's timeout here, the stream's idle timeout later.
        dl = t.deadline
        dl.arm(
            started + (DEFAULT_HEAD_TIMEOUT if limit is None else min(limit, DEFAULT_HEAD_TIMEOUT))
        )
        head: ev.ResponseHead | None = None
        try:
            # Inside the try: a stream already gone (the caller reset it during set-up,
            # the connection failed) is this try's RESET, not the handler's error.
            head = await t.response_head()
        except BaseException as e:
            timed_out = isinstance(e, asyncio.CancelledError) and dl.expired()
            if not isinstance(e, UpstreamError):
                up.cancel(sid)  # abandoned here (a broken stream is over already)
            if timed_out:
                return Failed(Failure.TIMEOUT)
            if isinstance(e, UpstreamError):
                return Failed(_FAILURE_OF.get(e.kind, Failure.RESET))
            raise
        finally:
            if head is None:  # no answer to stream: the try's timer and body pump end here
                dl.close()
                if t.pump is not None:
                    t.pump.cancel()
        if head is None:
            return Failed(Failure.RESET)
        dl.arm(None)  # the stream arms it again
        t.head = head
        t.outcome = head.status
        up.served += 1
        if fwd.backend.pool.retire_after(up.served):
            up.retire = True
        return t

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
            body.teeing = body.teeing and len(body.held) <= RETRY_BUFFER
            while (chunk := await x.body.get()) is not None:
                await up.send(sid, chunk, False)
                x.conn.consumed(x, len(chunk))
                if body.teeing:
                    if len(body.held) + len(chunk) <= RETRY_BUFFER:
                        body.held += chunk
                    else:
                        body.teeing = False
                        body.held = bytearray()
            if x.reset:
                up.cancel(sid)
                return
            if body.teeing:
                body.complete = True  # all of it went out, and all of it is kept
                body.trailers = x.trailers
            if x.trailers is not None:
                up.trailers(sid, x.trailers)
            else:
                await up.send(sid, b"", True)
        elif body.trailers is not None:
            up.trailers(sid, body.trailers)
        elif not body.held:
            await up.send(sid, b"", True)

    # ---- the response ------------------------------------------------------------------

    async def _stream(
        self, x: Exchange, fwd: Forward, r: Try, stage: Stage | None, target: Any
    ) -> None:
        assert r.head is not None  # _try hands a head over with its (disarmed) timer
        up, dl = r.conn, r.deadline
        ok = 200 <= r.head.status < 300
        # The backend's stream is over: it ended or reset it, its connection failed, or it
        # was reset from here. Otherwise (a stage or the caller's side failed, the task was
        # cancelled, as at shutdown) it is reset on the way out.
        over = r.head.end_stream
        try:
            # The head is ours to edit (parsed from the backend's bytes), unless the stage
            # reads what the backend sent beside what the caller gets.
            h = r.head.headers if stage is None else r.head.headers.copy()
            h.strip_hop_by_hop()
            fwd.rewrite_response(h)
            if stage is not None:
                stage.response_head(target, r.head.status, r.head.headers, h)
            x.respond_head(r.head.status, h, r.head.end_stream)
            while not r.head.end_stream:
                # Usually the body came with the head (one read): take it without awaiting.
                e = r.ready()
                if e is None:
                    r.arm_idle(fwd)
                    e = await r.next()
                if x.reset:  # the caller left: not a finished answer, whatever came
                    ok = False
                    break
                if e is None:
                    over = True
                    break
                if isinstance(e, ev.Data):
                    # Taken: an end_stream Data ended the backend's stream, whatever then
                    # happens on the caller's side (a stage failing, a cancelled task).
                    over = e.end_stream
                    data = bytes(e.data)
                    if stage is not None:
                        data = stage.feed(data)
                        if e.end_stream:
                            data += stage.end()
                        elif (tail := stage.cut()) is not None:
                            # The stage ends the answer here (a token limit reached
                            # while streaming, onExceed: truncate).
                            if x.conn.write_paused or x.window_closed():
                                r.arm_idle(fwd)
                                await x.writable()
                            x.respond_data(data + tail, True)
                            ok = False
                            break
                    if x.conn.write_paused or x.window_closed():
                        r.arm_idle(fwd)  # a caller that stops reading: the same idle timeout
                        await x.writable()
                    x.respond_data(data, e.end_stream)
                    if e.end_stream:
                        break
                elif isinstance(e, ev.Trailers):
                    over = True
                    if stage is not None and (rest := stage.end()):
                        x.respond_data(rest)
                    x.respond_trailers(e.headers)
                    break
                elif isinstance(e, ev.StreamReset):
                    ok = False
                    over = True
                    x.abort()
                    break
        except asyncio.CancelledError:
            if not dl.expired():
                raise
            ok = False
            if x.style is Style.GRPC and x.responded:
                # A gRPC caller past its headers learns the deadline from trailers, as a
                # gRPC server would say it, not from a reset that reads as CANCELLED.
                x.respond_trailers(DEADLINE_TRAILERS)
            else:
                x.abort()
        except UpstreamError:
            ok = False
            over = True
            x.abort()
        finally:
            dl.close()
            x.on_reset = None
            r.close()
            if r.pump is not None and not r.pump.done():
                r.pump.cancel()
                # The answer ended before the request did: abandon the request's stream,
                # or an HTTP/2 one stays half-open and holds a concurrent stream for good.
                over = False
            if not over:
                up.cancel(r.sid)  # reset toward the backend (HTTP/1.1: the connection closes)
            self.upstream.release_conn(up)
            if stage is not None:
                stage.finish(ok)

    async def reply(self, x: Exchange, resp: Respond) -> None:
        """Answer the caller from the waypoint itself, in its protocol (x.style), after the
        response's delay (an injected fault's)."""
        if resp.delay:
            await asyncio.sleep(resp.delay)
        x.reply(resp)

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
        if self._released:  # someone waits for a connection (rarely)
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
            up: UpstreamConnection | None = None
            sid = 0
            done = False
            try:
                # The whole copy within MIRROR_TIMEOUT: a mirror backend that never answers
                # must not hold a task, an attempt and a connection for good.
                async with asyncio.timeout(MIRROR_TIMEOUT):
                    up = await self.upstream.acquire(ep, x.caller.client_ip)
                    sid = up.start(x.head.method, target, authority, h, end_stream=not body.held)
                    if body.held:
                        await up.send(sid, bytes(body.held), True)
                    async for e in up.events(sid):
                        if isinstance(e, ev.ResponseHead) and not e.informational:
                            outcome = e.status
                done = True
                self.upstream.release_conn(up)
                self.mirrors_sent += 1
            except (UpstreamError, TimeoutError, OSError):
                self.mirrors_failed += 1
            finally:
                if up is not None and not done:
                    up.cancel(sid)  # abandoned: reset toward the backend, never reused
                att.finish(outcome)

        task = asyncio.get_running_loop().create_task(send())
        task.add_done_callback(lambda t: t.exception() if not t.cancelled() else None)


def _min(a: float | None, b: float | None) -> float | None:
    """The smaller of two optional limits (None: no limit)."""
    if a is None:
        return b
    return a if b is None or a <= b else b
