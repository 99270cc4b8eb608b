"""Crafted packets against the mesh (issue 14, the attack suite's packet half): raw
sockets and scapy, so nothing goes through a socket API the capture programs hook.

Each attack sends TCP SYNs to the STRICT pod ai/far (node-2) and watches far's own link
with a packet socket: a spoofed source must never arrive there (the node's reverse-path
filter drops it at the sender's node), and a source that does arrive must never be
answered (STRICT drops it before the listener; no SYN-ACK leaves far). The meshed tunnel
path to the same port keeps working throughout."""

from __future__ import annotations

import random
import socket
import struct
import threading
import time
from collections.abc import Iterator

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether

from agent.netns import call_in
from tests.kernel.conftest import MESH_LAB, Mesh, build_mesh, wait_until

pytestmark = pytest.mark.kernel

ETH_P_ALL = 0x0003
PORT = 8000


@pytest.fixture(scope="module")
def mesh(request: pytest.FixtureRequest) -> Iterator[Mesh]:
    for m in build_mesh(request, MESH_LAB):
        m.start_server("ai/far", "--greet")
        yield m


class Watch:
    """A packet socket on a pod's eth0 (in its netns): every TCP segment seen, parsed."""

    def __init__(self, netns: str) -> None:
        self.netns = netns
        self.seen: list[tuple[str, str, int, int, str]] = []  # src, dst, sport, dport, flags
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=lambda: call_in(netns, self._run), daemon=True)

    def __enter__(self) -> Watch:
        self._thread.start()
        assert self._ready.wait(5)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        s.bind(("eth0", 0))
        s.settimeout(0.2)
        self._ready.set()
        try:
            while not self._stop.is_set():
                try:
                    frame = s.recv(65535)
                except TimeoutError:
                    continue
                pkt = Ether(frame)
                if IP in pkt and TCP in pkt:
                    ip, tcp = pkt[IP], pkt[TCP]
                    self.seen.append((ip.src, ip.dst, tcp.sport, tcp.dport, str(tcp.flags)))
        finally:
            s.close()


def raw_syn(m: Mesh, pod: str, src: str, dst: str, sport: int) -> None:
    """Send one hand-made SYN from inside `pod`'s netns, source address `src` (spoofed or
    not), through a raw IP socket: no connect(), so no capture hook sees it."""
    pkt = bytes(IP(src=src, dst=dst, ttl=64) / TCP(sport=sport, dport=PORT, flags="S", seq=1))

    def send() -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        try:
            s.setsockopt(socket.IPPROTO_IP, socket.IP_HDRINCL, 1)
            for _ in range(3):  # a SYN and two retransmissions
                s.sendto(pkt, (dst, 0))
                time.sleep(0.2)
        finally:
            s.close()

    call_in(m.state.pod(pod).netns, send)


def _sport() -> int:
    return random.randint(40000, 60000)


@pytest.mark.parametrize(
    ("attacker", "spoofed_as"),
    [
        ("legacy/old1", "node-2"),  # an unmeshed pod claims to be node-2's tunnel
        ("apps/batch", "apps/client"),  # a meshed pod claims another pod's address
        ("legacy/old1", "ai/far2"),  # ... a pod on the destination's own node
    ],
)
def test_spoofed_sources_never_reach_the_pod(mesh: Mesh, attacker: str, spoofed_as: str) -> None:
    """A raw SYN with a source address that is not the sender's is dropped at the sender's
    node by the reverse-path filter: it never appears on the destination pod's link."""
    src = mesh.state.node(spoofed_as).ip if spoofed_as.startswith("node-") else mesh.ip(spoofed_as)
    far = mesh.ip("ai/far")
    sport = _sport()
    with Watch(mesh.state.pod("ai/far").netns) as w:
        raw_syn(mesh, attacker, src, far, sport)
        time.sleep(0.5)
    assert not [p for p in w.seen if p[0] == src and p[2] == sport], w.seen


@pytest.mark.parametrize("attacker", ["legacy/old1", "apps/batch"])
def test_raw_syns_around_the_capture_are_never_answered(mesh: Mesh, attacker: str) -> None:
    """A raw SYN with the sender's own address (an unmeshed pod, or a meshed pod that uses
    a raw socket so that no capture hook runs) does reach far's link, and STRICT drops it
    before the listener: no SYN-ACK ever leaves far for it, and the drop is counted. The
    tunnel's own connections to far keep being answered."""
    src, far = mesh.ip(attacker), mesh.ip("ai/far")
    sport = _sport()
    before = sum(d["count"] for d in mesh.admin("node-2", "/datapath")["drops"])
    w = Watch(mesh.state.pod("ai/far").netns)

    def syns() -> list[tuple[str, str, int, int, str]]:
        return [p for p in list(w.seen) if p[0] == src and p[2] == sport and p[4] == "S"]

    with w:
        raw_syn(mesh, attacker, src, far, sport)
        # Until the watcher, however far behind, has seen the SYN; then half a second more
        # for an answer to show, as before.
        wait_until(syns, "the SYN to reach far's link")
        time.sleep(0.5)
    arrived = syns()
    answered = [p for p in w.seen if p[1] == src and p[3] == sport and "SA" in p[4]]
    assert arrived, "the SYN should reach far's link (to be dropped there)"
    assert not answered, answered
    after = sum(d["count"] for d in mesh.admin("node-2", "/datapath")["drops"])
    assert after > before
    # Meanwhile the mesh path is answered as always (the greeting names node-2's tunnel).
    out = mesh.run(
        "apps/client",
        "import socket,sys; s=socket.create_connection((sys.argv[1], 8000), timeout=5);"
        "print(s.makefile().readline().strip())",
        far,
    )
    assert out.stdout.decode().startswith(f"peer {mesh.state.node('node-2').ip}:"), out


def test_a_hand_made_hbone_connect_in_plaintext_gets_nothing(mesh: Mesh) -> None:
    """An HTTP/2 CONNECT written by hand to node-2's HBONE port without TLS (scapy-level
    bytes over a plain TCP connection from an unmeshed pod) is not a stream: the tunnel
    requires mutual TLS before it reads any HTTP/2, and nothing reaches far."""
    node2 = mesh.state.node("node-2").ip
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    settings = struct.pack(">I", 0)[1:] + bytes([4, 0]) + struct.pack(">I", 0)

    def attempt() -> bytes:
        with socket.create_connection((node2, 15008), timeout=5) as s:
            s.sendall(preface + settings)
            s.settimeout(3)
            try:
                return s.recv(4096)
            except (TimeoutError, ConnectionError):
                return b""

    with Watch(mesh.state.pod("ai/far").netns) as w:
        got = call_in(mesh.state.pod("legacy/old1").netns, attempt)
        time.sleep(0.3)
    # Whatever came back is a TLS alert or nothing: never an HTTP/2 frame or a 200.
    assert b"HTTP" not in got and not got.startswith(b"\x00\x00"), got
    assert not [p for p in w.seen if p[3] == PORT and p[4] == "S"], w.seen
