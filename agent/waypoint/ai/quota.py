"""Token and request rate limits and token budgets (TokenRateLimit), held in total across
every waypoint worker on a node.

Semantics (docs/ai-traffic.md says the same for users):

- **Admit, then charge.** `admit` runs before the request goes upstream: it checks every
  limit that applies and, if all allow, counts the request and *reserves* the prompt's
  token estimate. `charge` runs when the response is over and replaces the reservation by
  the backend's actual `usage.total_tokens`. A denied request is answered 429 with
  `retry-after` and OpenAI's `x-ratelimit-*` headers and is not counted.
- **A started stream is not cut** unless the policy says `onExceed: truncate`. It finishes
  and is charged, which can take a counter past its limit. The overshoot of one window is
  bounded by what the requests admitted while there was room go on to use beyond their
  reservation: at most the sum, over the
  requests in flight at the moment the limit was reached, of (completion tokens + prompt
  estimate error); each term is at most the request's max_tokens when it sets one. The next
  requests then wait until the window has room again, so the overshoot is paid back.
- **Windows.** Per-minute limits use a sliding-window counter (two fixed one-minute windows,
  the previous one weighted by how much of it still overlaps the last 60 s; Cloudflare's
  scheme): it never lets 2x the limit through across a minute boundary, as a fixed window
  does, and needs two counters per key. Budgets use calendar windows in UTC (the hour, the
  day, the month), because a budget is an accounting period people reason about ("10 M
  tokens a day").
- **Shadow.** A shadow limit counts and charges exactly as an enforced one, but a request it
  would deny is admitted; the admission says which limits would have denied it.

- **Charged as the stream goes.** A streamed answer is charged every `CHARGE_STEP` tokens
  (one per content event) while it streams, so concurrent long streams are seen by the next
  admissions at once instead of at their end; with `onExceed: truncate` a stream whose
  charge takes a limit past its value is ended with an OpenAI-style error event.

Where the counters live is the store's business (agent/waypoint/ai/quotastore.py: one
SQLite file per node by default, Redis or Valkey when several replicas serve a policy):
every decision here is one atomic store op. When the store fails, `failOpen` (the default)
admits against this replica's own counters (`TokenLimiter.local`), so an outage degrades to
per-replica limits, never to unlimited; `failOpen: false` answers 503.
"""

from __future__ import annotations

import asyncio
import calendar
import hashlib
import math
import re
import time
from dataclasses import dataclass, field

from agent.waypoint.ai.facts import Predicate, RequestFacts, compile_match
from agent.waypoint.ai.quotastore import (
    Check,
    MemoryStore,
    Op,
    QuotaStore,
    StoreError,
    StoreStats,
    Write,
)
from controller.model.ai import Budget, TokenLimit, TokenRateLimit

WINDOW = 60  # seconds; the per-minute limits
CHARGE_STEP = 16  # tokens streamed between two charges of a stream in progress


# ---- windows -------------------------------------------------------------------------


def budget_window(window: str, now: float) -> tuple[int, int]:
    """(start, end) in epoch seconds of the calendar window (UTC) holding `now`."""
    t = int(now)
    if window == "hour":
        s = t - t % 3600
        return s, s + 3600
    if window == "day":
        s = t - t % 86400
        return s, s + 86400
    g = time.gmtime(t)
    s = calendar.timegm((g.tm_year, g.tm_mon, 1, 0, 0, 0))
    y, m = (g.tm_year + 1, 1) if g.tm_mon == 12 else (g.tm_year, g.tm_mon + 1)
    return s, calendar.timegm((y, m, 1, 0, 0, 0))


def sliding(prev: int, cur: int, frac: float) -> float:
    """The sliding-window estimate of the last 60 s, `frac` into the current window."""
    return prev * (1.0 - frac) + cur


def wait_for_room(prev: int, cur: int, frac: float, limit: int, need: int) -> float | None:
    """Seconds until `need` more fits under `limit` if nothing else arrives; None: never
    (`need` alone is over the limit)."""
    if need > limit:
        return None
    if sliding(prev, cur, frac) + need <= limit:
        return 0.0
    if cur + need <= limit:  # the previous window's weight fades enough within this one
        f = 1.0 - (limit - need - cur) / prev
        return max(0.0, (f - frac) * WINDOW)
    # Wait into the next window, where this window's count fades in turn.
    e = 1.0 - (limit - need) / cur
    return (1.0 - frac) * WINDOW + e * WINDOW


def reset_in(prev: int, cur: int, frac: float) -> float:
    """Seconds until the sliding window is empty (OpenAI's x-ratelimit-reset-*)."""
    if cur:
        return (2.0 - frac) * WINDOW
    if prev:
        return (1.0 - frac) * WINDOW
    return 0.0


