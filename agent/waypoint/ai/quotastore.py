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
  `BEGIN IMMEDIATE` transaction per op), the default. An op runs on the event loop when
  the write lock is free (tens of µs, no disk sync), else on a thread of the store's own,
  so the loop never waits on another worker's lock or on a checkpoint's sync.
- `RedisStore` (agent/waypoint/ai/redisstore.py): Redis or Valkey, shared by every
  replica in the cluster; one Lua script per op (EVALSHA), so check and increment are one
  atomic step on the server.

A cell is (key, window start); a write is (cell index, delta, expires): a counter never goes
below 0, and a negative delta (a refund) on a cell that does not exist takes nothing back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

log = logging.getLogger("weft.waypoint.quota")

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


# Latency buckets of store ops, seconds: a local SQLite op takes tens of µs (plus a thread
# hop when another worker holds its lock), a Redis op a network round trip; the last
# buckets are timeouts.
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
CHECKPOINT_EVERY = 512  # ops on the loop between checkpoints (run on the store's thread)
# A WAL longer than this (pages) that passive checkpoints could not copy whole (other
# workers' writes kept landing) is copied with RESTART, which holds their writes meanwhile.
WAL_RESTART_PAGES = 8 * CHECKPOINT_EVERY
_BUSY = (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)  # primary codes (extended ones & 0xFF)


