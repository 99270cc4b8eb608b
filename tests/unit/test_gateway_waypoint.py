"""Waypoints declared as Istio declares them (a Gateway of class istio-waypoint or
weft-waypoint), what the controller reports on them, and the use-waypoint label as Istio
users write it (istio.io/use-waypoint, on the Service or its namespace, `none` to opt out)."""

from __future__ import annotations

import copy
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

from controller.model.base import Resource
from controller.model.loader import parse_text
from controller.model.problems import InvalidConfig
from controller.model.status import conditions
from controller.sources import kubernetes as k8s
from controller.store import ConfigStore
from tests.unit.test_k8s_watch import FakeAPI, ev, namespace, source

DATA = Path(__file__).resolve().parents[2] / "tests" / "data" / "k8s"


def recorded() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((DATA / "gateway-istio-waypoint.yaml").read_text())
    return doc


def parse(text: str) -> list[Resource]:
    offer = parse_text(textwrap.dedent(text), "w.yaml")
    assert not offer.problems, offer.problems
    return offer.resources


def problems(doc: dict[str, Any]) -> str:
    offer = parse_text(yaml.safe_dump(doc), "w.yaml")
    assert offer.problems, "expected the document to be refused"
    return "; ".join(str(p) for p in offer.problems)


def workload(name: str, ns: str, labels: dict[str, str], ready: bool = True) -> str:
    return textwrap.dedent(
        f"""\
        apiVersion: weft.dev/v1alpha1
        kind: Workload
        metadata: {{name: {name}, namespace: {ns}, labels: {labels}}}
        spec: {{node: node-1, addresses: [10.244.1.{len(name) + 10}], ready: {str(ready).lower()}}}
        """
    )


SERVICE = """\
apiVersion: v1
kind: Service
metadata: {name: llm, namespace: default, labels: {"istio.io/use-waypoint": waypoint}}
spec: {selector: {app: llm}, ports: [{port: 8000}]}
"""


def by_type(conds: list[Any]) -> dict[str, Any]:
    return {c.type: c for c in conds}


def test_istioctls_waypoint_gateway_is_read_as_written_and_reports_its_instances() -> None:
    (gw,) = parse(yaml.safe_dump(recorded()))
    assert gw.KIND == "Gateway" and gw.spec.gateway_class_name == "istio-waypoint"  # type: ignore[attr-defined]
    none = by_type(conditions([gw])[gw.key])
    assert none["Accepted"].status and not none["Programmed"].status
    assert none["Programmed"].reason == "NoResources"
    assert "weft.dev/waypoint=waypoint" in none["Programmed"].message

    pending = parse(workload("wp-a", "default", {"weft.dev/waypoint": "waypoint"}, ready=False))
    c = by_type(conditions([gw, *pending])[gw.key])
    assert (c["Programmed"].status, c["Programmed"].reason) == (False, "Pending")

    ready = parse(workload("wp-b", "default", {"weft.dev/waypoint": "waypoint"}))
    elsewhere = parse(workload("wp-c", "other", {"weft.dev/waypoint": "waypoint"}))
    c = by_type(conditions([gw, *pending, *ready, *elsewhere])[gw.key])
    assert c["Programmed"].status and c["Programmed"].message.startswith("1 of 2 ")


@pytest.mark.parametrize(
    ("change", "says"),
    [
        (lambda d: d["spec"].update(gatewayClassName="istio"), "ingress gateway"),
        (lambda d: d["spec"]["listeners"][0].update(port=80, protocol="HTTP"), "HBONE on port"),
        (
            lambda d: d["spec"]["listeners"][0].update(
                allowedRoutes={"namespaces": {"from": "All"}}
            ),
            "allowedRoutes",
        ),
        (lambda d: d["spec"].update(addresses=[{"value": "10.0.0.1"}]), "addresses"),
        (
            lambda d: d["spec"].update(
                infrastructure={"parametersRef": {"kind": "ConfigMap", "name": "p", "group": ""}}
            ),
            "infrastructure",
        ),
        (
            lambda d: d["metadata"]["labels"].update({"istio.io/waypoint-for": "workload"}),
            "workload",
        ),
        (lambda d: d["spec"]["listeners"][0].update(tls={"mode": "Terminate"}), "tls"),
        (lambda d: d.update(apiVersion="networking.istio.io/v1"), "ingress gateway"),
    ],
)
def test_what_a_waypoint_gateway_cannot_mean_in_weft_is_refused_by_name(
    change: Any, says: str
) -> None:
    doc = recorded()
    change(doc)
    assert says in problems(doc)


