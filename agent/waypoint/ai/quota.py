"""Token and request rate limits and token budgets (TokenRateLimit), held in total across
every waypoint worker on a node.

Semantics (docs/ai-traffic.md says the same for users):

- **Admit, then charge.** `admit` runs before the request goes upstream: it checks every
  limit that applies and, if all allow, counts the request and *reserves* the prompt's
  token estimate. `charge` runs when the response is over and replaces the reservation by
  the backend's actual `usage.total_tokens`. A denied request is answered 429 with
  `retry-after` and OpenAI's `x-ratelimit-*` headers and is not counted.
- **A started stream is never cut.** It finishes and is charged, which can take a counter
  past its limit. The overshoot of one window is bounded by what the requests admitted
  while there was room go on to use beyond their reservation: at most the sum, over the
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

The store is one SQLite file per node (`QuotaStore`), opened by every worker: WAL mode so
readers never wait for the writer, each admit or charge one short `BEGIN IMMEDIATE`
transaction (the check and the increment happen under one write lock, so two workers can
never both take the last token). `synchronous=NORMAL` in WAL survives a process crash (a
power loss can lose the last transactions); budgets survive restarts. A store error admits
(`failOpen`, the default) or denies with 503, as the policy says.
"""

from __future__ import annotations

import calendar
import math
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from agent.waypoint.ai.facts import Predicate, RequestFacts, compile_match
from controller.model.ai import Budget, TokenLimit, TokenRateLimit

WINDOW = 60  # seconds; the per-minute limits
GC_EVERY = 1024  # transactions between sweeps of expired counters

_SCHEMA = """
CREATE TABLE IF NOT EXISTS counter (
    key     TEXT    NOT NULL,  -- policy / limit / kind / key value
    start   INTEGER NOT NULL,  -- window start, epoch seconds (UTC)
    value   INTEGER NOT NULL,
    expires INTEGER NOT NULL,  -- epoch seconds after which nothing reads it
    PRIMARY KEY (key, start)
) WITHOUT ROWID;
"""


class QuotaStore:
    """Counters in one SQLite file shared by the waypoint workers of a node.

    `path` may be ":memory:" for a single process (tests)."""

    def __init__(
        self, path: str | Path, *, busy_timeout: float = 0.25, open_timeout: float = 5.0
    ) -> None:
        # isolation_level=None: we issue BEGIN IMMEDIATE ourselves. busy_timeout: a worker
        # waits this long for another's write lock (transactions take tens of µs).
        self.db = sqlite3.connect(str(path), timeout=busy_timeout, isolation_level=None)
        # Replicas on one node start (and see a new token policy) together, so several may
        # create the file at once; switching to WAL needs an exclusive lock and does not
        # wait on the busy timeout. Setup happens once: retry it for up to open_timeout.
        deadline = time.monotonic() + open_timeout
        delay = 0.01
        while True:
            try:
                self.db.execute("PRAGMA journal_mode=WAL")
                self.db.execute("PRAGMA synchronous=NORMAL")
                self.db.executescript(_SCHEMA)
                break
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or time.monotonic() + delay > deadline:
                    self.db.close()
                    raise sqlite3.OperationalError(
                        f"quota store {path}: {e} (another waypoint replica held it for "
                        f"{open_timeout:g}s)"
                    ) from e
                time.sleep(delay)
                delay = min(delay * 2, 0.2)
        self._ops = 0

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def transaction(self) -> Iterator[_Tx]:
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            yield _Tx(db)
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def tick(self, now: float) -> None:
        """Count one operation; every GC_EVERY, sweep expired counters."""
        self._ops += 1
        if self._ops % GC_EVERY == 0:
            self.sweep(now)

    def sweep(self, now: float) -> int:
        """Delete counters no window reads any more; returns how many."""
        cur = self.db.execute("DELETE FROM counter WHERE expires < ?", (int(now),))
        return cur.rowcount

    def value(self, key: str, start: int) -> int:
        row = self.db.execute(
            "SELECT value FROM counter WHERE key = ? AND start = ?", (key, start)
        ).fetchone()
        return int(row[0]) if row else 0


class _Tx:
    __slots__ = ("db",)

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def get(self, cells: list[tuple[str, int]]) -> dict[tuple[str, int], int]:
        if not cells:
            return {}
        marks = ",".join("(?,?)" for _ in cells)
        args = [x for c in cells for x in c]
        rows = self.db.execute(
            f"SELECT key, start, value FROM counter WHERE (key, start) IN (VALUES {marks})", args
        ).fetchall()
        return {(k, s): v for k, s, v in rows}

    def add(self, cells: list[tuple[str, int, int, int]]) -> None:
        """(key, start, delta, expires) each; a counter never goes below 0, and a negative
        delta (a refund) on a window with no counter is nothing to take back."""
        up = [c for c in cells if c[2] >= 0]
        down = [(c[2], c[0], c[1]) for c in cells if c[2] < 0]
        if up:
            self.db.executemany(
                "INSERT INTO counter (key, start, value, expires) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (key, start) DO UPDATE SET value = value + excluded.value",
                up,
            )
        if down:
            self.db.executemany(
                "UPDATE counter SET value = max(0, value + ?) WHERE key = ? AND start = ?", down
            )


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
            return r.model or "-"
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
    tokens_charged: int = 0


