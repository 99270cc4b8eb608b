"""The lab manifest: validation names file, line, field and reason; allocation is stable."""

from __future__ import annotations

import ipaddress
import textwrap

import pytest

from agent.lab.manifest import load_manifest, plan
from controller.model.problems import InvalidConfig
from controller.model.yamldoc import load_documents


def lab(text: str):
    return plan(load_documents(textwrap.dedent(text), "lab.yaml")[0])


BASE = """\
apiVersion: weft.dev/v1alpha1
kind: Lab
metadata: {name: demo}
spec:
  nodes: [{name: node-1}, {name: node-2}]
  namespaces: [{name: apps, labels: {weft.dev/mesh: enabled}}, {name: web}]
  pods:
    - {name: a, namespace: apps, node: node-1}
    - {name: b, namespace: apps, node: node-2}
    - {name: c, namespace: web, node: node-1}
"""


def problems(text: str) -> list[str]:
    with pytest.raises(InvalidConfig) as e:
        lab(text)
    return [str(p) for p in e.value.problems]


def test_default_manifest_plans_two_nodes_and_two_namespaces():
    p = load_manifest()
    assert [n.name for n in p.nodes] == ["node-1", "node-2"]
    assert {pod.namespace for pod in p.pods} == {"apps", "ai"}
    assert all(pod.meshed for pod in p.pods)
    assert len({pod.ip for pod in p.pods}) == len(p.pods)


def test_addresses_come_from_each_nodes_pod_range():
    p = lab(BASE)
    assert p.node("node-1").pod_cidr == ipaddress.IPv4Network("10.244.1.0/24")
    assert p.node("node-2").ip == ipaddress.IPv4Address("10.0.0.12")
    ips = {pod.name: str(pod.ip) for pod in p.pods}
    assert ips == {"a": "10.244.1.2", "b": "10.244.2.2", "c": "10.244.1.3"}


def test_mesh_enrolment_follows_namespace_label_and_pod_override():
    p = lab(
        BASE.replace(
            "{name: c, namespace: web, node: node-1}",
            "{name: c, namespace: web, node: node-1, labels: {weft.dev/mesh: enabled}}",
        ).replace(
            "{name: a, namespace: apps, node: node-1}",
            "{name: a, namespace: apps, node: node-1, labels: {weft.dev/mesh: disabled}}",
        )
    )
    assert {pod.name: pod.meshed for pod in p.pods} == {"a": False, "b": True, "c": True}


def test_unknown_node_names_file_line_field_and_the_known_nodes():
    (msg,) = problems(BASE.replace("node: node-2}", "node: node-3}"))
    assert msg == (
        "lab.yaml:9: Lab demo: spec.pods[1].node: unknown node 'node-3' (nodes: node-1, node-2)"
    )


def test_duplicate_pod_is_rejected_with_its_position():
    (msg,) = problems(BASE + "    - {name: a, namespace: apps, node: node-2}\n")
    assert "spec.pods[3].name: duplicate pod apps/a" in msg
    assert msg.startswith("lab.yaml:11:")


def test_same_pod_name_in_two_namespaces_is_fine():
    p = lab(BASE + "    - {name: a, namespace: web, node: node-2}\n")
    assert len(p.pods) == 4


def test_cidr_with_host_bits_is_rejected():
    text = BASE.replace("spec:\n", "spec:\n  network: {podCIDR: 10.244.0.1/16}\n")
    (msg,) = problems(text)
    assert "spec.network.podCIDR" in msg and "zero host bits" in msg


def test_overlapping_networks_are_rejected():
    text = BASE.replace("spec:\n", "spec:\n  network: {serviceCIDR: 10.244.128.0/17}\n")
    (msg,) = problems(text)
    assert "spec.network.serviceCIDR: 10.244.128.0/17 overlaps podCIDR" in msg


def test_all_problems_are_reported_at_once():
    text = (
        BASE.replace("node: node-2}", "node: nope}")
        + "    - {name: c, namespace: web, node: node-1}\n"
    )
    msgs = problems(text)
    assert len(msgs) == 2


def test_unknown_field_is_named():
    (msg,) = problems(
        BASE.replace(
            "{name: a, namespace: apps, node: node-1}",
            "{name: a, namespace: apps, node: node-1, nodes: x}",
        )
    )
    assert "spec.pods[0].nodes: unknown field" in msg


def test_undeclared_namespace_is_rejected():
    (msg,) = problems(BASE.replace("{name: b, namespace: apps", "{name: b, namespace: prod"))
    assert "namespace 'prod' is not declared" in msg


