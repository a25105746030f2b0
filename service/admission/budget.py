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

Where the counters live (`budget_ledger.py`): with a `redis` section, in Redis, one hash per
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
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from service.admission.admit import Admitted, Deferred, Rejected
from service.admission.budget_ledger import (
    LedgerAnswer,
    LocalLedger,
    Period,
    RedisLedger,
    Reservation,
    Unit,
    periods,
)
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

# Amount and NANO_PER_USD live in pricing.py, the ledgers in budget_ledger.py: importers of this
# module still see them
__all__ = [
    "NANO_PER_USD",
    "Amount",
    "Budgets",
    "LocalLedger",
    "Period",
    "RedisLedger",
    "Reservation",
    "periods",
]
_UNITS: tuple[Unit, ...] = ("tokens", "usd")
ONCE_LOCAL_MAX = 100_000
"""`settle_once` keys remembered in process (the newest)."""


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
        self._once: OrderedDict[str, None] = OrderedDict()
        """`settle_once` keys this process applied (Redis keeps its own, across processes)."""
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

    async def settle_once(self, reservation: Reservation, delta: Amount, once: str) -> None:
        """Settle several calls of `reservation`'s partner and periods at once (`delta`: what
        they cost less what was reserved for them), counted once per `once` key even when the
        step is redone (a batch's results published again after a crash). Never raises."""
        if not reservation.periods or once in self._once:
            return
        self._once[once] = None
        while len(self._once) > ONCE_LOCAL_MAX:
            self._once.popitem(last=False)
        await self._adjust(reservation, delta, once)

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

    async def _adjust(self, res: Reservation, delta: Amount, once: str | None = None) -> None:
        if delta.tokens == 0 and delta.nusd == 0:
            return
        pid = res.partner_id
        if res.shared and self.shared is not None and not self.degraded:
            try:
                used = await self.shared.adjust(pid, res.periods, delta, once)
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

    async def write_back(self) -> int:
        """Redis lost its data: raise its counters to this replica's last reading of them."""
        if self.shared is None:
            return 0
        return await self.outage.write_back(self.shared, self.local)

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
