"""Edges of the waypoint's request shell (agent/waypoint/proxy.py) driven with stand-ins
for the pool and the backend connection's transport.

- a caller that resets its stream (an HTTP/2 RST_STREAM, or an HTTP/1.1 half-close with
  the body unfinished) while the waypoint is still dialling the backend: the try ends as a
  RESET like any other (the handler releases its attempt, stage and log line), never
  raises out of the request path (a regression found by review);
- a mirrored copy whose backend never answers is given up after MIRROR_TIMEOUT.
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

    dialled: list[UpstreamConnection] = []

    class Pool:
        def take(self, ep, client_ip):
            return None

        async def acquire(self, ep, client_ip, fresh=False, on_close=None):
            await asyncio.sleep(0)
            x.reset = True  # caller_gone() while dialling: on_reset is not set yet
            c = UpstreamConnection(h2=True)
            dialled.append(c)
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
            x, fwd, None, ep, "/", "llm", Headers(), P.Body(complete=True), up=None
        )

    r = asyncio.run(main())
    assert r == P.Failed(Failure.RESET)  # no head, so no try to stream or discard
    assert dialled and not dialled[0].queues  # the stream was reset and forgotten


def test_a_mirror_backend_that_never_answers_is_given_up(monkeypatch):
    """A mirrored copy has MIRROR_TIMEOUT from dial to the end of its answer: a backend
    that never answers is counted as a failed mirror, its attempt finishes (so the
    endpoint's active count goes back down) and the stream is reset, not left open."""
    monkeypatch.setattr(P, "MIRROR_TIMEOUT", 0.05)
    conns: list[UpstreamConnection] = []

    class Pool:
        async def acquire(self, ep, client_ip, fresh=False, on_close=None):
            c = UpstreamConnection(h2=True)
            c.connection_made(_Transport())  # writes vanish: no answer ever comes
            conns.append(c)
            return c

    finished: list[int] = []
    att = types.SimpleNamespace(
        endpoint=types.SimpleNamespace(workload=None, port=8000),
        finish=finished.append,
        release=lambda: None,
    )
    backend = types.SimpleNamespace(attempt=lambda: att)
    ep = Endpoint("10.244.2.3", 8000, "spiffe://cluster.local/ns/ai/sa/llm", "node-2", 15008)
    x = types.SimpleNamespace(
        head=types.SimpleNamespace(method="POST", target="/v1/chat/completions"),
        caller=types.SimpleNamespace(client_ip="10.244.1.2"),
        body_done=True,
    )

    async def main():
        proxy = P.Proxy(Pool(), lambda w, port: ep)
        body = P.Body(held=bytearray(b"{}"), complete=True)
        proxy._mirror(backend, x, "/v1/chat/completions", "llm", Headers(), body)
        for _ in range(100):
            await asyncio.sleep(0.01)
            if finished:
                break
        return proxy

    proxy = asyncio.run(main())
    assert proxy.mirrors_failed == 1 and proxy.mirrors_sent == 0
    assert finished == [Failure.RESET]
    assert conns and not conns[0].queues  # the copy's stream was reset and forgotten
