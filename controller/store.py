"""The controller's validated configuration, with history for deltas.

Sources (a YAML file, the Kubernetes API, `weft policy apply`) each *own* the resources
they provide. A source offers its complete current set; the store turns that into
upserts and deletions under one new revision.

Invariants:
- An invalid resource never replaces the last good one: the previous version stays
  active, and the problem is kept as a rejection that operators can list.
- Two sources cannot fight over one resource: the first owner keeps it and the second
  offer is rejected, naming both.
- Every change gets a revision; a bounded changelog lets reconnecting agents receive a
  delta instead of a full snapshot. `epoch` names this history: a different epoch (a
  controller that started afresh) means the agent's revision numbers mean nothing here.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from controller.model.base import Resource, ResourceKey
from controller.model.problems import Problem

log = logging.getLogger("weft.store")

CHANGELOG_LIMIT = 50_000  # changes kept for deltas; an agent further behind gets a snapshot


@dataclass(frozen=True)
class Entry:
    resource: Resource
    revision: int
    source: str
    body: bytes  # canonical JSON, computed once and shipped to every agent

    @property
    def key(self) -> ResourceKey:
        return self.resource.key


@dataclass(frozen=True)
class Rejection:
    source: str
    problems: tuple[Problem, ...]
    key: ResourceKey | None
    at: float


@dataclass
class Offer:
    """What a source currently provides: valid resources and the problems of the rest.

    `claimed` lists keys of documents that failed validation but whose identity was
    readable: their last good version is kept instead of being deleted.
    """

    resources: list[Resource] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    claimed: set[ResourceKey] = field(default_factory=set)
    unreadable: bool = False  # the whole source failed (YAML syntax): keep everything
    # Where each of `resources` was written: "file:line" of its document (same order).
    origins: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Delta:
    revision: int
    base: int
    upserts: tuple[Entry, ...]
    removed: tuple[ResourceKey, ...]


def new_epoch(now: float | None = None) -> str:
    """A name for this store's history that sorts after every earlier one: the start time
    in milliseconds (hex, fixed width) and a random suffix. Revisions restart with a new
    controller process; (epoch, revision) pairs still order, and agents and waypoints
    take any new epoch as a new history (a full snapshot)."""
    ms = int((time.time() if now is None else now) * 1000)
    return f"{ms:012x}{uuid.uuid4().hex[:4]}"


class ConfigStore:
    def __init__(self, epoch: str | None = None) -> None:
        self.epoch = epoch or new_epoch()
        self.revision = 0
        self._entries: dict[ResourceKey, Entry] = {}
        self._owned: dict[str, set[ResourceKey]] = {}
        self._owner_of: dict[ResourceKey, str] = {}
        self._rejections: dict[str, list[Rejection]] = {}
        # (revision, key) of every change, oldest first; a key may appear many times.
        self._log: deque[tuple[int, ResourceKey]] = deque(maxlen=CHANGELOG_LIMIT)
        self._lock = threading.RLock()
        self._listeners: list[Callable[[int], None]] = []

    # ---- reading -----------------------------------------------------------------------

    def get(self, key: ResourceKey) -> Entry | None:
        return self._entries.get(key)

    def entries(self, kind: str | None = None) -> list[Entry]:
        with self._lock:
            return sorted(
                (e for e in self._entries.values() if kind is None or kind == e.resource.KIND),
                key=lambda e: e.key,
            )

    def resources(self, kind: str) -> list[Resource]:
        return [e.resource for e in self.entries(kind)]

    def rejections(self) -> list[Rejection]:
        with self._lock:
            return [r for rs in self._rejections.values() for r in rs]

    def snapshot(self) -> tuple[int, list[Entry]]:
        with self._lock:
            return self.revision, list(self._entries.values())

    def delta_since(self, revision: int) -> Delta | None:
        """Changes after `revision`, or None when the changelog no longer reaches back."""
        with self._lock:
            if revision > self.revision:
                return None
            if revision == self.revision:
                return Delta(self.revision, revision, (), ())
            oldest = self._log[0][0] if self._log else self.revision + 1
            if revision < oldest - 1 or (len(self._log) == self._log.maxlen and revision < oldest):
                return None
            keys = {k for rev, k in self._log if rev > revision}
            ups = tuple(self._entries[k] for k in sorted(keys) if k in self._entries)
            gone = tuple(k for k in sorted(keys) if k not in self._entries)
            return Delta(self.revision, revision, ups, gone)

    # ---- writing -----------------------------------------------------------------------

    def subscribe(self, fn: Callable[[int], None]) -> Callable[[], None]:
        """Call fn(revision) after every committed change; returns an unsubscribe."""
        self._listeners.append(fn)
        return lambda: self._listeners.remove(fn)

    def offer(self, source: str, offer: Offer) -> list[ResourceKey]:
        """Make `source` provide exactly `offer`; returns the keys that changed."""
        with self._lock:
            changed: list[ResourceKey] = []
            rejections = [Rejection(source, (p,), None, time.time()) for p in offer.problems]
            if offer.unreadable:
                self._rejections[source] = rejections
                return []
            previous = self._owned.get(source, set())
            now: set[ResourceKey] = set()
            staged: list[Entry] = []
            next_rev = self.revision + 1
            for res in offer.resources:
                key = res.key
                if key in now:
                    rejections.append(
                        Rejection(
                            source,
                            (
                                Problem(
                                    f"{key} is defined twice in this source; the first one is used",
                                    resource=str(key),
                                ),
                            ),
                            key,
                            time.time(),
                        )
                    )
                    continue
                owner = self._owner(key)
                if owner is not None and owner != source:
                    rejections.append(
                        Rejection(
                            source,
                            (
                                Problem(
                                    f"{key} is already provided by {owner}; remove one of them",
                                    resource=str(key),
                                ),
                            ),
                            key,
                            time.time(),
                        )
                    )
                    continue
                now.add(key)
                cur = self._entries.get(key)
                if cur is not None and cur.resource is res:
                    continue  # the very object already stored (upsert of a large source)
                body = res.to_json().encode()
                if cur is not None and cur.body == body:
                    continue
                staged.append(Entry(res, next_rev, source, body))
            kept = {k for k in offer.claimed if k in previous}  # invalid now: keep last good
            for entry in staged:
                self._entries[entry.key] = entry
                self._log.append((next_rev, entry.key))
                changed.append(entry.key)
            for key in sorted(previous - now - kept):
                if self._entries.get(key) is not None and self._entries[key].source == source:
                    del self._entries[key]
                    self._log.append((next_rev, key))
                    changed.append(key)
            for key in previous - now - kept:
                self._owner_of.pop(key, None)
            for key in now | kept:
                self._owner_of[key] = source
            self._owned[source] = now | kept
            if not self._owned[source]:
                del self._owned[source]
            if rejections:
                self._rejections[source] = rejections
            else:
                self._rejections.pop(source, None)
            if changed:
                self.revision = next_rev
        if changed:
            self._notify()
        for r in rejections:
            for p in r.problems:
                log.warning("rejected from %s: %s (the last good version stays active)", source, p)
        return changed

    def upsert(self, source: str, resources: Iterable[Resource]) -> list[ResourceKey]:
        """Add or replace resources of `source` without removing its others."""
        with self._lock:
            current = [
                self._entries[k].resource
                for k in self._owned.get(source, set())
                if k in self._entries
            ]
        new = list(resources)
        keys = {r.key for r in new}
        return self.offer(source, Offer(resources=[r for r in current if r.key not in keys] + new))

    def remove(self, source: str, key: ResourceKey) -> bool:
        with self._lock:
            if key not in self._owned.get(source, set()):
                return False
            rest = [
                self._entries[k].resource
                for k in self._owned[source]
                if k != key and k in self._entries
            ]
        return bool(self.offer(source, Offer(resources=rest)))

    def owner(self, key: ResourceKey) -> str | None:
        with self._lock:
            return self._owner(key)

    def _owner(self, key: ResourceKey) -> str | None:
        return self._owner_of.get(key)

    def _notify(self) -> None:
        rev = self.revision
        for fn in list(self._listeners):
            try:
                fn(rev)
            except Exception:
                log.exception("config listener failed")
