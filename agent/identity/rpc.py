"""The node agent's gRPC client to the controller.

grpclib (gRPC over the `h2` state machine the agent's tunnel already loads, run on the
agent's own event loop) rather than grpcio, whose C core a node agent paid for all its
life to make a handful of calls: in a lab agent after traffic, 12.3 MB of RSS in cygrpc's
mapped code, 1.4 MB of libstdc++, six threads (a timer, four event-engine workers, a
lifeguard) and about 10 MB of imports, against about 3 MB for grpclib and h2 (issue 16:
an agent of at most 60 MB). The controller, the CLI and the waypoint's gRPC health probes
keep grpcio; on the wire both are gRPC over HTTP/2 and TLS.

Calls name their method by path and use the generated protobuf messages; the generated
stubs (*_pb2_grpc) import grpcio and are not used here. Every failure is an `RpcError`
carrying a gRPC status, as an AioRpcError did: what the controller answered, or
DEADLINE_EXCEEDED for a call past its timeout, or UNAVAILABLE for a connection that could
not be made or was lost (refused, reset, TLS failure). A channel dials on its first call
and again on the first call after its connection is lost; callers retry on their own
schedule (ConfigClient, NodeCredential, SignBatcher).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncGenerator, Iterator
from typing import Any, TypeVar

import h2.exceptions
from grpclib.client import Channel, Handler
from grpclib.config import Configuration
from grpclib.const import Cardinality, Status
from grpclib.exceptions import GRPCError, ProtocolError, StreamTerminatedError
from grpclib.protocol import H2Protocol

from controller.api import keepalive

IDENTITY = "/weft.identity.v1.Identity/"
BOOTSTRAP = "/weft.identity.v1.NodeBootstrap/Bootstrap"
CONFIG_STREAM = "/weft.config.v1.ConfigDiscovery/Stream"

Reply = TypeVar("Reply")
CONNECT_TIMEOUT = 10.0  # seconds for a stream's connection (a unary call has its deadline)
# The largest message taken from the controller: a full snapshot is about 3.4 MB at 10,000
# workloads. grpclib has no receive limit of its own (grpcio's client default was 4 MiB).
MAX_MESSAGE = 64 * 1024 * 1024

__all__ = [
    "BOOTSTRAP",
    "CONFIG_STREAM",
    "IDENTITY",
    "MAX_MESSAGE",
    "ControllerChannel",
    "RpcError",
    "Status",
    "client_config",
    "server_auth_context",
    "split_address",
]


class RpcError(Exception):
    """A failed call: its gRPC status and the details that came with it."""

    def __init__(self, status: Status, details: str) -> None:
        super().__init__(f"{status.name}: {details}")
        self.status = status
        self.message = details

    def code(self) -> Status:
        return self.status

    def details(self) -> str:
        return self.message


@contextlib.contextmanager
def _as_rpc_errors() -> Iterator[None]:
    try:
        yield
    except RpcError:
        raise
    except GRPCError as e:
        raise RpcError(Status(e.status), e.message or Status(e.status).name) from None
    except TimeoutError as e:  # before OSError, which TimeoutError is
        if e.errno is None:  # the call's deadline (grpclib's)
            raise RpcError(Status.DEADLINE_EXCEEDED, "deadline exceeded") from None
        # the kernel's ETIMEDOUT: a connection not made or lost, not a deadline
        raise RpcError(Status.UNAVAILABLE, f"{type(e).__name__}: {e}") from None
    except (OSError, StreamTerminatedError, ProtocolError, h2.exceptions.H2Error) as e:
        raise RpcError(Status.UNAVAILABLE, f"{type(e).__name__}: {e}") from None
    except Exception as e:
        # Anything else from the client (a reply that does not parse, a message cut short,
        # a compressed one, a response without :status) is still a failed call, as grpcio
        # reported it: the callers' retry loops must see an RpcError, never something that
        # ends their task.
        raise RpcError(Status.INTERNAL, f"{type(e).__name__}: {e}") from None


def split_address(address: str) -> tuple[str, int]:
    """host:port or [v6]:port."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"controller address {address!r}: expected host:port")
    return host.strip("[]"), int(port)


def client_config(
    server_name: str | None = None,
    ping_ms: int = keepalive.CLIENT_PING_MS,
    timeout_ms: int = keepalive.CLIENT_PING_TIMEOUT_MS,
) -> Configuration:
    """The channel's HTTP/2 settings: keepalive pings as controller/api/keepalive.py agrees
    with the server (every `ping_ms` whether or not a call is open or data flows; the
    connection is dropped when a ping is not answered within `timeout_ms`)."""
    return Configuration(
        ssl_target_name_override=server_name,
        _keepalive_time=ping_ms / 1000,
        _keepalive_timeout=timeout_ms / 1000,
        _keepalive_permit_without_calls=True,
        _http2_max_pings_without_data=0,
        # grpclib's own floor (300 s by default) would space the pings on an idle config
        # stream five minutes apart: a dead controller would go unnoticed as long.
        _http2_min_sent_ping_interval_without_data=ping_ms / 1000,
    )


