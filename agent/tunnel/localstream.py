"""Run an asyncio Protocol over an HBONE stream, as if the stream were a socket.

The waypoint terminates HBONE itself: each CONNECT stream carries one client's plaintext
HTTP connection, and each upstream request goes out on a stream to the backend's node.
`StreamTransport` is the transport the HTTP protocol writes to; `_End` is what the HBONE
`Stream` delivers into (it plays the part a pod's TCP connection plays in the tunnel).
Flow control maps onto the asyncio contract both ways: a stream out of window pauses the
protocol's writing; a protocol that pauses reading withholds the sender's credit.
"""

from __future__ import annotations

import asyncio
from typing import Any

from agent.tunnel.streams import Stream


class _End:
    """The stream's far end, from the Stream's point of view (see PodSide)."""

    def __init__(self, t: StreamTransport) -> None:
        self.t = t
        self.transport: object = t  # non-None: the Stream delivers data immediately
        self.write_paused = False
        self.closed = False

    def write(self, data: bytes) -> None:
        if not self.closed:
            self.t.protocol.data_received(data)

    def write_eof(self) -> None:
        if self.closed:
            return
        keep = self.t.protocol.eof_received()
        self.t._remote_eof = True
        if not keep:
            self.t.close()
        self.t._maybe_lost()

    def abort(self) -> None:
        self.t._lost(ConnectionResetError("HBONE stream reset by the peer"))

    def pause_reading(self) -> None:  # the stream cannot take more: stop the protocol
        if not self.t._paused_writing:
            self.t._paused_writing = True
            self.t.protocol.pause_writing()

    def resume_reading(self) -> None:
        if self.t._paused_writing:
            self.t._paused_writing = False
            self.t.protocol.resume_writing()

    def attach(self, peer: Stream) -> None:
        self.t.stream = peer


class StreamTransport(asyncio.Transport):
    def __init__(self, protocol: asyncio.Protocol, extra: dict[str, Any] | None = None) -> None:
        super().__init__(extra)
        self.protocol = protocol
        self.stream: Stream | None = None
        self.end = _End(self)
        self._closing = False
        self._local_eof = False
        self._remote_eof = False
        self._paused_writing = False
        self._is_lost = False

    def bind(self, stream: Stream) -> None:
        """Connect to an HBONE stream (after 200) and start the protocol.

        The stream is set before `connection_made`: a protocol that writes first (an HTTP/2
        client's preface and SETTINGS) must not have its first bytes dropped."""
        self.stream = stream
        self.protocol.connection_made(self)
        stream.bind(self.end)  # type: ignore[arg-type]

    # ---- asyncio.Transport, for the protocol -------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.stream is not None and not self._local_eof and not self._is_lost:
            self.stream.send(bytes(data))

    def writelines(self, chunks: Any) -> None:
        self.write(b"".join(chunks))

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        if self.stream is not None and not self._local_eof and not self._is_lost:
            self._local_eof = True
            self.stream.send_eof()
            self._maybe_lost()

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self.write_eof()

    def abort(self) -> None:
        if self.stream is not None and not self._is_lost:
            self.stream.reset()
        self._lost(None)

    def is_closing(self) -> bool:
        return self._closing or self._is_lost

    def pause_reading(self) -> None:
        self.end.write_paused = True  # the Stream now withholds the sender's credit

    def resume_reading(self) -> None:
        if self.end.write_paused:
            self.end.write_paused = False
            if self.stream is not None:
                self.stream.drained()

    def is_reading(self) -> bool:
        return not self.end.write_paused

    def get_write_buffer_size(self) -> int:
        return len(self.stream.pending) if self.stream is not None else 0

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass  # HBONE flow control is the limit

    # ---- internals ---------------------------------------------------------------------

    def _maybe_lost(self) -> None:
        if self._local_eof and self._remote_eof:
            self._lost(None)

    def _lost(self, exc: Exception | None) -> None:
        if self._is_lost:
            return
        self._is_lost = True
        self.end.closed = True
        self.protocol.connection_lost(exc)
