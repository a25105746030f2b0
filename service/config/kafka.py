"""Turn `KafkaSettings` into aiokafka client arguments (security included)."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, NamedTuple, TypeVar

import aiokafka.client
import aiokafka.conn
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.abc import AbstractTokenProvider
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import (
    KafkaConnectionError,
    SaslAuthenticationFailed,
    TopicAlreadyExistsError,
    UnsupportedSaslMechanismError,
    for_code,
)
from aiokafka.helpers import create_ssl_context

from service.config import txn_sender
from service.config.secrets import SecretRef, SecretResolutionError
from service.config.settings import KafkaSettings
from service.telemetry.logs import redact, register_secrets


class _FileOrEnvTokenProvider(AbstractTokenProvider):  # type: ignore[misc]
    """OAUTHBEARER token read from its reference at every (re)authentication,
    so a refreshed token file is picked up without a restart."""

    def __init__(self, ref: SecretRef) -> None:
        self._ref = ref

    async def token(self) -> str:
        return self._ref.resolve().get_secret_value()


class _OAuthAuthenticator(aiokafka.conn.OAuthAuthenticator):  # type: ignore[misc]
    """aiokafka's OAUTHBEARER step, but a refused token fails the login. The broker refuses one
    (expired, malformed, wrong signature) with an RFC 7628 error challenge, `{"status":
    "invalid_token"}`, in a SaslAuthenticate answer without an error code; aiokafka ignored it
    and logged 'Authenticated via OAUTHBEARER', then read the broker's next answer as metadata:
    no brokers, thousands of errors a minute, readiness 'joining' with no cause (found by a
    probe on Kafka 4.4; tests/unit/test_kafka_client.py)."""

    async def step(self, payload: bytes | None) -> Any:
        if self._token_sent and payload:
            raise SaslAuthenticationFailed(
                f"the broker refused the OAUTHBEARER token: {payload.decode('utf-8', 'replace')[:200]}"
            )
        return await super().step(payload)


aiokafka.conn.OAuthAuthenticator = _OAuthAuthenticator

_PASSWORD_REFS: dict[str, SecretRef] = {}
"""A SASL password a client was built with -> where it is kept (its file or variable)."""
_aiokafka_create_conn = aiokafka.client.create_conn


class ConnectFailure(NamedTuple):
    """Why the last connection to a broker failed."""

    cause: str
    hint: str | None
    """Which setting to check, when the cause may be the configuration's."""
    certain: bool
    """The configuration is the cause (a refused login, an untrusted certificate), not a
    broker that is down or restarting."""
    at: float
    """`time.monotonic()` of the failure."""


CONNECT_FAILURES: dict[str, ConnectFailure] = {}
"""The last failure of a connection to each `host:port`, while it fails: aiokafka logs the
cause once and raises a bare `KafkaConnectionError` ("Unable to bootstrap"), so a refused
password or an untrusted certificate looked like Kafka being down."""
_SASL_HINT = (
    "the broker refused the SASL login: check kafka.sasl_mechanism, kafka.sasl_username and the "
    "password's file (OAUTHBEARER: the token in kafka.sasl_oauth_token, its exp)"
)
_CERT_HINT = (
    "the broker's TLS certificate is not trusted: check kafka.ssl_cafile and kafka.ssl_check_hostname"
)
_CLIENT_CERT_HINT = (
    "the broker refused the gateway's TLS client certificate: check kafka.ssl_certfile and "
    "kafka.ssl_keyfile (signed by a CA the broker's truststore holds)"
)
_CLIENT_CERT_ALERTS = frozenset(
    {
        "SSLV3_ALERT_BAD_CERTIFICATE",
        "SSLV3_ALERT_CERTIFICATE_UNKNOWN",
        "SSLV3_ALERT_CERTIFICATE_EXPIRED",
        "SSLV3_ALERT_CERTIFICATE_REVOKED",
        "TLSV1_ALERT_UNKNOWN_CA",
        "TLSV1_ALERT_ACCESS_DENIED",
        "TLSV13_ALERT_CERTIFICATE_REQUIRED",
    }
)
"""TLS alerts the broker sends when it refuses the client certificate (`ssl.client.auth=required`)."""
_TLS_HINT = "the TLS handshake failed: is the port a TLS listener? check kafka.security_protocol"


FRESH_S = 120.0
"""A failure older than this says nothing of now (a broker that left long ago)."""


def _failure(cause: BaseException, tls: bool) -> ConnectFailure:
    text, now = redact(f"{type(cause).__name__}: {cause}"[:300]), time.monotonic()
    if isinstance(cause, SaslAuthenticationFailed | UnsupportedSaslMechanismError):
        return ConnectFailure(text, _SASL_HINT, True, now)
    if isinstance(cause, ssl.SSLCertVerificationError):
        return ConnectFailure(text, _CERT_HINT, True, now)
    refused_cert = getattr(cause, "reason", None) in _CLIENT_CERT_ALERTS
    if tls and isinstance(cause, ssl.SSLError) and refused_cert:
        return ConnectFailure(text, _CLIENT_CERT_HINT, True, now)
    if tls and isinstance(cause, ssl.SSLError | ConnectionResetError):  # a plaintext listener resets
        return ConnectFailure(text, _TLS_HINT, False, now)
    return ConnectFailure(text, None, False, now)


