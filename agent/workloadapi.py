"""The Workload API: local workloads fetch their own identity (and waypoints, the config).

A process on this node connects to the agent's Unix socket; the agent attests it the way
SPIRE's agent does: SO_PEERCRED gives the caller's pid, /proc/<pid>/cgroup its cgroup,
and the cgroup is a pod this node runs. The caller gets that pod's certificate and key —
never another's. Waypoints (workloads labelled weft.dev/waypoint) may also read the
config snapshot, which they need to route, with a long poll for changes.

    GET /v1/svid                     {spiffeId, chain, key, bundle, notAfter}
    GET /v1/config?after=REVISION&epoch=EPOCH[&delta=1]
                                     {epoch, revision, trustDomain, resources: [...]}
                                     waits up to 30 s for a revision newer than REVISION
                                     or an epoch other than EPOCH
                                     with delta=1, when this agent served EPOCH/REVISION
                                     lately: {..., base: REVISION, resources: [changed],
                                     removed: [[kind, namespace, name], ...]}

Deltas: a one-pod change at 10,000 workloads was 10,000 resources serialized by the agent
and validated and indexed by every waypoint on the node, per change (on the waypoint's
event loop, between requests). The agent remembers the last RECENT configs it served and
answers a waypoint that asks for one with what changed since (by identity, else by
equality: a full snapshot from the controller rebuilds every object); the waypoint
applies it with ConfigSnapshot.with_changes. `delta=1` is the waypoint's opt-in, so an
older waypoint gets full configs, and an older agent's full answer is taken as one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.httpserver import HttpRequest, Response, json_response
from agent.state import ConfigSnapshot, resource_json
from agent.unixsock import peer_cred
from controller.model.base import Resource, ResourceKey
from controller.model.workloads import WAYPOINT_LABEL, Workload

if TYPE_CHECKING:
    from agent.main import Agent

log = logging.getLogger("weft.workloadapi")


LONG_POLL = 30.0  # seconds a config request waits for a change before answering as is
RECENT = 4  # configs served lately that a waypoint may get a delta from

Sources = Mapping[ResourceKey, Resource]


def peer_pid(transport: Any) -> int | None:
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    return peer_cred(sock)[0]


def cgroup_of_pid(pid: int) -> str | None:
    """The cgroup v2 path of a process, relative to the hierarchy root ("/a/b")."""
    try:
        for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
            hier, _, path = line.split(":", 2)
            if hier == "0":
                return path
    except (OSError, ValueError):
        return None
    return None


class WorkloadApi:
    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.changed = asyncio.Condition()
        self._served: OrderedDict[tuple[str, int], Sources] = OrderedDict()

    def routes(self) -> dict[str, Any]:
        return {"/v1/svid": self.svid, "/v1/config": self.config}

    async def notify(self) -> None:
        async with self.changed:
            self.changed.notify_all()

    def attest(self, req: HttpRequest) -> Workload | None:
        pid = peer_pid(req.transport)
        if pid is None:
            return None
        return self.attest_pid(pid)

    def attest_waypoint(self, pid: int) -> str | None:
        """The address of the waypoint instance process `pid` is, or None (handoff.py)."""
        w = self.attest_pid(pid)
        if w is None or WAYPOINT_LABEL not in w.labels or not w.spec.addresses:
            return None
        return str(w.spec.addresses[0])

    def attest_pid(self, pid: int) -> Workload | None:
        """The pod of this node that process `pid` runs in (by its cgroup), or None."""
        cg = cgroup_of_pid(pid)
        if cg is None:
            return None
        root = self.agent.resolver.root
        for w in self.agent.snapshot.local_workloads(self.agent.s.node):
            path = self.agent.resolver.cgroup_of(w)
            if path is None:
                continue
            rel = "/" + str(path.relative_to(root)) if path.is_relative_to(root) else None
            # The caller may sit in a child cgroup of the pod (a container's).
            if rel is not None and (cg == rel or cg.startswith(rel + "/")):
                return w
        return None

    async def svid(self, req: HttpRequest) -> Response:
        w = self.attest(req)
        if w is not None and not (w.spec.mesh or WAYPOINT_LABEL in w.labels):
            return json_response(
                403,
                {
                    "error": f"workload {w.namespace}/{w.name} is not "
                    "enrolled in the mesh: it has no identity"
                },
            )
        if w is None:
            return json_response(
                403, {"error": "caller is not a workload of this node (attested by its cgroup)"}
            )
        cert = await self.agent.identities.wait_for(w.namespace, w.spec.service_account)
        if cert is None:
            return json_response(503, {"error": "no certificate yet; retry"})
        return json_response(
            200,
            {
                "spiffeId": cert.spiffe_id,
                "chain": cert.chain_pem.decode(),
                "key": cert.key_pem.decode(),
                "bundle": self.agent.trust.pem.decode(),
                "notAfter": cert.not_after,
                "workload": f"{w.namespace}/{w.name}",
            },
        )

    async def config(self, req: HttpRequest) -> Response:
        w = self.attest(req)
        if w is None or WAYPOINT_LABEL not in w.labels:
            return json_response(
                403, {"error": "only waypoints of this node may read the mesh config"}
            )
        after = int(req.query.get("after", "-1") or -1)
        epoch = req.query.get("epoch") or None

        def newer() -> bool:
            # A new epoch (the controller restarted, and its revisions with it) is new
            # config whatever its revision number.
            snap = self.agent.snapshot
            return snap.revision > after or (epoch is not None and snap.epoch != epoch)

        if not newer():
            async with self.changed:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.changed.wait_for(newer), LONG_POLL)
        snap = self.agent.snapshot
        base = None
        if req.query.get("delta") == "1" and epoch is not None:
            base = self._served.get((epoch, after))
        self._served[(snap.epoch, snap.revision)] = snap.sources
        self._served.move_to_end((snap.epoch, snap.revision))
        while len(self._served) > RECENT:
            self._served.popitem(last=False)
        if base is not None:
            return 200, self._delta(snap, after, base), "application/json"
        return 200, snap.to_json(), "application/json"

    @staticmethod
    def _delta(snap: ConfigSnapshot, after: int, base: Sources) -> bytes:
        now: Sources = snap.sources
        changed = []
        for k, r in now.items():
            old = base.get(k)
            if old is not r and old != r:
                changed.append(resource_json(k, r))
        removed = [[k.kind, k.namespace, k.name] for k in base if k not in now]
        return (
            f'{{{snap.json_head()},"base":{int(after)},"resources":[{",".join(changed)}],'
            f'"removed":{json.dumps(removed)}}}'
        ).encode()
