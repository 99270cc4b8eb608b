"""TLS contexts for one identity, built from PEM held in memory.

Python's ssl module only loads keys from paths. We hand it an anonymous memory file
(memfd_create) through /proc/self/fd, so private keys never touch a filesystem.
"""

from __future__ import annotations

import contextlib
import os
import ssl
from collections.abc import Iterator
from typing import Any

ALPN_H2 = "h2"


@contextlib.contextmanager
def _memfile(data: bytes, name: str) -> Iterator[str]:
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        os.write(fd, data)
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


class DirectSSLObject(ssl.SSLObject):
    """An SSLObject whose `read`, `write` and `pending` are the C methods themselves.

    uvloop's TLS transport calls these three on every record it reads or writes; the
    stdlib's SSLObject wraps each in a Python method that only forwards its arguments (a
    Python call per TLS read, write and pending check: 3 of the 18 Python calls a node
    tunnel makes to relay a request, and 6 in the waypoint's). The C methods take the
    same arguments (`read(n)`, `read(n, buffer)`, `write(data)`, `pending()`), return the
    same values and raise the same errors; uvloop binds them once per connection, right
    after `wrap_bio` returns."""

    @classmethod
    def _create(cls, *args: Any, **kwargs: Any) -> DirectSSLObject:
        self: DirectSSLObject = super()._create(*args, **kwargs)  # type: ignore[misc]
        c = self._sslobj  # type: ignore[attr-defined]
        self.read = c.read  # type: ignore[method-assign]
        self.write = c.write  # type: ignore[method-assign]
        self.pending = c.pending  # type: ignore[method-assign]
        return self


def direct_io(ctx: ssl.SSLContext) -> ssl.SSLContext:
    """`ctx`, making DirectSSLObjects: every context weft's TLS transports use."""
    ctx.sslobject_class = DirectSSLObject
    return ctx


def _base(
    purpose: ssl.Purpose,
    chain_pem: bytes,
    key_pem: bytes,
    bundle_pem: bytes,
    alpn: list[str] | None,
) -> ssl.SSLContext:
    side = (
        ssl.PROTOCOL_TLS_CLIENT if purpose is ssl.Purpose.SERVER_AUTH else (ssl.PROTOCOL_TLS_SERVER)
    )
    ctx = ssl.SSLContext(side)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False  # peers are checked by SPIFFE ID after the handshake
    ctx.verify_mode = ssl.CERT_REQUIRED
    with _memfile(chain_pem, "weft-chain") as chain, _memfile(key_pem, "weft-key") as key:
        ctx.load_cert_chain(chain, key)
    ctx.load_verify_locations(cadata=bundle_pem.decode())
    if alpn:
        ctx.set_alpn_protocols(alpn)
    # Session tickets would let a resumed session skip the certificate exchange, and with
    # it our per-connection SPIFFE check; connections are pooled instead. (In TLS 1.3
    # OP_NO_TICKET alone only makes the tickets stateful: see server_context.)
    ctx.options |= ssl.OP_NO_TICKET
    return direct_io(ctx)


def client_context(
    chain_pem: bytes, key_pem: bytes, bundle_pem: bytes, alpn: list[str] | None = None
) -> ssl.SSLContext:
    return _base(ssl.Purpose.SERVER_AUTH, chain_pem, key_pem, bundle_pem, alpn or [ALPN_H2])


def server_context(
    chain_pem: bytes, key_pem: bytes, bundle_pem: bytes, alpn: list[str] | None = None
) -> ssl.SSLContext:
    ctx = _base(ssl.Purpose.CLIENT_AUTH, chain_pem, key_pem, bundle_pem, alpn or [ALPN_H2])
    # No TLS 1.3 tickets at all. With OP_NO_TICKET OpenSSL still sends two per handshake,
    # stateful ones: two sessions (each holding the peer's certificate chain) kept in this
    # context's cache for up to 2 hours and 20,480 entries, about 12 KB per handshake
    # that no peer ever resumes; and each client holds the two it was sent (8 KB) for the
    # life of its pooled connection.
    ctx.num_tickets = 0
    return ctx
