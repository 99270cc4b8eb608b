"""The events both HTTP codecs emit: one vocabulary for HTTP/1.1 and HTTP/2.

The proxy core feeds bytes to a connection and gets these back; it never needs to know which
protocol a side speaks. Streams are numbered like HTTP/2 on both protocols: HTTP/1.1
requests on a connection are streams 1, 3, 5, ... in order.

A stream ends (in one direction) with an event whose `end_stream` is true, or with
`Trailers`, or with `StreamReset` (both directions). `ConnectionClosed` means the peer will
send nothing more; streams without a reset may still be answered on HTTP/1.1 (half-close).
"""

from __future__ import annotations

from agent.frozen import frozen
from agent.waypoint.codec.headers import Headers


class Event:
    """Base class of codec events."""

    __slots__ = ()


@frozen
class RequestHead(Event):
    """A request's head. `target` is path plus query (origin form), `*` for OPTIONS, or the
    authority for CONNECT; `authority` is host[:port] from :authority, Host, or an
    absolute-form target."""

    stream_id: int
    method: str
    target: str
    authority: str
    scheme: str
    headers: Headers
    end_stream: bool


@frozen
class ResponseHead(Event):
    """A response's head; 1xx heads (`informational`) precede the final one and never end
    the stream."""

    stream_id: int
    status: int
    headers: Headers
    end_stream: bool

    @property
    def informational(self) -> bool:
        return self.status < 200


@frozen
class Data(Event):
    """Body bytes, emitted as they arrive (never buffered to the end of the message)."""

    stream_id: int
    data: bytes | memoryview
    end_stream: bool


@frozen
class Trailers(Event):
    """Trailer fields (HTTP/2 trailers, HTTP/1.1 chunked trailers); they end the stream."""

    stream_id: int
    headers: Headers


@frozen
class StreamReset(Event):
    """The stream is gone in both directions. `remote`: the peer reset it (RST_STREAM, or
    closed the HTTP/1.1 connection mid-message); otherwise this codec reset it because the
    peer broke a stream-level rule, and `reason` says which."""

    stream_id: int
    error_code: int
    remote: bool
    reason: str = ""


@frozen
class WindowUpdated(Event):
    """HTTP/2: a stream that had exhausted its send window (or had data queued behind it)
    may send again; see `Http2Connection.send_window`."""

    stream_id: int


@frozen
class GoAway(Event):
    """HTTP/2: the peer sent GOAWAY. Streams above `last_stream_id` that we opened were not
    processed (each also gets a StreamReset with REFUSED_STREAM, so they can be retried)."""

    last_stream_id: int
    error_code: int
    debug_data: bytes = b""


@frozen
class ConnectionClosed(Event):
    """The peer closed the transport (receive_data(b"")); nothing more will arrive."""
