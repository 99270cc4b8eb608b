"""The mesh end to end on the lab: eBPF capture, both tunnels, mTLS on the node link,
authorization, STRICT, the same-node fast path, and an agent restart. Needs root.

One meshed lab serves the whole module (controller + two agents, about 2 s to build);
tests that change policy remove it again."""

from __future__ import annotations

import json
import signal
import socket
import ssl
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from agent.lab import mesh as labmesh
from agent.netns import call_in
from controller.ca.authority import CertificateAuthority, FileCAStore
from controller.ca.spiffe import key_pem, make_csr, new_key
from tests.kernel.conftest import Mesh, dumps, metric, wait_until

pytestmark = pytest.mark.kernel

ONE_SHOT = """
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
f = s.makefile("rb")
greeting = f.readline().decode()
s.sendall(sys.argv[3].encode() + b"\\n")
assert f.readline() == sys.argv[3].encode() + b"\\n", "echo mismatch"
s.shutdown(socket.SHUT_WR)
print(greeting, end="")
"""

CLIENT_ID = "spiffe://cluster.local/ns/apps/sa/client"
MODEL_ID = "spiffe://cluster.local/ns/ai/sa/model"


@pytest.fixture(scope="module", autouse=True)
def servers(meshed: Mesh) -> None:
    for pod in ("ai/near", "ai/far", "ai/far2", "legacy/old2"):
        meshed.start_server(pod, "--greet")
    meshed.start_server("ai/far", "--digest", port=9000)


def one_shot(
    m: Mesh, pod: str, ip: str, port: int, text: str = "hello"
) -> subprocess.CompletedProcess[bytes]:
    return m.run(pod, ONE_SHOT, ip, str(port), text, timeout=30)


def test_cross_node_connection_goes_through_both_tunnels(meshed: Mesh) -> None:
    out = one_shot(meshed, "apps/client", meshed.ip("ai/far"), 8000)
    assert out.returncode == 0, out.stderr.decode()
    # The pod saw node-2's tunnel as its peer: the connection came out of HBONE there.
    assert out.stdout.decode().startswith(f"peer {meshed.state.node('node-2').ip}:")
    pool = meshed.admin("node-1", "/tunnel")["pool"]
    assert any(c["peer"] == MODEL_ID for c in pool), dumps(pool)
    # The destination node knows who called: the client's own SPIFFE identity.
    text = labmesh.node_get(meshed.state, "node-2", "/metrics")
    assert (
        metric(
            text,
            "istio_tcp_connections_opened_total",
            reporter="destination",
            source_principal=CLIENT_ID,
            destination_principal=MODEL_ID,
            connection_security_policy="mutual_tls",
        )
        >= 1
    )


def test_each_end_logs_the_connection_with_both_identities(meshed: Mesh) -> None:
    target = f"{meshed.ip('ai/far')}:8000"
    out = one_shot(meshed, "apps/client", meshed.ip("ai/far"), 8000, "logged")
    assert out.returncode == 0, out.stderr.decode()

    def ours(node: str, reporter: str) -> list[dict]:
        return [
            r
            for r in meshed.access_log(f"agent-{node}")
            if r["kind"] == "connection" and r["reporter"] == reporter and r["target"] == target
        ]

    src = wait_until(lambda: ours("node-1", "source"), "node-1's connection line")[-1]
    dst = wait_until(lambda: ours("node-2", "destination"), "node-2's connection line")[-1]
    for r in (src, dst):
        assert r["source"] == CLIENT_ID and r["destination"] == MODEL_ID
        assert r["sourceWorkload"] == "apps/client" and r["destinationWorkload"] == "ai/far"
        assert r["security"] == "mutual_tls" and r["durationMs"] >= 0
    # What the client sent ("logged\n") and got back (greeting and echo).
    assert src["bytesSent"] == dst["bytesSent"] == len("logged\n")
    assert src["bytesReceived"] == dst["bytesReceived"] > len("logged\n")


