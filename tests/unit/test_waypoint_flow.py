"""HTTP/2 flow control across the waypoint (RFC 9113 5.2): a caller or backend that reads
slowly slows the other side down, instead of growing the waypoint's memory. Over loopback
(waypoint_mesh.py) with a frame-level client (the `h2` package) that never opens its
window."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Any

import pytest
import uvloop

from tests.unit.waypoint_mesh import WaypointMesh, new_threads

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(autouse=True)
def no_leaked_threads():
    before = set(threading.enumerate())
    yield
    assert new_threads(before) == []


def grpc_stream_call(c: Any, count: int) -> int:
    """Open a gRPC server-streaming call to the mesh's echo (GRPC_STREAM: `count` messages)
    on the h2 client connection `c`; its stream id."""
    from tests.unit.waypoint_mesh import GRPC_STREAM

    sid = c.get_next_available_stream_id()
    c.send_headers(
        sid,
        [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", GRPC_STREAM),
            (":authority", "grpc-echo:9000"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ],
    )
    n = str(count).encode()
    c.send_data(sid, b"\x00" + len(n).to_bytes(4, "big") + n, end_stream=True)
    return sid


def _held_for_callers(m: WaypointMesh) -> tuple[int, int]:
    """Bytes the waypoint holds for its callers: queued in its callers' HTTP/2 codecs
    (beyond their windows), and in its backend streams' event queues."""
    import gc

    from agent.waypoint.codec.http2 import Http2Connection
    from agent.waypoint.downstream import Downstream
    from agent.waypoint.upstream import UpstreamConnection

    outbox = queued = 0
    for o in gc.get_objects():
        if isinstance(o, Downstream) and isinstance(o.codec, Http2Connection):
            outbox += sum(b.size for b in o.codec._outbox.values())
        elif isinstance(o, UpstreamConnection):
            for q in o.queues.values():
                queued += sum(len(getattr(e, "data", b"") or b"") for e in q._items)
    return outbox, queued


def test_an_http2_caller_that_stops_reading_holds_the_backend_back(tmp_path):
    """RFC 9113 5.2 across the proxy: a gRPC caller that never opens its window (65,535
    bytes) while the backend streams about 4 MB. The waypoint writes no more than the
    caller's window admits plus one piece, and stops taking the backend's stream (so its
    credit stops too), instead of queueing the whole answer in memory as it used to."""

    import h2.config
    import h2.connection
    import h2.events

    async def main() -> None:
        async with WaypointMesh(tmp_path, backends=[], grpc=True) as m:
            port = await m.listen("grpc-echo")
            r, w = await asyncio.open_connection("127.0.0.1", port)
            c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
            c.initiate_connection()
            # 300,000 messages of about 14 bytes: about 4 MB with their framing.
            grpc_stream_call(c, 300_000)
            w.write(c.data_to_send())
            received = 0
            loop = asyncio.get_running_loop()
            end = loop.time() + 3.0
            while loop.time() < end:  # read what arrives; never acknowledge any of it
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.2):
                        data = await r.read(65536)
                        if not data:
                            break
                        for e in c.receive_data(data):
                            if isinstance(e, h2.events.DataReceived):
                                received += len(e.data)
                        w.write(c.data_to_send())  # settings acks, pings: no window
            outbox, queued = _held_for_callers(m)
            assert received <= 65535
            assert outbox <= 64 * 1024, outbox
            assert queued <= 4 * 1024 * 1024 // 2, queued  # what the backend's window let in
            w.transport.abort()

    uvloop.run(main())


def test_streams_sharing_a_callers_connection_window_all_finish(tmp_path):
    """Two gRPC server streams on one caller connection whose streams have 1 MiB windows
    and whose connection window stays 65,535 (acknowledged as it reads, slowly): one
    stream's data uses up the connection window, and the other, which waits for it without
    ever having used up its own, is woken when the connection window reopens. It used to
    wait for good (until its idle timeout)."""
    import time

    import h2.config
    import h2.connection
    import h2.events
    import h2.settings

    async def main() -> None:
        async with WaypointMesh(tmp_path, backends=[], grpc=True) as m:
            port = await m.listen("grpc-echo")
            r, w = await asyncio.open_connection("127.0.0.1", port)
            c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
            c.local_settings = h2.settings.Settings(
                client=True, initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 1 << 20}
            )
            c.initiate_connection()
            sids = [grpc_stream_call(c, 5000) for _ in range(2)]  # about 95 KB each
            w.write(c.data_to_send())
            ended: set[int] = set()
            last = time.monotonic()
            while len(ended) < 2 and time.monotonic() - last < 3:  # stalled 3 s: failed
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.5):
                        data = await r.read(16384)
                        assert data, "the waypoint closed the connection"
                        for e in c.receive_data(data):
                            if isinstance(e, h2.events.DataReceived):
                                last = time.monotonic()
                                c.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
                            elif isinstance(e, h2.events.StreamEnded):
                                ended.add(e.stream_id)
                        await asyncio.sleep(0.3)  # a slow reader: 16 KB at a time
                        w.write(c.data_to_send())
            assert ended == set(sids)
            w.transport.abort()

    uvloop.run(main())
