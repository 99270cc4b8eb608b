"""TokenRateLimit counters on Redis or Valkey, shared by every waypoint replica.

One op (agent/waypoint/ai/quotastore.py) is one EVALSHA of the script below: it reads the
cells, evaluates the enforced checks with the same arithmetic as `quotastore.passes`, and
applies the writes only when they pass (or always, for a charge): check and increment are
one atomic step on the server, so two replicas can never both take the last token. A
server that lost its scripts (restarted) gets the script again (the client's EVALSHA falls
back to SCRIPT LOAD on NOSCRIPT).

Keys are `weft:quota:{<namespace>/<policy>}:<limit>/<value>/<kind>@<window start>`; the hash
tag keeps every counter of one policy in one slot, so an op never spans slots of a Redis
Cluster. Every key carries an expiry (until the end of the last window that reads it),
so the server holds only live counters.

Failures: an op that cannot complete within `timeout` raises StoreError, and the store then
stays "down" for `retry_after` seconds (ops fail at once instead of each waiting for the
timeout); quota.py falls back to its per-replica counters (failOpen) or answers 503
(failOpen: false).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from agent.waypoint.ai.quotastore import Cell, Op, StoreError, StoreStats

# KEYS: the cells. ARGV: conditional, then the checks (limit, need, shadow, n, then n pairs
# of cell index and weight), then the writes (cell index, delta, seconds to live). Returns the
# values read, then 1 if the writes were applied. Integer arithmetic on the counters;
# the weighted sums are doubles, summed in the same order as quotastore.passes.
LUA = """
local vals = {}
for i = 1, #KEYS do
  vals[i] = tonumber(redis.call('GET', KEYS[i]) or '0')
end
local p = 1
local conditional = ARGV[p] == '1'
p = p + 1
local ok = 1
local nchecks = tonumber(ARGV[p])
p = p + 1
for c = 1, nchecks do
  local limit = tonumber(ARGV[p])
  local need = tonumber(ARGV[p + 1])
  local shadow = ARGV[p + 2] == '1'
  local n = tonumber(ARGV[p + 3])
  p = p + 4
  local used = 0.0
  for j = 1, n do
    used = used + tonumber(ARGV[p + 1]) * vals[tonumber(ARGV[p])]
    p = p + 2
  end
  if (not shadow) and used + need > limit then
    ok = 0
  end
end
if ok == 1 or not conditional then
  local nwrites = tonumber(ARGV[p])
  p = p + 1
  for w = 1, nwrites do
    local k = KEYS[tonumber(ARGV[p])]
    local d = tonumber(ARGV[p + 1])
    local ttl = tonumber(ARGV[p + 2])
    p = p + 3
    if d >= 0 then
      redis.call('INCRBY', k, d)
      redis.call('EXPIRE', k, ttl)
    else
      local v = redis.call('GET', k)
      if v then
        local nv = tonumber(v) + d
        if nv < 0 then nv = 0 end
        redis.call('SET', k, nv, 'KEEPTTL')
      end
    end
  end
end
vals[#vals + 1] = ok
return vals
"""

PREFIX = "weft:quota:"


def redis_key(cell: Cell) -> str:
    key, start = cell
    policy, _, rest = key.partition("/")
    name, _, rest = rest.partition("/")
    return f"{PREFIX}{{{policy}/{name}}}:{rest}@{start}"


def encode(op: Op) -> tuple[list[str], list[str]]:
    """The script's KEYS and ARGV for one op."""
    keys = [redis_key(c) for c in op.cells]
    args: list[str] = ["1" if op.conditional else "0", str(len(op.checks))]
    for c in op.checks:
        args += [str(c.limit), str(c.need), "1" if c.shadow else "0", str(len(c.cells))]
        for i, weight in zip(c.cells, c.weights, strict=True):
            args += [str(i + 1), repr(float(weight))]
    args.append(str(len(op.writes)))
    for w in op.writes:
        # A time to live, not the absolute time: the server's clock need not agree with
        # the replicas' (nor with a test's injected one).
        args += [str(w.cell + 1), str(w.delta), str(max(1, w.expires - int(op.now)))]
    return keys, args


class RedisStore:
    kind = "redis"
    shared = True

    def __init__(self, url: str, *, timeout: float = 0.25, retry_after: float = 1.0) -> None:
        self.url = url
        self.stats = StoreStats()
        self.timeout = timeout
        self.retry_after = retry_after
        self.down_until = 0.0
        self.last_error = ""
        if url.startswith("valkey"):
            url = "redis" + url[len("valkey") :]
        # No client-side retries: a failed op falls back at once (quota.py), and the next
        # op after `retry_after` tries the server again.
        self.client: Any = aioredis.Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
            # A pooled connection idle for a second is PINGed before use: after a server
            # restart the first op finds a fresh connection instead of failing on a dead
            # one (and sending every request of the next second to the fallback counters).
            health_check_interval=1,
            client_name="weft-waypoint",
        )
        self.script = self.client.register_script(LUA)

    async def run(self, op: Op) -> tuple[list[int], bool]:
        if time.monotonic() < self.down_until:
            raise StoreError(f"{self.where}: down ({self.last_error}); retrying shortly")
        keys, args = encode(op)
        try:
            async with asyncio.timeout(self.timeout):
                got = await self.script(keys=keys, args=args)
        except Exception as e:  # any failure is the store's: failOpen decides, never a 500
            self.down_until = time.monotonic() + self.retry_after
            self.last_error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            raise StoreError(f"{self.where}: {self.last_error}") from e
        values = [int(v) for v in got[:-1]]
        return values, int(got[-1]) == 1

    @property
    def where(self) -> str:
        conn = self.client.connection_pool.connection_kwargs
        host = conn.get("path") or f"{conn.get('host')}:{conn.get('port')}"
        return f"quota store redis {host}"

    async def ping(self) -> bool:
        try:
            async with asyncio.timeout(self.timeout):
                return bool(await self.client.ping())
        except (RedisError, OSError, TimeoutError):
            return False

    async def close(self) -> None:
        await self.client.aclose()
