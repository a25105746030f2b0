"""Budgets per partner: tokens and USD per day and per month (UTC periods).

- **Reserve at admission**: estimated input tokens and `max_tokens`, priced
  by `pricing.estimate` (the model's prices in `settings.models`). The request
  is refused when, in any period with a cap, what is used or reserved plus
  this reservation would exceed the cap.
- **Settle after the call** with what the real `usage` cost (`pricing.quote`: tokens
  of every kind, tier, speed, server tools; the very figure the response's `cost` and its
  metering record carry), refunding the difference; **release** the whole
  reservation when the call failed and nothing was billed.
- **Over budget**: `budget.on_exhausted: deadletter` dead-letters with
  `budget_exhausted` (retryable); `defer` holds the request until the period
  resets or a reload raises the cap. Held requests count against the
  partner's `max_queue`, so the ingest loop pauses its partitions when the
  queue is full, and other partners are not held up. When the service
  stops, held requests raise `Draining` and are redelivered later.

Where the counters live: with a `redis` section, in Redis, one hash per
partner and period (`{prefix}:budget:{partner}:day:2026-11-24` and
`...:month:2026-11`, the prefix in braces as a Redis Cluster hash tag; fields
`tokens` and `nusd`, nano-USD integers; expiring a day after the period
ends), changed only by atomic Lua scripts, so they are shared by every
replica and survive restarts. Without Redis, in process: they then start
from zero at every restart. If Redis cannot be reached, the in-process
counters (which mirror the last values read from Redis) take over until it
answers again; each replica then enforces the budget on its own, and what it
records meanwhile is added to the shared counters when Redis is back
(`budget_sync.py`). One slow call does not count as Redis down
(`service/config/redis_health.py`).

When the outcome of a call is unknown (a timeout or connection error, an
internal error, a cancelled task, a process killed mid-call) the reservation
stays counted until its period ends: budgets err on the side of the bill.
"""

from __future__ import annotations

import asyncio
import calendar
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from service.admission.admit import Admitted, Deferred, Rejected
from service.admission.budget_sync import OutageSpend
from service.admission.pricing import NANO_PER_USD, Amount, estimate
from service.config.redis_health import REDIS_ERRORS, RedisHealth
from service.config.settings import BudgetSettings
from service.contracts.reasons import Reason
from service.scheduling.scheduler import Draining

if TYPE_CHECKING:
    from service.admission.registry import Partner, Registry
    from service.telemetry.audit import Audit
    from service.telemetry.metrics import Metrics

log = logging.getLogger(__name__)

__all__ = [  # Amount and NANO_PER_USD live in pricing.py; importers of this module still see them
    "NANO_PER_USD",
    "Amount",
    "Budgets",
    "LocalLedger",
    "Period",
    "RedisLedger",
    "Reservation",
    "periods",
]
PeriodName = Literal["day", "month"]
Unit = Literal["tokens", "usd"]
_UNITS: tuple[Unit, ...] = ("tokens", "usd")
_GRACE_S = 86_400.0

_RESERVE = """
local tok = tonumber(ARGV[1])
local usd = tonumber(ARGV[2])
local used = {}
local refused, unit = 0, 0
for i = 1, #KEYS do
  local t = tonumber(redis.call('HGET', KEYS[i], 'tokens') or '0')
  local u = tonumber(redis.call('HGET', KEYS[i], 'nusd') or '0')
  used[2 * i - 1] = t
  used[2 * i] = u
  local base = 2 + (i - 1) * 3
  local tl, ul = tonumber(ARGV[base + 1]), tonumber(ARGV[base + 2])
  if refused == 0 then
    if tl >= 0 and t + tok > tl then refused, unit = i, 1
    elseif ul >= 0 and u + usd > ul then refused, unit = i, 2 end
  end
end
if refused == 0 then
  for i = 1, #KEYS do
    used[2 * i - 1] = redis.call('HINCRBY', KEYS[i], 'tokens', ARGV[1])
    used[2 * i] = redis.call('HINCRBY', KEYS[i], 'nusd', ARGV[2])
    redis.call('PEXPIRE', KEYS[i], ARGV[2 + (i - 1) * 3 + 3])
  end
end
local out = {refused, unit}
for j = 1, #used do out[#out + 1] = used[j] end
return out
"""

