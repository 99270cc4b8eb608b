"""Fixtures for tests that need the whole mesh on the lab: controller, agents, eBPF."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.lab import mesh
from agent.lab.manifest import plan
from agent.lab.topology import Lab, LabState
from agent.netns import call_in
from controller.model.yamldoc import load_documents
from tests.conftest import unique_lab_name

# node-1: client, batch, near; node-2: far, far2; legacy pods are outside the mesh.
MESH_LAB = """
apiVersion: weft.dev/v1alpha1
kind: Lab
metadata: {name: __LAB__}
spec:
  nodes: [{name: node-1}, {name: node-2}]
  namespaces:
    - {name: apps, labels: {weft.dev/mesh: enabled}}
    - {name: ai, labels: {weft.dev/mesh: enabled}}
    - {name: legacy}
  pods:
    - {name: client, namespace: apps, node: node-1, serviceAccount: client, labels: {app: client}}
    - {name: batch, namespace: apps, node: node-1, serviceAccount: batch, labels: {app: batch}}
    - {name: near, namespace: ai, node: node-1, serviceAccount: model, labels: {app: near}}
    - {name: far, namespace: ai, node: node-2, serviceAccount: model, labels: {app: far},
       readinessProbe: {tcpSocket: {port: 8081}}}
    - {name: far2, namespace: ai, node: node-2, serviceAccount: other, labels: {app: far2}}
    - {name: old1, namespace: legacy, node: node-1, labels: {app: old1}}
    - {name: old2, namespace: legacy, node: node-2, labels: {app: old2}}
  services:
    - {name: near, namespace: ai, selector: {app: near}, ports: [{port: 8000}]}
    - {name: far, namespace: ai, selector: {app: far}, ports: [{port: 80, targetPort: 8000}]}
