"""Where TokenRateLimit counters live: one primitive, three stores.

Every decision of agent/waypoint/ai/quota.py is a linear test over counters ("the sliding
minute's estimate plus this request's need fits under the limit"), so a store only needs one
operation, `run(op)`:

    read every cell of op -> if op.conditional, evaluate op's enforced checks on what was read
    -> if they pass (or the op is unconditional), apply op's writes -> return what was read
       and whether the writes were applied

atomically, in one round trip. The semantics (windows, headers, shadow mode) stay in
quota.py; the stores hold numbers:

- `MemoryStore`: a dict, for a single process (tests, `--quota-store memory`) and as the
  per-replica fallback of a shared store that is down.
- `SqliteStore`: one file per node shared by the waypoint workers there (WAL; one
  `BEGIN IMMEDIATE` transaction per op), run on a thread of its own so the event loop
  never waits on a disk or a lock (the default).
- `RedisStore` (agent/waypoint/ai/redisstore.py): Redis or Valkey, shared by every
  replica in the cluster; one Lua script per op (EVALSHA), so check and increment are one
  atomic step on the server.

A cell is (key, window start); a write is (cell index, delta, expires): a counter never goes
below 0, and a negative delta (a refund) on a cell that does not exist takes nothing back.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

Cell = tuple[str, int]  # counter key ("ns/policy/limit/value/kind"), window start (epoch s)


@dataclass(frozen=True, slots=True)
class Check:
    """`sum(weights[i] * value[cells[i]]) + need > limit` fails the check. Shadow checks are
    reported by quota.py but never stop the writes."""

    cells: tuple[int, ...]
    weights: tuple[float, ...]
    limit: int
    need: int
    shadow: bool

    def used(self, values: list[int]) -> float:
        used = 0.0
        for i, w in zip(self.cells, self.weights, strict=True):
            used += w * values[i]
        return used


@dataclass(frozen=True, slots=True)
class Write:
    cell: int  # index into Op.cells
    delta: int
    expires: int  # epoch seconds after which nothing reads the counter


@dataclass(slots=True)
class Op:
    cells: list[Cell]
    checks: list[Check] = field(default_factory=list)
    writes: list[Write] = field(default_factory=list)
    conditional: bool = True  # False: apply the writes whatever the checks say (charges)
    now: float = 0.0  # the decision's clock (epoch s): a write expires `expires - now` later
    _index: dict[Cell, int] = field(default_factory=dict)

    def cell(self, c: Cell) -> int:
        """The index of counter `c` in `cells`, added on first use (one read per counter)."""
        i = self._index.get(c)
        if i is None:
            i = self._index[c] = len(self.cells)
            self.cells.append(c)
        return i


def passes(values: list[int], checks: list[Check]) -> bool:
    """The enforced checks on the values read (the same arithmetic as the Lua script)."""
    return all(c.shadow or c.used(values) + c.need <= c.limit for c in checks)


# Latency buckets of store ops, seconds: a local SQLite op takes tens of µs plus a thread
# hop, a Redis op a network round trip; the last buckets are timeouts.
BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


class StoreStats:
    """Plain counters of a store's ops (the metrics collector reads them at scrape time):
    by (store, op): count, errors, latency histogram."""

    def __init__(self) -> None:
        self.ops: dict[tuple[str, str], list[float]] = {}  # bucket counts..., sum, errors

    def observe(self, store: str, op: str, seconds: float, failed: bool) -> None:
        row = self.ops.get((store, op))
        if row is None:
            row = self.ops[(store, op)] = [0.0] * (len(BUCKETS) + 3)
        for i, b in enumerate(BUCKETS):
            if seconds <= b:
                row[i] += 1
                break
        else:
            row[len(BUCKETS)] += 1  # +Inf
        row[-2] += seconds
        if failed:
            row[-1] += 1


class StoreError(Exception):
    """The store could not be read or written; quota.py applies failOpen / failClosed."""


class QuotaStore(Protocol):
    kind: str  # "memory", "sqlite", "redis": the metrics' store label
    shared: bool  # counters seen by the replicas on other nodes too
    stats: StoreStats

    async def run(self, op: Op) -> tuple[list[int], bool]: ...
    async def close(self) -> None: ...


# ---- memory --------------------------------------------------------------------------


class MemoryStore:
    """Counters in this process only."""

    kind = "memory"
    shared = False

    def __init__(self) -> None:
        self.stats = StoreStats()
        self.cells: dict[Cell, tuple[int, int]] = {}  # cell -> (value, expires)
        self._ops = 0

    def run_now(self, op: Op, now: float | None = None) -> tuple[list[int], bool]:
        cells = self.cells
        values = [cells.get(c, (0, 0))[0] for c in op.cells]
        ok = passes(values, op.checks)
        if ok or not op.conditional:
            for w in op.writes:
                c = op.cells[w.cell]
                v = cells.get(c)
                if w.delta < 0:
                    if v is not None:
                        cells[c] = (max(0, v[0] + w.delta), v[1])
                else:
                    cells[c] = ((v[0] if v else 0) + w.delta, w.expires)
        self._ops += 1
        if self._ops % 1024 == 0:
            t = int(time.time() if now is None else now)
            for c in [c for c, (_, exp) in cells.items() if exp < t]:
                del cells[c]
        return values, ok

    async def run(self, op: Op) -> tuple[list[int], bool]:
        return self.run_now(op)

    async def close(self) -> None:
        self.cells.clear()


# ---- SQLite --------------------------------------------------------------------------

_SCHEMA = """
CREATE TABLE IF NOT EXISTS counter (
    key     TEXT    NOT NULL,  -- policy / limit / key value / kind
    start   INTEGER NOT NULL,  -- window start, epoch seconds (UTC)
    value   INTEGER NOT NULL,
    expires INTEGER NOT NULL,  -- epoch seconds after which nothing reads it
    PRIMARY KEY (key, start)
) WITHOUT ROWID;
"""
GC_EVERY = 1024  # ops between sweeps of expired counters


class SqliteStore:
    """Counters in one SQLite file shared by the waypoint workers of a node.

    Every op is one `BEGIN IMMEDIATE` transaction (the check and the increment under one
    write lock, so two workers can never both take the last token), run on the store's own
    thread. WAL with `synchronous=NORMAL` survives a process crash (a power loss can lose
    the last transactions); budgets survive restarts."""

    kind = "sqlite"
    shared = False

    def __init__(
        self, path: str | Path, *, busy_timeout: float = 0.25, open_timeout: float = 5.0
    ) -> None:
        self.path = str(path)
        self.stats = StoreStats()
        self.busy_timeout = busy_timeout
        self.open_timeout = open_timeout
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="weft-quota")
        self._db: sqlite3.Connection | None = None
        self._ops = 0
        self.closed = False

    # The thread's side -----------------------------------------------------------------

    def _open(self) -> sqlite3.Connection:
        if self.closed:
            raise sqlite3.ProgrammingError(f"quota store {self.path} is closed")
        if self._db is not None:
            return self._db
        # isolation_level=None: BEGIN IMMEDIATE is ours. busy_timeout: a worker waits this
        # long for another's write lock (transactions take tens of µs).
        db = sqlite3.connect(
            self.path, timeout=self.busy_timeout, isolation_level=None, check_same_thread=False
        )
        # Replicas on one node start (and see a new token policy) together, so several may
        # create the file at once; switching to WAL needs an exclusive lock and does not
        # wait on the busy timeout. Setup happens once, on this thread: retry it for up to
        # open_timeout.
        deadline = time.monotonic() + self.open_timeout
        delay = 0.01
        while True:
            try:
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=NORMAL")
                db.executescript(_SCHEMA)
                break
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or time.monotonic() + delay > deadline:
                    db.close()
                    raise sqlite3.OperationalError(
                        f"quota store {self.path}: {e} (another waypoint replica held it "
                        f"for {self.open_timeout:g}s)"
                    ) from e
                time.sleep(delay)  # on the store's thread, never the event loop
                delay = min(delay * 2, 0.2)
        self._db = db
        return db

    def run_now(self, op: Op, now: float | None = None) -> tuple[list[int], bool]:
        """The op, on the calling thread (the store's thread, or a test's)."""
        db = self._open()
        db.execute("BEGIN IMMEDIATE")
        try:
            values = _read(db, op.cells)
            ok = passes(values, op.checks)
            if ok or not op.conditional:
                _write(db, op)
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        self._ops += 1
        if self._ops % GC_EVERY == 0:
            self.sweep(time.time() if now is None else now)
        return values, ok

    def sweep(self, now: float) -> int:
        """Delete counters no window reads any more; returns how many."""
        cur = self._open().execute("DELETE FROM counter WHERE expires < ?", (int(now),))
        return cur.rowcount

    def value(self, key: str, start: int) -> int:
        row = (
            self._open()
            .execute("SELECT value FROM counter WHERE key = ? AND start = ?", (key, start))
            .fetchone()
        )
        return int(row[0]) if row else 0

    # The loop's side -------------------------------------------------------------------

    def open(self) -> None:
        """Open (and create) the file now, on the calling thread: start-up, not a request."""
        self._pool.submit(self._open).result()

    async def run(self, op: Op) -> tuple[list[int], bool]:
        if self.closed:
            raise StoreError(f"quota store {self.path} is closed")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._pool, self.run_now, op)
        except Exception as e:  # any failure is the store's: failOpen decides, never a 500
            raise StoreError(f"quota store {self.path}: {e}") from e

    def close_now(self) -> None:
        def shut() -> None:
            if self._db is not None:
                self._db.close()
                self._db = None

        if not self.closed:
            self._pool.submit(shut).result()
            self.closed = True
        self._pool.shutdown(wait=True)

    async def close(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.close_now)


def _read(db: sqlite3.Connection, cells: list[Cell]) -> list[int]:
    if not cells:
        return []
    marks = ",".join("(?,?)" for _ in cells)
    args = [x for c in cells for x in c]
    rows = db.execute(
        f"SELECT key, start, value FROM counter WHERE (key, start) IN (VALUES {marks})", args
    ).fetchall()
    got = {(k, s): v for k, s, v in rows}
    return [int(got.get(c, 0)) for c in cells]


def _write(db: sqlite3.Connection, op: Op) -> None:
    up = []
    down = []
    for w in op.writes:
        key, start = op.cells[w.cell]
        if w.delta >= 0:
            up.append((key, start, w.delta, w.expires))
        else:
            down.append((w.delta, key, start))
    if up:
        db.executemany(
            "INSERT INTO counter (key, start, value, expires) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (key, start) DO UPDATE SET value = value + excluded.value",
            up,
        )
    if down:
        db.executemany(
            "UPDATE counter SET value = max(0, value + ?) WHERE key = ? AND start = ?", down
        )


# ---- choosing one --------------------------------------------------------------------


def store_kind(spec: str) -> str:
    """ "memory", "sqlite" or "redis" for a `--quota-store` value; ValueError names a bad
    one."""
    if spec in ("memory", ":memory:"):
        return "memory"
    scheme = spec.split("://", 1)[0] if "://" in spec else ""
    if scheme in ("redis", "rediss", "valkey", "valkeys", "unix"):
        return "redis"
    if scheme in ("", "sqlite") and spec.removeprefix("sqlite://"):
        return "sqlite"
    raise ValueError(
        f"quota store {spec!r}: use memory, a file path, sqlite:///PATH, "
        "redis://HOST:PORT[/DB] or rediss://HOST:PORT (TLS)"
    )


def open_store(spec: str) -> QuotaStore:
    """`memory`, a path to an SQLite file (or `sqlite:///path`), or `redis://...` /
    `rediss://...` / `valkey://...` (the Redis client's URL, database and password
    included)."""
    kind = store_kind(spec)
    if kind == "memory":
        return MemoryStore()
    if kind == "redis":
        from agent.waypoint.ai.redisstore import RedisStore  # the client only when used

        return RedisStore(spec)
    p = Path(spec.removeprefix("sqlite://"))
    p.parent.mkdir(parents=True, exist_ok=True)
    return SqliteStore(p)
