"""Two node tunnels in one process over loopback: real certificates from the real CA, real
TLS 1.3 and HBONE, real authorization. Only the capture is replaced: the "pod" dials the
outbound port itself and the original destination comes from a dict (the eBPF map's job,
tested on the lab in tests/kernel). Pods are distinct 127.0.0.x addresses."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
import textwrap
import time
from pathlib import Path

import pytest
import uvloop

from agent.state import ConfigSnapshot
from agent.tunnel.tunnel import Tunnel, TunnelSettings
from controller.ca.authority import CertificateAuthority, FileCAStore
from controller.model.loader import parse_text
from tests.unit.waypoint_mesh import Identities, OrigDst, free_port

pytestmark = pytest.mark.timeout(120)


def config(ports: dict[str, int], extra: str = "") -> ConfigSnapshot:
    text = (
        textwrap.dedent(f"""\
        apiVersion: weft.dev/v1alpha1
        kind: Node
        metadata: {{name: node-1}}
        spec: {{addresses: [127.0.0.1], tunnelPort: {ports["in1"]}}}
        ---
        apiVersion: weft.dev/v1alpha1
        kind: Node
        metadata: {{name: node-2}}
        spec: {{addresses: [127.0.0.1], tunnelPort: {ports["in2"]}}}
        ---
        apiVersion: weft.dev/v1alpha1
        kind: Workload
        metadata: {{name: client, namespace: apps, labels: {{app: client}}}}
        spec: {{serviceAccount: client, node: node-1, addresses: [127.0.0.11]}}
        ---
        apiVersion: weft.dev/v1alpha1
        kind: Workload
        metadata: {{name: batch, namespace: apps, labels: {{app: batch}}}}
        spec: {{serviceAccount: batch, node: node-1, addresses: [127.0.0.12]}}
        ---
        apiVersion: weft.dev/v1alpha1
        kind: Workload
        metadata: {{name: llm, namespace: ai, labels: {{app: llm}}}}
        spec: {{serviceAccount: llm, node: node-2, addresses: [127.0.0.21]}}
        ---
        apiVersion: weft.dev/v1alpha1
        kind: Workload
        metadata: {{name: near, namespace: ai, labels: {{app: near}}}}
        spec: {{serviceAccount: near, node: node-1, addresses: [127.0.0.13]}}
        ---
        apiVersion: v1
        kind: Service
        metadata: {{name: llm, namespace: ai}}
        spec: {{selector: {{app: llm}}, clusterIP: 10.96.0.10, ports: [{{port: 80,
                targetPort: {ports["llm"]}}}]}}
        """)
        + extra
    )
    offer = parse_text(text, "cfg.yaml")
    assert not offer.problems, offer.problems
    return ConfigSnapshot.build("e", 1, "cluster.local", {r.key: r for r in offer.resources})


class Mesh:
    def __init__(self, tmp: Path, extra: str = "") -> None:
        self.ports = {k: free_port() for k in ("out1", "in1", "out2", "in2", "llm", "near")}
        self.ca = CertificateAuthority.load_or_create(FileCAStore(tmp / "ca.json"), "cluster.local")
        self.snap = config(self.ports, extra)
        self.orig = OrigDst()
        ids1 = Identities(self.ca, [("apps", "client"), ("apps", "batch"), ("ai", "near")])
        ids2 = Identities(self.ca, [("ai", "llm")])
        self.t1 = Tunnel(
            TunnelSettings(
                node="node-1",
                node_ip="127.0.0.1",
                outbound_port=self.ports["out1"],
                inbound_host="127.0.0.1",
                inbound_port=self.ports["in1"],
                mark=0,
            ),
            config=lambda: self.snap,
            identities=ids1,
            original=self.orig,
        )
        self.t2 = Tunnel(
            TunnelSettings(
                node="node-2",
                node_ip="127.0.0.1",
                outbound_port=self.ports["out2"],
                inbound_host="127.0.0.1",
                inbound_port=self.ports["in2"],
                mark=0,
            ),
            config=lambda: self.snap,
            identities=ids2,
            original=self.orig,
        )
        self.servers: list[asyncio.AbstractServer] = []
        self.seen: list[tuple[str, int]] = []

    async def __aenter__(self) -> Mesh:
        await self.t1.start()
        await self.t2.start()

        async def echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            self.seen.append(w.get_extra_info("peername"))
            while data := await r.read(65536):
                w.write(data)
                await w.drain()
            w.write_eof()
            await w.drain()
            w.close()

        for ip, port in (("127.0.0.21", self.ports["llm"]), ("127.0.0.13", self.ports["near"])):
            self.servers.append(await asyncio.start_server(echo, ip, port))
        return self

    async def __aexit__(self, *exc: object) -> None:
        for s in self.servers:
            s.close()
        await self.t1.close()
        await self.t2.close()

    async def dial(
        self, src_ip: str, dst: tuple[str, int]
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """What a captured pod connect() amounts to: a connection to node-1's outbound port,
        with the original destination recorded for its source address."""
        sock = socket.socket()
        sock.bind((src_ip, 0))
        self.orig[sock.getsockname()] = dst
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", self.ports["out1"]))
        return await asyncio.open_connection(sock=sock)


async def roundtrip(mesh: Mesh, src: str, dst: tuple[str, int], payload: bytes) -> bytes:
    r, w = await mesh.dial(src, dst)
    w.write(payload)
    w.write_eof()
    out = await asyncio.wait_for(r.read(), 20)
    w.close()
    return out


def test_cross_node_connection_is_relayed_over_mtls_and_half_closes(tmp_path):
    async def main() -> None:
        async with Mesh(tmp_path) as m:
            out = await roundtrip(m, "127.0.0.11", ("127.0.0.21", m.ports["llm"]), b"hello")
            assert out == b"hello"
            # The pod saw the tunnel's address, not the client's (the tunnel connected it).
            assert m.seen[-1][0] == "127.0.0.1"
            (conn,) = m.t1.pool.connections()
            assert conn.peer_id == "spiffe://cluster.local/ns/ai/sa/llm"
            (inb,) = m.t2._inbound
            assert inb.peer_id == "spiffe://cluster.local/ns/apps/sa/client"
            assert inb.local_id == "spiffe://cluster.local/ns/ai/sa/llm"

    uvloop.run(main())


def test_service_vip_resolves_to_an_endpoint_and_maps_the_port(tmp_path):
    async def main() -> None:
        async with Mesh(tmp_path) as m:
            assert await roundtrip(m, "127.0.0.11", ("10.96.0.10", 80), b"via vip") == b"via vip"

    uvloop.run(main())


def test_same_node_destination_is_connected_directly(tmp_path):
    async def main() -> None:
        async with Mesh(tmp_path) as m:
            assert await roundtrip(m, "127.0.0.11", ("127.0.0.13", m.ports["near"]), b"x") == b"x"
            assert not m.t1.pool.connections()  # no TLS for a same-node hop

    uvloop.run(main())


DENY_BATCH = """---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: only-client, namespace: ai}
spec:
  selector: {matchLabels: {app: llm}}
  rules: [{from: [{source: {principals: [cluster.local/ns/apps/sa/client]}}]}]
