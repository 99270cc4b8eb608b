"""The Kubernetes source's list + watch logic against a fake API boundary: events in,
store offers out. The objects in the events are the recorded ones from tests/data/k8s."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from controller.model.base import ResourceKey
from controller.sources import kubernetes as k8s
from controller.store import ConfigStore, Offer

DATA = Path(__file__).resolve().parents[2] / "tests" / "data" / "k8s"


def recorded_pod() -> dict[str, Any]:
    return json.loads((DATA / "pod-kind-sidecar.json").read_text())


def pod(name: str, ip: str, rv: str, **labels: str) -> dict[str, Any]:
    """The recorded pod, renamed: several distinct pods from one recording."""
    p = recorded_pod()
    p["metadata"].update(name=name, resourceVersion=rv, uid=f"uid-{name}", labels=dict(labels))
    p["status"]["podIPs"] = [{"ip": ip}]
    p["status"]["podIP"] = ip
    return p


def namespace(name: str, rv: str, **labels: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": name, "resourceVersion": rv, "labels": labels},
    }


def ev(typ: str, obj: dict[str, Any]) -> dict[str, Any]:
    return {"type": typ, "object": obj}


def bookmark(rv: str) -> dict[str, Any]:
    return ev("BOOKMARK", {"kind": "Pod", "apiVersion": "v1", "metadata": {"resourceVersion": rv}})


GONE = ev(
    "ERROR",
    {
        "kind": "Status",
        "apiVersion": "v1",
        "status": "Failure",
        "reason": "Expired",
        "code": 410,
        "message": "too old resource version: 5 (9)",
    },
)


class FakeAPI:
    """Serves scripted lists (paginated) and watch streams per path, and records calls."""

    def __init__(self) -> None:
        self.lists: dict[str, list[tuple[list[dict[str, Any]], str]]] = {}
        self.streams: dict[str, list[list[dict[str, Any]] | Exception]] = {}
        self.calls: list[tuple[str, str, dict[str, str]]] = []
        self.expire_continue_once = False

    def request(
        self,
        method: str,
        path: str,
        *,
        query: list[tuple[str, str]] | None = None,
        body: Any = None,
    ) -> dict[str, Any]:
        q = dict(query or [])
        self.calls.append((method, path, q))
        if path not in self.lists:
            raise k8s.KubeAPIError(404, "the server could not find the requested resource")
        items, rv = self.lists[path][0]
        if len(self.lists[path]) > 1:
            self.lists[path].pop(0)
        limit = int(q.get("limit", len(items) or 1))
        start = int(q.get("continue") or 0)
        if start and self.expire_continue_once:
            self.expire_continue_once = False
            raise k8s.Gone(410, "The provided continue parameter is too old")
        page = items[start : start + limit]
        nxt = start + limit
        meta = {"resourceVersion": rv, **({"continue": str(nxt)} if nxt < len(items) else {})}
        return {"kind": "List", "apiVersion": "v1", "metadata": meta, "items": page}

    def stream(self, path: str, *, query: list[tuple[str, str]]) -> Iterator[dict[str, Any]]:
        self.calls.append(("WATCH", path, dict(query)))
        script = self.streams[path].pop(0)
        if isinstance(script, Exception):
            raise script
        yield from script


class RecordingStore(ConfigStore):
    def __init__(self) -> None:
        super().__init__()
        self.offers: list[tuple[str, Offer]] = []

    def offer(self, source: str, offer: Offer) -> list[ResourceKey]:
        self.offers.append((source, offer))
        return super().offer(source, offer)


@pytest.fixture
def api() -> FakeAPI:
    return FakeAPI()


@pytest.fixture
def store() -> RecordingStore:
    return RecordingStore()


def source(
    api: FakeAPI, store: ConfigStore, *kinds: k8s.WatchedKind, page: int = 500
) -> k8s.KubernetesSource:
    return k8s.KubernetesSource(api, store, kinds=list(kinds), page_size=page)


def names(store: ConfigStore, kind: str = "Workload") -> list[str]:
    return [e.key.name for e in store.entries(kind)]


PODS = k8s.PODS.path


def test_initial_list_is_one_offer_and_pages_are_followed(
    api: FakeAPI, store: RecordingStore
) -> None:
    api.lists[PODS] = [([pod(f"p{i}", f"10.244.0.{i + 10}", "5") for i in range(5)], "5")]
    api.streams[PODS] = [[]]
    src = source(api, store, k8s.PODS, page=2)
    src.watch_once(k8s.PODS, timeout=1)
    src.flush()
    assert len(store.offers) == 1 and len(store.offers[0][1].resources) == 5
    assert store.offers[0][0] == "kubernetes:core/pods"
    lists = [q for m, p, q in api.calls if m == "GET"]
    assert [q.get("continue") for q in lists] == [None, "2", "4"]
    (watch,) = [q for m, p, q in api.calls if m == "WATCH"]
    assert watch["resourceVersion"] == "5" and watch["allowWatchBookmarks"] == "true"


def test_events_change_the_store_and_noise_does_not(api: FakeAPI, store: RecordingStore) -> None:
    a, b = pod("a", "10.244.0.10", "5"), pod("b", "10.244.0.11", "5")
    api.lists[PODS] = [([a], "5")]
    a_status_only = copy.deepcopy(a)
    a_status_only["metadata"]["resourceVersion"] = "7"
    a_status_only["status"]["conditions"][0]["lastTransitionTime"] = "2030-01-01T00:00:00Z"
    a_not_ready = copy.deepcopy(a_status_only)
    a_not_ready["metadata"]["resourceVersion"] = "8"
    for c in a_not_ready["status"]["conditions"]:
        if c["type"] == "Ready":
            c["status"] = "False"
    api.streams[PODS] = [
        [ev("ADDED", b)],
        [ev("MODIFIED", a_status_only)],
        [ev("MODIFIED", a_not_ready), ev("DELETED", b)],
    ]
    src = source(api, store, k8s.PODS)
    src.watch_once(k8s.PODS, timeout=1)
    src.flush()
    assert names(store) == ["a", "b"]
    n = len(store.offers)
    src.watch_once(k8s.PODS, timeout=1)
    assert src.flush() == [] and len(store.offers) == n  # a status heartbeat offers nothing
    src.watch_once(k8s.PODS, timeout=1)
    changed = src.flush()
    assert names(store) == ["a"] and len(changed) == 2
    assert store.entries("Workload")[0].resource.spec.ready is False  # type: ignore[attr-defined]


def test_bookmarks_and_events_move_the_resume_point(api: FakeAPI, store: RecordingStore) -> None:
    api.lists[PODS] = [([], "5")]
    api.streams[PODS] = [[bookmark("12")], [ev("ADDED", pod("a", "10.244.0.10", "13"))], []]
    src = source(api, store, k8s.PODS)
    for _ in range(3):
        src.watch_once(k8s.PODS, timeout=1)
    watches = [q["resourceVersion"] for m, _, q in api.calls if m == "WATCH"]
    assert watches == ["5", "12", "13"]
    assert [m for m, _, _ in api.calls].count("GET") == 1  # resumed, never relisted


@pytest.mark.parametrize("gone", ["event", "http"])
def test_410_gone_relists_and_replaces_the_kind(
    api: FakeAPI, store: RecordingStore, gone: str
) -> None:
    a, b, c = (pod(n, f"10.244.0.{i + 10}", "5") for i, n in enumerate("abc"))
    # b was deleted while we were away; c appeared: only a fresh list can tell.
    api.lists[PODS] = [([a, b], "5"), ([a, c], "40")]
    api.streams[PODS] = [[GONE] if gone == "event" else k8s.Gone(410, "Expired"), []]
    src = source(api, store, k8s.PODS)
    src.watch_once(k8s.PODS, timeout=1)
    src.flush()
    assert names(store) == ["a", "b"]
    src.watch_once(k8s.PODS, timeout=1)
    src.flush()
    assert names(store) == ["a", "c"]
    assert [q.get("resourceVersion") for m, _, q in api.calls if m == "WATCH"] == ["5", "40"]


def test_an_expired_list_continuation_restarts_the_list(
    api: FakeAPI, store: RecordingStore
) -> None:
    api.lists[PODS] = [([pod(f"p{i}", f"10.244.0.{i + 10}", "5") for i in range(3)], "5")]
    api.expire_continue_once = True
    items, rv = source(api, store, k8s.PODS, page=2).list_all(k8s.PODS)
    assert len(items) == 3 and rv == "5"
    assert [q.get("continue") for m, _, q in api.calls] == [None, "2", None, "2"]


def test_unchanged_objects_keep_their_identity_across_a_relist(
    api: FakeAPI, store: RecordingStore
) -> None:
    """The store skips an unchanged object by identity: a relist of 10,000 pods must not
    re-serialise 10,000 Workloads."""
    a = pod("a", "10.244.0.10", "5")
    src = source(api, store, k8s.PODS)
    src.replace(k8s.PODS, [a], "5")
    first = src.views[k8s.PODS].resources[("default", "a")]
    src.replace(k8s.PODS, [copy.deepcopy(a)], "9")
    assert src.views[k8s.PODS].resources[("default", "a")] is first


def test_namespace_enrollment_flips_its_pods(api: FakeAPI, store: RecordingStore) -> None:
    ns_path = k8s.NAMESPACES.path
    api.lists[ns_path] = [([namespace("default", "3")], "3")]
    api.lists[PODS] = [
        (
            [
                pod("a", "10.244.0.10", "5"),
                pod("b", "10.244.0.11", "5", **{k8s.MESH_LABEL: "disabled"}),
            ],
            "5",
        )
    ]
    api.streams[ns_path] = [
        [ev("MODIFIED", namespace("default", "6", **{k8s.MESH_LABEL: "enabled"}))]
    ]
    src = source(api, store, k8s.NAMESPACES, k8s.PODS)
    src.scan()
    mesh = {e.key.name: e.resource.spec.mesh for e in store.entries("Workload")}  # type: ignore[attr-defined]
    assert mesh == {"a": False, "b": False}
    src.watch_once(k8s.NAMESPACES, timeout=1)
    src.flush()
    mesh = {e.key.name: e.resource.spec.mesh for e in store.entries("Workload")}  # type: ignore[attr-defined]
    assert mesh == {"a": True, "b": False}  # b opted out with its own label


def test_an_invalid_update_keeps_the_last_good_version(api: FakeAPI, store: RecordingStore) -> None:
    a = pod("a", "10.244.0.10", "5")
    broken = copy.deepcopy(a)
    broken["metadata"]["resourceVersion"] = "6"
    broken["status"]["podIPs"] = [{"ip": "not-an-ip"}]
    api.lists[PODS] = [([a], "5")]
    api.streams[PODS] = [[ev("MODIFIED", broken)], [ev("DELETED", broken)]]
    src = source(api, store, k8s.PODS)
    src.scan()  # the good version reaches the store
    src.watch_once(k8s.PODS, timeout=1)
    src.flush()
    (entry,) = store.entries("Workload")
    assert str(entry.resource.spec.addresses[0]) == "10.244.0.10"  # type: ignore[attr-defined]
    rejected = store.rejections()
    assert rejected and {r.problems[0].resource for r in rejected} == {"Pod default/a"}
    src.watch_once(k8s.PODS, timeout=1)
    src.flush()
    assert names(store) == [] and store.rejections() == []


def test_scan_lists_everything_once_and_skips_kinds_the_cluster_lacks(
    api: FakeAPI, store: RecordingStore
) -> None:
    api.lists[PODS] = [([pod("a", "10.244.0.10", "5")], "5")]
    src = source(api, store, k8s.PODS, k8s.HTTPROUTES)  # no HTTPRoute CRD: 404
    assert src.scan() == 1
    assert src.scan() == 0  # later scans (weft policy apply) do not relist the cluster
    assert [p for m, p, _ in api.calls if m == "GET"] == [PODS, k8s.HTTPROUTES.path]


def test_run_kind_waits_and_retries_when_a_crd_is_missing(
    api: FakeAPI, store: RecordingStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = source(api, store, k8s.HTTPROUTES)
    waits: list[float] = []

    def wait(t: float) -> bool:
        waits.append(t)
        src.stop()
        return True

    monkeypatch.setattr(src._stop, "wait", wait)
    src.run_kind(k8s.HTTPROUTES)
    assert waits == [k8s.RETRY_MISSING]


def test_watched_kinds_follow_the_registry() -> None:
    from controller.crds import weft_kinds

    weft = {wk.kind for wk in k8s.watched_kinds() if wk.group == "weft.dev" and not wk.status_of}
    assert weft == {cls.KIND for cls in weft_kinds()}
    # The rollouts' status is read apart, as the controller-written RolloutState.
    assert k8s.ROLLOUT_STATES in k8s.watched_kinds()
    assert k8s.ROLLOUT_STATES.source_id == "kubernetes:weft.dev/rollouts/status"
    assert k8s.watched_kinds()[0] is k8s.NAMESPACES


# ---- the real client boundary, against a loopback HTTP server ---------------------------


def test_kube_rest_lists_and_streams_through_the_official_client() -> None:
    """KubeRest over kubernetes.client.ApiClient (no cluster): a list page, a watch stream
    of newline-delimited events, and a 410 answer becoming Gone."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from kubernetes import client

    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            seen.append(self.path)
            if "watch=true" in self.path and "resourceVersion=1" in self.path:
                body = b"".join(
                    json.dumps(e).encode() + b"\n"
                    for e in (ev("ADDED", pod("a", "10.244.0.10", "2")), bookmark("3"))
                )
                code = 200
            elif "watch=true" in self.path:
                body, code = json.dumps(GONE["object"]).encode(), 410
            else:
                body = json.dumps(
                    {"kind": "PodList", "metadata": {"resourceVersion": "1"}, "items": []}
                ).encode()
                code = 200
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        cfg = client.Configuration(host=f"http://127.0.0.1:{server.server_address[1]}")
        rest = k8s.KubeRest(client.ApiClient(cfg))
        assert (
            rest.request("GET", PODS, query=[("limit", "500")])["metadata"]["resourceVersion"]
            == "1"
        )
        events = list(rest.stream(PODS, query=[("watch", "true"), ("resourceVersion", "1")]))
        assert [e["type"] for e in events] == ["ADDED", "BOOKMARK"]
        with pytest.raises(k8s.Gone):
            list(rest.stream(PODS, query=[("watch", "true"), ("resourceVersion", "0")]))
        store = RecordingStore()
        src = k8s.KubernetesSource(rest, store, kinds=[k8s.PODS])
        src.watch_once(k8s.PODS, timeout=5)
        src.flush()
        assert names(store) == ["a"] and src.views[k8s.PODS].resource_version == "3"
        assert seen[0] == "/api/v1/pods?limit=500"
    finally:
        server.shutdown()
