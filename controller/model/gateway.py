"""A waypoint declared the way Istio's ambient mode declares one: a Gateway API `Gateway`.

    apiVersion: gateway.networking.k8s.io/v1
    kind: Gateway
    metadata: {name: ai-waypoint, namespace: ai}
    spec:
      gatewayClassName: weft-waypoint        # or istio-waypoint, as `istioctl waypoint` writes it
      listeners: [{name: mesh, port: 15008, protocol: HBONE}]

A waypoint's instances are the pods labelled `weft.dev/waypoint: NAME` in its namespace
(the chart's `waypoints` value runs them as a Deployment and renders this Gateway beside it;
a lab manifest declares them as pods). The Gateway is what a user asks for and reads back:
the controller reports on it whether the waypoint is accepted and has instances
(`Programmed`, reason `NoResources` while none runs), so a waypoint that was declared but
never deployed is visible, not an L7 policy that silently applies nowhere.

Gateways of other classes are ingress gateways: not weft's. The Kubernetes source skips
them (another controller owns them); a file that declares one is refused with that reason.
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field, field_validator, model_validator

from controller.model.base import Model, ObjectName, Resource, register

GATEWAY_API = ("gateway.networking.k8s.io/v1", "gateway.networking.k8s.io/v1beta1")
WAYPOINT_CLASSES = ("weft-waypoint", "istio-waypoint")
HBONE_PORT = 15008
# Istio's label on a waypoint Gateway: which traffic it serves. weft waypoints serve
# Services (weft.dev/use-waypoint on a Service or Namespace).
WAYPOINT_FOR_LABEL = "istio.io/waypoint-for"


def is_waypoint_gateway(obj: dict[str, object]) -> bool:
    """An API object (raw) is a Gateway of a waypoint class: weft's to read."""
    spec = obj.get("spec")
    return isinstance(spec, dict) and spec.get("gatewayClassName") in WAYPOINT_CLASSES


class Listener(Model):
    name: ObjectName
    port: int = Field(ge=1, le=65535)
    protocol: str
    hostname: str | None = None
    tls: object = None
    allowed_routes: object = Field(None, alias="allowedRoutes")

    @model_validator(mode="after")
    def _hbone(self) -> Listener:
        if self.protocol != "HBONE" or self.port != HBONE_PORT:
            raise ValueError(
                f"a waypoint listens for HBONE on port {HBONE_PORT} only "
                f"(got {self.protocol} on {self.port}): write "
                f"{{name: mesh, port: {HBONE_PORT}, protocol: HBONE}}"
            )
        for name in ("hostname", "tls"):
            if getattr(self, name) is not None:
                raise ValueError(f"{name}: not used by a waypoint listener (HBONE, mTLS)")
        if self.allowed_routes is not None and self.allowed_routes != {
            "namespaces": {"from": "Same"}
        }:
            # Istio reads this as "who may use the waypoint from other namespaces".
            raise ValueError(
                "allowedRoutes: a weft waypoint serves the Services of its own namespace "
                "only (namespaces: {from: Same}); use from other namespaces is not implemented"
            )
        return self


class GatewaySpec(Model):
    gateway_class_name: str = Field(alias="gatewayClassName")
    listeners: list[Listener] = Field(min_length=1, max_length=1)
    addresses: list[object] = Field(default_factory=list)
    infrastructure: object = None

    @field_validator("gateway_class_name")
    @classmethod
    def _waypoint_class(cls, v: str) -> str:
        if v not in WAYPOINT_CLASSES:
            raise ValueError(
                f"class {v!r} is an ingress gateway's: weft reads only waypoint Gateways "
                f"(gatewayClassName {' or '.join(WAYPOINT_CLASSES)}); a waypoint serves L7 "
                "inside the mesh, and weft has no ingress gateway"
            )
        return v

    @model_validator(mode="after")
    def _unused(self) -> GatewaySpec:
        if self.addresses:
            raise ValueError(
                "addresses: a waypoint's addresses are its pods' (and its Service's); "
                "weft assigns none"
            )
        if self.infrastructure is not None:
            raise ValueError(
                "infrastructure: weft does not deploy from the Gateway; set the pods' "
                "labels and resources in the chart's waypoints value"
            )
        return self


@register
class Gateway(Resource):
    """A waypoint (Gateway class weft-waypoint or istio-waypoint). See the module doc."""

    KIND: ClassVar[str] = "Gateway"
    API_VERSIONS: ClassVar[tuple[str, ...]] = GATEWAY_API

    spec: GatewaySpec

    @model_validator(mode="before")
    @classmethod
    def _not_istio_ingress(cls, data: object) -> object:
        v = data.get("apiVersion") if isinstance(data, dict) else None
        if isinstance(v, str) and v.startswith("networking.istio.io/"):
            raise ValueError(
                "Istio's networking Gateway is an ingress gateway, which weft does not have; "
                "a waypoint is a gateway.networking.k8s.io/v1 Gateway of class weft-waypoint"
            )
        return data

    def semantic_check(self) -> list[tuple[tuple[str | int, ...], str]]:
        served = self.metadata.labels.get(WAYPOINT_FOR_LABEL)
        if served not in (None, "service", "all"):
            return [
                (
                    ("metadata", "labels", WAYPOINT_FOR_LABEL),
                    f"{WAYPOINT_FOR_LABEL}: {served}: weft waypoints serve Services "
                    "(service or all); a waypoint for workloads only is not implemented",
                )
            ]
        return []