def test_a_service_vip_reaches_its_endpoint_with_the_target_port(meshed: Mesh) -> None:
    vip = next(s["clusterIP"] for s in meshed.state.services if s["name"] == "far")
    out = one_shot(meshed, "apps/client", vip, 80, "via-vip")
    assert out.returncode == 0, out.stderr.decode()


def _capture(
    netns: str, iface: str, ready: threading.Event, stop: threading.Event, out: list[bytes]
) -> None:
    def run() -> None:
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.ntohs(0x0003))
        s.bind((iface, 0))
        s.settimeout(0.1)
        ready.set()
        while not stop.is_set():
            try:
                out.append(s.recv(65535))
            except TimeoutError:
                continue
        s.close()

    call_in(netns, run)


def test_only_tls_crosses_the_node_link(meshed: Mesh) -> None:
    """A payload marker sent between meshed pods never appears on node-1's link; the same
    capture does see it between two pods outside the mesh (so it would have noticed)."""
    n1 = meshed.state.node("node-1")
    frames: list[bytes] = []
    ready, stop = threading.Event(), threading.Event()
    t = threading.Thread(target=_capture, args=(n1.netns, "eth0", ready, stop, frames))
    t.start()
    secret = "WEFT-MARKER-" + "7" * 20
    plain = "PLAIN-MARKER-" + "3" * 20
    try:
        assert ready.wait(10), "the capture did not start"
        assert one_shot(meshed, "apps/client", meshed.ip("ai/far"), 8000, secret).returncode == 0
        assert (
            one_shot(meshed, "legacy/old1", meshed.ip("legacy/old2"), 8000, plain).returncode == 0
        )
        # The plaintext went last: once the capture has read it, it has read every frame
        # before it too (a packet socket queues them in order), however far behind it was.
        wait_until(
            lambda: plain.encode() in b"".join(list(frames)),
            "the capture to see the plaintext (is it working?)",
        )
    finally:
        stop.set()
        t.join()
    wire = b"".join(frames)
    assert secret.encode() not in wire
    hbone = (15008).to_bytes(2, "big")
    assert any(hbone in f[34:38] for f in frames), "no TCP to port 15008 on the link"


POLICY = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: far-callers, namespace: ai}
spec:
  selector: {matchLabels: {app: far}}
  action: ACTION
  rules: [{from: [{source: {principals: [PRINCIPAL]}}]}]
"""


def test_allow_for_one_principal_and_deny_for_another(meshed: Mesh) -> None:
    try:
        meshed.apply(
            "policy-allow.yaml",
            POLICY.replace("ACTION", "ALLOW").replace(
                "PRINCIPAL", "cluster.local/ns/apps/sa/client"
            ),
        )
        assert one_shot(meshed, "apps/client", meshed.ip("ai/far"), 8000).returncode == 0
        denied = one_shot(meshed, "apps/batch", meshed.ip("ai/far"), 8000)
        assert denied.returncode != 0
        meshed.apply(
            "policy-allow.yaml",
            POLICY.replace("ACTION", "DENY").replace(
                "PRINCIPAL", "cluster.local/ns/apps/sa/client"
            ),
        )
        assert one_shot(meshed, "apps/client", meshed.ip("ai/far"), 8000).returncode != 0
        assert one_shot(meshed, "apps/batch", meshed.ip("ai/far"), 8000).returncode == 0
        text = labmesh.node_get(meshed.state, "node-1", "/metrics")
        assert (
            metric(
                text,
                "weft_tunnel_denied_connections_total",
                source_principal="spiffe://cluster.local/ns/apps/sa/batch",
            )
            >= 1
        )
    finally:
        meshed.remove("policy-allow.yaml")
    assert one_shot(meshed, "apps/batch", meshed.ip("ai/far"), 8000).returncode == 0


HOLD_OPEN = """
import json, pathlib, socket, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
f = s.makefile("rb")
f.readline()  # the server's greeting
s.sendall(b"ping\\n")
assert f.readline() == b"ping\\n"
pathlib.Path(sys.argv[3]).write_text("ready")
s.settimeout(25)
t0 = time.monotonic()
try:
    closed = f.readline() == b""
