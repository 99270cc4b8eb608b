"""Tell HTTP/2 prior knowledge (h2c, gRPC) from HTTP/1.x by a connection's first bytes."""

from __future__ import annotations

from typing import Literal

# RFC 9113 section 3.4: every HTTP/2 client connection starts with these 24 octets.
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
PREFACE_LEN = len(H2_PREFACE)


def detect_protocol(first: bytes | bytearray | memoryview) -> Literal["h2", "http1"] | None:
    """ "h2" if `first` starts with the HTTP/2 client preface, "http1" if it cannot, or None
    when more bytes are needed to tell (at most 24 are ever needed; most HTTP/1.x requests
    are told apart by their first two bytes, "PO" for POST included)."""
    n = min(len(first), PREFACE_LEN)
    if bytes(first[:n]) != H2_PREFACE[:n]:
        return "http1"
    return "h2" if n == PREFACE_LEN else None