"""


def test_allow_policy_admits_one_principal_and_the_inbound_side_denies_another(tmp_path):
    async def main() -> None:
        async with Mesh(tmp_path, DENY_BATCH) as m:
            assert await roundtrip(m, "127.0.0.11", ("127.0.0.21", m.ports["llm"]), b"ok") == b"ok"
            with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
                out = await roundtrip(m, "127.0.0.12", ("127.0.0.21", m.ports["llm"]), b"no")
                assert out == b""  # a reset may also show as EOF before any byte
                raise ConnectionResetError
            sample = m.t1.metrics.registry.get_sample_value(
                "weft_tunnel_denied_connections_total",
                {
                    "reporter": "source",
                    "source_workload": "batch",
                    "destination_workload": "llm",
                    "source_workload_namespace": "apps",
                    "source_principal": "spiffe://cluster.local/ns/apps/sa/batch",
                    "source_app": "batch",
                    "destination_workload_namespace": "ai",
                    "destination_principal": "spiffe://cluster.local/ns/ai/sa/llm",
                    "destination_app": "llm",
                    "destination_service": "unknown",
                    "destination_service_name": "unknown",
                    "destination_service_namespace": "ai",
                    "connection_security_policy": "mutual_tls",
                },
            )
            assert sample == 1.0
            # The destination decides by the certificate, not by the claimed address: the
            # client's identity with batch's address in `forwarded` is still admitted.
            stream_conn = m.t1.pool.connections()[0]

            _, resp = stream_conn.open(
                f"127.0.0.21:{m.ports['llm']}", [("forwarded", "for=127.0.0.12")]
            )
            assert (await resp).status == 200  # same client identity: allowed

    uvloop.run(main())


def test_inbound_refuses_a_denied_identity_with_401(tmp_path):
    async def main() -> None:
        async with Mesh(tmp_path, DENY_BATCH.replace("sa/client", "sa/nobody")) as m:
            # node-1's own early check would deny too; open the stream by hand to see the
            # destination node's answer.
            cert = m.t1.identities.get("apps", "client")
            conn = await m.t1.pool.get(
                (
                    "spiffe://cluster.local/ns/apps/sa/client",
                    "spiffe://cluster.local/ns/ai/sa/llm",
                    "127.0.0.1",
                    m.ports["in2"],
                ),
                cert.context("client", m.t1.identities.trust),
                "llm.ai.cluster.local",
            )
            _, resp = conn.open(f"127.0.0.21:{m.ports['llm']}", [])
            assert (await resp).status == 401

    uvloop.run(main())


def test_pod_that_refuses_gets_503_and_unknown_target_400(tmp_path):
    async def main() -> None:
        async with Mesh(tmp_path) as m:
            cert = m.t1.identities.get("apps", "client")
            conn = await m.t1.pool.get(
                (
                    "spiffe://cluster.local/ns/apps/sa/client",
                    "spiffe://cluster.local/ns/ai/sa/llm",
                    "127.0.0.1",
                    m.ports["in2"],
                ),
                cert.context("client", m.t1.identities.trust),
                "llm.ai.cluster.local",
            )
            _, resp = conn.open(f"127.0.0.21:{free_port()}", [])
            assert (await resp).status == 503
            _, resp = conn.open("127.0.0.99:80", [])
            assert (await resp).status == 400
            _, resp = conn.open(f"127.0.0.13:{m.ports['near']}", [])  # on node-1, not here
            assert (await resp).status == 400

    uvloop.run(main())


def test_wrong_destination_identity_is_never_sent_the_stream(tmp_path):
    async def main() -> None:
        async with Mesh(tmp_path) as m:
            from agent.tunnel.pool import PeerIdentityMismatch

            cert = m.t1.identities.get("apps", "client")
            # Ask node-2 for llm's certificate but expect another identity.
            with pytest.raises(
                PeerIdentityMismatch, match=r"presented spiffe://cluster.local/ns/ai/sa/llm"
            ):
                await m.t1.pool.get(
                    (
                        "spiffe://cluster.local/ns/apps/sa/client",
                        "spiffe://cluster.local/ns/ai/sa/admin",
                        "127.0.0.1",
                        m.ports["in2"],
                    ),
                    cert.context("client", m.t1.identities.trust),
                    "llm.ai.cluster.local",
                )

    uvloop.run(main())


def test_untrusted_ca_is_rejected(tmp_path):
    async def main() -> None:
        async with Mesh(tmp_path) as m:
            rogue = CertificateAuthority.load_or_create(
                FileCAStore(tmp_path / "rogue.json"), "cluster.local"
            )
            ids = Identities(rogue, [("apps", "client")])
            cert = ids.get("apps", "client")
            with pytest.raises(ConnectionError, match="TLS with the tunnel"):
                await m.t1.pool.get(
                    (
                        "spiffe://cluster.local/ns/apps/sa/client",
                        "spiffe://cluster.local/ns/ai/sa/llm",
                        "127.0.0.1",
                        m.ports["in2"],
                    ),
                    cert.context("client", ids.trust),
                    "llm.ai.cluster.local",
                )

    uvloop.run(main())


def test_many_concurrent_connections_relay_byte_exact(tmp_path):
    async def main() -> None:
        async with Mesh(tmp_path) as m:

            async def one(i: int) -> None:
                payload = os.urandom(256 << 10) + bytes([i])
                out = await roundtrip(m, "127.0.0.11", ("127.0.0.21", m.ports["llm"]), payload)
                assert hashlib.sha256(out).digest() == hashlib.sha256(payload).digest()

            t0 = time.monotonic()
            await asyncio.gather(*(one(i) for i in range(40)))
            assert time.monotonic() - t0 < 100
            assert sum(c.streams_opened for c in m.t1.pool.connections()) == 40

    uvloop.run(main())


def test_drain_lets_open_streams_finish_and_refuses_new_ones(tmp_path):
    async def main() -> None:
        async with Mesh(tmp_path) as m:
            r, w = await m.dial("127.0.0.11", ("127.0.0.21", m.ports["llm"]))
            w.write(b"before")
            assert await r.readexactly(6) == b"before"
            drain = asyncio.create_task(m.t2.drain(deadline=10))
            await asyncio.sleep(0.1)
            w.write(b"during")
            assert await r.readexactly(6) == b"during"
            w.write_eof()
            assert await r.read() == b""
            await asyncio.wait_for(drain, 10)
            with pytest.raises(OSError):
                await asyncio.open_connection("127.0.0.1", m.ports["in2"])

    uvloop.run(main())


async def hbone_as(m: Mesh, ident: tuple[str, str], headers: list[tuple[str, str]]) -> int:
    """A workload holding its own valid certificate opens HBONE to node-2 itself (skipping
    its node tunnel) and asks for llm: the status node-2 answers."""
    from agent.tunnel import h2 as hb
    from agent.tunnel.pool import ConnectionPool, PoolSettings
    from agent.tunnel.tunnel import sni_for

    ids = Identities(m.ca, [ident])
    cert = ids.get(*ident)
    assert cert is not None
    llm_id = "spiffe://cluster.local/ns/ai/sa/llm"
    pool = ConnectionPool(PoolSettings(), hb.Settings(), mark=0)
    try:
        conn = await pool.get(
            (cert.spiffe_id, llm_id, "127.0.0.1", m.ports["in2"]),
            cert.context("client", ids.trust),
            sni_for(llm_id),
        )
        _, response = conn.open(f"127.0.0.21:{m.ports['llm']}", headers)
        return int((await asyncio.wait_for(response, 10)).status)
    finally:
        await pool.close()


ALLOW_CLIENT_IP = """
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: llm-by-ip, namespace: ai}
spec:
  selector: {matchLabels: {app: llm}}
  action: ALLOW
  rules:
    - from: [{source: {ipBlocks: [127.0.0.11/32]}}]
