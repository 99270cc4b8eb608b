"""Sans-IO HTTP for the waypoint: HTTP/1.1 and HTTP/2 behind one event vocabulary.

Bytes in, events out; methods return the bytes to write. No sockets, no clocks beyond an
injectable one. See docs/waypoint-codec.md.
"""

from agent.waypoint.codec.config import DEFAULT_LIMITS, Limits, Role
from agent.waypoint.codec.detect import H2_PREFACE, detect_protocol
from agent.waypoint.codec.errors import ErrorCode, ProtocolError
from agent.waypoint.codec.events import (
    ConnectionClosed,
    Data,
    Event,
    GoAway,
    RequestHead,
    ResponseHead,
    StreamReset,
    Trailers,
    WindowUpdated,
)
from agent.waypoint.codec.headers import HOP_BY_HOP, Headers
from agent.waypoint.codec.http1 import Http1Connection
from agent.waypoint.codec.http2 import Http2Connection

__all__ = [
    "DEFAULT_LIMITS",
    "H2_PREFACE",
    "HOP_BY_HOP",
    "ConnectionClosed",
    "Data",
    "ErrorCode",
    "Event",
    "GoAway",
    "Headers",
    "Http1Connection",
    "Http2Connection",
    "Limits",
    "ProtocolError",
    "RequestHead",
    "ResponseHead",
    "Role",
    "StreamReset",
    "Trailers",
    "WindowUpdated",
    "detect_protocol",
]
