"""Shared test plumbing: the `kernel` marker and the lab fixture.

Kernel tests need root, network namespaces, cgroup v2 and (for eBPF) bpffs. Without them
they skip with the reason; with WEFT_REQUIRE_KERNEL=1 (set by .ci/run) a skip of a kernel
test is turned into a failure, so CI can never pass with the data path untested.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

REQUIRE_KERNEL = os.environ.get("WEFT_REQUIRE_KERNEL") == "1"

# The `redis_server` fixture: a real redis-server on loopback (tests/redis_server.py).
pytest_plugins = ["tests.redis_server"]


def pytest_sessionstart(session: pytest.Session) -> None:
    """Refuse to test old code: an extension built before its source was edited would be
    what the tests import (agent/compiled.py)."""
    from agent import compiled

    if old := compiled.stale():
        pytest.exit(
            f"compiled modules older than their source: {', '.join(old)}; run `make compiled`", 2
        )


def kernel_unavailable() -> str | None:
    """Why kernel tests cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, cgroups, eBPF)"
    if not Path("/proc/self/ns/net").exists():
        return "no network namespace support"
    try:
        from agent.cgroups import cgroup2_root

        cgroup2_root()
    except Exception as e:
        return f"no cgroup v2: {e}"
    if shutil.which("ip") is None:
        return "iproute2 is not installed (make setup installs it)"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = kernel_unavailable()
    if reason is None:
        return
    for item in items:
        if "kernel" in item.keywords:
            if REQUIRE_KERNEL:
                item.user_properties.append(("kernel_missing", reason))
            else:
                item.add_marker(pytest.mark.skip(reason=f"kernel test: {reason}"))


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    missing = dict(item.user_properties).get("kernel_missing")
    if missing:
        pytest.fail(f"WEFT_REQUIRE_KERNEL=1 but kernel tests cannot run: {missing}", pytrace=False)


# Two nodes, two pods on node-1 and one on node-2: enough for cross-node and same-node paths.
SMALL_LAB = """
apiVersion: weft.dev/v1alpha1
kind: Lab
metadata: {name: __LAB__}
spec:
  nodes: [{name: node-1}, {name: node-2}]
  namespaces:
    - {name: apps, labels: {weft.dev/mesh: enabled}}
    - {name: ai, labels: {weft.dev/mesh: enabled}}
  pods:
    - {name: client, namespace: apps, node: node-1, serviceAccount: client, labels: {app: client}}
    - {name: near, namespace: ai, node: node-1, serviceAccount: model, labels: {app: model}}
    - {name: far, namespace: ai, node: node-2, serviceAccount: model, labels: {app: model}}
  services:
    - {name: model, namespace: ai, selector: {app: model}, ports: [{port: 8000}]}
"""


def unique_lab_name(prefix: str = "t") -> str:
    # Short and unique so parallel runs on one machine never share a netns or cgroup.
    return f"{prefix}{uuid.uuid4().hex[:8]}"


@pytest.fixture
def lab_name() -> str:
    return unique_lab_name()


@pytest.fixture
def lab_factory(request: pytest.FixtureRequest) -> Iterator[object]:
    """Build labs from manifest text; every lab made is torn down, even on failure.

    On failure the logs of every lab process are attached to the report first.
    """
    from agent.lab.manifest import plan
    from agent.lab.topology import Lab
    from controller.model.yamldoc import load_documents

    made: list[Lab] = []

    def make(manifest: str) -> tuple[Lab, object]:
        name = unique_lab_name()
        text = manifest.replace("__LAB__", name)
        p = plan(load_documents(text, "test-lab.yaml")[0])
        lab = Lab(name)
        made.append(lab)
        return lab, lab.up(p)

    yield make
    failed = getattr(request.node, "rep_call", None)
    for lab in made:
        if failed is not None and failed.failed and lab.exists():
            for proc in lab.state().processes:
                log = Path(proc.log)
                if log.exists():
                    tail = log.read_text(errors="replace")[-4000:]
                    request.node.add_report_section("call", f"log {proc.name}", tail)
        lab.down()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    rep = outcome.get_result()  # type: ignore[attr-defined]
    setattr(item, f"rep_{rep.when}", rep)
