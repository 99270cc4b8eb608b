"""The Kubernetes API as a config source: list + watch, converted into weft's model.

What is read, and what it becomes:

    Namespace                      labels only: weft.dev/mesh=enabled enrolls its pods
    Pod                            Workload (one per pod with a node and an address)
    Node (core/v1)                 Node (weft.dev): the InternalIP addresses, tunnel :15008
    Service                        Service, the fields weft reads (selector, ports, IPs)
    HTTPRoute, AuthorizationPolicy,
    PeerAuthentication, weft.dev/* the same kinds, validated by the same models as files

Conversion is a set of pure functions (`pod_document`, `node_document`, `object_document`,
`convert`) from an API object (a dict, as the API server sends it) to the document the files
source would read for the same thing, then `parse_resource`: the Kubernetes source and the
files source share one validation path, so the same object gives the same model.

Feeding the store: one source id per watched kind (`kubernetes:<group>/<plural>`). The
initial list of a kind becomes one offer. Watch events change the source's own view of that
kind and mark it dirty; a flusher offers the whole kind again at most every
`FLUSH_INTERVAL`. ConfigStore.offer skips objects that are the very same Python object as
before, so an offer of 10,000 pods in which one changed costs a pass over 10,000 identity
checks (about 5 ms) and ships one Workload; per-event `ConfigStore.upsert` would pay that
pass for every event, and a rollout sends several events per pod. Events whose conversion
equals what is stored (status heartbeats, resourceVersion bumps) are dropped before that.

Watch protocol (client-go's reflector, minus informers): list with pagination, remember the
list's resourceVersion, watch from it with bookmarks; every event and bookmark advances
the resourceVersion, so a dropped connection resumes where it stopped; `410 Gone` (the
version fell out of etcd's window) means list again and replace the kind wholesale.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from controller.model.base import Resource, ResourceKey, kinds, parse_resource
from controller.model.gateway import is_waypoint_gateway
from controller.model.problems import InvalidConfig, Problem
from controller.model.workloads import (
    ISTIO_USE_WAYPOINT_NAMESPACE_LABEL,
    NO_WAYPOINT,
    Workload,
    WorkloadSpec,
    use_waypoint,
    with_namespace_waypoint,
)
from controller.sources.files import FileSource
from controller.store import ConfigStore, Offer

log = logging.getLogger("weft.source.kubernetes")

MESH_LABEL = "weft.dev/mesh"  # on a Namespace or a Pod: "enabled" or "disabled"
MESH_ENABLED = "enabled"
MESH_DISABLED = "disabled"
LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"
WEFT_ANNOTATION_PREFIX = "weft.dev/"  # the only pod annotations agents read
TUNNEL_PORT = 15008

# Seconds. The API server closes a watch after timeoutSeconds; 5-10 minutes (randomised so
# that many kinds do not reconnect together) is what client-go's reflector uses.
WATCH_TIMEOUT = (300, 600)
# The client-side read timeout must outlast the server's silence between events: bookmarks
# come about every minute, so 90 s without a byte means the connection is dead.
READ_TIMEOUT = 90.0
LIST_PAGE = 500  # objects per list page (client-go's default for paginated lists)
FLUSH_INTERVAL = 0.05  # seconds a burst of events is gathered into one offer
RETRY_MISSING = 60.0  # seconds between retries when a kind's CRD is not installed


# ---- the API boundary ------------------------------------------------------------------


class KubeAPIError(Exception):
    def __init__(self, status: int, reason: str, body: Any = None) -> None:
        super().__init__(f"{status} {reason}")
        self.status, self.reason, self.body = status, reason, body


class Gone(KubeAPIError):
    """410: a resourceVersion or continue token is older than the server still keeps."""


class KubeAPI(Protocol):
    """The two calls the controller makes: a JSON request and a watch stream of events."""

    def request(
        self,
        method: str,
        path: str,
        *,
        query: list[tuple[str, str]] | None = None,
        body: Any = None,
    ) -> dict[str, Any]: ...

    def stream(self, path: str, *, query: list[tuple[str, str]]) -> Iterator[dict[str, Any]]: ...


class KubeRest:
    """KubeAPI over the official client's ApiClient: authentication, TLS and token refresh
    come from the client; objects stay plain dicts (10,000 pods are not turned into typed
    client models only to be turned back into dicts)."""

    def __init__(self, api_client: Any) -> None:
        self.client = api_client

    @classmethod
    def connect(cls, kubeconfig: str | None = None) -> KubeRest:
        from kubernetes import client, config

        if kubeconfig:
            config.load_kube_config(config_file=kubeconfig)
        else:
            # In a pod: the projected service-account token, re-read when it rotates.
            config.load_incluster_config()
        return cls(client.ApiClient())

    def _call(
        self,
        method: str,
        path: str,
        query: list[tuple[str, str]] | None,
        body: Any,
        timeout: float | tuple[float, float],
    ) -> Any:
        headers = {"Accept": "application/json"}
        if body is not None:
            # PATCH is always a JSON merge patch here (status conditions).
            headers["Content-Type"] = (
                "application/merge-patch+json" if method == "PATCH" else "application/json"
            )
        m, url, hdrs, data, _ = self.client.param_serialize(
            method,
            path,
            query_params=query or [],
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        resp = self.client.call_api(m, url, hdrs, data, _request_timeout=timeout)
        if not 200 <= resp.status <= 299:
            raw = resp.read()
            try:
                status = json.loads(raw)
            except (ValueError, TypeError):
                status = {"message": raw.decode(errors="replace") if raw else ""}
            exc = Gone if resp.status == 410 else KubeAPIError
            raise exc(resp.status, status.get("message") or resp.reason or "", status)
        return resp

    def request(
        self,
        method: str,
        path: str,
        *,
        query: list[tuple[str, str]] | None = None,
        body: Any = None,
    ) -> dict[str, Any]:
        resp = self._call(method, path, query, body, (10.0, 60.0))
        out: dict[str, Any] = json.loads(resp.read())
        return out

    def stream(self, path: str, *, query: list[tuple[str, str]]) -> Iterator[dict[str, Any]]:
        from kubernetes.watch.watch import iter_resp_lines

        resp = self._call("GET", path, query, None, (10.0, READ_TIMEOUT))
        raw = resp.response
        try:
            for line in iter_resp_lines(raw):
                if line:
                    yield json.loads(line)
        finally:
            raw.release_conn()


# ---- what is watched -------------------------------------------------------------------


@dataclass(frozen=True)
class WatchedKind:
    kind: str  # as the API server names it (Pod, Node, AuthorizationPolicy)
    group: str  # "" for the core group
    version: str
    plural: str
    namespaced: bool = True
    required: bool = True  # core kinds must exist; CRDs from other projects may not
    # Read the objects' status instead (a Rollout's controller-written state becomes a
    # RolloutState), as a source of its own.
    status_of: bool = False

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def path(self) -> str:
        base = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        return f"{base}/{self.plural}"

    @property
    def source_id(self) -> str:
        return f"kubernetes:{self.group or 'core'}/{self.plural}" + (
            "/status" if self.status_of else ""
        )


NAMESPACES = WatchedKind("Namespace", "", "v1", "namespaces", namespaced=False)
NODES = WatchedKind("Node", "", "v1", "nodes", namespaced=False)
PODS = WatchedKind("Pod", "", "v1", "pods")
SERVICES = WatchedKind("Service", "", "v1", "services")
HTTPROUTES = WatchedKind(
    "HTTPRoute", "gateway.networking.k8s.io", "v1", "httproutes", required=False
)
GRPCROUTES = WatchedKind(
    "GRPCRoute", "gateway.networking.k8s.io", "v1", "grpcroutes", required=False
)
# Waypoints declared Istio's way (controller/model/gateway.py); Gateways of other classes
# belong to other controllers and are skipped.
GATEWAYS = WatchedKind("Gateway", "gateway.networking.k8s.io", "v1", "gateways", required=False)
AUTHORIZATION_POLICIES = WatchedKind(
    "AuthorizationPolicy", "security.istio.io", "v1", "authorizationpolicies", required=False
)
PEER_AUTHENTICATIONS = WatchedKind(
    "PeerAuthentication", "security.istio.io", "v1", "peerauthentications", required=False
)
# Where controller-judged canaries stand (controller/rollouts.py): the leader writes it to
# each Rollout's status.rollout, and every replica reads it back into its store, so every
# replica's agents (and their waypoints) apply the same weights.
ROLLOUT_STATES = WatchedKind(
    "RolloutState", "weft.dev", "v1alpha1", "rollouts", required=False, status_of=True
)
VIRTUAL_SERVICES = WatchedKind(
    "VirtualService", "networking.istio.io", "v1", "virtualservices", required=False
)
DESTINATION_RULES = WatchedKind(
    "DestinationRule", "networking.istio.io", "v1", "destinationrules", required=False
)


def weft_kinds() -> list[WatchedKind]:
    """weft.dev kinds from the model registry: a newly registered kind is watched too."""
    from controller.crds import GROUP, plural
    from controller.crds import weft_kinds as registered

    out = []
    for cls in registered():
        version = next(v for v in cls.API_VERSIONS if v.startswith(GROUP + "/")).split("/")[1]
        out.append(
            WatchedKind(
                cls.KIND,
                GROUP,
                version,
                plural(cls.KIND),
                namespaced=cls.NAMESPACED,
                required=False,
            )
        )
    return out


def watched_kinds() -> list[WatchedKind]:
    # Namespaces first: pods need their namespace's labels to decide enrollment. Core Nodes
    # before weft.dev Nodes, so a derived Node owns its name when both exist.
    return [
        NAMESPACES,
        NODES,
        PODS,
        SERVICES,
        HTTPROUTES,
        GRPCROUTES,
        GATEWAYS,
        AUTHORIZATION_POLICIES,
        PEER_AUTHENTICATIONS,
        VIRTUAL_SERVICES,
        DESTINATION_RULES,
        *weft_kinds(),
        ROLLOUT_STATES,
    ]


# ---- conversion: API objects -> documents the model reads ---------------------------------


def _meta(obj: dict[str, Any]) -> dict[str, Any]:
    m = obj.get("metadata")
    return m if isinstance(m, dict) else {}


def user_metadata(meta: dict[str, Any], *, annotations: bool = True) -> dict[str, Any]:
    """The metadata a user writes: server-populated fields (uid, resourceVersion,
    managedFields, creationTimestamp, ownerReferences, ...) are dropped so that status
    churn does not look like a change, and so the result equals what the files source reads
    for the same manifest."""
    out: dict[str, Any] = {"name": meta.get("name")}
    if meta.get("namespace"):
        out["namespace"] = meta["namespace"]
    if meta.get("labels"):
        out["labels"] = dict(meta["labels"])
    notes = {k: v for k, v in (meta.get("annotations") or {}).items() if k != LAST_APPLIED}
    if annotations and notes:
        out["annotations"] = notes
    return out


def mesh_enrolled(pod_labels: dict[str, str], namespace_labels: dict[str, str] | None) -> bool:
    """Enrollment follows Istio ambient's rules with weft's label: a pod label decides
    (enabled / disabled); without one, the namespace label does."""
    own = pod_labels.get(MESH_LABEL)
    if own in (MESH_ENABLED, MESH_DISABLED):
        return own == MESH_ENABLED
    return (namespace_labels or {}).get(MESH_LABEL) == MESH_ENABLED


def _containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """Containers that run for the pod's life: app containers and native sidecars
    (init containers with restartPolicy Always). Plain init containers have exited."""
    out = list(spec.get("containers") or [])
    out += [c for c in spec.get("initContainers") or [] if c.get("restartPolicy") == "Always"]
    return out


def container_ports(pod: dict[str, Any]) -> list[int]:
    """TCP containerPorts: what the pod listens on (UDP is not meshed)."""
    ports = {
        int(p["containerPort"])
        for c in _containers(pod.get("spec") or {})
        for p in c.get("ports") or []
        if p.get("containerPort") and p.get("protocol", "TCP") == "TCP"
    }
    return sorted(ports)


def probe_ports(pod: dict[str, Any]) -> list[int]:
    """Ports the kubelet probes (httpGet, tcpSocket, grpc of liveness, readiness and
    startup probes). The kubelet connects from the node without mTLS, so STRICT must let
    these through. Named ports resolve against the same container's ports."""
    out: set[int] = set()
    for c in _containers(pod.get("spec") or {}):
        named = {p["name"]: int(p["containerPort"]) for p in c.get("ports") or [] if p.get("name")}
        for probe_name in ("livenessProbe", "readinessProbe", "startupProbe"):
            probe = c.get(probe_name) or {}
            for handler in ("httpGet", "tcpSocket", "grpc"):
                h = probe.get(handler)
                if not isinstance(h, dict) or "port" not in h:
                    continue
                port = h["port"]
                if isinstance(port, str) and not port.isdigit():
                    if port in named:
                        out.add(named[port])
                    continue
                out.add(int(port))
    return sorted(out)


