"""What the engine tells the shell besides decisions: events to log, counters to export.

Counters are plain ints on plain objects: the shell reads them when Prometheus scrapes
(no metrics library in the engine, nothing to lock, nothing per request but an increment).
Events are kept in a bounded queue the shell drains (`Engine.take_events`); when the shell
falls behind, the oldest are dropped and counted rather than growing without bound.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Literal

EventKind = Literal["ejected", "readmitted", "healthy", "unhealthy", "panic", "panic_over"]

MAX_EVENTS = 4096  # a burst of ejections across every backend fits; the shell drains often


@dataclass(frozen=True, slots=True)
class EngineEvent:
    """Something worth a log line: `backend` is "namespace/service:port", `endpoint` is
    "ip:port" (empty for backend-wide events)."""

    at: float
    kind: EventKind
    backend: str
    endpoint: str
    detail: str

    def __str__(self) -> str:
        where = f"{self.backend} {self.endpoint}".strip()
        return f"{self.kind} {where}: {self.detail}"


class EventLog:
    __slots__ = ("dropped", "events")

    def __init__(self, maxlen: int = MAX_EVENTS) -> None:
        self.events: deque[EngineEvent] = deque(maxlen=maxlen)
        self.dropped = 0

    def emit(self, event: EngineEvent) -> None:
        if len(self.events) == self.events.maxlen:
            self.dropped += 1
        self.events.append(event)

    def take(self) -> list[EngineEvent]:
        out = list(self.events)
        self.events.clear()
        return out


class Counters:
    """Monotonic counters; `as_dict()` for exporters. Subclasses list their fields as slots."""

    __slots__: tuple[str, ...] = ()

    def __init__(self) -> None:
        for name in self.__slots__:
            setattr(self, name, 0)

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}


class RouteCounters(Counters):
    """Per engine: what the route stage decided."""

    __slots__ = (
        "fault_aborts",  # requests answered by FaultInjection
        "fault_delays",  # requests delayed by FaultInjection
        "forwarded",  # requests given a backend
        "invalid_backend",  # 500: the rule's chosen backendRef does not resolve
        "invalid_rule",  # 500: an ExtensionRef that does not resolve, incompatible filters,
        # or every backendRef at weight 0
        "mirrors",  # mirror copies decided
        "no_route",  # 404: routes attach to the Service but none matched
        "redirects",  # 3xx from RequestRedirect
    )

    forwarded: int
    no_route: int
    invalid_backend: int
    invalid_rule: int
    redirects: int
    fault_delays: int
    fault_aborts: int
    mirrors: int


class BackendCounters(Counters):
    """Per backend (Service port): what happened to its tries."""

    __slots__ = (
        "ejections",  # outlier ejections
        "ejections_overflow",  # ejections skipped because of maxEjectionPercent
        "fallback_backend",  # sent to fallback.backendRef
        "fallback_responses",  # answered by fallback.response
        "health_check_failures",  # probes that failed
        "no_healthy_endpoint",  # 503: nothing available and no fallback
        "overflow",  # 503: maxConnections reached and maxPendingRequests full
        "readmissions",  # ejected endpoints back in rotation
        "retries",  # retries granted
        "retries_exhausted",  # gave up: the policy's attempts were used up
        "retry_budget_exhausted",  # a retriable failure not retried because of the budget
        "tries",  # endpoints picked (first tries and retries)
    )

    tries: int
    retries: int
    retries_exhausted: int
    retry_budget_exhausted: int
    overflow: int
    no_healthy_endpoint: int
    fallback_responses: int
    fallback_backend: int
    ejections: int
    ejections_overflow: int
    readmissions: int
    health_check_failures: int


__all__ = [
    "BackendCounters",
    "Counters",
    "EngineEvent",
    "EventKind",
    "EventLog",
    "RouteCounters",
]
