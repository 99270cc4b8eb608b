"""ConfigDiscovery: the config stream to each node agent, deltas from what it acknowledged;
on the main (mutual TLS) listener.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc

from controller.api.gen import config_pb2, config_pb2_grpc
from controller.services import caller_node
from controller.store import Entry

if TYPE_CHECKING:
    from controller.server import Controller

log = logging.getLogger("weft.controller")


@dataclass
class NodeSession:
    node: str
    peer: str
    agent_version: str = ""
    connected: bool = True
    acked_revision: int = 0
    sent_revision: int = 0
    last_nack: str = ""
    last_seen: float = field(default_factory=time.time)


@dataclass(frozen=True)
class Outgoing:
    """One response to an agent: what the stream remembers of it, and its wire bytes."""

    revision: int
    nonce: str
    trust_bundle_pem: bytes
    wire: bytes  # a serialized ConfigResponse


def _wire(msg: bytes) -> bytes:
    return msg


def add_to_server(service: ConfigService, server: grpc.aio.Server) -> None:
    """config_pb2_grpc.add_ConfigDiscoveryServicer_to_server, except that the stream yields
    serialized responses (a full snapshot is serialized once per revision, not per agent)."""
    handlers = {
        "Stream": grpc.stream_stream_rpc_method_handler(
            service.Stream,
            request_deserializer=config_pb2.ConfigRequest.FromString,
            response_serializer=_wire,
        )
    }
    name = "weft.config.v1.ConfigDiscovery"
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))
    server.add_registered_method_handlers(name, handlers)


def _resource_pb(e: Entry) -> config_pb2.Resource:
    k = e.key
    return config_pb2.Resource(
        kind=k.kind, namespace=k.namespace, name=k.name, revision=e.revision, body=e.body
    )


class ConfigService(config_pb2_grpc.ConfigDiscoveryServicer):
    """One stream per agent; one response in flight at a time (as in xDS), so a burst of
    changes coalesces into the next response and every delta is computed from what the
    agent has acknowledged."""

    def __init__(self, c: Controller) -> None:
        self.c = c
        # The newest full snapshot, serialized once per revision: every agent that
        # (re)connects at that revision is sent those bytes followed by its own stream's
        # fields (protobuf parses concatenated messages as one, later scalars winning).
        # Building 10,000 resource messages per agent was two thirds of the controller's
        # CPU in an initial sync, and copying and serializing a cached message per agent
        # most of the rest (fresh pages for 2.5 MB, twice, per agent).
        self._full: tuple[str, int, bytes] | None = None

    async def Stream(
        self,
        request_iterator: AsyncIterator[config_pb2.ConfigRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[bytes]:
        c = self.c
        node = await caller_node(c, context)
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("kind") != "subscribe":
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "first message must be a Subscribe"
            )
            return
        sub = first.subscribe
        if sub.node != node:
            c.metrics.refused.labels("wrong_node").inc()
            log.warning(
                "refused config stream: certificate of node %s subscribed as %r", node, sub.node
            )
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"certificate is for node {node}, not {sub.node!r}",
            )
            return
        session = NodeSession(node=node, peer=context.peer(), agent_version=sub.agent_version)
        c.sessions[node] = session
        c.metrics.agents.set(sum(s.connected for s in c.sessions.values()))
        acked = sub.revision if sub.epoch == c.store.epoch else None
        session.acked_revision = acked or 0
        log.info(
            "node %s subscribed (epoch %s, revision %d; ours %s/%d)",
            node,
            sub.epoch or "-",
            sub.revision,
            c.store.epoch,
            c.store.revision,
        )
        replies: asyncio.Queue[config_pb2.ConfigRequest | None] = asyncio.Queue()

        async def read() -> None:
            try:
                async for msg in request_iterator:
                    await replies.put(msg)
            finally:
                await replies.put(None)

        reader = asyncio.create_task(read(), name=f"config-read-{node}")
        sent_bundle = b""
        try:
            while True:
                seen = c.generation
                resp = self._response(acked, sent_bundle)
                if resp is None:
                    # Nothing new for this agent: wait for the store or the bundle to move on.
                    await c.wait_change(seen, max_wait=30)
                    if reader.done():
                        return
                    continue
                session.sent_revision = resp.revision
                sent_bundle = resp.trust_bundle_pem or sent_bundle
                yield resp.wire
                reply = await replies.get()
                if reply is None:
                    return
                session.last_seen = time.time()
                kind = reply.WhichOneof("kind")
                if kind == "ack" and reply.ack.nonce == resp.nonce:
                    acked = reply.ack.revision
                    session.acked_revision = acked
                    session.last_nack = ""
                    c.metrics.acks.inc()
                elif kind == "nack":
                    text = (
                        "; ".join(
                            f"{p.resource}: {p.field}: {p.reason}".strip(": ")
                            for p in reply.nack.problems
                        )
                        or "no reason given"
                    )
                    session.last_nack = text
                    c.metrics.nacks.labels(node).inc()
                    log.error(
                        "node %s rejected config revision %d: %s (it keeps running revision %d)",
                        node,
                        resp.revision,
                        text,
                        reply.nack.revision,
                    )
                    # `acked` stays: the agent still runs what it last acknowledged. Do not
                    # resend the same thing; wait for the config to change.
                    await c.wait_change(seen)
        finally:
            reader.cancel()
            session.connected = False
            c.metrics.agents.set(sum(s.connected for s in c.sessions.values()))
            log.info("node %s disconnected (acked revision %d)", node, session.acked_revision)

    def _response(self, acked: int | None, sent_bundle: bytes) -> Outgoing | None:
        c = self.c
        bundle = c.ca.bundle_pem()
        new_bundle = bundle if bundle != sent_bundle else b""
        delta = c.store.delta_since(acked) if acked is not None else None
        common: dict[str, Any] = {
            "nonce": uuid.uuid4().hex[:12],
            "epoch": c.store.epoch,
            "trust_bundle_pem": new_bundle,
            "trust_domain": c.settings.trust_domain,
        }
        if delta is not None:
            if not delta.upserts and not delta.removed and not new_bundle:
                return None
            msg = config_pb2.ConfigResponse(
                revision=delta.revision,
                full=False,
                base_revision=delta.base,
                resources=[_resource_pb(e) for e in delta.upserts],
                removed=[
                    config_pb2.ResourceKey(kind=k.kind, namespace=k.namespace, name=k.name)
                    for k in delta.removed
                ],
                **common,
            )
            return Outgoing(delta.revision, msg.nonce, new_bundle, msg.SerializeToString())
        revision, body = self._full_snapshot()
        return Outgoing(
            revision=revision,
            nonce=common["nonce"],
            trust_bundle_pem=new_bundle,
            wire=body + config_pb2.ConfigResponse(**common).SerializeToString(),
        )

    def _full_snapshot(self) -> tuple[int, bytes]:
        """The store's current revision as a serialized full response, without the
        per-stream fields (nonce, epoch, trust)."""
        store = self.c.store
        cached = self._full
        if cached is not None and cached[:2] == (store.epoch, store.revision):
            return cached[1], cached[2]
        epoch = store.epoch
        revision, entries = store.snapshot()
        body = config_pb2.ConfigResponse(
            revision=revision, full=True, resources=[_resource_pb(e) for e in entries]
        ).SerializeToString()
        self._full = (epoch, revision, body)
        return revision, body
