"""gRPC keepalive between agents and the controller (controller/api/keepalive.py): the
agent's client (grpclib, with agent/identity/rpc.py's client_config) pinging an idle stream
at the agreed interval is never sent away by the controller's gRPC server (grpc.aio); the
same client against gRPC's default server policy is (the 'too many pings' drops of issue
18). Real servers on loopback, intervals scaled down from 30 s / 20 s to 1 s / 0.5 s."""

from __future__ import annotations

import asyncio
import contextlib

import grpc
import pytest
from grpclib.client import Channel
from grpclib.const import Cardinality
from grpclib.exceptions import StreamTerminatedError

from agent.identity.rpc import client_config
from controller.api.keepalive import CLIENT_PING_MS, SERVER_MIN_PING_MS, server_options

pytestmark = pytest.mark.timeout(60)
METHOD = "/weft.test.Idle/Wait"


async def _idle_stream_survives(server_opts: list[tuple[str, int]], seconds: float) -> bool:
    """Hold one server-streaming call open with no data for `seconds` while the client
    pings every second: True if it is still open at the end."""

    async def wait(request: bytes, context: grpc.aio.ServicerContext):  # type: ignore[no-untyped-def]
        await asyncio.sleep(seconds + 5)
        yield b"done"

    server = grpc.aio.server(options=server_opts)
    handler = grpc.method_handlers_generic_handler(
        "weft.test.Idle",
        {"Wait": grpc.unary_stream_rpc_method_handler(wait)},
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    ch = Channel("127.0.0.1", port, config=client_config(ping_ms=1000, timeout_ms=1000))
    alive = False
    try:
        # A dropped connection also fails the stream's exit: what counts is `alive`.
        with contextlib.suppress(StreamTerminatedError):
            async with ch.request(METHOD, Cardinality.UNARY_STREAM, _Raw, _Raw) as stream:
                await stream.send_message(_Raw(), end=True)
                reader = asyncio.ensure_future(stream.recv_message())
                await asyncio.sleep(seconds)
                alive = not reader.done()
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError, StreamTerminatedError):
                    await reader
                await stream.cancel()
        return alive
    finally:
        ch.close()
        await server.stop(0)


class _Raw:
    """An empty message for the test method (grpclib's codec asks for these two)."""

    def SerializeToString(self) -> bytes:
        return b""

    @classmethod
    def FromString(cls, data: bytes) -> _Raw:
        return cls()


def test_the_agreed_keepalive_keeps_an_idle_stream_open():
    """Pings every second, the server accepting them half a second apart: an idle stream
    stays open across many pings."""
    assert asyncio.run(_idle_stream_survives(server_options(min_ping_ms=500), 6))


def test_grpcs_default_server_policy_would_drop_it():
    """The control: gRPC's default server policy (pings no closer than five minutes
    without data, two strikes) ends the same stream with GOAWAY too_many_pings."""
    assert not asyncio.run(_idle_stream_survives([], 6))


def test_the_production_intervals_keep_the_same_relation():
    """The real intervals keep what the scaled test shows: clients ping less often than
    the server's minimum, with room for timer jitter."""
    assert CLIENT_PING_MS >= SERVER_MIN_PING_MS * 1.25