class SqliteStore:
    """Counters in one SQLite file shared by the waypoint workers of a node.

    Every op is one `BEGIN IMMEDIATE` transaction (the check and the increment under one
    write lock, so two workers can never both take the last token). WAL with
    `synchronous=NORMAL` survives a process crash (a power loss can lose the last
    transactions); budgets survive restarts.

    Where an op runs: on the event loop, through a connection that never waits (busy
    timeout 0, no automatic checkpoint), when the write lock is free: a transaction there
    is tens of µs and writes the WAL into the page cache without a sync. Handing every op
    to a thread and back cost the waypoint about 240 µs of CPU per AI request in process
    (two ops: admit and charge), the thread's own work aside. When another worker holds
    the lock, the op goes to the store's thread, which waits for it up to `busy_timeout`,
    as every op did before. The thread also runs what may sync or take long: checkpoints
    and the write that starts the WAL over after one (every CHECKPOINT_EVERY ops on the
    loop; the ops meanwhile queue behind them there, so the WAL stays bounded), sweeps of
    expired counters, and the file's creation."""

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
        self._db: sqlite3.Connection | None = None  # the thread's connection
        self._ops = 0
        self._loop_db: sqlite3.Connection | None = None  # the event loop's connection
        # A checkpoint is queued on the thread: ops go there too, behind it, until it ran.
        # Else a loop that never pauses (a waypoint at saturation) can keep the thread from
        # the GIL while the WAL grows with every op.
        self._checkpoint_due = False
        self.loop_ops = 0  # ops that ran on the loop (the rest: on the thread)
        self.closed = False
        self._closing = False

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
        got = _transact(self._open(), op)
        self._ops += 1
        if self._ops % GC_EVERY == 0:
            self.sweep(time.time() if now is None else now)
        return got

    def _checkpoint(self) -> None:
        """Copy the WAL back into the file (the thread's side: it syncs) and start it over.

        PASSIVE: other workers' writes go on meanwhile (RESTART would hold them across
        two syncs, past their busy timeout on a slow disk); this worker's ops wait behind
        it on this thread, so with no other writer it copies the WAL whole. Then one write
        here starts the WAL over: the first write after a whole copy does, and it syncs
        the new WAL header, so it must not be one of the loop's ops. A WAL that other
        writers keep from being copied whole is restarted once it passes
        WAL_RESTART_PAGES, or it would grow for good."""
        try:
            db = self._open()
            busy, log, done = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            if done < log and log > WAL_RESTART_PAGES:
                busy, log, done = db.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()
            if not busy and done == log:
                with contextlib.suppress(sqlite3.OperationalError):  # busy: a loop op pays
                    _transact(db, _restart_write())
        finally:
            self._checkpoint_due = False

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
        if self.closed or self._closing:
            raise StoreError(f"quota store {self.path} is closed")
        try:
            got = self._run_on_loop(op)
            if got is not None:
                return got
            return await asyncio.get_running_loop().run_in_executor(self._pool, self.run_now, op)
        except Exception as e:  # any failure is the store's: failOpen decides, never a 500
            raise StoreError(f"quota store {self.path}: {e}") from e

    def _run_on_loop(self, op: Op) -> tuple[list[int], bool] | None:
        """The op on the loop's connection if the write lock is free; None when it is
        not (or the file is not set up yet: the thread creates it), and the op is the
        thread's. A transaction that fails busy was rolled back: nothing was counted."""
        if self._checkpoint_due:  # ops queue behind it on the thread until it is done
            return None
        db = self._loop_db
        if db is None and self._db is None:  # the thread has not created the file yet
            return None
        try:
            if db is None:
                db = self._loop_db = self._connect_loop()
            got = _transact(db, op)
        except sqlite3.OperationalError as e:
            if (e.sqlite_errorcode & 0xFF) in _BUSY:
                return None
            raise
        n = self.loop_ops = self.loop_ops + 1
        if n % CHECKPOINT_EVERY == 0:
            self._checkpoint_due = True
            self._background(self._checkpoint)
        if n % GC_EVERY == 0:
            self._background(lambda: self.sweep(time.time()))
        return got

    def _connect_loop(self) -> sqlite3.Connection:
        # Busy timeout 0: a lock held elsewhere sends the op to the thread at once. No
        # automatic checkpoint: it would sync the file on the loop (the thread runs them).
        # check_same_thread=False: close() may run from another thread once the loop has
        # stopped using it.
        db = sqlite3.connect(self.path, timeout=0, isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA wal_autocheckpoint=0")
        except BaseException:
            db.close()
            raise
        return db

    def _background(self, fn: Callable[[], object]) -> None:
        """Run `fn` on the store's thread, not waiting for it; a failure is logged."""

        def done(f: Future[object]) -> None:
            if not f.cancelled() and (e := f.exception()) is not None:
                log.warning("quota store %s: %s failed: %s", self.path, fn, e)

        with contextlib.suppress(RuntimeError):  # shut down: the store is closing
            self._pool.submit(fn).add_done_callback(done)

    def close_now(self) -> None:
        self._closing = True  # no op opens a connection from here on

        def shut() -> None:
            if self._db is not None:
                self._db.close()
                self._db = None

        if self._loop_db is not None:
            self._loop_db.close()
            self._loop_db = None
        if not self.closed:
            self._pool.submit(shut).result()
            self.closed = True
        self._pool.shutdown(wait=True)

    async def close(self) -> None:
        # From here no op starts, and ops on the loop run whole within one turn of it, so
        # close_now may close the loop's connection from the executor's thread.
        self._closing = True
        await asyncio.get_running_loop().run_in_executor(None, self.close_now)


def _transact(db: sqlite3.Connection, op: Op) -> tuple[list[int], bool]:
    """Read op's cells, test its checks and apply its writes, in one IMMEDIATE
    transaction (rolled back if anything fails)."""
    db.execute("BEGIN IMMEDIATE")
    try:
        values = _read(db, op.cells)
        ok = passes(values, op.checks)
        if ok or not op.conditional:
            _write(db, op)
        # Inside: a COMMIT that fails busy leaves the transaction open, and it must be
        # rolled back before the op is tried again elsewhere, or it counts twice.
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    return values, ok


def _restart_write() -> Op:
    """A write that changes nothing the store reads: a counter of its own, which no
    limit's key can name (theirs are "ns/policy/limit/value/kind") and every sweep may
    take (it is expired)."""
    return Op([("_wal-restart", 0)], writes=[Write(0, 1, 0)], conditional=False)


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
