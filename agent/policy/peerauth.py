"""PeerAuthentication: is plaintext allowed into a workload, and on which ports?

Precedence as in Istio: a policy selecting the workload beats its namespace's policy
(no selector), which beats the mesh-wide one (no selector, in a root namespace: weft-system,
or Istio's istio-system, from which only STRICT applies mesh-wide: a leftover PERMISSIVE
there never loosens weft's STRICT default). Should both hold one, the stricter applies.
UNSET inherits from the next level.
The mesh default, when nothing says otherwise, is STRICT in weft (Istio's is PERMISSIVE):
a mesh that promises no plaintext should not need a policy to keep that promise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from agent.policy.authz import ISTIO_ROOT, ROOT_NAMESPACES
from controller.model.security import PeerAuthentication
from controller.model.workloads import Workload


@dataclass(frozen=True)
class MtlsMode:
    strict: bool
    plaintext_ports: frozenset[int]  # accepted in plaintext from anyone even when strict
    policy: str | None  # the deciding policy, namespace/name
    probe_ports: frozenset[int] = frozenset()
    """Ports the kubelet probes: accepted in plaintext when strict, but only from the node
    itself (where the kubelet runs), never from other pods or nodes."""


def mtls_mode(
    policies: Sequence[PeerAuthentication],
    w: Workload,
    *,
    default_strict: bool = True,
    root_namespaces: Sequence[str] = ROOT_NAMESPACES,
) -> MtlsMode:
    levels: list[PeerAuthentication | None] = [
        _pick(
            [
                p
                for p in policies
                if p.namespace == w.namespace
                and p.spec.selector
                and p.spec.selector.matches(w.labels)
            ]
        ),
        _pick([p for p in policies if p.namespace == w.namespace and not p.spec.selector]),
        _mesh_wide(
            [
                p
                for p in policies
                if p.namespace in root_namespaces
                and not p.spec.selector
                and (p.namespace != ISTIO_ROOT or w.namespace == ISTIO_ROOT or _strict(p))
            ]
        ),
    ]
    strict, deciding = default_strict, None
    for p in reversed(levels):  # root first, so narrower levels override
        if p is not None and p.spec.mtls is not None and p.spec.mtls.mode != "UNSET":
            strict = p.spec.mtls.mode == "STRICT"
            deciding = f"{p.namespace}/{p.name}"
    ports: set[int] = set()
    probes: set[int] = set(w.spec.probe_ports)
    top = levels[0]
    if top is not None and top.spec.port_level_mtls:
        for port, pm in top.spec.port_level_mtls.items():
            if pm.mode in ("PERMISSIVE", "DISABLE"):
                ports.add(port)
            elif pm.mode == "STRICT":
                probes.discard(port)
    return MtlsMode(strict, frozenset(ports), deciding, frozenset(probes - ports))


def _strict(p: PeerAuthentication) -> bool:
    return p.spec.mtls is not None and p.spec.mtls.mode == "STRICT"


def _mesh_wide(ps: list[PeerAuthentication]) -> PeerAuthentication | None:
    """The mesh-wide policy: one per root namespace at most; with one in each, the
    stricter (a STRICT one over anything else), so two root namespaces never weaken mTLS."""
    strict = [p for p in ps if p.spec.mtls is not None and p.spec.mtls.mode == "STRICT"]
    return _pick(strict or ps)


def _pick(ps: list[PeerAuthentication]) -> PeerAuthentication | None:
    # Several at one level is a conflict; Istio takes the oldest, we take the first by
    # name, which is at least stable.
    return sorted(ps, key=lambda p: p.name)[0] if ps else None