def _ready(status: dict[str, Any]) -> bool:
    return any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in status.get("conditions") or []
    )


def pod_addresses(status: dict[str, Any]) -> list[str]:
    ips = [p["ip"] for p in status.get("podIPs") or [] if p.get("ip")]
    if not ips and status.get("podIP"):
        ips = [status["podIP"]]  # servers before 1.16 sent podIP only
    return ips


def pod_document(
    pod: dict[str, Any], namespace_labels: dict[str, str] | None
) -> dict[str, Any] | None:
    """The Workload document for a pod, or None when the pod is not a workload (yet):

    - not scheduled or no address yet: nothing can reach it; its Workload comes with the
      MODIFIED event that gives it a node and an IP;
    - Succeeded or Failed: its address goes back to the pool and may already belong to a
      new pod, so keeping it would point identities at the wrong pod;
    - hostNetwork: it shares the node's address with every other host-network pod, so an
      address cannot name it, and its traffic is the node's own.
    """
    spec = pod.get("spec") or {}
    status = pod.get("status") or {}
    meta = _meta(pod)
    phase = status.get("phase") or "Pending"
    addresses = pod_addresses(status)
    if not spec.get("nodeName") or not addresses:
        return None
    if phase in ("Succeeded", "Failed") or spec.get("hostNetwork"):
        return None
    labels = dict(meta.get("labels") or {})
    wspec: dict[str, Any] = {
        "serviceAccount": spec.get("serviceAccountName") or spec.get("serviceAccount") or "default",
        "node": spec["nodeName"],
        "addresses": addresses,
        "mesh": mesh_enrolled(labels, namespace_labels),
        "podUID": meta.get("uid"),
        "probePorts": probe_ports(pod),
        "ports": container_ports(pod),
        "ready": _ready(status),
        "phase": phase,
    }
    own = use_waypoint(labels)
    if own and own != NO_WAYPOINT:
        wspec["waypoint"] = own
    md = user_metadata(meta, annotations=False)
    notes = {
        k: v
        for k, v in (meta.get("annotations") or {}).items()
        if k.startswith(WEFT_ANNOTATION_PREFIX)
    }
    if notes:
        md["annotations"] = notes
    return {
        "apiVersion": Workload.API_VERSIONS[0],
        "kind": "Workload",
        "metadata": md,
        "spec": {k: v for k, v in wspec.items() if v is not None},
    }


