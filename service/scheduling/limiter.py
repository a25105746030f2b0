"""Rate limiters: org pools per model class, partner buckets, and 429 pauses per scope.

`acquire` reserves a request's cost in the partner's buckets and in the org pool
of its model class at once (all or nothing) and says how long to wait, and whose
limit binds, when it cannot. `settle` refunds what the call did not use. An
answer's `anthropic-ratelimit-*` headers update the pool the call drew on
(`ratelimits.py` says how a reported limit is read), and a 429 pauses only the
scope it is about: one org pool, or one key scope (the key or its workspace).

`LocalLimiter` keeps the buckets in process (one replica, or the degraded
share of several); `service.scheduling.redis_limiter` shares them through Redis.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal, Protocol

from service.config.settings import LimitSettings
from service.scheduling.buckets import TokenBucket
from service.scheduling.pools import DEFAULT_CLASS, DIMENSIONS, LimitConfig, PauseScope, pool_label
from service.scheduling.ratelimits import TOKEN_ROUNDING, LimitWatch, parse_ratelimit_headers, read

__all__ = [
    "DIMENSIONS",
    "GRANTED",
    "NOT_CALLED",
    "Cost",
    "Decision",
    "LimitConfig",
    "Limiter",
    "LocalLimiter",
    "Usage",
    "parse_ratelimit_headers",
    "refund_amounts",
]

Scope = Literal["partner", "key", "org"]


@dataclass(frozen=True, slots=True)
class Cost:
    """What one attempt reserves: a request, estimated input and max output tokens, in a pool."""

    input_tokens: int
    output_tokens: int
    model_class: str = DEFAULT_CLASS

    def amounts(self) -> tuple[float, float, float]:
        return (1.0, float(self.input_tokens), float(self.output_tokens))


@dataclass(frozen=True, slots=True)
class Usage:
    """What the call really used, as the limits count it."""

    input_tokens: int
    """Input tokens that count toward ITPM: `input_tokens + cache_creation_input_tokens`
    (cache reads do not count on current models)."""
    output_tokens: int
    requests: int = 1
    """0 when the call was never made: the request itself is refunded too."""


NOT_CALLED = Usage(0, 0, 0)
"""Settle a turn whose call never started: everything comes back."""


@dataclass(frozen=True, slots=True)
class Decision:
    ok: bool
    wait_s: float = 0.0
    scope: Scope | None = None
    """Whose limit binds: the partner's own buckets, its key scope (paused), or the org pool."""


GRANTED = Decision(True)


class Limiter(Protocol):
    async def acquire(self, partner_id: str, cost: Cost) -> Decision: ...
    def settle(self, partner_id: str, cost: Cost, usage: Usage | None) -> None: ...
    def observe_headers(self, partner_id: str, cost: Cost, headers: Mapping[str, str]) -> None: ...
    def pause(self, scope: PauseScope, seconds: float) -> None: ...
    def configure(self, config: LimitConfig) -> None: ...
    def levels(self) -> dict[tuple[str, str], float]: ...


class _BucketSet:
    def __init__(self, limits: LimitSettings, now: float, share: float) -> None:
        self.buckets: dict[str, TokenBucket] = {}
        self.configure(limits, now, share)

    def configure(self, limits: LimitSettings, now: float, share: float) -> None:
        for dim in DIMENSIONS:
            limit = getattr(limits, dim)
            if limit is None:
                self.buckets.pop(dim, None)
            elif dim in self.buckets:
                self.buckets[dim].resize(limit * share, now)
            else:
                self.buckets[dim] = TokenBucket.per_minute(limit, now, share)

    def wait_s(self, amounts: tuple[float, float, float], now: float) -> float:
        wait = 0.0
        for dim, amount in zip(DIMENSIONS, amounts, strict=True):
            bucket = self.buckets.get(dim)
            if bucket is not None and amount > 0:
                wait = max(wait, bucket.wait_s(amount, now))
        return wait

    def take(self, amounts: tuple[float, float, float]) -> None:
        for dim, amount in zip(DIMENSIONS, amounts, strict=True):
            bucket = self.buckets.get(dim)
            if bucket is not None:
                bucket.take(amount)

    def give(self, amounts: tuple[float, float, float], now: float) -> None:
        for dim, amount in zip(DIMENSIONS, amounts, strict=True):
            bucket = self.buckets.get(dim)
            if bucket is not None and amount != 0:
                bucket.refill(now)
                if amount > 0:
                    bucket.give(amount)
                else:
                    bucket.take(-amount)  # used more than reserved


def refund_amounts(cost: Cost, usage: Usage | None) -> tuple[float, float, float]:
    """What to give back after a call: unused input estimate and unused max_tokens, and the
    request itself only when the call was never made (the upstream counted it otherwise)."""
    if usage is None:
        return (0.0, 0.0, 0.0)
    return (
        float(1 - min(1, usage.requests)),
        float(cost.input_tokens - usage.input_tokens),
        float(cost.output_tokens - usage.output_tokens),
    )


