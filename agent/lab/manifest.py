"""The lab manifest: nodes, namespaces, pods and services of a one-machine mesh.

A manifest is validated completely, and every address is allocated, before `weft lab up`
touches the kernel: a bad manifest fails with the file, line, field and reason and leaves
nothing behind.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from controller.model.problems import (
    InvalidConfig,
    Loc,
    Problem,
    format_loc,
    line_of,
    problems_from_validation,
)
from controller.model.workloads import with_namespace_waypoint
from controller.model.yamldoc import Document, load_documents

DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
# Lab names prefix netns names and interface-name hashes; keep them short and plain.
LAB_NAME = r"^[a-z][a-z0-9-]{0,19}$"
Name = Annotated[str, Field(pattern=DNS_LABEL, max_length=63)]

# Label keys follow Kubernetes: optional DNS prefix, then a name segment.
_LABEL_KEY = re.compile(
    r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
)
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$")

MESH_LABEL = "weft.dev/mesh"  # namespace (or pod) label that enrolls workloads: "enabled"


def _check_labels(v: dict[str, str]) -> dict[str, str]:
    for k, val in v.items():
        if not _LABEL_KEY.match(k) or len(k) > 316:
            raise ValueError(f"label key {k!r} is not a valid Kubernetes label key")
        if not isinstance(val, str) or not _LABEL_VALUE.match(val) or len(val) > 63:
            raise ValueError(f"label {k}={val!r}: value is not a valid Kubernetes label value")
    return v


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)


class Metadata(_Strict):
    name: Annotated[str, Field(pattern=LAB_NAME)] = "weft"


class Network(_Strict):
    node_cidr: ipaddress.IPv4Network = Field(
        ipaddress.IPv4Network("10.0.0.0/24"),
        alias="nodeCIDR",
        description="The node network: .1 is the fabric (router), nodes get .11, .12, ...",
    )
    pod_cidr: ipaddress.IPv4Network = Field(ipaddress.IPv4Network("10.244.0.0/16"), alias="podCIDR")
    node_mask: int = Field(
        24,
        alias="podCIDRMaskSize",
        ge=8,
        le=30,
        description="Each node's pod range is a subnet of this size.",
    )
    service_cidr: ipaddress.IPv4Network = Field(
        ipaddress.IPv4Network("10.96.0.0/16"), alias="serviceCIDR"
    )

    @field_validator("node_cidr", "pod_cidr", "service_cidr", mode="before")
    @classmethod
    def _cidr(cls, v: object) -> object:
        if isinstance(v, str):
            try:
                ipaddress.IPv4Network(v, strict=True)
            except ValueError as e:
                raise ValueError(f"{v!r} is not an IPv4 CIDR with zero host bits ({e})") from None
        return v


class Node(_Strict):
    name: Name


class Namespace(_Strict):
    name: Name
    labels: dict[str, str] = Field(default_factory=dict)
    _v = field_validator("labels")(_check_labels)


class ProbePort(_Strict):
    port: int = Field(ge=1, le=65535)
    path: str | None = None  # httpGet only; the lab's kubelet does not send it


class LabProbe(_Strict):
    """A Kubernetes probe, reduced to what the mesh needs: which port the kubelet dials
    from the node (STRICT admits the node itself there, docs/security.md)."""

    http_get: ProbePort | None = Field(None, alias="httpGet")
    tcp_socket: ProbePort | None = Field(None, alias="tcpSocket")
    grpc: ProbePort | None = None
    period_seconds: int | None = Field(None, alias="periodSeconds", ge=1)

    @property
    def port(self) -> int | None:
        h = self.http_get or self.tcp_socket or self.grpc
        return h.port if h else None


class Pod(_Strict):
    name: Name
    namespace: Name = "default"
    node: Name
    service_account: Name = Field("default", alias="serviceAccount")
    labels: dict[str, str] = Field(default_factory=dict)
    ip: ipaddress.IPv4Address | None = None
    command: list[str] | None = Field(
        None,
        description="Started in the pod when the lab comes up, like a container entrypoint. "
        "A first word `python` is the Python weft runs on, with weft's packages (so "
        "`[python, -m, agent.lab.workloads.model_server, ...]` works as written).",
    )
    readiness_probe: LabProbe | None = Field(None, alias="readinessProbe")
    liveness_probe: LabProbe | None = Field(None, alias="livenessProbe")
    startup_probe: LabProbe | None = Field(None, alias="startupProbe")
    _v = field_validator("labels")(_check_labels)

    @property
    def probe_ports(self) -> tuple[int, ...]:
        probes = (self.readiness_probe, self.liveness_probe, self.startup_probe)
        return tuple(sorted({p.port for p in probes if p is not None and p.port is not None}))


class ServicePort(_Strict):
    name: Name | None = None
    port: int = Field(ge=1, le=65535)
    target_port: int | None = Field(None, alias="targetPort", ge=1, le=65535)
    protocol: Literal["TCP"] = "TCP"
    app_protocol: Literal["tcp", "http", "http2", "grpc"] | None = Field(None, alias="appProtocol")


class Service(_Strict):
    name: Name
    namespace: Name = "default"
    selector: dict[str, str]
    ports: list[ServicePort] = Field(min_length=1)
    cluster_ip: ipaddress.IPv4Address | None = Field(None, alias="clusterIP")
    labels: dict[str, str] = Field(default_factory=dict)
    _v = field_validator("labels", "selector")(_check_labels)


class LabSpec(_Strict):
    trust_domain: str = Field("cluster.local", alias="trustDomain", pattern=r"^[a-z0-9.-]+$")
    network: Network = Field(default_factory=Network)
    nodes: list[Node] = Field(min_length=1, max_length=200)
    namespaces: list[Namespace] = Field(default_factory=list)
    pods: list[Pod] = Field(default_factory=list)
    services: list[Service] = Field(default_factory=list)
    # Where the waypoints count token quotas (weft waypoint run --quota-store): unset, a
    # SQLite file per node (replicas on one node share it); `redis://SERVICE.NAMESPACE:PORT`
    # for one budget across nodes: the lab has no DNS and resolves a Service name to its
    # first pod's address (as a headless Service would); run redis-server in that pod.
    quota_store: str | None = Field(None, alias="quotaStore", min_length=1)
    # Start a Prometheus (Debian's) that scrapes the controller, every agent and every
    # waypoint each second, and give its URL to the controller (--prometheus-url), which
    # judges Rollouts with analysis.provider: prometheus from it.
    prometheus: bool = False


class LabManifest(_Strict):
    api_version: Literal["weft.dev/v1alpha1"] = Field(alias="apiVersion")
    kind: Literal["Lab"]
    metadata: Metadata = Field(default_factory=Metadata)
    spec: LabSpec


# ---- the plan: every name and address, decided before anything is created ------------


@dataclass(frozen=True)
class NodePlan:
    name: str
    index: int
    ip: ipaddress.IPv4Address
    pod_cidr: ipaddress.IPv4Network


@dataclass(frozen=True)
class PodPlan:
    name: str
    namespace: str
    node: str
    service_account: str
    labels: dict[str, str]
    ip: ipaddress.IPv4Address
    meshed: bool
    command: tuple[str, ...] | None
    probe_ports: tuple[int, ...] = ()

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class ServicePlan:
    name: str
    namespace: str
    selector: dict[str, str]
    ports: tuple[ServicePort, ...]
    cluster_ip: ipaddress.IPv4Address
    labels: dict[str, str]

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class LabPlan:
    name: str
    trust_domain: str
    fabric_ip: ipaddress.IPv4Address
    node_network: ipaddress.IPv4Network
    nodes: tuple[NodePlan, ...]
    pods: tuple[PodPlan, ...]
    services: tuple[ServicePlan, ...]
    namespaces: dict[str, dict[str, str]]
    source: str
    quota_store: str | None = None
    prometheus: bool = False

    def node(self, name: str) -> NodePlan:
        return next(n for n in self.nodes if n.name == name)

    def find_pod(self, ref: str) -> PodPlan | None:
        """`ns/name`, or a bare `name` when it is unique across namespaces."""
        if "/" in ref:
            return next((p for p in self.pods if p.key == ref), None)
        found = [p for p in self.pods if p.name == ref]
        return found[0] if len(found) == 1 else None


def default_manifest_path() -> Path:
    return Path(str(resources.files("agent.lab").joinpath("default-lab.yaml")))


def load_manifest(path: str | Path | None = None) -> LabPlan:
    """Read, validate and plan a lab manifest; raises InvalidConfig naming every problem."""
    p = Path(path) if path else default_manifest_path()
    shown = str(path) if path else "default-lab.yaml"
    try:
        text = p.read_text()
    except OSError as e:
        raise InvalidConfig([Problem(f"cannot read: {e.strerror}", file=shown)]) from None
    docs = load_documents(text, shown)
    if len(docs) != 1:
        raise InvalidConfig(
            [Problem(f"expected exactly one Lab document, found {len(docs)}", file=shown)]
        )
    return plan(docs[0])


def plan(doc: Document) -> LabPlan:
    resource = "Lab"
    if isinstance(doc.data, dict):
        meta = doc.data.get("metadata")
        if isinstance(meta, dict) and isinstance(meta.get("name"), str):
            resource = f"Lab {meta['name']}"
    if not isinstance(doc.data, dict):
        raise InvalidConfig(
            [Problem("a Lab manifest must be a mapping", file=doc.file, line=doc.line)]
        )
    try:
        m = LabManifest.model_validate(doc.data)
    except ValidationError as e:
        raise InvalidConfig(
            problems_from_validation(e, file=doc.file, resource=resource, lines=doc.lines)
        ) from None
    return _Planner(m, doc, resource).run()


class _Planner:
    """Cross-field checks and address allocation; collects every problem before failing."""

    def __init__(self, m: LabManifest, doc: Document, resource: str) -> None:
        self.m, self.doc, self.resource = m, doc, resource
        self.problems: list[Problem] = []

    def fail(self, loc: Loc, reason: str) -> None:
        self.problems.append(
            Problem(
                reason,
                file=self.doc.file,
                line=line_of(self.doc.lines, loc),
                resource=self.resource,
                field=format_loc(loc),
            )
        )

    def run(self) -> LabPlan:
        spec = self.m.spec
        net = spec.network
        self._check_networks(net)
        nodes = self._plan_nodes(spec, net)
        namespaces = self._namespaces(spec)
        pods = self._plan_pods(spec, nodes, namespaces)
        services = self._plan_services(spec, net, namespaces)
        quota_store = self._quota_store(spec)
        if self.problems:
            raise InvalidConfig(self.problems)
        return LabPlan(
            name=self.m.metadata.name,
            trust_domain=spec.trust_domain,
            fabric_ip=net.node_cidr.network_address + 1,
            node_network=net.node_cidr,
            nodes=tuple(nodes.values()),
            pods=tuple(pods),
            services=tuple(services),
            namespaces=namespaces,
            source=self.doc.file,
            quota_store=quota_store,
            prometheus=spec.prometheus,
        )

    def _quota_store(self, spec: LabSpec) -> str | None:
        from agent.waypoint.ai.quotastore import store_kind

        if spec.quota_store is None:
            return None
        try:
            store_kind(spec.quota_store)
        except ValueError as e:
            self.fail(("spec", "quotaStore"), str(e))
        return spec.quota_store

    def _check_networks(self, net: Network) -> None:
        named = [
            ("nodeCIDR", net.node_cidr),
            ("podCIDR", net.pod_cidr),
            ("serviceCIDR", net.service_cidr),
        ]
        for i, (a_name, a) in enumerate(named):
            for b_name, b in named[i + 1 :]:
                if a.overlaps(b):
                    self.fail(("spec", "network", b_name), f"{b} overlaps {a_name} {a}")
        if net.node_mask <= net.pod_cidr.prefixlen:
            self.fail(
                ("spec", "network", "podCIDRMaskSize"),
                f"must be longer than podCIDR's /{net.pod_cidr.prefixlen}",
            )

    def _plan_nodes(self, spec: LabSpec, net: Network) -> dict[str, NodePlan]:
        nodes: dict[str, NodePlan] = {}
        subnets = None
        if net.node_mask > net.pod_cidr.prefixlen:
            subnets = net.pod_cidr.subnets(new_prefix=net.node_mask)
            next(subnets)  # leave the first range unused so node-1 gets 10.244.1.0/24
        for i, node in enumerate(spec.nodes):
            if node.name in nodes:
                self.fail(("spec", "nodes", i, "name"), f"duplicate node name {node.name!r}")
                continue
            host = 11 + i
            if host >= net.node_cidr.num_addresses - 1:
                self.fail(("spec", "nodes", i), f"nodeCIDR {net.node_cidr} has no address left")
                continue
            cidr = next(subnets, None) if subnets else None
            if cidr is None:
                self.fail(
                    ("spec", "nodes", i), f"podCIDR {net.pod_cidr} has no /{net.node_mask} left"
                )
                continue
            nodes[node.name] = NodePlan(node.name, i, net.node_cidr.network_address + host, cidr)
        return nodes

    def _namespaces(self, spec: LabSpec) -> dict[str, dict[str, str]]:
        out: dict[str, dict[str, str]] = {}
        for i, ns in enumerate(spec.namespaces):
            if ns.name in out:
                self.fail(("spec", "namespaces", i, "name"), f"duplicate namespace {ns.name!r}")
            out[ns.name] = dict(ns.labels)
        return out

    def _plan_pods(
        self, spec: LabSpec, nodes: dict[str, NodePlan], namespaces: dict[str, dict[str, str]]
    ) -> list[PodPlan]:
        seen: set[tuple[str, str]] = set()
        taken: set[ipaddress.IPv4Address] = set()
        explicit = {p.ip for p in spec.pods if p.ip is not None}
        cursor: dict[str, int] = {n: 2 for n in nodes}  # .1 of each node range is reserved
        out: list[PodPlan] = []
        for i, pod in enumerate(spec.pods):
            loc: Loc = ("spec", "pods", i)
            if (pod.namespace, pod.name) in seen:
                self.fail((*loc, "name"), f"duplicate pod {pod.namespace}/{pod.name}")
                continue
            seen.add((pod.namespace, pod.name))
            if namespaces and pod.namespace not in namespaces:
                self.fail(
                    (*loc, "namespace"),
                    f"namespace {pod.namespace!r} is not declared in "
                    f"spec.namespaces ({', '.join(sorted(namespaces))})",
                )
                continue
            node = nodes.get(pod.node)
            if node is None:
                known = ", ".join(n.name for n in spec.nodes)
                self.fail((*loc, "node"), f"unknown node {pod.node!r} (nodes: {known})")
                continue
            if pod.ip is not None:
                ip = pod.ip
                if ip not in node.pod_cidr or ip in (
                    node.pod_cidr.network_address,
                    node.pod_cidr.network_address + 1,
                    node.pod_cidr.broadcast_address,
                ):
                    self.fail(
                        (*loc, "ip"),
                        f"{ip} is not a usable address of node "
                        f"{node.name}'s pod range {node.pod_cidr}",
                    )
                    continue
                if ip in taken:
                    self.fail((*loc, "ip"), f"{ip} is already used by another pod")
                    continue
            else:
                while True:
                    ip = node.pod_cidr.network_address + cursor[node.name]
                    cursor[node.name] += 1
                    if ip not in explicit and ip not in taken:
                        break
                if ip >= node.pod_cidr.broadcast_address:
                    self.fail(loc, f"node {node.name}'s pod range {node.pod_cidr} is full")
                    continue
            taken.add(ip)
            ns_labels = namespaces.get(pod.namespace, {})
            meshed = pod.labels.get(MESH_LABEL, ns_labels.get(MESH_LABEL)) == "enabled"
            out.append(
                PodPlan(
                    pod.name,
                    pod.namespace,
                    pod.node,
                    pod.service_account,
                    dict(pod.labels),
                    ip,
                    meshed,
                    tuple(pod.command) if pod.command else None,
                    pod.probe_ports,
                )
            )
        return out

    def _plan_services(
        self, spec: LabSpec, net: Network, namespaces: dict[str, dict[str, str]]
    ) -> list[ServicePlan]:
        seen: set[tuple[str, str]] = set()
        used = {s.cluster_ip for s in spec.services if s.cluster_ip}
        hosts = (h for h in net.service_cidr.hosts() if h not in used)
        next(hosts, None)  # .1 is conventionally the API server's VIP in Kubernetes
        out = []
        for i, svc in enumerate(spec.services):
            loc: Loc = ("spec", "services", i)
            if (svc.namespace, svc.name) in seen:
                self.fail((*loc, "name"), f"duplicate service {svc.namespace}/{svc.name}")
                continue
            seen.add((svc.namespace, svc.name))
            if svc.cluster_ip is not None and svc.cluster_ip not in net.service_cidr:
                self.fail(
                    (*loc, "clusterIP"),
                    f"{svc.cluster_ip} is outside serviceCIDR {net.service_cidr}",
                )
                continue
            ports = [p.port for p in svc.ports]
            if len(set(ports)) != len(ports):
                self.fail((*loc, "ports"), "duplicate port number")
                continue
            vip = svc.cluster_ip or next(hosts)
            out.append(
                ServicePlan(
                    svc.name,
                    svc.namespace,
                    dict(svc.selector),
                    tuple(svc.ports),
                    vip,
                    # Istio's precedence: the Service's own use-waypoint, else its namespace's.
                    with_namespace_waypoint(dict(svc.labels), namespaces.get(svc.namespace)),
                )
            )
        return out