class _Protocol(H2Protocol):
    """grpclib's client protocol with two changes (grpclib is pinned below 0.5):

    - A connection is dropped as soon as it is closed. grpclib closes a connection whose
      keepalive ping went unanswered, but over TLS asyncio then waits up to 30 s for the
      dead peer's close_notify before reporting it lost; until then grpclib neither ends
      the connection's streams (a config stream hung on for a minute more) nor dials again
      (new calls failed with AttributeError).
    - A message longer than `max_message` is refused (RESOURCE_EXHAUSTED, as grpcio does)
      when its length prefix arrives, before any of it is buffered: a stream's reads of a
      message's bytes are bounded."""

    def __init__(self, *args: Any, max_message: int) -> None:
        super().__init__(*args)
        self.max_message = max_message

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        conn = self.connection
        close, create = conn.close, conn.create_stream

        def close_now() -> None:
            close()
            transport.abort()  # connection_lost at once: streams ended, the next call redials

        def create_stream(**kw: Any) -> Any:
            stream = create(**kw)
            read = stream.recv_data

            async def recv_data(size: int) -> bytes:
                if size > self.max_message:
                    raise GRPCError(
                        Status.RESOURCE_EXHAUSTED,
                        f"a message of {size} bytes from the controller; the limit is "
                        f"{self.max_message}",
                    )
                return await read(size)

            stream.recv_data = recv_data  # type: ignore[method-assign]
            return stream

        conn.close = close_now  # type: ignore[method-assign]
        conn.create_stream = create_stream  # type: ignore[method-assign]


class _Channel(Channel):
    def __init__(self, *args: Any, max_message: int, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.max_message = max_message

    def _protocol_factory(self) -> H2Protocol:
        return _Protocol(Handler(), self._config, self._h2_config, max_message=self.max_message)


class ControllerChannel:
    """One HTTP/2 connection over TLS to the controller, dialled on demand."""

    def __init__(
        self,
        address: str,
        server_name: str,
        context: ssl.SSLContext,
        *,
        max_message: int = MAX_MESSAGE,
    ) -> None:
        host, port = split_address(address)
        self._channel = _Channel(
            host, port, ssl=context, config=client_config(server_name), max_message=max_message
        )

    async def unary(
        self, method: str, request: Any, reply_type: type[Reply], *, deadline: float
    ) -> Reply:
        """One call; `deadline` (seconds) goes to the controller as grpc-timeout too."""
        with _as_rpc_errors():
            async with self._channel.request(
                method, Cardinality.UNARY_UNARY, type(request), reply_type, timeout=deadline
            ) as stream:
                await stream.send_message(request, end=True)
                reply = await stream.recv_message()
                await stream.recv_trailing_metadata()  # raises the status if not OK
        if reply is None:
            raise RpcError(Status.INTERNAL, f"{method}: the controller sent no reply")
        return reply

    async def stream(
        self,
        method: str,
        request_type: type[Any],
        reply_type: type[Reply],
        outbox: asyncio.Queue[Any],
    ) -> AsyncGenerator[Reply, None]:
        """A bidirectional stream: what is put in `outbox` is sent, replies are yielded
        until the controller ends the stream; failures raise RpcError."""
        with _as_rpc_errors():
            async with self._channel.request(
                method, Cardinality.STREAM_STREAM, request_type, reply_type
            ) as stream:
                try:
                    async with asyncio.timeout(CONNECT_TIMEOUT):
                        await stream.send_request()  # dials if needed
                except TimeoutError:
                    raise RpcError(
                        Status.UNAVAILABLE, f"no connection within {CONNECT_TIMEOUT:.0f} s"
                    ) from None

                async def send() -> None:
                    while True:
                        await stream.send_message(await outbox.get())

                sender = asyncio.get_running_loop().create_task(send())
                try:
                    while (reply := await stream.recv_message()) is not None:
                        yield reply
                    await stream.recv_trailing_metadata()
                finally:
                    sender.cancel()
                    await asyncio.wait([sender])  # ended; a cancel of ours still propagates

    def close(self) -> None:
        self._channel.close()


def server_auth_context(trust_pem: bytes) -> ssl.SSLContext:
    """TLS to the controller without a client certificate (bootstrap): the controller's
    certificate must chain to `trust_pem` and name the endpoint's server name."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=trust_pem.decode())
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["h2"])
    return ctx
