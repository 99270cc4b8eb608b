"""Token rate limits and budgets (TokenRateLimit): per caller, shared by workers, charged at
the end of a stream, shadow mode, OpenAI's headers. The clock is injected: `now` values.

The semantic tests run on each store (memory, SQLite, a real redis-server): one decision,
three places to keep the numbers."""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.waypoint.ai.facts import RequestFacts
from agent.waypoint.ai.quota import (
    TokenLimiter,
    budget_window,
    duration_text,
    safe_key,
    wait_for_room,
)
from agent.waypoint.ai.quotastore import (
    MemoryStore,
    Op,
    QuotaStore,
    SqliteStore,
    StoreError,
    open_store,
)
from agent.waypoint.codec.headers import Headers
from controller.model.ai import TokenRateLimit
from tests.redis_server import RedisServer

T0 = 1_700_000_040.0  # a minute boundary


def policy(*limits: dict[str, Any], shadow: bool = False, **spec: Any) -> TokenRateLimit:
    return TokenRateLimit.model_validate(
        {
            "apiVersion": "weft.dev/v1alpha1",
            "kind": "TokenRateLimit",
            "metadata": {"name": "tokens", "namespace": "ai"},
            "spec": {
                "targetRefs": [{"name": "llm"}],
                "limits": list(limits),
                "shadow": shadow,
                **spec,
            },
        }
    )


def caller(name: str, model: str = "llama", **headers: str) -> RequestFacts:
    return RequestFacts(
        f"spiffe://td/ns/team-{name}/sa/{name}",
        f"team-{name}",
        model,
        "/v1/chat/completions",
        Headers.of(*headers.items()),
    )


class Loop:
    """The event loop the store ops of a test run on (a Redis client's connections belong
    to one loop)."""

    current: asyncio.AbstractEventLoop | None = None


@pytest.fixture(autouse=True)
def _loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = Loop.current = asyncio.new_event_loop()
    try:
        yield loop
    finally:
        loop.close()
        Loop.current = None


def sync(coro: Any) -> Any:
    assert Loop.current is not None
    return Loop.current.run_until_complete(coro)


class Limiter:
    """A TokenLimiter driven from a synchronous test."""

    def __init__(self, p: TokenRateLimit, store: QuotaStore) -> None:
        self.lim = TokenLimiter(p, store)
        self.counters = self.lim.counters

    def admit(self, *a: Any) -> Any:
        return sync(self.lim.admit(*a))

    def charge(self, *a: Any, **k: Any) -> bool:
        return bool(sync(self.lim.charge(*a, **k)))


def value(store: QuotaStore, key: str, start: int) -> int:
    """A counter as the store holds it (an op that reads one cell and writes nothing)."""
    values, _ = sync(store.run(Op([(key, start)], conditional=False, now=start)))
    return int(values[0])


def run(lim: Limiter, who: RequestFacts, tokens: int, now: float, used: int) -> bool:
    """One request: admit with its estimate, charge what it used; whether it was admitted."""
    adm = lim.admit(who, tokens, now)
    if adm.allowed:
        lim.charge(adm, used, now + 0.5)
    return adm.allowed


def hdr(adm: Any) -> dict[bytes, bytes]:
    return dict(adm.headers)


def redis_store(url: str) -> QuotaStore:
    """The store open_store makes of a redis:// URL, with a generous op timeout: the
    default 0.25 s (how long a waypoint waits before it falls back to its own counters) can
    pass on a loaded machine, and these tests count admissions made through the store."""
    from agent.waypoint.ai.redisstore import RedisStore

    return RedisStore(url, timeout=10.0)


PER_CALLER = {"name": "per-caller", "by": "principal", "tokensPerMinute": 1000}


@pytest.mark.parametrize("scheme", ["redis", "rediss", "valkey"])
def test_open_store_makes_a_redis_store_of_a_redis_url(scheme: str) -> None:
    """The waypoint's --quota-store spellings of a shared store: the Redis client's URL,
    database and password included, with the waypoint's short op timeout (past it, the
    waypoint falls back to its own counters). Nothing connects until an operation."""
    from agent.waypoint.ai.redisstore import RedisStore

    st = open_store(f"{scheme}://:secret@127.0.0.1:6390/3")
    assert isinstance(st, RedisStore)
    assert st.url == f"{scheme}://:secret@127.0.0.1:6390/3"
    assert st.timeout == 0.25
    kw = st.client.connection_pool.connection_kwargs
    assert (kw["host"], kw["port"], kw["db"], kw["password"]) == ("127.0.0.1", 6390, 3, "secret")
    tls = st.client.connection_pool.connection_class.__name__ == "SSLConnection"
    assert tls == (scheme == "rediss")


