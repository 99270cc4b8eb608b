"""Model-aware endpoint choice: least loaded, with session affinity that yields to load.

Least loaded: the score of an endpoint is

    queue depth (scraped) + requests in flight (this worker's) + KV_WEIGHT x KV-cache use

A queued request and one in flight each cost a request's wait; a KV cache near full means
the server is about to preempt, so it weighs like a few queued requests (KV_WEIGHT = 4,
a tunable). The lowest score wins; ties are broken at random so workers do not herd.

Affinity (a conversation or user header): the key is hashed onto a ring of the endpoints
(consistent hashing, so adding or removing an endpoint moves only its share of keys) and
the first endpoint clockwise with room takes it; "room" is Mirrokni et al.'s bounded load:
load + 1 <= ceil(c x (total load + 1) / n). A hot conversation therefore stays on one
endpoint (its prefix stays in that KV cache) until that endpoint carries c times the mean.
"""

from __future__ import annotations

import hashlib
import math
import random
from bisect import bisect_left
from collections.abc import Sequence

from agent.waypoint.ai.priority import LoadBoard

KV_WEIGHT = 4.0
RING_POINTS = 128  # points per endpoint: ~10% spread of key share at a handful of endpoints


def hash64(data: bytes) -> int:
    """Stable across processes and nodes (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


class Ring:
    __slots__ = ("hashes", "names", "owners")

    def __init__(self, names: Sequence[str], points: int = RING_POINTS) -> None:
        pts = sorted(
            (hash64(f"{n}#{i}".encode()), idx) for idx, n in enumerate(names) for i in range(points)
        )
        self.names = list(names)
        self.hashes = [h for h, _ in pts]
        self.owners = [i for _, i in pts]

    def walk(self, key: int) -> list[str]:
        """Distinct endpoints in ring order from `key`."""
        out: list[str] = []
        seen: set[int] = set()
        n, start = len(self.hashes), bisect_left(self.hashes, key)
        for step in range(n):
            o = self.owners[(start + step) % n]
            if o not in seen:
                seen.add(o)
                out.append(self.names[o])
                if len(out) == len(self.names):
                    break
        return out


class ModelBalancer:
    """Chooses among one backend's available endpoints (the shell passes them in, after
    outlier ejection and health)."""

    def __init__(
        self,
        board: LoadBoard,
        rng: random.Random,
        *,
        max_load_factor: float = 1.25,
        kv_weight: float = KV_WEIGHT,
    ) -> None:
        self.board = board
        self.rng = rng
        self.c = max_load_factor
        self.kv_weight = kv_weight
        self._rings: dict[tuple[str, ...], Ring] = {}
        self.affinity_hits = 0  # the key's own endpoint took it
        self.affinity_spills = 0  # it was over its bound; the next one clockwise took it

    def score(self, ep: str, now: float) -> float:
        load, n = self.board.load(ep, now)
        return load.queue_depth + n + self.kv_weight * load.kv_cache

    def pick(self, endpoints: Sequence[str], now: float, affinity: bytes | None = None) -> str:
        if not endpoints:
            raise ValueError("no endpoints to choose from")
        if len(endpoints) == 1:
            return endpoints[0]
        if affinity:
            return self._affine(endpoints, hash64(affinity), now)
        best: list[str] = []
        low = math.inf
        for ep in endpoints:
            s = self.score(ep, now)
            if s < low:
                low, best = s, [ep]
            elif s == low:
                best.append(ep)
        return best[0] if len(best) == 1 else self.rng.choice(best)

    def _affine(self, endpoints: Sequence[str], key: int, now: float) -> str:
        names = tuple(sorted(endpoints))
        ring = self._rings.get(names)
        if ring is None:
            if len(self._rings) > 64:  # endpoint sets change with config; keep a few
                self._rings.clear()
            ring = self._rings[names] = Ring(names)
        loads = {ep: self.score(ep, now) for ep in names}
        cap = math.ceil(self.c * (sum(loads.values()) + 1) / len(names))
        order = ring.walk(key)
        for i, ep in enumerate(order):
            if loads[ep] + 1 <= cap:
                if i == 0:
                    self.affinity_hits += 1
                else:
                    self.affinity_spills += 1
                return ep
        self.affinity_spills += 1
        return min(order, key=lambda e: loads[e])
