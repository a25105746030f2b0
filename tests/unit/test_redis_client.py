"""The Redis client over TLS (`rediss://`) and what a failed call says (service/config/redis.py,
service/config/redis_health.py)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from redis.exceptions import AuthenticationError
from redis.exceptions import ConnectionError as RedisConnectionError

from service.config.redis import redis_client
from service.config.redis_health import describe
from service.config.secrets import SecretResolutionError
from service.config.settings import RedisSettings


def _ca(tmp: Path) -> Path:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    cert = tmp / "ca.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=redis-ca",
         "-keyout", str(tmp / "ca.key"), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert


async def test_the_connections_of_a_tls_pool_share_one_tls_context(tmp_path: Path) -> None:
    """redis-py builds a TLS context per connection (the system CA store loaded each time,
    ~50 ms of the event loop): a cold burst over rediss:// timed out and Redis was declared
    down at start (found by a probe on a TLS redis-server)."""
    client = redis_client(RedisSettings(url=f"rediss://127.0.0.1:1/0?ssl_ca_certs={_ca(tmp_path)}"))
    try:
        pool = client.connection_pool
        first, second = pool.make_connection(), pool.make_connection()
        assert first.ssl_context is second.ssl_context
        assert first.ssl_context.context is not None  # built with the client, not by the first call
        other = redis_client(RedisSettings(url="rediss://127.0.0.1:2/0"))
        try:  # one context per pool, not one for the process
            assert other.connection_pool.make_connection().ssl_context is not first.ssl_context
        finally:
            await other.aclose()
    finally:
        await client.aclose()


def test_tls_files_that_do_not_load_are_told_at_start_naming_them(tmp_path: Path) -> None:
    """redis-py read them at the first connection: every call then failed with Python's error,
    which names no file, and the gateway ran on local state (Redis declared down)."""
    not_a_cert = tmp_path / "ca.pem"
    not_a_cert.write_text("not a certificate\n")
    key = tmp_path / "client.key"
    for query in (
        "ssl_ca_certs=/nonexistent/redis-ca.pem",
        f"ssl_ca_certs={not_a_cert}",
        f"ssl_certfile={not_a_cert}&ssl_keyfile={key}",
    ):
        with pytest.raises(SecretResolutionError) as raised:
            redis_client(RedisSettings(url=f"rediss://gw:hunter2@127.0.0.1:1/0?{query}"))
        assert f"cannot load the Redis TLS files ({query.replace('&', ', ')})" in str(raised.value)
        assert "hunter2" not in str(raised.value)


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
