"""Proxy._try when the caller goes away while the try is being set up.

The caller resets its stream (an HTTP/2 RST_STREAM, or an HTTP/1.1 half-close with the
body unfinished) while the waypoint is still dialling the backend: the try must end as a
RESET like any other (so the handler releases its attempt, stage and log line), never
raise out of the request path. A regression of the stream events' rewrite as a class
(found by review: the events were looked up before the try's error handling).
"""

from __future__ import annotations

import asyncio
import types

from agent.waypoint import proxy as P
from agent.waypoint.codec.headers import Headers
from agent.waypoint.engine.outcome import Failure
from agent.waypoint.upstream import Endpoint, UpstreamConnection


class _Transport:
    def write(self, data: bytes) -> None:
        pass

    def close(self) -> None:
        pass


def test_a_caller_reset_during_the_dial_is_a_reset_try():
    x = types.SimpleNamespace(
        head=types.SimpleNamespace(method="GET", target="/", authority="llm"),
        caller=types.SimpleNamespace(client_ip="10.244.1.2"),
        reset=False,
        on_reset=None,
    )

    class Pool:
        def take(self, ep, client_ip):
            return None

        async def acquire(self, ep, client_ip, fresh=False, on_close=None):
            await asyncio.sleep(0)
            x.reset = True  # caller_gone() while dialling: on_reset is not set yet
            c = UpstreamConnection(h2=True)
            c.connection_made(_Transport())
            c.on_close = on_close
            return c

    closed = []
    pool = types.SimpleNamespace(
        connections=0, closed=lambda: closed.append(1), retire_after=lambda n: False
    )
    fwd = types.SimpleNamespace(
        deadline=None, per_try_timeout=1.0, backend=types.SimpleNamespace(pool=pool)
    )
    ep = Endpoint("10.244.2.3", 8000, "spiffe://cluster.local/ns/ai/sa/llm", "node-2", 15008)

    async def main():
        proxy = P.Proxy(Pool(), lambda w, port: ep)
        return await proxy._try(
            x, fwd, None, ep, "/", "llm", Headers(), P.Body(complete=True), fresh=True
        )

    r = asyncio.run(main())
    assert r.outcome == Failure.RESET
    assert r.events is None and r.deadline is None  # nothing left armed or open
