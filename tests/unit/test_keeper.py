"""The socket keeper (agent/keeper.py): a listener it holds stays open after the process
that made it closes its own descriptor (as a SIGKILLed agent's would be), connects queue in
its backlog instead of being refused, and the next process takes the same socket and
accepts them. Real sockets on loopback, the keeper served from an event loop in a thread."""

from __future__ import annotations

import asyncio
import os
import socket
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent import keeper
from agent.keeper import listener_socket


@pytest.fixture
def keeper_path() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="keep-", dir="/tmp"))
    path = d / keeper.KEEPER_SOCKET
    loop = asyncio.new_event_loop()
    k = keeper.Keeper(path)
    stop = asyncio.Event()
    listening = threading.Event()

    async def main() -> None:
        k.start()  # bound and listening when it returns
        listening.set()
        try:
            await stop.wait()
        finally:
            k.close()

    t = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    t.start()
    # Not the socket file's existence: it appears at bind, before listen(), and a connect
    # in between is refused (seen on a loaded machine).
    assert listening.wait(30), "the keeper did not start"
    try:
        yield path
    finally:
        loop.call_soon_threadsafe(stop.set)
        t.join(5)
        loop.close()
        path.unlink(missing_ok=True)
        d.rmdir()


def test_a_kept_listener_outlives_its_maker_and_queues_connects(keeper_path: Path) -> None:
    assert keeper.take(keeper_path) == {}
    s = listener_socket("127.0.0.1", 0)
    port = s.getsockname()[1]
    assert keeper.keep(keeper_path, "outbound", s)
    s.close()  # the agent dies: only the keeper holds the listener now
    c = socket.create_connection(("127.0.0.1", port), timeout=2)  # queued, not refused
    c.sendall(b"hello")
    held = keeper.take(keeper_path)
    assert set(held) == {"outbound"}
    taken = keeper.adopt(held, "outbound", "127.0.0.1", port)
    assert taken is not None and held == {}
    taken.setblocking(True)
    conn, _ = taken.accept()
    with conn, c, taken:
        assert conn.recv(5) == b"hello"
    # The keeper still holds it for the next agent.
    again = keeper.take(keeper_path)
    assert set(again) == {"outbound"}
    for x in again.values():
        x.close()


def test_a_kept_socket_that_does_not_match_is_closed_and_made_afresh(keeper_path: Path) -> None:
    s = listener_socket("127.0.0.1", 0)
    port = s.getsockname()[1]
    assert keeper.keep(keeper_path, "inbound", s)
    held = keeper.take(keeper_path)
    assert keeper.adopt(held, "inbound", "127.0.0.1", port + 1) is None  # moved port
    assert keeper.adopt(held, "missing", "127.0.0.1", port) is None
    s.close()


def test_the_keeper_holds_only_listening_tcp_sockets_and_replaces_by_name(
    keeper_path: Path,
) -> None:
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    bound = socket.socket()
    bound.bind(("127.0.0.1", 0))  # bound, never listening
    with udp, bound:
        assert not keeper.keep(keeper_path, "outbound", udp)
        assert not keeper.keep(keeper_path, "outbound", bound)
        assert not keeper.keep(keeper_path, "Bad Name", listener_socket("127.0.0.1", 0))
    first, second = listener_socket("127.0.0.1", 0), listener_socket("127.0.0.1", 0)
    assert keeper.keep(keeper_path, "outbound", first)
    assert keeper.keep(keeper_path, "outbound", second)
    first_port = first.getsockname()[1]
    first.close()
    # The replaced one is closed by the keeper too: nothing listens on its port any more.
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", first_port), timeout=2)
    (held,) = keeper.take(keeper_path).values()
    with held, second:
        assert held.getsockname() == second.getsockname()


def test_no_keeper_is_no_sockets(tmp_path: Path) -> None:
    assert keeper.take(tmp_path / "absent.sock") == {}
    s = listener_socket("127.0.0.1", 0)
    with s:
        assert not keeper.keep(tmp_path / "absent.sock", "outbound", s)
    assert os.path.exists(tmp_path)


def test_a_descriptor_that_is_no_socket_is_refused_without_a_leak(keeper_path: Path) -> None:
    """A `keep` carrying a file or a pipe is refused, and the keeper keeps no copy of it
    (it runs in this process, in a thread: its descriptors are ours to count)."""

    def fds() -> int:
        return len(os.listdir(f"/proc/{os.getpid()}/fd"))

    r, w = os.pipe()
    try:
        with tempfile.TemporaryFile() as f:
            assert not keeper._ask(keeper_path, "keep outbound", [f.fileno()], 2.0)
            before = fds()
            for _ in range(20):
                assert not keeper._ask(keeper_path, "keep outbound", [f.fileno()], 2.0)
                assert not keeper._ask(keeper_path, "keep outbound", [r], 2.0)
            assert fds() - before < 3
    finally:
        os.close(r)
        os.close(w)


def test_a_new_listener_is_kept_only_when_asked(keeper_path: Path) -> None:
    """A node agent makes its listeners with keep_new=False and gives them to the keeper
    only once it holds the node: a successor that fails to start leaves nothing in its
    keeper (a kept listener nobody accepts on would take a share of the port's connects)."""
    s = keeper.listener(keeper_path, {}, "outbound", "127.0.0.1", 0, keep_new=False)
    with s:
        assert keeper.take(keeper_path) == {}
        assert keeper.keep(keeper_path, "outbound", s)
        (held,) = keeper.take(keeper_path).values()
        held.close()
        assert keeper.drop(keeper_path)
        assert keeper.take(keeper_path) == {}
