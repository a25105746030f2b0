"""Replay sightings and budget counters in a real Redis: shared, atomic, durable, degradable."""

from __future__ import annotations

import asyncio
import calendar
import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from service.admission.budget import Amount, Budgets, LocalLedger, RedisLedger, periods
from service.admission.registry import Registry
from service.admission.replay import (
    IDLE_EXPIRY_MS,
    LocalReplayStore,
    Origin,
    RedisReplayStore,
    ReplayGuard,
    Sighting,
)
from service.config.loader import parse_config
from service.config.settings import BudgetSettings, PartnerSettings

pytestmark = pytest.mark.integration

NOON = calendar.timegm((2026, 11, 24, 12, 0, 0))


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    c = aioredis.Redis.from_url(redis_url)
    try:
        yield c
    finally:
        await c.aclose()


@pytest.fixture
def prefix() -> str:
    return f"test-{uuid.uuid4().hex[:8]}"


def _deduped(window_s: float = 30) -> PartnerSettings:
    return PartnerSettings.model_validate(
        {"id": "acme", "api_key": {"env": "K"}, "dedupe": True, "replay_window_s": window_s}
    )


# -- replay ------------------------------------------------------------------------------------------


T0 = NOON * 1000


async def _check(store: RedisReplayStore, origin: str, at: int, keep: int = 30_000) -> str | None:
    held = await store.check_and_record("acme", "r1", Sighting(origin, at + keep), at_ms=at, keep_ms=keep)
    return None if held.origin == origin else held.origin


async def test_redis_store_new_redelivery_replay_and_keys(client: aioredis.Redis, prefix: str) -> None:
    store = RedisReplayStore(client, prefix)
    assert await _check(store, "t/0/5", T0) is None
    assert await _check(store, "t/0/5", T0 + 1) is None, "same offset again is a redelivery"
    assert await _check(store, "t/2/7", T0 + 30_000) == "t/0/5", "at the expiry it still holds"
    assert await _check(store, "t/2/8", T0 + 30_001) is None, "past the expiry: new, and recorded"
    seen, drop, clock = store.keys("acme")
    assert seen == f"{{{prefix}}}:sightings:acme"
    assert await client.hget(seen, "r1") == f"t/2/8|{T0 + 60_001}".encode()
    assert await client.zscore(drop, "r1") == T0 + 90_001
    assert await client.get(clock) == str(T0 + 30_001).encode()
    assert 0 < await client.pttl(seen) <= IDLE_EXPIRY_MS


async def test_redis_store_forgets_by_the_reading_clock_not_the_wall_clock(
    client: aioredis.Redis, prefix: str
) -> None:
    """A lagging partner: its sighting outlives the wall-clock window until its own reading
    clock passes the expiry plus the margin."""
    store = RedisReplayStore(client, prefix)
    assert await _check(store, "t/0/1", T0, keep=100) is None
    await asyncio.sleep(0.4)  # four windows of wall clock: nothing is dropped by it
    assert await _check(store, "t/0/2", T0 + 50, keep=100) == "t/0/1"
    seen, _, _ = store.keys("acme")
    other = Sighting("t/0/3", T0 + 300)
    await store.check_and_record("acme", "r2", other, at_ms=T0 + 199, keep_ms=100)
    assert await client.hexists(seen, "r1"), "the clock is at expiry + margin - 1"
    await store.check_and_record("acme", "r3", other, at_ms=T0 + 200, keep_ms=100)
    assert not await client.hexists(seen, "r1")
    assert await client.hexists(seen, "r2")


async def test_redis_store_is_refused_a_late_copy_another_replica_reads(
    client: aioredis.Redis, prefix: str
) -> None:
    """Replica A reads the original; replica B reads a copy appended just after, from a
    partition that lagged far behind: B's local store knows nothing, Redis refuses it."""
    ps = PartnerSettings.model_validate(
        {
            "id": "acme",
            "api_key": {"env": "K"},
            "signing": {"required": True, "keys": {"k": {"env": "S"}}, "max_skew_s": 1},
        }
    )
    replica_a = ReplayGuard(LocalReplayStore(), RedisReplayStore(client, prefix), clock=lambda: NOON + 5.0)
    replica_b = ReplayGuard(
        LocalReplayStore(), RedisReplayStore(client, prefix), clock=lambda: NOON + 3_600.0
    )
    first = await replica_a.first_seen(ps, "r1", Origin("t", 0, 9), appended_ms=T0, valid_until_ms=T0 + 1_000)
    assert first is None
    for i in range(50):  # B reads the rest of the lagging partition, appended in the same second
        await replica_b.first_seen(ps, f"o{i}", Origin("t", 1, i), appended_ms=T0 + 10 * i)
    assert await replica_b.first_seen(ps, "r1", Origin("t", 1, 50), appended_ms=T0 + 600) == "t/0/9"
    await replica_a.aclose()
    await replica_b.aclose()


async def test_replicas_share_sightings_and_a_restart_remembers(client: aioredis.Redis, prefix: str) -> None:
    ps = _deduped()
    replica_a = ReplayGuard(LocalReplayStore(), RedisReplayStore(client, prefix))
    replica_b = ReplayGuard(LocalReplayStore(), RedisReplayStore(client, prefix))
    assert await replica_a.first_seen(ps, "r1", Origin("t", 0, 1)) is None
    assert await replica_b.first_seen(ps, "r1", Origin("t", 0, 1)) is None, "redelivered after a rebalance"
    assert await replica_b.first_seen(ps, "r1", Origin("t", 0, 2)) == "t/0/1"
    restarted = ReplayGuard(LocalReplayStore(), RedisReplayStore(client, prefix))
    assert await restarted.first_seen(ps, "r1", Origin("t", 1, 1)) == "t/0/1"


