"""The agent's config stream: apply atomically, ACK or NACK, resume after reconnects.

- A response is applied only if every resource in it validates *and* the agent's own
  consumers accept the resulting snapshot; otherwise it is NACKed with the reasons and
  the previous snapshot keeps serving. Nothing is half-applied.
- A delta applies only on top of the revision it was computed from; a mismatch is a NACK
  and the controller answers with a full snapshot next time.
- While the controller is away the agent serves its last good config. It also keeps a
  copy on disk, so an agent restarted during an outage comes back with that config
  instead of with nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import threading
from collections.abc import AsyncGenerator, Awaitable, Callable
from pathlib import Path

from agent import __version__
from agent.identity.node import NodeCredential, TrustBundle, backoff_delays
from agent.identity.rpc import CONFIG_STREAM, RpcError, Status
from agent.state import ConfigSnapshot
from controller.api.gen import config_pb2
from controller.model.base import (
    Resource,
    ResourceKey,
    resource_from_json,
    resources_from_json,
)
from controller.model.bulk import collector_paused
from controller.model.problems import InvalidConfig, Problem

log = logging.getLogger("weft.config")

Apply = Callable[[ConfigSnapshot], Awaitable[None] | None]


SAVE_EVERY = 1.0  # seconds between writes of the config cache, at most


class ConfigRejected(Exception):
    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("; ".join(str(p) for p in problems))
        self.problems = problems


def unavailable_delay() -> float:
    """Seconds before asking an unavailable controller again: short, jittered so that the
    agents of a cluster do not ask in lockstep, and not growing."""
    return random.uniform(0.2, 0.6)


class ConfigClient:
    def __init__(
        self,
        node: NodeCredential,
        trust: TrustBundle,
        apply: Apply,
        *,
        cache: Path | None = None,
        trust_domain: str = "cluster.local",
    ) -> None:
        self.node = node
        self.trust = trust
        self._apply = apply
        self.cache = cache
        self.snapshot = ConfigSnapshot.empty(trust_domain)
        self.connected = False
        self.nacks = 0
        self.last_nack = ""
        self.updates = 0
        self._saver: asyncio.Task[None] | None = None
        self._save_lock = threading.Lock()
        self._saved = -1  # the sequence number of the snapshot in the cache file
        self._applied = 0  # snapshots applied so far: orders them across epochs

    # ---- applying ----------------------------------------------------------------------

    def _decode(self, resp: config_pb2.ConfigResponse) -> tuple[list[Resource], list[ResourceKey]]:
        """The response's resources, validated, and the keys it removes; raises
        ConfigRejected (naming every problem) for a delta on another base or a bad
        resource."""
        cur = self.snapshot
        if not resp.full and (resp.epoch != cur.epoch or resp.base_revision != cur.revision):
            raise ConfigRejected(
                [
                    Problem(
                        f"delta from revision {resp.base_revision} of epoch {resp.epoch} does not "
                        f"apply to this agent's revision {cur.revision} of epoch {cur.epoch or '-'}"
                    )
                ]
            )
        try:
            upserts = resources_from_json((r.kind, r.body) for r in resp.resources)
        except InvalidConfig:
            # Rejected: decode them one by one again, to name every problem.
            problems: list[Problem] = []
            for r in resp.resources:
                try:
                    resource_from_json(r.kind, r.body)
                except InvalidConfig as e:
                    problems += [
                        Problem(
                            p.reason, resource=f"{r.kind} {r.namespace}/{r.name}", field=p.field
                        )
                        for p in e.problems
                    ]
            raise ConfigRejected(problems) from None
        removed = [ResourceKey(k.kind, k.namespace, k.name) for k in resp.removed]
        return upserts, removed

    async def apply_response(self, resp: config_pb2.ConfigResponse) -> None:
        """Validate and apply one response; raises ConfigRejected (nothing applied). A delta
        costs what it changes (ConfigSnapshot.with_changes), not the size of the mesh."""
        td = resp.trust_domain or self.snapshot.trust_domain
        try:
            # A full snapshot is a mesh's worth of objects that all survive: decoded and
            # indexed without the cyclic collector walking the heap again and again, and
            # then tenured: it is long-lived (controller/model/bulk.py).
            with collector_paused(tenure=resp.full):
                upserts, removed = self._decode(resp)
                if resp.full:
                    snap = ConfigSnapshot.build(
                        resp.epoch, resp.revision, td, {r.key: r for r in upserts}
                    )
                else:
                    snap = self.snapshot.with_changes(resp.epoch, resp.revision, upserts, removed)
        except ConfigRejected:
            raise
        except Exception as e:  # NACKed, the previous snapshot serves: never a dead stream
            log.exception("config revision %d could not be indexed", resp.revision)
            raise ConfigRejected(
                [Problem(f"revision {resp.revision} could not be indexed: {e!r}")]
            ) from e
        if resp.trust_bundle_pem:
            self.trust.update(resp.trust_bundle_pem)
        try:
            result = self._apply(snap)
            if asyncio.iscoroutine(result):
                await result
        except InvalidConfig as e:
            raise ConfigRejected(e.problems) from None
        self.snapshot = snap
        self.updates += 1
        self._applied += 1
        churn = not resp.full and {r.KIND for r in upserts} | {k.kind for k in removed} <= {
            "Workload",
            "Node",
        }
        if churn:
            self._schedule_save()
        else:
            # Policy and the first snapshot are saved before this returns: a crash right
            # after must not bring an agent back under an older policy (it would revoke
            # or admit connections by it until the controller answers).
            try:
                self._save(snap, self._applied)
            except OSError as e:  # a full disk: the config applies; the cache is stale
                log.warning("could not save the config cache %s: %s", self.cache, e)

    # ---- the on-disk copy --------------------------------------------------------------

    def _schedule_save(self) -> None:
        """Write the cache beside the request path after workload churn: at most one write
        in flight, of the newest snapshot, SAVE_EVERY apart (a burst of pod changes is one
        write, not one each; rewriting a large mesh's config costs far more than applying
        the delta). A crash can lose the last second of pod changes, which the controller
        sends again; never a policy change (saved at once)."""
        if self.cache is None or self._saver is not None:
            return
        self._saver = asyncio.get_running_loop().create_task(self._save_soon(), name="config-cache")

    async def _save_soon(self) -> None:
        try:
            while True:
                snap, seq = self.snapshot, self._applied
                await asyncio.to_thread(self._save, snap, seq)
                await asyncio.sleep(SAVE_EVERY)
                if self.snapshot is snap:
                    return
        except Exception as e:  # a full disk must not stop the config stream; it is said
            log.warning("could not save the config cache %s: %s", self.cache, e)
        finally:
            self._saver = None

    async def flush(self) -> None:
        """Save the newest snapshot now (stopping)."""
        if self._saver is not None:
            self._saver.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._saver
        if self.cache is not None and self.snapshot.revision:
            await asyncio.to_thread(self._save, self.snapshot, self._applied)

    def _save(self, snap: ConfigSnapshot, seq: int) -> None:
        """Write `snap`, the `seq`th snapshot applied. One writer at a time (the loop's
        urgent saves, the churn saver's thread), and never an older snapshot over a newer
        one, whatever their epochs."""
        if self.cache is None:
            return
        with self._save_lock:
            if seq <= self._saved:
                return  # this one, or a later one, is there already
            self._write(snap)
            self._saved = seq

    def _write(self, snap: ConfigSnapshot) -> None:
        assert self.cache is not None
        self.cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.cache.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(snap.to_json())  # the Workload API's document (ConfigSnapshot.to_json)
        tmp.replace(self.cache)

    async def load_cache(self) -> bool:
        """Serve the config saved by a previous run until the controller answers."""
        if self.cache is None or not self.cache.exists():
            return False
        try:
            with collector_paused(tenure=True):
                snap = ConfigSnapshot.from_json(json.loads(self.cache.read_bytes()))
            result = self._apply(snap)
            if asyncio.iscoroutine(result):
                await result
        except (OSError, ValueError, KeyError, InvalidConfig) as e:
            log.warning("ignoring cached config %s: %s", self.cache, e)
            return False
        self.snapshot = snap
        log.info("serving cached config revision %d until the controller answers", snap.revision)
        return True

    # ---- the stream --------------------------------------------------------------------

    async def run(self) -> None:
        delay = backoff_delays(base=0.5, cap=30.0)
        while True:
            try:
                await self._stream()
                delay = backoff_delays(base=0.5, cap=30.0)
            except asyncio.CancelledError:
                raise
            except RpcError as e:
                log.warning(
                    "config stream to the controller ended: %s: %s; serving revision %d meanwhile",
                    e.code().name,
                    e.details(),
                    self.snapshot.revision,
                )
                if e.code() == Status.UNAVAILABLE:
                    # The controller is away (refusing, restarting): the next call dials
                    # it again; ask again about a second later (jittered), not after a
                    # growing backoff.
                    self.connected = False
                    await asyncio.sleep(unavailable_delay())
                    continue
            except OSError as e:
                log.warning("config stream failed: %s", e)
            finally:
                self.connected = False
            await asyncio.sleep(delay())

    async def _stream(self) -> None:
        await self.node.ready.wait()
        ch = self.node.channel()
        outbox: asyncio.Queue[config_pb2.ConfigRequest] = asyncio.Queue()
        snap = self.snapshot
        await outbox.put(
            config_pb2.ConfigRequest(
                subscribe=config_pb2.Subscribe(
                    node=self.node.node,
                    epoch=snap.epoch,
                    revision=snap.revision,
                    agent_version=__version__,
                )
            )
        )

        # Closed here whatever ends the loop (a cancel, a rejected apply): the stream and
        # its sender task end now, not when the generator is collected.
        async with contextlib.aclosing(
            ch.stream(CONFIG_STREAM, config_pb2.ConfigRequest, config_pb2.ConfigResponse, outbox)
        ) as call:
            await self._consume(call, outbox)

    async def _consume(
        self,
        call: AsyncGenerator[config_pb2.ConfigResponse, None],
        outbox: asyncio.Queue[config_pb2.ConfigRequest],
    ) -> None:
        async for resp in call:
            self.connected = True
            try:
                await self.apply_response(resp)
            except ConfigRejected as e:
                self.nacks += 1
                self.last_nack = str(e)
                log.error(
                    "rejected config revision %d: %s (still serving revision %d)",
                    resp.revision,
                    e,
                    self.snapshot.revision,
                )
                await outbox.put(
                    config_pb2.ConfigRequest(
                        nack=config_pb2.Nack(
                            nonce=resp.nonce,
                            revision=self.snapshot.revision,
                            problems=[
                                config_pb2.Problem(
                                    resource=p.resource or "", field=p.field or "", reason=p.reason
                                )
                                for p in e.problems
                            ],
                        )
                    )
                )
                continue
            log.info(
                "applied config revision %d (%s, %d resources)",
                resp.revision,
                "snapshot" if resp.full else "delta",
                len(self.snapshot.resources),
            )
            await outbox.put(
                config_pb2.ConfigRequest(
                    ack=config_pb2.Ack(nonce=resp.nonce, revision=resp.revision)
                )
            )