except (ConnectionError, TimeoutError) as e:
    closed = not isinstance(e, TimeoutError)
print(json.dumps({"closed": closed, "after_s": round(time.monotonic() - t0, 3)}))
"""


def test_a_deny_closes_an_open_cross_node_connection(meshed: Mesh, tmp_path) -> None:
    """Issue 14, revocation, with real agents: client holds a connection to far open; a
    DENY for client is applied; node-2's agent closes the stream it admitted, so the
    client's connection ends (it does not stay usable until it closes itself), and the
    revocation is counted there."""
    import threading

    ready = tmp_path / "ready"
    result: list[subprocess.CompletedProcess[bytes]] = []
    t = threading.Thread(
        target=lambda: result.append(
            meshed.run("apps/client", HOLD_OPEN, meshed.ip("ai/far"), "8000", str(ready))
        )
    )
    t.start()
    try:
        wait_until(ready.exists, "the connection to be up", 20)
        meshed.apply(
            "policy-revoke.yaml",
            POLICY.replace("ACTION", "DENY").replace(
                "PRINCIPAL", "cluster.local/ns/apps/sa/client"
            ),
        )
        t.join(40)
        (out,) = result
        assert json.loads(out.stdout)["closed"] is True, out
        text = labmesh.node_get(meshed.state, "node-2", "/metrics")
        assert metric(text, "weft_tunnel_revoked_connections_total", reason="denied") >= 1
    finally:
        t.join(40)
        meshed.remove("policy-revoke.yaml")


def dial(ip: str, port: int = 8000) -> str:
    """A plain TCP connect to ip:port (run with call_in in some namespace)."""
    try:
        socket.create_connection((ip, port), timeout=1.5).close()
        return "connected"
    except TimeoutError:
        return "timeout"
    except OSError as e:
        return str(e)


def test_strict_drops_plaintext_that_bypasses_the_tunnel(meshed: Mesh) -> None:
    """node-1 itself (not a tunnel of node-2) dials a pod on node-2 directly: dropped and
    counted; a pod outside the mesh on node-2 still accepts the same."""
    n1 = meshed.state.node("node-1")
    before = sum(d["count"] for d in meshed.admin("node-2", "/datapath")["drops"])

    assert call_in(n1.netns, dial, meshed.ip("ai/far")) == "timeout"
    assert call_in(n1.netns, dial, meshed.ip("legacy/old2")) == "connected"
    drops = meshed.admin("node-2", "/datapath")["drops"]
    assert sum(d["count"] for d in drops) > before
    assert "not_from_tunnel" in {d["reason"] for d in drops}
    # Prometheus sees the same drops, by the workload that was protected.
    text = labmesh.node_get(meshed.state, "node-2", "/metrics")
    dropped = metric(
        text,
        "weft_datapath_drops_total",
        workload="far",
        workload_namespace="ai",
        reason="not_from_tunnel",
    )
    assert dropped >= 1
    assert metric(text, "weft_datapath_events_total", event="inbound_drops") >= dropped


def test_strict_admits_the_tunnel_not_other_processes_of_the_node(meshed: Mesh) -> None:
    """Issue 14, STRICT: a process in node-2's own network namespace, which sends from the
    node's address as the tunnel does, cannot reach the STRICT pod far (dropped as
    not_tunnel_socket); the tunnel itself still can (a meshed caller gets through)."""
    n2 = meshed.state.node("node-2")

    assert call_in(n2.netns, dial, meshed.ip("ai/far")) == "timeout"
    reasons = {d["reason"] for d in meshed.admin("node-2", "/datapath")["drops"]}
    assert "not_tunnel_socket" in reasons
    assert one_shot(meshed, "apps/client", meshed.ip("ai/far"), 8000).returncode == 0


def test_strict_admits_the_kubelet_on_probe_ports_and_nobody_else(meshed: Mesh) -> None:
    """Issue 14, probes: far declares a readinessProbe on port 8081 (the lab's manifest, as
    a pod spec does). The kubelet dials it from the node without mTLS, so STRICT admits a
    process of node-2's own namespace there, and only there: an unmeshed pod on the same
    node, and node-1, are dropped on that port, and the node itself still cannot reach
    far's other ports."""
    meshed.start_server("ai/far", "--greet", port=8081)
    n1, n2 = meshed.state.node("node-1"), meshed.state.node("node-2")
    far = meshed.ip("ai/far")
    pods = meshed.admin("node-2", "/datapath")["pods"]
    assert next(p for p in pods if p["ip"] == far)["probePorts"] == [8081]

    assert call_in(n2.netns, dial, far, 8081) == "connected"  # the kubelet's probe
    assert call_in(n2.netns, dial, far, 8000) == "timeout"  # not a probe port
    old2 = meshed.state.pod("legacy/old2")
    assert call_in(old2.netns, dial, far, 8081) == "timeout"  # a pod on the same node
    assert call_in(n1.netns, dial, far, 8081) == "timeout"  # another node


