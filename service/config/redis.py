"""The Redis client for shared limits, budgets and replay sightings, from `RedisSettings`."""

from __future__ import annotations

import ssl
from typing import Any
from urllib.parse import parse_qsl, unquote, urlparse

import redis.asyncio as aioredis
from redis.credentials import CredentialProvider
from redis.exceptions import ConnectionError as RedisConnectionError

from service.config.redis_health import RedisPoolBusy
from service.config.secrets import SecretRef, SecretResolutionError
from service.config.settings import RedisSettings
from service.telemetry.logs import register_secrets


class _SecretPassword(CredentialProvider):
    """The password read from its reference each time a connection authenticates: a rotated
    secret file is picked up by the next connection, without a restart."""

    def __init__(self, ref: SecretRef, username: str | None) -> None:
        self._ref = ref
        self._username = username
        """An ACL user named in `redis.url` (`redis://user@host`): it authenticates as that user."""

    def get_credentials(self) -> tuple[str] | tuple[str, str]:
        password = self._ref.resolve().get_secret_value()
        register_secrets([password])  # a new one is masked in logs like the first
        return (password,) if not self._username else (self._username, password)

    async def get_credentials_async(self) -> tuple[str] | tuple[str, str]:
        return self.get_credentials()


class _SharedContextSSLConnection(aioredis.SSLConnection):
    """redis-py's TLS connection, with one TLS context for the whole pool: redis-py builds one
    per connection (`ssl.create_default_context()` loads the system CA store, ~50 ms of the
    event loop each), so a cold burst over `rediss://` blocked the loop for seconds and its
    calls timed out (Redis declared down at start)."""

    _shared: Any = None

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        cls = type(self)
        if cls._shared is None:
            cls._shared = self.ssl_context
        self.ssl_context = cls._shared


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
    url, credentials = settings.url, None
    if settings.password is not None:
        settings.password.resolve()  # fail at start on a missing secret, as before
        parts = urlparse(url)
        credentials = _SecretPassword(settings.password, unquote(parts.username or "") or None)
        # redis-py refuses a user or password from the URL beside a credential provider
        url = parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()
    pool = _Pool.from_url(
        url,
        credential_provider=credentials,
        max_connections=settings.max_connections,
        timeout=settings.pool_timeout_s,
        socket_timeout=settings.timeout_s,
        socket_connect_timeout=settings.timeout_s,
    )
    if pool.connection_class is aioredis.SSLConnection:  # rediss://: one TLS context per pool
        shared = type("_PoolSSLConnection", (_SharedContextSSLConnection,), {})
        pool.connection_class = shared
        _load_tls_files(shared(**pool.connection_kwargs), settings.url)
    return aioredis.Redis.from_pool(pool)  # owns the pool: aclose() closes it


_TLS_FILES = ("ssl_ca_certs", "ssl_ca_path", "ssl_certfile", "ssl_keyfile")


def _load_tls_files(connection: aioredis.SSLConnection, url: str) -> None:
    """The pool's TLS context, built now by its first connection object (not connected): the
    files named in `redis.url`'s query are read at start, and a missing or bad one is a
    `SecretResolutionError` naming them, like Kafka's (redis-py read them at the first
    connection: every call then failed, with Python's error naming no file, and Redis was
    declared down)."""
    try:
        connection.ssl_context.get()
    except (OSError, ssl.SSLError) as exc:
        query = dict(parse_qsl(urlparse(url).query))
        named = ", ".join(f"{k}={query[k]}" for k in _TLS_FILES if query.get(k))
        named = named or "the system's CA certificates"
        raise SecretResolutionError(f"cannot load the Redis TLS files ({named}): {exc}") from exc
