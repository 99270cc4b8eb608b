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

Where it runs is the Rollout's `analysis.provider`, and the judgement is the same either way
(`judge`, on one `Window` per version):

- `waypoint`: every waypoint replica runs one on the requests it carries (`observe`, then
  `tick` builds the windows from its samples). Replicas judge their own share and can step
  apart.
- `prometheus`: the controller runs one per Rollout (controller/rollouts.py), builds the
  windows from Prometheus queries over the waypoints' metrics, adds the custom checks and
  the webhooks' answers, and publishes a RolloutState; every waypoint then `follow`s it and
  judges nothing itself, so every replica applies the same weights.

Its events are what `weft rollout status` shows.
"""

from __future__ import annotations

import math
import random
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from controller.model.ai import Rollout, RolloutStateSpec

BackendKey = tuple[str, str, int]
MAX_EVENTS = 256  # kept for `weft`: every step of a long rollout and a day of waiting
MAX_SAMPLES = 8192  # per version and window: p99 from 8192 samples is within ~0.2%
Phase = Literal["Progressing", "Promoted", "RolledBack"]
EventKind = Literal[
    "started", "waiting", "check_failed", "step_advanced", "promoted", "rolled_back", "restored"
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
        if self.kind == "restored":
            return self.detail  # an event as published, already in this form
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
@dataclass(frozen=True)
class Window:
    """One version's numbers over one interval, however they were measured."""

    requests: int
    errors: int
    p99_latency: float | None = None  # seconds
    p99_ttft: float | None = None  # seconds

    @property
    def success_rate(self) -> float:
        return 100.0 * (self.requests - self.errors) / self.requests if self.requests else 100.0

    def summary(self) -> dict[str, float | int | None]:
        return {
            "requests": self.requests,
            "errors": self.errors,
            "successRate": round(self.success_rate, 3),
            "p99Latency": self.p99_latency,
            "p99TimeToFirstToken": self.p99_ttft,
        }


@dataclass(frozen=True, slots=True)
class CheckResult:
    """A custom check's outcome (a PromQL query against its thresholdRange)."""

    name: str
    ok: bool
    detail: str


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

    def window(self) -> Window:
        return Window(
            self.requests,
            self.errors,
            _percentile(self.latencies, 99),
            _percentile(self.ttfts, 99),
        )

    def summary(self) -> dict[str, float | int | None]:
        return self.window().summary()


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
        self.waiting_for: str | None = None  # a webhook that has not said yes yet
        self.last_analysis: dict[str, object] | None = None
        # Following the controller's decisions (analysis.provider: prometheus): no
        # observing and no judging here.
        self.following = False
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
        if v is not None and self.phase == "Progressing" and not self.following:
            self.stats[v].add(ok, latency, ttft, self.rng)

    def interval(self) -> float:
        s = self.spec.steps[self.step]
        return s.interval if s.interval is not None else self.spec.interval

    def next_check(self) -> float | None:
        """When `tick` has something to do next (None: the rollout is over)."""
        return self.window_start + self.interval() if self.phase == "Progressing" else None

    def tick(self, now: float) -> list[RolloutEvent]:
        """Judge the step on this replica's own samples if its interval has passed;
        returns the new events."""
        due = self.next_check()
        if self.following or due is None or now < due:
            return []
        return self.judge(now, self.stats["canary"].window(), self.stats["stable"].window())

    def judge(
        self,
        now: float,
        canary: Window,
        stable: Window | None = None,
        checks: Sequence[CheckResult] = (),
        *,
        promotion_denied: str | None = None,
        rollback_by: str | None = None,
    ) -> list[RolloutEvent]:
        """Judge the step on the interval's windows. `checks`: custom checks' results;
        `promotion_denied`: the confirm-promotion webhook that did not say yes (the canary
        then stays at its last step); `rollback_by`: a rollback webhook that said yes."""
        self._new_events = []
        if self.phase != "Progressing":
            return []
        summary = f"canary {canary.summary()}" + (
            f", stable {stable.summary()}" if stable is not None else ""
        )
        self.last_analysis = {
            "at": now,
            "canary": canary.summary(),
            "stable": stable.summary() if stable is not None else None,
            "checks": [{"name": c.name, "ok": c.ok, "detail": c.detail} for c in checks],
        }
        if rollback_by is not None:
            self.phase = "RolledBack"
            self._emit(now, "rolled_back", f"rollback webhook {rollback_by} asked for it")
            return self._new_events
        th = self.spec.thresholds
        if canary.requests < self.spec.min_requests:
            self._emit(
                now,
                "waiting",
                f"{canary.requests} canary requests, {self.spec.min_requests} needed",
            )
            self.window_start = now  # keep the counts; judge again after another interval
            return self._new_events
        reasons = []
        if canary.success_rate < th.min_success_rate:
            reasons.append(f"success rate {canary.success_rate:.2f}% < {th.min_success_rate:g}%")
        p99 = canary.p99_latency
        if th.max_p99_latency is not None and p99 is not None and p99 > th.max_p99_latency:
            reasons.append(f"p99 latency {p99 * 1000:.0f} ms > {th.max_p99_latency * 1000:.0f} ms")
        ttft = canary.p99_ttft
        limit = th.max_p99_time_to_first_token
        if limit is not None and ttft is not None and ttft > limit:
            reasons.append(f"p99 TTFT {ttft * 1000:.0f} ms > {limit * 1000:.0f} ms")
        reasons += [f"{c.name}: {c.detail}" for c in checks if not c.ok]
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
            self.waiting_for = None
            self._emit(now, "step_advanced", f"healthy ({summary})")
            self._new_window(now)
        elif promotion_denied is not None:
            if self.waiting_for != promotion_denied:
                self._emit(
                    now,
                    "waiting",
                    f"healthy; confirm-promotion webhook {promotion_denied} has not said yes",
                )
            self.waiting_for = promotion_denied
            self._new_window(now)
        else:
            self.phase = "Promoted"
            self.waiting_for = None
            self._emit(now, "promoted", f"healthy through every step ({summary})")
        return self._new_events

    # ---- the controller's decisions ------------------------------------------------

    def state(self, generation: str) -> dict[str, object]:
        """This analysis as a RolloutState spec (the controller publishes it)."""
        return {
            "generation": generation,
            "phase": self.phase,
            "step": self.step,
            "canaryWeight": self.canary_weight,
            "failures": self.failures,
            "windowStart": self.window_start,
            "waitingFor": self.waiting_for,
            "lastAnalysis": self.last_analysis,
            "events": [str(e) for e in list(self.events)[-64:]],
        }

    def restore(self, st: RolloutStateSpec) -> None:
        """Carry on from a published state (a controller restarted mid-rollout)."""
        self.phase = st.phase
        self.step = min(st.step, len(self.spec.steps) - 1)
        self.failures = st.failures
        self.window_start = st.window_start
        self.waiting_for = st.waiting_for
        self.last_analysis = st.last_analysis
        self.events.clear()
        self.events.extend(
            RolloutEvent(st.window_start, self.name, "restored", self.step, self.canary_weight, e)
            for e in st.events
        )

    def follow(self, st: RolloutStateSpec) -> None:
        """Apply the controller's decision: its phase and step, no judging here."""
        self.restore(st)
        self.following = True

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
            "judgedBy": "controller" if self.following else "this waypoint",
            "waitingFor": self.waiting_for,
            "window": {k: v.summary() for k, v in self.stats.items()},
            "events": [str(e) for e in list(self.events)[-20:]],
        }