def test_closed_flows_become_metrics_once_and_leave_the_flow_map(meshed: Mesh) -> None:
    def closed(node: str, **labels: str) -> float:
        text = labmesh.node_get(meshed.state, node, "/metrics")
        return metric(text, "weft_flows_closed_total", **labels)

    out_labels = dict(
        direction="outbound",
        workload="client",
        workload_namespace="apps",
        peer_workload="far",
        peer_namespace="ai",
        path="tunnel",
    )
    before = closed("node-1", **out_labels)
    for _ in range(3):
        out = one_shot(meshed, "apps/client", meshed.ip("ai/far"), 8000)
        assert out.returncode == 0, out.stderr.decode()
    # The agent exports closed flows every second in the lab (5 s by default).
    wait_until(lambda: closed("node-1", **out_labels) >= before + 3, "3 closed flows exported")
    text = labmesh.node_get(meshed.state, "node-1", "/metrics")
    local = dict(direction="outbound", workload="client", workload_namespace="apps", path="tunnel")
    # RTT measured by the kernel: a real sample, from a veth path, well under a second.
    count = metric(text, "weft_flow_srtt_seconds_count", **local)
    total = metric(text, "weft_flow_srtt_seconds_sum", **local)
    assert count >= 3 and 0 < total / count < 1.0
    assert metric(text, "weft_flow_sent_bytes_total", **out_labels) >= 3 * len(b"hello\n")
    assert metric(text, "weft_flow_received_bytes_total", **out_labels) > 0
    assert metric(text, "weft_flow_duration_seconds_count", **local) >= 3
    # The far side saw them arrive from its tunnel.
    wait_until(
        lambda: (
            closed(
                "node-2",
                direction="inbound",
                workload="far",
                workload_namespace="ai",
                path="tunnel",
            )
            >= 3
        ),
        "inbound flows exported on node-2",
    )
    # Exported flows leave the eBPF map (tests/kernel/test_datapath.py checks that), yet
    # `weft inspect flows` still lists them, from the agent's ring of recent flows.
    flows = meshed.admin("node-1", "/flows")
    mine = [
        f
        for f in flows
        if f["workload"] == "apps/client" and f["originalDst"] == f"{meshed.ip('ai/far')}:8000"
    ]
    assert len([f for f in mine if f["end"]]) >= 3, dumps(mine)
    assert metric(text, "weft_flow_exports_total") >= 1