def connect_failure(bootstrap_servers: str) -> ConnectFailure | None:
    """The last connection failure to one of `bootstrap_servers` (`host:port,...`), else the
    latest to any broker (they advertise addresses of their own), within `FRESH_S`."""
    since = time.monotonic() - FRESH_S
    for server in bootstrap_servers.split(","):
        failure = CONNECT_FAILURES.get(server.strip())
        if failure is not None and failure.at >= since:
            return failure
    latest = next(reversed(CONNECT_FAILURES.values()), None)
    return latest if latest is not None and latest.at >= since else None


def describe_failure(exc: Exception, settings: KafkaSettings) -> dict[str, str]:
    """A command's one-line error for a Kafka error (or TLS files that do not load); for a
    connection error, the cause of the connection's failure and a hint at the setting."""
    out = {"error": type(exc).__name__, "detail": str(exc)}
    failure = connect_failure(settings.bootstrap_servers)
    if failure is not None and isinstance(exc, KafkaConnectionError):
        out["cause"] = failure.cause
        if failure.hint is not None:
            out["hint"] = failure.hint
    return out


def _cause(exc: BaseException) -> BaseException:
    """The error under aiokafka's wrapping (a TLS failure arrives as the connection's cause)."""
    while exc.__cause__ is not None and isinstance(exc, KafkaConnectionError):
        exc = exc.__cause__
    return exc


async def _create_conn(*args: Any, **kwargs: Any) -> Any:
    """aiokafka's `create_conn`, with the SASL password read again from where it is kept.

    aiokafka keeps the password a client was built with for every connection it opens later,
    so after a rotation (the broker's credential changed, then the Secret's file) a replica
    stayed refused (`SaslAuthenticationFailed`) from its next reconnection on, for good: a
    broker restart, a re-authentication the broker enforces (`connections.max.reauth.ms`).
    Now each new connection reads the file, as the Redis password and the OAUTHBEARER token
    are read. aiokafka has no hook for it (tests/unit/test_kafka_client.py checks the call)."""
    ref = _PASSWORD_REFS.get(kwargs.get("sasl_plain_password") or "")
    if ref is not None:
        with contextlib.suppress(SecretResolutionError):  # unreadable right now: the last one
            fresh = ref.resolve().get_secret_value()
            register_secrets([fresh])  # masked in logs like the first
            kwargs["sasl_plain_password"] = fresh
    where = f"{args[0]}:{args[1]}" if len(args) >= 2 else "?"
    try:
        conn = await _aiokafka_create_conn(*args, **kwargs)
    except Exception as exc:
        tls = kwargs.get("security_protocol") in ("SSL", "SASL_SSL")
        CONNECT_FAILURES.pop(where, None)  # the latest last
        CONNECT_FAILURES[where] = _failure(_cause(exc), tls)
        raise
    CONNECT_FAILURES.pop(where, None)
    return conn


aiokafka.client.create_conn = _create_conn


def _ssl_context(settings: KafkaSettings) -> ssl.SSLContext:
    """The TLS context, or a `SecretResolutionError` naming the files (Python's own error for
    a missing file names none): a start-up failure like a missing secret, not a traceback."""
    try:
        ctx: ssl.SSLContext = create_ssl_context(
            cafile=settings.ssl_cafile, certfile=settings.ssl_certfile, keyfile=settings.ssl_keyfile
        )
    except (OSError, ssl.SSLError) as exc:
        files = {f"kafka.{n}": getattr(settings, n) for n in ("ssl_cafile", "ssl_certfile", "ssl_keyfile")}
        named = ", ".join(f"{n}={v}" for n, v in files.items() if v) or "the system's CA certificates"
        raise SecretResolutionError(f"cannot load the Kafka TLS files ({named}): {exc}") from exc
    ctx.check_hostname = settings.ssl_check_hostname
    return ctx


def client_kwargs(settings: KafkaSettings) -> dict[str, Any]:
    """Arguments shared by the consumer, the producer and the admin client."""
    kwargs: dict[str, Any] = {
        "bootstrap_servers": settings.bootstrap_servers,
        "client_id": settings.client_id,
        "security_protocol": settings.security_protocol,
        "metadata_max_age_ms": settings.metadata_max_age_ms,
    }
    if settings.security_protocol in ("SSL", "SASL_SSL"):
        kwargs["ssl_context"] = _ssl_context(settings)
    if settings.sasl_mechanism is not None:
        kwargs["sasl_mechanism"] = settings.sasl_mechanism
        if settings.sasl_mechanism == "OAUTHBEARER":
            assert settings.sasl_oauth_token is not None
            kwargs["sasl_oauth_token_provider"] = _FileOrEnvTokenProvider(settings.sasl_oauth_token)
        else:
            assert settings.sasl_password is not None
            kwargs["sasl_plain_username"] = settings.sasl_username
            password = settings.sasl_password.resolve().get_secret_value()
            _PASSWORD_REFS[password] = settings.sasl_password  # read again for each connection
            kwargs["sasl_plain_password"] = password
    return kwargs


