"""The eBPF data path on the real kernel, in the lab: capture to the tunnel with the
original destination, STRICT inbound enforcement, the same-node fast path, an agent
restart under an open connection, and removal. Needs root, bpffs and bcc.

Until the node tunnel exists, `Forwarder` stands in for its outbound side: it listens on
the node's tunnel address :15001, asks the data path for each connection's original
destination, connects there and relays the bytes.

bcc compiles once per module (a shared bytecode cache); every agent still gets its own
maps and programs under its lab node's pin root.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path

import pytest

from agent.cgroups import cgroup2_root, own_cgroup
from agent.datapath import (
    Counter,
    Datapath,
    DatapathSettings,
    DropReason,
    PodAttachment,
    bpfsys,
)
from agent.datapath.loader import CGROUP_HOOKS, uninstall
from agent.netns import call_in, setns, spawn
from tests.conftest import SMALL_LAB

pytestmark = pytest.mark.kernel

ROOT = Path(__file__).resolve().parents[2]
TUNNEL_PORT = 15001
AGENT_MARK = 0x5746
SO_ORIGINAL_DST = 80

# One request: read the server's greeting line, send, half-close, read the echo.
CLIENT = """
import socket, sys
timeout = float(sys.argv[3]) if len(sys.argv) > 3 else 5
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=timeout)
f = s.makefile("rb")
greeting = f.readline().decode()
payload = b"x" * int(sys.argv[4]) if len(sys.argv) > 4 else b"hello weft"
rounds = int(sys.argv[5]) if len(sys.argv) > 5 else 1
for _ in range(rounds):
    s.sendall(payload + b"\\n")
    assert f.readline() == payload + b"\\n"
s.shutdown(socket.SHUT_WR)
print(greeting, end="")
"""

# A connection that stays open: one line in, one echoed line out, until stdin closes.
PERSISTENT_CLIENT = """
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
f = s.makefile("rb")
print(f.readline().decode().strip(), flush=True)
for line in sys.stdin:
    s.sendall(line.encode())
    print(f.readline().decode().strip(), flush=True)
