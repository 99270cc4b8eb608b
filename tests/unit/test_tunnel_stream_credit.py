"""A tunnel stream that goes away gives back the flow-control credit it still held.

An HBONE connection's receive window is shared by every stream on it. A stream credits
what it received once its pod has taken it; while the pod's socket is full (or before the
pod connected) the credit is owed. A stream reset then (by the peer or by us) must give
that credit back, or the connection's window shrinks for good and, a few resets later,
every stream on it stalls (found by review: a caller that reads slowly and then leaves)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from agent.tunnel.streams import Stream


class H2:
    def __init__(self) -> None:
        self.credited = 0
        self.resets: list[int] = []

    def consumed(self, sid: int, n: int) -> None:
        self.credited += n

    def reset(self, sid: int, code: Any = None) -> None:
        self.resets.append(sid)


class Conn:
    write_paused = False

    def __init__(self) -> None:
        self.h2 = H2()
        self.forgotten: list[Any] = []

    def flush(self) -> None:
        pass

    def forget(self, s: Any) -> None:
        self.forgotten.append(s)


class Pod:
    """A pod socket that takes bytes but is full (write_paused)."""

    def __init__(self) -> None:
        self.transport = object()
        self.write_paused = True
        self.got = 0
        self.aborted = False

    def write(self, data: bytes) -> None:
        self.got += len(data)

    def abort(self) -> None:
        self.aborted = True


@pytest.mark.parametrize("who", ["peer", "us"])
def test_a_reset_stream_gives_back_what_its_paused_pod_owed(who):
    conn = Conn()
    pod = Pod()
    s = Stream(conn, 7, pod)  # type: ignore[arg-type]
    for _ in range(5):
        s.on_data(b"x" * 1000, 1009)  # flow counts padding too
    assert pod.got == 5000 and conn.h2.credited == 0  # owed while the pod is full
    if who == "peer":
        s.on_reset()
        assert pod.aborted
    else:
        s.reset()
        assert conn.h2.resets == [7]
    assert conn.h2.credited == 5 * 1009 and conn.forgotten == [s]
    s.on_reset()  # a second goodbye gives nothing twice
    assert conn.h2.credited == 5 * 1009


def test_a_stream_reset_before_its_pod_connected_gives_back_what_it_held():
    conn = Conn()
    s = Stream(conn, 9, None)  # type: ignore[arg-type]
    s.on_data(b"a" * 300, 300)
    s.on_data(b"b" * 200, 200)
    assert conn.h2.credited == 0
    s.on_reset()
    assert conn.h2.credited == 500 and not s.early


def test_credit_owed_to_a_pod_that_drains_is_given_once():
    """The ordinary path is unchanged: drained() credits what was owed, a later reset
    has nothing more to give."""

    async def main() -> None:
        conn = Conn()
        pod = Pod()
        s = Stream(conn, 3, pod)  # type: ignore[arg-type]
        s.on_data(b"x" * 100, 100)
        pod.write_paused = False
        s.drained()
        assert conn.h2.credited == 100
        s.on_reset()
        assert conn.h2.credited == 100

    asyncio.run(main())
