"""Budgets in process: periods, prices, the cut-off point, settlement, defer, metrics, audit.

The Redis ledger is tested against a real Redis in tests/integration/test_redis_trust.py.
"""

from __future__ import annotations

import asyncio
import calendar
from typing import Any

import orjson
import pytest

from service.admission.admit import Admission, Admitted, Record, Rejected
from service.admission.budget import Budgets, LocalLedger, Reservation, periods
from service.admission.pricing import NANO_PER_USD, Amount, actual, estimate
from service.admission.registry import Registry
from service.config.loader import parse_config
from service.config.prices import ModelPrice
from service.config.settings import BudgetSettings, GatewaySettings
from service.contracts.reasons import Reason
from service.scheduling.scheduler import Draining
from service.telemetry.audit import Audit
from service.telemetry.metrics import Metrics

ENV = {"K": "sk-secret"}
HAIKU = ModelPrice(
    input_per_mtok_usd=1, output_per_mtok_usd=5, cache_write_per_mtok_usd=1.25, cache_read_per_mtok_usd=0.1
)
NOV_24_NOON = calendar.timegm((2026, 11, 24, 12, 0, 0))


def test_periods_are_utc_days_and_months() -> None:
    b = BudgetSettings(tokens_per_day=10, usd_per_month=5)
    day, month = periods(b, NOV_24_NOON)
    assert (day.name, day.label, day.tokens_limit, day.nusd_limit) == ("day", "2026-11-24", 10, None)
    assert day.ends_at == calendar.timegm((2026, 11, 25, 0, 0, 0))
    assert (month.name, month.label, month.tokens_limit, month.nusd_limit) == (
        "month",
        "2026-11",
        None,
        5 * NANO_PER_USD,
    )
    assert month.ends_at == calendar.timegm((2026, 12, 1, 0, 0, 0))
    (dec,) = periods(BudgetSettings(usd_per_month=1), calendar.timegm((2026, 12, 31, 23, 59, 59)))
    assert (dec.label, dec.ends_at) == ("2026-12", calendar.timegm((2027, 1, 1, 0, 0, 0)))
    assert periods(BudgetSettings(), NOV_24_NOON) == ()


def test_prices() -> None:
    # 1000 input at $1/Mtok + 200 output at $5/Mtok = $0.002
    assert estimate(HAIKU, 1000, 200) == Amount(1200, 2_000_000)
    usage = {
        "input_tokens": 100,
        "output_tokens": 10,
        "cache_read_input_tokens": 1000,
        "cache_creation_input_tokens": 40,
    }
    # 100*1 + 10*5 + 1000*0.1 + 40*1.25 = 300 micro-USD
    assert actual(HAIKU, usage) == Amount(1150, 300_000)
    assert actual(None, usage) == Amount(1150, 0)


def test_local_ledger_refuses_what_would_exceed_any_period() -> None:
    ledger = LocalLedger(clock=lambda: NOV_24_NOON)
    ps = periods(BudgetSettings(tokens_per_day=100, tokens_per_month=140), NOV_24_NOON)
    assert ledger.reserve("a", ps, Amount(60, 0)).ok
    refused = ledger.reserve("a", ps, Amount(41, 0))
    assert (refused.ok, refused.refused, refused.used) == (
        False,
        (0, "tokens"),
        (Amount(60, 0), Amount(60, 0)),
    )
    assert ledger.reserve("a", ps, Amount(40, 0)).ok  # exactly the cap
    assert ledger.reserve("b", ps, Amount(100, 0)).ok, "another partner has its own counters"
    assert ledger.adjust("a", ps, Amount(-50, 0)) == (Amount(50, 0), Amount(50, 0))
    tomorrow = periods(BudgetSettings(tokens_per_day=100, tokens_per_month=140), NOV_24_NOON + 86_400)
    refused = ledger.reserve("a", tomorrow, Amount(100, 0))
    assert refused.refused == (1, "tokens"), "a new day, but the month still counts yesterday"
    assert refused.used == (Amount(0, 0), Amount(50, 0))
    assert ledger.reserve("a", tomorrow, Amount(90, 0)).ok


