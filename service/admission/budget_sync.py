"""Spend the shared budget ledger has not seen: made while it could not be reached, or lost
with an emptied Redis.

While Redis is down (or one call to it failed), `Budgets` reserves and settles in the
local ledger. Each such change is also kept here, per partner and period, and added to
the shared counters (HINCRBY, creating them with their expiry if they are gone) as soon
as Redis answers again: the shared totals then include what was spent during the outage,
instead of the local ledger being overwritten by Redis' older figures. A change is
dropped from here only once Redis has it. Like the rest of the budgets, it errs on the
side of the bill: a call that timed out may have reached Redis and is added again.

When Redis has lost its data (`service/config/redis_epoch.py`), `write_back` raises each
shared counter to the figure this replica last read from it: every replica does, so the
highest copy wins, and nothing counted since is lowered. The outage spend not yet pushed
is left out (the push adds it after).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from service.admission.budget_ledger import GRACE_S

if TYPE_CHECKING:
    from service.admission.budget_ledger import LocalLedger, Period, RedisLedger
    from service.admission.pricing import Amount

log = logging.getLogger(__name__)

# KEYS = budget hashes; ARGV = tokens, nusd, then a TTL in ms per key. Adds, creating a missing key.
_ADD = """
for i = 1, #KEYS do
  redis.call('HINCRBY', KEYS[i], 'tokens', ARGV[1])
  redis.call('HINCRBY', KEYS[i], 'nusd', ARGV[2])
  if redis.call('PTTL', KEYS[i]) < 0 then redis.call('PEXPIRE', KEYS[i], ARGV[2 + i]) end
end
return 1
"""


# KEYS = budget hashes; ARGV = tokens, nusd, TTL in ms per key. Raises, never lowers.
_RAISE = """
for i = 1, #KEYS do
  local base = (i - 1) * 3
  for j, field in ipairs({'tokens', 'nusd'}) do
    local want = tonumber(ARGV[base + j])
    if tonumber(redis.call('HGET', KEYS[i], field) or '0') < want then
      redis.call('HSET', KEYS[i], field, ARGV[base + j])
    end
  end
  if redis.call('PTTL', KEYS[i]) < 0 then redis.call('PEXPIRE', KEYS[i], ARGV[base + 3]) end
end
return #KEYS
"""
_WRITE_BACK_CHUNK = 200


class OutageSpend:
    """Changes to budget counters that the shared ledger has not seen yet."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._pending: dict[tuple[str, str, str], tuple[int, int, Period]] = {}
        self._script: Any = None

    def __bool__(self) -> bool:
        return bool(self._pending)

    def record(self, partner_id: str, ps: Sequence[Period], delta: Amount) -> None:
        for p in ps:
            key = (partner_id, p.name, p.label)
            tokens, nusd, _ = self._pending.get(key, (0, 0, p))
            self._pending[key] = (tokens + delta.tokens, nusd + delta.nusd, p)

    def pending(self, partner_id: str, period: Period) -> tuple[int, int]:
        tokens, nusd, _ = self._pending.get((partner_id, period.name, period.label), (0, 0, period))
        return tokens, nusd

    async def push(self, ledger: RedisLedger) -> int:
        """Add every pending change to the shared ledger; returns how many were added. Raises the
        Redis error that stopped it (what was not added stays pending)."""
        if self._script is None:
            self._script = ledger.script(_ADD)
        now = self._clock()
        pushed = 0
        for key, (tokens, nusd, p) in list(self._pending.items()):
            if p.ends_at + GRACE_S < now:
                del self._pending[key]  # the period's counters are gone: nothing to add to
                continue
            if tokens or nusd:
                ttl_ms = max(1000, int((p.ends_at + GRACE_S - now) * 1000))
                await self._script(keys=[ledger.key(key[0], p)], args=[tokens, nusd, ttl_ms])
            current = self._pending.get(key)
            if current is not None and current[:2] == (tokens, nusd):
                del self._pending[key]
            elif current is not None:  # changed while we were adding: keep the rest
                self._pending[key] = (current[0] - tokens, current[1] - nusd, p)
            pushed += 1
        if pushed:
            log.info("budget spend recorded during the redis outage added to the shared ledger")
        return pushed

    async def write_back(self, ledger: RedisLedger, local: LocalLedger) -> int:
        """Raise the shared counters of an emptied Redis to this replica's last reading of them,
        which is `local`'s figure without what is pending here (not a guarded script: it runs
        while the epoch is being replaced). Returns how many counters it wrote."""
        script = ledger.redis.register_script(_RAISE)
        now = self._clock()
        rows: list[tuple[str, int, int, int]] = []
        for pid, name, label, used, ends_at in local.entries():
            if ends_at + GRACE_S < now:
                continue
            tokens, nusd = self._pending.get((pid, name, label), (0, 0, None))[:2]
            ttl_ms = max(1000, int((ends_at + GRACE_S - now) * 1000))
            rows.append((ledger.key_of(pid, name, label), used.tokens - tokens, used.nusd - nusd, ttl_ms))
        for start in range(0, len(rows), _WRITE_BACK_CHUNK):
            chunk = rows[start : start + _WRITE_BACK_CHUNK]
            await script(keys=[r[0] for r in chunk], args=[v for r in chunk for v in r[1:]])
        return len(rows)
