"""Org and partner buckets shared by every replica through Redis.

One atomic Lua script per acquisition (one round trip): refill every bucket
the request draws on to Redis' own clock, check them all, deduct from all or
none, and say how long to wait and whose limit binds. Refunds, 429 pauses and
header clamps are further small scripts, sent in the background.

When Redis cannot be reached the limiter degrades to a local share of the
limits (`redis.degraded_share`, default 1 / `redis.expected_replicas`), says
so in logs, metrics and readiness detail, and probes Redis every second to
recover by itself.

All keys share one hash tag, so the scripts also run on Redis Cluster.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from service.config.redis import redis_client
from service.config.settings import LimitSettings, RedisSettings
from service.scheduling.limiter import (
    DIMENSIONS,
    GRANTED,
    Cost,
    Decision,
    LocalLimiter,
    Usage,
    parse_ratelimit_headers,
    refund_amounts,
)

log = logging.getLogger(__name__)

# Shared by the bucket scripts: Redis' clock, a bucket's level refilled to now (a bucket not
# seen yet is full), and storing a level. Bucket hashes expire after an idle hour.
_BUCKETS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local function level_of(key, cap)
  local h = redis.call('HMGET', key, 'level', 'ts')
  local level, ts = tonumber(h[1]), tonumber(h[2])
  if level == nil then return cap end
  return math.min(cap, level + math.max(0, now - ts) * cap / 60)
end
local function store(key, level)
  redis.call('HSET', key, 'level', tostring(level), 'ts', tostring(now))
  redis.call('EXPIRE', key, 3600)
end
"""

# KEYS[1] = pause key, KEYS[2..] = bucket hashes; ARGV[1] = how many leading buckets are the partner's,
# then (capacity, amount) per bucket. Returns {ok, wait_s as string, scope: 0 none | 1 partner | 2 org}.
ACQUIRE = (
    _BUCKETS
    + """
local npartner = tonumber(ARGV[1])
local levels = {}
local wait_p, wait_o = 0, 0
for i = 2, #KEYS do
  local cap = tonumber(ARGV[2 * (i - 1)])
  local amount = tonumber(ARGV[2 * (i - 1) + 1])
  local level = level_of(KEYS[i], cap)
  levels[i] = level
  local need = math.min(amount, cap)
  if amount > 0 and level < need then
    local w = (need - level) / (cap / 60)
    if i - 1 <= npartner then wait_p = math.max(wait_p, w) else wait_o = math.max(wait_o, w) end
  end
end
if wait_p > 0 then return {0, tostring(wait_p), 1} end
local paused = redis.call('PTTL', KEYS[1])
if paused > 0 then return {0, tostring(paused / 1000), 2} end
if wait_o > 0 then return {0, tostring(wait_o), 2} end
for i = 2, #KEYS do
  store(KEYS[i], levels[i] - tonumber(ARGV[2 * (i - 1) + 1]))
end
return {1, '0', 0}
"""
)

# KEYS = bucket hashes; ARGV = (capacity, delta) per bucket; delta > 0 refunds, < 0 debits.
ADJUST = (
    _BUCKETS
    + """
for i = 1, #KEYS do
  local cap = tonumber(ARGV[2 * i - 1])
  store(KEYS[i], math.min(cap, level_of(KEYS[i], cap) + tonumber(ARGV[2 * i])))
end
return 1
"""
)

# KEYS = org bucket hashes; ARGV = (capacity, remaining) per bucket: level = min(level, remaining).
CLAMP = (
    _BUCKETS
    + """
for i = 1, #KEYS do
  local cap = tonumber(ARGV[2 * i - 1])
  store(KEYS[i], math.min(level_of(KEYS[i], cap), tonumber(ARGV[2 * i])))
end
return 1
"""
)

# KEYS[1] = pause key; ARGV[1] = milliseconds. Extends, never shortens, a pause.
PAUSE = """
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], '1', 'PX', ARGV[1])
end
return 1
"""


def _limits_of(settings: LimitSettings) -> dict[str, float]:
    return {d: float(getattr(settings, d)) for d in DIMENSIONS if getattr(settings, d) is not None}