"""


def test_a_forwarded_header_is_believed_only_from_who_can_vouch_for_it(tmp_path):
    """Issue 14, trusted headers: batch holds its own valid certificate and opens HBONE to
    node-2 itself, claiming `Forwarded: for=` the client pod's address to pass an
    ipBlocks rule. The client pod has another identity, so the claim is not believed: the
    stream is judged by the address it comes from and refused (401), counted as
    forwarded_not_trusted. The client's own traffic, vouched for by its node tunnel, is
    allowed by the same rule."""
    from agent.tunnel.tunnel import FORWARDED

    async def main() -> None:
        async with Mesh(tmp_path, ALLOW_CLIENT_IP) as m:
            llm = ("127.0.0.21", m.ports["llm"])
            assert await roundtrip(m, "127.0.0.11", llm, b"ok") == b"ok"
            status = await hbone_as(m, ("apps", "batch"), [(FORWARDED, "for=127.0.0.11")])
            assert status == 401
            refused = m.t2.metrics.registry.get_sample_value(
                "weft_tunnel_refused_connections_total",
                {"direction": "inbound", "reason": "forwarded_not_trusted"},
            )
            assert refused == 1

    uvloop.run(main())


LLM_USES_A_WAYPOINT = """
---
apiVersion: v1
kind: Service
metadata: {name: llm-l7, namespace: ai, labels: {weft.dev/use-waypoint: ai-waypoint}}
spec: {selector: {app: llm}, clusterIP: 10.96.0.20, ports: [{port: 8080, targetPort: PORT}]}
"""


def test_hbone_that_skips_the_waypoint_is_refused_by_the_destination(tmp_path):
    """Issue 14, waypoint-only reach, at the destination: llm's port belongs to a Service
    that uses a waypoint, so node-2 accepts streams to it only from that waypoint. A
    workload with its own valid certificate opening HBONE to node-2 itself (skipping its
    own node tunnel, which would refuse) gets 401, counted as waypoint_required."""

    async def main() -> None:
        m = Mesh(tmp_path)
        m.snap = config(m.ports, LLM_USES_A_WAYPOINT.replace("PORT", str(m.ports["llm"])))
        async with m:
            assert await hbone_as(m, ("apps", "client"), []) == 401
            assert (
                m.t2.metrics.registry.get_sample_value(
                    "weft_tunnel_refused_connections_total",
                    {"direction": "inbound", "reason": "waypoint_required"},
                )
                == 1
            )

    uvloop.run(main())


DENY_CLIENT = """---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-client, namespace: ai}
spec:
  action: DENY
  rules: [{from: [{source: {principals: [cluster.local/ns/apps/sa/client]}}]}]
