"""Which side of a connection a codec plays, and the limits it enforces on its peer."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Role(Enum):
    """SERVER: the peer is a client (downstream, the pod calling a model service).
    CLIENT: the peer is a server (upstream, a model backend)."""

    SERVER = "server"
    CLIENT = "client"


@dataclass(frozen=True, slots=True)
class Limits:
    """What a peer may send before the codec refuses it. Bodies have no limit: they stream."""

    # bytes; the whole head (request or status line plus fields), and each trailer block.
    # 64 KiB: Envoy's default is 60 KiB and HAProxy's buffer 16 KiB; this fits large JWTs
    # and cookie jars while 1,000 slowloris connections hold at most 64 MB of partial heads.
    # Over it: 431 on HTTP/1.1, RST_STREAM on HTTP/2 (stream error, others carry on).
    max_header_bytes: int = 64 * 1024

    # fields per head (and per trailer block). 100 is Envoy's and HAProxy's default; real
    # requests carry 10-30, and each field costs a Python object here. Over it: 431.
    max_header_count: int = 100

    # bytes of request target (path and query). RFC 9112 section 3 asks for at least 8000
    # octets; nginx's 8 KiB line buffer is the common ceiling. Over it: 414.
    max_target_bytes: int = 8 * 1024

    # HTTP/2 streams a client may have open at once (SETTINGS_MAX_CONCURRENT_STREAMS). RFC
    # 9113 section 6.5.2 recommends no less than 100; 100 is what nginx and Go's x/net
    # advertise by default (250 in Go). Exceeding it is a connection error (h2's behaviour).
    # It does not stop CVE-2023-44487 on its own: reset streams stop counting at once,
    # hence the reset budget below.
    max_concurrent_streams: int = 100

    # HTTP/2 rapid-reset protection (CVE-2023-44487): a token bucket of stream resets per
    # connection. Every RST_STREAM from a client, and every stream this codec resets for a
    # malformed request, takes a token; tokens refill at `reset_rate` per second up to
    # `reset_burst`. Empty bucket: GOAWAY(ENHANCE_YOUR_CALM) and the connection closes.
    # 200 at once / 100 per second leaves room for gRPC clients cancelling hedged calls
    # while the attack (thousands of resets per second per connection) trips it within
    # a few milliseconds of traffic.
    reset_burst: int = 200
    reset_rate: float = 100.0

    # bytes; HTTP/2 receive window per stream (SETTINGS_INITIAL_WINDOW_SIZE) and for the
    # whole connection. The peer can have at most this much unconsumed data buffered in
    # weft: 256 KiB lets one stream run at ~250 MB/s over a 1 ms RTT; 1 MiB bounds the
    # memory a connection can pin however many streams it opens.
    stream_window: int = 256 * 1024
    connection_window: int = 1024 * 1024


DEFAULT_LIMITS = Limits()
