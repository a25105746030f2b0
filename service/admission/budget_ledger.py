"""Budget counters: the periods a partner's caps apply to, and the two ledgers that count
spend in them (in process, or in Redis through atomic Lua scripts). `budget.py` decides what to
reserve, settle and release; this module only counts.

Redis keys: one hash per partner and period (`{prefix}:budget:{partner}:day:2026-11-24` and
`...:month:2026-11`, the prefix in braces as a Redis Cluster hash tag), fields `tokens` and
`nusd` (nano-USD integers), expiring `GRACE_S` after the period ends.
"""

from __future__ import annotations

import calendar
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from service.admission.pricing import NANO_PER_USD, Amount
from service.config.redis_epoch import RedisEpoch, register
from service.config.settings import BudgetSettings

PeriodName = Literal["day", "month"]
Unit = Literal["tokens", "usd"]
GRACE_S = 86_400.0
"""How long a period's counters are kept after it ends (a day)."""
ONCE_TTL_S = 7 * 86_400.0
"""How long an `adjust(once=...)` key is remembered: far longer than a batch worker takes to
come back and publish again what it published before a crash."""

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

_ADJUST_ONCE = """
local n = #KEYS - 1
local first = redis.call('SET', KEYS[#KEYS], '1', 'NX', 'PX', ARGV[3])
local out = {}
for i = 1, n do
  if first and redis.call('EXISTS', KEYS[i]) == 1 then
    out[#out + 1] = redis.call('HINCRBY', KEYS[i], 'tokens', ARGV[1])
    out[#out + 1] = redis.call('HINCRBY', KEYS[i], 'nusd', ARGV[2])
  else
    out[#out + 1] = tonumber(redis.call('HGET', KEYS[i], 'tokens') or '0')
    out[#out + 1] = tonumber(redis.call('HGET', KEYS[i], 'nusd') or '0')
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

    def entries(self) -> list[tuple[str, str, str, Amount, float]]:
        """Every counter held: partner, period name and label, amount, when the period ends."""
        return [(pid, name, label, a, end) for (pid, name, label), (a, end) in self._used.items()]

    def mirror(self, partner_id: str, ps: Sequence[Period], used: Sequence[Amount]) -> None:
        """Take over the values read from Redis (the fallback while Redis is unreachable)."""
        for p, u in zip(ps, used, strict=True):
            self._used[(partner_id, p.name, p.label)] = (u, p.ends_at)

    def _expire(self) -> None:
        now = self._clock()
        for key in [k for k, (_, ends_at) in self._used.items() if ends_at + GRACE_S < now]:
            del self._used[key]


class RedisLedger:
    """Budget counters in Redis: shared, durable, changed only by atomic scripts."""

    def __init__(
        self,
        redis: Any,
        key_prefix: str,
        clock: Callable[[], float] = time.time,
        epoch: RedisEpoch | None = None,
    ) -> None:
        self._tag = "{" + key_prefix + "}"  # one hash slot: the scripts also run on Redis Cluster
        self._clock = clock
        self.redis = redis
        self.epoch = epoch
        """Scripts that count run only while Redis holds this epoch (`redis_epoch.py`)."""
        self._reserve = self.script(_RESERVE)
        self._adjust = self.script(_ADJUST)
        self._adjust_once = self.script(_ADJUST_ONCE)

    def script(self, body: str) -> Any:
        """A script that counts: guarded by the epoch when there is one."""
        return register(self.redis, body, self.epoch)

    def key(self, partner_id: str, period: Period) -> str:
        return self.key_of(partner_id, period.name, period.label)

    def key_of(self, partner_id: str, name: str, label: str) -> str:
        return f"{self._tag}:budget:{partner_id}:{name}:{label}"

    async def reserve(self, partner_id: str, ps: Sequence[Period], amount: Amount) -> LedgerAnswer:
        now = self._clock()
        args: list[int] = [amount.tokens, amount.nusd]
        for p in ps:
            ttl_ms = max(1000, int((p.ends_at + GRACE_S - now) * 1000))
            args += [_or_minus_one(p.tokens_limit), _or_minus_one(p.nusd_limit), ttl_ms]
        raw = await self._reserve(keys=[self.key(partner_id, p) for p in ps], args=args)
        refused, unit = int(raw[0]), int(raw[1])
        used = tuple(Amount(int(raw[2 + 2 * i]), int(raw[3 + 2 * i])) for i in range(len(ps)))
        if refused:
            return LedgerAnswer(False, used, (refused - 1, "tokens" if unit == 1 else "usd"))
        return LedgerAnswer(True, used)

    async def adjust(
        self, partner_id: str, ps: Sequence[Period], delta: Amount, once: str | None = None
    ) -> tuple[Amount, ...]:
        """Add `delta`; with `once`, only the first time that key is given (within `ONCE_TTL_S`),
        in the same script: a step redone after a crash counts once."""
        keys = [self.key(partner_id, p) for p in ps]
        if once is None:
            raw = await self._adjust(keys=keys, args=[delta.tokens, delta.nusd])
        else:
            marker = f"{self._tag}:once:{once}"
            raw = await self._adjust_once(
                keys=[*keys, marker], args=[delta.tokens, delta.nusd, int(ONCE_TTL_S * 1000)]
            )
        return tuple(Amount(int(raw[2 * i]), int(raw[2 * i + 1])) for i in range(len(ps)))


def _or_minus_one(value: int | None) -> int:
    return -1 if value is None else value