"""


@dataclass
class Mesh:
    lab: Lab
    state: LabState

    def ip(self, pod: str) -> str:
        return self.state.pod(pod).ip

    def admin(self, node: str, path: str) -> Any:
        return mesh.admin_get(mesh.admin_socket(self.state, node), path)

    def start_server(self, pod: str, *args: str, port: int = 8000) -> None:
        name = f"srv-{pod.replace('/', '-')}-{port}"
        self.lab.start_process(
            self.state,
            name,
            [sys.executable, "-m", "agent.lab.workloads.echo", "--port", str(port), *args],
            pod=pod,
        )
        self.wait_listening(pod, port)

    def run(self, pod: str, code: str, *args: str, timeout: float = 60) -> Any:
        return self.lab.run(pod, [sys.executable, "-c", code, *args], timeout=timeout)

    def access_log(self, process: str) -> list[dict[str, Any]]:
        """A lab process's access log records, oldest first (the rotated file, then the
        current one; mesh.access_log_path)."""
        path = mesh.access_log_path(self.state, process)
        lines: list[str] = []
        for p in (path.with_name(path.name + ".1"), path):
            if p.exists():
                lines += p.read_text(errors="replace").splitlines()
        return [json.loads(x) for x in lines if is_access_line(x)]

    def wait_listening(self, pod: str, port: int = 8000) -> None:
        p = self.state.pod(pod)
        wait_until(lambda: call_in(p.netns, _listening, p.ip, port), f"{pod}:{port} listening")

    def vip(self, service: str = "llm") -> str:
        return next(s["clusterIP"] for s in self.state.services if s["name"] == service)

    def llm_client(
        self, pod: str = "apps/client", *args: str, n: int = 1, timeout: float = 300
    ) -> list[dict[str, Any]]:
        """`n` requests from `pod` to the llm Service with agent.lab.workloads.llm_client;
        one JSON result per request (status, headers, body fields)."""
        argv = [sys.executable, "-m", "agent.lab.workloads.llm_client", f"http://{self.vip()}:8000"]
        out = self.lab.run(pod, [*argv, "-n", str(n), "--all-headers", *args], timeout=timeout)
        assert out.returncode == 0, out.stderr.decode()[-2000:]
        return [json.loads(line) for line in out.stdout.decode().splitlines() if line.strip()]

    def config_file(self, name: str) -> Path:
        return mesh.paths(self.state)["config"] / name

    def apply(self, name: str, text: str) -> None:
        """Write a policy file where the controller reads config; wait until both agents
        run the revision that contains it."""
        f = self.config_file(name)
        if f.exists() and f.read_text() == text:
            return  # unchanged: the controller publishes no new revision for it
        f.write_text(text)
        self._settle()

    def remove(self, name: str) -> None:
        f = self.config_file(name)
        if f.exists():
            f.unlink()
            self._settle()

    def _settle(self) -> None:
        # The controller's revision once it has scanned; then every agent's.
        before = [self.admin(n.name, "/config")["revision"] for n in self.state.nodes]
        wait_until(
            lambda: any(
                self.admin(n.name, "/config")["revision"] > r
                for n, r in zip(self.state.nodes, before, strict=True)
            ),
            "the controller to publish a new revision",
            10,
        )
        target = max(self.admin(n.name, "/config")["revision"] for n in self.state.nodes)
        wait_until(
            lambda: all(
                self.admin(n.name, "/config")["revision"] >= target for n in self.state.nodes
            ),
            "agents to apply it",
            10,
        )
        wait_until(
            lambda: all(r >= target for r in self.waypoint_revisions()), "waypoints to apply it", 10
        )

    def waypoint_revisions(self) -> list[int]:
        """Config revision of every waypoint pod (they follow their node agent)."""
        import urllib.request

        from controller.model.workloads import WAYPOINT_LABEL

        out = []
        for p in self.state.pods:
            if WAYPOINT_LABEL not in p.labels:
                continue

            def get(ip: str = p.ip) -> int:
                with urllib.request.urlopen(f"http://{ip}:15020/config", timeout=5) as r:
                    return int(json.loads(r.read())["revision"])

            out.append(call_in(p.netns, get))
        return out


def is_access_line(line: str) -> bool:
    """Access log records (agent/accesslog.py) are JSON objects that start with the time."""
    return line.startswith('{"time"')


def _listening(ip: str, port: int) -> bool:
    import socket

    try:
        socket.create_connection((ip, port), timeout=0.5).close()
        return True
    except OSError:
        return False


def wait_until(check: Callable[[], object], what: str, timeout: float = 10.0) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = check()
        if v:
            return v
        time.sleep(0.05)
    raise TimeoutError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def meshed(request: pytest.FixtureRequest) -> Iterator[Mesh]:
    """One lab with the controller and an agent per node, shared by a test module.

    Torn down after the module whatever happens; when a test failed, every lab process's
    log tail is printed (pytest shows it with the failure report)."""
    yield from build_mesh(request, MESH_LAB)


def build_mesh(
    request: pytest.FixtureRequest,
    manifest: str,
    before_install: Callable[[Lab, LabState], dict[str, str]] | None = None,
) -> Iterator[Mesh]:
    """Build a lab from `manifest`, install the mesh, yield it, always tear it down.

    `before_install` may start helper processes (a trace sink) and return environment
    variables for the mesh's processes."""
    name = unique_lab_name("m")
    lab = Lab(name)
    failed_before = request.session.testsfailed
    try:
        state = lab.up(plan(load_documents(manifest.replace("__LAB__", name), "mesh.yaml")[0]))
        env = before_install(lab, state) if before_install else None
        mesh.install(lab, state, wait=90, extra_env=env)
        yield Mesh(lab, lab.state())
    finally:
        if request.session.testsfailed > failed_before and lab.exists():
            for proc in lab.state().processes:
                log = Path(proc.log)
                if log.exists():
                    # Access log lines (JSON) would crowd out the diagnostics: count them.
                    lines = log.read_text(errors="replace").splitlines()
                    access = sum(1 for x in lines if is_access_line(x))
                    rest = "\n".join(x for x in lines if not is_access_line(x))
                    alog = mesh.access_log_path(lab.state(), proc.name)
                    if alog.exists():
                        access += len(alog.read_text(errors="replace").splitlines())
                    head = f"{proc.name} ({log}; {access} access log lines)"
                    sys.stderr.write(f"\n==== {head} ====\n")
                    sys.stderr.write(rest[-6000:])
        lab.down()


def weft(m: Mesh, *args: str, ok: bool = True, stdin: str | None = None) -> Any:
    """Run the `weft` CLI against the lab of `m`; with `ok`, it must succeed."""
    env = {**os.environ, "WEFT_LAB": m.lab.name}
    out = subprocess.run(
        [sys.executable, "-m", "agent.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        input=stdin,
    )
    if ok:
        assert out.returncode == 0, out.stderr
    return out


def weft_json(m: Mesh, *args: str) -> Any:
    return json.loads(weft(m, *args, "-o", "json").stdout)


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels` (Prometheus text)."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def dumps(x: Any) -> str:
    return json.dumps(x, indent=1, default=str)
