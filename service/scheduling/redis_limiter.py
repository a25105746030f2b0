"""Org pools and partner buckets shared by every replica through Redis.

One atomic Lua script per acquisition (one round trip): refill every bucket
the request draws on (its partner's, and the org pool of its model class) to
Redis' own clock, check them all and the 429 pauses of its key scope and pool,
deduct from all or none, and say how long to wait and whose limit binds.
Refunds, 429 pauses and header clamps are further small scripts, sent in the
background. `levels()` reports the shared buckets, read at most once a second.

When Redis is down (`service.config.redis_health`: a slow call is not enough)
the limiter degrades to a local share of the limits (`redis.degraded_share`,
default 1 / `redis.expected_replicas`), says so in logs, metrics and readiness
detail, and recovers by itself when Redis answers again.

All keys share one hash tag, so the scripts also run on Redis Cluster (and all
sit in one slot: docs/scaling.md says what that costs and how to go past it).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import redis.asyncio as aioredis

from service.config.redis import redis_client
from service.config.redis_health import REDIS_ERRORS, RedisHealth
from service.config.settings import LimitSettings, RedisSettings
from service.scheduling.limiter import (
    DIMENSIONS,
    GRANTED,
    Cost,
    Decision,
    LocalLimiter,
    Scope,
    Usage,
    refund_amounts,
)
from service.scheduling.pools import DEFAULT_CLASS, LimitConfig, PauseScope, pool_label
from service.scheduling.ratelimits import TOKEN_ROUNDING, read

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

# KEYS[1] = the key scope's pause, KEYS[2] = the org pool's pause, KEYS[3..] = bucket hashes;
# ARGV[1] = how many leading buckets are the partner's, then (capacity, amount) per bucket.
# Returns {ok, wait_s as string, scope: 0 none | 1 partner | 2 org | 3 key}.
ACQUIRE = (
    _BUCKETS
    + """
local npartner = tonumber(ARGV[1])
local levels = {}
local wait_p, wait_o = 0, 0
for i = 3, #KEYS do
  local cap = tonumber(ARGV[2 * (i - 2)])
  local amount = tonumber(ARGV[2 * (i - 2) + 1])
  local level = level_of(KEYS[i], cap)
  levels[i] = level
  local need = math.min(amount, cap)
  if amount > 0 and level < need then
    local w = (need - level) / (cap / 60)
    if i - 2 <= npartner then wait_p = math.max(wait_p, w) else wait_o = math.max(wait_o, w) end
  end
end
if wait_p > 0 then return {0, tostring(wait_p), 1} end
local key_paused = redis.call('PTTL', KEYS[1])
if key_paused > 0 then return {0, tostring(key_paused / 1000), 3} end
local org_paused = redis.call('PTTL', KEYS[2])
if org_paused > 0 then return {0, tostring(org_paused / 1000), 2} end
if wait_o > 0 then return {0, tostring(wait_o), 2} end
for i = 3, #KEYS do
  store(KEYS[i], levels[i] - tonumber(ARGV[2 * (i - 2) + 1]))
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

# KEYS = bucket hashes; ARGV = capacity per bucket. Returns each level refilled to now, as strings.
LEVELS = (
    _BUCKETS
    + """
local out = {}
for i = 1, #KEYS do out[i] = tostring(level_of(KEYS[i], tonumber(ARGV[i]))) end
return out
"""
)

# KEYS[1] = pause key; ARGV[1] = milliseconds. Extends, never shortens, a pause.
PAUSE = """
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], '1', 'PX', ARGV[1])
end
return 1
"""


_LEVELS_MAX_AGE_S = 1.0


