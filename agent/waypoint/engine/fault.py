"""Fault injection decisions: per request, whether to delay it and whether to abort it."""

from __future__ import annotations

import random
from dataclasses import dataclass

from controller.model.traffic import FaultInjectionSpec


@dataclass(frozen=True, slots=True)
class Fault:
    delay: float = 0.0
    delay_ratio: float = 0.0  # 0..1
    abort_status: int = 0
    abort_ratio: float = 0.0

    @classmethod
    def of(cls, spec: FaultInjectionSpec) -> Fault:
        d, a = spec.delay, spec.abort
        return cls(
            d.fixed_delay if d else 0.0,
            d.percentage / 100.0 if d else 0.0,
            a.http_status if a else 0,
            a.percentage / 100.0 if a else 0.0,
        )

    def decide(self, rng: random.Random) -> tuple[float, int]:
        """(seconds to delay, status to abort with or 0). The two are drawn independently,
        as Envoy's fault filter does: a request may be delayed, then aborted."""
        delay = self.delay if self.delay_ratio and rng.random() < self.delay_ratio else 0.0
        abort = self.abort_status if self.abort_ratio and rng.random() < self.abort_ratio else 0
        return delay, abort
