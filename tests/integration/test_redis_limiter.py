"""Limits shared across replicas through a real Redis (Debian's redis-server):
several limiters draw on one org budget atomically; without Redis each falls back to
a safe local share, says so, and recovers by itself."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from service.config.settings import LimitSettings, RedisSettings
from service.scheduling.limiter import Cost, Usage
from service.scheduling.pools import DEFAULT_CLASS, PauseScope
from service.scheduling.redis_limiter import RedisLimiter
from tests.support.polling import until
from tests.support.redis import free_port, redis_server

pytestmark = pytest.mark.integration


def _settings(url: str, **kw: object) -> RedisSettings:
    return RedisSettings.model_validate({"url": url, "key_prefix": f"t-{uuid.uuid4().hex[:8]}", **kw})


async def test_replicas_share_one_org_budget_atomically(redis_url: str) -> None:
    rs = _settings(redis_url)
    replicas = [RedisLimiter(rs, LimitSettings(rpm=60), {}) for _ in range(3)]
    try:
        results = await asyncio.gather(
            *[r.acquire(f"p{i % 3}", Cost(1, 1)) for i in range(150) for r in replicas]
        )
        granted = sum(d.ok for d in results)
        assert 60 <= granted <= 62  # the burst capacity, plus what refilled during the run
        refused = [d for d in results if not d.ok]
        assert all(d.scope == "org" and 0 < d.wait_s <= 1.01 for d in refused)
    finally:
        for r in replicas:
            await r.aclose()


async def test_partner_limits_hold_across_replicas_and_refunds_are_shared(redis_url: str) -> None:
    rs = _settings(redis_url)
    partners = {"acme": LimitSettings(otpm=1000)}
    a = RedisLimiter(rs, LimitSettings(otpm=100_000), partners)
    b = RedisLimiter(rs, LimitSettings(otpm=100_000), partners)
    try:
        assert (await a.acquire("acme", Cost(1, 600))).ok
        d = await b.acquire("acme", Cost(1, 600))
        assert (d.ok, d.scope) == (False, "partner")
        assert (await b.acquire("globex", Cost(1, 600))).ok
        a.settle("acme", Cost(1, 600), Usage(1, 100))  # 500 of the 600 come back
        await until(lambda: not a._background, timeout_s=5)  # the refund reached Redis
        assert (await b.acquire("acme", Cost(1, 600))).ok
    finally:
        await a.aclose()
        await b.aclose()


async def test_a_429_pause_reaches_every_replica(redis_url: str) -> None:
    rs = _settings(redis_url)
    a = RedisLimiter(rs, LimitSettings(rpm=1000), {})
    b = RedisLimiter(rs, LimitSettings(rpm=1000), {})
    try:
        paused_at = time.monotonic()
        a.pause(PauseScope("org", DEFAULT_CLASS), 2.0)
        await until(lambda: not a._background, timeout_s=5)  # the pause reached Redis
        d = await b.acquire("x", Cost(1, 1))
        assert (d.ok, d.scope) == (False, "org")
        assert 2.0 - (time.monotonic() - paused_at) - 0.01 < d.wait_s <= 2.0
    finally:
        await a.aclose()
        await b.aclose()


async def test_degrades_to_a_local_share_and_recovers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("REDIS_URL", raising=False)
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    states: list[bool] = []
    limiter = RedisLimiter(
        _settings(url, expected_replicas=3, timeout_s=0.2),
        LimitSettings(rpm=60),
        {},
        on_degraded=states.append,
    )
    try:
        results = [await limiter.acquire("p", Cost(1, 1)) for _ in range(40)]
        assert limiter.degraded
        assert states == [True]
        assert sum(d.ok for d in results) == 20  # a third of the org's 60 RPM
        with redis_server(tmp_path, port=port):
            for _ in range(50):
                if not limiter.degraded:
                    break
                await asyncio.sleep(0.1)
            assert not limiter.degraded
            assert states == [True, False]
            assert (await limiter.acquire("p", Cost(1, 1))).ok
            client = aioredis.Redis.from_url(url)
            keys = await client.keys("*bucket:org:rpm")
            await client.aclose()
            assert keys, "the grant after recovery went through Redis"
    finally:
        await limiter.aclose()
