"""A gRPC echo server (test workload) for the lab and the benchmarks: h2c, no TLS, grpc.aio.

    python -m agent.lab.workloads.grpc_echo [--port 50051] [--name NAME]

Service `weft.bench.Echo`, messages as raw bytes (gRPC frames them; no protobuf schema is
needed to carry them, and a mesh never decodes them anyway):

- `Unary`: answers with the request message.
- `ServerStream`: answers with the request message `x-messages` times (request metadata,
  default 10), then OK.
- `ClientStream`: answers, once the client half-closes, with the request messages joined
  by `+`.
- `Bidi`: answers every request message with the same bytes as soon as it arrives (a
  client may use it as ping-pong: one message, one answer, the next message).
- `Sleep`: the request is a number of seconds in ASCII (at most 3600); sleeps that long,
  silent (no response headers), then answers with the request. A deadline shorter than
  that ends the call with DEADLINE_EXCEEDED.
- `SetHealth`: the request is a serving status name, `SERVING` or `NOT_SERVING`; sets what
  the health service reports from now on and answers with the request (INVALID_ARGUMENT
  for any other name). A test calls it on one replica (its pod IP, or 127.0.0.1 from
  inside the pod) to make an active health check fail or pass.

Service `grpc.health.v1.Health` (the standard one, generated protobuf): `Check` and `Watch`
answer for "" (the server as a whole) and `weft.bench.Echo`, NOT_FOUND for any other
service. The status starts SERVING and only `SetHealth` changes it; the Echo methods
answer whatever it is.

With `--name`, every call's initial metadata carries `x-served-by: NAME`, so a client can
see which replica answered. Without it the server sends nothing extra: it does no other
work, so its cost is the same small constant under every scenario.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import AsyncIterator
from typing import Any

import grpc

from controller.api.gen.grpc.health.v1 import health_pb2, health_pb2_grpc

SERVICE = "weft.bench.Echo"
UNARY = f"/{SERVICE}/Unary"
SERVER_STREAM = f"/{SERVICE}/ServerStream"
CLIENT_STREAM = f"/{SERVICE}/ClientStream"
BIDI = f"/{SERVICE}/Bidi"
SLEEP = f"/{SERVICE}/Sleep"
SET_HEALTH = f"/{SERVICE}/SetHealth"
MESSAGES_KEY = "x-messages"
SERVED_BY_KEY = "x-served-by"
DEFAULT_MESSAGES = 10
MAX_MESSAGES = 100_000
MAX_SLEEP = 3600.0


def messages_asked(metadata: Any) -> int:
    """The `x-messages` count from invocation metadata (default 10, at most 100,000)."""
    for k, v in metadata or ():
        if k == MESSAGES_KEY:
            n = int(v)
            if not 0 <= n <= MAX_MESSAGES:
                raise ValueError(f"{MESSAGES_KEY} must be in [0, {MAX_MESSAGES}]")
            return n
    return DEFAULT_MESSAGES


def sleep_asked(request: bytes) -> float:
    """The seconds a `Sleep` request asks for (ASCII, in [0, 3600])."""
    s = float(request.decode("ascii"))
    if not 0 <= s <= MAX_SLEEP:
        raise ValueError(f"Sleep takes seconds in [0, {MAX_SLEEP:g}]")
    return s


async def unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return request


async def server_stream(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    try:
        n = messages_asked(context.invocation_metadata())
    except ValueError as e:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        return
    for _ in range(n):
        yield request


async def client_stream(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> bytes:
    return b"+".join([m async for m in requests])


async def bidi(
    requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
) -> AsyncIterator[bytes]:
    async for m in requests:
        yield m


async def sleep(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    try:
        seconds = sleep_asked(request)
    except ValueError as e:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        return b""  # not reached: abort raises
    await asyncio.sleep(seconds)
    return request


class Health(health_pb2_grpc.HealthServicer):
    """grpc.health.v1.Health for "" and weft.bench.Echo: one status for both, SERVING until
    `set` changes it. `Watch` streams the current status, then each change."""

    SERVICES = frozenset({"", SERVICE})
    SETTABLE = {
        "SERVING": health_pb2.HealthCheckResponse.SERVING,
        "NOT_SERVING": health_pb2.HealthCheckResponse.NOT_SERVING,
    }

    def __init__(self) -> None:
        self.status = health_pb2.HealthCheckResponse.SERVING
        self._changed = asyncio.Event()

    def set(self, name: str) -> None:
        """Report `name` (SERVING or NOT_SERVING) from now on; ValueError for another."""
        status = self.SETTABLE.get(name)
        if status is None:
            raise ValueError(f"SetHealth takes one of {sorted(self.SETTABLE)}, not {name!r}")
        if status != self.status:
            self.status = status
            self._changed.set()
            self._changed = asyncio.Event()

    async def Check(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        if request.service not in self.SERVICES:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=self.status)

    async def Watch(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        if request.service not in self.SERVICES:
            yield health_pb2.HealthCheckResponse(
                status=health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
            )
            return
        while True:
            changed = self._changed
            yield health_pb2.HealthCheckResponse(status=self.status)
            await changed.wait()

    async def set_health(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        try:
            self.set(request.decode("ascii", "replace"))
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        return request


def _named(name: str, method: Any, streaming: bool) -> Any:
    """`method`, sending `x-served-by: name` as initial metadata first."""
    meta = ((SERVED_BY_KEY, name),)
    if streaming:

        async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
            await context.send_initial_metadata(meta)
            async for m in method(request, context):
                yield m

        return stream

    async def call(request: Any, context: grpc.aio.ServicerContext) -> bytes:
        await context.send_initial_metadata(meta)
        return await method(request, context)

    return call


def handler(name: str = "", health: Health | None = None) -> grpc.GenericRpcHandler:
    """The Echo service; with `name`, each call's initial metadata says who served it.
    `SetHealth` changes `health` (without one, a Health nobody reads)."""

    def wrap(method: Any, streaming: bool = False) -> Any:
        return _named(name, method, streaming) if name else method

    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Unary": grpc.unary_unary_rpc_method_handler(wrap(unary)),
            "ServerStream": grpc.unary_stream_rpc_method_handler(wrap(server_stream, True)),
            "ClientStream": grpc.stream_unary_rpc_method_handler(wrap(client_stream)),
            "Bidi": grpc.stream_stream_rpc_method_handler(wrap(bidi, True)),
            "Sleep": grpc.unary_unary_rpc_method_handler(sleep),
            "SetHealth": grpc.unary_unary_rpc_method_handler((health or Health()).set_health),
        },
    )


async def serve(host: str, port: int, name: str = "") -> None:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    health = Health()
    server.add_generic_rpc_handlers((handler(name, health),))
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    if not server.add_insecure_port(f"{host}:{port}"):
        raise OSError(f"grpc_echo could not bind {host}:{port}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1.0)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m agent.lab.workloads.grpc_echo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--host", default="0.0.0.0")
    ap.add_argument("--port", type=int, default=50051)
    ap.add_argument("--name", default="", help="x-served-by initial metadata (default: none)")
    args = ap.parse_args(argv)
    asyncio.run(serve(args.host, args.port, args.name))


if __name__ == "__main__":
    main()