# -- the front, through admission ------------------------------------------------------------


def _settings(budget: dict[str, Any], **partner: Any) -> GatewaySettings:
    return parse_config(
        {
            "models": {"claude-haiku-4-5": {"input_per_mtok_usd": 1, "output_per_mtok_usd": 5}},
            "runtime": {"estimate_chars_per_token": 1, "budget_defer_poll_s": 0.05},
            "partners": [
                {"id": "acme", "api_key": {"env": "K"}, "budget": budget, **partner},
                {"id": "globex", "api_key": {"env": "K"}},
            ],
        }
    )


class World:
    def __init__(self, budget: dict[str, Any], **partner: Any) -> None:
        self.registry = Registry.build(_settings(budget, **partner), environ=ENV)
        self.metrics = Metrics()
        self.audit = Audit()
        self.budgets = Budgets(
            lambda: self.registry, metrics=self.metrics, audit=self.audit, clock=lambda: NOV_24_NOON
        )
        self.admission = Admission(self.registry, budgets=self.budgets)
        self.offset = 0

    def reload(self, budget: dict[str, Any], **partner: Any) -> None:
        self.registry = Registry.build(_settings(budget, **partner), environ=ENV)
        self.admission.registry = self.registry
        self.budgets.config_changed()

    def record(self, partner: str = "acme", max_tokens: int = 100) -> Record:
        self.offset += 1
        value = orjson.dumps(
            {
                "request_id": f"r{self.offset}",
                "params": {
                    "model": "claude-haiku-4-5",
                    "max_tokens": max_tokens,
                    "messages": [{"role": "user", "content": "x"}],
                },
            }
        )
        return Record(f"claude.requests.{partner}", 0, self.offset, None, None, value, ())

    def remaining(self, period: str = "day") -> float:
        return (
            self.metrics.registry.get_sample_value(
                "gateway_budget_remaining_usd", {"partner": "acme", "period": period}
            )
            or 0.0
        )


async def test_reserve_cuts_off_at_the_request_that_would_exceed() -> None:
    w = World({"usd_per_day": 0.01})
    first = await w.admission.admit_and_reserve(w.record())
    assert isinstance(first, Admitted)
    res = first.reservation
    assert res is not None
    # the input estimate ($1/Mtok) + 100 output tokens at $5/Mtok
    per_request = res.amount.nusd
    assert first.est_input_tokens > 0
    assert per_request == first.est_input_tokens * 1000 + 100 * 5000
    admitted = 1
    while True:
        verdict = await w.admission.admit_and_reserve(w.record())
        if isinstance(verdict, Rejected):
            break
        admitted += 1
    assert admitted == 10_000_000 // per_request
    assert verdict.reason is Reason.BUDGET_EXHAUSTED
    assert "partners[acme].budget.usd_per_day" in verdict.detail
    assert w.remaining() * NANO_PER_USD < per_request
    assert isinstance(await w.admission.admit_and_reserve(w.record("globex")), Admitted)


async def test_settle_refunds_unused_and_release_gives_all_back() -> None:
    w = World({"usd_per_day": 1, "tokens_per_day": 10_000})
    adm = await w.admission.admit_and_reserve(w.record())
    assert isinstance(adm, Admitted)
    assert adm.reservation is not None
    day = adm.reservation.periods[0]
    await w.admission.settle(adm, actual(HAIKU, {"input_tokens": 10, "output_tokens": 4}))
    assert w.budgets.local.used("acme", day) == Amount(14, 10 * 1000 + 4 * 5000)
    assert w.remaining() == pytest.approx(1 - 30e-6)
    adm2 = await w.admission.admit_and_reserve(w.record())
    assert isinstance(adm2, Admitted)
    await w.admission.release(adm2)
    assert w.budgets.local.used("acme", day) == Amount(14, 30_000)


