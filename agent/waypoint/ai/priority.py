"""Backend saturation and priority admission (LoadShedding).

Three parts:

- `parse_vllm_metrics`: the few vLLM gauges that say how loaded a model server is, from
  its Prometheus text (/metrics). A line scan, no Prometheus library: the waypoint scrapes
  every few seconds per endpoint and only needs three numbers.
- `LoadBoard`: what the waypoint knows of each endpoint: the last scrape (queue depth,
  running, KV-cache utilisation) and its own requests in flight there.
- `LoadShedder`: a request's priority class, and what happens to it when the backend is
  saturated: admitted, queued (bounded, with a timeout) or shed with 503/429. Queued
  requests are released highest class first, FIFO within a class.

Saturation is a *level*: the largest of value / threshold over the thresholds set (queue
depth, KV-cache utilisation, in-flight), so 1.0 is "at a threshold". An endpoint's level is
its own; a backend's is its least-loaded endpoint's (the backend is saturated only when no
endpoint has room). A class acts at `saturationAt` x that (1.0 by default): a lower class with
0.8 is shed before the backend is full, and a class with `whenSaturated: Admit` never waits.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from agent.waypoint.ai.facts import Predicate, RequestFacts, compile_match
from controller.model.ai import LoadShedding, PriorityClass, Saturation

# vLLM v0 and v1 names; the sample model server (agent/lab/workloads) speaks v0's.
_WAITING = b"vllm:num_requests_waiting"
_RUNNING = b"vllm:num_requests_running"
_KV = (b"vllm:gpu_cache_usage_perc", b"vllm:kv_cache_usage_perc")
_NAMES = frozenset((_WAITING, _RUNNING, *_KV))


@dataclass(frozen=True, slots=True)
class ScrapedLoad:
    queue_depth: float = 0.0  # requests waiting in the server's queue
    running: float = 0.0  # requests being generated
    kv_cache: float = 0.0  # KV-cache utilisation, 0..1


def parse_vllm_metrics(text: bytes | str) -> ScrapedLoad:
    """Queue depth, running requests and KV-cache use from vLLM's /metrics text. Several
    series (one per model served) add up; the KV cache, shared, takes the largest."""
    data = text.encode() if isinstance(text, str) else text
    waiting = running = kv = 0.0
    for line in data.splitlines():
        if not line.startswith(b"vllm:"):
            continue
        brace = line.find(b"{")
        space = line.find(b" ")
        if brace >= 0 and (space < 0 or brace < space):
            name = line[:brace]
            rest = line[line.rfind(b"}") + 1 :]
        else:
            name = line[:space] if space >= 0 else line
            rest = line[space:] if space >= 0 else b""
        if name not in _NAMES:
            continue
        parts = rest.split()
        if not parts:
            continue
        try:
            v = float(parts[0])
        except ValueError:
            continue
        if math.isnan(v):  # the server does not know; count nothing
            continue
        if name == _WAITING:
            waiting += v
        elif name == _RUNNING:
            running += v
        else:
            kv = max(kv, v)
    return ScrapedLoad(waiting, running, kv)


@dataclass(slots=True)
class _EndpointState:
    scraped: ScrapedLoad
    scraped_at: float
    in_flight: int


class LoadBoard:
    """The load of every model endpoint this worker sends to, by endpoint name
    ("ip:port"). The shell feeds scrapes and in-flight changes; readers get numbers."""

    __slots__ = ("_eps", "max_age")

    def __init__(self, max_age: float = 15.0) -> None:
        self._eps: dict[str, _EndpointState] = {}
        self.max_age = max_age  # a scrape older than this counts as none

    def _get(self, ep: str) -> _EndpointState:
        st = self._eps.get(ep)
        if st is None:
            st = self._eps[ep] = _EndpointState(ScrapedLoad(), float("-inf"), 0)
        return st

    def scraped(self, ep: str, load: ScrapedLoad, now: float) -> None:
        st = self._get(ep)
        st.scraped, st.scraped_at = load, now

    def started(self, ep: str) -> None:
        self._get(ep).in_flight += 1

    def finished(self, ep: str) -> None:
        st = self._get(ep)
        st.in_flight = max(0, st.in_flight - 1)

    def forget(self, keep: Iterable[str]) -> None:
        """Drop endpoints that left the config (their in-flight requests are over)."""
        wanted = set(keep)
        for ep in [e for e, st in self._eps.items() if e not in wanted and not st.in_flight]:
            del self._eps[ep]

    def load(self, ep: str, now: float, max_age: float | None = None) -> tuple[ScrapedLoad, int]:
        """(the scrape, or zeros when older than `max_age` (default: the board's) or missing;
        this worker's in-flight count)."""
        st = self._eps.get(ep)
        if st is None:
            return ScrapedLoad(), 0
        fresh = now - st.scraped_at <= (self.max_age if max_age is None else max_age)
        return (st.scraped if fresh else ScrapedLoad()), st.in_flight


def saturation_level(sat: Saturation, load: ScrapedLoad, in_flight: int) -> float:
    """max(value / threshold) over the thresholds set; >= 1.0 is saturated."""
    level = 0.0
    if sat.queue_depth:
        level = load.queue_depth / sat.queue_depth
    if sat.kv_cache_utilization:
        level = max(level, load.kv_cache / sat.kv_cache_utilization)
    if sat.in_flight:
        level = max(level, in_flight / sat.in_flight)
    return level


def backend_level(sat: Saturation, board: LoadBoard, endpoints: Sequence[str], now: float) -> float:
    """A backend's level: its least-loaded endpoint's (inf when it has none)."""
    best = float("inf")
    for ep in endpoints:
        load, n = board.load(ep, now, sat.metrics_max_age)
        best = min(best, saturation_level(sat, load, n))
    return best


# ---- admission -----------------------------------------------------------------------


class Ticket:
    """A queued request. The shell waits on it (a future keyed by the ticket) until
    `pop_ready` releases it or `expire` times it out. `where`: the endpoints of the backend
    it waits for, whose level decides when it may go."""

    __slots__ = ("cls", "deadline", "seq", "state", "where")

    def __init__(self, cls: _Class, deadline: float, seq: int, where: Sequence[str] = ()) -> None:
        self.cls = cls
        self.deadline = deadline
        self.seq = seq
        self.where = tuple(where)
        self.state = "queued"  # -> "admitted" | "expired" | "cancelled"


@dataclass(slots=True)
class Verdict:
    action: str  # "admit", "queue" or "shed"
    priority_class: str
    status: int = 200  # 503 or 429 when shed
    ticket: Ticket | None = None
    reason: str = ""

    @property
    def headers(self) -> list[tuple[bytes, bytes]]:
        if self.action != "shed":
            return []
        # One second: saturation is judged on scrapes a few seconds apart; a sooner retry
        # mostly meets the same state. The sample model server says the same.
        return [(b"retry-after", b"1"), (b"x-weft-shed", self.priority_class.encode())]


@dataclass
class ClassCounters:
    admitted: int = 0
    queued: int = 0
    shed: int = 0
    timed_out: int = 0


class _Class:
    __slots__ = ("action", "at", "counters", "max_queued", "name", "queue", "status", "timeout")

    def __init__(self, c: PriorityClass) -> None:
        self.name = c.name
        self.action = c.when_saturated
        self.at = c.saturation_at
        self.status = c.shed_status
        self.max_queued = c.queue.max_requests if c.queue else 0
        self.timeout = c.queue.timeout if c.queue else 0.0
        self.queue: deque[Ticket] = deque()
        self.counters = ClassCounters()


class LoadShedder:
    """One LoadShedding policy's classes and queues (per worker)."""

    def __init__(self, policy: LoadShedding) -> None:
        spec = policy.spec
        self.name = f"{policy.namespace}/{policy.name}"
        self.saturation = spec.saturation
        # Highest value first: the order queues are served in.
        ordered = sorted(spec.priority_classes, key=lambda c: -c.value)
        self.classes = {c.name: _Class(c) for c in ordered}
        self.default = self.classes[spec.default_priority_class]
        self.assignments: list[tuple[Predicate, _Class]] = [
            (compile_match(p.match), self.classes[p.priority_class]) for p in spec.priorities
        ]
        self._seq = itertools.count()

    def classify(self, r: RequestFacts) -> _Class:
        for pred, cls in self.assignments:
            if pred(r):
                return cls
        return self.default

    def admit(self, cls: _Class, level: float, now: float, where: Sequence[str] = ()) -> Verdict:
        """Decide for one request of class `cls` when the backend (endpoints `where`) is at
        `level`."""
        # Below the class's level a request goes, unless others of its class are still
        # waiting for the same backend: a newcomer does not overtake them (pop_ready
        # releases them first). Those waiting for another backend do not hold it back.
        key = tuple(where)
        if cls.action == "Admit" or (
            level < cls.at and not any(t.where == key and t.state == "queued" for t in cls.queue)
        ):
            cls.counters.admitted += 1
            return Verdict("admit", cls.name)
        if cls.action == "Shed":
            cls.counters.shed += 1
            return Verdict("shed", cls.name, cls.status, reason=f"saturated (level {level:.2f})")
        if len(cls.queue) >= cls.max_queued:
            cls.counters.shed += 1
            return Verdict("shed", cls.name, cls.status, reason="saturated and the queue is full")
        t = Ticket(cls, now + cls.timeout, next(self._seq), where)
        cls.queue.append(t)
        cls.counters.queued += 1
        return Verdict("queue", cls.name, ticket=t)

    def pop_ready(self, level_of: Callable[[tuple[str, ...]], float]) -> Ticket | None:
        """The next queued request that may go now, or None: highest class first, and in a
        class the oldest whose backend's level (`level_of(ticket.where)`, now) is below the
        class's. FIFO per backend: a request waiting for a saturated backend does not hold
        back one for a backend with room. One at a time: a released request counts toward
        the level only once it is under way, so the shell calls this again then (and after
        anything else that lowers the level: a request finished, a scrape), not in a loop."""
        levels: dict[tuple[str, ...], float] = {}
        for cls in self.classes.values():
            q = cls.queue
            while q and q[0].state != "queued":
                q.popleft()
            for t in q:
                if t.state != "queued":
                    continue
                level = levels.get(t.where)
                if level is None:
                    level = levels[t.where] = level_of(t.where)
                if level < cls.at:
                    q.remove(t)
                    t.state = "admitted"
                    cls.counters.admitted += 1
                    return t
        return None

    def expire(self, now: float) -> list[Ticket]:
        """Queued requests whose timeout passed: answer them with `shed_verdict`."""
        out: list[Ticket] = []
        for cls in self.classes.values():
            q = cls.queue
            while q and (q[0].state != "queued" or q[0].deadline <= now):
                t = q.popleft()
                if t.state == "queued":
                    t.state = "expired"
                    cls.counters.timed_out += 1
                    cls.counters.shed += 1
                    out.append(t)
        return out

    def shed_verdict(self, t: Ticket) -> Verdict:
        return Verdict("shed", t.cls.name, t.cls.status, reason="timed out in the queue")

    def cancel(self, t: Ticket) -> None:
        """The client went away while queued."""
        if t.state == "queued":
            t.state = "cancelled"

    def next_deadline(self) -> float | None:
        """When the shell should call `expire` next."""
        heads = [c.queue[0].deadline for c in self.classes.values() if c.queue]
        return min(heads) if heads else None

    def queued(self) -> int:
        return sum(1 for c in self.classes.values() for t in c.queue if t.state == "queued")
