"""Every `weft` command against a live lab mesh, checking its JSON output. Needs root."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from tests.kernel.conftest import Mesh, wait_until, weft, weft_json

pytestmark = pytest.mark.kernel


POLICY = textwrap.dedent("""\
    apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: {name: far-callers, namespace: ai}
    spec:
      selector: {matchLabels: {app: far}}
      rules: [{from: [{source: {namespaces: [apps]}}]}]
    """)


def test_policy_validate_is_offline_and_precise(meshed: Mesh, tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(POLICY)
    doc = weft_json(meshed, "policy", "validate", "-f", str(good))
    assert doc["valid"] == [
        {"kind": "AuthorizationPolicy", "namespace": "ai", "name": "far-callers", "valid": True}
    ]
    bad = tmp_path / "bad.yaml"
    bad.write_text(POLICY.replace("namespaces: [apps]", "namespaces: apps"))
    out = weft(meshed, "policy", "validate", "-f", str(bad), "-o", "json", ok=False)
    assert out.returncode == 2
    (p,) = json.loads(out.stdout)["problems"]
    assert (p["file"], p["line"], p["field"]) == (
        str(bad),
        6,
        "spec.rules[0].from[0].source.namespaces",
    )


def test_policy_apply_get_delete(meshed: Mesh, tmp_path: Path) -> None:
    f = tmp_path / "p.yaml"
    f.write_text(POLICY)
    doc = weft_json(meshed, "policy", "apply", "-f", str(f))
    assert doc["applied"] == [
        {
            "kind": "AuthorizationPolicy",
            "namespace": "ai",
            "name": "far-callers",
            "action": "created",
        }
    ]
    got = weft_json(meshed, "policy", "get", "authorizationpolicies", "far-callers", "-n", "ai")
    assert got["spec"]["rules"][0]["from"][0]["source"]["namespaces"] == ["apps"]
    # It reaches every agent.
    wait_until(
        lambda: all(
            meshed.admin(n.name, "/config")["resources"].get("AuthorizationPolicy") == 1
            for n in meshed.state.nodes
        ),
        "agents to get it",
    )
    bad = weft(
        meshed,
        "policy",
        "apply",
        "-f",
        "-",
        ok=False,
        stdin=POLICY.replace("far-callers", "x").replace("spec:\n", "spec:\n  action: NO\n"),
    )

    assert bad.returncode == 2 and "spec.action" in bad.stderr
    assert "nothing was applied" in bad.stderr
    out = weft(meshed, "policy", "delete", "authorizationpolicy/ai/far-callers")
    assert "deleted" in out.stdout
    gone = weft(
        meshed,
        "policy",
        "get",
        "authorizationpolicies",
        "far-callers",
        "-n",
        "ai",
        "-o",
        "json",
        ok=False,
    )
    assert gone.returncode == 4


GHOST_L7 = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ghost, namespace: ai}
spec:
  targetRefs: [{kind: Service, group: "", name: far}]
  action: DENY
  rules: [{to: [{operation: {paths: ["/admin"]}}]}]
"""


def test_a_policy_enforced_nowhere_says_so(meshed: Mesh, tmp_path: Path) -> None:
    """Issue 14: an L7 policy on a Service without a waypoint is applied with a warning
    (NoWaypoint) and `weft policy get` shows its False condition, in the table and as
    status.conditions."""
    f = tmp_path / "ghost.yaml"
    f.write_text(GHOST_L7)
    try:
        out = weft(meshed, "policy", "apply", "-f", str(f))
        assert "NoWaypoint" in out.stderr and "enforced nowhere" in out.stderr
        table = weft(meshed, "policy", "get", "authorizationpolicies", "-n", "ai")
        assert any("ghost" in line and "NoWaypoint" in line for line in table.stdout.splitlines())
        doc = weft_json(meshed, "policy", "get", "authorizationpolicies", "ghost", "-n", "ai")
        conds = {c["type"]: (c["status"], c["reason"]) for c in doc["status"]["conditions"]}
        assert conds == {
            "ResolvedRefs": ("True", "ResolvedRefs"),
            "Accepted": ("False", "NoWaypoint"),
        }
    finally:
        weft(meshed, "policy", "delete", "authorizationpolicy/ai/ghost", ok=False)


