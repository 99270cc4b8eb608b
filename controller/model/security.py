"""Security policy in Istio's shapes, so users bring what they know.

- `AuthorizationPolicy` (security.istio.io/v1): ALLOW / DENY / AUDIT rules on the source
  (principals, namespaces, IP blocks) and the operation (ports; at a waypoint also methods,
  paths, hosts, headers). CUSTOM (an external authorizer) is not supported and says so.
- `PeerAuthentication` (security.istio.io/v1): STRICT refuses plaintext into a workload,
  PERMISSIVE accepts it, per workload and per port.

String matching follows Istio: exact, prefix `abc*`, suffix `*abc`, and `*` (present).
"""

from __future__ import annotations

import ipaddress
from typing import ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from controller.model.base import LabelSelector, Model, Resource, register

ISTIO_SECURITY = ("security.istio.io/v1", "security.istio.io/v1beta1")

# Conditions weft evaluates in `when`; anything else is refused at validation time rather
# than silently never matching.
L4_WHEN_KEYS = (
    "source.ip",
    "source.namespace",
    "source.principal",
    "destination.port",
    "destination.ip",
)
L7_WHEN_PREFIXES = ("request.headers[",)


def _check_patterns(v: list[str] | None) -> list[str] | None:
    for s in v or []:
        if "*" in s.strip("*") or (s.count("*") > 1 and s != "*"):
            raise ValueError(f"{s!r}: '*' may only be a prefix, a suffix, or the whole value")
    return v


def _check_ports(v: list[str] | None) -> list[str] | None:
    for p in v or []:
        if not p.isdigit() or not 1 <= int(p) <= 65535:
            raise ValueError(f"port {p!r} must be a number 1-65535 (as a string)")
    return v


def _check_cidrs(v: list[str] | None) -> list[str] | None:
    for c in v or []:
        try:
            ipaddress.ip_network(c, strict=False)
        except ValueError:
            raise ValueError(f"{c!r} is not an IP address or CIDR") from None
    return v


class Source(Model):
    principals: list[str] | None = None
    not_principals: list[str] | None = Field(None, alias="notPrincipals")
    namespaces: list[str] | None = None
    not_namespaces: list[str] | None = Field(None, alias="notNamespaces")
    ip_blocks: list[str] | None = Field(None, alias="ipBlocks")
    not_ip_blocks: list[str] | None = Field(None, alias="notIpBlocks")
    remote_ip_blocks: list[str] | None = Field(None, alias="remoteIpBlocks")
    not_remote_ip_blocks: list[str] | None = Field(None, alias="notRemoteIpBlocks")
    request_principals: list[str] | None = Field(None, alias="requestPrincipals")
    not_request_principals: list[str] | None = Field(None, alias="notRequestPrincipals")

    _p = field_validator("principals", "not_principals", "namespaces", "not_namespaces")(
        lambda cls, v: _check_patterns(v)
    )
    _c = field_validator("ip_blocks", "not_ip_blocks", "remote_ip_blocks", "not_remote_ip_blocks")(
        lambda cls, v: _check_cidrs(v)
    )

    @field_validator("request_principals", "not_request_principals")
    @classmethod
    def _jwt(cls, v: list[str] | None) -> list[str] | None:
        if v:
            raise ValueError(
                "requestPrincipals needs JWT authentication, which weft does "
                "not do; use principals (SPIFFE identities)"
            )
        return v


class Operation(Model):
    hosts: list[str] | None = None
    not_hosts: list[str] | None = Field(None, alias="notHosts")
    ports: list[str] | None = None
    not_ports: list[str] | None = Field(None, alias="notPorts")
    methods: list[str] | None = None
    not_methods: list[str] | None = Field(None, alias="notMethods")
    paths: list[str] | None = None
    not_paths: list[str] | None = Field(None, alias="notPaths")

    _pt = field_validator("ports", "not_ports", mode="before")(
        lambda cls, v: _check_ports([str(x) for x in v]) if v is not None else v
    )
    _pat = field_validator("hosts", "not_hosts", "paths", "not_paths", "methods", "not_methods")(
        lambda cls, v: _check_patterns(v)
    )

    def has_l7(self) -> bool:
        return any(
            (self.hosts, self.not_hosts, self.methods, self.not_methods, self.paths, self.not_paths)
        )


class From(Model):
    source: Source


class To(Model):
    operation: Operation


class Condition(Model):
    key: str
    values: list[str] | None = None
    not_values: list[str] | None = Field(None, alias="notValues")

    @field_validator("key")
    @classmethod
    def _key(cls, v: str) -> str:
        if v in L4_WHEN_KEYS or (v.startswith(L7_WHEN_PREFIXES) and v.endswith("]")):
            return v
        raise ValueError(
            f"condition key {v!r} is not supported; weft evaluates "
            f"{', '.join(L4_WHEN_KEYS)} and request.headers[NAME]"
        )

    def is_l7(self) -> bool:
        return self.key.startswith(L7_WHEN_PREFIXES)