class RedisLimiter:
    def __init__(
        self,
        settings: RedisSettings,
        org: LimitSettings,
        partners: Mapping[str, LimitSettings],
        *,
        client: aioredis.Redis | None = None,
        on_degraded: Callable[[bool], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._settings = settings
        self._owns_client = client is None
        self._redis = client if client is not None else redis_client(settings)
        self._acquire = self._redis.register_script(ACQUIRE)
        self._adjust = self._redis.register_script(ADJUST)
        self._clamp = self._redis.register_script(CLAMP)
        self._pause = self._redis.register_script(PAUSE)
        share = settings.degraded_share or 1.0 / settings.expected_replicas
        self._local = LocalLimiter(org, partners, share=share, clock=clock)
        self._on_degraded = on_degraded
        self._clock = clock
        self._tag = "{" + settings.key_prefix + "}"
        self._org: dict[str, float] = {}
        self._partners: dict[str, dict[str, float]] = {}
        self._last_clamp = 0.0
        self._background: set[asyncio.Task[None]] = set()
        self._probe: asyncio.Task[None] | None = None
        self.degraded = False
        self.configure(org, partners)

    def configure(self, org: LimitSettings, partners: Mapping[str, LimitSettings]) -> None:
        self._org = _limits_of(org)
        self._partners = {pid: _limits_of(lim) for pid, lim in partners.items()}
        self._local.configure(org, partners)

    def _key(self, scope: str, dim: str) -> str:
        return f"{self._tag}:bucket:{scope}:{dim}"

    @property
    def _pause_key(self) -> str:
        return f"{self._tag}:org:paused"

    def _buckets(self, partner_id: str) -> tuple[list[str], list[float], int]:
        keys: list[str] = []
        caps: list[float] = []
        for dim, cap in self._partners.get(partner_id, {}).items():
            keys.append(self._key(f"partner:{partner_id}", dim))
            caps.append(cap)
        npartner = len(keys)
        for dim, cap in self._org.items():
            keys.append(self._key("org", dim))
            caps.append(cap)
        return keys, caps, npartner

    async def acquire(self, partner_id: str, cost: Cost) -> Decision:
        if self.degraded:
            return self._local.try_acquire(partner_id, cost)
        keys, caps, npartner = self._buckets(partner_id)
        if not keys:
            return GRANTED
        amounts = dict(zip(DIMENSIONS, cost.amounts(), strict=True))
        dims = [*self._partners.get(partner_id, {}), *self._org]
        args: list[float | int] = [npartner]
        for dim, cap in zip(dims, caps, strict=True):
            args += [cap, amounts[dim]]
        try:
            ok, wait, scope = await self._acquire(keys=[self._pause_key, *keys], args=args)
        except (RedisError, OSError) as exc:
            self._degrade(exc)
            return self._local.try_acquire(partner_id, cost)
        if int(ok) == 1:
            return GRANTED
        return Decision(False, float(wait), "partner" if int(scope) == 1 else "org")

    def settle(self, partner_id: str, cost: Cost, usage: Usage | None) -> None:
        if self.degraded:
            self._local.settle(partner_id, cost, usage)
            return
        refund = dict(zip(DIMENSIONS, refund_amounts(cost, usage), strict=True))
        keys, caps, _ = self._buckets(partner_id)
        dims = [*self._partners.get(partner_id, {}), *self._org]
        args: list[float] = []
        used: list[str] = []
        for key, dim, cap in zip(keys, dims, caps, strict=True):
            if refund[dim] != 0:
                used.append(key)
                args += [cap, refund[dim]]
        if used:
            self._spawn(self._adjust(keys=used, args=args))

    def observe_headers(self, headers: Mapping[str, str]) -> None:
        self._local.observe_headers(headers)
        now = self._clock()
        if self.degraded or now - self._last_clamp < 0.1:
            return
        self._last_clamp = now
        keys: list[str] = []
        args: list[float] = []
        for dim, (_, remaining) in parse_ratelimit_headers(headers).items():
            cap = self._org.get(dim)
            if cap is not None and remaining is not None:
                keys.append(self._key("org", dim))
                args += [cap, remaining + (0.0 if dim == "rpm" else 500.0)]
        if keys:
            self._spawn(self._clamp(keys=keys, args=args))

    def pause(self, seconds: float) -> None:
        self._local.pause(seconds)
        if not self.degraded:
            self._spawn(self._pause(keys=[self._pause_key], args=[max(1, int(seconds * 1000))]))

    def levels(self) -> dict[tuple[str, str], float]:
        return self._local.levels()

    # -- degradation and recovery ----------------------------------------------------

    def _spawn(self, awaitable: object) -> None:
        async def run() -> None:
            try:
                await awaitable  # type: ignore[misc]
            except (RedisError, OSError) as exc:
                self._degrade(exc)

        task = asyncio.get_running_loop().create_task(run())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _degrade(self, exc: BaseException) -> None:
        if self.degraded:
            return
        self.degraded = True
        log.warning(
            "redis unreachable: limits fall back to a local share",
            extra={"error": type(exc).__name__, "share": self._local_share()},
        )
        if self._on_degraded is not None:
            self._on_degraded(True)
        if self._probe is None or self._probe.done():
            self._probe = asyncio.get_running_loop().create_task(self._probe_loop())

    def _local_share(self) -> float:
        return self._settings.degraded_share or 1.0 / self._settings.expected_replicas

    async def _probe_loop(self) -> None:
        while self.degraded:
            await asyncio.sleep(1.0)
            try:
                await self._redis.ping()
            except (RedisError, OSError):
                continue
            self.degraded = False
            log.warning("redis reachable again: shared limits restored")
            if self._on_degraded is not None:
                self._on_degraded(False)

    async def aclose(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
        for task in list(self._background):
            task.cancel()
        if self._owns_client:
            await self._redis.aclose()