def duration_text(seconds: float) -> str:
    """OpenAI's reset format: 1s, 6m0s, 1h2m3s, 250ms."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    s = math.ceil(seconds)
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    if h:
        return f"{h}h{m}m{s}s"
    return f"{m}m{s}s" if m else f"{s}s"


# ---- compiled policy -----------------------------------------------------------------

_PLAIN_KEY = re.compile(r"^[A-Za-z0-9._:@=+*-]{1,64}$")


def safe_key(v: str) -> str:
    """A key value as stored: short printable values as they are (readable in Redis), any
    other (long, odd characters, a lone surrogate from a JSON body) as a fixed-length
    digest, so a caller choosing values cannot make keys of unbounded size or that fail to
    encode. Principals (spiffe://...) contain '/' and are digested too."""
    if _PLAIN_KEY.match(v):
        return v
    return "h:" + hashlib.sha256(v.encode("utf-8", "surrogatepass")).hexdigest()[:32]


@dataclass(frozen=True, slots=True)
class _Numbers:
    tpm: int | None
    rpm: int | None
    budget: Budget | None


class _Limit:
    __slots__ = ("by", "header", "matches", "name", "numbers", "overrides", "prefix", "shadow")

    def __init__(self, policy: str, lim: TokenLimit, shadow: bool) -> None:
        self.name = lim.name
        self.prefix = f"{policy}/{lim.name}/"
        self.by = lim.by
        self.header = lim.header.lower().encode() if lim.header else b""
        self.matches: Predicate = compile_match(lim.match)
        self.shadow = shadow if lim.shadow is None else lim.shadow
        base = _Numbers(lim.tokens_per_minute, lim.requests_per_minute, lim.budget)
        self.numbers = base
        self.overrides: dict[str, _Numbers] = {}
        for o in lim.overrides:
            n = _Numbers(
                base.tpm if o.tokens_per_minute is None else o.tokens_per_minute,
                base.rpm if o.requests_per_minute is None else o.requests_per_minute,
                base.budget if o.budget is None else o.budget,
            )
            for v in o.values:
                self.overrides[v] = n

    def key_value(self, r: RequestFacts) -> str:
        """Whose counters: a request without the value (no header, no model) shares "-"."""
        by = self.by
        if by == "principal":
            return r.principal or "-"
        if by == "namespace":
            return r.namespace or "-"
        if by == "model":
            return r.served or r.model or "-"
        if by == "header":
            v = r.headers.get(self.header)
            return v.decode("latin-1") if v else "-"
        return "*"


@dataclass(slots=True)
class Charge:
    """One limit's share of an admitted request, kept until `charge`."""

    key: str  # policy/limit/ and the key value
    numbers: _Numbers
    reserved: int
    shadow: bool
    # The windows the reservation went into: a refund (a negative correction) comes out of
    # them, not out of whatever window is current when the answer ends.
    minute: int = 0  # start of the minute window at admission
    budget: tuple[int, int] | None = None  # (start, end) of the budget window at admission


@dataclass(slots=True)
class Denial:
    limit: str  # "namespace/policy/limit"
    what: str  # "requests", "tokens" or "budget"
    retry_after: float | None  # None: this request alone is over the limit
    shadow: bool


@dataclass(slots=True)
class Admission:
    allowed: bool
    status: int = 200  # 429 when denied, 503 when the store failed and failOpen is false
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)  # for the response
    denials: list[Denial] = field(default_factory=list)  # enforced and shadow
    charges: list[Charge] = field(default_factory=list)
    store_error: str | None = None
    store: QuotaStore | None = None  # where it was counted (the shared store or `local`)

    @property
    def shadow_denied(self) -> bool:
        return any(d.shadow for d in self.denials)

    def message(self) -> str:
        d = next((d for d in self.denials if not d.shadow), None)
        if d is None:
            return ""
        if d.retry_after is None:
            return f"the request's {d.what} alone exceed limit {d.limit}"
        wait = math.ceil(d.retry_after)
        return f"rate limit {d.limit} reached for {d.what}; retry after {wait} s"


@dataclass
class LimitCounters:
    """Plain counters the metrics collector reads (no locks, no metrics library here)."""

    allowed: int = 0
    denied: int = 0
    shadow_denied: int = 0
    store_errors: int = 0
    local_admits: int = 0  # admitted on this replica's own counters, the store being down
    tokens_charged: int = 0


