"""gRPC keepalive between agents and the controller (controller/api/keepalive.py): the
agent's client (grpclib, with agent/identity/rpc.py's client_config) pinging an idle stream
at the agreed interval is never sent away by the controller's gRPC server (grpc.aio); the
same client against gRPC's default server policy is (the 'too many pings' drops of issue
18). Real servers on loopback, intervals scaled down from 30 s / 20 s to 1 s / 0.5 s."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

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
    # An unanswered ping drops the connection too: a generous 5 s for its answer, so that
    # only the server's policy can end the stream, not a slow answer on a loaded machine.
    ch = Channel("127.0.0.1", port, config=client_config(ping_ms=1000, timeout_ms=5000))
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


# ---- a controller host that dies without closing anything --------------------------------


def _tls_material() -> tuple[bytes, bytes, bytes]:
    """A CA and a server certificate for "controller.weft" (PEM: CA, certificate, key)."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test ca")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(ca_key.public_key())
        .serial_number(1)
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(2)
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("controller.weft")]), critical=True
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    key_pem = key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return ca.public_bytes(pem), cert.public_bytes(pem), key_pem


async def _tls_server(
    service: str, handlers: dict[str, Any], options: list[tuple[str, int]] | None = None
) -> tuple[grpc.aio.Server, int, bytes]:
    """A started grpc.aio server over TLS (a certificate for "controller.weft" from a CA of
    its own) serving `handlers` of `service`: the server, its port and the CA's PEM."""
    ca, cert, key = _tls_material()
    server = grpc.aio.server(options=options)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
    port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials([(key, cert)]))
    await server.start()
    return server, port, ca


