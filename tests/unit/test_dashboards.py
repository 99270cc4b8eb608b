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
# Label names (gen_ai_request_model) look like metric names: drop matchers and groupings.
LABEL_PARTS = re.compile(r"\{[^}]*\}|\b(?:by|without)\s*\([^)]*\)")


def metrics_in(expr: str) -> set[str]:
    return set(METRIC.findall(LABEL_PARTS.sub(" ", expr)))


def exported() -> set[str]:
    """Every sample name the agent, tunnel, waypoint and controller registries can expose."""
    from agent.main import Agent
    from agent.settings import AgentSettings
    from agent.waypoint.server import Waypoint, WaypointSettings
    from controller.server import ControllerMetrics

    # A real Waypoint: its registry holds the HTTP, engine, GenAI and AI policy metrics.
    wp = Waypoint(
        WaypointSettings(
            name="w", listen="127.0.0.1:0", workload_socket=Path("/nonexistent"), access_log="off"
        )
    )
    registries = [Agent(AgentSettings(node="n", node_ip="10.0.0.1")).registry, wp.metrics.registry]
    r = CollectorRegistry()
    ControllerMetrics(r)
    registries.append(r)
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
            unknown = {m for m in metrics_in(expr) if m not in known}
            assert not unknown, f"{path.name} / {p['title']}: not exported: {unknown}"


def test_dashboard_uids_are_unique() -> None:
    uids = [json.loads(p.read_text())["uid"] for p in DASHBOARDS]
    assert len(uids) == len(set(uids))


def test_the_ai_dashboard_covers_genai_and_ai_policy_metrics() -> None:
    doc = json.loads((ROOT / "helm/weft/files/dashboards/weft-ai.json").read_text())
    used = {m for p in doc["panels"] for t in p["targets"] for m in metrics_in(t["expr"])}
    for family in (
        "gen_ai_client_token_usage",
        "gen_ai_server_time_to_first_token",
        "gen_ai_server_time_per_output_token",
        "gen_ai_server_request_duration",
        "weft_ai_ratelimit_decisions",
        "weft_ai_priority_requests",
        "weft_ai_cache_lookups",
        "weft_ai_rollout_canary_weight",
    ):
        assert any(m.startswith(family) for m in used), family


def test_label_names_are_not_mistaken_for_metrics() -> None:
    expr = 'sum by (gen_ai_request_model) (rate(gen_ai_x_count{gen_ai_token_type="in"}[1m]))'
    assert metrics_in(expr) == {"gen_ai_x_count"}
