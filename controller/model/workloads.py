"""Workloads and Services: who runs where, and the stable names callers use.

`Workload` is weft's own, source-neutral view of a pod: the Kubernetes source derives it
from a Pod (and its Namespace's labels), the lab writes it directly. `Service` is the
Kubernetes v1 Service shape; endpoints are the meshed workloads its selector matches.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Annotated, ClassVar, Literal

from pydantic import BeforeValidator, Field, field_validator

from controller.model.base import (
    DnsLabel,
    Model,
    ObjectName,
    Resource,
    check_labels,
    register,
)


class _TextIPv4Address(ipaddress.IPv4Address):
    """An IPv4Address that keeps the text it was parsed from, which is the text str()
    would give: inet_pton takes only the canonical dotted form (four decimal octets, no
    leading zeros). str() formats the octets in Python; a snapshot's indexes, its JSON
    and the tunnel's lookups ask for an address's text over and over. Otherwise an
    IPv4Address: equal, hashed and ordered as one, and copied or pickled as a plain one."""

    __slots__ = ("_text",)
    _text: str  # set by _fast_ip, which alone makes these
    _ip: int  # IPv4Address's own slot: the address as an integer

    def __str__(self) -> str:
        return self._text

    def __repr__(self) -> str:
        return f"IPv4Address({self._text!r})"

    def __reduce__(self) -> tuple[type[ipaddress.IPv4Address], tuple[str]]:
        return ipaddress.IPv4Address, (self._text,)


def _fast_ip(v: object) -> object:
    """A dotted IPv4 address parsed by the C library (inet_pton), which is strict about
    the form: ipaddress parses octets in Python, the largest cost of validating a large
    snapshot. Anything else goes to ipaddress, which says what is wrong."""
    if type(v) is str and "." in v and ":" not in v:
        try:
            packed = socket.inet_pton(socket.AF_INET, v)
        except OSError:
            return v
        # What IPv4Address(packed) does, without its Python checks of what inet_pton has
        # checked already (they were most of the cost of an address: 10,000 a snapshot).
        # tests/unit/test_config_decode.py holds the result to IPv4Address in every way.
        a = _new_address(_TextIPv4Address)
        a._ip = int.from_bytes(packed)
        a._text = v
        return a
    return v


_new_address = object.__new__


# An address of a workload or node, IPv4 or IPv6 (validated either way).
def ip_text(a: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """An address as text: the text it was parsed from when it kept it, an IPv4Address
    by the C library (str() formats octets in Python, a large cost when a snapshot's
    addresses are indexed)."""
    if type(a) is _TextIPv4Address:
        return a._text
    return socket.inet_ntoa(a.packed) if type(a) is ipaddress.IPv4Address else str(a)


# Left to right: an address _fast_ip already made an IPv4Address is taken by the first
# member, instead of pydantic's smart mode also trying it as IPv6 (14 us an address).
IPAddress = Annotated[
    ipaddress.IPv4Address | ipaddress.IPv6Address,
    Field(union_mode="left_to_right"),
    BeforeValidator(_fast_ip),
]

WEFT_API = "weft.dev/v1alpha1"
USE_WAYPOINT_LABEL = "weft.dev/use-waypoint"  # on a Service or Namespace: route L7 via it
# Istio's spelling of the same label, read as written (Istio users label namespaces with it).
ISTIO_USE_WAYPOINT_LABEL = "istio.io/use-waypoint"
NO_WAYPOINT = "none"  # a Service's value that opts it out of its namespace's waypoint
# Istio's label naming the namespace of the waypoint (cross-namespace use, Istio 1.23+).
# weft waypoints serve their own namespace: a Service that names another gets a waypoint
# name no instance can have ("ns/name"), so its L7 traffic is refused, and its policies'
# conditions say why, rather than it silently using a same-named waypoint of its own.
ISTIO_USE_WAYPOINT_NAMESPACE_LABEL = "istio.io/use-waypoint-namespace"


def use_waypoint(labels: dict[str, str]) -> str | None:
    """The use-waypoint label's value in `labels` (weft's, else Istio's), None when neither
    is set. `none` is a value: it opts a Service out of its namespace's waypoint."""
    v = labels.get(USE_WAYPOINT_LABEL) or labels.get(ISTIO_USE_WAYPOINT_LABEL)
    return v or None