class TokenLimiter:
    """The compiled limits of one TokenRateLimit, over a store."""

    def __init__(self, policy: TokenRateLimit, store: QuotaStore) -> None:
        spec = policy.spec
        self.name = f"{policy.namespace}/{policy.name}"
        self.store = store
        self.fail_open = spec.fail_open
        self.truncate = spec.on_exceed == "truncate"
        self.limits = [_Limit(self.name, lim, spec.shadow) for lim in spec.limits]
        self.counters = LimitCounters()
        # This replica's own counters, used while the store is failing and failOpen holds.
        self.local = MemoryStore()
        # Charges on their way to the store: an admission waits for them, so it sees every
        # charge this replica made before it (a caller's next request sees its last one).
        self._inflight: set[asyncio.Future[None]] = set()

    async def admit(self, r: RequestFacts, tokens: int, now: float) -> Admission:
        """Admit one request that is about to reserve `tokens` (the prompt estimate)."""
        plan: list[tuple[_Limit, str, _Numbers]] = []
        for lim in self.limits:
            if lim.matches(r):
                v = lim.key_value(r)
                plan.append((lim, lim.prefix + safe_key(v), lim.overrides.get(v, lim.numbers)))
        if not plan:
            return Admission(True)
        if self._inflight:
            await asyncio.wait(set(self._inflight))
        op, meta, frac = _admit_op(plan, tokens, now)
        store: QuotaStore = self.store
        error = None
        try:
            values, ok = await self._run(store, op, "admit")
        except StoreError as e:
            self.counters.store_errors += 1
            if not self.fail_open:
                return Admission(False, 503, store_error=str(e))
            error = str(e)
            store = self.local
            values, ok = self.local.run_now(op, now)
            self.counters.local_admits += 1
        adm = self._conclude(plan, op, meta, values, ok, tokens, frac, now)
        adm.store = store
        adm.store_error = error
        return adm

    async def _run(self, store: QuotaStore, op: Op, what: str) -> tuple[list[int], bool]:
        t0 = time.perf_counter()
        failed = True
        try:
            got = await store.run(op)
            failed = False
            return got
        finally:
            self.stats.observe(store.kind, what, time.perf_counter() - t0, failed)

    @property
    def stats(self) -> StoreStats:
        return self.store.stats

    def _conclude(
        self,
        plan: list[tuple[_Limit, str, _Numbers]],
        op: Op,
        meta: list[tuple[_Limit, str, float]],
        values: list[int],
        ok: bool,
        tokens: int,
        frac: float,
        now: float,
    ) -> Admission:
        """The admission from what the op read (before its writes) and whether it wrote."""
        adm = Admission(ok)
        # (what, limit value, used before this request, this request's need, reset)
        seen: list[tuple[str, int, float, int, float]] = []
        for check, (lim, what, reset) in zip(op.checks, meta, strict=True):
            used = check.used(values)
            if what == "budget":
                reset_after = reset - now
                if used + check.need > check.limit:
                    wait = reset_after if check.need <= check.limit else None
                    adm.denials.append(Denial(lim.prefix[:-1], what, wait, lim.shadow))
            else:
                prev, cur = (values[i] for i in check.cells)
                reset_after = reset_in(prev, cur, frac)
                if used + check.need > check.limit:
                    wait = wait_for_room(prev, cur, frac, check.limit, check.need)
                    adm.denials.append(Denial(lim.prefix[:-1], what, wait, lim.shadow))
            seen.append((what, check.limit, used, check.need, reset_after))
        if not ok:
            enforced = [d for d in adm.denials if not d.shadow]
            adm.status = 429
            waits = [d.retry_after for d in enforced]
            wait_all = max(w for w in waits if w is not None) if None not in waits else None
            adm.headers.append((b"retry-after", str(max(1, math.ceil(wait_all or 0))).encode()))
            if enforced:
                adm.headers.append((b"x-weft-ratelimit-limit", enforced[0].limit.encode()))
            self.counters.denied += 1
        else:
            minute = int(now) - int(now) % WINDOW
            adm.charges = [
                Charge(
                    key,
                    n,
                    tokens,
                    lim.shadow,
                    minute,
                    budget_window(n.budget.window, now) if n.budget is not None else None,
                )
                for lim, key, n in plan
            ]
            self.counters.allowed += 1
            if adm.denials:
                self.counters.shadow_denied += 1
        adm.headers += _remaining_headers(seen, adm.allowed)
        if adm.shadow_denied:
            names = ",".join(sorted({d.limit for d in adm.denials if d.shadow}))
            adm.headers.append((b"x-weft-ratelimit-shadow-denied", names.encode()))
        return adm

    async def charge(
        self, adm: Admission, total_tokens: int, now: float, *, final: bool = True
    ) -> bool:
        """Replace the reservation by `total_tokens` (the actual usage at the end; the
        tokens so far while a stream goes; 0 refunds it: the request failed before any
        answer and another backend will be tried). Returns whether an enforced tokens or
        budget limit is now past its value (what `onExceed: truncate` acts on)."""
        if not adm.charges:
            return False
        cur_start = int(now) - int(now) % WINDOW
        frac = (now - cur_start) / WINDOW
        op = Op([], conditional=False, now=now)
        cell = op.cell

        for c in adm.charges:
            delta = total_tokens - c.reserved
            c.reserved = total_tokens  # now, so a charge issued meanwhile counts from here
            n = c.numbers
            if n.tpm is not None:
                cur = cell((c.key + "/t", cur_start))
                prev = cell((c.key + "/t", cur_start - WINDOW))
                op.checks.append(Check((prev, cur), (1.0 - frac, 1.0), n.tpm, delta, c.shadow))
                if delta > 0:
                    op.writes.append(Write(cur, delta, cur_start + 2 * WINDOW))
                elif delta < 0:  # back out of the window the reservation went into
                    was = cell((c.key + "/t", c.minute))
                    op.writes.append(Write(was, delta, c.minute + 2 * WINDOW))
            if n.budget is not None:
                start, end = budget_window(n.budget.window, now)
                b = cell((c.key + "/b", start))
                op.checks.append(Check((b,), (1.0,), n.budget.tokens, delta, c.shadow))
                if delta > 0:
                    op.writes.append(Write(b, delta, end))
                elif delta < 0 and c.budget is not None:
                    was = cell((c.key + "/b", c.budget[0]))
                    op.writes.append(Write(was, delta, c.budget[1]))
        if final:
            self.counters.tokens_charged += total_tokens
        if not op.writes:
            return False
        store = adm.store or self.store
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._inflight.add(done)
        try:
            values, _ = await self._run(store, op, "charge")
        except StoreError:
            self.counters.store_errors += 1
            return False
        finally:
            self._inflight.discard(done)
            done.set_result(None)
        # Over when what was there plus this charge is past the limit (`passes` reads
        # `used + need > limit` as failing; need here is the charge itself).
        return any(
            not ch.shadow and ch.need > 0 and ch.used(values) + ch.need > ch.limit
            for ch in op.checks
        )


