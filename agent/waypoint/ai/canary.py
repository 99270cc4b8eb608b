"""Automated canary analysis (Rollout): a state machine on an injected clock.

    Progressing(step 0) --interval passed, canary healthy--> Progressing(step 1) ... -->
        Promoted (canary 100%)
    Progressing(any step) --failureLimit failed checks in a row--> RolledBack (stable 100%)

Per step the analysis collects, per version (stable, canary), the requests, errors (5xx,
resets, timeouts: what the shell reports as not ok), latencies and times to first token.
When the step's interval has passed (`tick`), the canary's window is judged:

- fewer than minRequests canary requests: not judged; the step goes on collecting
  (event `waiting`), so a quiet service is never promoted on no evidence;
- success rate below minSuccessRate, or p99 latency / p99 TTFT above their maximum: a
  failed check (event `check_failed`); at failureLimit in a row, roll back (`rolled_back`);
- otherwise the next step (`step_advanced`), or after the last step `promoted`.

A new window starts at each judgement. `weights()` is what the router should use now;
`choose(rng)` draws a backend with them. Percentiles are exact over a bounded sample
(reservoir sampling of at most MAX_SAMPLES per window, from the injected RNG).

Where it runs: every waypoint worker may run one (each judges its own share of traffic and
all reach the same verdict on a steady service), or one instance fed by all (the controller);
this module does not care. Its events are what `weft` shows for a rollout.
"""

from __future__ import annotations

import math
import random
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

from controller.model.ai import Rollout

BackendKey = tuple[str, str, int]
MAX_EVENTS = 256  # kept for `weft`: every step of a long rollout and a day of waiting
MAX_SAMPLES = 8192  # per version and window: p99 from 8192 samples is within ~0.2%
Phase = Literal["Progressing", "Promoted", "RolledBack"]
EventKind = Literal[
    "started", "waiting", "check_failed", "step_advanced", "promoted", "rolled_back"
]


@dataclass(frozen=True, slots=True)
class RolloutEvent:
    at: float
    rollout: str  # namespace/name
    kind: EventKind
    step: int
    canary_weight: int
    detail: str

    def __str__(self) -> str:
        return f"{self.rollout} {self.kind} (step {self.step}, canary {self.canary_weight}%): " + (
            self.detail
        )