class LocalLimiter:
    """Org pools and partner buckets in this process. `share` scales every limit (degraded mode)."""

    def __init__(
        self,
        config: LimitConfig | LimitSettings,
        partners: Mapping[str, LimitSettings] | None = None,
        *,
        share: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clock = clock
        self._share = share
        self._config = LimitConfig.simple(LimitSettings())
        self._pools: dict[str, _BucketSet] = {}
        self._partners: dict[str, _BucketSet] = {}
        self._paused: dict[PauseScope, float] = {}
        self._watch = LimitWatch()
        if isinstance(config, LimitSettings):
            config = LimitConfig.simple(config, partners)
        self.configure(config)

    @property
    def config(self) -> LimitConfig:
        return self._config

    def configure(self, config: LimitConfig) -> None:
        now = self._clock()
        self._config = config
        for name, lim in config.pools.items():
            if name in self._pools:
                self._pools[name].configure(lim, now, self._share)
            else:
                self._pools[name] = _BucketSet(lim, now, self._share)
        for name in self._pools.keys() - config.pools.keys():
            del self._pools[name]
        for pid, lim in config.partners.items():
            if pid in self._partners:
                self._partners[pid].configure(lim, now, self._share)
            else:
                self._partners[pid] = _BucketSet(lim, now, self._share)

    def _pool(self, cost: Cost) -> _BucketSet:
        return self._pools.get(cost.model_class) or self._pools[DEFAULT_CLASS]

    def _pause_left(self, scope: PauseScope, now: float) -> float:
        until = self._paused.get(scope)
        if until is None:
            return 0.0
        if until <= now:
            del self._paused[scope]
            return 0.0
        return until - now

    def try_acquire(self, partner_id: str, cost: Cost) -> Decision:
        now = self._clock()
        amounts = cost.amounts()
        partner = self._partners.get(partner_id)
        if partner is not None:
            wait = partner.wait_s(amounts, now)
            if wait > 0:
                return Decision(False, wait, "partner")
        if self._paused:
            key_wait = self._pause_left(PauseScope("key", self._config.scope_of(partner_id)), now)
            if key_wait > 0:
                return Decision(False, key_wait, "key")
            org_wait = self._pause_left(PauseScope("org", cost.model_class), now)
            if org_wait > 0:
                return Decision(False, org_wait, "org")
        pool = self._pool(cost)
        wait = pool.wait_s(amounts, now)
        if wait > 0:
            return Decision(False, wait, "org")
        if partner is not None:
            partner.take(amounts)
        pool.take(amounts)
        return GRANTED

    async def acquire(self, partner_id: str, cost: Cost) -> Decision:
        return self.try_acquire(partner_id, cost)

    def settle(self, partner_id: str, cost: Cost, usage: Usage | None) -> None:
        refund = refund_amounts(cost, usage)
        if refund == (0.0, 0.0, 0.0):
            return
        now = self._clock()
        self._pool(cost).give(refund, now)
        partner = self._partners.get(partner_id)
        if partner is not None:
            partner.give(refund, now)

    def observe_headers(self, partner_id: str, cost: Cost, headers: Mapping[str, str]) -> None:
        """Follow the upstream's view of the pool `cost` drew on (never beyond the configured
        limit, unless `follow_header_limits`); a lower reported limit is the key's, not the org's."""
        now = self._clock()
        name = cost.model_class if cost.model_class in self._pools else DEFAULT_CLASS
        pool = self._pools[name]
        follow = self._config.follow_header_limits
        scope = self._config.scope_of(partner_id)
        for r in read(headers, self._config.pool(name)):
            self._watch.note(pool_label(name), scope, r, follow)
            bucket = pool.buckets.get(r.dim)
            if bucket is None or r.relation == "below":
                continue
            if r.relation == "above" and follow and r.limit is not None:
                bucket.resize(r.limit * self._share, now)
            if r.remaining is not None:
                slack = 0.0 if r.dim == "rpm" else TOKEN_ROUNDING
                bucket.clamp((r.remaining + slack) * self._share, now)

    def pause(self, scope: PauseScope, seconds: float) -> None:
        until = self._clock() + seconds
        if self._paused.get(scope, 0.0) < until:
            self._paused[scope] = until

    def paused_s(self, scope: PauseScope) -> float:
        """Seconds `scope` stays paused (0 when it is not)."""
        return self._pause_left(scope, self._clock())

    def levels(self) -> dict[tuple[str, str], float]:
        now = self._clock()
        out: dict[tuple[str, str], float] = {}
        sets = [(pool_label(n), bs) for n, bs in self._pools.items()] + list(self._partners.items())
        for scope, bs in sets:
            for dim, bucket in bs.buckets.items():
                bucket.refill(now)
                out[(scope, dim)] = bucket.level
        return out