def _admit_op(
    plan: list[tuple[_Limit, str, _Numbers]], tokens: int, now: float
) -> tuple[Op, list[tuple[_Limit, str, float]], float]:
    """The store op of one admission: a check per limit and kind, the increments if they all
    pass; and for each check (limit, what, the budget window's end)."""
    cur_start = int(now) - int(now) % WINDOW
    prev_start = cur_start - WINDOW
    frac = (now - cur_start) / WINDOW
    op = Op([], now=now)
    meta: list[tuple[_Limit, str, float]] = []
    cell = op.cell

    expires = cur_start + 2 * WINDOW
    for lim, key, n in plan:
        for what, value, need, kind in (
            ("requests", n.rpm, 1, "/r"),
            ("tokens", n.tpm, tokens, "/t"),
        ):
            if value is None:
                continue
            cur, prev = cell((key + kind, cur_start)), cell((key + kind, prev_start))
            op.checks.append(Check((prev, cur), (1.0 - frac, 1.0), value, need, lim.shadow))
            meta.append((lim, what, 0.0))
            if need:
                op.writes.append(Write(cur, need, expires))
        if n.budget is not None:
            start, end = budget_window(n.budget.window, now)
            b = cell((key + "/b", start))
            op.checks.append(Check((b,), (1.0,), n.budget.tokens, tokens, lim.shadow))
            meta.append((lim, "budget", float(end)))
            if tokens:
                op.writes.append(Write(b, tokens, end))
    return op, meta, frac


def _remaining_headers(
    seen: list[tuple[str, int, float, int, float]], allowed: bool
) -> list[tuple[bytes, bytes]]:
    """OpenAI's x-ratelimit-* for the tightest requests and tokens limits (and weft's own
    for budgets). An admitted request is already counted; a denied one is not."""

    def left(s: tuple[str, int, float, int, float]) -> float:
        return s[1] - s[2] - (s[3] if allowed else 0)

    out: list[tuple[bytes, bytes]] = []
    for what, name in (("requests", b"requests"), ("tokens", b"tokens")):
        rows = [s for s in seen if s[0] == what]
        if not rows:
            continue
        tight = min(rows, key=left)
        limit, remaining, reset = tight[1], left(tight), tight[4]
        out += [
            (b"x-ratelimit-limit-" + name, str(limit).encode()),
            (b"x-ratelimit-remaining-" + name, str(max(0, math.floor(remaining))).encode()),
            (b"x-ratelimit-reset-" + name, duration_text(reset).encode()),
        ]
    budgets = [s for s in seen if s[0] == "budget"]
    if budgets:
        tight = min(budgets, key=left)
        limit, remaining, reset = tight[1], left(tight), tight[4]
        out += [
            (b"x-weft-budget-limit-tokens", str(limit).encode()),
            (b"x-weft-budget-remaining-tokens", str(max(0, math.floor(remaining))).encode()),
            (b"x-weft-budget-reset", duration_text(reset).encode()),
        ]
    return out
