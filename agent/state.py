"""The agent's view of the mesh: one immutable, indexed snapshot per config revision.

A new revision builds a new snapshot and swaps one reference, so every connection sees a
consistent config from start to end and readers never take a lock (ztunnel's "state").
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TypeVar

from controller.model.base import Resource, ResourceKey
from controller.model.derived import derive
from controller.model.routing import HTTPRoute
from controller.model.security import AuthorizationPolicy, PeerAuthentication
from controller.model.workloads import Node, Service, Workload

R = TypeVar("R", bound=Resource)

NsName = tuple[str, str]


@dataclass(frozen=True)
class ConfigSnapshot:
    epoch: str
    revision: int
    trust_domain: str
    resources: Mapping[ResourceKey, Resource]
    workloads_by_ip: Mapping[str, Workload] = field(default_factory=dict)
    workloads_by_node: Mapping[str, tuple[Workload, ...]] = field(default_factory=dict)
    services_by_vip: Mapping[str, Service] = field(default_factory=dict)
    services: Mapping[NsName, Service] = field(default_factory=dict)
    endpoints: Mapping[NsName, tuple[Workload, ...]] = field(default_factory=dict)
    authorization: tuple[AuthorizationPolicy, ...] = ()
    peer_authentication: tuple[PeerAuthentication, ...] = ()
    routes: Mapping[NsName, tuple[HTTPRoute, ...]] = field(default_factory=dict)
    nodes: Mapping[str, Node] = field(default_factory=dict)

    @classmethod
    def empty(cls, trust_domain: str = "cluster.local") -> ConfigSnapshot:
        return cls.build("", 0, trust_domain, {})

    @classmethod
    def build(
        cls, epoch: str, revision: int, trust_domain: str, resources: Mapping[ResourceKey, Resource]
    ) -> ConfigSnapshot:
        # Istio's VirtualService and DestinationRule take effect as the resources they
        # derive into (controller/model/istio_networking.py); the originals stay as written.
        derived, _problems = derive(resources.values())
        if derived:
            resources = {**resources, **{r.key: r for r in derived}}
        by_kind: dict[str, list[Resource]] = {}
        for r in resources.values():
            by_kind.setdefault(r.KIND, []).append(r)
        workloads = sorted(_of(by_kind, "Workload", Workload), key=lambda w: w.key)
        by_ip: dict[str, Workload] = {}
        by_node: dict[str, list[Workload]] = {}
        by_ns: dict[str, list[Workload]] = {}
        for w in workloads:
            for a in w.spec.addresses:
                by_ip[str(a)] = w
            by_node.setdefault(w.spec.node, []).append(w)
            by_ns.setdefault(w.namespace, []).append(w)
        services: dict[NsName, Service] = {}
        vips: dict[str, Service] = {}
        endpoints: dict[NsName, tuple[Workload, ...]] = {}
        for s in _of(by_kind, "Service", Service):
            services[(s.namespace, s.name)] = s
            for vip in s.spec.vips():
                vips[vip] = s
            endpoints[(s.namespace, s.name)] = tuple(
                w
                for w in by_ns.get(s.namespace, ())
                if s.selects(w) and w.spec.ready and w.spec.phase == "Running"
            )
        routes: dict[NsName, list[HTTPRoute]] = {}
        for rt in sorted(_of(by_kind, "HTTPRoute", HTTPRoute), key=lambda r: r.key):
            for ns, name, _port in rt.parent_services():
                routes.setdefault((ns, name), []).append(rt)
        return cls(
            epoch=epoch,
            revision=revision,
            trust_domain=trust_domain,
            resources=MappingProxyType(dict(resources)),
            workloads_by_ip=MappingProxyType(by_ip),
            workloads_by_node=MappingProxyType({k: tuple(v) for k, v in by_node.items()}),
            services_by_vip=MappingProxyType(vips),
            services=MappingProxyType(services),
            endpoints=MappingProxyType(endpoints),
            authorization=tuple(
                sorted(
                    _of(by_kind, "AuthorizationPolicy", AuthorizationPolicy), key=lambda p: p.key
                )
            ),
            peer_authentication=tuple(
                sorted(_of(by_kind, "PeerAuthentication", PeerAuthentication), key=lambda p: p.key)
            ),
            routes=MappingProxyType({k: tuple(v) for k, v in routes.items()}),
            nodes=MappingProxyType({n.name: n for n in _of(by_kind, "Node", Node)}),
        )

    def workloads_in(self, namespace: str) -> list[Workload]:
        return [w for ws in self.workloads_by_node.values() for w in ws if w.namespace == namespace]

    def local_workloads(self, node: str) -> tuple[Workload, ...]:

        return self.workloads_by_node.get(node, ())

    def workload_identity(self, w: Workload) -> str:
        return w.identity(self.trust_domain)

    def of_kind(self, kind: str) -> list[Resource]:
        return [r for k, r in self.resources.items() if k.kind == kind]


def _of(by_kind: dict[str, list[Resource]], kind: str, cls: type[R]) -> list[R]:
    return [r for r in by_kind.get(kind, []) if isinstance(r, cls)]
