"""Conditions written back to Kubernetes objects (controller/statuswriter.py): a merge
patch of the status subresource only, Gateway API's route status for routes, written when
the conditions change, lastTransitionTime moving only when a condition's status does."""

from __future__ import annotations

import textwrap
from typing import Any

from controller.model.loader import parse_text
from controller.sources.kubernetes import (
    AUTHORIZATION_POLICIES,
    HTTPROUTES,
    SERVICES,
    KubeAPIError,
    watched_kinds,
)
from controller.statuswriter import CONTROLLER_NAME, StatusWriter
from controller.store import ConfigStore, Offer

SERVICE = """\
apiVersion: v1
kind: Service
metadata: {name: llm, namespace: ai, labels: {weft.dev/use-waypoint: wp}}
spec: {selector: {app: llm}, clusterIP: 10.96.0.10, ports: [{port: 8000}]}
"""
ROUTE = """\
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: split, namespace: ai, generation: 3}
spec:
  parentRefs: [{group: "", kind: Service, name: llm, port: 8000}]
  rules: [{backendRefs: [{name: llm-v2, port: 8000}]}]
"""
POLICY = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny, namespace: ai}
spec:
  targetRefs: [{kind: Service, group: "", name: llm}]
  action: DENY
  rules: [{from: [{source: {namespaces: [batch]}}]}]
"""


class Recorder:
    """Answers GET with the object as an API server holds it (generation, resourceVersion,
    another controller's status entries) and records PATCHes."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, Any]] = []
        self.fail = False
        self.objects: dict[str, dict[str, Any]] = {}

    def request(self, method: str, path: str, *, query: Any = None, body: Any = None) -> Any:
        if self.fail:
            raise KubeAPIError(403, "forbidden")
        if method == "GET":
            return self.objects.get(
                path, {"metadata": {"generation": 3, "resourceVersion": "41"}, "status": {}}
            )
        self.calls.append((method, path, body))
        return {}

    def stream(self, path: str, *, query: Any) -> Any:
        raise AssertionError("not used")


def offer(store: ConfigStore, source: str, text: str) -> None:
    o = parse_text(textwrap.dedent(text), source)
    assert not o.problems, o.problems
    store.offer(source, Offer(resources=o.resources))


def setup() -> tuple[ConfigStore, Recorder, StatusWriter, list[float]]:
    store = ConfigStore()
    offer(store, SERVICES.source_id, SERVICE)
    offer(store, HTTPROUTES.source_id, ROUTE)
    offer(store, AUTHORIZATION_POLICIES.source_id, POLICY)
    api = Recorder()
    clock = [1_700_000_000.0]
    return store, api, StatusWriter(api, store, watched_kinds(), clock=lambda: clock[0]), clock


def test_conditions_are_patched_onto_the_status_subresource_only():
    _, api, w, _ = setup()
    assert w.sync() == 2
    by_path = {p: b for m, p, b in api.calls if m == "PATCH"}
    route = by_path["/apis/gateway.networking.k8s.io/v1/namespaces/ai/httproutes/split/status"]
    (parent,) = route["status"]["parents"]
    assert parent["controllerName"] == CONTROLLER_NAME
    assert parent["parentRef"]["name"] == "llm"
    conds = {c["type"]: c for c in parent["conditions"]}
    # llm-v2 does not exist: ResolvedRefs is False, with the reason.
    assert conds["ResolvedRefs"]["status"] == "False"
    assert conds["ResolvedRefs"]["reason"] == "BackendNotFound"
    assert conds["Accepted"]["observedGeneration"] == 3  # the object's, as the API has it
    policy = by_path["/apis/security.istio.io/v1/namespaces/ai/authorizationpolicies/deny/status"]
    assert {c["type"] for c in policy["status"]["conditions"]} == {"Accepted", "ResolvedRefs"}
    assert set(route) == {"metadata", "status"} and set(policy) == {"metadata", "status"}
    assert route["metadata"] == {"resourceVersion": "41"}  # a raced write is refused (409)
    # The Service is the API server's and the kubelet's, not ours to write.
    assert not any("/services/" in p for _, p, _ in api.calls)


def test_only_changes_are_written_and_transition_times_move_with_status():
    store, api, w, clock = setup()
    w.sync()
    first = {p: b for _, p, b in api.calls}
    api.calls.clear()
    offer(store, "file:/etc/weft/config/other.yaml", SERVICE.replace("name: llm,", "name: x,"))
    assert w.sync() == 0 and not api.calls  # a revision that changes no condition
    clock[0] += 60
    offer(
        store,
        "file:/etc/weft/config/v2.yaml",
        SERVICE.replace("name: llm,", "name: llm-v2,").replace(
            "labels: {weft.dev/use-waypoint: wp}", "labels: {}"
        ),
    )
    assert w.sync() == 1  # the route's ResolvedRefs turned True
    ((_, path, body),) = api.calls
    conds = {c["type"]: c for c in body["status"]["parents"][0]["conditions"]}
    before = {c["type"]: c for c in first[path]["status"]["parents"][0]["conditions"]}
    assert conds["ResolvedRefs"]["status"] == "True"
    assert (
        conds["ResolvedRefs"]["lastTransitionTime"] > before["ResolvedRefs"]["lastTransitionTime"]
    )
    assert conds["Accepted"]["lastTransitionTime"] == before["Accepted"]["lastTransitionTime"]


def test_a_refused_patch_is_counted_and_tried_again():
    _, api, w, _ = setup()
    api.fail = True
    assert w.sync() == 0 and w.failures == 2
    api.fail = False
    assert w.sync() == 2  # the same revision: what failed is tried again


def test_other_controllers_status_entries_are_kept():
    """A route's status may list other controllers (Istio's, a gateway's); a policy's
    conditions may include Istio's own. Ours replace ours only."""
    _, api, w, _ = setup()
    route_path = "/apis/gateway.networking.k8s.io/v1/namespaces/ai/httproutes/split"
    theirs = {
        "parentRef": {"name": "gw"},
        "controllerName": "istio.io/gateway-controller",
        "conditions": [{"type": "Accepted", "status": "True"}],
    }
    api.objects[route_path] = {
        "metadata": {"generation": 5, "resourceVersion": "9"},
        "status": {"parents": [theirs]},
    }
    w.sync()
    body = next(b for _, p, b in api.calls if p == route_path + "/status")
    names = [p["controllerName"] for p in body["status"]["parents"]]
    assert names == ["istio.io/gateway-controller", CONTROLLER_NAME]
