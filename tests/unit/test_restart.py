"""The pieces of an agent handover that need no kernel: the handover socket, listeners
that a successor shares, and the memory-backed identity store."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
from pathlib import Path

import pytest
import uvloop

from agent import restart
from agent.identity.store import IdentityStore, filesystem_of, workload_entry
from agent.keeper import listener_socket

SHM = Path("/dev/shm")


def test_a_successor_asks_over_the_handover_socket_and_gets_an_answer(tmp_path):
    async def main() -> None:
        asked = asyncio.Event()
        path = tmp_path / "handover.sock"
        running = restart.HandoverListener(path, asked.set)
        running.start()
        try:
            assert oct(path.stat().st_mode & 0o777) == "0o600"
            assert await asyncio.to_thread(restart.ask_predecessor, path)
            await asyncio.wait_for(asked.wait(), 5)
        finally:
            running.close()
        assert not path.exists()
        assert not restart.ask_predecessor(path)  # nobody there: no predecessor

    uvloop.run(main())


def test_closing_leaves_a_successors_socket_in_place(tmp_path):
    async def main() -> None:
        path = tmp_path / "handover.sock"
        old = restart.HandoverListener(path, lambda: None)
        old.start()
        new = restart.HandoverListener(path, lambda: None)
        new.start()  # binds the same path, as the successor does
        old.close()
        assert path.exists() and await asyncio.to_thread(restart.ask_predecessor, path)
        new.close()

    uvloop.run(main())


def test_two_processes_listen_on_one_port_and_queued_connects_are_not_refused():
    """SO_REUSEPORT and listen() at once: the successor's socket joins the port's group
    before it accepts anything, so connects queue on it instead of being refused."""
    old = listener_socket("127.0.0.1", 0)
    port = old.getsockname()[1]
    new = listener_socket("127.0.0.1", port)
    old.close()
    with socket.create_connection(("127.0.0.1", port), timeout=2) as c:
        new.setblocking(True)
        conn, _ = new.accept()
        c.sendall(b"x")
        assert conn.recv(1) == b"x"
        conn.close()
    new.close()


def test_the_identity_store_refuses_a_directory_on_a_disk(tmp_path):
    if filesystem_of(tmp_path) in ("tmpfs", "ramfs"):
        pytest.skip(f"{tmp_path} is memory-backed here")
    assert IdentityStore.open(tmp_path / "ids") is None


@pytest.mark.skipif(filesystem_of(SHM) != "tmpfs", reason="/dev/shm is not a tmpfs here")
def test_the_identity_store_keeps_records_root_only_and_drops_expired_ones():
    d = SHM / f"weft-test-{os.getpid()}"
    try:
        store = IdentityStore.open(d)
        assert store is not None
        assert oct(d.stat().st_mode & 0o777) == "0o700"
        name = workload_entry("ai", "llm")
        store.save(name, {"notAfter": time.time() + 60, "key": "k"})
        assert oct((d / name).stat().st_mode & 0o777) == "0o600"
        assert store.load(name) == json.loads((d / name).read_text())
        assert store.names("workload_") == [name]
        store.save(name, {"notAfter": time.time() - 1, "key": "k"})
        assert store.load(name) is None and not (d / name).exists()
    finally:
        for f in d.glob("*"):
            f.unlink()
        d.rmdir()


def test_identity_entries_cannot_collide():
    assert workload_entry("a-b", "c") != workload_entry("a", "b-c")


@pytest.mark.skipif(filesystem_of(SHM) != "tmpfs", reason="/dev/shm is not a tmpfs here")
def test_the_identity_store_refuses_a_directory_another_user_controls():
    """Another user who made a directory on the path (in world-writable /dev/shm) could
    swap the store for one they read: refused."""
    from agent.identity.store import unsafe_component

    d = SHM / f"weft-test-{os.getpid()}"
    inner = d / "ids"
    inner.mkdir(parents=True)
    try:
        os.chown(d, 65534, 65534)
        assert "belongs to uid 65534" in (unsafe_component(inner) or "")
        assert IdentityStore.open(inner) is None
        os.chown(d, 0, 0)
        os.chmod(d, 0o777)
        assert "writable by other users" in (unsafe_component(inner) or "")
        os.chmod(d, 0o755)
        assert unsafe_component(inner) is None
    finally:
        inner.rmdir()
        d.rmdir()


@pytest.mark.skipif(filesystem_of(SHM) != "tmpfs", reason="/dev/shm is not a tmpfs here")
def test_a_corrupt_store_entry_is_dropped_not_a_crash():
    d = SHM / f"weft-test-{os.getpid()}"
    try:
        store = IdentityStore.open(d)
        assert store is not None
        for i, body in enumerate(['{"notAfter": "soon"}', "[1, 2]", "not json"]):
            (d / f"workload_a_{i}.json").write_text(body)
            assert store.load(f"workload_a_{i}.json") is None
        assert store.names("workload_") == ["workload_a_2.json"]  # unreadable: left alone
    finally:
        for f in d.glob("*"):
            f.unlink()
        d.rmdir()