def node_document(node: dict[str, Any]) -> dict[str, Any] | None:
    """weft's Node for a core/v1 Node: where HBONE for its pods goes. InternalIP only:
    an ExternalIP is usually NATed and not where node-to-node traffic flows. Labels are
    left out (topology, instance type): agents do not read them and they churn."""
    addrs = [
        a["address"]
        for a in (node.get("status") or {}).get("addresses") or []
        if a.get("type") == "InternalIP" and a.get("address")
    ]
    if not addrs:
        return None
    return {
        "apiVersion": "weft.dev/v1alpha1",
        "kind": "Node",
        "metadata": {"name": _meta(node).get("name")},
        "spec": {"addresses": addrs, "tunnelPort": TUNNEL_PORT},
    }


def _service_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """The Service fields the model has; the rest (externalTrafficPolicy, loadBalancer*,
    sessionAffinityConfig, trafficDistribution ...) change nothing weft does. Dropping them
    here, for Services only, keeps a LoadBalancer Service from being rejected. Policy kinds
    are not projected: an unknown field there could narrow who is allowed, and ignoring it
    would widen access, so they stay strict and an unknown field is a rejection."""
    from controller.model.workloads import ServicePort, ServiceSpec

    known = {f.alias or n for n, f in ServiceSpec.model_fields.items()}
    port_known = {f.alias or n for n, f in ServicePort.model_fields.items()}
    out = {k: v for k, v in spec.items() if k in known}
    if isinstance(out.get("ports"), list):
        out["ports"] = [
            {k: v for k, v in p.items() if k in port_known} if isinstance(p, dict) else p
            for p in out["ports"]
        ]
    return out


