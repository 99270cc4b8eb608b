"""AuthorizationPolicy evaluation, sans-IO, with Istio's semantics.

Order: a matching DENY denies. Otherwise, if no ALLOW policy applies to the target, the
request is allowed; if some do, it is allowed only when one of their rules matches.
(`spec: {}` is an ALLOW policy without rules: it allows nothing, which is how a namespace
becomes default-deny.) AUDIT policies never change the decision; matches are reported.

Which policies apply:
- at the node tunnel (L4): policies with a workload selector (or neither selector nor
  targetRefs) in the destination workload's namespace or the root namespace;
- at a waypoint (L7): policies whose targetRefs name the destination Service.

The tunnel cannot see HTTP. A rule that needs L7 attributes (methods, paths, hosts,
request headers) fails safe there, as in Istio ambient: in an ALLOW policy it never
matches; in a DENY policy it matches on its L4 parts alone.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

from controller.model.security import (
    AuthorizationPolicy,
    Condition,
    Operation,
    Rule,
    Source,
)
from controller.model.workloads import Workload

# Policies in a root namespace apply mesh-wide: weft's own, and Istio's (istio-system), so
# that a mesh-wide policy written for Istio keeps its meaning here, but from istio-system
# only what tightens: DENY AuthorizationPolicies and STRICT PeerAuthentication. A leftover
# PERMISSIVE or ALLOW there (Istio's usual migration defaults, in a namespace others may
# write to) never loosens weft's STRICT default or grants access mesh-wide; the controller
# says so on the policy (controller/model/status.py).
ROOT_NAMESPACE = "weft-system"
ISTIO_ROOT = "istio-system"
ROOT_NAMESPACES = (ROOT_NAMESPACE, ISTIO_ROOT)


@dataclass(frozen=True, slots=True)
class Request:
    source_principal: str | None  # "cluster.local/ns/apps/sa/client" (no scheme), None: plaintext
    source_namespace: str | None
    source_ip: str
    dest_ip: str
    dest_port: int
    # L7 attributes; None at the tunnel.
    method: str | None = None
    path: str | None = None
    host: str | None = None
    headers: Mapping[str, str] | None = None

    @property
    def l7(self) -> bool:
        return self.method is not None


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    policy: str | None  # "namespace/name" of the deciding policy
    reason: str
    audited: tuple[str, ...] = field(default=())


def principal_of(spiffe_id: str | None) -> str | None:
    if spiffe_id is None:
        return None
    return spiffe_id[len("spiffe://") :] if spiffe_id.startswith("spiffe://") else spiffe_id


@lru_cache(maxsize=4096)
def _pattern(p: str) -> tuple[str, str]:
    if p == "*":
        return ("any", "")
    if p.startswith("*"):
        return ("suffix", p[1:])
    if p.endswith("*"):
        return ("prefix", p[:-1])
    return ("exact", p)


def match_str(patterns: Iterable[str], value: str | None, *, principal: bool = False) -> bool:
    if value is None:
        return False
    for raw in patterns:
        p = (principal_of(raw) or raw) if principal else raw
        kind, s = _pattern(p)
        if (
            kind == "any"
            or (kind == "exact" and value == s)
            or (kind == "prefix" and value.startswith(s))
            or (kind == "suffix" and value.endswith(s))
        ):
            return True
    return False


@lru_cache(maxsize=4096)
def _net(c: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(c, strict=False)


def match_ip(cidrs: Iterable[str], ip: str) -> bool:
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return any(addr in _net(c) for c in cidrs)


def _source(s: Source, r: Request) -> bool:
    if s.principals is not None and not match_str(s.principals, r.source_principal, principal=True):
        return False
    if s.not_principals and match_str(s.not_principals, r.source_principal, principal=True):
        return False
    if s.namespaces is not None and not match_str(s.namespaces, r.source_namespace):
        return False
    if s.not_namespaces and match_str(s.not_namespaces, r.source_namespace):
        return False
    # At the mesh's hops the peer address is the client's own (the tunnel forwards it), so
    # ipBlocks and remoteIpBlocks mean the same thing here.
    for blocks in (s.ip_blocks, s.remote_ip_blocks):
        if blocks is not None and not match_ip(blocks, r.source_ip):
            return False
    for blocks in (s.not_ip_blocks, s.not_remote_ip_blocks):
        if blocks and match_ip(blocks, r.source_ip):
            return False
    return True


def _operation(o: Operation, r: Request, *, l4_only: bool) -> bool:
    if o.ports is not None and str(r.dest_port) not in o.ports:
        return False
    if o.not_ports and str(r.dest_port) in o.not_ports:
        return False
    if l4_only:
        return True
    if o.methods is not None and not match_str(o.methods, r.method):
        return False
    if o.not_methods and match_str(o.not_methods, r.method):
        return False
    if o.paths is not None and not match_str(o.paths, r.path):
        return False
    if o.not_paths and match_str(o.not_paths, r.path):
        return False
    host = (r.host or "").split(":")[0].lower() if r.host else None
    if o.hosts is not None and not match_str([h.lower() for h in o.hosts], host):
        return False
    return not (o.not_hosts and match_str([h.lower() for h in o.not_hosts], host))


def _condition(c: Condition, r: Request) -> bool:
    key = c.key
    value: str | None
    if key == "source.ip":
        return (c.values is None or match_ip(c.values, r.source_ip)) and not (
            c.not_values and match_ip(c.not_values, r.source_ip)
        )
    if key == "destination.ip":
        return (c.values is None or match_ip(c.values, r.dest_ip)) and not (
            c.not_values and match_ip(c.not_values, r.dest_ip)
        )
    if key == "source.namespace":
        value = r.source_namespace
    elif key == "source.principal":
        value = r.source_principal
        return (c.values is None or match_str(c.values, value, principal=True)) and not (
            c.not_values and match_str(c.not_values, value, principal=True)
        )
    elif key == "destination.port":
        value = str(r.dest_port)
    else:  # request.headers[NAME]
        name = key[len("request.headers[") : -1].lower()
        value = (r.headers or {}).get(name)
    return (c.values is None or match_str(c.values, value)) and not (
        c.not_values and match_str(c.not_values, value)
    )


def rule_matches(rule: Rule, r: Request, *, action: str) -> bool:
    l4_only = not r.l7
    if l4_only and rule.has_l7() and action == "ALLOW":
        # Fail safe: the L7 part cannot be proven here, so the rule does not allow. A DENY
        # (or AUDIT) rule is judged by its L4 parts alone, so it denies more, not less.
        return False

    if rule.from_ is not None and not any(_source(f.source, r) for f in rule.from_):
        return False
    if rule.to is not None and not any(
        _operation(t.operation, r, l4_only=l4_only) for t in rule.to
    ):
        return False
    for c in rule.when or []:
        if l4_only and c.is_l7():
            continue
        if not _condition(c, r):
            return False
    return True


def policy_matches(p: AuthorizationPolicy, r: Request) -> bool:
    rules = p.spec.rules
    if rules is None:
        return False  # no rules: matches nothing (ALLOW = allow nothing)
    return any(rule_matches(rule, r, action=p.spec.action) for rule in rules)


def workload_policies(
    policies: Sequence[AuthorizationPolicy],
    w: Workload,
    root_namespaces: Sequence[str] = ROOT_NAMESPACES,
) -> list[AuthorizationPolicy]:
    """Policies the node tunnel enforces for traffic into workload `w`."""
    out = []
    for p in policies:
        if p.spec.targets():
            continue
        if p.namespace != w.namespace and p.namespace not in root_namespaces:
            continue
        if p.namespace == ISTIO_ROOT != w.namespace and p.spec.action != "DENY":
            continue  # from Istio's root namespace, only what tightens applies mesh-wide
        sel = p.spec.selector
        if sel is None or sel.matches(w.labels):
            out.append(p)
    return out


def service_policies(
    policies: Sequence[AuthorizationPolicy],
    namespace: str,
    service: str,
    waypoint: str | None = None,
) -> list[AuthorizationPolicy]:
    """Policies a waypoint enforces for traffic to Service namespace/service: those that
    target the Service, and those that target the waypoint itself (a Gateway named
    `waypoint`, which serves the Services of its own namespace), as in Istio."""
    return [
        p
        for p in policies
        if p.namespace == namespace
        and any(
            (t.namespace or p.namespace) == namespace
            and (
                (t.kind == "Service" and t.name == service)
                or (t.kind == "Gateway" and waypoint is not None and t.name == waypoint)
            )
            for t in p.spec.targets()
        )
    ]


def evaluate(applicable: Sequence[AuthorizationPolicy], r: Request) -> Decision:
    audited = tuple(
        f"{p.namespace}/{p.name}"
        for p in applicable
        if p.spec.action == "AUDIT" and policy_matches(p, r)
    )
    for p in applicable:
        if p.spec.action == "DENY" and policy_matches(p, r):
            return Decision(False, f"{p.namespace}/{p.name}", "matched a DENY policy", audited)
    allows = [p for p in applicable if p.spec.action == "ALLOW"]
    if not allows:
        return Decision(True, None, "no ALLOW policy applies", audited)
    for p in allows:
        if policy_matches(p, r):
            return Decision(True, f"{p.namespace}/{p.name}", "matched an ALLOW policy", audited)
    names = ", ".join(f"{p.namespace}/{p.name}" for p in allows)
    return Decision(False, None, f"no rule of the ALLOW policies ({names}) matched", audited)
