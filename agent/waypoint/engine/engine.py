"""The engine: every traffic decision the waypoint makes for a request, with no I/O.

One `Engine` per waypoint worker holds the compiled view of a `ConfigSnapshot` (route
tables, compiled lazily per Service port) and the live state of every backend (endpoints,
balancers, pools, detectors, budgets). The shell calls it per request; see
docs/waypoint-engine.md for the sequence. Time comes from the injected `clock` (monotonic
seconds) and chance from the injected `random.Random`, so tests are deterministic.
"""

from __future__ import annotations

import random
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from agent.state import ConfigSnapshot, NsName
from agent.waypoint.codec.headers import Headers
from agent.waypoint.engine.backend import Attempt, Backend, BackendKey, Clock, Picker
from agent.waypoint.engine.balancer import Endpoint
from agent.waypoint.engine.events import EngineEvent, EventLog, RouteCounters
from agent.waypoint.engine.health import Probe
from agent.waypoint.engine.outcome import FAILURES, Failure, status_for_failure
from agent.waypoint.engine.respond import Respond, plain
from agent.waypoint.engine.routes import (
    NO_ROUTE,
    CompiledRule,
    Context,
    RouteTable,
    RuleBackend,
    apply_ops,
    compile_table,
    parent_applies,
    redirect_location,
    rewrite_path,
)
from controller.model.base import Resource
from controller.model.routing import HTTPRoute
from controller.model.traffic import BackendPolicy, endpoint_weight

NO_MIRRORS: tuple[Backend, ...] = ()


class Forward:
    """The decision to forward a request: where, how, and the per-request retry state.

    The shell sends the request to `attempt()`'s endpoint, reports the outcome on the
    attempt, and asks `retry_after(outcome)` whether (and after how long) to try again.
    """

    __slots__ = (
        "authority",
        "backend",
        "deadline",
        "delay",
        "hash_key",
        "mirrors",
        "rule",
        "set_cookie",
        "target",
        "to",
        "tries",
    )

    def __init__(
        self,
        rule: CompiledRule,
        to: RuleBackend,
        target: str,
        authority: str | None,
        hash_key: int | None,
        set_cookie: bytes | None,
        mirrors: tuple[Backend, ...],
        delay: float,
        deadline: float | None,
    ) -> None:
        self.rule = rule
        self.to = to
        self.backend = to.backend
        self.target = target  # path and query to send (after URLRewrite)
        self.authority = authority  # a rewritten :authority / Host, or None to keep it
        self.hash_key = hash_key
        self.set_cookie = set_cookie  # a consistent-hash cookie to set on the response
        self.mirrors = mirrors  # backends to send a copy to, fire-and-forget
        self.delay = delay  # injected delay, seconds, before the first try
        self.deadline = deadline  # clock time the whole request must be answered by
        self.tries = 0

    @property
    def per_try_timeout(self) -> float | None:
        return self.rule.retry.per_try_timeout

    def attempt(self, picker: Picker | None = None) -> Attempt | Respond:
        """An endpoint for the next try (the first, or a retry), or who answers instead.
        `picker` chooses among the available endpoints instead of the balancer."""
        retry = self.tries > 0
        self.tries += 1
        return self.backend.attempt(self.hash_key, retry=retry, picker=picker)

    def retry_after(self, outcome: int, last: Attempt | None = None) -> float | None:
        """After a try's outcome: seconds to back off before retrying, or None to stop and
        answer with this outcome (the backend's response, or `failure_response`).

        `last` is the try that produced `outcome`. It is over whatever the answer, so the
        budget judges the retry without it (one request's chain of retries never has more
        than one retry in flight), and it is released here when a retry follows. Without
        `last` the caller must have released the try already."""
        policy = self.rule.retry
        if outcome not in policy.retriable:
            return None
        b = self.backend
        if self.tries > policy.attempts:
            b.counters.retries_exhausted += 1
            return None
        live = last is not None and not last.released
        active = b.active - 1 if live else b.active
        retries = b.budget.active_retries - (1 if live and last.retry else 0)  # type: ignore[union-attr]
        if not b.budget.allows(active, retries):
            b.counters.retry_budget_exhausted += 1
            return None
        delay = policy.backoff(self.tries, b.rng)
        if self.deadline is not None and b.clock() + delay >= self.deadline:
            return None
        b.counters.retries += 1
        if live:
            last.release()  # type: ignore[union-attr]
        return delay

    def to_backend(self, backend: Backend) -> Forward:
        """The same rule's decision sent to another backend (a model route's target or a
        fallback): filters, timeouts, retry policy and the request deadline carry over;
        the backendRef's own header modifiers do not, and mirrors were sent already."""
        if backend is self.backend:
            return self
        f = Forward(
            self.rule,
            RuleBackend(backend),
            self.target,
            self.authority,
            self.hash_key,
            self.set_cookie,
            NO_MIRRORS,
            0.0,
            self.deadline,
        )
        return f

    def remaining(self) -> float | None:
        """Seconds left of the request timeout, or None without one."""
        return None if self.deadline is None else self.deadline - self.backend.clock()

    def failure_response(self, outcome: int) -> Respond:
        """What the client gets when the last try produced no response."""
        status = status_for_failure(outcome)
        code = "UpstreamTimeout" if status == 504 else "UpstreamFailure"
        what = Failure(outcome).name.lower().replace("_", " ") if outcome in FAILURES else outcome
        return plain(status, code, f"{self.backend.name}: no response from the backend ({what})")

    def rewrite_request(self, headers: Headers) -> None:
        """Apply the rule's and the backendRef's request header modifiers, in place."""
        if self.rule.request_ops:
            apply_ops(self.rule.request_ops, headers)
        if self.to.request_ops:
            apply_ops(self.to.request_ops, headers)

    def rewrite_response(self, headers: Headers) -> None:
        """Apply response header modifiers and add the hash cookie, in place."""
        if self.rule.response_ops:
            apply_ops(self.rule.response_ops, headers)
        if self.to.response_ops:
            apply_ops(self.to.response_ops, headers)
        if self.set_cookie is not None:
            headers.add(b"set-cookie", self.set_cookie)

    @property
    def extensions(self) -> tuple[Resource, ...]:
        return self.rule.extensions

    def __repr__(self) -> str:
        return f"Forward({self.rule.label} -> {self.backend.name}, target={self.target!r})"


