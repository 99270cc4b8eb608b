"""Endpoints and the load balancers that choose among them.

An `Endpoint` is one workload address behind a Service port, with the live state every
balancer and detector reads: requests in flight, a peak-EWMA latency estimate, ejection and
health. The shell feeds it through `Attempt` (backend.py); nothing here does I/O or reads a
clock of its own: `now` is passed in, randomness comes from the engine's `random.Random`.

Balancers see two lists. `rebuild(all)` runs when the Service's endpoint set changes (a new
config); `refresh(available)` when endpoints are ejected, fail health checks or come back.
The consistent-hash balancers keep their table across `refresh` and skip unavailable
endpoints at lookup, so a key moves only when its own endpoint is unavailable, and moves back
when the endpoint returns. The others pick from the available list directly.
"""

from __future__ import annotations

import hashlib
import math
import random
from bisect import bisect_right
from collections.abc import Sequence
from typing import Any

# Peak EWMA (Finagle, Linkerd): how fast an estimate forgets, and the estimate of an endpoint
# that has not answered yet. Linkerd's values: a 10 s decay follows a slow endpoint's recovery
# within seconds without chasing noise; 30 ms is a typical in-cluster RPC.
EWMA_DECAY_SECONDS = 10.0
EWMA_DEFAULT_RTT = 0.030


def hash64(data: bytes) -> int:
    """A 64-bit hash that is the same in every process and on every node (Python's hash() is
    salted per process), so every waypoint replica maps a key to the same endpoint."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


class Endpoint:
    """One workload behind a Service port, and its live state."""

    __slots__ = (
        "active",
        "address",
        "available",
        "consecutive_5xx",
        "consecutive_gateway",
        "ejected_until",
        "ejections",
        "healthy",
        "host",
        "name",
        "port",
        "rtt",
        "rtt_at",
        "weight",
        "workload",
    )

    def __init__(
        self, host: str, port: int, *, name: str = "", weight: int = 1, workload: Any = None
    ) -> None:
        self.host = host
        self.port = port
        self.address = f"{host}:{port}"
        self.name = name or self.address  # "namespace/workload" for logs
        self.weight = weight
        self.workload = workload  # the Workload resource, for the shell (identity, node)
        self.active = 0  # tries in flight
        self.rtt = 0.0  # peak-EWMA latency estimate, seconds; 0: none yet
        self.rtt_at = 0.0
        self.ejected_until: float | None = None  # outlier detection
        self.ejections = 0  # ejection multiplier (decays while healthy)
        self.consecutive_5xx = 0
        self.consecutive_gateway = 0
        self.healthy = True  # active health checks
        self.available = True  # not ejected and healthy (or the backend is in panic)

    def observe_rtt(self, rtt: float, now: float) -> None:
        """Feed one latency sample: a higher sample replaces the estimate at once (the peak),
        a lower one is blended in by how long ago the last sample was."""
        if rtt >= self.rtt:
            self.rtt = rtt
        else:
            w = math.exp(-(now - self.rtt_at) / EWMA_DECAY_SECONDS)
            self.rtt = self.rtt * w + rtt * (1.0 - w)
        self.rtt_at = now

    def cost(self, now: float) -> float:
        """Peak-EWMA load: the latency estimate, decayed towards zero while no sample
        arrives (so an idle slow endpoint is tried again), times the requests in flight + 1."""
        if self.rtt == 0.0:
            return EWMA_DEFAULT_RTT * (self.active + 1)
        return self.rtt * math.exp(-(now - self.rtt_at) / EWMA_DECAY_SECONDS) * (self.active + 1)

    def __repr__(self) -> str:
        return f"Endpoint({self.address}, active={self.active}, available={self.available})"


class Balancer:
    """Chooses an endpoint for one try. `pick` is only called with at least one available
    endpoint; `key` is the request's hash (consistent-hash balancers) or None."""

    __slots__ = ("endpoints", "rng")

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.endpoints: list[Endpoint] = []

    def rebuild(self, endpoints: Sequence[Endpoint]) -> None:
        """The endpoint set changed."""

    def refresh(self, available: Sequence[Endpoint]) -> None:
        """Availability changed (or right after rebuild)."""
        self.endpoints = list(available)

    def pick(self, key: int | None, now: float) -> Endpoint:
        raise NotImplementedError


