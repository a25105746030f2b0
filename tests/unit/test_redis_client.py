"""The Redis client over TLS (`rediss://`) and what a failed call says (service/config/redis.py,
service/config/redis_health.py)."""

from __future__ import annotations

from redis.exceptions import AuthenticationError
from redis.exceptions import ConnectionError as RedisConnectionError

from service.config.redis import redis_client
from service.config.redis_health import describe
from service.config.settings import RedisSettings


async def test_the_connections_of_a_tls_pool_share_one_tls_context() -> None:
    """redis-py builds a TLS context per connection (the system CA store loaded each time,
    ~50 ms of the event loop): a cold burst over rediss:// timed out and Redis was declared
    down at start (found by a probe on a TLS redis-server)."""
    client = redis_client(RedisSettings(url="rediss://127.0.0.1:1/0?ssl_ca_certs=/nonexistent/ca.pem"))
    try:
        pool = client.connection_pool
        first, second = pool.make_connection(), pool.make_connection()
        assert first.ssl_context is second.ssl_context
        other = redis_client(RedisSettings(url="rediss://127.0.0.1:2/0"))
        try:  # one context per pool, not one for the process
            assert other.connection_pool.make_connection().ssl_context is not first.ssl_context
        finally:
            await other.aclose()
    finally:
        await client.aclose()


def test_a_failed_call_says_its_cause_and_the_setting_to_check() -> None:
    untrusted = describe(
        RedisConnectionError("Error 1 connecting: [SSL: CERTIFICATE_VERIFY_FAILED] self-signed")
    )
    assert untrusted["error"] == "ConnectionError"
    assert "CERTIFICATE_VERIFY_FAILED" in untrusted["cause"]
    assert "ssl_ca_certs" in untrusted["hint"]
    assert (
        "redis.password" in describe(AuthenticationError("WRONGPASS invalid username-password pair"))["hint"]
    )
    assert "hint" not in describe(
        RedisConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")
    )