_ADJUST = """
local out = {}
for i = 1, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 1 then
    out[#out + 1] = redis.call('HINCRBY', KEYS[i], 'tokens', ARGV[1])
    out[#out + 1] = redis.call('HINCRBY', KEYS[i], 'nusd', ARGV[2])
  else
    out[#out + 1] = 0
    out[#out + 1] = 0
  end
end
return out
"""


@dataclass(frozen=True, slots=True)
class Period:
    name: PeriodName
    label: str
    """`2026-11-24` for a day, `2026-11` for a month (UTC)."""
    tokens_limit: int | None
    nusd_limit: int | None
    ends_at: float
    """Unix time the period ends."""

    def limit(self, unit: Unit) -> int | None:
        return self.tokens_limit if unit == "tokens" else self.nusd_limit


@dataclass(frozen=True, slots=True)
class Reservation:
    """What one admitted request holds in its partner's budget until it is settled."""

    partner_id: str
    model: str
    periods: tuple[Period, ...]
    amount: Amount
    shared: bool
    """Made in Redis (else in process)."""


@dataclass(frozen=True, slots=True)
class LedgerAnswer:
    ok: bool
    used: tuple[Amount, ...]
    """Per period, after the reservation (or as found, when refused)."""
    refused: tuple[int, Unit] | None = None
    """Index of the period and the unit that refused."""


# -- periods ---------------------------------------------------------------------------


def periods(budget: BudgetSettings, now: float) -> tuple[Period, ...]:
    """The periods with a cap, current at `now` (UTC)."""
    t = time.gmtime(now)
    out: list[Period] = []
    if budget.tokens_per_day is not None or budget.usd_per_day is not None:
        day_start = calendar.timegm((t.tm_year, t.tm_mon, t.tm_mday, 0, 0, 0))
        out.append(
            Period(
                "day",
                time.strftime("%Y-%m-%d", t),
                budget.tokens_per_day,
                _nano(budget.usd_per_day),
                day_start + 86_400.0,
            )
        )
    if budget.tokens_per_month is not None or budget.usd_per_month is not None:
        year, month = (t.tm_year + 1, 1) if t.tm_mon == 12 else (t.tm_year, t.tm_mon + 1)
        out.append(
            Period(
                "month",
                time.strftime("%Y-%m", t),
                budget.tokens_per_month,
                _nano(budget.usd_per_month),
                float(calendar.timegm((year, month, 1, 0, 0, 0))),
            )
        )
    return tuple(out)


def _nano(usd: float | None) -> int | None:
    return None if usd is None else round(usd * NANO_PER_USD)


# -- ledgers ---------------------------------------------------------------------------