def object_document(obj: dict[str, Any]) -> dict[str, Any]:
    """A Service, HTTPRoute, AuthorizationPolicy, PeerAuthentication or weft.dev resource as
    the user wrote it: server-owned metadata and status dropped."""
    doc = {k: v for k, v in obj.items() if k not in ("metadata", "status")}
    doc["metadata"] = user_metadata(_meta(obj))
    if obj.get("kind") == "Service" and isinstance(doc.get("spec"), dict):
        doc["spec"] = _service_spec(doc["spec"])
    return doc


def _waypoint_labels(labels: dict[str, str]) -> tuple[str | None, str | None]:
    """What a Namespace's labels give its Services: the waypoint and Istio's namespace."""
    return use_waypoint(labels), labels.get(ISTIO_USE_WAYPOINT_NAMESPACE_LABEL)


def service_document(
    obj: dict[str, Any], namespace_labels: dict[str, str] | None = None
) -> dict[str, Any]:
    """A Service, with its namespace's use-waypoint label applied where it has none of its
    own (weft.dev/use-waypoint or istio.io/use-waypoint; `none` opts it out)."""
    doc = object_document(obj)
    doc["metadata"]["labels"] = with_namespace_waypoint(
        doc["metadata"].get("labels") or {}, namespace_labels
    )
    if not doc["metadata"]["labels"]:
        del doc["metadata"]["labels"]
    return doc


