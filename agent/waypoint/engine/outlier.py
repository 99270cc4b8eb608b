"""Outlier detection: eject endpoints that keep failing, readmit them after a while.

Envoy's consecutive-error detectors, with Istio's defaults (controller/model/traffic.py):

- every 5xx, and every try that got no response (connect failure, reset, timeout), counts
  towards `consecutive5xxErrors`; 502/503/504 and the failures also count towards
  `consecutiveGatewayErrors`; any other response resets both (a 500 resets the gateway one);
- reaching a threshold ejects the endpoint at once, for baseEjectionTime x (its ejection
  count), at most maxEjectionTime, unless maxEjectionPercent of the endpoints (rounded down,
  but at least one) are already ejected;
- a sweep every `interval` readmits endpoints whose time is up, and lowers the ejection
  count of endpoints that stayed in, so an endpoint that recovered for good is forgiven.
"""

from __future__ import annotations

from collections.abc import Sequence

from agent.waypoint.engine.balancer import Endpoint
from agent.waypoint.engine.events import BackendCounters, EngineEvent, EventLog
from agent.waypoint.engine.outcome import GATEWAY_ERRORS
from controller.model.traffic import OutlierDetection


class OutlierDetector:
    __slots__ = (
        "backend",
        "base",
        "counters",
        "events",
        "gateway_threshold",
        "interval",
        "max_percent",
        "max_time",
        "next_sweep",
        "threshold_5xx",
    )

    def __init__(
        self,
        cfg: OutlierDetection,
        *,
        backend: str,
        events: EventLog,
        counters: BackendCounters,
        now: float,
    ) -> None:
        self.backend = backend
        self.events = events
        self.counters = counters
        self.threshold_5xx = cfg.consecutive_5xx_errors
        self.gateway_threshold = cfg.consecutive_gateway_errors
        self.interval = cfg.interval
        self.base = cfg.base_ejection_time
        self.max_time = cfg.max_ejection_time
        self.max_percent = cfg.max_ejection_percent
        self.next_sweep = now + self.interval

    def record(self, ep: Endpoint, outcome: int, now: float, endpoints: Sequence[Endpoint]) -> bool:
        """One try's outcome at `ep`; True when `ep` was ejected (availability changed)."""
        if ep.ejected_until is not None:
            return False  # answers still arriving from before the ejection
        if outcome >= 500 or outcome < 0:
            if outcome in GATEWAY_ERRORS:
                ep.consecutive_gateway += 1
            else:
                ep.consecutive_gateway = 0
            ep.consecutive_5xx += 1
            t5, tg = self.threshold_5xx, self.gateway_threshold
            if t5 and ep.consecutive_5xx >= t5:
                return self._eject(ep, now, endpoints, f"{ep.consecutive_5xx} consecutive 5xx")
            if tg and ep.consecutive_gateway >= tg:
                return self._eject(
                    ep, now, endpoints, f"{ep.consecutive_gateway} consecutive gateway errors"
                )
            return False
        ep.consecutive_5xx = 0
        ep.consecutive_gateway = 0
        return False

    def _eject(self, ep: Endpoint, now: float, endpoints: Sequence[Endpoint], why: str) -> bool:
        ep.consecutive_5xx = 0
        ep.consecutive_gateway = 0
        ejected = sum(1 for e in endpoints if e.ejected_until is not None)
        if ejected >= self.max_ejections(len(endpoints)):
            self.counters.ejections_overflow += 1
            return False
        ep.ejections += 1
        duration = min(self.base * ep.ejections, max(self.base, self.max_time))
        ep.ejected_until = now + duration
        self.counters.ejections += 1
        self.events.emit(
            EngineEvent(
                now,
                "ejected",
                self.backend,
                ep.address,
                f"{why}; out for {duration:g}s (ejection {ep.ejections})",
            )
        )
        return True

    def max_ejections(self, n: int) -> int:
        if self.max_percent == 0:
            return 0
        return max(1, n * self.max_percent // 100)

    def sweep(self, now: float, endpoints: Sequence[Endpoint]) -> bool:
        """Readmit endpoints whose ejection is over; True when any came back."""
        changed = False
        # Sweeps the shell or the request path did not run (an idle backend) still count,
        # so an endpoint is forgiven one ejection per healthy interval, as in Envoy.
        intervals = 1 + int((now - self.next_sweep) // self.interval)
        for ep in endpoints:
            until = ep.ejected_until
            if until is None:
                if ep.ejections > 0:
                    ep.ejections = max(0, ep.ejections - intervals)
            elif until <= now:
                ep.ejected_until = None
                changed = True
                self.counters.readmissions += 1
                self.events.emit(
                    EngineEvent(now, "readmitted", self.backend, ep.address, "ejection time over")
                )
        # Sweeps keep their phase; after a long idle gap, the next one is an interval away.
        self.next_sweep += self.interval
        if self.next_sweep <= now:
            self.next_sweep = now + self.interval
        return changed
