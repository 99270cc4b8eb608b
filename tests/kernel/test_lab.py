"""The lab on the real kernel: pods reach each other across and within nodes, exec passes
stdio and exit codes through, and `down` leaves nothing behind. Needs root."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent import cgroups
from agent.lab.topology import Lab
from agent.netns import call_in
from tests.conftest import SMALL_LAB

pytestmark = pytest.mark.kernel

CLIENT = """
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
s.sendall(b"hello weft")
s.shutdown(socket.SHUT_WR)
print(s.makefile().read(), end="")
"""


def wait_listening(netns: str, ip: str, port: int, timeout: float = 10.0) -> None:
    import socket

    def probe() -> bool:
        try:
            socket.create_connection((ip, port), timeout=0.5).close()
            return True
        except OSError:
            return False

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if call_in(netns, probe):
            return
        time.sleep(0.05)
    raise TimeoutError(f"{ip}:{port} is not listening in {netns}")


def start_echo(lab: Lab, state, pod: str, port: int = 8000):
    p = state.pod(pod)
    lab.start_process(
        state,
        f"echo-{p.name}",
        [sys.executable, "-m", "agent.lab.workloads.echo", "--port", str(port), "--greet"],
        pod=pod,
    )
    wait_listening(p.netns, p.ip, port)
    return p


@pytest.mark.parametrize("target", ["ai/far", "ai/near"], ids=["cross-node", "same-node"])
def test_pod_to_pod_tcp(lab_factory, target):
    lab, state = lab_factory(SMALL_LAB)
    server = start_echo(lab, state, target)
    client = state.pod("apps/client")
    out = lab.run("apps/client", [sys.executable, "-c", CLIENT, server.ip, "8000"])
    assert out.returncode == 0, out.stderr.decode()
    greeting, echoed = out.stdout.decode().split("\n", 1)
    # The server saw the client's own pod address: no NAT on the lab's paths.
    assert greeting.startswith(f"peer {client.ip}:")
    assert echoed == "hello weft"


def test_exec_passes_stdio_and_exit_code(lab_factory):
    lab, state = lab_factory(SMALL_LAB)
    out = lab.run(
        "client", ["sh", "-c", "cat; ip -4 -o addr show dev eth0; exit 7"], input=b"stdin-ok\n"
    )
    assert out.returncode == 7
    text = out.stdout.decode()
    assert text.startswith("stdin-ok\n") and state.pod("client").ip + "/32" in text
    own = Path("/proc/self/cgroup").read_text()
    # The command ran in the pod's cgroup, not ours.
    cg = lab.run("client", ["cat", "/proc/self/cgroup"]).stdout.decode()
    assert "pods/apps_client" in cg and cg != own


def test_cli_exec_and_status(lab_factory):
    lab, _ = lab_factory(SMALL_LAB)
    weft = [sys.executable, "-m", "agent.cli"]
    env = {**os.environ, "WEFT_LAB": lab.name}
    out = subprocess.run(
        [*weft, "lab", "exec", "near", "--", "sh", "-c", "echo hi; exit 3"],
        capture_output=True,
        env=env,
        timeout=30,
    )
    assert out.returncode == 3 and out.stdout == b"hi\n"
    status = subprocess.run(
        [*weft, "lab", "status", "-o", "json"], capture_output=True, env=env, check=True, timeout=30
    )
    import json

    doc = json.loads(status.stdout)
    assert {p["name"]: p["node"] for p in doc["pods"]} == {
        "client": "node-1",
        "near": "node-1",
        "far": "node-2",
    }
    assert all(Path(p["cgroup"]).is_dir() for p in doc["pods"])


def test_down_leaves_nothing_and_is_idempotent(lab_factory):
    lab, state = lab_factory(SMALL_LAB)
    start_echo(lab, state, "ai/far")
    pid = state.processes[0].pid
    bpffs = lab.bpffs
    bpffs.mkdir(parents=True, exist_ok=True)  # stands in for the agent's pins
    lab.down()
    assert not [n for n in os.listdir("/var/run/netns") if n.startswith(lab.name + "_")]
    assert not (cgroups.cgroup2_root() / "weft" / lab.name).exists()
    assert not bpffs.exists() and not lab.run_dir.exists()
    assert not Path(f"/proc/{pid}").exists() or _zombie(pid)
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert not [p.node_iface for p in state.pods if p.node_iface in links]
    lab.down()  # harmless the second time


def test_up_after_a_crash_cleans_leftovers(lab_factory):
    lab, state = lab_factory(SMALL_LAB)
    lab.state_file.unlink()  # as if the process that made it died without saving
    plan_text = SMALL_LAB.replace("__LAB__", lab.name)
    from agent.lab.manifest import plan
    from controller.model.yamldoc import load_documents

    again = lab.up(plan(load_documents(plan_text, "lab.yaml")[0]))
    assert [p.ip for p in again.pods] == [p.ip for p in state.pods]


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except FileNotFoundError:
        return True
