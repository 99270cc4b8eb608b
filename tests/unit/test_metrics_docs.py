"""Every metric family the agent, the waypoint and the controller export is documented in
docs/metrics.md, and the exposition passes `promtool check metrics` (Prometheus' own
linter) except for the names Istio and OpenTelemetry fix, listed below as deliberate."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import uvloop
from prometheus_client import CollectorRegistry, generate_latest

from tests.unit.waypoint_mesh import Backend, WaypointMesh

ROOT = Path(__file__).resolve().parents[2]
DOCS = (ROOT / "docs" / "metrics.md").read_text()

# Names we keep as others define them: Istio's standard metrics (dashboards and alerts
# written for Istio work unchanged) and OpenTelemetry's GenAI semantic conventions (no unit
# suffix: the conventions name them so, and a Collector would add its own).
DELIBERATE = re.compile(r"^(istio_|gen_ai_)")

AI = """\
apiVersion: weft.dev/v1alpha1
kind: TokenRateLimit
metadata: {name: t, namespace: ai}
spec:
  targetRefs: [{name: llm}]
  limits: [{name: rpm, by: principal, requestsPerMinute: 100}]
---
apiVersion: weft.dev/v1alpha1
kind: ResponseCache
metadata: {name: c, namespace: ai}
spec: {targetRefs: [{name: llm}]}
"""


def documented() -> set[str]:
    return set(re.findall(r"^\| `([a-z_:][a-z0-9_:]*)`", DOCS, re.M))


def families(registry: CollectorRegistry) -> dict[str, str]:
    """Exposed family name (counters with _total, as scraped) -> type."""
    out = {}
    for fam in registry.collect():
        name = fam.name + "_total" if fam.type == "counter" else fam.name
        out[name] = fam.type
    return out


def agent_registry(tmp_path: Path) -> CollectorRegistry:
    from agent.main import Agent
    from agent.settings import AgentSettings

    a = Agent(
        AgentSettings(
            node="node-1",
            node_ip="10.0.0.11",
            state_dir=tmp_path / "state",
            workload_socket=None,
        )
    )
    return a.registry


def controller_registry() -> CollectorRegistry:
    from controller.server import ControllerMetrics

    r = CollectorRegistry()
    ControllerMetrics(r)
    return r


@pytest.fixture(scope="module")
def waypoint_text(tmp_path_factory: pytest.TempPathFactory) -> tuple[CollectorRegistry, str]:
    """A waypoint's registry after AI traffic (its collectors report what has been used)."""
    out: list[tuple[CollectorRegistry, str]] = []

    async def main() -> None:
        backends = [Backend("llm-a", app="llm", model="llama")]
        async with WaypointMesh(
            tmp_path_factory.mktemp("wp"), backends=backends, extra={"ai.yaml": AI}
        ) as m:
            body = b'{"model": "llama", "messages": [{"role": "user", "content": "hi"}]}'
            r = await m.http("POST", "/v1/chat/completions", body)
            assert r.status == 200, r
            reg = m.waypoint.metrics.registry
            out.append((reg, generate_latest(reg).decode()))

    uvloop.run(main())
    return out[0]


def test_every_exported_family_is_documented(tmp_path, waypoint_text) -> None:
    names: dict[str, str] = {}
    for reg in (agent_registry(tmp_path), controller_registry(), waypoint_text[0]):
        names.update(families(reg))
    missing = sorted(n for n in names if n not in documented())
    assert not missing, f"not in docs/metrics.md: {missing}"


def test_the_exposition_passes_promtool_but_for_istio_and_otel_names(tmp_path, waypoint_text):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (make setup installs Debian's prometheus)")
    texts = [
        generate_latest(agent_registry(tmp_path)).decode(),
        generate_latest(controller_registry()).decode(),
        waypoint_text[1],
    ]
    problems = []
    for text in texts:
        r = subprocess.run(
            [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
        )
        for line in (r.stdout + r.stderr).splitlines():
            name = line.split(" ", 1)[0]
            if line.strip() and not DELIBERATE.match(name):
                problems.append(line)
    assert not problems, "\n".join(problems)
