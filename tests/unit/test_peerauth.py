"""PeerAuthentication to the data path's STRICT settings: which ports admit plaintext, and
from whom (kubelet probe ports only from the node itself; portLevelMtls from anyone)."""

from __future__ import annotations

from agent.policy.peerauth import mtls_mode
from controller.model.loader import parse_text

DOCS = """
apiVersion: weft.dev/v1alpha1
kind: Workload
metadata: {name: llm, namespace: ai, labels: {app: llm}}
spec: {serviceAccount: llm, node: node-1, addresses: [10.244.1.5], probePorts: [8000, 8081]}
"""


def _parse(text: str):
    offer = parse_text(text, "test.yaml")
    assert not offer.problems, offer.problems
    return offer.resources


def _mode(extra: str = ""):
    resources = _parse(DOCS + extra)
    w = next(r for r in resources if r.KIND == "Workload")
    policies = [r for r in resources if r.KIND == "PeerAuthentication"]
    return mtls_mode(policies, w)


def test_probe_ports_are_kept_apart_from_plaintext_ports():
    """Probe ports are not opened to everyone: the data path admits the node alone there."""
    m = _mode()
    assert m.strict
    assert m.probe_ports == {8000, 8081}
    assert m.plaintext_ports == frozenset()


def test_port_level_mtls_opens_a_port_to_anyone_or_closes_a_probe_port():
    m = _mode(
        """
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: llm, namespace: ai}
spec:
  selector: {matchLabels: {app: llm}}
  mtls: {mode: STRICT}
  portLevelMtls:
    "9090": {mode: PERMISSIVE}
    "8081": {mode: STRICT}
"""
    )
    assert m.strict and m.policy == "ai/llm"
    assert m.plaintext_ports == {9090}
    assert m.probe_ports == {8000}  # 8081 STRICT at port level: not even the kubelet


def _pa(ns: str, mode: str, name: str = "default") -> str:
    return f"""
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {{name: {name}, namespace: {ns}}}
spec: {{mtls: {{mode: {mode}}}}}
"""


def test_istios_mesh_wide_policy_in_istio_system_only_tightens_the_mesh():
    """From Istio's root namespace, STRICT applies mesh-wide; a leftover PERMISSIVE there
    (Istio's migration default, in a namespace others may write to) never loosens weft's
    STRICT default, and says why on the policy."""
    from controller.model.status import conditions

    m = _mode(_pa("istio-system", "PERMISSIVE"))
    assert m.strict and m.policy is None
    m = _mode(_pa("weft-system", "PERMISSIVE") + _pa("istio-system", "STRICT"))
    assert m.strict and m.policy == "istio-system/default"
    (pa,) = [
        r
        for r in _parse(DOCS + _pa("istio-system", "PERMISSIVE"))
        if r.KIND == "PeerAuthentication"
    ]
    accepted = {c.type: c for c in conditions([pa])[pa.key]}["Accepted"]
    assert not accepted.status and accepted.reason == "NotMeshWide"


def test_with_a_mesh_wide_policy_in_both_root_namespaces_the_stricter_applies():
    m = _mode(_pa("istio-system", "STRICT") + _pa("weft-system", "PERMISSIVE"))
    assert m.strict and m.policy == "istio-system/default"
    m = _mode(_pa("istio-system", "PERMISSIVE") + _pa("weft-system", "STRICT"))
    assert m.strict and m.policy == "weft-system/default"
    m = _mode(_pa("weft-system", "PERMISSIVE"))
    assert not m.strict  # weft's own root namespace may loosen, on purpose