def test_explicit_ip_outside_node_range_is_rejected_and_inside_is_kept():
    (msg,) = problems(
        BASE.replace(
            "{name: a, namespace: apps, node: node-1}",
            "{name: a, namespace: apps, node: node-1, ip: 10.244.2.9}",
        )
    )
    assert "spec.pods[0].ip: 10.244.2.9 is not a usable address" in msg
    p = lab(
        BASE.replace(
            "{name: c, namespace: web, node: node-1}",
            "{name: c, namespace: web, node: node-1, ip: 10.244.1.2}",
        )
    )
    assert {pod.name: str(pod.ip) for pod in p.pods}["a"] == "10.244.1.3"


def test_full_node_range_is_reported():
    text = BASE.replace("spec:\n", "spec:\n  network: {podCIDRMaskSize: 30}\n")
    msgs = problems(text)
    assert any("pod range 10.244.0.4/30 is full" in m for m in msgs)


def test_bad_label_and_bad_lab_name():
    msgs = problems(BASE.replace("{name: demo}", "{name: Demo_Lab}"))
    assert any("metadata.name" in m for m in msgs)
    msgs = problems(BASE.replace("labels: {weft.dev/mesh: enabled}", "labels: {'bad key!': x}"))
    assert any("not a valid Kubernetes label key" in m for m in msgs)


def test_yaml_syntax_error_has_a_line():
    msgs = problems(BASE + "  services: [\n")
    assert msgs[0].startswith("lab.yaml:") and "YAML syntax" in msgs[0]


def test_yaml_aliases_are_refused():
    with pytest.raises(InvalidConfig, match="aliases are not allowed"):
        load_documents("a: &x [1]\nb: *x\n", "f.yaml")


def test_service_vips_are_allocated_and_checked():
    text = (
        BASE
        + "  services:\n    - {name: s, namespace: apps, selector: {app: a}, ports: [{port: 80}]}\n"
    )
    p = lab(text)
    assert str(p.services[0].cluster_ip) == "10.96.0.2"
    bad = text.replace("ports: [{port: 80}]", "ports: [{port: 80}], clusterIP: 10.1.1.1")
    (msg,) = problems(bad)
    assert "clusterIP: 10.1.1.1 is outside serviceCIDR" in msg


def test_missing_file_is_a_clean_error(tmp_path):
    with pytest.raises(InvalidConfig, match="cannot read"):
        load_manifest(tmp_path / "nope.yaml")


def test_probes_declare_the_ports_strict_opens_to_the_node():
    p = lab(
        BASE.replace(
            "{name: a, namespace: apps, node: node-1}",
            "{name: a, namespace: apps, node: node-1,"
            " readinessProbe: {httpGet: {path: /healthz, port: 8000}},"
            " livenessProbe: {tcpSocket: {port: 8081}}, startupProbe: {grpc: {port: 8000}}}",
        )
    )
    assert p.find_pod("apps/a").probe_ports == (8000, 8081)
    assert p.find_pod("apps/b").probe_ports == ()


def test_a_probe_without_a_valid_port_is_refused_where_it_is():
    msgs = problems(
        BASE.replace(
            "{name: a, namespace: apps, node: node-1}",
            "{name: a, namespace: apps, node: node-1, readinessProbe: {tcpSocket: {port: 0}}}",
        )
    )
    assert any("readinessProbe" in m and "port" in m for m in msgs), msgs


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("a: &x 1\nb: *x\n", 2),
        ("a: &x {q: 1}\nb:\n  <<: *x\n", 3),
        ("a: &x [1]\nb:\n  - 1\n  - 2\n  - *x\n", 5),
        ("&k a: 1\nb: 2\nc: 3\n*k : 4\n", 4),
        ("a: 1\nb: *nowhere\n", 2),
        # billion laughs: refused at the first reuse, nothing expanded
        (
            "l0: &a [x, x, x, x, x, x, x, x, x]\n"
            + "".join(
                f"l{i}: &{chr(97 + i)} [{', '.join(['*' + chr(96 + i)] * 9)}]\n"
                for i in range(1, 9)
            ),
            2,
        ),
    ],
)
def test_every_alias_is_refused_with_where_it_is_used(text, line):
    with pytest.raises(InvalidConfig, match="aliases are not allowed") as e:
        load_documents(text, "f.yaml")
    assert e.value.problems[0].line == line


def test_nesting_too_deep_is_a_clean_error():
    for depth in (995, 5000):
        with pytest.raises(InvalidConfig, match=r"nested too deeply|YAML syntax"):
            load_documents("a: " + "[" * depth + "]" * depth + "\n", "f.yaml")


def test_anchors_without_aliases_and_many_documents_load_with_lines():
    docs = load_documents("a: &x 1\nb: [1, 2]\n---\n---\nc: {d: 3}\n", "f.yaml")
    assert [d.data for d in docs] == [{"a": 1, "b": [1, 2]}, {"c": {"d": 3}}]
    assert docs[1].lines[("c", "d")] == 5