"""


def test_a_new_deny_closes_open_connections_at_both_ends(tmp_path):
    """Issue 14, revocation: a connection admitted under one config is closed when the
    next denies it, at once and at both ends: the cross-node HBONE stream (the
    destination's tunnel resets it, so the caller sees its connection end, and the pod's
    side is closed) and the same-node relay (both sockets closed), each counted and
    logged. The tunnels re-judge when the agent applies a config (Agent.apply)."""

    async def main() -> None:
        async with Mesh(tmp_path) as m:
            far = await m.dial("127.0.0.11", ("127.0.0.21", m.ports["llm"]))
            near = await m.dial("127.0.0.11", ("127.0.0.13", m.ports["near"]))
            for r, w in (far, near):
                w.write(b"ping")
                assert await asyncio.wait_for(r.readexactly(4), 10) == b"ping"
            m.snap = config(m.ports, DENY_CLIENT)
            assert m.t2.revalidate(m.snap) == 1  # the inbound stream to llm
            assert m.t1.revalidate(m.snap) == 1  # the local relay to near
            for r, w in (far, near):
                with contextlib.suppress(ConnectionError):
                    assert await asyncio.wait_for(r.read(), 10) == b""  # closed
                w.close()
            for t, kind in ((m.t2, "inbound"), (m.t1, "local")):
                assert (
                    t.metrics.registry.get_sample_value(
                        "weft_tunnel_revoked_connections_total", {"kind": kind, "reason": "denied"}
                    )
                    == 1
                )
            # Connections the new config still admits are left alone.
            assert m.t2.revalidate(m.snap) == 0 and m.t1.revalidate(m.snap) == 0

    uvloop.run(main())