def rollout_state_document(obj: dict[str, Any]) -> dict[str, Any] | None:
    """A Rollout's status.rollout (written by the leading controller) as a RolloutState
    document; None while it has none."""
    status = obj.get("status")
    state = status.get("rollout") if isinstance(status, dict) else None
    if not isinstance(state, dict):
        return None
    m = _meta(obj)
    return {
        "apiVersion": "weft.dev/v1alpha1",
        "kind": "RolloutState",
        "metadata": {"name": m.get("name"), "namespace": m.get("namespace")},
        "spec": state,
    }


def describe_object(wk: WatchedKind, obj: dict[str, Any]) -> str:
    m = _meta(obj)
    return (
        f"{wk.kind} {m.get('namespace')}/{m.get('name')}"
        if wk.namespaced
        else (f"{wk.kind} {m.get('name')}")
    )


def convert(
    wk: WatchedKind, obj: dict[str, Any], namespace_labels: dict[str, str] | None = None
) -> Resource | None:
    """One API object to one validated resource (None: not a resource, see pod_document).
    Raises InvalidConfig, whose problems name the API object."""
    if wk.status_of:
        doc = rollout_state_document(obj)
    elif wk.kind == "Pod" and not wk.group:
        doc = pod_document(obj, namespace_labels)
    elif wk.kind == "Node" and not wk.group:
        doc = node_document(obj)
    elif wk is SERVICES:
        doc = service_document(obj, namespace_labels)
    elif wk is GATEWAYS and not is_waypoint_gateway(obj):
        doc = None  # an ingress gateway: another controller's
    else:
        doc = object_document(obj)
        doc.setdefault("apiVersion", wk.api_version)
        doc.setdefault("kind", wk.kind)
    if doc is None:
        return None
    try:
        return parse_resource(doc)
    except InvalidConfig as e:
        what = describe_object(wk, obj)
        raise InvalidConfig(
            [
                Problem(
                    p.reason,
                    file=f"kubernetes {wk.api_version}",
                    resource=what,
                    field=p.field,
                )
                for p in e.problems
            ]
        ) from None


def claimed_key(wk: WatchedKind, obj: dict[str, Any]) -> ResourceKey | None:
    """The store key an API object maps to, even when it does not validate."""
    target = {"Pod": "Workload"}.get(wk.kind, wk.kind) if not wk.group else wk.kind
    cls = kinds().get(target)
    m = _meta(obj)
    if cls is None or not m.get("name"):
        return None
    ns = (m.get("namespace") or cls.DEFAULT_NAMESPACE) if cls.NAMESPACED else ""
    return ResourceKey(cls.KIND, ns, m["name"])


# ---- the source ------------------------------------------------------------------------


ObjKey = tuple[str, str]  # (namespace or "", name) of an API object


