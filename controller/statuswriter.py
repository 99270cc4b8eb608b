"""Conditions written back to Kubernetes: `kubectl get` and `kubectl describe` say whether a
route or policy took effect, and why not.

The controller computes Gateway API-style conditions for every stored resource
(controller/model/status.py: Accepted, ResolvedRefs, with reasons) and, for the resources
that came from the Kubernetes API, writes them to the object's status subresource with a
JSON merge patch of `status` only (never spec, so a user's apply and the controller never
fight). Routes (HTTPRoute, GRPCRoute) get Gateway API's route status: one entry per parent
Service under `status.parents`, with `controllerName: weft.dev/controller`; every other kind
gets `status.conditions`. A resource is written when its conditions change (and once after
the controller starts); `lastTransitionTime` moves only when a condition's status does.

In the lab (the files source) the same conditions are in the store and `weft policy get`
shows them; nothing is written back to files.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from controller.model.base import Resource, ResourceKey
from controller.model.status import Condition, conditions
from controller.sources.kubernetes import KubeAPI, KubeAPIError, WatchedKind
from controller.store import ConfigStore

log = logging.getLogger("weft.status")

CONTROLLER_NAME = "weft.dev/controller"
ROUTES = ("HTTPRoute", "GRPCRoute")
# Kinds the controller does not own the status of (the kubelet's, the API server's).
NOT_OURS = ("Pod", "Node", "Namespace", "Service")


def _stamp(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


class StatusWriter:
    def __init__(
        self,
        api: KubeAPI,
        store: ConfigStore,
        kinds: list[WatchedKind],
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.api = api
        self.store = store
        self.clock = clock
        self.kinds = {wk.kind: wk for wk in kinds if wk.kind not in NOT_OURS}
        # What was last written per resource: (type, status, reason, message) and when each
        # condition's status last changed.
        self.written: dict[ResourceKey, tuple[tuple[str, bool, str, str], ...]] = {}
        self.since: dict[tuple[ResourceKey, str], tuple[bool, float]] = {}
        self.revision = -1
        self.patches = 0
        self.failures = 0

    def sync(self) -> int:
        """Write what changed since the last sync; returns how many objects were patched."""
        if self.store.revision == self.revision:
            return 0
        revision = self.store.revision
        entries = self.store.entries()
        conds = conditions([e.resource for e in entries])
        live: set[ResourceKey] = set()
        patched = 0
        failed = False
        for e in entries:
            wk = self.kinds.get(e.resource.KIND)
            if wk is None or not e.source.startswith("kubernetes:"):
                continue
            cs = conds.get(e.key)
            if not cs:
                continue
            live.add(e.key)
            sig = tuple((c.type, c.status, c.reason, c.message) for c in cs)
            if self.written.get(e.key) == sig:
                continue
            try:
                obj = self.api.request("GET", self._path(wk, e.resource, status=False))
                body = self._body(e.resource, cs, obj)
                self.api.request("PATCH", self._path(wk, e.resource), body=body)
            except (KubeAPIError, OSError) as err:
                self.failures += 1
                failed = True
                log.warning("could not write the status of %s: %s", e.key, err)
                continue
            self.written[e.key] = sig
            patched += 1
        for k in [k for k in self.written if k not in live]:
            del self.written[k]
        if not failed:
            self.revision = revision  # else the next round tries what failed again
        self.patches += patched
        return patched

    @staticmethod
    def _path(wk: WatchedKind, r: Resource, *, status: bool = True) -> str:
        base = f"/apis/{wk.group}/{wk.version}" if wk.group else f"/api/{wk.version}"
        ns = f"/namespaces/{r.namespace}" if wk.namespaced else ""
        return f"{base}{ns}/{wk.plural}/{r.name}" + ("/status" if status else "")

    def _conditions(
        self, r: Resource, cs: list[Condition], generation: int | None
    ) -> list[dict[str, Any]]:
        now = self.clock()
        out = []
        for c in cs:
            prev = self.since.get((r.key, c.type))
            if prev is None or prev[0] != c.status:
                prev = self.since[(r.key, c.type)] = (c.status, now)
            d: dict[str, Any] = {
                **c.as_dict(),
                "lastTransitionTime": _stamp(prev[1]),
            }
            if generation is not None:
                d["observedGeneration"] = generation
            out.append(d)
        return out

    def _body(self, r: Resource, cs: list[Condition], obj: dict[str, Any]) -> dict[str, Any]:
        """The merge patch for `obj` (the object as the API has it now): ours replaced,
        other controllers' entries (a route's other controllers, Istio's own conditions)
        kept; with its resourceVersion, so a write that raced another is refused (409) and
        tried again next round, never written over."""
        meta = obj.get("metadata") or {}
        status = obj.get("status") or {}
        conditions_ = self._conditions(r, cs, meta.get("generation"))
        rv = meta.get("resourceVersion")
        head = {"resourceVersion": rv} if rv else {}
        if r.KIND in ROUTES:
            ours = [
                {
                    "parentRef": p.model_dump(by_alias=True, exclude_none=True),
                    "controllerName": CONTROLLER_NAME,
                    "conditions": conditions_,
                }
                for p in r.spec.parent_refs  # type: ignore[attr-defined]
            ]
            others = [
                p
                for p in status.get("parents") or []
                if isinstance(p, dict) and p.get("controllerName") != CONTROLLER_NAME
            ]
            return {"metadata": head, "status": {"parents": others + ours}}
        types = {c["type"] for c in conditions_}
        others = [
            c
            for c in status.get("conditions") or []
            if isinstance(c, dict) and c.get("type") not in types
        ]
        return {"metadata": head, "status": {"conditions": others + conditions_}}
