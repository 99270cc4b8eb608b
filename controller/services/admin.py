"""Admin: the operator API behind `weft policy ...` (apply, delete, get, nodes,
rejections, node tokens, root rotation); on the admin Unix socket only.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import yaml

from controller.api.gen import admin_pb2, admin_pb2_grpc
from controller.model.base import ResourceKey, kind_named
from controller.model.loader import duplicates, parse_text
from controller.model.problems import Problem
from controller.model.status import conditions
from controller.sources.files import APPLIED_DIR

if TYPE_CHECKING:
    from controller.server import Controller

log = logging.getLogger("weft.controller")


# The largest admin request (an apply): the CLI checks files against APPLY_LIMITS first,
# so a user sees which file is too large instead of a gRPC size error.
ADMIN_MAX_MESSAGE = 20 * 1024 * 1024


def _problem_info(p: Problem) -> admin_pb2.ProblemInfo:
    return admin_pb2.ProblemInfo(
        file=p.file or "",
        line=p.line or 0,
        resource=p.resource or "",
        field=p.field or "",
        reason=p.reason,
    )


class AdminService(admin_pb2_grpc.AdminServicer):
    def __init__(self, c: Controller) -> None:
        self.c = c

    def _applied_path(self, key: ResourceKey) -> Path:
        ns = key.namespace or "_cluster"
        return self.c.settings.config_dir / APPLIED_DIR / f"{key.kind}.{ns}.{key.name}.yaml"

    async def Apply(
        self, request: admin_pb2.ApplyRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ApplyResponse:
        c = self.c
        problems: list[Problem] = []
        resources = []
        offers = []
        for doc in request.documents:
            offer = parse_text(
                doc.text, doc.file or "<stdin>", default_namespace=request.namespace or None
            )
            offers.append(offer)
            problems += offer.problems
            resources += offer.resources
        problems += duplicates(offers)
        for r in resources:
            owner = c.store.owner(r.key)
            mine = c.source.source_id(self._applied_path(r.key))
            if owner is not None and owner != mine:
                problems.append(
                    Problem(f"already defined by {owner}; edit it there", resource=str(r.key))
                )
        if problems:
            return admin_pb2.ApplyResponse(
                problems=[_problem_info(p) for p in problems], revision=c.store.revision
            )
        applied = []
        for r in resources:
            cur = c.store.get(r.key)
            action = (
                "created"
                if cur is None
                else "unchanged"
                if cur.body == r.to_json().encode()
                else "configured"
            )
            applied.append(
                admin_pb2.Applied(
                    kind=r.key.kind, namespace=r.key.namespace, name=r.key.name, action=action
                )
            )
            if request.dry_run or action == "unchanged":
                continue
            path = self._applied_path(r.key)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(yaml.safe_dump(r.to_dict(), sort_keys=False))
            tmp.replace(path)
        if not request.dry_run:
            await asyncio.to_thread(c.source.scan)
        # Applied, but will it take effect? Judged on the config as it is with these in it.
        mine = {r.key: r for r in resources}
        everything = {e.key: e.resource for e in c.store.entries()} | mine
        status = conditions(everything.values())
        warnings = [
            _problem_info(
                Problem(f"{cd.type} is False ({cd.reason}): {cd.message}", resource=str(k))
            )
            for k in mine
            for cd in status.get(k, ())
            if not cd.status
        ]
        return admin_pb2.ApplyResponse(
            applied=applied, revision=c.store.revision, warnings=warnings
        )

    async def Delete(
        self, request: admin_pb2.DeleteRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.DeleteResponse:
        c = self.c
        cls = kind_named(request.kind)
        if cls is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unknown kind {request.kind!r}")
            raise AssertionError
        key = ResourceKey(
            cls.KIND,
            (request.namespace or cls.DEFAULT_NAMESPACE) if cls.NAMESPACED else "",
            request.name,
        )
        owner = c.store.owner(key)
        path = self._applied_path(key)
        if owner is None:
            return admin_pb2.DeleteResponse(deleted=False, revision=c.store.revision)
        if owner != c.source.source_id(path):
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION, f"{key} is defined by {owner}; remove it there"
            )
        path.unlink()
        await asyncio.to_thread(c.source.scan)
        return admin_pb2.DeleteResponse(deleted=True, revision=c.store.revision)

    async def Get(
        self, request: admin_pb2.GetRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.GetResponse:
        c = self.c
        kind = None
        if request.kind:
            cls = kind_named(request.kind)
            if cls is None:
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT, f"unknown kind {request.kind!r}"
                )
                raise AssertionError
            kind = cls.KIND
        status = conditions(r.resource for r in c.store.entries())
        out = [
            admin_pb2.StoredResource(
                kind=e.key.kind,
                namespace=e.key.namespace,
                name=e.key.name,
                revision=e.revision,
                source=e.source,
                body=e.body,
                conditions=[
                    admin_pb2.ConditionInfo(
                        type=cd.type, status=cd.status, reason=cd.reason, message=cd.message
                    )
                    for cd in status.get(e.key, ())
                ],
            )
            for e in c.store.entries(kind)
            if (not request.namespace or e.key.namespace == request.namespace)
            and (not request.name or e.key.name == request.name)
        ]
        return admin_pb2.GetResponse(resources=out, revision=c.store.revision)

    async def ListNodes(
        self, request: admin_pb2.ListNodesRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ListNodesResponse:
        c = self.c
        return admin_pb2.ListNodesResponse(
            nodes=[
                admin_pb2.NodeInfo(
                    node=s.node,
                    connected=s.connected,
                    acked_revision=s.acked_revision,
                    sent_revision=s.sent_revision,
                    last_nack=s.last_nack,
                    last_seen_unix=int(s.last_seen),
                    agent_version=s.agent_version,
                    peer=s.peer,
                )
                for s in sorted(c.sessions.values(), key=lambda s: s.node)
            ],
            revision=c.store.revision,
            epoch=c.store.epoch,
        )

    async def ListRejections(
        self, request: admin_pb2.ListRejectionsRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ListRejectionsResponse:
        return admin_pb2.ListRejectionsResponse(
            problems=[_problem_info(p) for r in self.c.store.rejections() for p in r.problems]
        )

    async def CreateNodeToken(
        self, request: admin_pb2.CreateNodeTokenRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.CreateNodeTokenResponse:
        token, expires = self.c.tokens.create(
            request.node, request.ttl_seconds or self.c.settings.node_token_ttl
        )
        log.info("created a bootstrap token for node %s", request.node)
        return admin_pb2.CreateNodeTokenResponse(token=token, expires_unix=int(expires))

    async def RotateRoot(
        self, request: admin_pb2.RotateRootRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.RotateRootResponse:
        kw = {"overlap": float(request.overlap_seconds)} if request.overlap_seconds else {}
        await asyncio.to_thread(self.c.ca.rotate, **kw)
        self.c._write_bundle()
        await self.c._notify()  # streams send the new bundle with their next response
        return admin_pb2.RotateRootResponse(trust_bundle_pem=self.c.ca.bundle_pem())
