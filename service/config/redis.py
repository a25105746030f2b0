"""The Redis client for shared limits, budgets and replay sightings, from `RedisSettings`."""

from __future__ import annotations

import redis.asyncio as aioredis

from service.config.settings import RedisSettings


def redis_client(settings: RedisSettings) -> aioredis.Redis:
    """A client over a bounded pool that makes callers wait for a connection, not fail,
    under a burst (redis-py's default pool raises `MaxConnectionsError` instead)."""
    password = settings.password.resolve().get_secret_value() if settings.password else None
    pool = aioredis.BlockingConnectionPool.from_url(
        settings.url,
        password=password,
        max_connections=settings.max_connections,
        timeout=settings.timeout_s,
        socket_timeout=settings.timeout_s,
        socket_connect_timeout=settings.timeout_s,
    )
    return aioredis.Redis.from_pool(pool)  # owns the pool: aclose() closes it