class LocalLedger:
    """Budget counters in process: lost on restart, not shared between replicas."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._used: dict[tuple[str, str, str], tuple[Amount, float]] = {}

    def used(self, partner_id: str, period: Period) -> Amount:
        entry = self._used.get((partner_id, period.name, period.label))
        return entry[0] if entry is not None else Amount(0, 0)

    def reserve(self, partner_id: str, ps: Sequence[Period], amount: Amount) -> LedgerAnswer:
        self._expire()
        used = tuple(self.used(partner_id, p) for p in ps)
        for i, (p, u) in enumerate(zip(ps, used, strict=True)):
            if p.tokens_limit is not None and u.tokens + amount.tokens > p.tokens_limit:
                return LedgerAnswer(False, used, (i, "tokens"))
            if p.nusd_limit is not None and u.nusd + amount.nusd > p.nusd_limit:
                return LedgerAnswer(False, used, (i, "usd"))
        after = tuple(Amount(u.tokens + amount.tokens, u.nusd + amount.nusd) for u in used)
        for p, a in zip(ps, after, strict=True):
            self._used[(partner_id, p.name, p.label)] = (a, p.ends_at)
        return LedgerAnswer(True, after)

    def adjust(self, partner_id: str, ps: Sequence[Period], delta: Amount) -> tuple[Amount, ...]:
        out = []
        for p in ps:
            key = (partner_id, p.name, p.label)
            if key not in self._used:
                out.append(Amount(0, 0))
                continue
            u = self._used[key][0]
            a = Amount(u.tokens + delta.tokens, u.nusd + delta.nusd)
            self._used[key] = (a, p.ends_at)
            out.append(a)
        return tuple(out)

    def mirror(self, partner_id: str, ps: Sequence[Period], used: Sequence[Amount]) -> None:
        """Take over the values read from Redis (the fallback while Redis is unreachable)."""
        for p, u in zip(ps, used, strict=True):
            self._used[(partner_id, p.name, p.label)] = (u, p.ends_at)

    def _expire(self) -> None:
        now = self._clock()
        for key in [k for k, (_, ends_at) in self._used.items() if ends_at + _GRACE_S < now]:
            del self._used[key]


class RedisLedger:
    """Budget counters in Redis: shared, durable, changed only by atomic scripts."""

    def __init__(self, redis: Any, key_prefix: str, clock: Callable[[], float] = time.time) -> None:
        self._tag = "{" + key_prefix + "}"  # one hash slot: the scripts also run on Redis Cluster
        self._clock = clock
        self.redis = redis
        self._reserve = redis.register_script(_RESERVE)
        self._adjust = redis.register_script(_ADJUST)

    def key(self, partner_id: str, period: Period) -> str:
        return f"{self._tag}:budget:{partner_id}:{period.name}:{period.label}"

    async def reserve(self, partner_id: str, ps: Sequence[Period], amount: Amount) -> LedgerAnswer:
        now = self._clock()
        args: list[int] = [amount.tokens, amount.nusd]
        for p in ps:
            ttl_ms = max(1000, int((p.ends_at + _GRACE_S - now) * 1000))
            args += [_or_minus_one(p.tokens_limit), _or_minus_one(p.nusd_limit), ttl_ms]
        raw = await self._reserve(keys=[self.key(partner_id, p) for p in ps], args=args)
        refused, unit = int(raw[0]), int(raw[1])
        used = tuple(Amount(int(raw[2 + 2 * i]), int(raw[3 + 2 * i])) for i in range(len(ps)))
        if refused:
            return LedgerAnswer(False, used, (refused - 1, "tokens" if unit == 1 else "usd"))
        return LedgerAnswer(True, used)

    async def adjust(self, partner_id: str, ps: Sequence[Period], delta: Amount) -> tuple[Amount, ...]:
        raw = await self._adjust(keys=[self.key(partner_id, p) for p in ps], args=[delta.tokens, delta.nusd])
        return tuple(Amount(int(raw[2 * i]), int(raw[2 * i + 1])) for i in range(len(ps)))


def _or_minus_one(value: int | None) -> int:
    return -1 if value is None else value


# -- the front ----------------------------------------------------------------------------


class Budgets:
    """Reserve, settle and release partner spend against the current registry's budgets."""

    def __init__(
        self,
        registry: Callable[[], Registry],
        *,
        shared: RedisLedger | None = None,
        local: LocalLedger | None = None,
        metrics: Metrics | None = None,
        audit: Audit | None = None,
        clock: Callable[[], float] = time.time,
        health: RedisHealth | None = None,
    ) -> None:
        self._registry = registry
        self.shared = shared
        self._owns_health = health is None
        self.health = health or (RedisHealth(shared.redis) if shared is not None else None)
        if self.health is not None:
            self.health.subscribe(self._health_changed)
        self.outage = OutageSpend(clock)
        self._pushing: asyncio.Task[None] | None = None
        self.local = local or LocalLedger(clock)
        self._metrics = metrics
        self._audit = audit
        self._clock = clock
        self._changed = asyncio.Event()
        self._exhausted_seen: set[tuple[str, str, str]] = set()
        self._closed = False

    def close(self) -> None:
        """The service stops: deferred requests give up (`Draining`) and are redelivered later."""
        self._closed = True
        self.config_changed()

    async def aclose(self, push_timeout_s: float = 2.0) -> None:
        """Let a push of outage spend to Redis finish (briefly), then stop the health probe
        this object started (a health passed in belongs to its owner)."""
        self.close()
        if self._pushing is not None and not self._pushing.done():
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(self._pushing, push_timeout_s)
        if self._owns_health and self.health is not None:
            await self.health.aclose()

    def config_changed(self) -> None:
        """Wake deferred requests: a reload may have raised a budget or disabled a partner."""
        event, self._changed = self._changed, asyncio.Event()
        event.set()

    async def reserve(
        self, partner: Partner, admitted: Admitted, *, wait: bool = True, service_tier: str | None = None
    ) -> Reservation | Rejected | Deferred:
        """Reserve the request's estimated cost. With `on_exhausted: defer`, an exhausted
        budget waits (``wait``) or answers `Deferred` so the caller can give back what it
        holds (a concurrency slot) while it waits (`wait_for_budget`)."""
        pid, rid, model = partner.id, admitted.request_id, admitted.model
        while True:
            if self._closed:
                raise Draining
            registry = self._registry()
            current = registry.by_id.get(pid)
            if current is None or not current.settings.enabled:
                return Rejected(pid, Reason.PARTNER_DISABLED, f"partner {pid!r} is disabled", rid)
            budget = current.settings.budget
            ps = periods(budget, self._clock())
            if not ps:
                return Reservation(pid, model, (), Amount(0, 0), shared=False)
            amount = estimate(
                registry.settings.models.get(model),
                admitted.est_input_tokens,
                admitted.max_tokens,
                speed=admitted.params.get("speed"),
                service_tier=service_tier,
            )
            for p in ps:
                for unit in _UNITS:
                    limit, need = p.limit(unit), _of(amount, unit)
                    if limit is not None and need > limit:
                        return Rejected(
                            pid,
                            Reason.BUDGET_EXHAUSTED,
                            f"this request alone reserves {_show(unit, need)}, more than "
                            f"partners[{pid}].budget.{_setting(p, unit)} ({_show(unit, limit)})",
                            rid,
                        )
            answer, shared = await self._ledger_reserve(pid, ps, amount)
            self._observe(pid, ps, answer.used)
            if answer.ok:
                return Reservation(pid, model, ps, amount, shared)
            assert answer.refused is not None
            index, unit = answer.refused
            p = ps[index]
            self._exhausted(pid, p, unit, answer.used[index], budget)
            if budget.on_exhausted == "deadletter":
                return Rejected(
                    pid,
                    Reason.BUDGET_EXHAUSTED,
                    f"partners[{pid}].budget.{_setting(p, unit)} is {_show(unit, p.limit(unit))}; "
                    f"{_show(unit, _of(answer.used[index], unit))} used or reserved this {p.name} "
                    f"({p.label}), this request reserves {_show(unit, _of(amount, unit))}",
                    rid,
                )
            if not wait:
                return Deferred(p.ends_at)
            await self._wait(p.ends_at, registry.settings.runtime.budget_defer_poll_s)

    async def wait_for_budget(self, deferred: Deferred) -> None:
        """Wait until a deferred request should look again (a refund, a reload, a new period)."""
        if self._closed:
            raise Draining
        await self._wait(deferred.period_end, self._registry().settings.runtime.budget_defer_poll_s)

    async def settle(self, reservation: Reservation, cost: Amount) -> None:
        """Replace the reservation by what the call really cost (`pricing.Quote.amount`, the
        figure the response and its metering record carry). Never raises."""
        if reservation.periods:
            await self._adjust(reservation, cost - reservation.amount)

    async def release(self, reservation: Reservation) -> None:
        """Give the whole reservation back (nothing was billed). Never raises."""
        if reservation.periods:
            await self._adjust(reservation, -reservation.amount)

    # -- internals --------------------------------------------------------------------------

    async def _ledger_reserve(
        self, pid: str, ps: tuple[Period, ...], amount: Amount
    ) -> tuple[LedgerAnswer, bool]:
        if self.shared is not None and not self.degraded:
            try:
                answer = await self.shared.reserve(pid, ps, amount)
            except REDIS_ERRORS as exc:
                self._failed(exc)
            else:
                self._answered()
                self._mirror(pid, ps, answer.used)
                return answer, True
        answer = self.local.reserve(pid, ps, amount)
        if answer.ok and self.shared is not None:
            self.outage.record(pid, ps, amount)  # the shared ledger gets it when Redis is back
        return answer, False

    async def _adjust(self, res: Reservation, delta: Amount) -> None:
        if delta.tokens == 0 and delta.nusd == 0:
            return
        pid = res.partner_id
        if res.shared and self.shared is not None and not self.degraded:
            try:
                used = await self.shared.adjust(pid, res.periods, delta)
            except REDIS_ERRORS as exc:
                self._failed(exc)
            else:
                self._answered()
                self._mirror(pid, res.periods, used)
                self._observe(pid, res.periods, used)
                return
        used = self.local.adjust(pid, res.periods, delta)
        if self.shared is not None:
            self.outage.record(pid, res.periods, delta)  # the shared ledger gets it when Redis is back
        self._observe(pid, res.periods, used)

    def _observe(self, pid: str, ps: Sequence[Period], used: Sequence[Amount]) -> None:
        if self._metrics is None:
            return
        for p, u in zip(ps, used, strict=True):
            if p.nusd_limit is not None:
                remaining = max(0, p.nusd_limit - u.nusd) / NANO_PER_USD
                self._metrics.budget_remaining.labels(pid, p.name).set(remaining)

    def _exhausted(self, pid: str, p: Period, unit: Unit, used: Amount, budget: BudgetSettings) -> None:
        key = (pid, p.name, p.label)
        if key in self._exhausted_seen:
            return
        self._exhausted_seen.add(key)
        if len(self._exhausted_seen) > 10_000:
            self._exhausted_seen = {key}
        fields: dict[str, str | int | float | None] = {
            "period": p.name,
            "period_label": p.label,
            "unit": unit,
            "limit": _number(unit, p.limit(unit)),
            "used": _number(unit, _of(used, unit)),
            "on_exhausted": budget.on_exhausted,
        }
        if self._audit is not None:
            self._audit.emit("budget_exhausted", pid, **fields)
        else:
            log.warning("budget exhausted", extra={"partner": pid, **fields})

    async def _wait(self, period_end: float, poll_s: float) -> None:
        timeout = max(0.01, min(poll_s, period_end - self._clock()))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout)

    # -- the shared ledger's health ----------------------------------------------------------

    @property
    def degraded(self) -> bool:
        """Redis is down: budgets are enforced per replica from the last known usage."""
        return self.health is not None and self.health.down

    def _failed(self, exc: BaseException) -> None:
        if self.health is not None:
            self.health.failed(exc)

    def _answered(self) -> None:
        if self.health is not None:
            self.health.ok()
        if self.outage and (self._pushing is None or self._pushing.done()):
            self._pushing = asyncio.get_running_loop().create_task(self._push())

    def _mirror(self, pid: str, ps: Sequence[Period], used: Sequence[Amount]) -> None:
        """Take Redis' figures, plus what this replica spent that Redis does not have yet."""
        pending = [self.outage.pending(pid, p) for p in ps]
        self.local.mirror(
            pid, ps, [Amount(u.tokens + t, u.nusd + n) for u, (t, n) in zip(used, pending, strict=True)]
        )

    async def _health_changed(self, down: bool) -> None:
        if down:
            log.warning("budget store unreachable: budgets enforced per replica from the last known usage")
        else:
            await self._push()

    async def _push(self) -> None:
        if self.shared is None or not self.outage:
            return
        try:
            await self.outage.push(self.shared)
        except REDIS_ERRORS as exc:
            self._failed(exc)


def _of(amount: Amount, unit: Unit) -> int:
    return amount.tokens if unit == "tokens" else amount.nusd


def _setting(p: Period, unit: Unit) -> str:
    return f"{'tokens' if unit == 'tokens' else 'usd'}_per_{p.name}"


def _number(unit: Unit, value: int | None) -> int | float | None:
    if value is None:
        return None
    return value if unit == "tokens" else value / NANO_PER_USD


def _show(unit: Unit, value: int | None) -> str:
    if value is None:
        return "no cap"
    return f"{value} tokens" if unit == "tokens" else f"{value / NANO_PER_USD:.6f} USD"