@dataclass(slots=True)
class _ServiceTables:
    producer: RouteTable
    consumers: dict[str, RouteTable] = field(default_factory=dict)


def namespace_of(spiffe_id: str) -> str | None:
    """'spiffe://td/ns/apps/sa/client' -> 'apps'."""
    parts = spiffe_id.split("/")
    if len(parts) >= 5 and parts[3] == "ns":
        return parts[4]
    return None


class Engine:
    """Route, balance, limit, detect, retry: the waypoint's decisions for one worker."""

    def __init__(
        self,
        snapshot: ConfigSnapshot | None = None,
        *,
        clock: Clock = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.clock = clock
        self.rng = rng if rng is not None else random.Random()
        self.events = EventLog()
        self.counters = RouteCounters()
        self.snapshot = ConfigSnapshot.empty()
        self._backends: dict[BackendKey, Backend] = {}
        self._tables: dict[tuple[NsName, int], _ServiceTables] = {}
        self._policies: dict[NsName, list[tuple[int | None, BackendPolicy]]] = {}
        self._ctx = Context(self.backend, self.snapshot.resources, self._service_ports)
        if snapshot is not None:
            self.update(snapshot)

    # ---- configuration --------------------------------------------------------------

    def update(self, snapshot: ConfigSnapshot) -> None:
        """Take a new config. Endpoint state (load, latency, ejections) carries over for
        endpoints that stay; route tables are recompiled on their next request."""
        self.snapshot = snapshot
        self._ctx = Context(self.backend, snapshot.resources, self._service_ports)
        policies: dict[NsName, list[tuple[int | None, BackendPolicy]]] = {}
        for r in snapshot.of_kind(BackendPolicy.KIND):
            assert isinstance(r, BackendPolicy)
            for ns, name, port in r.targets():
                policies.setdefault((ns, name), []).append((port, r))
        for entries in policies.values():
            # A policy for the port beats one for the whole Service; then alphabetical.
            entries.sort(key=lambda e: (e[0] is None, e[1].name))
        self._policies = policies
        self._tables.clear()
        for key, b in list(self._backends.items()):
            if self._service_ports(key[0], key[1]).get(key[2], 0) == 0:
                del self._backends[key]  # tries in flight keep their reference
            else:
                self._configure(b)

    def _service_ports(self, namespace: str, name: str) -> Mapping[int, str | None]:
        svc = self.snapshot.services.get((namespace, name))
        if svc is None:
            return {}
        return {p.port: p.name for p in svc.spec.ports}

    def backend(self, key: BackendKey) -> Backend | None:
        """The backend for Service port (namespace, name, port), or None if there is no
        such Service port."""
        b = self._backends.get(key)
        if b is not None:
            return b
        if self._service_ports(key[0], key[1]).get(key[2], 0) == 0:
            return None
        b = Backend(key, clock=self.clock, rng=self.rng, events=self.events)
        self._backends[key] = b  # before configuring: fallbacks may refer back to it
        self._configure(b)
        return b

    def backends(self) -> list[Backend]:
        return list(self._backends.values())

    def _configure(self, b: Backend) -> None:
        ns, name, port = b.key
        policy = None
        for p_port, p in self._policies.get((ns, name), ()):
            if p_port is None or p_port == port:
                policy = p
                break
        svc = self.snapshot.services[(ns, name)]
        sp = svc.port(port)
        target = sp.target() if sp is not None else port
        old = {e.address: e for e in b.endpoints}
        eps = []
        for w in self.snapshot.endpoints.get((ns, name), ()):
            host = str(w.spec.addresses[0])
            weight = endpoint_weight(w.metadata.annotations, w.metadata.labels)
            ep = old.get(f"{host}:{target}")
            if ep is None:
                ep = Endpoint(host, target, name=f"{w.namespace}/{w.name}", weight=weight)
            ep.weight = weight
            ep.workload = w
            eps.append(ep)
        b.configure(policy.spec if policy else None, eps)
        if b.fallback_key is not None:
            b.fallback = self.backend(b.fallback_key)

    def table(self, service: NsName, port: int, source: str | None = None) -> RouteTable:
        """The compiled route table a request from `source` to this Service port uses."""
        tables = self._tables.get((service, port)) or self._compile(service, port)
        if tables.consumers and source:
            ns = namespace_of(source)
            if ns is not None and ns in tables.consumers:
                return tables.consumers[ns]
        return tables.producer

    def _compile(self, service: NsName, port: int) -> _ServiceTables:
        ns, name = service
        port_name = self._service_ports(ns, name).get(port)
        attached: list[HTTPRoute] = [
            r
            for r in self.snapshot.routes.get(service, ())
            if parent_applies(r, ns, name, port, port_name)
        ]
        # GAMMA: a route in the Service's namespace is the producer's, for every caller; a
        # route in another namespace is a consumer route, for callers from that namespace
        # only, and replaces the producer routes for them.
        producer = [r for r in attached if r.namespace == ns]
        by_consumer: dict[str, list[HTTPRoute]] = {}
        for r in attached:
            if r.namespace != ns:
                by_consumer.setdefault(r.namespace, []).append(r)
        key = (ns, name, port)
        tables = _ServiceTables(
            compile_table(self._ctx, key, producer),
            {cns: compile_table(self._ctx, key, rs) for cns, rs in by_consumer.items()},
        )
        self._tables[(service, port)] = tables
        return tables

    # ---- the request path -----------------------------------------------------------

    def route(
        self,
        service: NsName,
        port: int,
        method: str,
        target: str,
        headers: Headers,
        *,
        source: str | None = None,
        authority: str = "",
        scheme: str = "http",
    ) -> Forward | Respond:
        """Decide what happens to one request to Service `service` (namespace, name) on
        `port`. `target` is the request's path and query, `source` the caller's SPIFFE ID."""
        tables = self._tables.get((service, port))
        if tables is None:
            tables = self._compile(service, port)
        table = tables.producer
        if tables.consumers and source:
            ns = namespace_of(source)
            if ns is not None and ns in tables.consumers:
                table = tables.consumers[ns]
        path, _, query = target.partition("?")
        m = table.match(method, path, query, headers)
        counters = self.counters
        if m is None:
            counters.no_route += 1
            return NO_ROUTE
        rule = m.rule
        if rule.error is not None:
            counters.invalid_rule += 1
            return rule.error
        rng = self.rng
        delay = 0.0
        if rule.fault is not None:
            delay, abort = rule.fault.decide(rng)
            if delay:
                counters.fault_delays += 1
            if abort:
                counters.fault_aborts += 1
                return Respond(abort, "FaultAbort", f"{rule.label}: injected fault", delay=delay)
        if rule.redirect is not None:
            counters.redirects += 1
            loc = redirect_location(rule.redirect, scheme, authority, path, query, m.prefix_value)
            return Respond(
                rule.redirect.status_code,
                "Redirect",
                headers=((b"location", loc.encode()),),
                delay=delay,
            )
        to = rule.choose(rng)
        if isinstance(to, Respond):
            counters.invalid_backend += 1
            return to
        if rule.rewrite_path is not None:
            new_path = rewrite_path(rule.rewrite_path, path, m.prefix_value)
            target = new_path + "?" + query if query else new_path
        key = cookie = None
        hp = to.backend.hash_policy
        if hp is not None:
            key, cookie = hp.key(headers, query, source, rng)
        mirrors = NO_MIRRORS
        if rule.mirrors:
            mirrors = tuple(b for b, ratio in rule.mirrors if ratio >= 1.0 or rng.random() < ratio)
            counters.mirrors += len(mirrors)
        t = rule.request_timeout
        counters.forwarded += 1
        return Forward(
            rule,
            to,
            target,
            rule.rewrite_host,
            key,
            cookie,
            mirrors,
            delay,
            self.clock() + t if t else None,
        )

    # ---- timers, probes, events -----------------------------------------------------

    def tick(self) -> None:
        """Run due outlier sweeps (readmissions) on every backend; call at `next_timer()`."""
        now = self.clock()
        for b in self._backends.values():
            b.tick(now)

    def due_probes(self) -> list[Probe]:
        """Health-check probes to run now, across every backend."""
        now = self.clock()
        out: list[Probe] = []
        for b in self._backends.values():
            out += b.due_probes(now)
        return out

    def report_probe(self, probe: Probe, ok: bool) -> None:
        b = self._backends.get(probe.key)
        if b is not None:
            b.report_probe(probe, ok)

    def next_timer(self) -> float | None:
        """The clock time at which `tick()` or `due_probes()` next has work, or None."""
        times = [t for b in self._backends.values() if (t := b.next_timer()) is not None]
        return min(times) if times else None

    def take_events(self) -> list[EngineEvent]:
        """Events since the last call (ejections, readmissions, health changes, panic)."""
        return self.events.take()
