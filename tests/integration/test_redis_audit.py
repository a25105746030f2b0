"""Redis' eviction setting and its evictions, read by the gateway (service/config/redis_audit.py),
on a redis-server of the test's own whose settings the tests change (CONFIG SET).

Without the audit, a Redis that evicts keys gave no sign: a budget counter or a replay
sighting evicted is not a lost epoch, so nothing was written back and nothing said so.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from service.app import _redis_health
from service.config.loader import parse_config
from service.config.redis_audit import RedisAudit
from service.telemetry.metrics import Metrics
from tests.support.polling import until
from tests.support.redis import redis_server

pytestmark = pytest.mark.integration


@pytest.fixture
async def redis(tmp_path: Path) -> AsyncIterator[aioredis.Redis]:
    if os.environ.get("REDIS_URL"):
        pytest.skip("changes the server's settings: needs a redis-server of its own")
    with redis_server(tmp_path) as url:
        client = aioredis.Redis.from_url(url)
        try:
            yield client
        finally:
            await client.aclose()


class _Seen:
    def __init__(self) -> None:
        self.may_evict: list[bool] = []
        self.evicted: list[int] = []

    def audit(self, client: aioredis.Redis) -> RedisAudit:
        return RedisAudit(client, may_evict=self.may_evict.append, evicted=self.evicted.append)


async def _fill(client: aioredis.Redis, mb: int) -> None:
    value = b"x" * 10_000
    async with client.pipeline(transaction=False) as pipe:
        for i in range(mb * 100):
            pipe.set(f"junk:{i}", value)
        await pipe.execute()


async def test_a_redis_that_may_evict_is_said_and_each_eviction_is_counted(
    redis: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    seen = _Seen()
    audit = seen.audit(redis)
    await audit.check()
    assert seen.may_evict == [False], "the default (no maxmemory) evicts nothing"
    await redis.config_set("maxmemory", "8mb")
    await redis.config_set("maxmemory-policy", "allkeys-lru")
    with caplog.at_level(logging.INFO, logger="service.config.redis_audit"):
        await audit.check()
        await audit.check()
        warnings = [r for r in caplog.records if "may evict" in r.getMessage()]
        assert seen.may_evict[1:] == [True, True]
        assert len(warnings) == 1, "said once, not at every check"
        assert warnings[0].maxmemory_policy == "allkeys-lru"  # type: ignore[attr-defined]
        assert seen.evicted == []
        await _fill(redis, 16)  # twice what it may hold: it evicts
        await audit.check()
        assert len(seen.evicted) == 1
        assert seen.evicted[0] > 0
        errors = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert [r.evicted_keys for r in errors] == seen.evicted  # type: ignore[attr-defined]
        await audit.check()
        assert len(seen.evicted) == 1, "a rise is counted once"
        await redis.config_set("maxmemory-policy", "noeviction")
        await audit.check()
        assert seen.may_evict[-1] is False
        assert any("no longer evicts" in r.getMessage() for r in caplog.records)


async def test_evictions_before_the_first_look_are_said_not_counted(
    redis: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    await redis.config_set("maxmemory", "8mb")
    await redis.config_set("maxmemory-policy", "allkeys-random")
    await _fill(redis, 16)
    seen = _Seen()
    with caplog.at_level(logging.WARNING, logger="service.config.redis_audit"):
        await seen.audit(redis).check()
    assert seen.evicted == [], "another replica may have counted them"
    assert any("before this replica looked" in r.getMessage() for r in caplog.records)


async def test_a_user_refused_info_is_not_checked_and_redis_is_not_down(
    redis: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    await redis.acl_setuser(
        "gw", enabled=True, passwords=["+pw"], keys=["*"], commands=["+@all", "-@dangerous"]
    )
    kwargs = redis.connection_pool.connection_kwargs
    limited = aioredis.Redis(host=kwargs["host"], port=kwargs["port"], username="gw", password="pw")
    try:
        seen = _Seen()
        audit = seen.audit(limited)
        with caplog.at_level(logging.INFO, logger="service.config.redis_audit"):
            await audit.run()  # returns: nothing more to check
        assert audit.refused
        assert seen.may_evict == []
        assert any("refuses INFO" in r.getMessage() for r in caplog.records)
    finally:
        await limited.aclose()


async def test_the_gateway_audits_its_redis_and_exports_what_it_found(redis: aioredis.Redis) -> None:
    """As the service wires it (`app._redis_health`): the health's start begins the audit."""
    await redis.config_set("maxmemory", "64mb")
    await redis.config_set("maxmemory-policy", "volatile-lru")
    kwargs = redis.connection_pool.connection_kwargs
    url = f"redis://{kwargs['host']}:{kwargs['port']}/0"
    settings = parse_config(
        {"redis": {"url": url, "key_prefix": f"t-{uuid.uuid4().hex[:8]}"}, "partners": []}
    )
    metrics = Metrics()
    health = _redis_health(redis, settings, metrics)
    assert health is not None
    try:
        await health.start()
        await until(lambda: metrics.registry.get_sample_value("gateway_redis_may_evict") == 1, 5)
        assert health.state == "healthy"
    finally:
        await health.aclose()
