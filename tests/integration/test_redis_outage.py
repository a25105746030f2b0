"""Budgets, replay checks and limits through a Redis outage, on a real Redis behind a proxy
that takes it away and gives it back with its data (issue 10):

- spend made while Redis was unreachable is added to the shared ledger when it returns
  (outage, spend, recovery: the totals equal everything spent);
- a slow Redis is not a down Redis on the first slow call;
- a burst that keeps every pooled connection busy is not an outage either;
- the limiter's levels report the shared buckets, not a replica's unused local ones.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from urllib.parse import urlparse

import pytest
import redis.asyncio as aioredis

from service.admission.budget import Budgets, RedisLedger, periods
from service.config.redis import redis_client
from service.config.redis_health import RedisHealth, RedisPoolBusy
from service.config.settings import LimitSettings, RedisSettings
from service.scheduling.limiter import Cost
from service.scheduling.redis_limiter import RedisLimiter
from tests.support.polling import until
from tests.support.spend import DAY_KEY, NOON, budgeted_registry, spend
from tests.support.tcp_proxy import TcpProxy

pytestmark = pytest.mark.integration


@pytest.fixture
async def proxy(redis_url: str) -> AsyncIterator[TcpProxy]:
    p = TcpProxy(urlparse(redis_url).port or 6379)
    await p.start()
    yield p
    await p.stop()


def _settings(url: str) -> RedisSettings:
    return RedisSettings(url=url, key_prefix=f"t-{uuid.uuid4().hex[:8]}", timeout_s=0.2)


async def test_spend_during_an_outage_reaches_the_shared_ledger(proxy: TcpProxy, redis_url: str) -> None:
    rs = _settings(proxy.url)
    client = redis_client(rs)
    health = RedisHealth(client, probe_interval_s=0.2)
    registry = budgeted_registry()
    ledger = RedisLedger(client, rs.key_prefix, clock=lambda: NOON)
    budgets = Budgets(lambda: registry, shared=ledger, health=health, clock=lambda: NOON)
    direct = aioredis.Redis.from_url(redis_url)
    key = f"{{{rs.key_prefix}}}:{DAY_KEY}"
    try:
        billed = await spend(budgets, registry, 5)
        assert int(await direct.hget(key, "tokens") or 0) == billed

        await proxy.stop()  # the outage
        billed += await spend(budgets, registry, 7)
        assert health.down
        assert budgets.degraded
        assert int(await direct.hget(key, "tokens") or 0) == 5 * 300, "Redis did not see the outage spend"

        await proxy.start()  # recovery: the probe finds Redis, the outage spend is added
        await until(lambda: not health.down)
        await until(lambda: not budgets.outage)
        assert int(await direct.hget(key, "tokens") or 0) == billed
        billed += await spend(budgets, registry, 2)  # and Redis keeps counting from there
        assert int(await direct.hget(key, "tokens") or 0) == billed
        day = periods(registry.by_id["acme"].settings.budget, NOON)[0]
        assert budgets.local.used("acme", day).tokens == billed  # the mirror keeps what Redis has
    finally:
        await health.aclose()
        await client.aclose()
        await direct.aclose()


async def test_a_slow_call_is_not_an_outage(proxy: TcpProxy) -> None:
    rs = _settings(proxy.url)
    client = redis_client(rs)
    health = RedisHealth(client, slow_strikes=3, probe_interval_s=0.2)
    limiter = RedisLimiter(rs, LimitSettings(rpm=600), {}, client=client, health=health)
    try:
        assert (await limiter.acquire("p", Cost(1, 1))).ok
        proxy.delay_s = 0.5  # answers later than the client's 0.2 s timeout
        d = await limiter.acquire("p", Cost(1, 1))  # falls back to the local share, once
        assert health.state == "slow"
        assert not limiter.degraded
        proxy.delay_s = 0.0
        await client.connection_pool.disconnect()  # drop the connection with the late answer
        assert (await limiter.acquire("p", Cost(1, 1))).ok
        assert health.state == "healthy"
        proxy.delay_s = 0.5
        for _ in range(3):  # three timeouts in a row: down
            d = await limiter.acquire("p", Cost(1, 1))
            await client.connection_pool.disconnect()
        assert d.ok
        assert health.state == "down"
        assert limiter.degraded
        proxy.delay_s = 0.0
        await until(lambda: not health.down)
    finally:
        await limiter.aclose()
        await health.aclose()
        await client.aclose()


async def test_a_burst_that_waits_for_a_pooled_connection_is_not_an_outage(proxy: TcpProxy) -> None:
    # Redis answers every call in 0.1 s, well within timeout_s; two connections for 24 calls
    # at once: the later ones wait for a connection longer than pool_timeout_s
    rs = RedisSettings(
        url=proxy.url,
        key_prefix=f"t-{uuid.uuid4().hex[:8]}",
        timeout_s=1.0,
        max_connections=2,
        pool_timeout_s=0.15,
    )
    client = redis_client(rs)
    busy: list[int] = []
    health = RedisHealth(client, slow_strikes=3, probe_interval_s=0.2, on_busy=lambda: busy.append(1))
    limiter = RedisLimiter(rs, LimitSettings(rpm=6000), {}, client=client, health=health)
    try:
        assert (await limiter.acquire("p", Cost(1, 1))).ok
        proxy.delay_s = 0.1
        with pytest.raises(RedisPoolBusy):  # what the pool raises: not a refused connection
            await asyncio.gather(*(client.ping() for _ in range(8)))
        decisions = await asyncio.gather(*(limiter.acquire("p", Cost(1, 1)) for _ in range(24)))
        assert all(d.ok for d in decisions)  # the ones that waited in vain took the local share
        assert len(busy) >= 10, busy  # the burst did run out of connections
        assert health.busy == len(busy)
        assert health.state != "down"
        assert not limiter.degraded
        proxy.delay_s = 0.0
        assert (await limiter.acquire("p", Cost(1, 1))).ok
        assert health.state == "healthy"
    finally:
        await limiter.aclose()
        await health.aclose()
        await client.aclose()


async def test_levels_report_the_shared_buckets(redis_url: str) -> None:
    rs = _settings(redis_url)
    a = RedisLimiter(rs, LimitSettings(rpm=600), {})
    b = RedisLimiter(rs, LimitSettings(rpm=600), {})
    try:
        for _ in range(100):
            assert (await a.acquire("p", Cost(1, 1))).ok
        b.levels()  # the first call reads Redis in the background
        await until(lambda: ("org", "rpm") in b.levels())
        assert b.levels()[("org", "rpm")] < 510  # what replica a took shows on replica b
    finally:
        await a.aclose()
        await b.aclose()
