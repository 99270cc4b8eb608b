"""Gateway API-style conditions: whether a stored resource can take effect, and why not.

A policy that references a Service which does not exist (yet), or that needs L7 but
targets a Service without a waypoint, is valid on its own and is stored (the Service may
come later), but it is enforced nowhere: that must be visible, never silent. Each
resource gets two conditions, computed from the whole config:

- `ResolvedRefs`: every Service it references exists (reason `ServiceNotFound` or
  `BackendNotFound` otherwise);
- `Accepted`: something enforces it (reason `NoWaypoint` when the L7 policy's Service has
  no waypoint, so no proxy sees its requests; `WaypointNotReady` when its waypoint has no
  ready pod, so its requests are refused).

A waypoint declared as a Gateway (controller/model/gateway.py) gets `Accepted` and
`Programmed` (reason `NoResources` while no pod of it runs, `Pending` while none is ready).

`weft policy apply` prints the False ones as warnings, `weft policy get` shows them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from controller.model.base import Resource, ResourceKey

# L7 kinds that act only at a waypoint (the ones the node tunnel cannot enforce).
_L7_TARGETED = ("TokenRateLimit", "ModelRoute", "LoadShedding", "ResponseCache", "Rollout")


@dataclass(frozen=True, slots=True)
class Condition:
    type: str  # Accepted | ResolvedRefs | Programmed (Gateway)
    status: bool
    reason: str
    message: str = ""

    def as_dict(self) -> dict[str, str]:
        return {
            "type": self.type,
            "status": "True" if self.status else "False",
            "reason": self.reason,
            "message": self.message,
        }


def conditions(resources: Iterable[Resource]) -> dict[ResourceKey, list[Condition]]:
    """Conditions for every resource that references Services, from the whole config."""
    res = list(resources)
    services: dict[tuple[str, str], Resource] = {
        (r.namespace, r.name): r for r in res if r.KIND == "Service"
    }

    def waypoint_of(ns: str, name: str) -> str | None:
        svc = services.get((ns, name))
        return svc.waypoint if svc is not None else None  # type: ignore[attr-defined]

    # VirtualService and DestinationRule: what they cannot be derived into (a subset no
    # DestinationRule defines, a host that is no Service) is said on them.
    from controller.model.derived import derive

    _derived, derive_problems = derive(res)
    not_derived: dict[str, list[str]] = {}
    for p in derive_problems:
        not_derived.setdefault(p.resource or "", []).append(
            f"{p.field}: {p.reason}" if p.field else p.reason
        )
    out: dict[ResourceKey, list[Condition]] = {}
    instances = _waypoint_instances(res)
    # Whether this is a running mesh's config (it has workloads) rather than files being
    # validated on their own: only then does a waypoint without instances say anything.
    live_config = any(r.KIND == "Workload" for r in res)
    declared = {(r.namespace, r.name) for r in res if r.KIND == "Gateway"}
    for r in res:
        if r.KIND == "Gateway":
            out[r.key] = _gateway_conditions(r, instances.get((r.namespace, r.name), (0, 0)))
            continue
        loosening = _loosening_in_istio_root(r)
        if loosening:
            out[r.key] = [
                Condition("ResolvedRefs", True, "ResolvedRefs"),
                Condition("Accepted", False, "NotMeshWide", loosening),
            ]
            continue
        gateways = _gateway_targets(r)
        if gateways:
            out[r.key] = _gateway_target_conditions(r, gateways, declared, instances, live_config)
            continue
        l7_targets, backends = _references(r)
        if not l7_targets and not backends and str(r.key) not in not_derived:
            continue
        gone_targets = [f"{ns}/{n}" for ns, n in l7_targets if (ns, n) not in services]
        gone_backends = [f"{ns}/{n}" for ns, n in backends if (ns, n) not in services]
        missing = sorted(set(gone_targets + gone_backends))
        conds = [
            Condition(
                "ResolvedRefs",
                False,
                "ServiceNotFound" if gone_targets else "BackendNotFound",
                "no Service " + ", ".join(missing),
            )
            if missing
            else Condition("ResolvedRefs", True, "ResolvedRefs")
        ]
        without = [
            f"{ns}/{n}"
            for ns, n in l7_targets
            if (ns, n) in services and waypoint_of(ns, n) is None
        ]
        if without:
            conds.append(
                Condition(
                    "Accepted",
                    False,
                    "NoWaypoint",
                    f"Service {', '.join(without)} has no waypoint (label weft.dev/use-waypoint "
                    f"on it or its namespace): no proxy sees its requests, so this {r.KIND} is "
                    "enforced nowhere",
                )
            )
        elif gone_targets:
            conds.append(Condition("Accepted", False, "ServiceNotFound", "its Service is missing"))
        elif str(r.key) in not_derived:
            conds.append(
                Condition("Accepted", False, "Invalid", "; ".join(not_derived[str(r.key)]))
            )
        elif idle := [
            f"{ns}/{n} (waypoint {w})"
            for ns, n in l7_targets
            if (ns, n) in services
            and (w := waypoint_of(ns, n))
            and live_config
            and not instances.get((ns, w), (0, 0))[1]
        ]:
            conds.append(
                Condition(
                    "Accepted",
                    False,
                    "WaypointNotReady",
                    f"Service {', '.join(idle)} has no ready waypoint instance (pods labelled "
                    "weft.dev/waypoint in its namespace): its L7 traffic is refused until one "
                    "runs"
                    + (
                        "; a waypoint in another namespace (istio.io/use-waypoint-namespace) "
                        "is not implemented by weft"
                        if any("/" in x.split("(waypoint ", 1)[1] for x in idle)
                        else ""
                    ),
                )
            )
        else:
            conds.append(Condition("Accepted", True, "Accepted"))
        out[r.key] = conds
    return out


def _waypoint_instances(res: list[Resource]) -> dict[tuple[str, str], tuple[int, int]]:
    """(namespace, waypoint name) -> (pods, ready pods) labelled weft.dev/waypoint."""
    from controller.model.workloads import WAYPOINT_LABEL

    out: dict[tuple[str, str], tuple[int, int]] = {}
    for r in res:
        if r.KIND != "Workload":
            continue
        name = r.metadata.labels.get(WAYPOINT_LABEL)
        if not name:
            continue
        spec = r.spec  # type: ignore[attr-defined]
        n, ready = out.get((r.namespace, name), (0, 0))
        out[(r.namespace, name)] = (n + 1, ready + (spec.ready and spec.phase == "Running"))
    return out


def _gateway_targets(r: Resource) -> list[tuple[str, str]]:
    """Waypoint Gateways an AuthorizationPolicy targets (it applies to all they serve)."""
    spec = getattr(r, "spec", None)
    if r.KIND != "AuthorizationPolicy" or spec is None:
        return []
    return [(t.namespace or r.namespace, t.name) for t in spec.targets() if t.kind == "Gateway"]


def _gateway_target_conditions(
    r: Resource,
    gateways: list[tuple[str, str]],
    declared: set[tuple[str, str]],
    instances: dict[tuple[str, str], tuple[int, int]],
    live: bool,
) -> list[Condition]:
    """A policy on waypoints: resolved when each is declared (a Gateway) or runs (pods);
    accepted when each has a ready instance (a live config only)."""
    unknown = [
        f"{ns}/{n}" for ns, n in gateways if (ns, n) not in declared and (ns, n) not in instances
    ]
    if unknown:
        return [
            Condition(
                "ResolvedRefs",
                False,
                "GatewayNotFound",
                f"no waypoint {', '.join(unknown)} (a Gateway of class weft-waypoint, or pods "
                "labelled weft.dev/waypoint)",
            ),
            Condition(
                "Accepted", False, "GatewayNotFound", "its waypoint is missing: enforced nowhere"
            ),
        ]
    idle = [f"{ns}/{n}" for ns, n in gateways if live and not instances.get((ns, n), (0, 0))[1]]
    if idle:
        return [
            Condition("ResolvedRefs", True, "ResolvedRefs"),
            Condition(
                "Accepted",
                False,
                "WaypointNotReady",
                f"waypoint {', '.join(idle)} has no ready instance: the traffic it serves is "
                "refused until one runs",
            ),
        ]
    return [
        Condition("ResolvedRefs", True, "ResolvedRefs"),
        Condition("Accepted", True, "Accepted"),
    ]


def _gateway_conditions(r: Resource, pods: tuple[int, int]) -> list[Condition]:
    """A waypoint Gateway: Accepted (it validated), Programmed (instances are ready)."""
    n, ready = pods
    where = f"pods labelled weft.dev/waypoint={r.name} in namespace {r.namespace}"
    if ready:
        programmed = Condition("Programmed", True, "Programmed", f"{ready} of {n} {where} ready")
    elif n:
        programmed = Condition(
            "Programmed", False, "Pending", f"none of the {n} {where} is ready yet"
        )
    else:
        programmed = Condition(
            "Programmed",
            False,
            "NoResources",
            f"no {where}: deploy the waypoint (the chart's waypoints value, or a lab pod "
            "with that label); until then its Services' L7 traffic is refused",
        )
    return [Condition("Accepted", True, "Accepted"), programmed]


def _loosening_in_istio_root(r: Resource) -> str | None:
    """Why a mesh-wide policy in istio-system does not apply mesh-wide (it would loosen),
    or None (agent/policy/authz.py, ROOT_NAMESPACES)."""
    spec = getattr(r, "spec", None)
    if r.namespace != "istio-system" or spec is None or getattr(spec, "selector", None):
        return None
    if r.KIND == "PeerAuthentication":
        mode = spec.mtls.mode if spec.mtls is not None else None
        if mode in ("PERMISSIVE", "DISABLE"):
            return (
                f"mode {mode} in istio-system applies to istio-system only: from Istio's root "
                "namespace weft takes mesh-wide only what tightens (STRICT); put a mesh-wide "
                "PeerAuthentication in weft-system to loosen it on purpose"
            )
    if r.KIND == "AuthorizationPolicy" and not spec.targets() and spec.action != "DENY":
        return (
            f"action {spec.action} in istio-system applies to istio-system only: from Istio's "
            "root namespace weft takes mesh-wide only DENY; put it in weft-system to apply "
            "it to the whole mesh"
        )
    return None


def _references(r: Resource) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(Services it needs a waypoint on, other Services it references)."""
    spec = getattr(r, "spec", None)
    if spec is None:
        return [], []
    if r.KIND == "AuthorizationPolicy":
        refs = [(t.namespace or r.namespace, t.name) for t in spec.targets() if t.kind == "Service"]
        return refs, []
    if r.KIND in ("HTTPRoute", "GRPCRoute"):
        parents = [(ns, n) for ns, n, _ in r.parent_services()]  # type: ignore[attr-defined]
        backends = [
            (b.namespace or r.namespace, b.name)
            for rule in spec.rules
            for b in rule.backend_refs or ()
            if getattr(b, "kind", "Service") in ("Service", None)
        ]
        return parents, backends
    if r.KIND == "Rollout":
        return [(spec.target_ref.namespace or r.namespace, spec.target_ref.name)], []
    if r.KIND in _L7_TARGETED:
        return [(t.namespace or r.namespace, t.name) for t in spec.target_refs], []
    if r.KIND == "BackendPolicy":
        return [], [(ns, n) for ns, n, _ in r.targets()]  # type: ignore[attr-defined]
    if r.KIND in ("VirtualService", "DestinationRule"):
        from controller.model.istio_networking import host_service

        if r.KIND == "DestinationRule":
            h = host_service(spec.host, r.namespace)
            return [], [h] if h else []
        hosts = [h for h in (host_service(x, r.namespace) for x in spec.hosts) if h]
        dests = [
            h
            for route in spec.http
            for d in route.route
            if (h := host_service(d.destination.host, r.namespace))
        ]
        return hosts, dests
    return [], []