def test_untrusted_or_missing_client_certificates_are_refused(meshed: Mesh, tmp_path) -> None:
    n1, n2 = meshed.state.node("node-1"), meshed.state.node("node-2")
    rogue = CertificateAuthority.load_or_create(
        FileCAStore(tmp_path / "rogue.json"), "cluster.local"
    )
    real = CertificateAuthority.load_or_create(
        FileCAStore(labmesh.paths(meshed.state)["state"] / "ca.json"), "cluster.local"
    )
    for name, ca in (("rogue", rogue), ("real", real)):
        key = new_key()
        issued = ca.sign_workload(make_csr(key, None), "apps", "client")
        (tmp_path / f"{name}.pem").write_bytes(issued.chain_pem)
        (tmp_path / f"{name}.key").write_bytes(key_pem(key))

    def handshake(cert: str | None) -> str:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        ctx.set_alpn_protocols(["h2"])
        if cert:
            ctx.load_cert_chain(tmp_path / f"{cert}.pem", tmp_path / f"{cert}.key")
        raw = socket.create_connection((n2.ip, 15008), timeout=5)
        try:
            with ctx.wrap_socket(raw, server_hostname="model.ai.cluster.local") as s:
                s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
                return "accepted" if s.recv(9) else "closed"
        except (ssl.SSLError, ConnectionResetError, BrokenPipeError) as e:
            return f"refused: {type(e).__name__}"

    # TLS 1.3 checks the client's certificate after the client finished its handshake, so
    # a refusal shows as an alert or a plain close; only an accepted peer gets SETTINGS.
    assert call_in(n1.netns, handshake, "real") == "accepted"
    assert call_in(n1.netns, handshake, "rogue") != "accepted"
    assert call_in(n1.netns, handshake, None) != "accepted"


def test_fast_path_carries_same_node_traffic_and_not_denied_pairs(meshed: Mesh) -> None:
    def dp() -> dict[str, int]:
        return meshed.admin("node-1", "/datapath")["counters"]  # type: ignore[no-any-return]

    def opened() -> int:
        return sum(c["streamsOpened"] for c in meshed.admin("node-1", "/tunnel")["pool"])

    before, streams = dp(), opened()
    out = one_shot(meshed, "apps/client", meshed.ip("ai/near"), 8000, "x" * 5000)
    assert out.returncode == 0, out.stderr.decode()
    # Spliced in the kernel: the peer is the client itself, and bytes moved by sk_msg.
    assert out.stdout.decode().startswith(f"peer {meshed.ip('apps/client')}:")
    after = dp()
    assert after["fastpath_bytes"] - before["fastpath_bytes"] >= 5000
    assert opened() == streams
    try:
        meshed.apply(
            "deny-near.yaml",
            POLICY.replace("far-callers", "near-callers")
            .replace("app: far", "app: near")
            .replace("ACTION", "DENY")
            .replace("PRINCIPAL", "cluster.local/ns/apps/sa/client"),
        )
        pairs = {tuple(p) for p in meshed.admin("node-1", "/datapath")["fastpathPairs"]}
        assert (meshed.ip("apps/client"), meshed.ip("ai/near"), 8000) not in pairs

        assert one_shot(meshed, "apps/client", meshed.ip("ai/near"), 8000).returncode != 0
        assert one_shot(meshed, "apps/batch", meshed.ip("ai/near"), 8000).returncode == 0
    finally:
        meshed.remove("deny-near.yaml")


def test_a_deny_closes_a_spliced_same_node_connection(meshed: Mesh, tmp_path) -> None:
    """Issue 14, revocation on the fast path: client holds a connection to near that the
    kernel splices (the agent is not in its path); a DENY for client on near makes the
    agent destroy the client's socket (SOCK_DESTROY in the pod's namespace), the server
    gets a RST, and client's connection ends, counted as a fastpath revocation."""
    import threading

    ready = tmp_path / "ready"
    result: list[subprocess.CompletedProcess[bytes]] = []
    t = threading.Thread(
        target=lambda: result.append(
            meshed.run("apps/client", HOLD_OPEN, meshed.ip("ai/near"), "8000", str(ready))
        )
    )
    t.start()
    try:
        wait_until(ready.exists, "the connection to be up", 20)
        spliced = [
            f for f in meshed.admin("node-1", "/flows") if f.get("fastpath") and not f.get("closed")
        ]
        assert spliced, "the connection should be spliced by the fast path"
        meshed.apply(
            "deny-near-open.yaml",
            POLICY.replace("far-callers", "near-open")
            .replace("app: far", "app: near")
            .replace("ACTION", "DENY")
            .replace("PRINCIPAL", "cluster.local/ns/apps/sa/client"),
        )
        t.join(40)
        (out,) = result
        assert json.loads(out.stdout)["closed"] is True, out
        text = labmesh.node_get(meshed.state, "node-1", "/metrics")
        assert metric(text, "weft_tunnel_revoked_connections_total", kind="fastpath") >= 1
    finally:
        t.join(40)
        meshed.remove("deny-near-open.yaml")