@dataclass
class KindView:
    """What one watched kind currently provides to the store."""

    resources: dict[ObjKey, Resource] = field(default_factory=dict)
    problems: dict[ObjKey, tuple[list[Problem], ResourceKey | None]] = field(default_factory=dict)
    pod_mesh: dict[ObjKey, str | None] = field(default_factory=dict)  # pods: own label
    # Services as the API has them: re-derived when their namespace's use-waypoint changes.
    raw: dict[ObjKey, dict[str, Any]] = field(default_factory=dict)
    resource_version: str | None = None
    synced: bool = False

    def offer(self) -> Offer:
        return Offer(
            resources=list(self.resources.values()),
            problems=[p for ps, _ in self.problems.values() for p in ps],
            claimed={k for _, k in self.problems.values() if k is not None},
        )


def _obj_key(obj: dict[str, Any]) -> ObjKey:
    m = _meta(obj)
    return (m.get("namespace") or "", m.get("name") or "")


class KubernetesSource:
    """List + watch every weft-relevant kind; feed the store one offer per kind."""

    def __init__(
        self,
        api: KubeAPI,
        store: ConfigStore,
        *,
        kinds: list[WatchedKind] | None = None,
        page_size: int = LIST_PAGE,
        files: FileSource | None = None,
    ) -> None:
        self.api = api
        self.store = store
        # A config directory beside the API (`weft policy apply`, ad-hoc files): merged into
        # the same store. In a pod it is an emptyDir, so durable config belongs in the API.
        self.files = files
        self._initial_sync_done = False
        self.kinds = kinds if kinds is not None else watched_kinds()
        self.page_size = page_size
        self.views: dict[WatchedKind, KindView] = {k: KindView() for k in self.kinds}
        self.namespace_labels: dict[str, dict[str, str]] = {}
        self._lock = threading.RLock()
        self._dirty: set[WatchedKind] = set()
        self._on_dirty: Callable[[], None] = lambda: None
        self._stop = threading.Event()

    # ---- state changes (called from watch threads; pure apart from the lock) -----------

    def _view(self, wk: WatchedKind) -> KindView:
        return self.views[wk]

    def _set(self, wk: WatchedKind, obj: dict[str, Any]) -> bool:
        """Record the current version of one object; True when what weft sees changed."""
        view = self._view(wk)
        key = _obj_key(obj)
        if wk is NAMESPACES:
            return self._set_namespace(key[1], dict(_meta(obj).get("labels") or {}))
        if wk is PODS:
            view.pod_mesh[key] = (_meta(obj).get("labels") or {}).get(MESH_LABEL)
        elif wk is SERVICES:
            view.raw[key] = obj
        try:
            res = convert(wk, obj, self.namespace_labels.get(key[0]))
        except InvalidConfig as e:
            had = view.problems.get(key)
            view.problems[key] = (e.problems, claimed_key(wk, obj))
            # Not offered any more, but claimed: the store keeps its last good version.
            view.resources.pop(key, None)
            return had is None or had[0] != e.problems
        had_problem = view.problems.pop(key, None) is not None
        if res is None:
            return view.resources.pop(key, None) is not None or had_problem
        cur = view.resources.get(key)
        if cur is not None and cur == res:
            return had_problem  # heartbeat, resourceVersion bump, status noise
        view.resources[key] = res
        return True

    def _delete(self, wk: WatchedKind, obj: dict[str, Any]) -> bool:
        key = _obj_key(obj)
        if wk is NAMESPACES:
            return self._set_namespace(key[1], None)
        view = self._view(wk)
        view.pod_mesh.pop(key, None)
        view.raw.pop(key, None)
        gone = view.resources.pop(key, None) is not None
        return view.problems.pop(key, None) is not None or gone

    def _set_namespace(self, name: str, labels: dict[str, str] | None) -> bool:
        old = self.namespace_labels.get(name) or {}
        before = old.get(MESH_LABEL)
        if labels is None:
            self.namespace_labels.pop(name, None)
        else:
            self.namespace_labels[name] = labels
        if _waypoint_labels(old) != _waypoint_labels(labels or {}) and SERVICES in self.views:
            # Its Services inherit the namespace's waypoint: derive them again.
            services = self.views[SERVICES]
            changed = False
            for key, obj in list(services.raw.items()):
                if key[0] == name:
                    changed = self._set(SERVICES, obj) or changed
            if changed:
                self._mark(SERVICES)
        after = (labels or {}).get(MESH_LABEL)
        if before == after or PODS not in self.views:
            return False
        # The namespace's enrollment changed: re-derive `mesh` of its pods in place.
        pods = self.views[PODS]
        changed = False
        for key, w in list(pods.resources.items()):
            if key[0] != name or not isinstance(w, Workload):
                continue
            own = pods.pod_mesh.get(key)
            mesh = mesh_enrolled({MESH_LABEL: own} if own else {}, labels)
            if w.spec.mesh != mesh:
                spec: WorkloadSpec = w.spec.model_copy(update={"mesh": mesh})
                pods.resources[key] = w.model_copy(update={"spec": spec})
                changed = True
        if changed:
            self._mark(PODS)
        return False  # namespaces themselves are not offered

    def _mark(self, wk: WatchedKind) -> None:
        self._dirty.add(wk)
        self._on_dirty()

    def replace(self, wk: WatchedKind, items: list[dict[str, Any]], resource_version: str) -> None:
        """A fresh list of the kind: it replaces everything the kind provided."""
        with self._lock:
            if wk is NAMESPACES:
                seen = {_meta(o).get("name") for o in items}
                for name in [n for n in self.namespace_labels if n not in seen]:
                    self._set_namespace(name, None)
                for o in items:
                    self._set(wk, o)
            else:
                old = self.views[wk]
                view = KindView(resource_version=resource_version, synced=True)
                self.views[wk] = view
                for o in items:
                    key = _obj_key(o)
                    # Keep the previous Python object when unchanged: the store then skips
                    # it by identity rather than re-serialising it.
                    if key in old.resources:
                        view.resources[key] = old.resources[key]
                    self._set(wk, o)
            view_ = self.views[wk]
            view_.resource_version, view_.synced = resource_version, True
            if wk is not NAMESPACES:
                self._mark(wk)

    def apply_event(self, wk: WatchedKind, event: dict[str, Any]) -> str | None:
        """One watch event. Returns the resourceVersion to resume from; raises Gone."""
        typ = event.get("type")
        obj = event.get("object") or {}
        if typ == "ERROR":
            code = obj.get("code")
            if code == 410:
                raise Gone(410, obj.get("message", "resource version too old"), obj)
            raise KubeAPIError(int(code or 500), obj.get("message", "watch error"), obj)
        rv = _meta(obj).get("resourceVersion")
        with self._lock:
            if typ == "BOOKMARK":
                pass  # only the resourceVersion moves on
            elif typ in ("ADDED", "MODIFIED"):
                if self._set(wk, obj):
                    self._mark(wk)
            elif typ == "DELETED":
                if self._delete(wk, obj):
                    self._mark(wk)
            else:
                log.warning("ignoring watch event of unknown type %r for %s", typ, wk.kind)
            if rv:
                self.views[wk].resource_version = rv
        return rv

    def flush(self) -> list[ResourceKey]:
        """Offer every kind that changed since the last flush; returns the changed keys."""
        with self._lock:
            dirty, self._dirty = self._dirty, set()
            offers = [(wk, self.views[wk].offer()) for wk in self.kinds if wk in dirty]
        changed: list[ResourceKey] = []
        for wk, offer in offers:
            changed += self.store.offer(wk.source_id, offer)
        return changed

    # ---- the controller's source interface (as FileSource) ---------------------------

    def source_id(self, path: Path) -> str:
        """Where `weft policy apply` stores a resource: the config directory's source."""
        return self.files.source_id(path) if self.files else f"file:{path}"

    def scan(self) -> int:
        """Rescan the config directory; the first call also lists every kind once, so the
        controller starts serving with the cluster's state rather than an empty store."""
        n = self.files.scan() if self.files else 0
        if not self._initial_sync_done:
            self._initial_sync_done = True
            for wk in self.kinds:
                try:
                    self.sync(wk)
                except KubeAPIError as e:
                    if not (e.status == 404 and not wk.required):
                        log.warning("%s: initial list failed (%s); the watch retries", wk.kind, e)
                except Exception as e:
                    log.warning("%s: initial list failed (%s); the watch retries", wk.kind, e)
            n += len(self.flush())
        return n

    # ---- I/O: list and watch ----------------------------------------------------------

    def list_all(self, wk: WatchedKind) -> tuple[list[dict[str, Any]], str]:
        """Every object of the kind, a page at a time; restarts if a page token expires."""
        while True:
            items: list[dict[str, Any]] = []
            token = ""
            try:
                while True:
                    q = [("limit", str(self.page_size))]
                    if token:
                        q.append(("continue", token))
                    page = self.api.request("GET", wk.path, query=q)
                    items += page.get("items") or []
                    meta = page.get("metadata") or {}
                    token = meta.get("continue") or ""
                    if not token:
                        return items, str(meta.get("resourceVersion") or "")
            except Gone:
                log.info("%s: list continuation expired; listing again", wk.kind)

    def sync(self, wk: WatchedKind) -> None:
        items, rv = self.list_all(wk)
        self.replace(wk, items, rv)
        log.info("%s: listed %d object(s) at resourceVersion %s", wk.kind, len(items), rv)

    def watch_once(self, wk: WatchedKind, timeout: int | None = None) -> None:
        """List if needed, then follow one watch stream until the server ends it."""
        view = self.views[wk]
        if not view.synced or view.resource_version is None:
            self.sync(wk)
        rv = self.views[wk].resource_version or ""
        q = [
            ("watch", "true"),
            ("allowWatchBookmarks", "true"),
            ("resourceVersion", rv),
            ("timeoutSeconds", str(timeout or random.randint(*WATCH_TIMEOUT))),
        ]
        try:
            for event in self.api.stream(wk.path, query=q):
                self.apply_event(wk, event)
                if self._stop.is_set():
                    return
        except Gone:
            log.info("%s: resourceVersion %s expired (410); listing again", wk.kind, rv)
            with self._lock:
                self.views[wk].synced = False

    def run_kind(self, wk: WatchedKind) -> None:
        """A kind's watch loop, forever (a thread): retries with backoff, keeps state."""
        delay = 1.0
        while not self._stop.is_set():
            try:
                self.watch_once(wk)
                delay = 1.0
            except KubeAPIError as e:
                if e.status == 404 and not wk.required:
                    log.warning(
                        "%s (%s) is not served by this cluster; install its CRD to use it "
                        "(see docs/install.md). Checking again in %.0f s",
                        wk.kind,
                        wk.api_version,
                        RETRY_MISSING,
                    )
                    self._stop.wait(RETRY_MISSING)
                    continue
                hint = (
                    " (RBAC: is the controller's ClusterRole installed?)" if e.status == 403 else ""
                )
                log.warning("%s: %s%s; retrying in %.1f s", wk.kind, e, hint, delay)
                self._stop.wait(delay)
                delay = min(delay * 2, 60.0)
            except Exception as e:  # network errors, timeouts: resume from the last version
                log.warning("%s: watch failed (%s); retrying in %.1f s", wk.kind, e, delay)
                self._stop.wait(delay)
                delay = min(delay * 2, 60.0)

    async def run(self) -> None:
        """Watch every kind in its own thread; flush changes into the store."""
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()

        def on_dirty() -> None:
            loop.call_soon_threadsafe(wake.set)

        self._on_dirty = on_dirty
        # Namespaces first, so the first list of pods knows every namespace's enrollment.
        if NAMESPACES in self.views and not self.views[NAMESPACES].synced:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self.sync, NAMESPACES)
        threads = [
            threading.Thread(
                target=self.run_kind, args=(wk,), name=f"watch-{wk.plural}", daemon=True
            )
            for wk in self.kinds
        ]
        for t in threads:
            t.start()
        files = asyncio.create_task(self.files.run(), name="file-source") if self.files else None
        try:
            while True:
                await wake.wait()
                wake.clear()
                await asyncio.sleep(FLUSH_INTERVAL)  # gather a burst into one offer
                keys = await asyncio.to_thread(self.flush)
                if keys:
                    log.debug("kubernetes: %d resource(s) changed", len(keys))
        finally:
            self._stop.set()  # threads notice at their next event or timeout
            if files is not None:
                files.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await files

    def stop(self) -> None:
        self._stop.set()

    def wait_synced(self, timeout: float = 30.0) -> bool:
        """True once every required kind has been listed (tests and start-up ordering)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if all(v.synced for k, v in self.views.items() if k.required):
                    return True
            time.sleep(0.05)
        return False
