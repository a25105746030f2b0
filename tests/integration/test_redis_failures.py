"""Redis failures operators really meet, on a redis-server of the test's own (its settings are
changed: the session's server is shared): a Redis that answers PING but refuses writes (full
under `noeviction`, or a read-only replica after a failover), and a password rotated while the
gateway runs.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from redis.exceptions import AuthenticationError

from service.config.redis import redis_client
from service.config.redis_health import REDIS_ERRORS, RedisHealth
from service.config.secrets import SecretRef
from service.config.settings import RedisSettings
from tests.support.polling import until
from tests.support.redis import redis_server

pytestmark = pytest.mark.integration


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[str]:
    if os.environ.get("REDIS_URL"):
        pytest.skip("needs a redis-server of its own (REDIS_URL points at a shared one)")
    with redis_server(tmp_path / "redis") as url:
        yield url


async def test_a_redis_that_refuses_writes_stays_down_instead_of_flapping(own_redis: str) -> None:
    """Full under `noeviction`, Redis still answers PING: a PING probe called it healthy every
    second, and the next write took it down again (6 transitions in 6 s, 4 log lines each)."""
    prefix = f"t-{uuid.uuid4().hex[:8]}"
    client = redis_client(RedisSettings(url=own_redis, key_prefix=prefix, timeout_s=0.5))
    admin = aioredis.from_url(own_redis)
    health = RedisHealth(client, probe_interval_s=0.05, probe_key="{" + prefix + "}:health")
    seen: list[bool] = []
    health.subscribe(seen.append)
    try:
        await admin.config_set("maxmemory-policy", "noeviction")
        await admin.config_set("maxmemory", "1")
        try:
            await client.set(f"{prefix}:x", "1")
        except REDIS_ERRORS as exc:  # OOM command not allowed when used memory > 'maxmemory'
            health.failed(exc)
        assert health.down
        await asyncio.sleep(1.0)  # twenty probes, each refused
        assert health.down, "a Redis that refuses writes was taken for healthy"
        assert seen == [True]
        await admin.config_set("maxmemory", "0")
        await until(lambda: not health.down, 5)
        assert seen == [True, False]
    finally:
        await health.aclose()
        await client.aclose()
        await admin.aclose()


async def _requirepass(url: str, current: str | None, new: str) -> None:
    admin = aioredis.from_url(url, password=current)
    try:
        await admin.config_set("requirepass", new)
    finally:
        await admin.aclose()


async def test_a_rotated_redis_password_is_used_by_the_next_connection(
    own_redis: str, tmp_path: Path
) -> None:
    """The password is read from its file each time a connection authenticates: after the file
    and Redis change, new connections work without a restart (read once at start, every new
    connection failed until the process restarted)."""
    secret = tmp_path / "redis-password"
    secret.write_text("first-password-0123")
    await _requirepass(own_redis, None, "first-password-0123")
    settings = RedisSettings(url=own_redis, password=SecretRef(file=secret), timeout_s=0.5)
    client = redis_client(settings)
    try:
        assert await client.set("k", "1")
        secret.write_text("second-password-4567")
        await _requirepass(own_redis, "first-password-0123", "second-password-4567")
        await client.connection_pool.disconnect()  # as a failover or a restart of Redis drops them
        assert await client.get("k") == b"1"
        secret.write_text("wrong-password-8910")
        await client.connection_pool.disconnect()
        with pytest.raises(AuthenticationError):
            await client.get("k")
    finally:
        await client.aclose()


async def test_an_acl_user_named_in_the_url_authenticates_as_that_user(
    own_redis: str, tmp_path: Path
) -> None:
    """`redis.url: redis://gateway@host` with the password in `redis.password`: the connection
    authenticates as that ACL user (`AUTH gateway <password>`), not as the default user."""
    secret = tmp_path / "redis-password"
    secret.write_text("gateway-password-0123")
    admin = aioredis.from_url(own_redis)
    try:
        await admin.execute_command(
            "ACL", "SETUSER", "gateway", "on", ">gateway-password-0123", "~*", "+@all"
        )
    finally:
        await admin.aclose()
    url = own_redis.replace("redis://", "redis://gateway@", 1)
    client = redis_client(RedisSettings(url=url, password=SecretRef(file=secret), timeout_s=0.5))
    try:
        assert await client.execute_command("ACL", "WHOAMI") == b"gateway"
    finally:
        await client.aclose()
