"""Active health checks: what to probe when, and what a probe's result changes.

The engine schedules and keeps state; the shell performs each probe (an HTTP GET of `path`,
or a gRPC `grpc.health.v1.Health/Check`) within `timeout` and reports ok or not. An endpoint
becomes unhealthy after `unhealthyThreshold` failures in a row and healthy again after
`healthyThreshold` successes in a row. Endpoints start healthy: they are in the snapshot
because Kubernetes found them ready, and starting them unhealthy would black-hole a Service
for one interval after every config change.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from agent.waypoint.engine.balancer import Endpoint
from agent.waypoint.engine.events import BackendCounters, EngineEvent, EventKind, EventLog
from controller.model.traffic import HealthCheck


@dataclass(frozen=True, slots=True)
class Probe:
    """One probe for the shell to run."""

    backend: str  # "namespace/service:port"
    key: tuple[str, str, int]  # the backend's (namespace, service, port)
    endpoint: Endpoint
    kind: str  # "http" or "grpc"
    path: str  # http: the path to GET
    service: str  # grpc: the service name to ask about ("" = the whole server)
    timeout: float
    expected: frozenset[int] | None  # http: statuses that pass; None = 200-399

    def passed(self, status: int) -> bool:
        """Whether an HTTP probe's status counts as healthy."""
        if self.expected is None:
            return 200 <= status < 400
        return status in self.expected


class _State:
    __slots__ = ("failures", "in_flight", "next_at", "successes")

    def __init__(self, next_at: float) -> None:
        self.next_at = next_at
        self.successes = 0
        self.failures = 0
        self.in_flight = False


class HealthChecker:
    __slots__ = ("backend", "cfg", "counters", "events", "key", "rng", "states")

    def __init__(
        self,
        cfg: HealthCheck,
        *,
        backend: str,
        key: tuple[str, str, int],
        rng: random.Random,
        events: EventLog,
        counters: BackendCounters,
    ) -> None:
        self.cfg = cfg
        self.backend = backend
        self.key = key
        self.rng = rng
        self.events = events
        self.counters = counters
        self.states: dict[Endpoint, _State] = {}

    def rebuild(self, endpoints: Sequence[Endpoint], now: float) -> None:
        """Track exactly these endpoints; new ones get a first probe at a random point of the
        first interval, so a large Service is not probed all at once."""
        old = self.states
        self.states = {
            e: old.get(e) or _State(now + self.rng.random() * self.cfg.interval) for e in endpoints
        }

    def next_due(self) -> float | None:
        """When the next probe is due, for the shell's timer; None when nothing to probe."""
        times = [s.next_at for s in self.states.values() if not s.in_flight]
        return min(times) if times else None

    def due(self, now: float) -> list[Probe]:
        out = []
        cfg = self.cfg
        for ep, st in self.states.items():
            if st.in_flight or st.next_at > now:
                continue
            st.in_flight = True
            st.next_at = now + cfg.interval
            if cfg.http is not None:
                exp = cfg.http.expected_statuses
                out.append(
                    Probe(
                        self.backend,
                        self.key,
                        ep,
                        "http",
                        cfg.http.path,
                        "",
                        cfg.timeout,
                        frozenset(exp) if exp else None,
                    )
                )
            else:
                svc = cfg.grpc.service if cfg.grpc is not None else ""
                out.append(Probe(self.backend, self.key, ep, "grpc", "", svc, cfg.timeout, None))
        return out

    def report(self, probe: Probe, ok: bool, now: float) -> bool:
        """A probe's result; True when the endpoint's health changed."""
        ep = probe.endpoint
        st = self.states.get(ep)
        if st is None:
            return False  # the endpoint left while its probe ran
        st.in_flight = False
        if ok:
            st.successes += 1
            st.failures = 0
            if not ep.healthy and st.successes >= self.cfg.healthy_threshold:
                ep.healthy = True
                self._event(now, ep, "healthy", f"{st.successes} probes passed")
                return True
            return False
        self.counters.health_check_failures += 1
        st.failures += 1
        st.successes = 0
        if ep.healthy and st.failures >= self.cfg.unhealthy_threshold:
            ep.healthy = False
            self._event(now, ep, "unhealthy", f"{st.failures} probes failed")
            return True
        return False

    def _event(self, now: float, ep: Endpoint, kind: EventKind, detail: str) -> None:
        self.events.emit(EngineEvent(now, kind, self.backend, ep.address, detail))
