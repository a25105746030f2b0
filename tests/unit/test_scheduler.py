"""Weighted fair queuing: shares by weight, work conservation, a quiet partner served
at once behind a flood, partners blocked by their own limits skipped, draining."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Mapping

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.config.loader import parse_config
from service.config.settings import GatewaySettings
from service.scheduling.limiter import GRANTED, Cost, Decision, Usage
from service.scheduling.pools import LimitConfig, PauseScope
from service.scheduling.scheduler import Draining, Scheduler
from tests.support.polling import until


class Gate:
    """A limiter that grants exactly as many turns as the test hands out."""

    def __init__(self) -> None:
        self.tokens = 0
        self.blocked: set[str] = set()

    async def acquire(self, partner_id: str, cost: Cost) -> Decision:
        if partner_id in self.blocked:
            return Decision(False, 0.002, "partner")
        if self.tokens > 0:
            self.tokens -= 1
            return GRANTED
        return Decision(False, 0.002, "org")

    def settle(self, partner_id: str, cost: Cost, usage: Usage | None) -> None: ...
    def observe_headers(self, partner_id: str, cost: Cost, headers: Mapping[str, str]) -> None: ...
    def pause(self, scope: PauseScope, seconds: float) -> None: ...
    def configure(self, config: LimitConfig) -> None: ...
    def levels(self) -> dict[tuple[str, str], float]:
        return {}


def _settings(weights: Mapping[str, float], concurrency: int = 10_000) -> GatewaySettings:
    return parse_config(
        {
            "org_limits": {"rpm": 6000},
            "runtime": {"max_in_flight": 100_000},
            "partners": [
                {"id": p, "weight": w, "max_concurrency": concurrency, "api_key": {"env": "X"}}
                for p, w in weights.items()
            ],
        }
    )


async def _flood(sched: Scheduler, gate: Gate, backlog: Mapping[str, int], grants: int) -> list[str]:
    order: list[str] = []

    async def one(pid: str) -> None:
        try:
            g = await sched.acquire(pid, Cost(10, 10))
        except Draining:
            return
        order.append(pid)
        sched.release(g, Usage(10, 10))

    tasks = [asyncio.create_task(one(p)) for p, n in backlog.items() for _ in range(n)]
    await until(lambda: all(sched.queued(p) == n for p, n in backlog.items()))  # everyone queued
    while len(order) < grants:
        gate.tokens += 20
        await asyncio.sleep(0.003)
    sched.close()
    await asyncio.gather(*tasks)
    await sched.aclose()
    return order[:grants]


@pytest.mark.parametrize("weights", [{"a": 1, "b": 1, "c": 1}, {"a": 1, "b": 2, "c": 3}])
async def test_busy_partners_share_by_weight(weights: dict[str, float]) -> None:
    gate = Gate()
    sched = Scheduler(_settings(weights), gate)
    order = await _flood(sched, gate, {p: 1000 for p in weights}, 600)
    counts = Counter(order)
    total = sum(weights.values())
    for p, w in weights.items():
        assert abs(counts[p] / 600 - w / total) <= 0.02, counts


@settings(max_examples=15, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=5), min_size=2, max_size=4))
async def test_fair_shares_hold_for_any_weights(weights: list[int]) -> None:
    named = {f"p{i}": float(w) for i, w in enumerate(weights)}
    gate = Gate()
    sched = Scheduler(_settings(named), gate)
    n = 50 * int(sum(weights))
    order = await _flood(sched, gate, {p: n for p in named}, n)
    counts = Counter(order)
    for p, w in named.items():
        assert abs(counts[p] - n * w / sum(weights)) <= 2, (counts, weights)


async def test_an_idle_partners_share_goes_to_the_busy_ones() -> None:
    gate = Gate()
    sched = Scheduler(_settings({"a": 1, "b": 1, "c": 1}), gate)
    order = await _flood(sched, gate, {"a": 500, "b": 500}, 400)
    assert Counter(order) == {"a": 200, "b": 200}


async def test_a_quiet_partner_is_served_next_behind_a_flood() -> None:
    gate = Gate()
    sched = Scheduler(_settings({"flood": 1, "quiet": 1}), gate)
    served: list[str] = []

    async def one(pid: str) -> None:
        try:
            g = await sched.acquire(pid, Cost(10, 10))
        except Draining:
            return
        served.append(pid)
        sched.release(g, None)

    flood = [asyncio.create_task(one("flood")) for _ in range(2000)]
    await until(lambda: sched.queued("flood") == 2000)
    gate.tokens = 500
    await until(lambda: len(served) >= 500)
    await asyncio.sleep(0.01)
    assert served.count("flood") == 500
    quiet = asyncio.create_task(one("quiet"))
    await until(lambda: sched.queued("quiet") == 1)
    gate.tokens = 2
    await until(lambda: len(served) >= 502)
    assert "quiet" in served[500:502]
    sched.close()
    await asyncio.gather(quiet, *flood)
    await sched.aclose()


async def test_a_partner_blocked_by_its_own_limit_does_not_block_others() -> None:
    gate = Gate()
    gate.blocked.add("a")
    sched = Scheduler(_settings({"a": 5, "b": 1}), gate)
    order = await _flood(sched, gate, {"a": 100, "b": 100}, 100)
    assert Counter(order) == {"b": 100}


async def test_partner_concurrency_is_enforced() -> None:
    gate = Gate()
    gate.tokens = 1000
    sched = Scheduler(_settings({"a": 1}, concurrency=3), gate)
    grants = [await sched.acquire("a", Cost(1, 1)) for _ in range(3)]
    fourth = asyncio.create_task(sched.acquire("a", Cost(1, 1)))
    await asyncio.sleep(0.01)
    assert not fourth.done()
    sched.release(grants[0], None)
    g = await asyncio.wait_for(fourth, 1)
    for grant in [*grants[1:], g]:
        sched.release(grant, None)
    await sched.aclose()


async def test_close_fails_waiters_with_draining_and_cancel_cleans_up() -> None:
    gate = Gate()
    sched = Scheduler(_settings({"a": 1}), gate)
    waiting = [asyncio.create_task(sched.acquire("a", Cost(1, 1))) for _ in range(5)]
    await until(lambda: sched.queued("a") == 5)
    waiting[0].cancel()
    await asyncio.sleep(0)
    assert sched.queued("a") == 4
    sched.close()
    results = await asyncio.gather(*waiting, return_exceptions=True)
    assert isinstance(results[0], asyncio.CancelledError)
    assert all(isinstance(r, Draining) for r in results[1:])
    with pytest.raises(Draining):
        await sched.acquire("a", Cost(1, 1))
    await sched.aclose()


class SlowGate(Gate):
    """A limiter that suspends, as the Redis one does, once `slow` is set."""

    slow = False

    async def acquire(self, partner_id: str, cost: Cost) -> Decision:
        if self.slow:
            await asyncio.sleep(0.01)
        return await super().acquire(partner_id, cost)


async def test_close_while_the_limiter_answers_loses_no_bookkeeping() -> None:
    gate = SlowGate()
    sched = Scheduler(_settings({"a": 1}), gate)
    waiting = [asyncio.create_task(sched.acquire("a", Cost(1, 1))) for _ in range(3)]
    await asyncio.sleep(0.01)  # all queued, the dispatcher polling the empty gate
    gate.slow = True
    gate.tokens = 10
    await asyncio.sleep(0.006)  # the dispatcher is inside the limiter call now
    sched.close()
    results = await asyncio.gather(*waiting, return_exceptions=True)
    assert all(isinstance(r, Draining) for r in results)
    await asyncio.sleep(0.02)  # the limiter answers after the close
    await sched.aclose()  # the dispatcher exits cleanly
    assert sched._in_flight == 0


async def test_a_burst_capped_by_concurrency_leaves_no_debt_when_contention_starts() -> None:
    """While only partner concurrency limits (no org contention), each weight gets the
    same turns; once the org binds, shares must follow weights at once, not after the
    lighter partners worked off credit banked during the burst."""
    gate = Gate()
    gate.tokens = 10**9
    sched = Scheduler(_settings({"a": 1, "b": 2, "c": 3}, concurrency=4), gate)
    served: list[str] = []
    in_flight = 0

    async def worker(pid: str) -> None:
        nonlocal in_flight
        while True:
            try:
                g = await sched.acquire(pid, Cost(10, 10))
            except Draining:
                return
            served.append(pid)
            in_flight += 1
            await asyncio.sleep(0.001)
            in_flight -= 1
            sched.release(g, None)

    tasks = [asyncio.create_task(worker(p)) for p in "abc" for _ in range(20)]
    while len(served) < 600:  # noqa: ASYNC110 - the burst: concurrency-bound, equal turns
        await asyncio.sleep(0.005)
    gate.tokens = 0
    await asyncio.sleep(0.02)
    mark = len(served)
    while len(served) < mark + 600:  # contention: the org budget rations turns
        # Six turns at a time, each round once the last has been served and released:
        # only the org budget binds, never the partners' concurrency of 4, however slow
        # the machine runs the 1 ms of work.
        before = len(served)
        gate.tokens += 6
        await until(lambda: len(served) >= before + 6 and not in_flight, interval_s=0.001)  # noqa: B023
    counts = Counter(served[mark : mark + 600])
    sched.close()
    await asyncio.gather(*tasks)
    await sched.aclose()
    assert abs(counts["a"] - 100) <= 12, counts
    assert abs(counts["b"] - 200) <= 12, counts
    assert abs(counts["c"] - 300) <= 12, counts