def with_namespace_waypoint(
    labels: dict[str, str], namespace_labels: dict[str, str] | None
) -> dict[str, str]:
    """A Service's labels with its namespace's use-waypoint applied (Istio's precedence: the
    Service's own label, `none` included, wins over the namespace's)."""
    if use_waypoint(labels) is not None:
        return labels
    ns_labels = namespace_labels or {}
    inherited = use_waypoint(ns_labels)
    if not inherited:
        return labels
    out = {**labels, USE_WAYPOINT_LABEL: inherited}
    if ISTIO_USE_WAYPOINT_NAMESPACE_LABEL in ns_labels:
        out[ISTIO_USE_WAYPOINT_NAMESPACE_LABEL] = ns_labels[ISTIO_USE_WAYPOINT_NAMESPACE_LABEL]
    return out


WAYPOINT_LABEL = "weft.dev/waypoint"  # on a waypoint's pods: the waypoint's name


def spiffe_id(trust_domain: str, namespace: str, service_account: str) -> str:
    return f"spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"


class WorkloadSpec(Model):
    service_account: DnsLabel = Field("default", alias="serviceAccount")
    node: ObjectName  # node names are DNS subdomains (EKS: ip-10-0-1-2.eu-west-1.compute.internal)
    addresses: list[IPAddress] = Field(min_length=1)
    mesh: bool = Field(True, description="Enrolled: traffic is captured and tunnelled.")
    # Where the agent attaches the pod's eBPF programs: a cgroup v2 path relative to the
    # cgroup root (lab), or empty to find it from podUID under the kubelet tree.
    cgroup: str | None = None
    pod_uid: str | None = Field(None, alias="podUID")
    # Ports that accept plaintext even in STRICT mode (kubelet probes, from the pod spec).
    probe_ports: list[int] = Field(default_factory=list, alias="probePorts")
    # Ports the workload listens on (containerPorts); with Service target ports they are
    # what the same-node fast path may splice.
    ports: list[int] = Field(default_factory=list)

    waypoint: str | None = Field(
        None,
        description="Name of the waypoint serving this "
        "workload's own traffic (rare; usually set per Service).",
    )
    ready: bool = True
    phase: Literal["Pending", "Running", "Succeeded", "Failed", "Unknown"] = "Running"

    @field_validator("probe_ports", "ports")
    @classmethod
    def _ports(cls, v: list[int]) -> list[int]:
        for p in v:
            if not 1 <= p <= 65535:
                raise ValueError(f"port {p} is out of range 1-65535")
        return v


@register
class Workload(Resource):
    KIND: ClassVar[str] = "Workload"
    API_VERSIONS: ClassVar[tuple[str, ...]] = (WEFT_API,)

    spec: WorkloadSpec

    @property
    def labels(self) -> dict[str, str]:
        return self.metadata.labels

    def identity(self, trust_domain: str) -> str:
        return spiffe_id(trust_domain, self.namespace, self.spec.service_account)


class ServicePort(Model):
    name: DnsLabel | None = None
    port: int = Field(ge=1, le=65535)
    target_port: int | str | None = Field(None, alias="targetPort")
    protocol: Literal["TCP", "UDP", "SCTP"] = "TCP"
    app_protocol: str | None = Field(None, alias="appProtocol")
    node_port: int | None = Field(None, alias="nodePort")

    def target(self) -> int:
        return self.target_port if isinstance(self.target_port, int) else self.port


class ServiceSpec(Model):
    selector: dict[str, str] | None = None
    ports: list[ServicePort] = Field(default_factory=list)
    cluster_ip: str | None = Field(None, alias="clusterIP")
    cluster_ips: list[str] | None = Field(None, alias="clusterIPs")
    type: Literal["ClusterIP", "NodePort", "LoadBalancer", "ExternalName"] = "ClusterIP"
    # Fields a real API object carries that weft does not act on; accepted so recorded
    # objects from a cluster validate unchanged.
    session_affinity: str | None = Field(None, alias="sessionAffinity")
    ip_families: list[str] | None = Field(None, alias="ipFamilies")
    ip_family_policy: str | None = Field(None, alias="ipFamilyPolicy")
    internal_traffic_policy: str | None = Field(None, alias="internalTrafficPolicy")
    external_name: str | None = Field(None, alias="externalName")

    _sel = field_validator("selector")(lambda cls, v: check_labels(v) if v else v)

    def vips(self) -> list[str]:
        ips = list(self.cluster_ips or [])
        if self.cluster_ip and self.cluster_ip not in ips:
            ips.insert(0, self.cluster_ip)
        return [ip for ip in ips if ip and ip != "None"]


