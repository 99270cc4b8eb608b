"""Recorded API objects (tests/data/k8s, see its README) through the Kubernetes source's
conversion: the same model the files source builds from the same manifests."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from controller.model.base import Resource
from controller.model.loader import parse_text
from controller.model.problems import InvalidConfig
from controller.sources import kubernetes as k8s

DATA = Path(__file__).resolve().parents[2] / "tests" / "data" / "k8s"
ENROLLED = {k8s.MESH_LABEL: k8s.MESH_ENABLED}


def load(name: str) -> Any:
    text = (DATA / name).read_text()
    return json.loads(text) if name.endswith(".json") else yaml.safe_load(text)


def items(name: str) -> list[dict[str, Any]]:
    return list(load(name)["items"])


def from_files(text: str, name: str = "manifest.yaml") -> list[Resource]:
    offer = parse_text(text, name)
    assert not offer.problems, offer.problems
    return offer.resources


def same(a: Resource | None, b: Resource) -> None:
    assert a is not None
    assert a.to_json() == b.to_json()


def test_pods_become_the_workloads_the_files_source_reads() -> None:
    expected = {r.key: r for r in from_files((DATA / "expected" / "workloads.yaml").read_text())}
    sidecar = k8s.convert(k8s.PODS, load("pod-kind-sidecar.json"), ENROLLED)
    (managed,) = items("podlist-kind-managedfields.json")
    converted = k8s.convert(k8s.PODS, managed, ENROLLED)
    for got in (sidecar, converted):
        assert got is not None
        same(got, expected[got.key])


def test_server_fields_do_not_reach_the_model() -> None:
    """managedFields, uid, resourceVersion, ownerReferences: a status update must not look
    like a change, and must not be shipped to every agent."""
    (pod,) = items("podlist-kind-managedfields.json")
    assert pod["metadata"]["managedFields"]
    w = k8s.convert(k8s.PODS, pod, {})
    assert w is not None
    assert w.metadata.uid is None and w.metadata.resource_version is None
    bumped = copy.deepcopy(pod)
    bumped["metadata"]["resourceVersion"] = "999999"
    bumped["status"]["conditions"][0]["lastTransitionTime"] = "2030-01-01T00:00:00Z"
    assert k8s.convert(k8s.PODS, bumped, {}) == w


def test_service_equals_its_last_applied_manifest() -> None:
    """The recorded Service carries the manifest kubectl applied; through the files source
    that manifest gives exactly the model the Kubernetes source derives from the live
    object (with clusterIP, sessionAffinity and status added by the server)."""
    svc = load("service-gke.json")
    applied = svc["metadata"]["annotations"][k8s.LAST_APPLIED]
    (user,) = from_files(applied)
    live = k8s.convert(k8s.SERVICES, svc)
    assert live is not None
    assert live.to_dict()["spec"].pop("clusterIP") == "10.47.248.116"
    as_applied = json.loads(live.to_json())
    as_applied["spec"].pop("clusterIP")
    as_applied["spec"].pop("sessionAffinity")  # server default, not in the manifest
    assert as_applied == json.loads(user.to_json())
    assert k8s.LAST_APPLIED not in live.metadata.annotations


def test_service_fields_weft_does_not_use_are_dropped_not_rejected() -> None:
    svc = load("service-gke.json")
    svc["spec"].update(
        type="LoadBalancer",
        externalTrafficPolicy="Local",
        allocateLoadBalancerNodePorts=True,
        trafficDistribution="PreferClose",
    )
    svc["spec"]["ports"][0]["nodePort"] = 31234
    got = k8s.convert(k8s.SERVICES, svc)
    assert got is not None and got.spec.type == "LoadBalancer"  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "name",
    [
        "httproute-mesh-weight.yaml",
        "httproute-mesh-split.yaml",
        "authorizationpolicy-istio-l4.yaml",
        "authorizationpolicy-istio-l7.yaml",
        "peerauthentication-istio-per-port.yaml",
    ],
)
def test_policy_objects_match_the_files_source(name: str) -> None:
    wk = {
        "HTTPRoute": k8s.HTTPROUTES,
        "AuthorizationPolicy": k8s.AUTHORIZATION_POLICIES,
        "PeerAuthentication": k8s.PEER_AUTHENTICATIONS,
    }[load(name)["kind"]]
    (expected,) = from_files((DATA / name).read_text(), name)
    obj = load(name)
    same(k8s.convert(wk, obj), expected)


def test_policy_status_written_by_other_controllers_is_ignored() -> None:
    route = load("httproute-mesh-weight.yaml")
    (expected,) = from_files((DATA / "httproute-mesh-weight.yaml").read_text())
    route["status"] = {"parents": [{"controllerName": "istio.io/gateway-controller"}]}
    same(k8s.convert(k8s.HTTPROUTES, route), expected)


def test_unknown_policy_fields_are_rejected_not_dropped() -> None:
    """Ignoring a field of an ALLOW rule could widen who is allowed: refuse instead."""
    ap = load("authorizationpolicy-istio-l4.yaml")
    ap["spec"]["rules"][0]["from"][0]["source"]["serviceAccounts"] = ["ambient-demo/sleep"]
    with pytest.raises(InvalidConfig) as e:
        k8s.convert(k8s.AUTHORIZATION_POLICIES, ap)
    (p,) = e.value.problems
    assert p.resource == "AuthorizationPolicy ambient-demo/allow-sleep-to-httpbin"
    assert p.field and p.field.endswith("serviceAccounts")


def test_nodes_become_tunnel_endpoints_and_redacted_ones_are_problems() -> None:
    expected = {r.key: r for r in from_files((DATA / "expected" / "workloads.yaml").read_text())}
    ok, bad = [], []
    for n in items("nodelist-mixed.json"):
        try:
            got = k8s.convert(k8s.NODES, n)
        except InvalidConfig as e:
            bad.append(e.problems[0].resource)
            continue
        assert got is not None
        same(got, expected[got.key])
        ok.append(got.name)
    assert ok == ["repldev-marc", "ip-172-31-21-92"]
    # The support bundle replaced these nodes' addresses with ***HIDDEN***.
    assert len(bad) == 5 and all(r and r.startswith("Node ") for r in bad)


def test_probe_and_container_ports_of_recorded_pods() -> None:
    pods = {p["metadata"]["name"]: p for p in items("podlist-eks-kafka.json")}
    assert k8s.probe_ports(pods["kafka-0"]) == [9092]  # tcpSocket readiness
    assert k8s.container_ports(pods["kafka-0"]) == [5555, 9092, 9094]
    # Init containers that ran to completion listen on nothing.
    assert k8s.container_ports(load("pod-kind-sidecar.json")) == []


def test_named_probe_ports_resolve_and_native_sidecars_count() -> None:
    pod = copy.deepcopy(items("podlist-eks-kafka.json")[0])
    broker = pod["spec"]["containers"][0]
    broker["livenessProbe"] = {"httpGet": {"path": "/health", "port": "jmx"}}
    broker["startupProbe"] = {"grpc": {"port": 9094}}
    broker["readinessProbe"]["tcpSocket"]["port"] = "no-such-port"  # unresolvable: skipped
    pod["spec"]["initContainers"][0]["restartPolicy"] = "Always"
    pod["spec"]["initContainers"][0]["ports"] = [{"containerPort": 9901, "name": "admin"}]
    pod["spec"]["initContainers"][0]["readinessProbe"] = {"httpGet": {"port": "admin"}}
    assert k8s.probe_ports(pod) == [5555, 9094, 9901]
    assert 9901 in k8s.container_ports(pod)


def test_pods_on_eks_nodes_with_dotted_names_convert() -> None:
    """Node names are DNS subdomains (EKS: ip-192-168-4-135.eu-central-1.compute.internal)."""

    pod = items("podlist-eks-kafka.json")[0]
    assert k8s.convert(k8s.PODS, pod, ENROLLED) is not None


def test_enrollment_pod_label_overrides_namespace_label() -> None:
    pod = load("pod-kind-sidecar.json")
    assert k8s.mesh_enrolled({}, ENROLLED)
    assert not k8s.mesh_enrolled({}, {})
    assert not k8s.mesh_enrolled({k8s.MESH_LABEL: "disabled"}, ENROLLED)
    assert k8s.mesh_enrolled({k8s.MESH_LABEL: "enabled"}, {})
    pod["metadata"]["labels"] = {k8s.MESH_LABEL: "disabled"}
    w = k8s.convert(k8s.PODS, pod, ENROLLED)
    assert w is not None and w.spec.mesh is False  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "change",
    [
        {"spec": {"nodeName": None}},  # not scheduled
        {"status": {"podIPs": [], "podIP": None}},  # no address yet
        {"status": {"phase": "Succeeded"}},  # its IP may belong to a new pod already
        {"spec": {"hostNetwork": True}},  # shares the node's address
    ],
)
def test_pods_that_are_not_workloads(change: dict[str, dict[str, Any]]) -> None:
    pod = load("pod-kind-sidecar.json")
    for part, fields in change.items():
        pod[part].update(fields)
    assert k8s.convert(k8s.PODS, pod, ENROLLED) is None


def test_pods_before_podips_existed_use_podip() -> None:
    (pod,) = [load("pod-kind-sidecar.json")]
    del pod["status"]["podIPs"]
    w = k8s.convert(k8s.PODS, pod, {})
    assert w is not None and [str(a) for a in w.spec.addresses] == ["10.244.0.8"]  # type: ignore[attr-defined]


def test_only_weft_annotations_reach_the_workload() -> None:
    pod = load("pod-kind-sidecar.json")
    pod["metadata"]["annotations"] = {
        "weft.dev/fastpath": "false",
        "kubectl.kubernetes.io/restartedAt": "x",
    }
    w = k8s.convert(k8s.PODS, pod, {})
    assert w is not None and w.metadata.annotations == {"weft.dev/fastpath": "false"}