async def test_settle_once_counts_a_redone_step_once() -> None:
    """A batch's chunk of results settles once per key, even when its step is redone (a failed
    transaction tried again); another key is another chunk."""
    w = World({"usd_per_day": 1})
    adm = await w.admission.admit_and_reserve(w.record())
    assert isinstance(adm, Admitted)
    assert adm.reservation is not None
    res, day = adm.reservation, adm.reservation.periods[0]
    delta = Amount(14, 30_000) - res.amount
    await w.budgets.settle_once(res, delta, "batch:acme.1:3:part")
    await w.budgets.settle_once(res, delta, "batch:acme.1:3:part")
    assert w.budgets.local.used("acme", day) == Amount(14, 30_000)
    await w.budgets.settle_once(res, Amount(1, 5), "batch:acme.1:6:part")
    assert w.budgets.local.used("acme", day) == Amount(15, 30_005)


async def test_a_request_bigger_than_the_cap_is_refused_even_when_deferring() -> None:
    w = World({"tokens_per_day": 50, "on_exhausted": "defer"})
    verdict = await w.admission.admit_and_reserve(w.record(max_tokens=100))
    assert isinstance(verdict, Rejected)
    assert verdict.reason is Reason.BUDGET_EXHAUSTED
    assert "alone" in verdict.detail


async def test_defer_holds_until_a_reload_raises_the_budget() -> None:
    w = World({"tokens_per_day": 150, "on_exhausted": "defer"})  # one request fits, not two
    first = await w.admission.admit_and_reserve(w.record())
    assert isinstance(first, Admitted)
    held = asyncio.create_task(w.admission.admit_and_reserve(w.record()))
    await asyncio.sleep(0.2)
    assert not held.done(), "an exhausted budget with on_exhausted=defer holds the request"
    w.reload({"tokens_per_day": 10_000, "on_exhausted": "defer"})
    verdict = await asyncio.wait_for(held, 2)
    assert isinstance(verdict, Admitted)
    events = [e for e, _ in w.audit.emitted]
    assert events.count("budget_exhausted") == 1


async def test_defer_gives_way_when_the_partner_is_disabled_or_the_service_stops() -> None:
    w = World({"tokens_per_day": 150, "on_exhausted": "defer"})  # one request fits, not two
    assert isinstance(await w.admission.admit_and_reserve(w.record()), Admitted)
    held = asyncio.create_task(w.admission.admit_and_reserve(w.record()))
    await asyncio.sleep(0.1)
    w.reload({"tokens_per_day": 150, "on_exhausted": "defer"}, enabled=False)
    verdict = await asyncio.wait_for(held, 2)
    assert isinstance(verdict, Rejected)
    assert verdict.reason is Reason.PARTNER_DISABLED
    w.reload({"tokens_per_day": 150, "on_exhausted": "defer"})
    held = asyncio.create_task(w.admission.admit_and_reserve(w.record()))
    await asyncio.sleep(0.1)
    w.budgets.close()
    with pytest.raises(Draining):
        await asyncio.wait_for(held, 2)


async def test_exhaustion_is_audited_once_per_period_without_secrets() -> None:
    w = World({"tokens_per_day": 500})
    for _ in range(5):
        await w.admission.admit_and_reserve(w.record())
    exhausted = [f for e, f in w.audit.emitted if e == "budget_exhausted"]
    assert len(exhausted) == 1
    assert exhausted[0]["partner"] == "acme"
    assert exhausted[0]["period_label"] == "2026-11-24"
    assert exhausted[0]["unit"] == "tokens"
    assert "sk-secret" not in repr(w.audit.emitted)


async def test_partner_without_budget_reserves_nothing() -> None:
    w = World({})
    adm = await w.admission.admit_and_reserve(w.record())
    assert isinstance(adm, Admitted)
    assert adm.reservation == Reservation("acme", "claude-haiku-4-5", (), Amount(0, 0), shared=False)
    await w.admission.settle(adm, actual(HAIKU, {"input_tokens": 5}))
