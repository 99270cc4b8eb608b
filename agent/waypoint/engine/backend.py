"""A backend: one Service port's endpoints, and everything that chooses and judges them.

`Backend.attempt()` picks an endpoint for one try (or says who answers instead: the
fallback, or a 503); the returned `Attempt` is how the shell reports back:

    att = backend.attempt(key)          # or Forward.attempt(), which adds retry accounting
    match att.admit(reusable):          # connection pool accounting
        ...
    att.observe(status_or_failure)      # at the response head (or the failure): latency,
                                        # outlier detection
    att.release()                       # when the try's stream is over: requests in flight

`finish(outcome)` is observe + release for a try that is over at once; `abandon()` releases a
try that says nothing about its endpoint (an overflow, a queue given up) without judging it.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from urllib.parse import unquote

from agent.waypoint.codec.headers import Headers
from agent.waypoint.engine.balancer import Balancer, Endpoint, hash64, make_balancer
from agent.waypoint.engine.events import BackendCounters, EngineEvent, EventLog
from agent.waypoint.engine.health import HealthChecker, Probe
from agent.waypoint.engine.outlier import OutlierDetector
from agent.waypoint.engine.pool import OVERFLOW_RESPONSE, Admission, ConnectionPool
from agent.waypoint.engine.respond import NO_HEALTHY_ENDPOINT, Respond, plain
from agent.waypoint.engine.retry import RetryBudget
from controller.model.traffic import BackendPolicySpec, ConsistentHash

Clock = Callable[[], float]
# Chooses one of the available endpoints it is given (see Backend.attempt).
Picker = Callable[[list[Endpoint]], Endpoint]
BackendKey = tuple[str, str, int]  # namespace, service, port

_DEFAULT_POLICY = BackendPolicySpec.model_validate({"targetRefs": [{"name": "default"}]})


class HashPolicy:
    """What a consistent-hash balancer hashes, compiled for the request path."""

    __slots__ = ("cookie_name", "header", "kind", "path", "query", "ttl")

    def __init__(self, cfg: ConsistentHash) -> None:
        self.header = cfg.header.lower().encode() if cfg.header else b""
        self.cookie_name = cfg.cookie.name if cfg.cookie else ""
        self.ttl = cfg.cookie.ttl if cfg.cookie else None
        self.path = cfg.cookie.path if cfg.cookie else "/"
        self.query = cfg.query_parameter or ""
        self.kind = (
            "header"
            if cfg.header
            else "cookie"
            if cfg.cookie
            else "query"
            if cfg.query_parameter
            else "source"
        )

    def key(
        self, headers: Headers, query: str, source: str | None, rng: random.Random
    ) -> tuple[int | None, bytes | None]:
        """(hash of the request's key or None, a Set-Cookie value to send or None)."""
        kind = self.kind
        if kind == "header":
            name = self.header
            for n, v in headers.fields:
                if n == name:
                    return hash64(v), None
            return None, None
        if kind == "source":
            return (hash64(source.encode()), None) if source else (None, None)
        if kind == "query":
            value = query_param(query, self.query)
            return (hash64(value.encode()), None) if value is not None else (None, None)
        value = cookie(headers, self.cookie_name)
        if value is not None:
            return hash64(value.encode()), None
        if self.ttl is None:
            return None, None
        # Envoy's behaviour: mint the cookie, hash it now, and let later requests carry it.
        minted = f"{rng.getrandbits(64):016x}"
        set_cookie = f"{self.cookie_name}={minted}; Max-Age={int(self.ttl)}; Path={self.path}"
        return hash64(minted.encode()), (set_cookie + "; HttpOnly").encode()


def query_param(query: str, name: str) -> str | None:
    """The first value of `name` in a raw query string, percent-decoded."""
    if not query:
        return None
    for part in query.split("&"):
        k, sep, v = part.partition("=")
        if unquote(k) == name:
            return unquote(v.replace("+", " ")) if sep else ""
    return None


def cookie(headers: Headers, name: str) -> str | None:
    """The value of cookie `name` from the request's cookie header(s)."""
    for n, v in headers.fields:
        if n != b"cookie":
            continue
        for part in v.decode("latin-1").split(";"):
            k, _, val = part.strip().partition("=")
            if k == name:
                return val
    return None


class Attempt:
    """One try at one endpoint; see the module docstring for the calls the shell makes."""

    __slots__ = ("backend", "endpoint", "observed", "pending", "released", "retry", "started")

    def __init__(self, backend: Backend, endpoint: Endpoint, started: float, retry: bool) -> None:
        self.backend = backend
        self.endpoint = endpoint
        self.started = started
        self.retry = retry
        self.observed = False
        self.released = False
        self.pending = False

    def admit(self, reusable: bool) -> Admission:
        """Pool accounting for this try. On OVERFLOW the try is released already; answer
        with `OVERFLOW_RESPONSE`."""
        verdict = self.backend.pool.admit(reusable)
        if verdict is Admission.QUEUE:
            self.pending = True
        elif verdict is Admission.OVERFLOW:
            self.abandon()  # an overflow says nothing about the endpoint
        return verdict

    def dequeued(self) -> None:
        """The queued try got a connection (or gave up)."""
        if self.pending:
            self.pending = False
            self.backend.pool.dequeued()

    def observe(self, outcome: int) -> None:
        """The try's outcome: the response head's status, or a `Failure`. Once per try."""
        if self.observed:
            return
        self.observed = True
        b = self.backend
        now = b.clock()
        if outcome > 0:
            self.endpoint.observe_rtt(now - self.started, now)
        od = b.outlier
        if od is not None and od.record(self.endpoint, outcome, now, b.endpoints):
            b.dirty = True

    def release(self) -> None:
        """The try's stream is over (or abandoned). Idempotent."""
        if self.released:
            return
        self.released = True
        if self.pending:
            self.dequeued()
        self.endpoint.active -= 1
        b = self.backend
        b.active -= 1
        if self.retry:
            b.budget.active_retries -= 1

    def abandon(self) -> None:
        """The try ends without a word on its endpoint (an overflow, a queue given up):
        released, never judged."""
        self.observed = True
        self.release()

    def finish(self, outcome: int) -> None:
        self.observe(outcome)
        self.release()


class Backend:
    """One Service port: its endpoints, balancer, pool, detectors, budget and fallback."""

    __slots__ = (
        "active",
        "available_count",
        "balancer",
        "budget",
        "clock",
        "counters",
        "dirty",
        "endpoints",
        "events",
        "fallback",
        "fallback_key",
        "hash_policy",
        "health",
        "key",
        "min_health_percent",
        "name",
        "outlier",
        "panic",
        "policy",
        "pool",
        "rng",
    )

    def __init__(
        self, key: BackendKey, *, clock: Clock, rng: random.Random, events: EventLog
    ) -> None:
        self.key = key
        self.name = f"{key[0]}/{key[1]}:{key[2]}"
        self.clock = clock
        self.rng = rng
        self.events = events
        self.counters = BackendCounters()
        self.endpoints: list[Endpoint] = []
        self.active = 0  # tries in flight (the retry budget's "active requests")
        self.available_count = 0
        self.dirty = True
        self.panic = False
        self.policy: BackendPolicySpec | None = None
        self.balancer: Balancer = make_balancer("LeastRequest", rng)
        self.hash_policy: HashPolicy | None = None
        self.pool = ConnectionPool(self.counters)
        self.budget = RetryBudget()
        self.outlier: OutlierDetector | None = None
        self.health: HealthChecker | None = None
        self.min_health_percent = 0
        # A Respond (fallback.response), a Backend (fallback.backendRef, set by the engine),
        # or None: 503 NoHealthyEndpoint.
        self.fallback: Respond | Backend | None = None
        self.fallback_key: BackendKey | None = None

    # ---- configuration --------------------------------------------------------------

    def configure(self, policy: BackendPolicySpec | None, endpoints: Sequence[Endpoint]) -> None:
        """Apply a (new) policy and endpoint set; state of endpoints that stay is kept."""
        now = self.clock()
        spec = policy or _DEFAULT_POLICY
        old_spec = self.policy or _DEFAULT_POLICY
        lb = spec.load_balancer
        if self.policy is None or lb != old_spec.load_balancer:
            self.balancer = make_balancer(
                lb.type,
                self.rng,
                minimum_ring_size=lb.minimum_ring_size,
                table_size=lb.table_size,
            )
        self.hash_policy = HashPolicy(lb.consistent_hash) if lb.consistent_hash else None
        cp = spec.connection_pool
        self.pool.reconfigure(
            max_connections=cp.max_connections,
            max_pending=cp.max_pending_requests,
            max_requests_per_connection=cp.max_requests_per_connection,
        )
        rb = spec.retry_budget
        self.budget.ratio = rb.budget_percent / 100.0
        self.budget.min_concurrency = rb.min_retry_concurrency
        od = spec.outlier_detection
        if od is None:
            self.outlier = None
            for e in endpoints:
                e.ejected_until = None
        elif od != old_spec.outlier_detection or self.outlier is None:
            self.outlier = OutlierDetector(
                od, backend=self.name, events=self.events, counters=self.counters, now=now
            )
        self.min_health_percent = od.min_health_percent if od else 0
        hc = spec.health_check
        if hc is None:
            self.health = None
            for e in endpoints:
                e.healthy = True
        elif self.health is None or hc != self.health.cfg:
            self.health = HealthChecker(
                hc,
                backend=self.name,
                key=self.key,
                rng=self.rng,
                events=self.events,
                counters=self.counters,
            )
        if self.health is not None:
            self.health.rebuild(endpoints, now)
        fb = spec.fallback
        self.fallback = None
        self.fallback_key = None
        if fb is not None and fb.response is not None:
            r = fb.response
            self.fallback = Respond(
                r.status,
                "Fallback",
                f"no endpoint of {self.name} is available; BackendPolicy fallback response",
                headers=tuple((k.lower().encode(), v.encode()) for k, v in r.headers.items()),
                body=r.body.encode(),
            )
        elif fb is not None and fb.backend_ref is not None:
            ref = fb.backend_ref
            self.fallback_key = (ref.namespace or self.key[0], ref.name, ref.port)
        self.policy = policy
        self.endpoints = list(endpoints)
        self.balancer.rebuild(self.endpoints)
        self.dirty = True

    # ---- the request path -----------------------------------------------------------

    def attempt(
        self, key: int | None = None, *, retry: bool = False, picker: Picker | None = None
    ) -> Attempt | Respond:
        """Choose an endpoint for one try, or the answer when none is available.

        `picker` replaces the balancer's choice among the *available* endpoints (AI policy's
        least-loaded and KV-cache-affine picking): ejection, health and panic still decide
        which endpoints it may choose from, and the try is accounted here as any other."""
        now = self.clock()
        od = self.outlier
        if od is not None and now >= od.next_sweep and od.sweep(now, self.endpoints):
            self.dirty = True
        if self.dirty:
            self.refresh(now)
        if not self.available_count:
            return self._unavailable(key, retry)
        if picker is not None:
            ep = picker([e for e in self.endpoints if e.available])
        else:
            ep = self.balancer.pick(key, now)
        ep.active += 1
        self.active += 1
        if retry:
            self.budget.active_retries += 1
        self.counters.tries += 1
        return Attempt(self, ep, now, retry)

    def _unavailable(self, key: int | None, retry: bool) -> Attempt | Respond:
        fb = self.fallback
        if isinstance(fb, Backend):
            alt = fb.attempt_without_fallback(key, retry)
            if alt is not None:
                self.counters.fallback_backend += 1
                return alt
        elif fb is not None:
            self.counters.fallback_responses += 1
            return fb
        self.counters.no_healthy_endpoint += 1
        if not self.endpoints:
            why = f"Service {self.name} has no ready endpoints"
        else:
            why = f"every endpoint of {self.name} is ejected or failing health checks"
        return plain(503, NO_HEALTHY_ENDPOINT, why)

    def attempt_without_fallback(self, key: int | None, retry: bool) -> Attempt | None:
        """As a fallback: an attempt if this backend has an endpoint; fallbacks never chain."""
        if self.dirty:
            self.refresh(self.clock())
        if not self.available_count:
            return None
        got = self.attempt(key, retry=retry)
        return got if isinstance(got, Attempt) else None

    def refresh(self, now: float) -> None:
        """Recompute which endpoints take traffic, after ejections, probes or a config."""
        self.dirty = False
        eps = self.endpoints
        available = [e for e in eps if e.healthy and e.ejected_until is None]
        panic = bool(
            eps
            and self.min_health_percent
            and len(available) * 100 < self.min_health_percent * len(eps)
        )
        if panic != self.panic:
            self.panic = panic
            self.events.emit(
                EngineEvent(
                    now,
                    "panic" if panic else "panic_over",
                    self.name,
                    "",
                    f"{len(available)} of {len(eps)} endpoints healthy, "
                    f"minHealthPercent {self.min_health_percent}: "
                    + ("balancing over all of them" if panic else "ejections apply again"),
                )
            )
        if panic:
            available = list(eps)
        on = {id(e) for e in available}
        for e in eps:
            e.available = id(e) in on
        self.available_count = len(available)
        self.balancer.refresh(available)

    # ---- timers the shell drives ----------------------------------------------------

    def tick(self, now: float) -> None:
        """Run the outlier sweep if due (the request path also does, lazily)."""
        od = self.outlier
        if od is not None and now >= od.next_sweep and od.sweep(now, self.endpoints):
            self.dirty = True
            self.refresh(now)

    def due_probes(self, now: float) -> list[Probe]:
        return self.health.due(now) if self.health is not None else []

    def report_probe(self, probe: Probe, ok: bool) -> None:
        if self.health is not None and self.health.report(probe, ok, self.clock()):
            self.dirty = True

    def next_timer(self) -> float | None:
        """The earliest time `tick` or `due_probes` has work, for the shell's timer."""
        times = []
        if self.outlier is not None and any(e.ejected_until is not None for e in self.endpoints):
            times.append(self.outlier.next_sweep)
        if self.health is not None and (t := self.health.next_due()) is not None:
            times.append(t)
        return min(times) if times else None

    def __repr__(self) -> str:
        return f"Backend({self.name}, {len(self.endpoints)} endpoints)"


__all__ = [
    "OVERFLOW_RESPONSE",
    "Admission",
    "Attempt",
    "Backend",
    "BackendKey",
    "Clock",
    "HashPolicy",
]