def test_a_same_namespace_allowed_routes_is_what_weft_does_and_is_accepted() -> None:
    doc = recorded()
    doc["spec"]["listeners"][0]["allowedRoutes"] = {"namespaces": {"from": "Same"}}
    doc["spec"]["gatewayClassName"] = "weft-waypoint"
    (gw,) = parse(yaml.safe_dump(doc))
    assert gw.spec.listeners[0].port == 15008  # type: ignore[attr-defined]


def test_the_kubernetes_source_reads_waypoint_gateways_and_leaves_ingress_ones_alone() -> None:
    gw = k8s.convert(k8s.GATEWAYS, recorded())
    (expected,) = parse(yaml.safe_dump(recorded()))
    assert gw is not None and gw.to_json() == expected.to_json()
    ingress = recorded()
    ingress["spec"] = {
        "gatewayClassName": "istio",
        "listeners": [{"name": "http", "port": 80, "protocol": "HTTP"}],
    }
    assert k8s.convert(k8s.GATEWAYS, ingress) is None  # another controller's, not a problem
    assert k8s.GATEWAYS in k8s.watched_kinds()


def test_istio_use_waypoint_label_and_none_opt_out() -> None:
    (svc,) = parse(SERVICE)
    assert svc.waypoint == "waypoint"  # type: ignore[attr-defined]
    (opted_out,) = parse(SERVICE.replace('use-waypoint": waypoint', 'use-waypoint": none'))
    assert opted_out.waypoint is None  # type: ignore[attr-defined]


def test_a_policy_on_a_service_whose_waypoint_has_no_ready_pod_is_not_accepted() -> None:
    route = """\
    apiVersion: weft.dev/v1alpha1
    kind: TokenRateLimit
    metadata: {name: t, namespace: default}
    spec:
      targetRefs: [{kind: Service, name: llm}]
      limits: [{name: p, by: principal, tokensPerMinute: 100}]
    """
    (svc,) = parse(SERVICE)
    (pol,) = parse(route)
    caller = parse(workload("client", "default", {"app": "client"}))
    c = by_type(conditions([svc, pol, *caller])[pol.key])
    assert (c["Accepted"].status, c["Accepted"].reason) == (False, "WaypointNotReady")
    ready = parse(workload("wp-b", "default", {"weft.dev/waypoint": "waypoint"}))
    c = by_type(conditions([svc, pol, *caller, *ready])[pol.key])
    assert c["Accepted"].status
    # Files validated on their own (no workloads at all) say nothing about instances.
    assert by_type(conditions([svc, pol])[pol.key])["Accepted"].status


def service_obj(name: str, rv: str, **labels: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": name,
            "namespace": "inference",
            "resourceVersion": rv,
            "labels": labels,
        },
        "spec": {"selector": {"app": name}, "ports": [{"port": 8000, "protocol": "TCP"}]},
    }


def test_services_follow_their_namespaces_use_waypoint_label_as_it_changes() -> None:
    api, store = FakeAPI(), ConfigStore()
    ns_path, svc_path = k8s.NAMESPACES.path, k8s.SERVICES.path
    api.lists[ns_path] = [([namespace("inference", "3")], "3")]
    api.lists[svc_path] = [
        (
            [
                service_obj("llm", "4"),
                service_obj("direct", "4", **{"istio.io/use-waypoint": "none"}),
                service_obj("own", "4", **{"weft.dev/use-waypoint": "other"}),
            ],
            "4",
        )
    ]
    labelled = copy.deepcopy(namespace("inference", "6", **{"istio.io/use-waypoint": "waypoint"}))
    api.streams[ns_path] = [
        [ev("MODIFIED", labelled)],
        [ev("MODIFIED", namespace("inference", "7"))],
    ]
    src = source(api, store, k8s.NAMESPACES, k8s.SERVICES)
    src.scan()

    def waypoints() -> dict[str, str | None]:
        return {e.key.name: e.resource.waypoint for e in store.entries("Service")}  # type: ignore[attr-defined]

    assert waypoints() == {"llm": None, "direct": None, "own": "other"}
    src.watch_once(k8s.NAMESPACES, timeout=1)
    src.flush()
    assert waypoints() == {"llm": "waypoint", "direct": None, "own": "other"}
    src.watch_once(k8s.NAMESPACES, timeout=1)  # the label removed again
    src.flush()
    assert waypoints() == {"llm": None, "direct": None, "own": "other"}