class RoundRobin(Balancer):
    __slots__ = ("next",)

    def __init__(self, rng: random.Random) -> None:
        super().__init__(rng)
        self.next = 0

    def refresh(self, available: Sequence[Endpoint]) -> None:
        super().refresh(available)
        # A random start, as Envoy does, so waypoints that restart together do not all hit
        # the first endpoint at once.
        self.next = self.rng.randrange(len(available)) if available else 0

    def pick(self, key: int | None, now: float) -> Endpoint:
        eps = self.endpoints
        i = self.next
        if i >= len(eps):
            i = 0
        self.next = i + 1
        return eps[i]


class RandomBalancer(Balancer):
    __slots__ = ()

    def pick(self, key: int | None, now: float) -> Endpoint:
        eps = self.endpoints
        return eps[int(self.rng.random() * len(eps))]


class LeastRequest(Balancer):
    """Power of two choices: two distinct random endpoints, the one with fewer requests in
    flight wins (Mitzenmacher; Envoy's LEAST_REQUEST with choice_count 2)."""

    __slots__ = ()

    def pick(self, key: int | None, now: float) -> Endpoint:
        eps = self.endpoints
        n = len(eps)
        if n == 1:
            return eps[0]
        r = self.rng.random
        i = int(r() * n)
        j = int(r() * (n - 1))
        if j >= i:
            j += 1
        a, b = eps[i], eps[j]
        return b if b.active < a.active else a


class PeakEwma(Balancer):
    """Power of two choices on peak-EWMA cost (latency x load), Finagle's and Linkerd's
    balancer: a slow endpoint loses at once (the peak), and is retried as its estimate
    decays."""

    __slots__ = ()

    def pick(self, key: int | None, now: float) -> Endpoint:
        eps = self.endpoints
        n = len(eps)
        if n == 1:
            return eps[0]
        r = self.rng.random
        i = int(r() * n)
        j = int(r() * (n - 1))
        if j >= i:
            j += 1
        a, b = eps[i], eps[j]
        return b if b.cost(now) < a.cost(now) else a


class Weighted(Balancer):
    """Random in proportion to each endpoint's weight (the `weft.dev/weight` annotation);
    weight 0 never receives traffic unless every available endpoint has weight 0."""

    __slots__ = ("cumulative", "total")

    def __init__(self, rng: random.Random) -> None:
        super().__init__(rng)
        self.cumulative: list[int] = []
        self.total = 0

    def refresh(self, available: Sequence[Endpoint]) -> None:
        eps = [e for e in available if e.weight > 0] or list(available)
        self.endpoints = eps
        acc = 0
        self.cumulative = []
        for e in eps:
            acc += e.weight if e.weight > 0 else 1
            self.cumulative.append(acc)
        self.total = acc

    def pick(self, key: int | None, now: float) -> Endpoint:
        x = int(self.rng.random() * self.total)
        return self.endpoints[bisect_right(self.cumulative, x)]


class _Consistent(Balancer):
    """Shared by RingHash and Maglev: a table over every endpoint, skipping the unavailable
    ones at lookup. Without a key (no header, cookie...), a random available endpoint."""

    __slots__ = ("all", "signature")

    def __init__(self, rng: random.Random) -> None:
        super().__init__(rng)
        self.all: list[Endpoint] = []
        self.signature: tuple[tuple[str, int], ...] = ()

    def rebuild(self, endpoints: Sequence[Endpoint]) -> None:
        signature = tuple((e.address, e.weight) for e in endpoints)
        self.all = list(endpoints)
        if signature != self.signature:
            self.signature = signature
            self.build()

    def build(self) -> None:
        raise NotImplementedError

    def random_available(self) -> Endpoint:
        eps = self.endpoints
        return eps[int(self.rng.random() * len(eps))]