class Rule(Model):
    from_: list[From] | None = Field(None, alias="from")
    to: list[To] | None = None
    when: list[Condition] | None = None

    def has_l7(self) -> bool:
        return any(t.operation.has_l7() for t in self.to or []) or any(
            c.is_l7() for c in self.when or []
        )


class TargetRef(Model):
    """A Service (the policy applies at its waypoint) or a waypoint Gateway (it applies to
    everything that waypoint serves), in the policy's own namespace, as in Istio."""

    group: str = ""
    kind: Literal["Service", "Gateway", "ServiceEntry"]
    name: str
    namespace: str | None = None

    @model_validator(mode="after")
    def _supported(self) -> TargetRef:
        if self.kind == "ServiceEntry":
            raise ValueError(
                "kind ServiceEntry: weft has no ServiceEntry (no egress registry); target a "
                "Service or a waypoint Gateway"
            )
        if self.kind == "Gateway" and self.group not in ("", "gateway.networking.k8s.io"):
            raise ValueError(f"group {self.group!r}: a Gateway is gateway.networking.k8s.io's")
        if self.kind == "Service" and self.group not in ("", "core"):
            raise ValueError(f"group {self.group!r}: a Service is in the core group ('')")
        return self


class AuthorizationPolicySpec(Model):
    selector: LabelSelector | None = None
    target_ref: TargetRef | None = Field(None, alias="targetRef")
    target_refs: list[TargetRef] | None = Field(None, alias="targetRefs")
    action: Literal["ALLOW", "DENY", "AUDIT", "CUSTOM"] = "ALLOW"
    rules: list[Rule] | None = None
    provider: dict[str, str] | None = None

    @field_validator("action")
    @classmethod
    def _action(cls, v: str) -> str:
        if v == "CUSTOM":
            raise ValueError(
                "CUSTOM delegates to an external authorizer, which weft does not "
                "support; use ALLOW or DENY"
            )
        return v

    def targets(self) -> list[TargetRef]:
        return [*([self.target_ref] if self.target_ref else []), *(self.target_refs or [])]


@register
class AuthorizationPolicy(Resource):
    """Who may talk to a workload (selector) or a Service through its waypoint (targetRefs).

    Evaluation (weft follows Istio): a matching DENY denies; otherwise with no ALLOW
    policy in scope the request is allowed; otherwise it is allowed only if an ALLOW
    rule matches. `spec: {}` is an ALLOW policy without rules: it allows nothing.
    """

    KIND: ClassVar[str] = "AuthorizationPolicy"
    API_VERSIONS: ClassVar[tuple[str, ...]] = ISTIO_SECURITY

    spec: AuthorizationPolicySpec = Field(default_factory=AuthorizationPolicySpec)

    def semantic_check(self) -> list[tuple[tuple[str | int, ...], str]]:
        out: list[tuple[tuple[str | int, ...], str]] = []
        if self.spec.selector and self.spec.targets():
            out.append((("spec", "targetRefs"), "set either selector or targetRefs, not both"))
        for t in self.spec.targets():
            if t.namespace and t.namespace != self.namespace:
                # Istio refuses it too: a policy applies in its own namespace only.
                out.append(
                    (
                        ("spec", "targetRefs"),
                        f"{t.kind} {t.namespace}/{t.name} is in another namespace: a policy "
                        f"targets only what is in its own ({self.namespace})",
                    )
                )
        return out

    @property
    def enforced_at_waypoint(self) -> bool:
        return bool(self.spec.targets())


class PortMtls(Model):
    mode: Literal["UNSET", "DISABLE", "PERMISSIVE", "STRICT"]


class Mtls(Model):
    mode: Literal["UNSET", "DISABLE", "PERMISSIVE", "STRICT"] = "UNSET"


class PeerAuthenticationSpec(Model):
    selector: LabelSelector | None = None
    mtls: Mtls | None = None
    port_level_mtls: dict[int, PortMtls] | None = Field(None, alias="portLevelMtls")

    @field_validator("port_level_mtls")
    @classmethod
    def _ports(cls, v: dict[int, PortMtls] | None) -> dict[int, PortMtls] | None:
        for p in v or {}:
            if not 1 <= p <= 65535:
                raise ValueError(f"port {p} is out of range 1-65535")
        return v


@register
class PeerAuthentication(Resource):
    """Whether plaintext may reach a workload. Precedence: workload selector over namespace
    over the root namespace (mesh-wide); the mesh default is STRICT (see docs)."""

    KIND: ClassVar[str] = "PeerAuthentication"
    API_VERSIONS: ClassVar[tuple[str, ...]] = ISTIO_SECURITY

    spec: PeerAuthenticationSpec = Field(default_factory=PeerAuthenticationSpec)

    def semantic_check(self) -> list[tuple[tuple[str | int, ...], str]]:
        if self.spec.port_level_mtls and not self.spec.selector:
            return [
                (("spec", "portLevelMtls"), "portLevelMtls needs a workload selector (as in Istio)")
            ]
        return []