async def test_concurrent_copies_exactly_one_passes(client: aioredis.Redis, prefix: str) -> None:
    ps = _deduped()
    guards = [ReplayGuard(LocalReplayStore(), RedisReplayStore(client, prefix)) for _ in range(5)]
    results = await asyncio.gather(
        *(g.first_seen(ps, "same", Origin("t", 0, i)) for i, g in enumerate(guards))
    )
    assert sum(r is None for r in results) == 1


async def test_unreachable_redis_falls_back_to_local() -> None:
    dead = aioredis.Redis(host="127.0.0.1", port=1, socket_timeout=0.2, socket_connect_timeout=0.2)
    try:
        guard = ReplayGuard(LocalReplayStore(), RedisReplayStore(dead, "x"))
        ps = _deduped()
        assert await guard.first_seen(ps, "r1", Origin("t", 0, 1)) is None
        assert await guard.first_seen(ps, "r1", Origin("t", 0, 2)) == "t/0/1"
        assert guard.degraded, "a refused connection is a down Redis"
        await guard.aclose()
        assert guard.health is not None
        assert guard.health._probe is not None
        assert guard.health._probe.done(), "closing the guard stops the probe it started"
    finally:
        await dead.aclose()


# -- budget ledger -----------------------------------------------------------------------------------


async def test_ledger_reserve_adjust_keys_and_ttl(client: aioredis.Redis, prefix: str) -> None:
    ledger = RedisLedger(client, prefix, clock=lambda: NOON)
    ps = periods(BudgetSettings(tokens_per_day=100, usd_per_month=1), NOON)
    answer = await ledger.reserve("acme", ps, Amount(60, 400_000_000))
    assert answer.ok
    assert answer.used == (Amount(60, 400_000_000), Amount(60, 400_000_000))
    refused = await ledger.reserve("acme", ps, Amount(41, 0))
    assert (refused.ok, refused.refused) == (False, (0, "tokens"))
    refused = await ledger.reserve("acme", ps, Amount(1, 600_000_001))
    assert (refused.ok, refused.refused) == (False, (1, "usd"))
    assert await ledger.adjust("acme", ps, Amount(-10, -100)) == (
        Amount(50, 399_999_900),
        Amount(50, 399_999_900),
    )
    day_key = f"{{{prefix}}}:budget:acme:day:2026-11-24"
    month_key = f"{{{prefix}}}:budget:acme:month:2026-11"
    assert await client.hgetall(day_key) == {b"tokens": b"50", b"nusd": b"399999900"}
    # a day key lives until a day after its day ends
    assert 0 < await client.pttl(day_key) <= (12 + 24) * 3600 * 1000
    assert await client.pttl(month_key) > 6 * 86_400 * 1000


async def test_ledger_is_atomic_under_concurrency(client: aioredis.Redis, prefix: str) -> None:
    ledger = RedisLedger(client, prefix, clock=lambda: NOON)
    ps = periods(BudgetSettings(tokens_per_day=1000), NOON)
    answers = await asyncio.gather(*(ledger.reserve("acme", ps, Amount(30, 0)) for _ in range(100)))
    assert sum(a.ok for a in answers) == 33
    assert await client.hget(f"{{{prefix}}}:budget:acme:day:2026-11-24", "tokens") == b"990"


async def test_adjust_never_resurrects_an_expired_period(client: aioredis.Redis, prefix: str) -> None:
    ledger = RedisLedger(client, prefix, clock=lambda: NOON)
    ps = periods(BudgetSettings(tokens_per_day=1000), NOON)
    assert await ledger.adjust("acme", ps, Amount(-5, -5)) == (Amount(0, 0),)
    assert await client.exists(f"{{{prefix}}}:budget:acme:day:2026-11-24") == 0


def _registry(budget: dict[str, object]) -> Registry:
    settings = parse_config({"partners": [{"id": "acme", "api_key": {"env": "K"}, "budget": budget}]})
    return Registry.build(settings, environ={"K": "sk"})


async def test_budgets_degrade_to_the_last_known_usage(client: aioredis.Redis, prefix: str) -> None:
    registry = _registry({"tokens_per_day": 10_000})
    shared = Budgets(
        lambda: registry, shared=RedisLedger(client, prefix, clock=lambda: NOON), clock=lambda: NOON
    )
    ps = periods(registry.by_id["acme"].settings.budget, NOON)
    answer, was_shared = await shared._ledger_reserve("acme", ps, Amount(9_000, 0))
    assert answer.ok
    assert was_shared
    assert shared.local.used("acme", ps[0]) == Amount(9_000, 0), "the local ledger mirrors Redis"
    dead = aioredis.Redis(host="127.0.0.1", port=1, socket_timeout=0.2, socket_connect_timeout=0.2)
    try:
        shared.shared = RedisLedger(dead, prefix, clock=lambda: NOON)
        answer, was_shared = await shared._ledger_reserve("acme", ps, Amount(2_000, 0))
        assert not was_shared
        assert not answer.ok, "the fallback still knows 9000 of 10000 are used"
    finally:
        await shared.aclose()
        await dead.aclose()


def test_local_ledger_is_the_default() -> None:
    registry = _registry({"tokens_per_day": 10})
    assert isinstance(Budgets(lambda: registry).local, LocalLedger)
