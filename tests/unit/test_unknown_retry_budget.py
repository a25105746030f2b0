"""`on_unknown: retry`: the call whose outcome is unknown may have been billed, so its budget
reservation stays counted; the one extra call reserves its own and settles it to its cost.
Before, the extra call took over the first call's reservation: two calls upstream, the budget
counted one (the first dropped from the partner's spend, against `budget.py`'s rule)."""

from __future__ import annotations

import time
from typing import Any

import httpx2
import orjson

from service.admission.admit import Admission
from service.admission.budget import Budgets
from service.admission.budget_ledger import periods
from service.admission.registry import Registry
from service.config.loader import parse_config
from service.ingest.ledger import Claim
from service.pipeline import Pipeline
from service.scheduling.scheduler import Scheduler
from service.telemetry.metrics import Metrics
from service.upstream.client import ClaudeClient
from tests.support.answers import answer, request_record
from tests.support.sink import MemorySink


async def _run(
    on_unknown: str,
    first: str,
    usd_per_day: float = 100.0,
    dead: list[dict[str, Any]] | None = None,
    inherited: bool = False,
) -> tuple[int, list[dict[str, Any]], int]:
    s = parse_config(
        {
            "kafka": {"usage_topic": "t.usage"},
            "retry": {"max_attempts": 3, "base_delay_s": 0.001, "max_delay_s": 0.001},
            "partners": [
                {
                    "id": "acme",
                    "api_key": {"env": "K"},
                    "on_unknown": on_unknown,
                    "budget": {"usd_per_day": usd_per_day},
                }
            ],
        }
    )
    reg = Registry.build(s, environ={"K": "sk"})
    calls: list[int] = []

    def handler(req: httpx2.Request) -> httpx2.Response:
        calls.append(1)
        if len(calls) == 1 and first == "timeout":
            raise httpx2.ReadTimeout("sent, no answer", request=req)
        body = answer({"input_tokens": 10, "output_tokens": 900})
        return httpx2.Response(200, json=body, headers={"request-id": "req_1"})

    claude = ClaudeClient(
        s.anthropic, http_client=httpx2.AsyncClient(transport=httpx2.MockTransport(handler))
    )
    claude.sync_keys(reg.api_keys())
    metrics = Metrics()
    budgets = Budgets(lambda: reg, metrics=metrics)
    pipeline = Pipeline(s, Admission(reg, budgets=budgets), Scheduler(s), claude, metrics)
    sink = MemorySink(7)
    if inherited:  # a previous owner claimed it (its one call) and died: this is the extra call
        sink.inherited = Claim(7, 1_700_000_000_000, 1, "gone-owner")
        sink.attempts = 1  # as the partition writer's sink starts from the inherited claim
    await pipeline.handle(request_record(max_tokens=1000), sink)
    metering = [orjson.loads(m.value) for m in sink.published if m.topic == "t.usage"]
    if dead is not None:
        dead += [orjson.loads(m.value) for m in sink.published if ".deadletter" in m.topic]
    day = periods(reg.by_id["acme"].settings.budget, time.time())[0]
    return len(calls), metering, budgets.local.used("acme", day).nusd


async def test_the_call_that_may_be_billed_keeps_its_reservation_beside_the_extra_call() -> None:
    calls, metering, used = await _run("retry", "timeout")
    assert calls == 2
    assert [r["cost"]["nano_usd"] for r in metering] == [4_510_000]  # the answered call's cost
    # the first call's reservation (its estimate) stays counted on top of the second's cost
    assert used > 4_510_000, used


async def test_one_answered_call_settles_to_its_cost() -> None:
    calls, metering, used = await _run("retry", "ok")
    assert calls == 1
    assert used == metering[0]["cost"]["nano_usd"] == 4_510_000


async def test_an_extra_call_refused_by_the_budget_leaves_the_outcome_unknown() -> None:
    """The first call's reservation fills the day's budget: the extra call is refused, and the
    dead letter says the first may have been billed (`outcome_unknown`), not `budget_exhausted`."""
    dead: list[dict[str, Any]] = []
    calls, metering, used = await _run("retry", "timeout", usd_per_day=0.008, dead=dead)
    assert calls == 1
    assert metering == []
    assert [d["reason"] for d in dead] == ["outcome_unknown"], dead
    assert "may have been billed" in dead[0]["detail"]
    assert used > 0, "the first call's reservation stays counted"


async def test_an_inherited_claims_extra_call_that_is_unknown_too_says_both_claims() -> None:
    """An owner died with the request's call in flight; the next owner makes the one extra call
    and its outcome is unknown too: the dead letter's claim counts both claims (2), as the
    owner_lost one does, so that whoever reads it knows two calls may be billed (it said 1:
    the calls of this owner only; the chaos verifier took the two billed calls as unexplained)."""
    dead: list[dict[str, Any]] = []
    calls, metering, _ = await _run("retry", "timeout", dead=dead, inherited=True)
    assert (calls, metering) == (1, [])
    assert [d["reason"] for d in dead] == ["outcome_unknown"]
    assert dead[0]["claim"]["attempts"] == 2, dead[0]["claim"]