class RedisLimiter:
    def __init__(
        self,
        settings: RedisSettings,
        config: LimitConfig | LimitSettings,
        partners: Mapping[str, LimitSettings] | None = None,
        *,
        client: aioredis.Redis | None = None,
        health: RedisHealth | None = None,
        on_degraded: Callable[[bool], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if isinstance(config, LimitSettings):
            config = LimitConfig.simple(config, partners)
        self._settings = settings
        self._owns_client = client is None
        self._redis = client if client is not None else redis_client(settings)
        self._owns_health = health is None
        self.health = health or RedisHealth(self._redis)
        self.health.subscribe(self._health_changed)
        self._acquire = self._redis.register_script(ACQUIRE)
        self._adjust = self._redis.register_script(ADJUST)
        self._clamp = self._redis.register_script(CLAMP)
        self._pause = self._redis.register_script(PAUSE)
        self._levels = self._redis.register_script(LEVELS)
        self._local = LocalLimiter(config, share=self._local_share(), clock=clock)
        self._on_degraded = on_degraded
        self._clock = clock
        self._tag = "{" + settings.key_prefix + "}"
        self._last_clamp: dict[str, float] = {}
        # every replica follows the headers, so each clamps less often the more there are:
        # about ten clamps a second in all, whatever the number of replicas
        self._clamp_interval_s = max(0.1, 0.1 * settings.expected_replicas)
        self._shared_levels: dict[tuple[str, str], float] = {}
        self._levels_at = -1e18
        self._background: set[asyncio.Task[None]] = set()
        self.configure(config)

    @property
    def degraded(self) -> bool:
        return self.health.down

    def configure(self, config: LimitConfig) -> None:
        self._config = config
        self._local.configure(config)

    def _key(self, scope: str, dim: str) -> str:
        return f"{self._tag}:bucket:{scope}:{dim}"

    def _pause_key(self, scope: PauseScope) -> str:
        if scope == PauseScope("org", DEFAULT_CLASS):
            return f"{self._tag}:org:paused"
        return f"{self._tag}:paused:{scope.kind}:{scope.name}"

    def _pool_name(self, cost: Cost) -> str:
        return cost.model_class if cost.model_class in self._config.pools else DEFAULT_CLASS

    def _buckets(self, partner_id: str, pool: str) -> tuple[list[str], list[str], list[float], int]:
        """(keys, dimensions, capacities, how many lead keys are the partner's)."""
        keys: list[str] = []
        dims: list[str] = []
        caps: list[float] = []
        partner = self._config.partners.get(partner_id)
        for dim in DIMENSIONS:
            cap = getattr(partner, dim) if partner is not None else None
            if cap is not None:
                keys.append(self._key(f"partner:{partner_id}", dim))
                dims.append(dim)
                caps.append(float(cap))
        npartner = len(keys)
        limits = self._config.pool(pool)
        for dim in DIMENSIONS:
            cap = getattr(limits, dim)
            if cap is not None:
                keys.append(self._key(pool_label(pool), dim))
                dims.append(dim)
                caps.append(float(cap))
        return keys, dims, caps, npartner

    async def acquire(self, partner_id: str, cost: Cost) -> Decision:
        if self.degraded:
            return self._local.try_acquire(partner_id, cost)
        pool = self._pool_name(cost)
        keys, dims, caps, npartner = self._buckets(partner_id, pool)
        amounts = dict(zip(DIMENSIONS, cost.amounts(), strict=True))
        args: list[float | int] = [npartner]
        for dim, cap in zip(dims, caps, strict=True):
            args += [cap, amounts[dim]]
        pauses = [
            self._pause_key(PauseScope("key", self._config.scope_of(partner_id))),
            self._pause_key(PauseScope("org", pool)),
        ]
        try:
            ok, wait, scope = await self._acquire(keys=[*pauses, *keys], args=args)
        except REDIS_ERRORS as exc:
            self.health.failed(exc)
            return self._local.try_acquire(partner_id, cost)
        self.health.ok()
        if int(ok) == 1:
            return GRANTED
        return Decision(False, float(wait), _SCOPES.get(int(scope), "org"))

    def settle(self, partner_id: str, cost: Cost, usage: Usage | None) -> None:
        if self.degraded:
            self._local.settle(partner_id, cost, usage)
            return
        refund = dict(zip(DIMENSIONS, refund_amounts(cost, usage), strict=True))
        keys, dims, caps, _ = self._buckets(partner_id, self._pool_name(cost))
        args: list[float] = []
        used: list[str] = []
        for key, dim, cap in zip(keys, dims, caps, strict=True):
            if refund[dim] != 0:
                used.append(key)
                args += [cap, refund[dim]]
        if used:
            self._spawn(self._adjust(keys=used, args=args))

    def observe_headers(self, partner_id: str, cost: Cost, headers: Mapping[str, str]) -> None:
        self._local.observe_headers(partner_id, cost, headers)
        pool = self._pool_name(cost)
        now = self._clock()
        if self.degraded or now - self._last_clamp.get(pool, -1e18) < self._clamp_interval_s:
            return
        self._last_clamp[pool] = now
        keys: list[str] = []
        args: list[float] = []
        for r in read(headers, self._config.pool(pool)):
            if r.configured is None or r.remaining is None or r.relation == "below":
                continue  # not the org pool's figure (a workspace's), or not ours to follow
            keys.append(self._key(pool_label(pool), r.dim))
            args += [r.configured, r.remaining + (0.0 if r.dim == "rpm" else TOKEN_ROUNDING)]
        if keys:
            self._spawn(self._clamp(keys=keys, args=args))

    def pause(self, scope: PauseScope, seconds: float) -> None:
        self._local.pause(scope, seconds)
        if not self.degraded:
            self._spawn(self._pause(keys=[self._pause_key(scope)], args=[max(1, int(seconds * 1000))]))

    def levels(self) -> dict[tuple[str, str], float]:
        """The shared buckets' levels as last read from Redis (refreshed at most once a second,
        in the background); the local share's while Redis is down."""
        if self.degraded:
            return self._local.levels()
        if self._clock() - self._levels_at > _LEVELS_MAX_AGE_S:
            self._levels_at = self._clock()
            self._spawn(self._refresh_levels())
        return dict(self._shared_levels)

    async def _refresh_levels(self) -> None:
        names: list[tuple[str, str]] = []
        keys: list[str] = []
        caps: list[float] = []
        scopes = [(pool_label(n), lim) for n, lim in self._config.pools.items()]
        scopes += [(f"partner:{p}", lim) for p, lim in self._config.partners.items()]
        for scope, lim in scopes:
            for dim in DIMENSIONS:
                cap = getattr(lim, dim)
                if cap is not None:
                    names.append((scope.removeprefix("partner:"), dim))
                    keys.append(self._key(scope, dim))
                    caps.append(float(cap))
        if not keys:
            return
        raw = await self._levels(keys=keys, args=caps)
        self._shared_levels = {name: float(v) for name, v in zip(names, raw, strict=True)}

    def _local_share(self) -> float:
        return self._settings.degraded_share or 1.0 / self._settings.expected_replicas

    # -- degradation and recovery ----------------------------------------------------

    def _spawn(self, awaitable: Awaitable[Any]) -> None:
        async def run() -> None:
            try:
                await awaitable
            except REDIS_ERRORS as exc:
                self.health.failed(exc)
            else:
                self.health.ok()

        task = asyncio.get_running_loop().create_task(run())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _health_changed(self, down: bool) -> None:
        if down:
            log.warning("shared limits fall back to a local share", extra={"share": self._local_share()})
        if self._on_degraded is not None:
            self._on_degraded(down)

    async def aclose(self) -> None:
        for task in list(self._background):
            task.cancel()
        if self._owns_health:
            await self.health.aclose()
        if self._owns_client:
            await self._redis.aclose()


_SCOPES: dict[int, Scope] = {1: "partner", 2: "org", 3: "key"}
