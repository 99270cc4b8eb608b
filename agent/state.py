"""The agent's view of the mesh: one immutable, indexed snapshot per config revision.

A new revision builds a new snapshot and swaps one reference, so every connection sees a
consistent config from start to end and readers never take a lock (ztunnel's "state").

`sources` are the resources as the controller sent them; `resources` adds what they derive
into (controller/model/derived.py: Istio's networking kinds, GRPCRoute), which is what the
indexes and the engine use. What is passed on (to waypoints, to the on-disk cache, as the
base of the next delta) is `sources`, so nothing is derived twice.

A delta that changes only Workloads and Nodes (pods come and go: the common change) is
applied to the indexes it touches (`with_changes`), in time proportional to the change and
the affected Services' endpoints, not to the size of the mesh; any other change rebuilds.
"""

from __future__ import annotations

import bisect
import json
import operator
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, TypeVar

from controller.model.base import Resource, ResourceKey
from controller.model.base import resources_from_json as decode_resources
from controller.model.derived import DERIVING_KINDS, derive
from controller.model.routing import HTTPRoute
from controller.model.security import AuthorizationPolicy, PeerAuthentication
from controller.model.workloads import Node, Service, Workload, ip_text

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
    sources: Mapping[ResourceKey, Resource] = field(default_factory=dict)
    # Every workload that lists an address (by_ip holds the last by key): a delta that
    # removes one holder finds the next.
    ip_holders: Mapping[str, tuple[Workload, ...]] = field(default_factory=dict)

    # ---- as JSON: what the Workload API serves to waypoints and the agent's disk cache ----
    #     {"epoch", "revision", "trustDomain", "resources": [{"kind", "body"}, ...]}

    def to_json(self) -> bytes:
        """The snapshot's `sources` as one JSON document (from_json reads it back)."""
        body = ",".join(resource_json(k, r) for k, r in self.sources.items())
        return f'{{{self.json_head()},"resources":[{body}]}}'.encode()

    def json_head(self) -> str:
        """The document's epoch, revision and trust domain members (a delta has them too)."""
        return (
            f'"epoch":{json.dumps(self.epoch)},"revision":{int(self.revision)},'
            f'"trustDomain":{json.dumps(self.trust_domain)}'
        )

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> ConfigSnapshot:
        """A snapshot from a parsed to_json document; raises InvalidConfig naming a bad
        resource, KeyError for a missing member."""
        resources = {r.key: r for r in resources_from_json(doc["resources"])}
        return cls.build(doc["epoch"], doc["revision"], doc["trustDomain"], resources)

    @classmethod
    def empty(cls, trust_domain: str = "cluster.local") -> ConfigSnapshot:
        return cls.build("", 0, trust_domain, {})

    @classmethod
    def build(
        cls, epoch: str, revision: int, trust_domain: str, resources: Mapping[ResourceKey, Resource]
    ) -> ConfigSnapshot:
        # Istio's VirtualService and DestinationRule, and GRPCRoute, take effect as the
        # resources they derive into (controller/model/derived.py); the originals stay.
        sources = resources
        by_kind: dict[str, list[Resource]] = {}
        for r in resources.values():
            by_kind.setdefault(r.KIND, []).append(r)
        derived = [] if DERIVING_KINDS.isdisjoint(by_kind) else derive(resources.values())[0]
        if derived:
            resources = {**resources, **{r.key: r for r in derived}}
            for r in derived:  # after the sources, as in `resources`
                by_kind.setdefault(r.KIND, []).append(r)
        workloads = sorted(_of(by_kind, "Workload", Workload), key=_order)
        by_ip: dict[str, Workload] = {}
        holders: dict[str, tuple[Workload, ...]] = {}
        by_node: dict[str, list[Workload]] = {}
        by_ns: dict[str, list[Workload]] = {}
        # The loop a full snapshot runs for every workload: attribute lookups hoisted, the
        # key's fields read directly (no property frames), an address's holders a tuple
        # from the start (it almost always has one).
        for w in workloads:
            spec = w.spec
            for a in spec.addresses:
                ip = ip_text(a)
                by_ip[ip] = w
                held = holders.get(ip)
                holders[ip] = (w,) if held is None else (*held, w)
            by_node.setdefault(spec.node, []).append(w)
            by_ns.setdefault(w.key.namespace, []).append(w)
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
            resources=(res_map := MappingProxyType(dict(resources))),
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
            sources=MappingProxyType(dict(sources)) if derived else res_map,
            ip_holders=MappingProxyType(holders),
        )

    def with_changes(
        self,
        epoch: str,
        revision: int,
        upserts: list[Resource],
        removed: list[ResourceKey],
    ) -> ConfigSnapshot:
        """This snapshot with `upserts` added or replaced and `removed` gone (a delta).
        Workload and Node changes update only what they touch; anything else rebuilds."""
        sources = _copy(self.sources)
        for k in removed:
            sources.pop(k, None)
        for r in upserts:
            sources[r.key] = r
        kinds = {r.KIND for r in upserts} | {k.kind for k in removed}
        if not kinds <= {"Workload", "Node"}:
            return ConfigSnapshot.build(epoch, revision, self.trust_domain, sources)
        resources = _copy(self.resources)
        by_ip = _copy(self.workloads_by_ip)
        nodes = _copy(self.nodes)
        changed: set[ResourceKey] = set()
        gone: list[Workload] = []
        came: list[Workload] = []
        for k in removed:
            old = resources.pop(k, None)
            if isinstance(old, Workload):
                gone.append(old)
                changed.add(k)
            elif isinstance(old, Node):
                nodes.pop(old.name, None)
        for r in upserts:
            old = resources.get(r.key)
            resources[r.key] = r
            if isinstance(r, Workload):
                if isinstance(old, Workload):
                    gone.append(old)
                came.append(r)
                changed.add(r.key)
            elif isinstance(r, Node):
                nodes[r.name] = r
        holders = _copy(self.ip_holders)
        touched_ips: set[str] = set()
        for w in gone:
            for a in w.spec.addresses:
                ip = ip_text(a)
                touched_ips.add(ip)
                holders[ip] = tuple(x for x in holders.get(ip, ()) if x.key != w.key)
        for w in came:
            for a in w.spec.addresses:
                ip = ip_text(a)
                touched_ips.add(ip)
                rest = [x for x in holders.get(ip, ()) if x.key != w.key]
                bisect.insort(rest, w, key=_order)
                holders[ip] = tuple(rest)
        for ip in touched_ips:  # as `build`: the last by key holds an address
            if holders.get(ip):
                by_ip[ip] = holders[ip][-1]
            else:
                holders.pop(ip, None)
                by_ip.pop(ip, None)
        by_node = _copy(self.workloads_by_node)
        for node in {w.spec.node for w in (*gone, *came)}:
            kept = [w for w in by_node.get(node, ()) if w.key not in changed]
            for w in came:
                if w.spec.node == node:
                    bisect.insort(kept, w, key=_order)
            if kept:
                by_node[node] = tuple(kept)
            else:
                by_node.pop(node, None)
        endpoints = _copy(self.endpoints)
        spaces = {w.namespace for w in (*gone, *came)}
        for key, svc in self.services.items():
            if key[0] not in spaces:
                continue
            if not any(svc.selects(w) for w in (*gone, *came)):
                continue
            eps = [w for w in endpoints.get(key, ()) if w.key not in changed]
            for w in came:
                if svc.selects(w) and w.spec.ready and w.spec.phase == "Running":
                    bisect.insort(eps, w, key=_order)
            endpoints[key] = tuple(eps)
        return ConfigSnapshot(
            epoch=epoch,
            revision=revision,
            trust_domain=self.trust_domain,
            resources=MappingProxyType(resources),
            workloads_by_ip=MappingProxyType(by_ip),
            workloads_by_node=MappingProxyType(by_node),
            services_by_vip=self.services_by_vip,
            services=self.services,
            endpoints=MappingProxyType(endpoints),
            authorization=self.authorization,
            peer_authentication=self.peer_authentication,
            routes=self.routes,
            nodes=MappingProxyType(nodes),
            sources=MappingProxyType(sources),
            ip_holders=MappingProxyType(holders),
        )

    def workloads_in(self, namespace: str) -> list[Workload]:
        return [w for ws in self.workloads_by_node.values() for w in ws if w.namespace == namespace]

    def local_workloads(self, node: str) -> tuple[Workload, ...]:

        return self.workloads_by_node.get(node, ())

    def workload_identity(self, w: Workload) -> str:
        return w.identity(self.trust_domain)

    def of_kind(self, kind: str) -> list[Resource]:
        return [r for k, r in self.resources.items() if k.kind == kind]


def _copy(m: Mapping[Any, Any]) -> dict[Any, Any]:
    """A dict copy of an index. A read-only view's own copy() copies the dict inside with
    its stored hashes; dict(view) would hash every key again (ResourceKey's hash is Python
    code: 10,000 keys cost milliseconds)."""
    copy = getattr(m, "copy", None)
    return copy() if copy is not None else dict(m)


# The order of workloads in the indexes: by key (a C-level getter, no Python frame).
_order: Callable[[Workload], ResourceKey] = operator.attrgetter("key")


def _of(by_kind: dict[str, list[Resource]], kind: str, cls: type[R]) -> list[R]:
    return [r for r in by_kind.get(kind, []) if isinstance(r, cls)]


def resource_json(key: ResourceKey, r: Resource) -> str:
    """One resource as an item of a snapshot document: {"kind", "body"}."""
    return f'{{"kind":{json.dumps(key.kind)},"body":{r.to_json()}}}'


def resources_from_json(items: Iterable[Mapping[str, Any]]) -> list[Resource]:
    """The resources of a snapshot document's items (validated as the controller's)."""
    return decode_resources((i["kind"], json.dumps(i["body"])) for i in items)
