"""Protocol errors: what rule was broken, by which side, and what to answer."""

from __future__ import annotations

from typing import Literal

from agent.tunnel.h2 import Err

Side = Literal["remote", "local"]


# HTTP/2 error codes (RFC 9113 section 7), also used for HTTP/1.1 stream resets: one table
# for the whole agent, kept with the tunnel's HTTP/2 framing.
ErrorCode = Err


class ProtocolError(Exception):
    """A peer (`side="remote"`) or the proxy core (`side="local"`) broke an HTTP rule.

    `status` is the HTTP status to answer when a request was at fault (400, 414, 431, 501,
    505; 502 when a backend's response was at fault), `error_code` the HTTP/2 code for
    RST_STREAM or GOAWAY, `stream_id` the stream concerned (0: the whole connection).
    After a remote ProtocolError the connection is unusable: answer `status` if you can
    (Http1Connection.error_response) and close it.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        error_code: int = ErrorCode.PROTOCOL_ERROR,
        side: Side = "remote",
        stream_id: int = 0,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.error_code = error_code
        self.side: Side = side
        self.stream_id = stream_id

    def __repr__(self) -> str:
        return (
            f"ProtocolError({self.message!r}, status={self.status}, "
            f"error_code={self.error_code}, side={self.side!r}, stream_id={self.stream_id})"
        )


def local_error(message: str, stream_id: int = 0) -> ProtocolError:
    """The proxy core misused the codec (a bug in weft, not in a peer)."""
    return ProtocolError(
        message,
        status=500,
        error_code=ErrorCode.INTERNAL_ERROR,
        side="local",
        stream_id=stream_id,
    )