def _percentile(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile (what Prometheus' histogram_quantile approximates)."""
    if not values:
        return None
    s = sorted(values)
    return s[max(0, math.ceil(p / 100 * len(s)) - 1)]


@dataclass
class VersionStats:
    requests: int = 0
    errors: int = 0
    latencies: list[float] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)
    _seen_l: int = 0
    _seen_t: int = 0

    def add(self, ok: bool, latency: float, ttft: float | None, rng: random.Random) -> None:
        self.requests += 1
        if not ok:
            self.errors += 1
        self._seen_l = _reservoir(self.latencies, latency, self._seen_l, rng)
        if ttft is not None:
            self._seen_t = _reservoir(self.ttfts, ttft, self._seen_t, rng)

    @property
    def success_rate(self) -> float:
        return 100.0 * (self.requests - self.errors) / self.requests if self.requests else 100.0

    def summary(self) -> dict[str, float | int | None]:
        return {
            "requests": self.requests,
            "errors": self.errors,
            "successRate": round(self.success_rate, 3),
            "p99Latency": _percentile(self.latencies, 99),
            "p99TimeToFirstToken": _percentile(self.ttfts, 99),
        }


def _reservoir(sample: list[float], v: float, seen: int, rng: random.Random) -> int:
    seen += 1
    if len(sample) < MAX_SAMPLES:
        sample.append(v)
    else:
        j = rng.randrange(seen)
        if j < MAX_SAMPLES:
            sample[j] = v
    return seen


class CanaryAnalysis:
    def __init__(self, rollout: Rollout, now: float, rng: random.Random) -> None:
        spec = rollout.spec
        self.name = f"{rollout.namespace}/{rollout.name}"
        self.spec = spec
        ns = rollout.namespace
        self.stable: BackendKey = (spec.stable.namespace or ns, spec.stable.name, spec.stable.port)
        self.canary: BackendKey = (spec.canary.namespace or ns, spec.canary.name, spec.canary.port)
        self.rng = rng
        self.phase: Phase = "Progressing"
        self.step = 0
        self.failures = 0
        self.window_start = now
        self.stats = {"stable": VersionStats(), "canary": VersionStats()}
        # Every event since the start (a few per step; `waiting` at most one per interval).
        self.events: deque[RolloutEvent] = deque(maxlen=MAX_EVENTS)
        self._new_events: list[RolloutEvent] = []
        self._emit(now, "started", f"canary {self.canary[1]} at {self.canary_weight}%")

    # ---- what the router uses ------------------------------------------------------

    @property
    def canary_weight(self) -> int:
        if self.phase == "Promoted":
            return 100
        if self.phase == "RolledBack":
            return 0
        return self.spec.steps[self.step].weight

    def weights(self) -> dict[BackendKey, int]:
        w = self.canary_weight
        return {self.stable: 100 - w, self.canary: w}

    def choose(self, rng: random.Random) -> BackendKey:
        return self.canary if rng.random() * 100 < self.canary_weight else self.stable

    def split(self, backend: BackendKey, rng: random.Random) -> BackendKey:
        """The backend a request for `backend` goes to: the rollout's stable backend (or
        its target Service) is split by the weights; any other backend is left alone."""
        return self.choose(rng) if backend == self.stable else backend

    def version_of(self, backend: BackendKey) -> str | None:
        if backend == self.stable:
            return "stable"
        if backend == self.canary:
            return "canary"
        return None

    # ---- feeding and judging -------------------------------------------------------

    def observe(
        self, backend: BackendKey, ok: bool, latency: float, ttft: float | None = None
    ) -> None:
        """One finished request to `backend` (ignored when it is neither version)."""
        v = self.version_of(backend)
        if v is not None and self.phase == "Progressing":
            self.stats[v].add(ok, latency, ttft, self.rng)

    def interval(self) -> float:
        s = self.spec.steps[self.step]
        return s.interval if s.interval is not None else self.spec.interval

    def next_check(self) -> float | None:
        """When `tick` has something to do next (None: the rollout is over)."""
        return self.window_start + self.interval() if self.phase == "Progressing" else None

    def tick(self, now: float) -> list[RolloutEvent]:
        """Judge the step if its interval has passed; returns the new events."""
        self._new_events = []
        due = self.next_check()
        if due is None or now < due:
            return []
        c = self.stats["canary"]
        th = self.spec.thresholds
        if c.requests < self.spec.min_requests:
            self._emit(
                now, "waiting", f"{c.requests} canary requests, {self.spec.min_requests} needed"
            )
            self.window_start = now  # keep the counts; judge again after another interval
            return self._new_events
        reasons = []
        if c.success_rate < th.min_success_rate:
            reasons.append(f"success rate {c.success_rate:.2f}% < {th.min_success_rate:g}%")
        p99 = _percentile(c.latencies, 99)
        if th.max_p99_latency is not None and p99 is not None and p99 > th.max_p99_latency:
            reasons.append(f"p99 latency {p99 * 1000:.0f} ms > {th.max_p99_latency * 1000:.0f} ms")
        ttft = _percentile(c.ttfts, 99)
        limit = th.max_p99_time_to_first_token
        if limit is not None and ttft is not None and ttft > limit:
            reasons.append(f"p99 TTFT {ttft * 1000:.0f} ms > {limit * 1000:.0f} ms")
        summary = f"canary {c.summary()}, stable {self.stats['stable'].summary()}"
        if reasons:
            self.failures += 1
            why = "; ".join(reasons)
            if self.failures >= self.spec.failure_limit:
                self.phase = "RolledBack"
                self._emit(now, "rolled_back", f"{why} ({summary})")
            else:
                self._emit(
                    now,
                    "check_failed",
                    f"{why} ({self.failures}/{self.spec.failure_limit}; {summary})",
                )
                self._new_window(now)
            return self._new_events
        self.failures = 0
        if self.step + 1 < len(self.spec.steps):
            self.step += 1
            self._emit(now, "step_advanced", f"healthy ({summary})")
            self._new_window(now)
        else:
            self.phase = "Promoted"
            self._emit(now, "promoted", f"healthy through every step ({summary})")
        return self._new_events

    def _new_window(self, now: float) -> None:
        self.window_start = now
        self.stats = {"stable": VersionStats(), "canary": VersionStats()}

    def _emit(self, now: float, kind: EventKind, detail: str) -> None:
        e = RolloutEvent(now, self.name, kind, self.step, self.canary_weight, detail)
        self.events.append(e)
        self._new_events.append(e)

    def status(self) -> dict[str, object]:
        """For `weft` and the admin API."""
        return {
            "rollout": self.name,
            "phase": self.phase,
            "step": self.step,
            "canaryWeight": self.canary_weight,
            "failures": self.failures,
            "window": {k: v.summary() for k, v in self.stats.items()},
            "events": [str(e) for e in list(self.events)[-20:]],
        }