class RingHash(_Consistent):
    """Ketama ring: each endpoint owns about minimumRingSize x weight share points on a
    64-bit ring; a key goes to the first point at or after its hash whose owner is available.
    Taking an endpoint away moves only the keys it owned (to the next owners clockwise)."""

    __slots__ = ("hashes", "min_size", "owners")

    def __init__(self, rng: random.Random, minimum_ring_size: int = 1024) -> None:
        super().__init__(rng)
        self.min_size = minimum_ring_size
        self.hashes: list[int] = []
        self.owners: list[Endpoint] = []

    def build(self) -> None:
        weighted = [e for e in self.all if e.weight > 0]
        total = sum(e.weight for e in weighted)
        points: list[tuple[int, int]] = []
        for idx, e in enumerate(weighted):
            replicas = max(1, math.ceil(self.min_size * e.weight / total))
            base = e.address.encode() + b"_"
            points.extend((hash64(base + str(j).encode()), idx) for j in range(replicas))
        points.sort()
        self.hashes = [h for h, _ in points]
        self.owners = [weighted[i] for _, i in points]

    def pick(self, key: int | None, now: float) -> Endpoint:
        if key is None or not self.hashes:
            return self.random_available()
        owners = self.owners
        n = len(owners)
        i = bisect_right(self.hashes, key)
        for step in range(n):
            e = owners[(i + step) % n]
            if e.available:
                return e
        return self.random_available()  # only weight-0 endpoints are available


class Maglev(_Consistent):
    """Maglev (Eisenbud et al., NSDI 2016) with Envoy's weighting: a lookup table of a prime
    size where each endpoint fills slots along its own permutation, in turn, as often as its
    weight allows. Lookup is one index. A key whose endpoint is unavailable is rehashed
    (up to 8 times) onto the table, so it lands on the others in proportion to their share
    and no other key moves."""

    __slots__ = ("size", "table")

    REHASHES = 8

    def __init__(self, rng: random.Random, table_size: int = 65537) -> None:
        super().__init__(rng)
        self.size = table_size
        self.table: list[Endpoint] = []

    def build(self) -> None:
        eps = [e for e in self.all if e.weight > 0]
        m = self.size
        if not eps:
            self.table = []
            return
        # Sorted so the table does not depend on the order endpoints were listed in.
        eps.sort(key=lambda e: e.address)
        offsets = [hash64(e.address.encode()) % m for e in eps]
        skips = [hash64(e.address.encode() + b"#skip") % (m - 1) + 1 for e in eps]
        top = max(e.weight for e in eps)
        step = [top / e.weight for e in eps]
        next_fill = [0.0] * len(eps)
        slots: list[int] = [-1] * m
        filled = 0
        turn = 0
        while filled < m:
            for i in range(len(eps)):
                if next_fill[i] > turn:
                    continue  # a lighter endpoint skips some turns
                next_fill[i] += step[i]
                c, skip = offsets[i], skips[i]
                while slots[c] >= 0:
                    c += skip
                    if c >= m:
                        c -= m
                slots[c] = i
                nc = c + skip
                offsets[i] = nc - m if nc >= m else nc
                filled += 1
                if filled == m:
                    break
            turn += 1
        self.table = [eps[i] for i in slots]

    def pick(self, key: int | None, now: float) -> Endpoint:
        table = self.table
        if key is None or not table:
            return self.random_available()
        m = self.size
        e = table[key % m]
        if e.available:
            return e
        h = key
        for _ in range(self.REHASHES):
            # splitmix64's finaliser: a cheap, well-mixed next hash of the same key.
            h = (h + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
            z = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
            z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
            e = table[(z ^ (z >> 31)) % m]
            if e.available:
                return e
        return self.random_available()


def make_balancer(
    kind: str, rng: random.Random, *, minimum_ring_size: int = 1024, table_size: int = 65537
) -> Balancer:
    """A balancer for a BackendPolicy's `loadBalancer.type`."""
    if kind == "RingHash":
        return RingHash(rng, minimum_ring_size)
    if kind == "Maglev":
        return Maglev(rng, table_size)
    cls: type[Balancer] = {
        "RoundRobin": RoundRobin,
        "Random": RandomBalancer,
        "LeastRequest": LeastRequest,
        "Weighted": Weighted,
        "PeakEWMA": PeakEwma,
    }[kind]
    return cls(rng)
