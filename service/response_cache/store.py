"""Where entries live: Redis, bounded in bytes across replicas, or an in-process LRU.

**Redis** (the gateway's `redis` section): four keys under the gateway's prefix (in braces: one
Redis Cluster hash slot, as the other gateway keys):

    {prefix}:response_cache:entries    hash       key -> entry bytes
    {prefix}:response_cache:by_age     sorted set key scored by when it was stored (ms)
    {prefix}:response_cache:by_expiry  sorted set key scored by when it expires (ms)
    {prefix}:response_cache:bytes      string     bytes held: entries + ENTRY_OVERHEAD_BYTES each

A read is one `HGET`; the entry's own header says whether it has expired. A write is one Lua
script, atomic, so the bound holds whatever the number of replicas: it drops up to
`MAX_EXPIRED_PER_PUT` expired entries, then evicts the oldest entries until the new one fits
in `max_bytes`, then adds it (replacing an entry under the same key: the newest answer wins,
and a partner whose `ttl_s` found the old one too old gets hits again).

Why a script over one hash and not a key per entry with its own TTL: the bound must hold
without the server's `maxmemory` (which the limiter and the budgets share, and whose eviction
would take their keys too), and a key per entry would leave the total to be counted outside
Redis, where two replicas storing at once both see room. Keys in a hash cannot expire one by
one (before Redis 7.4), so expiry is the `by_expiry` index plus the header check on read; the
four keys themselves expire after the longest entry's TTL, so an abandoned cache goes away.
Every key the script touches is declared, so it runs on Redis Cluster too.

**In process** (no `redis` section): an LRU bounded by `response_cache.local_max_bytes`, per
replica, lost on restart.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

ENTRY_OVERHEAD_BYTES = 512
"""Counted per entry besides its bytes: the key three times (hash field, two sorted-set members)
and their nodes. Measured on Redis 7.0 with `MEMORY USAGE` of the four keys: 486-494 bytes per
entry beside the value (936 for 20 kB values, the allocator's rounding), so `max_bytes` bounds
what Redis really holds within a few percent."""
MAX_EXPIRED_PER_PUT = 256
MAX_EVICTED_PER_PUT = 4096
"""Work one write may do; when eviction alone cannot make room within it, the entry is not stored."""

_PUT = """
local entries, by_age, by_expiry, total = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local key, value = ARGV[1], ARGV[2]
local now, expires = tonumber(ARGV[3]), tonumber(ARGV[4])
local max, overhead = tonumber(ARGV[5]), tonumber(ARGV[6])
local max_expired, max_evicted = tonumber(ARGV[7]), tonumber(ARGV[8])
if redis.call('EXISTS', entries) == 0 then
  redis.call('DEL', by_age, by_expiry, total)
end
local used = tonumber(redis.call('GET', total) or '0')
local function drop(k)
  local n = redis.call('HSTRLEN', entries, k)
  if redis.call('HDEL', entries, k) == 1 then used = used - n - overhead end
  redis.call('ZREM', by_age, k)
  redis.call('ZREM', by_expiry, k)
end
for _, k in ipairs(redis.call('ZRANGEBYSCORE', by_expiry, '-inf', now, 'LIMIT', 0, max_expired)) do
  drop(k)
end
local result, evicted = 1, 0
drop(key)
local need = string.len(value) + overhead
if need > max then max_evicted = 0 end  -- no eviction makes room: keep what is there
while used + need > max and evicted < max_evicted do
  local oldest = redis.call('ZRANGE', by_age, 0, 0)
  if #oldest == 0 then break end
  drop(oldest[1])
  evicted = evicted + 1
end
if used + need > max then
  result = 0
else
  redis.call('HSET', entries, key, value)
  redis.call('ZADD', by_age, now, key)
  redis.call('ZADD', by_expiry, expires, key)
  used = used + need
end
if used < 0 then used = 0 end
redis.call('SET', total, used)
local ttl = expires - now + 60000
local longest = redis.call('PTTL', entries)  -- SET dropped the counter's TTL: give it the entries'
if longest > ttl then ttl = longest end      -- (not this entry's, maybe shorter), or it expires first
for _, k in ipairs(KEYS) do
  if redis.call('EXISTS', k) == 1 and redis.call('PTTL', k) < ttl then redis.call('PEXPIRE', k, ttl) end
end
return {result, used, evicted}
"""


@dataclass(frozen=True, slots=True)
class Put:
    """What a write did."""

    result: int
    """STORED, or NO_ROOM (eviction within `MAX_EVICTED_PER_PUT` did not make room)."""
    held_bytes: int
    """Bytes the store holds after it (entries + overhead)."""
    evicted: int
    """Unexpired entries evicted to make room."""


STORED, NO_ROOM = 1, 0


class Store(Protocol):
    async def get(self, key: str) -> bytes | None: ...
    async def put(
        self, key: str, value: bytes, stored_at: float, expires_at: float, max_bytes: int
    ) -> Put: ...


class LocalStore:
    """An in-process LRU bounded by bytes (entries + `ENTRY_OVERHEAD_BYTES` each)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._entries: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self.held_bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    async def get(self, key: str) -> bytes | None:
        found = self._entries.get(key)
        if found is None:
            return None
        if found[0] <= self._clock():
            self._drop(key)
            return None
        self._entries.move_to_end(key)  # least recently used goes first
        return found[1]

    async def put(self, key: str, value: bytes, stored_at: float, expires_at: float, max_bytes: int) -> Put:
        now = self._clock()
        self._drop(key)
        need = len(value) + ENTRY_OVERHEAD_BYTES
        evicted = 0
        if need > max_bytes:  # no eviction makes room: keep what is there
            return Put(NO_ROOM, self.held_bytes, evicted)
        while self._entries and self.held_bytes + need > max_bytes:
            oldest, (expires, _) = next(iter(self._entries.items()))
            self._drop(oldest)
            evicted += expires > now
        if self.held_bytes + need > max_bytes:
            return Put(NO_ROOM, self.held_bytes, evicted)
        self._entries[key] = (expires_at, value)
        self.held_bytes += need
        return Put(STORED, self.held_bytes, evicted)

    def _drop(self, key: str) -> None:
        gone = self._entries.pop(key, None)
        if gone is not None:
            self.held_bytes -= len(gone[1]) + ENTRY_OVERHEAD_BYTES


class RedisStore:
    """Entries in Redis, shared by every replica, bounded by `max_bytes` (see the module doc)."""

    def __init__(self, redis: Any, key_prefix: str) -> None:
        self.redis = redis
        base = "{" + key_prefix + "}:response_cache"
        self.entries_key = f"{base}:entries"
        self.keys = [self.entries_key, f"{base}:by_age", f"{base}:by_expiry", f"{base}:bytes"]
        self._put = redis.register_script(_PUT)

    async def get(self, key: str) -> bytes | None:
        value = await self.redis.hget(self.entries_key, key)
        return None if value is None else bytes(value)

    async def put(self, key: str, value: bytes, stored_at: float, expires_at: float, max_bytes: int) -> Put:
        args = [
            key,
            value,
            int(stored_at * 1000),
            int(expires_at * 1000),
            max_bytes,
            ENTRY_OVERHEAD_BYTES,
            MAX_EXPIRED_PER_PUT,
            MAX_EVICTED_PER_PUT,
        ]
        raw = await self._put(keys=self.keys, args=args)
        return Put(int(raw[0]), int(raw[1]), int(raw[2]))
