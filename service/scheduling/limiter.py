"""Rate limiters: org-wide and per-partner RPM / ITPM / OTPM buckets.

`acquire` reserves a request's cost in the partner's buckets and the org's at
once (all or nothing) and says how long to wait when it cannot. `settle`
refunds what the call did not use. The org buckets follow the upstream's
`anthropic-ratelimit-*` headers, and a 429's `retry-after` pauses every draw
on the org buckets, not just one request.

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

Scope = Literal["partner", "org"]
DIMENSIONS = ("rpm", "itpm", "otpm")
# anthropic-ratelimit-<name>-remaining|limit -> our dimension
HEADER_DIMENSIONS = {"requests": "rpm", "input-tokens": "itpm", "output-tokens": "otpm"}


@dataclass(frozen=True, slots=True)
class Cost:
    """What one attempt reserves: a request, estimated input and max output tokens."""

    input_tokens: int
    output_tokens: int

    def amounts(self) -> tuple[float, float, float]:
        return (1.0, float(self.input_tokens), float(self.output_tokens))


@dataclass(frozen=True, slots=True)
class Usage:
    """What the call really used (None for a dimension means: unknown, keep the reservation)."""

    input_tokens: int
    output_tokens: int


@dataclass(frozen=True, slots=True)
class Decision:
    ok: bool
    wait_s: float = 0.0
    scope: Scope | None = None


GRANTED = Decision(True)


class Limiter(Protocol):
    async def acquire(self, partner_id: str, cost: Cost) -> Decision: ...
    def settle(self, partner_id: str, cost: Cost, usage: Usage | None) -> None: ...
    def observe_headers(self, headers: Mapping[str, str]) -> None: ...
    def pause(self, seconds: float) -> None: ...
    def configure(self, org: LimitSettings, partners: Mapping[str, LimitSettings]) -> None: ...
    def levels(self) -> dict[tuple[str, str], float]: ...


def parse_ratelimit_headers(headers: Mapping[str, str]) -> dict[str, tuple[float | None, float | None]]:
    """{dimension: (limit, remaining)} from the anthropic-ratelimit-* headers present."""
    out: dict[str, tuple[float | None, float | None]] = {}
    for name, dim in HEADER_DIMENSIONS.items():
        limit = _num(headers.get(f"anthropic-ratelimit-{name}-limit"))
        remaining = _num(headers.get(f"anthropic-ratelimit-{name}-remaining"))
        if limit is not None or remaining is not None:
            out[dim] = (limit, remaining)
    return out


def _num(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        return None


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
    """What to give back after a call: unused input estimate and unused max_tokens.

    The request itself is never refunded: the upstream counted it.
    """
    if usage is None:
        return (0.0, 0.0, 0.0)
    return (
        0.0,
        float(cost.input_tokens - usage.input_tokens),
        float(cost.output_tokens - usage.output_tokens),
    )


class LocalLimiter:
    """Org and partner buckets in this process. `share` scales every limit (degraded mode)."""

    def __init__(
        self,
        org: LimitSettings,
        partners: Mapping[str, LimitSettings],
        *,
        share: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clock = clock
        self._share = share
        now = clock()
        self._org = _BucketSet(org, now, share)
        self._partners: dict[str, _BucketSet] = {
            p: _BucketSet(lim, now, share) for p, lim in partners.items()
        }
        self._paused_until = 0.0

    def configure(self, org: LimitSettings, partners: Mapping[str, LimitSettings]) -> None:
        now = self._clock()
        self._org.configure(org, now, self._share)
        for pid, lim in partners.items():
            if pid in self._partners:
                self._partners[pid].configure(lim, now, self._share)
            else:
                self._partners[pid] = _BucketSet(lim, now, self._share)

    def try_acquire(self, partner_id: str, cost: Cost) -> Decision:
        now = self._clock()
        amounts = cost.amounts()
        partner = self._partners.get(partner_id)
        if partner is not None:
            wait = partner.wait_s(amounts, now)
            if wait > 0:
                return Decision(False, wait, "partner")
        if now < self._paused_until:
            return Decision(False, self._paused_until - now, "org")
        wait = self._org.wait_s(amounts, now)
        if wait > 0:
            return Decision(False, wait, "org")
        if partner is not None:
            partner.take(amounts)
        self._org.take(amounts)
        return GRANTED

    async def acquire(self, partner_id: str, cost: Cost) -> Decision:
        return self.try_acquire(partner_id, cost)

    def settle(self, partner_id: str, cost: Cost, usage: Usage | None) -> None:
        refund = refund_amounts(cost, usage)
        if refund == (0.0, 0.0, 0.0):
            return
        now = self._clock()
        self._org.give(refund, now)
        partner = self._partners.get(partner_id)
        if partner is not None:
            partner.give(refund, now)

    def observe_headers(self, headers: Mapping[str, str]) -> None:
        now = self._clock()
        for dim, (limit, remaining) in parse_ratelimit_headers(headers).items():
            bucket = self._org.buckets.get(dim)
            if bucket is None:
                continue
            if limit is not None and limit * self._share < bucket.capacity:
                bucket.resize(limit * self._share, now)
            if remaining is not None:
                # tokens remaining are rounded to the nearest thousand upstream
                slack = 0.0 if dim == "rpm" else 500.0
                bucket.clamp((remaining + slack) * self._share, now)

    def pause(self, seconds: float) -> None:
        self._paused_until = max(self._paused_until, self._clock() + seconds)

    def levels(self) -> dict[tuple[str, str], float]:
        now = self._clock()
        out: dict[tuple[str, str], float] = {}
        for scope, bs in (("org", self._org), *self._partners.items()):
            for dim, bucket in bs.buckets.items():
                bucket.refill(now)
                out[(scope, dim)] = bucket.level
        return out
