"""The Redis client for shared limits, budgets and replay sightings, from `RedisSettings`."""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

from service.config.redis_health import RedisPoolBusy
from service.config.settings import RedisSettings


class _Pool(aioredis.BlockingConnectionPool):
    """redis-py's blocking pool, but a wait for a free connection that times out raises
    `RedisPoolBusy`, not the `ConnectionError` a refused connection raises: a burst is not
    an outage (`RedisHealth`)."""

    async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().get_connection(*args, **kwargs)  # type: ignore[no-untyped-call]
        except RedisConnectionError as exc:
            # the wait's own timeout; not a connection that failed (tested: the burst test)
            if isinstance(exc.__cause__, TimeoutError) and "No connection available" in str(exc):
                raise RedisPoolBusy(
                    f"no free connection of {self.max_connections} within {self.timeout} s"
                ) from exc
            raise


def redis_client(settings: RedisSettings) -> aioredis.Redis:
    """A client over a bounded pool that makes callers wait for a connection, not fail,
    under a burst (redis-py's default pool raises `MaxConnectionsError` instead), for at most
    `pool_timeout_s`; each call's answer is awaited for at most `timeout_s`."""
    password = settings.password.resolve().get_secret_value() if settings.password else None
    pool = _Pool.from_url(
        settings.url,
        password=password,
        max_connections=settings.max_connections,
        timeout=settings.pool_timeout_s,
        socket_timeout=settings.timeout_s,
        socket_connect_timeout=settings.timeout_s,
    )
    return aioredis.Redis.from_pool(pool)  # owns the pool: aclose() closes it