PERSISTENT = """
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
f = s.makefile("rb")
print(f.readline().decode().strip(), flush=True)
for line in sys.stdin:
    s.sendall(line.encode())
    print(f.readline().decode().strip(), flush=True)
"""


def test_killing_the_agent_keeps_a_spliced_connection_and_a_new_agent_resumes(meshed: Mesh):
    p = meshed.state.pod("apps/client")

    from agent.netns import spawn

    proc = spawn(
        [sys.executable, "-c", PERSISTENT, meshed.ip("ai/near"), "8000"],
        netns=p.netns,
        cgroup=Path(p.cgroup),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdin and proc.stdout

    def say(line: str) -> str:
        proc.stdin.write(line.encode() + b"\n")  # type: ignore[union-attr]
        proc.stdin.flush()  # type: ignore[union-attr]
        return proc.stdout.readline().decode().strip()  # type: ignore[union-attr]

    try:
        assert proc.stdout.readline().decode().startswith("peer")
        assert say("one") == "one"
        agent = next(x for x in meshed.lab.state().processes if x.name == "agent-node-1")
        import os

        os.kill(agent.pid, signal.SIGKILL)
        wait_until(
            lambda: (
                not Path(f"/proc/{agent.pid}/status").exists()
                or "zombie" in Path(f"/proc/{agent.pid}/status").read_text()
            ),
            "agent to die",
        )
        assert say("two, no agent") == "two, no agent"
        labmesh.start_agent(meshed.lab, meshed.lab.state(), "node-1")
        labmesh.wait_ready(meshed.lab, meshed.lab.state(), "node-1")
        assert say("three, new agent") == "three, new agent"
        # And the new agent captures new connections as before.
        out = one_shot(meshed, "apps/client", meshed.ip("ai/far"), 8000)
        assert out.stdout.decode().startswith(f"peer {meshed.state.node('node-2').ip}:")
    finally:
        proc.stdin.close()
        proc.wait(timeout=10)


MANY = """
import hashlib, os, socket, sys, threading
ip, port, conns, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
bad = []
chunk = os.urandom(1 << 20)

def one(i):
    try:
        s = socket.create_connection((ip, port), timeout=120)
        h = hashlib.sha256()
        sent = 0
        while sent < size:
            piece = chunk[: min(len(chunk), size - sent)]
            piece = bytes([i % 256]) + piece[1:]
            s.sendall(piece)
            h.update(piece)
            sent += len(piece)
        s.shutdown(socket.SHUT_WR)
        reply = s.makefile().readline().split()
        if reply != [str(size), h.hexdigest()]:
            bad.append((i, reply))
    except Exception as e:
        bad.append((i, repr(e)))

ts = [threading.Thread(target=one, args=(i,)) for i in range(conns)]
[t.start() for t in ts]
[t.join() for t in ts]
print(len(bad), bad[:3])
sys.exit(1 if bad else 0)
"""


def test_200_concurrent_connections_carry_10_mb_each_byte_exact(meshed: Mesh) -> None:
    out = meshed.run(
        "apps/client", MANY, meshed.ip("ai/far"), "9000", "200", str(10 << 20), timeout=600
    )
    assert out.returncode == 0, out.stdout.decode() + out.stderr.decode()[-2000:]