_Client = TypeVar("_Client", AIOKafkaProducer, AIOKafkaConsumer, AIOKafkaAdminClient)


@contextlib.asynccontextmanager
async def running(client: _Client) -> AsyncIterator[_Client]:
    """`client` started, and stopped (an admin client: closed) on the way out, whatever ends
    it: also when its start fails or is cancelled after connecting. aiokafka cleans up after
    neither, and its metadata task and connections would stay open. The stop goes on when the
    block is cancelled meanwhile."""
    try:
        await client.start()
        yield client
    finally:
        await asyncio.shield(client.close() if isinstance(client, AIOKafkaAdminClient) else client.stop())


START_GRACE_S = 10.0
"""How long a cancelled `start_whole` lets the starts under way end before cancelling them."""


async def start_whole(producers: Sequence[AIOKafkaProducer]) -> None:
    """Start `producers` together; once every start ended (`stop` may follow at once), raise
    the first one's error, if any. A start is never cancelled midway if it can help it:
    aiokafka's `bootstrap` closes its connection only on errors, so a cancel inside it leaves an
    open socket and its read task that no `stop` reaches (CI saw two, `Unclosed
    AIOKafkaConnection`, when a stopping replica cancelled a takeover). Cancelled, this lets the
    starts end (at most `START_GRACE_S`), then raises the cancel; the caller stops the producers
    as usual (`Turns.stop` waits for that)."""
    starts = [asyncio.ensure_future(p.start()) for p in producers]
    together = asyncio.gather(*starts, return_exceptions=True)
    try:
        results = await asyncio.shield(together)
    except asyncio.CancelledError:
        await _let_end(starts)
        together.cancel()  # a start still under way: cancelled after all
        raise
    for result in results:
        if isinstance(result, BaseException):
            raise result


async def _let_end(starts: list[asyncio.Future[None]]) -> None:
    """Wait up to `START_GRACE_S` for `starts` to end, through further cancels (a stop that
    cancels an open already cancelled must not cut the grace short)."""
    deadline = asyncio.get_running_loop().time() + START_GRACE_S
    while starts and (left := deadline - asyncio.get_running_loop().time()) > 0:
        try:
            await asyncio.wait(starts, timeout=left)
            return
        except asyncio.CancelledError:
            continue


def transactional_producer(settings: KafkaSettings, txn_id: str) -> AIOKafkaProducer:
    """A transactional producer (`txn_id`): every outcome writer and the batch worker use this
    one configuration; starting it fences the previous holder of the id. A new transaction's
    first coordinator request is retried sooner while the previous one ends (`txn_sender`)."""
    k = settings
    producer = AIOKafkaProducer(
        **client_kwargs(k),
        acks="all",
        enable_idempotence=True,
        transactional_id=txn_id,
        transaction_timeout_ms=k.transaction_timeout_ms,
        linger_ms=0,
        compression_type=k.producer_compression,
        max_request_size=k.producer_max_request_bytes,
        max_batch_size=k.producer_max_batch_bytes,
    )
    return txn_sender.install(producer)


async def create_topics(admin: AIOKafkaAdminClient, topics: Sequence[NewTopic]) -> list[str]:
    """Create `topics`; the names created. A topic that exists already (another replica was
    first) is no error; any other refusal raises (aiokafka's `create_topics` only returns
    the broker's per-topic errors)."""
    if not topics:
        return []
    response = await admin.create_topics(list(topics))
    created = []
    for entry in response.topic_errors:
        name, code = entry[0], entry[1]
        if code == 0:
            created.append(name)
            continue
        error = for_code(code)
        if error is not TopicAlreadyExistsError:
            message = entry[2] if len(entry) > 2 and entry[2] else error.__name__
            raise error(f"could not create the topic {name}: {message}")
    return created


def default_replication(brokers: int) -> int:
    """The replicas of a topic the gateway creates: 3, or as many as there are brokers if fewer."""
    return max(1, min(3, brokers))


async def create_missing(settings: KafkaSettings, build: Callable[[int], Sequence[NewTopic]]) -> list[str]:
    """Create those of `build(replication)` (at `default_replication`) that do not exist yet;
    the names created (none: all existed, or another replica was first)."""
    async with running(AIOKafkaAdminClient(**client_kwargs(settings))) as admin:
        existing = set(await admin.list_topics())
        brokers = len((await admin.describe_cluster()).get("brokers") or [])
        return await create_topics(
            admin, [t for t in build(default_replication(brokers)) if t.name not in existing]
        )
