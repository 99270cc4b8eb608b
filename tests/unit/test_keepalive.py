"""gRPC keepalive between agents and the controller (controller/api/keepalive.py): a
client pinging an idle stream at the agreed interval is never sent away; the same client
against gRPC's default server policy is (the 'too many pings' drops of issue 18). Real
grpc.aio on loopback, with the intervals scaled down from 30 s / 20 s to 1 s / 0.5 s."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from controller.api.keepalive import (
    CLIENT_PING_MS,
    SERVER_MIN_PING_MS,
    client_options,
    server_options,
)

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
    try:
        async with grpc.aio.insecure_channel(
            f"127.0.0.1:{port}", options=client_options(ping_ms=1000, timeout_ms=1000)
        ) as ch:
            call = ch.unary_stream(METHOD)(b"")
            reader = asyncio.ensure_future(call.read())
            await asyncio.sleep(seconds)
            alive = not reader.done()
            call.cancel()
            reader.cancel()
            return alive
    finally:
        await server.stop(0)


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