def _first_label(w: Workload, names: tuple[str, ...]) -> str | None:
    """The value of the first of these pod labels that `w` has (and is not empty)."""
    return next((v for n in names if (v := w.labels.get(n))), None)


def workload_name(w: Workload | None) -> str:
    """The `*_workload` metric label. Istio reports the owning workload (Deployment), not the
    pod; weft's Workload carries an `app` label where a Deployment name would be; else the
    pod name. This keeps cardinality per workload, not per pod."""
    if w is None:
        return "unknown"
    return _first_label(w, ("app.kubernetes.io/name", "app")) or w.name


def workload_version(w: Workload | None) -> str:
    """The `*_version` metric label, as Istio sets it: the pod's `version` label (or
    app.kubernetes.io/version); "unknown" without one."""
    if w is None:
        return "unknown"
    return _first_label(w, ("version", "app.kubernetes.io/version")) or "unknown"


_CANONICAL_SERVICE = ("service.istio.io/canonical-name", "app.kubernetes.io/name", "app")
_CANONICAL_REVISION = (
    "service.istio.io/canonical-revision",
    "app.kubernetes.io/version",
    "version",
)


def canonical_service(w: Workload | None) -> str:
    """The `*_canonical_service` metric label, as Istio sets it: the pod's
    service.istio.io/canonical-name label, else app.kubernetes.io/name, else app, else the
    workload's name; "unknown" without a workload."""
    if w is None:
        return "unknown"
    return _first_label(w, _CANONICAL_SERVICE) or w.name


def canonical_revision(w: Workload | None) -> str:
    """The `*_canonical_revision` metric label, as Istio sets it: the pod's
    service.istio.io/canonical-revision label, else app.kubernetes.io/version, else version,
    else "latest"; "unknown" without a workload."""
    if w is None:
        return "unknown"
    return _first_label(w, _CANONICAL_REVISION) or "latest"


@register
class Service(Resource):
    KIND: ClassVar[str] = "Service"
    API_VERSIONS: ClassVar[tuple[str, ...]] = ("v1",)

    spec: ServiceSpec
    status: dict[str, object] | None = None

    def semantic_check(self) -> list[tuple[tuple[str | int, ...], str]]:
        out: list[tuple[tuple[str | int, ...], str]] = []
        seen: set[int] = set()
        for i, p in enumerate(self.spec.ports):
            if p.port in seen:
                out.append((("spec", "ports", i, "port"), f"duplicate port {p.port}"))
            seen.add(p.port)
        for ip in self.spec.vips():
            try:
                ipaddress.ip_address(ip)
            except ValueError:
                out.append((("spec", "clusterIP"), f"{ip!r} is not an IP address"))
        return out

    @property
    def waypoint(self) -> str | None:
        """The waypoint this Service's L7 traffic goes through (weft.dev/use-waypoint or
        istio.io/use-waypoint; sources apply the namespace's label), None for none."""
        v = use_waypoint(self.metadata.labels)
        if v is None or v == NO_WAYPOINT:
            return None
        elsewhere = self.metadata.labels.get(ISTIO_USE_WAYPOINT_NAMESPACE_LABEL)
        if elsewhere and elsewhere != self.namespace:
            return f"{elsewhere}/{v}"  # matches no instance: refused, and said (status)
        return v

    def selects(self, w: Workload) -> bool:
        sel = self.spec.selector
        return (
            bool(sel)
            and w.namespace == self.namespace
            and all(w.labels.get(k) == v for k, v in (sel or {}).items())
        )

    def port(self, number: int) -> ServicePort | None:
        return next((p for p in self.spec.ports if p.port == number), None)


class NodeSpec(Model):
    addresses: list[IPAddress] = Field(min_length=1)
    tunnel_port: int = Field(15008, alias="tunnelPort", ge=1, le=65535)


@register
class Node(Resource):
    """A node's tunnel endpoint: where HBONE for its workloads goes (addresses[0]:15008).

    The Kubernetes source derives it from core/v1 Node (InternalIP); the lab writes it.
    """

    KIND: ClassVar[str] = "Node"
    API_VERSIONS: ClassVar[tuple[str, ...]] = (WEFT_API,)
    NAMESPACED: ClassVar[bool] = False

    spec: NodeSpec

    @property
    def tunnel_address(self) -> tuple[str, int]:
        return str(self.spec.addresses[0]), self.spec.tunnel_port