"""


# ---- the stand-in tunnel -----------------------------------------------------------------


def stand_in_tunnel_cgroup() -> Path:
    """The cgroup the in-process stand-in tunnel sends from: this test process's (the
    hierarchy root when it runs there). The agent attaches weft_tunnel_egress to its own
    cgroup the same way, so STRICT pods admit its connections."""
    return own_cgroup() or cgroup2_root()


class Forwarder:
    """Accept on tunnel_ip:15001, look up the original destination, connect, relay."""

    def __init__(
        self,
        netns: str | None,
        ip: str,
        lookup: Callable[[str, int], object],
        on_accept: Callable[[tuple[str, int], object, object], None] | None = None,
    ) -> None:
        self.netns, self.ip, self.lookup, self.on_accept = netns, ip, lookup, on_accept
        self.seen: list[tuple[tuple[str, int], object]] = []
        self.kernel_said: list[tuple[str, int] | None] = []
        self._ready = threading.Event()
        self._server: socket.socket | None = None

    def __enter__(self) -> Forwarder:
        threading.Thread(target=self._serve, name="forwarder", daemon=True).start()
        if not self._ready.wait(5):
            raise TimeoutError("forwarder did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            with contextlib.suppress(OSError):
                self._server.shutdown(socket.SHUT_RDWR)
            self._server.close()

    def _serve(self) -> None:
        if self.netns is not None:
            setns(self.netns)  # threads started from here inherit this netns
        self._server = socket.create_server((self.ip, TUNNEL_PORT), backlog=128)
        self._ready.set()
        while True:
            try:
                conn, peer = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn, peer), daemon=True).start()

    def _handle(self, conn: socket.socket, peer: tuple[str, int]) -> None:
        said = original_dst_sockopt(conn)  # before lookup(): that deletes the entry
        od = self.lookup(peer[0], peer[1])
        self.seen.append((peer, od))
        self.kernel_said.append(said)
        if self.on_accept is not None:
            self.on_accept(peer, od, said)
        if od is None:
            conn.close()
            return
        up = socket.socket()
        up.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, AGENT_MARK)  # as the tunnel will
        up.settimeout(5)
        try:
            up.connect((od.ip, od.port))  # type: ignore[attr-defined]
        except OSError:
            conn.close()
            up.close()
            return
        up.settimeout(None)
        threading.Thread(target=_pipe, args=(up, conn), daemon=True).start()
        _pipe(conn, up)


def original_dst_sockopt(conn: socket.socket) -> tuple[str, int] | None:
    """What getsockopt(SOL_IP, SO_ORIGINAL_DST) says (answered by weft_original_dst when
    the data path is attached to this process's cgroup)."""
    try:
        raw = conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    except OSError:
        return None
    port, ip = struct.unpack_from("!H4s", raw, 2)
    return socket.inet_ntoa(ip), port


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := src.recv(65536):
            dst.sendall(data)
    with contextlib.suppress(OSError):
        dst.shutdown(socket.SHUT_WR)


def run_agent() -> None:
    """The agent side of the restart test, as its own process in a node netns: bring the
    data path up for the given pods, serve the stand-in tunnel, report on stdout."""
    cfg = json.loads(sys.argv[1])
    dp = Datapath(
        DatapathSettings(
            tunnel_ip=cfg["tunnel_ip"],
            pin_root=Path(cfg["pin_root"]),
            cache_dir=Path(cfg["cache_dir"]),
            flow_sample_ms=cfg["flow_sample_ms"],
        )
    )
    pods = [PodAttachment(cgroup=p["cgroup"], ip=p["ip"], strict=p["strict"]) for p in cfg["pods"]]
    report = dp.start(pods)
    dp.set_fastpath_pairs([tuple(p) for p in cfg["pairs"]])
    dp.attach_tunnel(cfg["tunnel_cgroup"])  # this process's cgroup: SO_ORIGINAL_DST works

    def said(peer: tuple[str, int], od: object, sockopt: object) -> None:
        event = {"accepted": list(peer), "od": asdict(od) if od else None, "sockopt": sockopt}
        print(json.dumps(event), flush=True)

    with Forwarder(None, cfg["tunnel_ip"], dp.original_destination, on_accept=said) as fwd:
        # As the agent does: captured connects go to this listener only (weft_tunnel_lookup).
        assert fwd._server is not None
        dp.set_tunnel_listener(fwd._server.fileno())
        print(json.dumps({"ready": asdict(report)}), flush=True)
        threading.Event().wait()


# ---- helpers -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bpf_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Compile once for the module; every agent below still makes its own maps."""
    return tmp_path_factory.mktemp("bpf-cache")


@pytest.fixture
def datapaths(lab_factory, bpf_cache: Path) -> Iterator[Callable[..., Datapath]]:
    """Start a Datapath for a lab node; uninstalled at the end, pass or fail (before the
    lab goes, since this fixture depends on lab_factory)."""
    made: list[Datapath] = []

    def make(state, node: str, **settings: object) -> Datapath:
        n = state.node(node)
        dp = Datapath(
            DatapathSettings(
                tunnel_ip=n.ip,
                pin_root=Path(n.bpffs),
                cache_dir=bpf_cache,
                **settings,  # type: ignore[arg-type]
            )
        )
        made.append(dp)
        dp.start()
        return dp

    yield make
    for dp in made:
        with contextlib.suppress(Exception):
            dp.uninstall()


def start_echo(lab, state, pod: str, port: int = 8000) -> None:
    p = state.pod(pod)
    lab.start_process(
        state,
        f"echo-{p.name}-{port}",
        [sys.executable, "-m", "agent.lab.workloads.echo", "--port", str(port), "--greet"],
        pod=pod,
    )
    node = state.node(p.node)

    def probe() -> bool:
        try:
            socket.create_connection((p.ip, port), timeout=0.5).close()
            return True
        except OSError:
            return False

    deadline = time.monotonic() + 10
    while not call_in(node.netns, probe):
        if time.monotonic() > deadline:
            raise TimeoutError(f"echo on {p.ip}:{port} did not start")
        time.sleep(0.05)


def talk(lab, pod: str, ip: str, port: int, *args: str) -> subprocess.CompletedProcess[bytes]:
    """One request from a pod; stdout is the greeting ("peer <ip>:<port>") on success."""
    return lab.run(pod, [sys.executable, "-c", CLIENT, ip, str(port), *args], timeout=20)


def greeting_peer(out: subprocess.CompletedProcess[bytes]) -> str:
    """The source address the server saw."""
    assert out.returncode == 0, out.stderr.decode()[-800:]
    text = out.stdout.decode()
    assert text.startswith("peer "), text
    return text.split()[1].rsplit(":", 1)[0]


def refused(out: subprocess.CompletedProcess[bytes]) -> bool:
    """The connect timed out: its SYNs were dropped."""
    return out.returncode != 0 and b"timed out" in out.stderr


def delta(after: dict[Counter, int], before: dict[Counter, int], c: Counter) -> int:
    return after[c] - before[c]


def wait_for(check: Callable[[], object], what: str, timeout: float = 5.0) -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def weft_programs(cgroup: str) -> dict[int, list[int]]:
    """Ids of weft programs attached to a cgroup, by attach type."""
    out: dict[int, list[int]] = {}
    fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for hook in CGROUP_HOOKS:
            for pid in bpfsys.prog_query(fd, hook.attach_type):
                pfd = bpfsys.prog_fd_by_id(pid)
                try:
                    if bpfsys.prog_info(pfd).name.startswith("weft_"):
                        out.setdefault(hook.attach_type, []).append(pid)
                finally:
                    os.close(pfd)
    finally:
        os.close(fd)
    return out


def object_gone(opener: Callable[[int], int], object_id: int) -> bool:
    try:
        os.close(opener(object_id))
    except OSError as e:
        return e.errno == errno.ENOENT
    return False


class PodConnection:
    """A long-lived connection from a process in a pod: send a line, get the echo."""

    def __init__(self, pod, ip: str, port: int) -> None:
        self.proc = spawn(
            [sys.executable, "-c", PERSISTENT_CLIENT, ip, str(port)],
            netns=pod.netns,
            cgroup=Path(pod.cgroup),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.greeting = self._line()

    def _line(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode().strip()
        if not line:
            err = self.proc.stderr.read().decode() if self.proc.stderr else ""
            raise AssertionError(f"pod connection ended: {err[-800:]}")
        return line

    def echo(self, text: str) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text.encode() + b"\n")
        self.proc.stdin.flush()
        return self._line()

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


# ---- (a) capture -------------------------------------------------------------------------


def test_connect_is_redirected_to_the_tunnel_with_its_original_destination(lab_factory, datapaths):
    """A pod's connect to another pod's IP:port lands on the node tunnel's :15001; the
    tunnel recovers the original destination from the peer address it accepted (once),
    relays there, and the flow record says where the pod was going."""
    lab, state = lab_factory(SMALL_LAB)
    node = state.node("node-1")
    client, far = state.pod("apps/client"), state.pod("ai/far")
    dp = datapaths(state, "node-1")
    dp.attach_pod(client.cgroup, client.ip)
    start_echo(lab, state, "ai/far")
    before = dp.counters()

    with Forwarder(node.netns, node.ip, dp.original_destination) as fwd:
        out = talk(lab, "apps/client", far.ip, 8000)
    # The server saw the forwarder's onward connection, so the bytes went through it.
    assert greeting_peer(out) == node.ip
    [(peer, od)] = fwd.seen
    assert peer[0] == client.ip
    assert (od.ip, od.port, od.cgroup_id) == (far.ip, 8000, client.cgroup_id)
    assert dp.original_destination(*peer) is None, "an entry is handed out once"
    assert fwd.kernel_said == [None], "SO_ORIGINAL_DST is answered only in the tunnel's cgroup"
    after = dp.counters()
    assert delta(after, before, Counter.REDIRECTED) == 1
    assert delta(after, before, Counter.ORIGDST_REKEYED) == 1

    def closed_flow():
        return [f for f in dp.flows() if f.cookie == od.cookie and f.closed]

    [flow] = wait_for(closed_flow, "the client's flow record to close")  # type: ignore[misc]
    assert flow.direction == "outbound" and flow.redirected and not flow.fastpath
    assert flow.local == peer and flow.remote == (node.ip, TUNNEL_PORT)
    assert flow.original_dst == (far.ip, 8000)
    assert flow.bytes_sent >= len("hello weft\n") and flow.bytes_received > 0
    assert flow.end_ns >= flow.start_ns > 0
    assert abs(flow.started_at - time.time()) < 60
    # Exporting reads a closed flow once and deletes it: the map keeps open flows only.
    assert any(f.cookie == od.cookie for f in dp.flows(reap_closed=True))
    assert not any(f.cookie == od.cookie for f in dp.flows())


def test_ipv4_mapped_connects_on_ipv6_sockets_are_captured_too(lab_factory, datapaths):
    """connect6 captures ::ffff:a.b.c.d like connect4; the tunnel sees a plain IPv4 peer."""
    lab, state = lab_factory(SMALL_LAB)
    node = state.node("node-1")
    client, far = state.pod("apps/client"), state.pod("ai/far")
    dp = datapaths(state, "node-1")
    dp.attach_pod(client.cgroup, client.ip)
    start_echo(lab, state, "ai/far")
    v6 = (
        "import socket; s = socket.socket(socket.AF_INET6); s.settimeout(5); "
        f"s.connect(('::ffff:{far.ip}', 8000)); print(s.makefile().readline(), end='')"
    )
    with Forwarder(node.netns, node.ip, dp.original_destination) as fwd:
        out = lab.run("apps/client", [sys.executable, "-c", v6])
    assert greeting_peer(out) == node.ip
    [(peer, od)] = fwd.seen
    assert peer[0] == client.ip and (od.ip, od.port) == (far.ip, 8000)  # type: ignore[attr-defined]


def test_excluded_destinations_are_not_captured(lab_factory, datapaths):
    """Excluded ports and CIDRs (per pod and global) and the node's own address go
    direct: the server sees the pod's own address and the tunnel sees nothing."""
    lab, state = lab_factory(SMALL_LAB)
    node = state.node("node-1")
    client, far = state.pod("apps/client"), state.pod("ai/far")
    dp = datapaths(state, "node-1")
    start_echo(lab, state, "ai/far")
    with Forwarder(node.netns, node.ip, dp.original_destination) as fwd:
        for how in ({"excluded_ports": [8000]}, {"excluded_cidrs": [f"{far.ip}/32"]}):
            dp.attach_pod(client.cgroup, client.ip, **how)  # type: ignore[arg-type]
            assert greeting_peer(talk(lab, "apps/client", far.ip, 8000)) == client.ip, how
        dp.attach_pod(client.cgroup, client.ip)
        dp.set_global_exclusions(cidrs=["10.244.2.0/24"])
        assert greeting_peer(talk(lab, "apps/client", far.ip, 8000)) == client.ip
        dp.set_global_exclusions()
        assert greeting_peer(talk(lab, "apps/client", far.ip, 8000)) == node.ip
    assert [od.port for _, od in fwd.seen] == [8000]  # type: ignore[attr-defined]
    [pod] = dp.attached_pods()
    assert pod.cgroup_id == client.cgroup_id and pod.excluded_ports == frozenset()


# ---- (b) inbound enforcement -------------------------------------------------------------


def test_strict_pod_accepts_only_the_tunnel_and_exception_ports(lab_factory, datapaths):
    """STRICT drops (and counts) plaintext TCP from other sources to the pod's listeners;
    the node tunnel's address and an exception port (a health probe) get through."""
    lab, state = lab_factory(SMALL_LAB)
    node = state.node("node-1")
    near, far = state.pod("ai/near"), state.pod("ai/far")
    start_echo(lab, state, "ai/near", 8000)
    start_echo(lab, state, "ai/near", 8081)
    dp = datapaths(state, "node-1")
    dp.attach_pod(near.cgroup, near.ip, strict=True, inbound_exception_ports=[8081])

    # A pod on the other node (no agent there: plaintext, straight to the pod).
    assert refused(talk(lab, "ai/far", near.ip, 8000, "1"))
    # A pod on the same node that is not captured.
    assert refused(talk(lab, "apps/client", near.ip, 8000, "1"))
    drops = dp.drop_counters()
    assert drops[(near.cgroup_id, DropReason.NOT_FROM_TUNNEL)] >= 2
    assert set(drops) == {(near.cgroup_id, DropReason.NOT_FROM_TUNNEL)}
    assert dp.counters()[Counter.INBOUND_DROPS] == sum(drops.values())

    # Another process of the node's network namespace, from the node's address (the
    # tunnel's), but not in the tunnel's cgroup: dropped as not a tunnel socket.
    def from_node() -> str:
        with socket.create_connection((near.ip, 8000), timeout=3) as s:
            return s.makefile().readline()

    with pytest.raises(OSError):
        call_in(node.netns, from_node)
    assert dp.drop_counters()[(near.cgroup_id, DropReason.NOT_TUNNEL_SOCKET)] >= 1
    # The tunnel itself: a process in the tunnel's cgroup (where the agent attaches
    # weft_tunnel_egress, as the agent does for its own), from the node's address.
    dp.attach_tunnel(node.cgroup)
    tunnel = spawn(
        [sys.executable, "-c", CLIENT, near.ip, "8000"],
        netns=node.netns,
        cgroup=Path(node.cgroup),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = tunnel.communicate(timeout=20)
    assert tunnel.returncode == 0, err.decode()[-800:]
    assert out.decode().startswith(f"peer {node.ip}:")
    assert greeting_peer(talk(lab, "ai/far", near.ip, 8081)) == far.ip
    # Not STRICT any more: the same plaintext connection is accepted.
    dp.attach_pod(near.cgroup, near.ip)
    assert greeting_peer(talk(lab, "ai/far", near.ip, 8000)) == far.ip


# ---- (c) same-node fast path -------------------------------------------------------------


def test_fastpath_splices_allowed_same_node_pairs_only(lab_factory, datapaths):
    """An allowed same-node pair is spliced in the kernel (counters and flows show it,
    the tunnel sees nothing, TCP carries no payload); a denied pair goes through the
    tunnel, and bypassing capture to reach it directly is refused by STRICT; the node
    switch turns splicing off."""
    lab, state = lab_factory(SMALL_LAB)
    node = state.node("node-1")
    client, near = state.pod("apps/client"), state.pod("ai/near")
    start_echo(lab, state, "ai/near", 8000)
    start_echo(lab, state, "ai/near", 8001)
    dp = datapaths(state, "node-1")
    dp.attach_pod(client.cgroup, client.ip)
    dp.attach_pod(near.cgroup, near.ip, strict=True)
    assert dp.set_fastpath_pairs([(client.ip, near.ip, 8000)]) == 1

    # The Forwarder threads are the tunnel: STRICT admits what it opens (as the agent's).
    dp.attach_tunnel(stand_in_tunnel_cgroup())
    with Forwarder(node.netns, node.ip, dp.original_destination) as fwd:
        before = dp.counters()
        size, rounds = 1024, 20
        assert greeting_peer(talk(lab, "apps/client", near.ip, 8000, "5", str(size), str(rounds)))
        after = dp.counters()
        assert fwd.seen == []
        assert delta(after, before, Counter.FASTPATH_CONNECTS) == 1
        assert delta(after, before, Counter.FASTPATH_SOCKETS) == 2
        assert delta(after, before, Counter.FASTPATH_FALLBACK) == 0
        assert delta(after, before, Counter.FASTPATH_BYTES) >= 2 * rounds * (size + 1)
        spliced = [f for f in dp.flows() if f.fastpath]
        assert {f.direction for f in spliced} == {"outbound", "inbound"}
        for f in spliced:
            assert f.fastpath_bytes_sent >= rounds * (size + 1)
            assert f.bytes_sent <= 2, "TCP carried only SYN/FIN, never payload"

        # Denied pair (port 8001 is not in the policy map): through the tunnel, which
        # STRICT accepts; nothing spliced.
        assert greeting_peer(talk(lab, "apps/client", near.ip, 8001)) == node.ip
        assert [(od.ip, od.port) for _, od in fwd.seen] == [(near.ip, 8001)]  # type: ignore[attr-defined]
        assert dp.counters()[Counter.FASTPATH_SOCKETS] == after[Counter.FASTPATH_SOCKETS]

        # A client that escapes capture cannot reach the denied pair directly...
        dp.attach_pod(client.cgroup, client.ip, capture=False)
        assert refused(talk(lab, "apps/client", near.ip, 8001, "1"))
        assert dp.drop_counters()[(near.cgroup_id, DropReason.NOT_FROM_TUNNEL)] >= 1
        # ...while STRICT lets the allowed pair in directly, spliced.
        assert greeting_peer(talk(lab, "apps/client", near.ip, 8000)) == client.ip

        # The node switch off: the allowed pair goes through the tunnel too.
        dp.attach_pod(client.cgroup, client.ip)
        dp.set_fastpath_enabled(False)
        sockets = dp.counters()[Counter.FASTPATH_SOCKETS]
        assert greeting_peer(talk(lab, "apps/client", near.ip, 8000)) == node.ip
        assert dp.counters()[Counter.FASTPATH_SOCKETS] == sockets
        assert (fwd.seen[-1][1].ip, fwd.seen[-1][1].port) == (near.ip, 8000)  # type: ignore[attr-defined]


# ---- (d) agent restart -------------------------------------------------------------------


class AgentProcess:
    """The node-1 agent as its own process (run_agent above), started through the lab."""

    def __init__(self, lab, state, cache: Path, pods: list[dict[str, object]], pairs) -> None:
        self.lab, self.state = lab, state
        node = state.node("node-1")
        self.pin_root = Path(node.bpffs)
        self.config = {
            "tunnel_ip": node.ip,
            "tunnel_cgroup": node.cgroup,
            "pin_root": node.bpffs,
            "cache_dir": str(cache),
            "pods": pods,
            "pairs": pairs,
            "flow_sample_ms": 100,
        }
        self.pid = 0
        self.log: Path | None = None
        self._offset = 0

    def start(self, **overrides: object) -> dict[str, object]:
        argv = [
            sys.executable,
            "-c",
            "from tests.kernel.test_datapath import run_agent; run_agent()",
            json.dumps({**self.config, **overrides}),
        ]
        env = {"PYTHONPATH": str(ROOT)}
        ps = self.lab.start_process(self.state, "agent-node-1", argv, node="node-1", env=env)
        self.pid, self.log = ps.pid, Path(ps.log)
        return self.wait_event("ready")["ready"]  # type: ignore[no-any-return]

    def events(self) -> list[dict[str, object]]:
        assert self.log is not None
        text = self.log.read_text()[self._offset :]
        return [json.loads(line) for line in text.splitlines() if line.startswith("{")]

    def wait_event(self, kind: str, timeout: float = 30) -> dict[str, object]:
        def find():
            return next((e for e in self.events() if kind in e), None)

        try:
            event = wait_for(find, f"agent event {kind!r}", timeout)
        except AssertionError:
            tail = self.log.read_text()[-3000:] if self.log else ""
            raise AssertionError(f"agent never said {kind!r}; log:\n{tail}") from None
        return event  # type: ignore[return-value]

    def kill(self) -> None:
        os.kill(self.pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)
        assert self.log is not None
        self._offset = len(self.log.read_text())


def test_agent_restart_keeps_open_connections_and_capture(lab_factory, bpf_cache):
    """SIGKILL the agent: a spliced connection keeps flowing with no agent at all. The
    restarted agent reuses the pinned maps and programs (no kernel change), and capture
    works for new connections. A restart with a different build replaces the programs
    atomically, still without breaking the open connection."""
    lab, state = lab_factory(SMALL_LAB)
    node = state.node("node-1")
    client, near, far = state.pod("apps/client"), state.pod("ai/near"), state.pod("ai/far")
    start_echo(lab, state, "ai/near")
    start_echo(lab, state, "ai/far")
    pods = [
        {"cgroup": client.cgroup, "ip": client.ip, "strict": False},
        {"cgroup": near.cgroup, "ip": near.ip, "strict": True},
    ]
    agent = AgentProcess(lab, state, bpf_cache, pods, [[client.ip, near.ip, 8000]])
    conn = None
    try:
        first = agent.start()
        view = Datapath.open_pins(agent.pin_root)
        programs = weft_programs(client.cgroup)
        conn = PodConnection(client, near.ip, 8000)
        assert conn.greeting.startswith(f"peer {client.ip}:")  # direct: spliced, not tunneled
        assert conn.echo("one") == "one"
        msgs = view.counters()[Counter.FASTPATH_MSGS]
        assert msgs >= 2

        agent.kill()
        assert conn.echo("two") == "two"
        assert view.counters()[Counter.FASTPATH_MSGS] >= msgs + 2, "still spliced, no agent"

        second = agent.start()
        assert second["reused_programs"] and not second["compiled"]
        assert second["build"] == first["build"] and second["adopted_pods"] == 2
        assert weft_programs(client.cgroup) == programs, "a plain restart changes nothing"
        assert conn.echo("three") == "three"
        # New connections are captured by the restarted agent, original destination intact.
        assert greeting_peer(talk(lab, "apps/client", far.ip, 8000)) == node.ip
        accepted = agent.wait_event("accepted")
        assert accepted["od"]["ip"] == far.ip and accepted["od"]["port"] == 8000  # type: ignore[index]
        assert accepted["sockopt"] == [far.ip, 8000], "SO_ORIGINAL_DST answers the same"

        # A different build (another -D flag): programs are replaced in place.
        agent.kill()
        third = agent.start(flow_sample_ms=50)
        assert third["compiled"] and not third["reused_programs"]
        replaced = weft_programs(client.cgroup)
        assert all(len(ids) == 1 for ids in replaced.values()) and len(replaced) == 4
        assert {i for ids in replaced.values() for i in ids}.isdisjoint(
            {i for ids in programs.values() for i in ids}
        )
        assert sorted(p.name for p in (agent.pin_root / "progs").iterdir()) == [third["build"]]
        assert conn.echo("four") == "four"
        assert greeting_peer(talk(lab, "apps/client", near.ip, 8000)) == client.ip
        view.stop()
    finally:
        if conn is not None:
            conn.close()
        with contextlib.suppress(ProcessLookupError):
            agent.kill()
        uninstall(agent.pin_root)


def test_start_detaches_what_is_no_longer_wanted(lab_factory, datapaths, bpf_cache):
    """A new agent process started with its desired pods detaches the pods a previous
    process attached that are not among them, forgets cgroups that vanished, and keeps
    the attachments it wants exactly as they were."""
    _lab, state = lab_factory(SMALL_LAB)
    client, near = state.pod("apps/client"), state.pod("ai/near")
    first = datapaths(state, "node-1")
    first.attach_pod(client.cgroup, client.ip)
    first.attach_pod(near.cgroup, near.ip)
    gone = Path(client.cgroup).parent / "gone"
    gone.mkdir()
    first.attach_pod(gone, "10.244.1.99")
    first.stop()
    gone.rmdir()
    kept = weft_programs(client.cgroup)

    node = state.node("node-1")
    again = Datapath(
        DatapathSettings(tunnel_ip=node.ip, pin_root=Path(node.bpffs), cache_dir=bpf_cache)
    )
    report = again.start([PodAttachment(cgroup=client.cgroup, ip=client.ip, strict=True)])
    try:
        assert any("gone" in line for line in report.removed_stale)
        assert weft_programs(near.cgroup) == {}
        assert weft_programs(client.cgroup) == kept
        [pod] = again.attached_pods()
        assert (pod.cgroup, pod.strict) == (client.cgroup, True)
    finally:
        again.uninstall()


# ---- (e) removal -------------------------------------------------------------------------


def test_uninstall_and_lab_down_leave_no_attachment_or_pin(lab_factory, datapaths):
    """uninstall detaches every program and removes every pin. A connection spliced
    before keeps flowing (its sockets hold the sk_msg program and the sockhash); once it
    closes the kernel frees every program and map. An agent that only stopped is cleaned
    up by `lab down` (cgroups and pins go)."""
    lab, state = lab_factory(SMALL_LAB)
    client, near, far = state.pod("apps/client"), state.pod("ai/near"), state.pod("ai/far")
    start_echo(lab, state, "ai/near")
    dp = datapaths(state, "node-1")
    dp.attach_pod(client.cgroup, client.ip)
    dp.attach_pod(near.cgroup, near.ip)
    dp.set_fastpath_pairs([(client.ip, near.ip, 8000)])
    other = datapaths(state, "node-2")
    other.attach_pod(far.cgroup, far.ip)
    ids = (dp.program_ids(), dp.map_ids())
    other_ids = (other.program_ids(), other.map_ids())
    pin_root = dp.pin_root

    def freed(progs: dict[str, int], maps: dict[str, int]) -> bool:
        return all(object_gone(bpfsys.prog_fd_by_id, i) for i in progs.values()) and all(
            object_gone(bpfsys.map_fd_by_id, i) for i in maps.values()
        )

    conn = PodConnection(client, near.ip, 8000)
    try:
        assert conn.echo("spliced") == "spliced"
        dp.uninstall()
        tree = subprocess.run(
            ["bpftool", "cgroup", "tree", str(lab.cgroup)], capture_output=True, text=True
        ).stdout
        assert client.cgroup not in tree and near.cgroup not in tree and far.cgroup in tree
        assert weft_programs(client.cgroup) == {} and weft_programs(near.cgroup) == {}
        assert weft_programs(far.cgroup) != {}, "the node-2 agent's attachments are not ours"
        assert not pin_root.exists()
        assert conn.echo("still spliced") == "still spliced"
        # New connections are plain TCP now: the server sees the client, nothing breaks.
        assert greeting_peer(talk(lab, "apps/client", near.ip, 8000)) == client.ip
    finally:
        conn.close()
    wait_for(lambda: freed(*ids), "the kernel to free node-1's programs and maps")

    other.stop()  # the process goes, the kernel keeps its programs...
    assert weft_programs(far.cgroup) != {}
    lab.down()  # ...until the lab goes
    assert not lab.bpffs.exists()
    wait_for(
        lambda: (
            all(object_gone(bpfsys.prog_fd_by_id, i) for i in other_ids[0].values())
            and all(object_gone(bpfsys.map_fd_by_id, i) for i in other_ids[1].values())
        ),
        "the kernel to free node-2's programs and maps",
    )
    leftovers = subprocess.run(["bpftool", "cgroup", "tree"], capture_output=True, text=True).stdout
    assert lab.name not in leftovers


# ---- the CLI -----------------------------------------------------------------------------


def test_bpf_cli_dumps_the_c_and_shows_and_removes_an_agent(lab_factory, datapaths):
    """`weft agent bpf dump` prints the C bcc compiles (maps already rewritten, flags
    on top); `status` reads a running agent's pins; `uninstall` removes them."""
    from typer.testing import CliRunner

    from agent.cli.bpf import app

    runner = CliRunner()
    out = runner.invoke(app, ["dump", "--flow-sample-ms", "250"])
    assert out.exit_code == 0, out.output
    assert "-DWEFT_FLOW_SAMPLE_NS=250000000ULL" in out.output
    assert "int weft_connect4(struct bpf_sock_addr *ctx)" in out.output
    assert "bpf_pseudo_fd(1," in out.output and '#include "lib/' not in out.output

    _lab, state = lab_factory(SMALL_LAB)
    client = state.pod("apps/client")
    dp = datapaths(state, "node-1")
    dp.attach_pod(client.cgroup, client.ip, strict=True, inbound_exception_ports=[15021])
    pin_root = str(dp.pin_root)
    out = runner.invoke(app, ["status", "--pin-root", pin_root, "-o", "json"])
    assert out.exit_code == 0, out.output
    doc = json.loads(out.output)
    [pod] = doc["pods"]
    assert (pod["ip"], pod["strict"], pod["inboundExceptionPorts"]) == (client.ip, True, [15021])
    assert set(doc["counters"]) == {c.name.lower() for c in Counter}

    refused_while_running = runner.invoke(app, ["uninstall", "--pin-root", pin_root])
    assert refused_while_running.exit_code != 0
    dp.stop()
    out = runner.invoke(app, ["uninstall", "--pin-root", pin_root])
    assert out.exit_code == 0, out.output
    assert f"detached 4 programs from {client.cgroup}" in out.output
    assert not Path(pin_root).exists() and weft_programs(client.cgroup) == {}


UDP_ECHO = """
import socket, sys
proto = socket.IPPROTO_UDPLITE if "udplite" in sys.argv else 0
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, proto)
s.bind(("0.0.0.0", int(sys.argv[1])))
while True:
    data, peer = s.recvfrom(2048)
    s.sendto(data, peer)
"""
UDP_CLIENT = """
import socket, sys
proto = socket.IPPROTO_UDPLITE if "udplite" in sys.argv else 0
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, proto)
if len(sys.argv) > 3 and sys.argv[3].isdigit():
    s.bind(("0.0.0.0", int(sys.argv[3])))
if "connect" in sys.argv:
    s.connect((sys.argv[1], int(sys.argv[2])))
s.settimeout(1.5)
try:
    s.sendto(b"ping", (sys.argv[1], int(sys.argv[2])))
    print(s.recvfrom(100)[0].decode())
except TimeoutError:
    print("timeout")
"""


def test_strict_pod_drops_udp_that_weft_does_not_mesh(lab_factory, datapaths):
    """Issue 14, STRICT for UDP: weft does not mesh UDP, so a STRICT pod's UDP server
    drops (and counts) datagrams from other pods instead of letting them around the mesh,
    UDP-Lite too, and sending from port 53 does not get around it. Replies on UDP sockets
    the pod connected, and DNS answers (source port 53) to a resolver's unconnected socket
    on an ephemeral port, still arrive; without STRICT everything arrives."""
    lab, state = lab_factory(SMALL_LAB)
    near, far = state.pod("ai/near"), state.pod("ai/far")
    lab.start_process(state, "udp-near", [sys.executable, "-c", UDP_ECHO, "5353"], pod="ai/near")
    lab.start_process(
        state, "udplite-near", [sys.executable, "-c", UDP_ECHO, "5356", "udplite"], pod="ai/near"
    )
    lab.start_process(state, "udp-far", [sys.executable, "-c", UDP_ECHO, "5354"], pod="ai/far")
    lab.start_process(state, "dns-far", [sys.executable, "-c", UDP_ECHO, "53"], pod="ai/far")
    dp = datapaths(state, "node-1")

    def udp(pod: str, ip: str, port: int, *extra: str) -> str:
        out = lab.run(pod, [sys.executable, "-c", UDP_CLIENT, ip, str(port), *extra], timeout=20)
        return out.stdout.decode().strip()

    for _ in range(20):  # the UDP servers starting
        if udp("ai/far", near.ip, 5353) == "ping" and udp("ai/near", far.ip, 5354) == "ping":
            break
    assert udp("ai/far", near.ip, 5353) == "ping"  # not STRICT yet: UDP arrives

    assert udp("ai/far", near.ip, 5356, "0", "udplite") == "ping"

    dp.attach_pod(near.cgroup, near.ip, strict=True)
    assert udp("ai/far", near.ip, 5353) == "timeout"
    assert dp.drop_counters()[(near.cgroup_id, DropReason.UDP_NOT_MESHED)] >= 1
    # Sending from port 53 to a server's port is no way around it, nor is UDP-Lite.
    assert udp("apps/client", near.ip, 5353, "53") == "timeout"
    assert udp("ai/far", near.ip, 5356, "0", "udplite") == "timeout"
    # A DNS answer to near's unconnected resolver socket (an ephemeral port), and a reply
    # on a socket near connected, still arrive.
    assert udp("ai/near", far.ip, 53) == "ping"
    assert udp("ai/near", far.ip, 5354, "0", "connect") == "ping"


SERVE6 = """
import socket, sys, threading
def tcp(port):
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind(("::", port)); s.listen(16)
    while True:
        c, peer = s.accept()
        c.sendall(f"peer {peer[0]}\\n".encode()); c.close()
def udp(port):
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind(("::", port))
    while True:
        data, peer = s.recvfrom(2048); s.sendto(data, peer)
for p in sys.argv[2:]:
    threading.Thread(target=tcp, args=(int(p),), daemon=True).start()
udp(int(sys.argv[1]))
"""
DIAL6 = """
import socket, sys
kind, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
try:
    if kind == "tcp":
        with socket.create_connection((host, port), timeout=1.5) as s:
            print(s.makefile().readline().strip())
    else:
        s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        if len(sys.argv) > 4:
            s.bind(("::", int(sys.argv[4])))
        s.settimeout(1.5)
        s.sendto(b"ping", (host, port))
        print(s.recvfrom(100)[0].decode())
except OSError as e:
    print(f"{type(e).__name__}")
"""


def test_strict_pod_drops_native_ipv6(lab_factory, datapaths):
    """Issue 14, STRICT for IPv6: weft meshes IPv4 only, so a STRICT pod drops (and counts
    as ipv6_not_meshed) native IPv6 to its listeners and unconnected UDP sockets from
    outside its network namespace: here from the node's own namespace over the pod's link,
    the one IPv6 path the lab has (ULA addresses, no duplicate address detection). The pod
    still reaches itself, a declared exception port still answers, and a DNS answer from
    port 53 to the pod's resolver socket still arrives; without STRICT everything does."""
    lab, state = lab_factory(SMALL_LAB)
    node = state.node("node-1")
    near = state.pod("ai/near")
    pod6, node6 = "fd77:1::2", "fd77:1::1"
    for netns, dev, addr in ((near.netns, "eth0", pod6), (node.netns, near.node_iface, node6)):
        subprocess.run(
            ["ip", "-n", netns, "-6", "addr", "add", f"{addr}/64", "dev", dev, "nodad"],
            check=True,
        )
    lab.start_process(
        state, "serve6", [sys.executable, "-c", SERVE6, "5355", "8000", "8081"], pod="ai/near"
    )
    dp = datapaths(state, "node-1")

    def dial(where: str, kind: str, port: int, *extra: str, to: str = pod6) -> str:
        argv = [sys.executable, "-c", DIAL6, kind, to, str(port), *extra]
        if where == "pod":
            out = lab.run("ai/near", argv, timeout=20)
        else:
            out = subprocess.run(
                ["ip", "netns", "exec", node.netns, *argv], capture_output=True, timeout=20
            )
        return out.stdout.decode().strip()

    wait_for(lambda: dial("node", "tcp", 8000) == f"peer {node6}", "the IPv6 server")
    assert dial("node", "udp", 5355) == "ping"  # not STRICT yet: IPv6 arrives

    dp.attach_pod(near.cgroup, near.ip, strict=True, inbound_exception_ports=[8081])
    assert dial("node", "tcp", 8000) == "TimeoutError"
    assert dial("node", "udp", 5355) == "TimeoutError"
    drops = dp.drop_counters()
    assert drops[(near.cgroup_id, DropReason.IPV6_NOT_MESHED)] >= 2
    # Sending from port 53 to a server's port is no way around it.
    assert dial("node", "udp", 5355, "53") == "TimeoutError"
    # What STRICT admits: the pod itself, a declared exception port, and a DNS answer to
    # the pod's own (unconnected, ephemeral-port) resolver socket.
    assert dial("pod", "tcp", 8000) == f"peer {pod6}"
    assert dial("pod", "udp", 5355) == "ping"
    assert dial("node", "tcp", 8081) == f"peer {node6}"
    resolver = subprocess.Popen(
        ["ip", "netns", "exec", node.netns, sys.executable, "-c", SERVE6, "53"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: dial("pod", "udp", 53, to=node6) == "ping", "a DNS answer over IPv6")
    finally:
        resolver.kill()
        resolver.wait()
    # IPv4 to the same listener is judged as before (not from the tunnel: dropped).
    assert refused(talk(lab, "apps/client", near.ip, 8000, "1"))


def test_a_redirected_connect_that_fails_leaves_no_original_destination_behind(
    lab_factory, datapaths
):
    """Issue 18: connects redirected while no tunnel listens (an agent restarting) are
    refused; their cookie-keyed original destinations are removed when the socket closes
    instead of staying in weft_origdst_cookie_v1 until LRU eviction."""
    lab, state = lab_factory(SMALL_LAB)
    client, far = state.pod("apps/client"), state.pod("ai/far")
    dp = datapaths(state, "node-1")
    dp.attach_pod(client.cgroup, client.ip)
    before = dp.counters()
    for _ in range(5):
        out = talk(lab, "apps/client", far.ip, 8000)
        assert out.returncode != 0 and b"refused" in out.stderr.lower(), out.stderr[-300:]
    assert delta(dp.counters(), before, Counter.REDIRECTED) == 5
    wait_for(
        lambda: not dp._map("weft_origdst_cookie_v1").all_keys(),
        "the refused connects' original destinations to be removed",
    )


RAW_LISTEN = """
import select, socket, sys, time
r = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)
grace = float(sys.argv[1])
print("ready", flush=True)
# Until stdin says the sender has finished there is no deadline (a slow machine starts the
# sender late); from then on, `grace` seconds for a segment still on its way.
deadline = None
while deadline is None or time.monotonic() < deadline:
    wait = None if deadline is None else max(0.0, deadline - time.monotonic())
    ready, _, _ = select.select([r] if deadline else [r, sys.stdin], [], [], wait)
    if sys.stdin in ready:
        sys.stdin.readline()
        deadline = time.monotonic() + grace
    if r in ready:
        data, peer = r.recvfrom(4096)
        if b"RAWSECRET" in data:
            print("got", peer[0], flush=True)
            break
else:
    print("nothing", flush=True)
"""
RAW_SEND = """
import socket, sys
try:
    with socket.create_connection((sys.argv[1], 9999), timeout=1) as s:
        s.sendall(b"RAWSECRET")
except OSError:
    pass
r = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)
import struct
hdr = struct.pack("!HHIIBBHHH", 40001, 9999, 1, 0, 5 << 4, 0x18, 1024, 0, 0)
r.sendto(hdr + b"RAWSECRET", (sys.argv[1], 0))
"""


def test_a_strict_pods_raw_tcp_socket_sees_no_unmeshed_segments(lab_factory, datapaths):
    """Issue 14: a raw socket bound to TCP in a pod receives every TCP segment addressed to
    the pod, the ones STRICT drops for its real sockets too. STRICT applies the same rule
    to raw sockets (the pod itself, loopback, exception ports), counted as
    protocol_not_meshed; without STRICT the segment arrives."""
    lab, state = lab_factory(SMALL_LAB)
    near = state.pod("ai/near")
    dp = datapaths(state, "node-1")

    def attempt(grace: float) -> str:
        """What a raw socket in near saw of a segment from far; it gives up `grace` seconds
        after the sender has finished without the segment."""
        listener = spawn(
            [sys.executable, "-c", RAW_LISTEN, str(grace)],
            netns=near.netns,
            cgroup=Path(near.cgroup),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert listener.stdout is not None
        assert listener.stdout.readline() == b"ready\n"  # the socket is open: send now
        lab.run("ai/far", [sys.executable, "-c", RAW_SEND, near.ip], timeout=20)
        out, _ = listener.communicate(b"sent\n", timeout=40)  # the window starts now
        return out.decode().strip()

    # Not STRICT: the raw socket sees it.
    assert attempt(10).startswith("got ")
    dp.attach_pod(near.cgroup, near.ip, strict=True)
    assert attempt(2) == "nothing"
    assert dp.drop_counters()[(near.cgroup_id, DropReason.PROTOCOL_NOT_MESHED)] >= 1