class _FreezableProxy:
    """TCP forwarding that can stop forwarding both ways without closing anything: a host
    that died, or a network that dropped it."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.thawed = asyncio.Event()
        self.thawed.set()
        self.port = 0
        self.tasks: list[asyncio.Task[None]] = []

    async def start(self) -> asyncio.Server:
        srv = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = srv.sockets[0].getsockname()[1]
        return srv

    async def _pipe(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while data := await r.read(65536):
            await self.thawed.wait()
            w.write(data)

    async def _accept(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        ur, uw = await asyncio.open_connection("127.0.0.1", self.target)
        self.tasks += [asyncio.current_task()]  # type: ignore[list-item]
        await asyncio.gather(self._pipe(r, uw), self._pipe(ur, w), return_exceptions=True)


def test_a_dead_controller_ends_the_stream_within_a_ping_and_calls_fail_as_rpc_errors():
    """Over TLS, with pings scaled to 1 s / 0.5 s: once the controller's host stops
    answering, the config stream ends (UNAVAILABLE) within a ping interval and its timeout,
    not after asyncio's 30 s wait for a TLS close_notify; calls made meanwhile fail with
    RpcError only (an AttributeError from grpclib's half-closed connection used to escape
    and end the agent's node-credential task); once the host answers again, calls work."""
    import functools

    from agent.identity import rpc
    from controller.api.gen import config_pb2

    async def stream_forever(it, ctx):  # type: ignore[no-untyped-def]
        await anext(aiter(it))
        yield config_pb2.ConfigResponse(revision=1)
        await asyncio.sleep(3600)

    async def unary(req, ctx):  # type: ignore[no-untyped-def]
        return config_pb2.ConfigResponse(revision=2)

    async def main() -> None:
        codec = (config_pb2.ConfigRequest.FromString, config_pb2.ConfigResponse.SerializeToString)
        handlers = {
            "Stream": grpc.stream_stream_rpc_method_handler(stream_forever, *codec),
            "Unary": grpc.unary_unary_rpc_method_handler(unary, *codec),
        }
        server, port, ca = await _tls_server(
            "weft.config.v1.ConfigDiscovery", handlers, server_options(min_ping_ms=100)
        )
        proxy = _FreezableProxy(port)
        psrv = await proxy.start()
        orig = rpc.client_config
        rpc.client_config = functools.partial(orig, ping_ms=1000, timeout_ms=500)  # type: ignore[assignment]
        try:
            ch = rpc.ControllerChannel(
                f"127.0.0.1:{proxy.port}", "controller.weft", rpc.server_auth_context(ca)
            )
        finally:
            rpc.client_config = orig  # type: ignore[assignment]
        method = "/weft.config.v1.ConfigDiscovery/Unary"
        outbox: asyncio.Queue[config_pb2.ConfigRequest] = asyncio.Queue()
        await outbox.put(config_pb2.ConfigRequest())
        ended: list[tuple[float, BaseException | None]] = []
        loop = asyncio.get_running_loop()

        async def consume() -> None:
            try:
                async for _ in ch.stream(
                    rpc.CONFIG_STREAM, config_pb2.ConfigRequest, config_pb2.ConfigResponse, outbox
                ):
                    pass
                ended.append((loop.time(), None))
            except rpc.RpcError as e:
                ended.append((loop.time(), e))

        reader = asyncio.ensure_future(consume())
        try:
            reply = await ch.unary(
                method, config_pb2.ConfigRequest(), config_pb2.ConfigResponse, deadline=5
            )
            assert reply.revision == 2
            await asyncio.sleep(0.2)
            proxy.thawed.clear()
            frozen_at = loop.time()
            others: list[BaseException] = []
            calls = 0
            # Calls while the host is dead (8 at least, about 4 s) until the stream has
            # ended, which takes a ping interval and its timeout (1.5 s): waited for with a
            # generous 10 s, still far short of asyncio's 30 s wait for a close_notify.
            while calls < 8 or (not ended and loop.time() - frozen_at < 10):
                try:
                    await ch.unary(
                        method, config_pb2.ConfigRequest(), config_pb2.ConfigResponse, deadline=0.3
                    )
                except rpc.RpcError:
                    pass
                except Exception as e:  # what must not happen
                    others.append(e)
                calls += 1
                await asyncio.sleep(0.2)
            assert others == []
            assert ended, "the config stream did not end within 10 s"
            _, err = ended[0]
            assert isinstance(err, rpc.RpcError) and err.code() == rpc.Status.UNAVAILABLE, err
            proxy.thawed.set()  # the host is back: new connections work
            reply = await ch.unary(
                method, config_pb2.ConfigRequest(), config_pb2.ConfigResponse, deadline=5
            )
            assert reply.revision == 2
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
            ch.close()
            for t in proxy.tasks:
                t.cancel()
            psrv.close()
            await server.stop(0)

    asyncio.run(main())


def test_a_reply_that_does_not_parse_is_an_rpc_error_not_a_crash():
    """A controller answering with bytes that are not the expected message (a proto
    mismatch during an upgrade): the call fails with RpcError INTERNAL, which the agent's
    retry loops handle, instead of protobuf's DecodeError ending their task."""
    from agent.identity import rpc
    from controller.api.gen import config_pb2

    async def garbage(req, ctx):  # type: ignore[no-untyped-def]
        return b"\xff\xff\xff"

    async def main() -> None:
        handler = grpc.unary_unary_rpc_method_handler(
            garbage, request_deserializer=None, response_serializer=None
        )
        server, port, ca = await _tls_server("weft.test.Bad", {"Call": handler})
        ch = rpc.ControllerChannel(
            f"127.0.0.1:{port}", "controller.weft", rpc.server_auth_context(ca)
        )
        try:
            with pytest.raises(rpc.RpcError) as e:
                await ch.unary(
                    "/weft.test.Bad/Call",
                    config_pb2.ConfigRequest(),
                    config_pb2.ConfigResponse,
                    deadline=5,
                )
            assert e.value.code() == rpc.Status.INTERNAL, e.value
            assert "DecodeError" in e.value.details()
        finally:
            ch.close()
            await server.stop(0)

    asyncio.run(main())


def test_a_message_over_the_limit_is_refused_before_it_is_buffered():
    """A reply longer than the channel's limit fails the call with RESOURCE_EXHAUSTED (as
    grpcio's receive limit did) when its length prefix arrives; a reply under the limit on
    the same channel afterwards is received."""
    from agent.identity import rpc
    from controller.api.gen import config_pb2

    async def sized(req, ctx):  # type: ignore[no-untyped-def]
        return config_pb2.ConfigResponse(revision=req.ack.revision, nonce="x" * req.ack.revision)

    async def main() -> None:
        codec = (config_pb2.ConfigRequest.FromString, config_pb2.ConfigResponse.SerializeToString)
        handler = grpc.unary_unary_rpc_method_handler(sized, *codec)
        server, port, ca = await _tls_server("weft.test.Big", {"Call": handler})
        ch = rpc.ControllerChannel(
            f"127.0.0.1:{port}",
            "controller.weft",
            rpc.server_auth_context(ca),
            max_message=64 * 1024,
        )

        def asking(n: int) -> config_pb2.ConfigRequest:
            return config_pb2.ConfigRequest(ack=config_pb2.Ack(revision=n))

        try:
            with pytest.raises(rpc.RpcError) as e:
                await ch.unary(
                    "/weft.test.Big/Call", asking(200_000), config_pb2.ConfigResponse, deadline=5
                )
            assert e.value.code() == rpc.Status.RESOURCE_EXHAUSTED, e.value
            assert "the limit is 65536" in e.value.details()
            small = await ch.unary(
                "/weft.test.Big/Call", asking(1_000), config_pb2.ConfigResponse, deadline=5
            )
            assert len(small.nonce) == 1_000
        finally:
            ch.close()
            await server.stop(0)

    asyncio.run(main())