class TokenLimiter:
    """The compiled limits of one TokenRateLimit, over a shared store."""

    def __init__(self, policy: TokenRateLimit, store: QuotaStore) -> None:
        spec = policy.spec
        self.name = f"{policy.namespace}/{policy.name}"
        self.store = store
        self.fail_open = spec.fail_open
        self.limits = [_Limit(self.name, lim, spec.shadow) for lim in spec.limits]
        self.counters = LimitCounters()

    def admit(self, r: RequestFacts, tokens: int, now: float) -> Admission:
        """Admit one request that is about to reserve `tokens` (the prompt estimate)."""
        plan: list[tuple[_Limit, str, _Numbers]] = []
        for lim in self.limits:
            if lim.matches(r):
                v = lim.key_value(r)
                plan.append((lim, lim.prefix + v, lim.overrides.get(v, lim.numbers)))
        if not plan:
            return Admission(True)
        try:
            return self._admit(plan, tokens, now)
        except sqlite3.Error as e:
            self.counters.store_errors += 1
            if self.fail_open:
                return Admission(True, store_error=str(e))
            return Admission(False, 503, store_error=str(e))

    def _admit(
        self, plan: list[tuple[_Limit, str, _Numbers]], tokens: int, now: float
    ) -> Admission:
        cur_start = int(now) - int(now) % WINDOW
        prev_start = cur_start - WINDOW
        frac = (now - cur_start) / WINDOW
        cells: list[tuple[str, int]] = []
        for _, key, n in plan:
            if n.rpm is not None:
                cells += [(key + "/r", cur_start), (key + "/r", prev_start)]
            if n.tpm is not None:
                cells += [(key + "/t", cur_start), (key + "/t", prev_start)]
            if n.budget is not None:
                cells.append((key + "/b", budget_window(n.budget.window, now)[0]))
        adm = Admission(True)
        with self.store.transaction() as tx:
            got = tx.get(cells)
            # (what, limit value, used before this request, this request's need, reset)
            seen: list[tuple[str, int, float, int, float]] = []
            for lim, key, n in plan:
                for what, lim_value, need, kind in (
                    ("requests", n.rpm, 1, "/r"),
                    ("tokens", n.tpm, tokens, "/t"),
                ):
                    if lim_value is None:
                        continue
                    prev = got.get((key + kind, prev_start), 0)
                    cur = got.get((key + kind, cur_start), 0)
                    used = sliding(prev, cur, frac)
                    if used + need > lim_value:
                        wait = wait_for_room(prev, cur, frac, lim_value, need)
                        adm.denials.append(Denial(lim.prefix[:-1], what, wait, lim.shadow))
                    seen.append((what, lim_value, used, need, reset_in(prev, cur, frac)))
                if n.budget is not None:
                    start, end = budget_window(n.budget.window, now)
                    used_b = got.get((key + "/b", start), 0)
                    if used_b + tokens > n.budget.tokens:
                        wait_b = end - now if tokens <= n.budget.tokens else None
                        adm.denials.append(Denial(lim.prefix[:-1], "budget", wait_b, lim.shadow))
                    seen.append(("budget", n.budget.tokens, used_b, tokens, end - now))
            enforced = [d for d in adm.denials if not d.shadow]
            if enforced:
                adm.allowed, adm.status = False, 429
                waits = [d.retry_after for d in enforced]
                wait = max(w for w in waits if w is not None) if None not in waits else None
                adm.headers.append((b"retry-after", str(max(1, math.ceil(wait or 0))).encode()))
                adm.headers.append((b"x-weft-ratelimit-limit", enforced[0].limit.encode()))
                self.counters.denied += 1
            else:
                writes: list[tuple[str, int, int, int]] = []
                for _, key, n in plan:
                    if n.rpm is not None:
                        writes.append((key + "/r", cur_start, 1, cur_start + 2 * WINDOW))
                    if n.tpm is not None and tokens:
                        writes.append((key + "/t", cur_start, tokens, cur_start + 2 * WINDOW))
                    if n.budget is not None and tokens:
                        start, end = budget_window(n.budget.window, now)
                        writes.append((key + "/b", start, tokens, end))
                    adm.charges.append(Charge(key, n, tokens))
                tx.add(writes)
                self.counters.allowed += 1
                if adm.denials:
                    self.counters.shadow_denied += 1
        self.store.tick(now)
        adm.headers += _remaining_headers(seen, adm.allowed)
        if adm.shadow_denied:
            names = ",".join(sorted({d.limit for d in adm.denials if d.shadow}))
            adm.headers.append((b"x-weft-ratelimit-shadow-denied", names.encode()))
        return adm

    def charge(self, adm: Admission, total_tokens: int, now: float) -> None:
        """Replace the reservation by the actual tokens (0 refunds it: the request failed
        before any answer and another backend will be tried)."""
        if not adm.charges:
            return
        cur_start = int(now) - int(now) % WINDOW
        writes: list[tuple[str, int, int, int]] = []
        for c in adm.charges:
            delta = total_tokens - c.reserved
            if delta == 0:
                continue
            n = c.numbers
            if n.tpm is not None:
                writes.append((c.key + "/t", cur_start, delta, cur_start + 2 * WINDOW))
            if n.budget is not None:
                start, end = budget_window(n.budget.window, now)
                writes.append((c.key + "/b", start, delta, end))
            c.reserved = total_tokens
        self.counters.tokens_charged += total_tokens
        if not writes:
            return
        try:
            with self.store.transaction() as tx:
                tx.add(writes)
            self.store.tick(now)
        except sqlite3.Error:
            self.counters.store_errors += 1


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