@pytest.fixture(params=["memory", "sqlite", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[QuotaStore]:
    if request.param == "redis":
        srv: RedisServer = request.getfixturevalue("redis_server")
        st = redis_store(srv.url)
    elif request.param == "sqlite":
        st = open_store(str(tmp_path / "quota.db"))
    else:
        st = open_store("memory")
    try:
        yield st
    finally:
        sync(st.close())


def test_a_caller_over_its_tokens_per_minute_gets_429_while_another_succeeds(store):
    lim = Limiter(policy(PER_CALLER), store)
    alice, bob = caller("alice"), caller("bob")
    for i in range(4):
        assert run(lim, alice, 10, T0 + i, used=300)  # 1200 charged: over by one request
    adm = lim.admit(alice, 10, T0 + 5)
    assert not adm.allowed and adm.status == 429
    h = hdr(adm)
    assert int(h[b"retry-after"]) >= 1
    assert h[b"x-ratelimit-limit-tokens"] == b"1000"
    assert h[b"x-ratelimit-remaining-tokens"] == b"0"
    assert h[b"x-weft-ratelimit-limit"] == b"ai/tokens/per-caller"
    assert "per-caller" in adm.message()
    ok = lim.admit(bob, 10, T0 + 5)
    assert ok.allowed and hdr(ok)[b"x-ratelimit-remaining-tokens"] == b"990"


def test_the_sliding_window_frees_room_as_the_last_minute_moves_on(store):
    lim = Limiter(policy(PER_CALLER), store)
    alice = caller("alice")
    assert run(lim, alice, 10, T0 + 1, used=1000)
    assert not lim.admit(alice, 10, T0 + 30).allowed  # the whole 1000 is in this minute
    # 90 s later, 30 s into the next minute: the old minute weighs (1 - 0.5) -> 500 used.
    assert lim.admit(alice, 400, T0 + 90).allowed
    assert not lim.admit(alice, 200, T0 + 90).allowed  # 500 + 400 + 200 > 1000


def test_retry_after_is_when_the_window_has_room_again():
    # 1000 used this minute, at 0% into it: room for 100 comes when it has faded to 900,
    # i.e. 10% into the next minute: 60 s + 6 s.
    assert wait_for_room(0, 1000, 0.0, 1000, 100) == pytest.approx(66.0)
    assert wait_for_room(1000, 0, 0.5, 1000, 100) == pytest.approx(0.0)
    assert wait_for_room(1000, 200, 0.0, 1000, 100) == pytest.approx(18.0)
    assert wait_for_room(0, 0, 0.0, 1000, 2000) is None  # never fits
    assert duration_text(0.25) == "250ms" and duration_text(361) == "6m1s"


def test_requests_per_minute_count_requests_not_tokens(store):
    lim = Limiter(policy({"name": "rpm", "by": "namespace", "requestsPerMinute": 3}), store)
    a, b = caller("a"), caller("b")
    assert [run(lim, a, 0, T0 + i, used=10_000) for i in range(4)] == [True, True, True, False]
    adm = lim.admit(b, 0, T0 + 4)
    assert adm.allowed and hdr(adm)[b"x-ratelimit-remaining-requests"] == b"2"


def test_two_workers_on_one_store_file_share_one_limit(tmp_path):
    p = policy({"name": "all", "by": "none", "requestsPerMinute": 10})
    w1 = Limiter(p, SqliteStore(tmp_path / "q.db"))
    w2 = Limiter(p, SqliteStore(tmp_path / "q.db"))
    admitted = [(w1 if i % 2 else w2).admit(caller("x"), 0, T0 + 1).allowed for i in range(16)]
    assert admitted.count(True) == 10


def _worker(path: str, n: int, start: Any, out: Any) -> None:
    Loop.current = asyncio.new_event_loop()  # the child's own, not a copy of the parent's
    p = policy({"name": "all", "by": "none", "tokensPerMinute": 500})
    # A generous busy timeout: the other process may hold the write lock for longer than
    # the default 0.25 s on a loaded machine, and a failed op would fall back to this
    # process's own counters (not what is tested here: that the lock makes one count).
    lim = Limiter(p, SqliteStore(path, busy_timeout=10.0))
    start.wait(10)
    got = 0
    for _ in range(n):
        adm = lim.admit(caller("x"), 5, T0 + 1)
        if adm.allowed:
            got += 1
            lim.charge(adm, 5, T0 + 1)
    out.put(got)


def test_two_worker_processes_never_admit_more_than_the_limit_together(tmp_path):
    """Check and increment are one IMMEDIATE transaction: the last token is taken once."""
    ctx = multiprocessing.get_context("fork")
    q, start = ctx.Queue(), ctx.Barrier(2)
    path = str(tmp_path / "q.db")
    st = SqliteStore(path)
    st.open()  # create the schema before they race
    st.close_now()
    procs = [ctx.Process(target=_worker, args=(path, 150, start, q)) for _ in range(2)]
    for pr in procs:
        pr.start()
    counts = [q.get(timeout=30) for _ in procs]
    for pr in procs:
        pr.join(30)
    assert sum(counts) == 100  # 300 tries of 5 tokens at 500 per minute


def _opener(path: str, start: Any, out: Any) -> None:
    start.wait()
    try:
        st = SqliteStore(path)
        st.open()  # creates the file and switches it to WAL, racing the others
        st.close_now()
        out.put("ok")
    except Exception as e:  # reported to the test, which names it
        out.put(repr(e))


def test_replicas_creating_the_store_file_at_once_all_open_it(tmp_path):
    """Waypoint replicas of a node see a new token policy together and open the shared file
    at the same moment; switching a new file to WAL takes an exclusive lock that the busy
    timeout does not cover. Every one of them must get the store."""
    ctx = multiprocessing.get_context("fork")
    for round_ in range(5):
        q, start = ctx.Queue(), ctx.Barrier(6)
        path = str(tmp_path / f"race-{round_}.db")
        procs = [ctx.Process(target=_opener, args=(path, start, q)) for _ in range(6)]
        for pr in procs:
            pr.start()
        results = [q.get(timeout=30) for _ in procs]
        for pr in procs:
            pr.join(30)
        assert results == ["ok"] * 6, results


@contextlib.contextmanager
def held(path: Path, *statements: str, release: str, after: float) -> Iterator[Any]:
    """Another connection to `path` runs `statements` (taking a lock) and, `after` seconds
    later on a thread, `release`; yields the threading.Event set once released."""
    import sqlite3
    import threading

    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    for sql in statements:
        holder.execute(sql)
    released = threading.Event()

    def let_go() -> None:
        holder.execute(release)
        released.set()

    timer = threading.Timer(after, let_go)
    timer.start()
    try:
        yield released
    finally:
        timer.cancel()
        holder.close()


def test_opening_a_store_another_replica_holds_locked_waits_for_the_lock(tmp_path):
    """The race above, made certain: another connection holds the new file's exclusive
    lock while this replica switches it to WAL (the lock the busy timeout does not cover).
    Opening retries until the lock is released instead of failing; with the lock held past
    open_timeout it fails, naming the file."""
    import sqlite3

    path = tmp_path / "locked.db"
    # A file the holder has written, then locks.
    with held(path, "CREATE TABLE t (x)", "BEGIN EXCLUSIVE", release="ROLLBACK", after=0.5) as r:
        st = SqliteStore(path, busy_timeout=0.01, open_timeout=30.0)
        st.open()
        assert r.is_set()  # it waited for the lock rather than going around it
        st.close_now()
    path2 = tmp_path / "held.db"
    holder2 = sqlite3.connect(path2, isolation_level=None)
    try:
        holder2.execute("CREATE TABLE t (x)")
        holder2.execute("BEGIN EXCLUSIVE")
        st2 = SqliteStore(path2, busy_timeout=0.01, open_timeout=0.2)
        with pytest.raises(sqlite3.OperationalError, match=r"held\.db"):
            st2.open()
    finally:
        holder2.close()


def _count(key: str, limit: int = 1_000_000) -> Op:
    """An op taking one unit of counter `key` while it is under `limit`."""
    from agent.waypoint.ai.quotastore import Check, Write

    op = Op([], now=T0)
    i = op.cell((key, int(T0)))
    op.checks.append(Check((i,), (1.0,), limit, 1, False))
    op.writes.append(Write(i, 1, 4_000_000_000))  # never swept (sweeps use the clock)
    return op


def test_sqlite_ops_run_on_the_event_loop_while_the_write_lock_is_free(tmp_path):
    """No thread round trip per op (it cost the waypoint about 240 µs of CPU per AI
    request): once the thread has created the file, ops commit on the loop's connection,
    and what they count is what the thread's connection and another process read."""
    import threading

    st = SqliteStore(tmp_path / "q.db")
    seen: set[int] = set()

    async def ops() -> None:
        for _ in range(20):
            await st.run(_count("k"))
            seen.add(threading.get_ident())

    sync(ops())
    assert st.loop_ops == 19  # the first one created the file, on the store's thread
    assert seen == {threading.get_ident()}
    other = SqliteStore(tmp_path / "q.db")
    assert value(other, "k", int(T0)) == 20
    sync(other.close())
    sync(st.close())


def test_a_write_lock_held_elsewhere_sends_the_op_to_the_thread_not_the_loop(tmp_path):
    """Another worker holds the write lock: the loop's connection gives up at once (busy
    timeout 0) and the op waits for the lock on the store's thread. The loop goes on
    meanwhile, and the op is counted once, after the lock is released."""
    import sqlite3

    path = tmp_path / "q.db"
    st = SqliteStore(path, busy_timeout=10.0)
    sync(st.run(_count("k")))  # the thread creates the file
    sync(st.run(_count("k")))  # on the loop
    assert st.loop_ops == 1
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")
    released = False

    async def ticker() -> None:
        # The loop goes on while the op waits for the lock on the store's thread; after
        # ten of its turns the other worker lets the lock go.
        nonlocal released
        for _ in range(10):
            await asyncio.sleep(0.01)
        holder.execute("COMMIT")
        released = True

    async def both() -> tuple[list[int], bool]:
        t = asyncio.get_running_loop().create_task(ticker())
        got = await st.run(_count("k"))
        assert released  # it waited for the lock rather than going around it
        await t
        return got

    try:
        values, ok = sync(both())
    finally:
        holder.close()
    assert ok and values == [2]
    assert st.loop_ops == 1  # the op went to the thread
    sync(st.run(_count("k")))  # the lock is free again: back on the loop
    assert st.loop_ops == 2
    assert value(st, "k", int(T0)) == 4
    sync(st.close())


def test_the_wal_of_ops_on_the_loop_is_checkpointed_and_stays_bounded(tmp_path):
    """The loop's connection never checkpoints (that would sync the file on the loop): the
    store's thread does, every CHECKPOINT_EVERY ops, so the WAL starts over instead of
    growing with every op, even on a loop that never pauses (the ops wait behind the
    checkpoint on the thread)."""
    from agent.waypoint.ai.quotastore import CHECKPOINT_EVERY

    path = tmp_path / "q.db"
    st = SqliteStore(path)
    wal = Path(f"{path}-wal")
    n = 6 * CHECKPOINT_EVERY

    async def ops() -> None:
        for i in range(n):
            await st.run(_count(f"k{i % 50}"))

    sync(ops())
    st._pool.submit(int).result()  # what the thread has queued (the last checkpoint) is done
    # Most ran on the loop (one after each checkpoint was queued went to the thread).
    assert st.loop_ops > 0.9 * n
    # Each op appends a page or two (4 KB each); without checkpoints the WAL would hold
    # all of them (about 6 x CHECKPOINT_EVERY pages).
    pages = wal.stat().st_size // 4096 if wal.exists() else 0
    assert pages < 2 * CHECKPOINT_EVERY, f"WAL of {pages} pages after {n} ops"
    sync(st.close())
    again = SqliteStore(path)
    assert sum(value(again, f"k{i}", int(T0)) for i in range(50)) == n
    sync(again.close())


def _wal_salt(path: Path) -> bytes:
    with open(f"{path}-wal", "rb") as f:
        return f.read(32)[16:24]  # salt-1, salt-2: new ones each time the WAL starts over


def test_the_wal_never_starts_over_on_the_loop(tmp_path):
    """Starting the WAL over writes a new header and syncs it (even with
    synchronous=NORMAL; the directory too, on that descriptor's first sync): the store's
    thread does it, with a write of its own after each checkpoint, so the loop's next op
    (after a checkpoint it was idle for) appends to the WAL rather than starting it over."""
    from agent.waypoint.ai.quotastore import CHECKPOINT_EVERY

    path = tmp_path / "q.db"

    async def main() -> None:
        st = SqliteStore(path)
        for i in range(CHECKPOINT_EVERY + 1):  # the first on the thread, then 512 on the loop
            await st.run(_count(f"k{i % 50}"))
        await asyncio.get_running_loop().run_in_executor(st._pool, int)  # checkpoint done
        before, ops = _wal_salt(path), st.loop_ops
        await st.run(_count("k"))  # the next request
        assert st.loop_ops == ops + 1  # it ran on the loop
        assert _wal_salt(path) == before, "the loop's op started the WAL over (and synced it)"
        await st.close()

    asyncio.run(main())


def test_ops_racing_close_leave_no_connection_open(tmp_path):
    """Ops go on while the store closes: they fail as closed, and none opens a connection
    that nothing closes (close() drops the loop's connection, then waits for the thread)."""
    import os

    path = tmp_path / "q.db"

    async def main() -> None:
        st = SqliteStore(path)
        for _ in range(3):
            await st.run(_count("k"))
        stop = False

        async def ops() -> None:
            while not stop:
                try:
                    await st.run(_count("k"))
                except StoreError:
                    return
                await asyncio.sleep(0)

        t = asyncio.create_task(ops())
        await asyncio.sleep(0.01)
        await st.close()
        stop = True
        await t
        assert st.closed and st._loop_db is None
        fds = []
        for f in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):  # the listing's own descriptor
                fds.append(os.readlink(f"/proc/self/fd/{f}"))
        assert not [f for f in fds if f.startswith(str(path))]

    asyncio.run(main())


def test_a_commit_that_fails_busy_is_rolled_back_and_counted_once(tmp_path, monkeypatch):
    """A COMMIT that fails busy leaves its transaction open (SQLite documents it): the
    loop's attempt is rolled back before the thread does the op, or the loop's connection
    keeps the write lock (every worker's ops fail from then on) and the op could count
    twice."""
    import sqlite3

    class CommitBusyOnce(sqlite3.Connection):
        fail = True

        def execute(self, sql: str, *a: Any) -> sqlite3.Cursor:  # type: ignore[override]
            if sql == "COMMIT" and CommitBusyOnce.fail:
                CommitBusyOnce.fail = False
                e = sqlite3.OperationalError("database is locked")
                e.sqlite_errorcode = sqlite3.SQLITE_BUSY  # type: ignore[misc]
                raise e
            return super().execute(sql, *a)

    def connect_loop(self: SqliteStore) -> sqlite3.Connection:
        db = sqlite3.connect(
            self.path,
            timeout=0,
            isolation_level=None,
            check_same_thread=False,
            factory=CommitBusyOnce,
        )
        db.execute("PRAGMA wal_autocheckpoint=0")
        return db

    monkeypatch.setattr(SqliteStore, "_connect_loop", connect_loop)

    async def main() -> None:
        st = SqliteStore(tmp_path / "q.db", busy_timeout=1.0)
        await st.run(_count("k"))  # the thread creates the file
        values, ok = await st.run(_count("k"))  # COMMIT fails busy on the loop: the thread's
        assert ok and values == [1]
        assert st._loop_db is not None and not st._loop_db.in_transaction
        values, ok = await st.run(_count("k"))  # and the loop goes on
        assert ok and values == [2]
        assert st.loop_ops == 1
        await st.close()

    asyncio.run(main())


def test_a_stream_over_budget_finishes_and_is_charged_in_full(store):
    """Admission reserves the prompt estimate; the end charges the actual usage, even past
    the limit (the stream was never cut), and the overshoot blocks the next request."""
    lim = Limiter(policy(PER_CALLER), store)
    alice = caller("alice")
    adm = lim.admit(alice, 50, T0 + 1)
    assert adm.allowed
    key = "ai/tokens/per-caller/" + safe_key(alice.principal) + "/t"
    assert value(store, key, int(T0)) == 50
    lim.charge(adm, 1800, T0 + 20)  # a long stream: 1800 tokens, 800 over the limit
    assert value(store, key, int(T0)) == 1800
    assert not lim.admit(alice, 1, T0 + 21).allowed
    assert lim.counters.tokens_charged == 1800


def test_a_refund_takes_back_the_reservation_but_not_the_request(store):
    lim = Limiter(
        policy({"name": "l", "by": "principal", "tokensPerMinute": 100, "requestsPerMinute": 5}),
        store,
    )
    alice = caller("alice")
    adm = lim.admit(alice, 90, T0)
    lim.charge(adm, 0, T0 + 1)  # the backend failed; a fallback will be tried
    again = lim.admit(alice, 90, T0 + 2)
    assert again.allowed and hdr(again)[b"x-ratelimit-remaining-requests"] == b"3"


def test_shadow_mode_counts_and_reports_but_never_blocks(store):
    lim = Limiter(policy(PER_CALLER, shadow=True), store)
    alice = caller("alice")
    results = [lim.admit(alice, 400, T0 + i) for i in range(4)]
    assert all(a.allowed for a in results)
    assert [a.shadow_denied for a in results] == [False, False, True, True]
    assert hdr(results[3])[b"x-weft-ratelimit-shadow-denied"] == b"ai/tokens/per-caller"
    assert lim.counters.shadow_denied == 2 and lim.counters.denied == 0


def test_an_enforced_limit_still_applies_next_to_a_shadow_one(store):
    trial = {**PER_CALLER, "name": "trial", "tokensPerMinute": 10, "shadow": True}
    lim = Limiter(policy(PER_CALLER, trial), store)
    adm = lim.admit(caller("alice"), 100, T0)
    assert adm.allowed and adm.shadow_denied
    assert not lim.admit(caller("alice"), 950, T0).allowed  # per-caller is enforced


def test_a_daily_budget_survives_a_restart_and_resets_at_midnight_utc(tmp_path):
    p = policy({"name": "daily", "by": "namespace", "budget": {"tokens": 1000, "window": "day"}})
    lim = Limiter(p, SqliteStore(tmp_path / "q.db"))
    assert run(lim, caller("a"), 10, T0, used=990)
    restarted = Limiter(p, SqliteStore(tmp_path / "q.db"))
    adm = restarted.admit(caller("a"), 20, T0 + 3600)
    assert not adm.allowed
    _, end = budget_window("day", T0)
    assert hdr(adm)[b"x-weft-budget-remaining-tokens"] == b"10"
    assert int(hdr(adm)[b"retry-after"]) == pytest.approx(end - T0 - 3600, abs=1)
    assert restarted.admit(caller("a"), 20, end + 1).allowed


def test_calendar_windows_of_budgets():
    assert budget_window("month", 1_709_251_200.0 + 5) == (1_709_251_200, 1_711_929_600)  # Mar 24
    assert budget_window("hour", 7300.0) == (7200, 10800)


def test_overrides_give_some_key_values_their_own_numbers(store):
    lim = Limiter(
        policy(
            {
                "name": "per-tenant",
                "by": "header",
                "header": "x-tenant",
                "requestsPerMinute": 1,
                "overrides": [{"values": ["big"], "requestsPerMinute": 3}],
            }
        ),
        store,
    )
    big, small = caller("x", **{"x-tenant": "big"}), caller("x", **{"x-tenant": "small"})
    assert [lim.admit(big, 0, T0).allowed for _ in range(4)] == [True, True, True, False]
    assert [lim.admit(small, 0, T0).allowed for _ in range(2)] == [True, False]


def test_a_limit_by_model_with_a_match_only_counts_matching_requests(store):
    lim = Limiter(
        policy(
            {"name": "gpt", "by": "model", "requestsPerMinute": 1, "match": {"models": ["gpt-*"]}}
        ),
        store,
    )
    assert lim.admit(caller("a", model="gpt-4"), 0, T0).allowed
    assert not lim.admit(caller("b", model="gpt-4"), 0, T0).allowed
    assert lim.admit(caller("a", model="gpt-3"), 0, T0).allowed  # another model, own counter
    adm = lim.admit(caller("a", model="llama"), 0, T0)
    assert adm.allowed and adm.headers == []  # no limit applies


def test_a_model_match_also_sees_the_model_the_backend_is_asked_for(store):
    """A limit on big-model with a ModelRoute that maps big-model-* onto big-model: another
    spelling of the name reaches the same backend model, so it is matched (and counted)
    with it instead of slipping past the limit."""
    lim = Limiter(
        policy(
            {
                "name": "big",
                "by": "none",
                "requestsPerMinute": 1,
                "match": {"models": ["big-model"]},
            }
        ),
        store,
    )
    first = caller("a", model="big-model")
    first.served = "big-model"
    assert lim.admit(first, 0, T0).allowed
    alias = caller("a", model="big-model-x")
    alias.served = "big-model"
    assert not lim.admit(alias, 0, T0).allowed
    other = caller("a", model="small-model")
    other.served = "small-model"
    assert lim.admit(other, 0, T0).allowed  # not this limit's model at all


def test_a_store_failure_degrades_to_this_replicas_own_limits_never_to_none(tmp_path):
    """failOpen: a request is admitted while the store is failing, but against counters this
    replica keeps itself, so the limit still holds here (per replica)."""
    st = SqliteStore(tmp_path / "q.db")
    lim = Limiter(policy({"name": "r", "by": "none", "requestsPerMinute": 3}), st)
    st.close_now()
    got = [lim.admit(caller("a"), 1, T0 + i) for i in range(5)]
    assert [a.allowed for a in got] == [True, True, True, False, False]
    assert got[0].store_error and "closed" in got[0].store_error
    assert lim.counters.store_errors == 5 and lim.counters.local_admits == 5
    assert got[3].status == 429  # the replica's own limit, with its retry-after


def test_a_store_failure_answers_503_when_fail_closed(tmp_path):
    st = SqliteStore(tmp_path / "q.db")
    lim = Limiter(policy(PER_CALLER, failOpen=False), st)
    st.close_now()
    adm = lim.admit(caller("a"), 1, T0)
    assert not adm.allowed and adm.status == 503 and adm.store_error


def test_old_counters_are_swept(tmp_path):
    st = SqliteStore(tmp_path / "q.db")
    lim = Limiter(policy(PER_CALLER), st)
    run(lim, caller("a"), 10, T0, used=10)
    assert st.sweep(T0 + 60) == 0 and st.sweep(T0 + 121) == 1
    st.close_now()


def test_a_stream_charged_as_it_goes_says_when_it_takes_a_limit_past_its_value(store):
    """Progress charges (final=False) move the reservation along; the one that takes the
    tokens past the limit returns True, which onExceed: truncate acts on."""
    lim = Limiter(policy({**PER_CALLER, "tokensPerMinute": 100}), store)
    alice = caller("alice")
    adm = lim.admit(alice, 20, T0 + 1)
    assert not lim.charge(adm, 60, T0 + 2, final=False)
    assert not lim.charge(adm, 100, T0 + 3, final=False)  # at the limit, not past it
    assert lim.charge(adm, 116, T0 + 4, final=False)
    key = "ai/tokens/per-caller/" + safe_key(alice.principal) + "/t"
    assert value(store, key, int(T0)) == 116
    # The end charges the actual usage, replacing what was charged so far.
    lim.charge(adm, 110, T0 + 5)
    assert value(store, key, int(T0)) == 110
    assert lim.counters.tokens_charged == 110


def test_concurrent_streams_are_seen_by_the_next_admission_while_they_stream(store):
    """Four streams admitted with small estimates charge as they go; an admission after
    their progress charges sees their use, not only their estimates."""
    lim = Limiter(policy({**PER_CALLER, "tokensPerMinute": 1000}), store)
    alice = caller("alice")
    streams = [lim.admit(alice, 10, T0 + 1) for _ in range(4)]
    assert all(a.allowed for a in streams)
    for a in streams:
        lim.charge(a, 240, T0 + 2, final=False)  # 960 used so far, all four still going
    assert not lim.admit(alice, 50, T0 + 3).allowed


# ---- Redis: one budget for every replica ------------------------------------------------


def test_replicas_on_one_redis_share_one_budget_under_concurrency(redis_server):
    """Two replicas (two clients, two connection pools), 60 concurrent admissions of 10
    tokens against 200 per minute: exactly 20 admitted, never more."""

    async def main() -> list[bool]:
        a, b = redis_store(redis_server.url), redis_store(redis_server.url)
        p = policy({"name": "all", "by": "none", "tokensPerMinute": 200})
        la, lb = TokenLimiter(p, a), TokenLimiter(p, b)
        got = await asyncio.gather(
            *((la if i % 2 else lb).admit(caller("x"), 10, T0 + 1) for i in range(60))
        )
        await a.close()
        await b.close()
        return [g.allowed for g in got]

    assert sync(main()).count(True) == 20


def test_a_restarted_redis_is_used_again_and_meanwhile_the_replica_limits_itself(
    redis_server,
):
    """The server restarts (its counters and scripts gone): ops fail for a moment and the
    replica admits on its own counters; then the store is used again (the script is loaded
    anew) and counts from zero, as a server without persistence does."""
    st = redis_store(redis_server.url)
    st.retry_after = 0.2  # type: ignore[attr-defined]
    lim = Limiter(policy({"name": "r", "by": "none", "requestsPerMinute": 5}), st)
    assert all(lim.admit(caller("a"), 0, T0 + 1).allowed for _ in range(3))
    redis_server.stop()
    down = [lim.admit(caller("a"), 0, T0 + 2) for _ in range(7)]
    assert [a.allowed for a in down] == [True] * 5 + [False] * 2  # the local limit of 5
    assert all(a.store_error for a in down) and lim.counters.local_admits == 7
    redis_server.start()
    sync(asyncio.sleep(0.25))
    back = lim.admit(caller("a"), 0, T0 + 3)
    assert back.allowed and back.store_error is None and back.store is st
    assert value(st, "ai/tokens/r/*/r", int(T0)) == 1
    stats = st.stats.ops[("redis", "admit")]
    assert stats[-1] >= 1  # errors were counted
    sync(st.close())


def test_redis_and_python_evaluate_the_same_checks_identically(redis_server):
    """The Lua script and `quotastore.passes` read the same ops the same way: random ops
    (weights, limits, refunds past zero) on Redis and in memory give the same results."""
    import random

    from agent.waypoint.ai.quotastore import Check, Write

    rng = random.Random(7)
    red, mem = redis_store(redis_server.url), MemoryStore()
    cells = [(f"ns/p/l/k{i}/t", 60 * (i % 2)) for i in range(4)]
    for _ in range(300):
        picked = rng.sample(range(4), rng.randint(1, 4))
        op = Op([cells[i] for i in picked], conditional=rng.random() < 0.8)
        for _ in range(rng.randint(0, 3)):
            idx = tuple(rng.sample(range(len(picked)), rng.randint(1, len(picked))))
            w = tuple(rng.choice([1.0, 0.5, rng.random()]) for _ in idx)
            op.checks.append(
                Check(idx, w, rng.randint(0, 400), rng.randint(0, 60), rng.random() < 0.2)
            )
        for _ in range(rng.randint(0, 3)):
            op.writes.append(Write(rng.randrange(len(picked)), rng.randint(-80, 80), 2_000_000_000))
        assert sync(red.run(op)) == mem.run_now(op)
    sync(red.close())


def test_a_refund_comes_out_of_the_window_the_reservation_went_into(store):
    """A reservation made at 23:59:59 and refunded after midnight gives back yesterday's
    budget, not another member's use of today's (the same namespace, one counter)."""
    p = policy({"name": "daily", "by": "namespace", "budget": {"tokens": 10_000, "window": "day"}})
    lim = Limiter(p, store)
    _, midnight = budget_window("day", T0)
    late = lim.admit(caller("a"), 6000, midnight - 1)
    assert late.allowed
    assert lim.admit(caller("a"), 4000, midnight + 5).allowed
    lim.charge(late, 0, midnight + 10)  # the backend failed: refunded
    key = "ai/tokens/daily/" + safe_key("team-a") + "/b"
    assert value(store, key, midnight) == 4000  # today's use is untouched
    assert value(store, key, midnight - 86400) == 0  # yesterday's reservation given back


@pytest.mark.parametrize(
    "value_",
    ["x" * 70_000, "\ud800", "a/b", "spiffe://td/ns/a/sa/b", "tenant\nnewline"],
)
def test_caller_chosen_key_values_are_bounded_and_always_storable(store, value_):
    """A header value (or a model name from the body) becomes a key: long, odd or
    unencodable values are stored as a fixed-length digest, never as themselves."""
    lim = Limiter(
        policy({"name": "t", "by": "header", "header": "x-tenant", "requestsPerMinute": 1}), store
    )
    who = RequestFacts("p", "ns", "m", "/", Headers.of(("x-tenant", "ok")))
    who.headers.set(b"x-tenant", value_.encode("utf-8", "surrogatepass"))
    assert lim.admit(who, 0, T0).allowed
    assert not lim.admit(who, 0, T0).allowed  # the same value shares its counter
    assert lim.counters.store_errors == 0
    k = safe_key(value_.encode("utf-8", "surrogatepass").decode("latin-1"))
    assert len(k) <= 64


def test_a_by_model_limit_counts_the_model_served_not_the_name_asked_for(store):
    """Names a pattern rule maps to one backend model share that model's counters."""
    lim = Limiter(policy({"name": "m", "by": "model", "requestsPerMinute": 2}), store)
    got = []
    for asked in ("llama-a", "llama-b", "llama-c"):
        r = caller("x", model=asked)
        r.served = "meta-llama/Llama-3"
        got.append(lim.admit(r, 0, T0).allowed)
    assert got == [True, True, False]
