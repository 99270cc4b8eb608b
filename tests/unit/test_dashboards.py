"""The Grafana dashboards shipped in the chart query only metrics weft really exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = sorted((ROOT / "helm/weft/files/dashboards").glob("*.json"))
METRIC = re.compile(r"\b((?:istio|weft|gen_ai)_[a-z0-9_]+)\b")


def exported() -> set[str]:
    """Every sample name the agent, tunnel, waypoint and controller registries can expose."""
    from agent.main import Agent
    from agent.settings import AgentSettings
    from agent.waypoint.server import WaypointMetrics
    from controller.server import ControllerMetrics

    registries = [
        Agent(AgentSettings(node="n", node_ip="10.0.0.1")).registry,
        WaypointMetrics().registry,
    ]
    r = CollectorRegistry()
    ControllerMetrics(r)
    registries.append(r)
    try:
        from agent.waypoint.ai import genai

        registries.append(genai.GenAIMetrics().registry)  # type: ignore[attr-defined]
    except (ImportError, AttributeError):
        pass
    names: set[str] = set()
    for reg in registries:
        for fam in reg.collect():
            names.add(fam.name)
            for suffix in ("_total", "_bucket", "_sum", "_count", "_created"):
                names.add(fam.name + suffix)
    return names


@pytest.mark.parametrize("path", DASHBOARDS, ids=[p.name for p in DASHBOARDS])
def test_dashboard_is_valid_and_uses_real_metrics(path: Path) -> None:
    doc = json.loads(path.read_text())
    assert doc["uid"] and doc["title"] and doc["panels"]
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    known = exported()
    for p in doc["panels"]:
        for t in p["targets"]:
            expr = t["expr"]
            assert expr.count("(") == expr.count(")"), f"{p['title']}: unbalanced {expr}"
            unknown = {m for m in METRIC.findall(expr) if m not in known}
            assert not unknown, f"{path.name} / {p['title']}: not exported: {unknown}"


def test_dashboard_uids_are_unique() -> None:
    uids = [json.loads(p.read_text())["uid"] for p in DASHBOARDS]
    assert len(uids) == len(set(uids))
