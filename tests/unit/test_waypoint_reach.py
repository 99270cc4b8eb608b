"""Waypoint-only reach (issue 14, point 2): a workload behind a Service that uses a
waypoint is reachable only through that waypoint. Dialling its pod address directly, from
another node (HBONE: the destination's tunnel refuses) or from the same node (the source
tunnel refuses), gets nothing through; the Service address goes through the waypoint and
its L7 policy. In-process over loopback (tests/unit/waypoint_mesh.py)."""

from __future__ import annotations

import asyncio

import pytest
import uvloop

from tests.unit.waypoint_mesh import Backend, WaypointMesh

pytestmark = pytest.mark.timeout(120)

REQUEST = b"GET /v1/models HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"


async def _raw(m: WaypointMesh, src: str, dst: tuple[str, int]) -> bytes:
    """What a pod gets back for a plain request to `dst` (b"" when the mesh refused)."""
    r, w = await m.dial(src, dst)
    try:
        w.write(REQUEST)
        return await asyncio.wait_for(r.read(), 10)
    except (ConnectionError, asyncio.IncompleteReadError):
        return b""
    finally:
        w.close()


def test_a_pod_behind_a_waypoint_cannot_be_dialled_around_it(tmp_path):
    """The client on node-1 reaches ai/llm through its Service (200, via the waypoint);
    dialling the same pods by address, on node-2 or on node-1, is refused by the client's
    own tunnel before anything is sent, and counted as waypoint_required. (The destination
    tunnel's own check, for HBONE that skips the source tunnel, is tested in
    test_tunnel_loopback.py.)"""

    async def main() -> None:
        backends = [
            Backend("llm-far", app="llm", node="node-2"),
            Backend("llm-near", app="llm", node="node-1"),
        ]
        async with WaypointMesh(tmp_path, backends=backends) as m:
            r = await m.http("GET", "/v1/models")
            assert r.status == 200, r
            far, near = m.backend("llm-far"), m.backend("llm-near")
            port = m.backend_port  # the pods' own port (the Service's targetPort)
            assert await _raw(m, "client", (far.ip, port)) == b""
            assert await _raw(m, "client", (near.ip, port)) == b""
            outbound = m.tunnels["node-1"].metrics.registry.get_sample_value(
                "weft_tunnel_refused_connections_total",
                {"direction": "outbound", "reason": "waypoint_required"},
            )
            assert outbound == 2
            # The waypoint itself still reaches both (its own identity, its own address).
            served = {
                (await m.http("GET", "/v1/models")).headers["x-weft-served-by"] for _ in range(12)
            }
            assert served == {"ai/llm-far", "ai/llm-near"}

    uvloop.run(main())