def test_a_declared_waypoint_without_pods_says_so(meshed: Mesh) -> None:
    """`weft waypoint apply` (as istioctl's) declares a Gateway of class weft-waypoint; with
    no pod labelled weft.dev/waypoint for it, `weft waypoint list` and `weft policy get`
    say NoResources rather than showing a waypoint that exists."""
    try:
        gen = weft(meshed, "waypoint", "generate", "--name", "wp-ghost", "-n", "ai").stdout
        assert "gatewayClassName: weft-waypoint" in gen and "protocol: HBONE" in gen
        out = weft(meshed, "waypoint", "apply", "--name", "wp-ghost", "-n", "ai")
        assert "waypoint ai/wp-ghost applied" in out.stdout
        (row,) = [
            r for r in weft_json(meshed, "waypoint", "list", "-n", "ai") if r["name"] == "wp-ghost"
        ]
        assert (row["class"], row["ready"], row["status"]) == (
            "weft-waypoint",
            "0/0",
            "NoResources",
        )
        doc = weft_json(meshed, "policy", "get", "gateway", "wp-ghost", "-n", "ai")
        conds = {c["type"]: (c["status"], c["reason"]) for c in doc["status"]["conditions"]}
        assert conds == {"Accepted": ("True", "Accepted"), "Programmed": ("False", "NoResources")}
        bad = weft(meshed, "waypoint", "apply", "--name", "wp-ghost", "--for", "workload", ok=False)
        assert bad.returncode == 2 and "workload" in bad.stderr
    finally:
        weft(meshed, "policy", "delete", "gateway/ai/wp-ghost", ok=False)


def test_inspect_commands(meshed: Mesh) -> None:
    meshed.start_server("ai/far", port=8100)
    out = meshed.run(
        "apps/client",
        "import socket; s=socket.create_connection(("
        f"'{meshed.ip('ai/far')}', 8100)); s.sendall(b'x'); s.recv(1)",
    )
    assert out.returncode == 0, out.stderr
    wl = weft_json(meshed, "inspect", "workloads", "--node", "node-1")
    assert {w["name"]: (w["attached"], w["strict"], w["certificate"]) for w in wl} == {
        "client": (True, True, True),
        "batch": (True, True, True),
        "near": (True, True, True),
        "old1": (False, False, False),
    }
    flows = weft_json(meshed, "inspect", "flows", "--node", "node-1")
    assert any(
        f["workload"] == "apps/client"
        and f["originalDst"] == f"{meshed.ip('ai/far')}:8100"
        and f["peer"] == "ai/far"
        and f["peerIdentity"] == "spiffe://cluster.local/ns/ai/sa/model"
        for f in flows
    ), flows
    certs = weft_json(meshed, "inspect", "certs", "--node", "node-2")
    ids = {c["spiffeId"] for c in certs["workloads"]}
    assert ids == {"spiffe://cluster.local/ns/ai/sa/model", "spiffe://cluster.local/ns/ai/sa/other"}
    assert all(c["serial"] and c["expiresInSeconds"] > 80000 for c in certs["workloads"])
    cfg = weft_json(meshed, "inspect", "config", "--node", "node-2")
    assert cfg["connected"] and cfg["revision"] >= 1 and cfg["resources"]["Workload"] == 7
    routes = weft_json(meshed, "inspect", "routes")
    assert {r["service"] for r in routes} == {"ai/near", "ai/far"}
    tun = weft_json(meshed, "inspect", "tunnel", "--node", "node-1")
    assert any(c["peer"] == "spiffe://cluster.local/ns/ai/sa/model" for c in tun["pool"])


def test_controller_status_shows_agents_in_sync(meshed: Mesh) -> None:
    doc = weft_json(meshed, "controller", "status")
    assert {n["node"] for n in doc["nodes"]} == {"node-1", "node-2"}
    assert all(n["connected"] and n["upToDate"] and not n["lastNack"] for n in doc["nodes"])


def test_unknown_node_and_kind_are_clean_errors(meshed: Mesh) -> None:
    out = weft(meshed, "inspect", "workloads", "--node", "node-9", ok=False)
    assert out.returncode == 4 and "no node 'node-9'" in out.stderr
    assert "nodes: node-1, node-2" in out.stderr
    out = weft(meshed, "policy", "get", "gizmos", ok=False)
    assert out.returncode == 2 and "unknown kind 'gizmos'" in out.stderr