def test_lab_services_inherit_their_namespaces_waypoint() -> None:
    from agent.lab.manifest import plan
    from controller.model.yamldoc import load_documents

    lab = plan(
        load_documents(
            textwrap.dedent(
                """\
            apiVersion: weft.dev/v1alpha1
            kind: Lab
            metadata: {name: t}
            spec:
              nodes: [{name: node-1}]
              namespaces:
                - {name: ai, labels: {"weft.dev/mesh": enabled, "istio.io/use-waypoint": wp}}
              pods:
                - {name: llm, namespace: ai, node: node-1, labels: {app: llm}}
              services:
                - {name: llm, namespace: ai, selector: {app: llm}, ports: [{port: 8000}]}
                - {name: raw, namespace: ai, selector: {app: llm}, ports: [{port: 8001}],
                   labels: {"weft.dev/use-waypoint": none}}
            """
            ),
            "lab.yaml",
        )[0]
    )
    labels = {s.name: s.labels for s in lab.services}
    assert labels["llm"] == {"weft.dev/use-waypoint": "wp"}
    assert labels["raw"] == {"weft.dev/use-waypoint": "none"}


def test_invalid_gateway_from_the_api_names_the_object() -> None:
    doc = recorded()
    doc["spec"]["listeners"][0]["port"] = 15009
    with pytest.raises(InvalidConfig) as e:
        k8s.convert(k8s.GATEWAYS, doc)
    assert "Gateway default/waypoint" in str(e.value.problems[0])


POLICY_ON = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: p, namespace: default}}
spec:
  targetRefs: [{target}]
  action: DENY
  rules: [{{to: [{{operation: {{methods: [DELETE]}}}}]}}]
"""


@pytest.mark.parametrize(
    ("target", "says"),
    [
        ("{kind: ServiceEntry, group: networking.istio.io, name: x}", "ServiceEntry"),
        ("{kind: Service, name: llm, namespace: other}", "another namespace"),
        ("{kind: Gateway, group: example.com, name: waypoint}", "group"),
    ],
)
def test_policy_targets_weft_cannot_honour_are_refused(target: str, says: str) -> None:
    offer = parse_text(POLICY_ON.format(target=target), "p.yaml")
    assert offer.problems and says in str(offer.problems[0]), offer.problems


def test_a_policy_on_a_waypoint_gateway_says_whether_the_waypoint_exists_and_runs() -> None:
    (pol,) = parse(POLICY_ON.format(target="{kind: Gateway, name: waypoint}"))
    (gw,) = parse(yaml.safe_dump(recorded()))
    caller = parse(workload("client", "default", {"app": "client"}))
    c = by_type(conditions([pol])[pol.key])
    assert (c["ResolvedRefs"].reason, c["Accepted"].reason) == (
        "GatewayNotFound",
        "GatewayNotFound",
    )
    c = by_type(conditions([pol, gw, *caller])[pol.key])
    assert c["ResolvedRefs"].status and c["Accepted"].reason == "WaypointNotReady"
    ready = parse(workload("wp-b", "default", {"weft.dev/waypoint": "waypoint"}))
    c = by_type(conditions([pol, gw, *caller, *ready])[pol.key])
    assert c["Accepted"].status


def test_a_waypoint_in_another_namespace_is_refused_and_said_not_a_same_named_one_used() -> None:
    """istio.io/use-waypoint-namespace (Istio's cross-namespace waypoints) is not
    implemented: the Service's L7 traffic must not silently go to a waypoint of the same
    name in its own namespace. It gets a waypoint no instance can be (refused, fail
    closed), and its policies' condition names the label."""
    text = SERVICE.replace(
        '{"istio.io/use-waypoint": waypoint}',
        '{"istio.io/use-waypoint": waypoint, "istio.io/use-waypoint-namespace": infra}',
    )
    (svc,) = parse(text)
    assert svc.waypoint == "infra/waypoint"  # type: ignore[attr-defined]
    (pol,) = parse(POLICY_ON.format(target="{kind: Service, name: llm}").replace("DELETE", "PUT"))
    own = parse(workload("wp-b", "default", {"weft.dev/waypoint": "waypoint"}))  # same name
    c = by_type(conditions([svc, pol, *own])[pol.key])
    assert c["Accepted"].reason == "WaypointNotReady", c
    assert "istio.io/use-waypoint-namespace" in c["Accepted"].message
    ns_labels = {"istio.io/use-waypoint": "waypoint", "istio.io/use-waypoint-namespace": "infra"}
    from controller.model.workloads import with_namespace_waypoint

    assert with_namespace_waypoint({}, ns_labels) == {
        "weft.dev/use-waypoint": "waypoint",
        "istio.io/use-waypoint-namespace": "infra",
    }
