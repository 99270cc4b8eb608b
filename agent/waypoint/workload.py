"""The waypoint's link to its node agent: its own certificate and the mesh config.

Both come from the agent's Workload API on a Unix socket (agent/workloadapi.py), which
attests this process by its cgroup. Nothing here talks to the controller directly: the
agent already holds what the waypoint needs, and one connection per node is enough.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from agent.identity.tls import client_context, server_context
from agent.state import ConfigSnapshot, resources_from_json
from agent.waypoint.codec import client
from controller.model.base import ResourceKey
from controller.model.bulk import collector_paused

log = logging.getLogger("weft.waypoint.workload")


@dataclass
class Svid:
    spiffe_id: str
    chain: bytes
    key: bytes
    bundle: bytes
    not_after: float

    def client(self) -> Any:
        return client_context(self.chain, self.key, self.bundle)

    def server(self) -> Any:
        return server_context(self.chain, self.key, self.bundle)


async def _get(sock: Path, path: str, limit: float) -> tuple[int, Any]:
    """GET `path` from the agent's Workload API. A connection the agent drops (it
    restarts) is a ConnectionError, never a parse error on half an answer."""
    answer = await client.request(sock, "GET", path, "agent", peer="the node agent", limit=limit)
    return answer.status, json.loads(answer.body) if answer.body else None


class AgentLink:
    def __init__(
        self,
        sock: Path,
        on_config: Callable[[ConfigSnapshot], None],
        on_svid: Callable[[Svid], None],
    ) -> None:
        self.sock = sock
        self.on_config = on_config
        self.on_svid = on_svid
        self.svid: Svid | None = None
        self.snapshot: ConfigSnapshot | None = None  # the last config applied
        self.deltas = 0  # configs applied as a delta from the previous one

    async def fetch_svid(self) -> Svid:
        status, doc = await _get(self.sock, "/v1/svid", 15)
        if status != 200:
            raise ConnectionError(
                f"the node agent refused our identity ({status}): {doc.get('error') if doc else ''}"
            )
        svid = Svid(
            doc["spiffeId"],
            doc["chain"].encode(),
            doc["key"].encode(),
            doc["bundle"].encode(),
            float(doc["notAfter"]),
        )
        self.svid = svid
        self.on_svid(svid)
        return svid

    @property
    def revision(self) -> int:
        return self.snapshot.revision if self.snapshot is not None else -1

    @property
    def epoch(self) -> str:
        return self.snapshot.epoch if self.snapshot is not None else ""

    async def fetch_config(self) -> ConfigSnapshot:
        """The next config: a delta from the one applied when the agent has one (a one-pod
        change costs what it changes), else all of it."""
        query = f"after={self.revision}&epoch={quote(self.epoch)}&delta=1"
        status, doc = await _get(self.sock, f"/v1/config?{query}", 40)
        if status != 200:
            raise ConnectionError(
                f"the node agent refused the config ({status}): {doc.get('error') if doc else ''}"
            )
        base = doc.get("base")
        prev = self.snapshot
        if base is not None:
            if prev is None or base != prev.revision:
                # Never applied over what it was not computed from: ask for everything.
                self.snapshot = None
                raise ConnectionError(f"the node agent sent a delta from revision {base}")
            same = (doc["epoch"], doc["revision"]) == (prev.epoch, prev.revision)
            if same and not doc["resources"] and not doc.get("removed"):
                return prev  # the long poll ran out with nothing new
        with collector_paused():
            if prev is not None and base is not None:
                upserts = resources_from_json(doc["resources"])
                removed = [ResourceKey(*k) for k in doc.get("removed", [])]
                snap = prev.with_changes(doc["epoch"], doc["revision"], upserts, removed)
            else:
                snap = ConfigSnapshot.from_json(doc)
        if (snap.epoch, snap.revision) != (self.epoch, self.revision):
            self.on_config(snap)
            # Only once applied: a revision that failed to apply is fetched and tried again.
            self.snapshot = snap
            self.deltas += base is not None
        return snap

    async def run(self) -> None:
        """Keep the certificate fresh (renew at half-life) and follow config changes."""

        async def svids() -> None:
            while True:
                svid = self.svid
                wait = 5.0 if svid is None else max(5.0, (svid.not_after - time.time()) / 2)
                await asyncio.sleep(wait)
                try:
                    await self.fetch_svid()
                except (OSError, ConnectionError, ValueError) as e:
                    log.warning("renewing the waypoint certificate failed: %s", e)

        async def configs() -> None:
            while True:
                try:
                    await self.fetch_config()
                except (OSError, ConnectionError, ValueError, TimeoutError) as e:
                    log.warning("config from the node agent: %s; retrying", e)
                    await asyncio.sleep(1)
                except Exception:
                    # Applying the config failed. The previous config keeps serving, and
                    # this loop must not die quietly with it: say so, and try again.
                    log.exception("applying config revision from the node agent failed")
                    await asyncio.sleep(1)

        await asyncio.gather(svids(), configs())
