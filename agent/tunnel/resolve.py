"""Where an outbound connection goes, decided from config alone (sans-IO).

The original destination is either a Service VIP (pick a ready endpoint, map the service
port to the target port), a workload's own address, or something outside the mesh
(passthrough: connect to it directly, as Istio's ALLOW_ANY does).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from agent.state import ConfigSnapshot
from controller.model.workloads import WAYPOINT_LABEL, Node, Service, Workload

WAYPOINT_PORT = 15008  # a waypoint accepts HBONE on its own address, like a node tunnel


class Unreachable(Exception):
    """No way to serve this destination; the message says why (logged, then RST)."""


@dataclass(frozen=True, slots=True)
class Destination:
    ip: str  # the address to reach: a pod's, or the original one for passthrough
    port: int
    workload: Workload | None
    service: Service | None
    node: Node | None
    identity: str | None  # SPIFFE ID the server must present; None: plaintext passthrough
    local: bool  # the workload runs on this node
    # Set when a waypoint serves the destination: HBONE goes to the waypoint's own address
    # (it terminates HBONE itself) and `ip:port` stays the Service VIP as the authority.
    hbone: tuple[str, int] | None = None

    @property
    def authority(self) -> str:
        return f"{self.ip}:{self.port}"

    @property
    def meshed(self) -> bool:
        return self.identity is not None


Picker = Callable[[Sequence[Workload]], Workload]


def resolve(
    snap: ConfigSnapshot, my_node: str, ip: str, port: int, pick: Picker = random.choice
) -> Destination:
    svc = snap.services_by_vip.get(ip)
    if svc is not None:
        sp = svc.port(port)
        if sp is None:
            raise Unreachable(f"service {svc.namespace}/{svc.name} has no port {port}")
        if svc.waypoint:
            return _to_waypoint(snap, my_node, svc, ip, port, pick)
        eps = snap.endpoints.get((svc.namespace, svc.name), ())
        if not eps:
            raise Unreachable(f"service {svc.namespace}/{svc.name} has no ready endpoints")
        ep = pick(eps)
        return _to_workload(snap, my_node, ep, str(ep.spec.addresses[0]), sp.target(), svc)
    w = snap.workloads_by_ip.get(ip)
    if w is not None:
        return _to_workload(snap, my_node, w, ip, port, None)

    return Destination(ip, port, None, None, None, None, local=False)


def waypoints(snap: ConfigSnapshot, namespace: str, name: str) -> list[Workload]:
    """Ready instances of waypoint `name` in `namespace` (label weft.dev/waypoint=name)."""
    return [
        w
        for w in snap.workloads_in(namespace)
        if w.labels.get(WAYPOINT_LABEL) == name and w.spec.ready and w.spec.phase == "Running"
    ]


def _to_waypoint(
    snap: ConfigSnapshot, my_node: str, svc: Service, ip: str, port: int, pick: Picker
) -> Destination:
    name = svc.waypoint or ""
    instances = waypoints(snap, svc.namespace, name)
    if not instances:
        raise Unreachable(
            f"service {svc.namespace}/{svc.name} uses waypoint {name!r}, which "
            "has no ready instance (label weft.dev/waypoint="
            f"{name} in namespace {svc.namespace})"
        )
    # An instance on this node first: its connections need no network hop, and the agent
    # can hand them over without re-encrypting them (handoff.py).
    local = [w for w in instances if w.spec.node == my_node]
    wp = pick(local or instances)
    return Destination(
        ip,
        port,
        wp,
        svc,
        snap.nodes.get(wp.spec.node),
        snap.workload_identity(wp),
        local=False,
        hbone=(str(wp.spec.addresses[0]), WAYPOINT_PORT),
    )


def _to_workload(
    snap: ConfigSnapshot, my_node: str, w: Workload, ip: str, port: int, svc: Service | None
) -> Destination:
    if not w.spec.mesh:
        # Enrolled callers may still reach workloads outside the mesh, in plaintext.
        return Destination(ip, port, w, svc, None, None, local=w.spec.node == my_node)
    node = snap.nodes.get(w.spec.node)
    if node is None and w.spec.node != my_node:
        raise Unreachable(
            f"workload {w.namespace}/{w.name} is on node {w.spec.node}, "
            "whose tunnel address is unknown (no Node resource)"
        )
    return Destination(
        ip, port, w, svc, node, snap.workload_identity(w), local=w.spec.node == my_node
    )
