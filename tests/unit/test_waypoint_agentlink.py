"""The waypoint's link to its node agent survives a config it fails to apply."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from agent.state import ConfigSnapshot
from agent.waypoint.workload import AgentLink


def test_a_config_that_fails_to_apply_is_fetched_again_and_the_link_lives_on(
    tmp_path: Path,
) -> None:
    sock = tmp_path / "workload.sock"
    asked: list[str] = []

    async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        head = (await r.readuntil(b"\r\n\r\n")).decode()
        asked.append(head.split(" ")[1])
        body = json.dumps({"epoch": "e", "revision": 7, "trustDomain": "td", "resources": []})
        w.write(f"HTTP/1.1 200 OK\r\ncontent-length: {len(body)}\r\n\r\n{body}".encode())
        await w.drain()
        w.close()

    applied: list[int] = []

    def on_config(snap: ConfigSnapshot) -> None:
        if not applied:
            applied.append(-1)
            raise RuntimeError("database is locked")  # e.g. a shared store busy at startup
        applied.append(snap.revision)

    async def main() -> None:
        server = await asyncio.start_unix_server(serve, path=str(sock))
        link = AgentLink(sock, on_config, lambda s: None)
        task = asyncio.create_task(link.run())
        try:
            for _ in range(100):
                if 7 in applied:
                    break
                await asyncio.sleep(0.05)
        finally:
            task.cancel()
            server.close()
        assert not task.done() or task.cancelled()

    asyncio.run(main())
    assert applied == [-1, 7]
    # The failed revision was asked for again from the start, not skipped.
    assert asked[:2] == ["/v1/config?after=-1&epoch=&delta=1", "/v1/config?after=-1&epoch=&delta=1"]
    assert asked[2] == "/v1/config?after=7&epoch=e&delta=1"


def test_a_new_controller_epoch_is_new_config_even_with_a_lower_revision(tmp_path: Path) -> None:
    """A restarted controller numbers its revisions from the start again: the waypoint asks
    with its epoch, and takes the new epoch's revision 2 after the old epoch's 7."""
    sock = tmp_path / "workload.sock"
    answers = [("e1", 7), ("e2", 2)]
    asked: list[str] = []

    async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        head = (await r.readuntil(b"\r\n\r\n")).decode()
        asked.append(head.split(" ")[1])
        epoch, rev = answers[min(len(asked), len(answers)) - 1]
        body = json.dumps({"epoch": epoch, "revision": rev, "trustDomain": "td", "resources": []})
        w.write(f"HTTP/1.1 200 OK\r\ncontent-length: {len(body)}\r\n\r\n{body}".encode())
        await w.drain()
        w.close()

    applied: list[tuple[str, int]] = []

    async def main() -> None:
        server = await asyncio.start_unix_server(serve, path=str(sock))
        link = AgentLink(sock, lambda s: applied.append((s.epoch, s.revision)), lambda s: None)
        task = asyncio.create_task(link.run())
        try:
            for _ in range(100):
                if ("e2", 2) in applied:
                    break
                await asyncio.sleep(0.05)
        finally:
            task.cancel()
            server.close()

    asyncio.run(main())
    assert applied[:2] == [("e1", 7), ("e2", 2)]
    assert asked[1] == "/v1/config?after=7&epoch=e1&delta=1"


def test_an_agent_that_drops_the_answer_is_a_connection_error_not_a_crash(tmp_path: Path) -> None:
    """A node agent restarting mid-answer (nothing, half a status line, a body cut short)
    is a ConnectionError the link retries on, never an IndexError from parsing it."""
    import pytest

    from agent.waypoint.workload import _get

    sock = tmp_path / "workload.sock"
    answers = [b"", b"HTTP/1.", b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n{}"]

    async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await r.readuntil(b"\r\n\r\n")
        w.write(answers.pop(0))
        await w.drain()
        w.close()

    async def main() -> None:
        server = await asyncio.start_unix_server(serve, path=str(sock))
        try:
            for _ in range(3):
                with pytest.raises(ConnectionError):
                    await _get(sock, "/v1/svid", 5)
        finally:
            server.close()
            await server.wait_closed()

    asyncio.run(main())


def test_a_delta_from_a_revision_the_waypoint_does_not_have_is_never_applied(
    tmp_path: Path,
) -> None:
    """The agent answers with a delta only from the revision the waypoint asked from; if
    one ever came from another, the waypoint drops it and asks for everything."""
    sock = tmp_path / "workload.sock"
    workload = {
        "apiVersion": "weft.dev/v1alpha1",
        "kind": "Workload",
        "metadata": {"name": "w", "namespace": "apps"},
        "spec": {"node": "node-1", "addresses": ["10.244.1.9"]},
    }
    answers = [
        {"epoch": "e", "revision": 7, "trustDomain": "td", "resources": []},
        {"epoch": "e", "revision": 9, "trustDomain": "td", "base": 5,
         "resources": [{"kind": "Workload", "body": workload}], "removed": []},
        {"epoch": "e", "revision": 9, "trustDomain": "td",
         "resources": [{"kind": "Workload", "body": workload}]},
    ]  # fmt: skip
    asked: list[str] = []

    async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        head = (await r.readuntil(b"\r\n\r\n")).decode()
        asked.append(head.split(" ")[1])
        body = json.dumps(answers[min(len(asked), len(answers)) - 1])
        w.write(f"HTTP/1.1 200 OK\r\ncontent-length: {len(body)}\r\n\r\n{body}".encode())
        await w.drain()
        w.close()

    applied: list[ConfigSnapshot] = []

    async def main() -> None:
        import pytest

        server = await asyncio.start_unix_server(serve, path=str(sock))
        link = AgentLink(sock, applied.append, lambda s: None)
        try:
            assert (await link.fetch_config()).revision == 7
            with pytest.raises(ConnectionError, match="delta from revision 5"):
                await link.fetch_config()
            snap = await link.fetch_config()
        finally:
            server.close()
        assert snap.revision == 9 and "10.244.1.9" in snap.workloads_by_ip
        assert link.deltas == 0

    asyncio.run(main())
    assert asked == [
        "/v1/config?after=-1&epoch=&delta=1",
        "/v1/config?after=7&epoch=e&delta=1",
        "/v1/config?after=-1&epoch=&delta=1",  # everything again
    ]
    assert [s.revision for s in applied] == [7, 9]
