"""The SASL password is read again for each new Kafka connection (service/config/kafka.py).

aiokafka keeps the password a client was built with and passes it to `create_conn` for every
connection it opens; the gateway swaps `aiokafka.client.create_conn` for one that reads the
password's file again. These tests check the aiokafka internals that relies on: its client
calls the module's `create_conn` with the password as a keyword, for the bootstrap and after.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from aiokafka.client import AIOKafkaClient
from aiokafka.errors import KafkaConnectionError

from service.config import kafka
from service.config.settings import KafkaSettings
from service.telemetry.logs import redact


class _Refused(ConnectionError):
    pass


@pytest.fixture
def seen(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    calls: list[dict[str, Any]] = []

    async def create_conn(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        raise _Refused("no broker in a unit test")

    monkeypatch.setattr(kafka, "_aiokafka_create_conn", create_conn)
    return calls


def _settings(secret: Path, mechanism: str = "SCRAM-SHA-512") -> KafkaSettings:
    return KafkaSettings.model_validate(
        {
            "bootstrap_servers": "127.0.0.1:1",
            "security_protocol": "SASL_PLAINTEXT",
            "sasl_mechanism": mechanism,
            "sasl_username": "gateway",
            "sasl_password": {"file": str(secret)},
        }
    )


async def _bootstrap(client: AIOKafkaClient) -> None:
    with pytest.raises(KafkaConnectionError):  # every bootstrap server refused
        await client.bootstrap()


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
async def test_each_new_connection_reads_the_password_file_again(
    tmp_path: Path, seen: list[dict[str, Any]], mechanism: str
) -> None:
    secret = tmp_path / "kafka.pw"
    secret.write_text("first-password-0a1b\n")
    client = AIOKafkaClient(**kafka.client_kwargs(_settings(secret, mechanism)))
    try:
        await _bootstrap(client)
        secret.write_text("rotated-password-9z8y\n")  # the Secret's file after a rotation
        await _bootstrap(client)  # the same client, as a reconnecting consumer or producer
    finally:
        await client.close()
    passwords = [c["sasl_plain_password"] for c in seen]
    assert passwords[0] == "first-password-0a1b"
    assert passwords[-1] == "rotated-password-9z8y", "a reconnection kept the old password"
    assert all(c["sasl_plain_username"] == "gateway" for c in seen)
    assert "rotated-password-9z8y" not in redact("auth failed for rotated-password-9z8y")


async def test_an_unreadable_file_keeps_the_last_password(tmp_path: Path, seen: list[dict[str, Any]]) -> None:
    secret = tmp_path / "kafka.pw"
    secret.write_text("first-password-0a1b\n")
    client = AIOKafkaClient(**kafka.client_kwargs(_settings(secret)))
    try:
        secret.unlink()  # mid-rotation: the file briefly gone
        await _bootstrap(client)
    finally:
        await client.close()
    assert seen
    assert seen[-1]["sasl_plain_password"] == "first-password-0a1b"


def test_a_failure_is_told_only_for_connection_errors_and_while_fresh(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The failures are kept per process: one left by another broker (or another test) must not
    be told beside an authorization error, nor once it is old."""
    from aiokafka.errors import TopicAuthorizationFailedError

    settings = KafkaSettings.model_validate({"bootstrap_servers": "127.0.0.1:1"})
    failure = kafka.ConnectFailure("ConnectionRefusedError: x", None, False, time.monotonic() - 10)
    monkeypatch.setattr(kafka, "CONNECT_FAILURES", {"10.0.0.9:9092": failure})
    refused = kafka.describe_failure(TopicAuthorizationFailedError("denied"), settings)
    assert "cause" not in refused
    unreachable = kafka.describe_failure(KafkaConnectionError("Unable to bootstrap"), settings)
    assert unreachable["cause"] == "ConnectionRefusedError: x"
    old = failure._replace(at=time.monotonic() - kafka.FRESH_S - 1)
    monkeypatch.setattr(kafka, "CONNECT_FAILURES", {"10.0.0.9:9092": old})
    assert kafka.connect_failure(settings.bootstrap_servers) is None
    assert "cause" not in kafka.describe_failure(KafkaConnectionError("Unable to bootstrap"), settings)


class _Token:
    async def token(self) -> str:
        return "eyJhbGciOiJub25lIn0.eyJzdWIiOiJnYXRld2F5In0."


async def test_a_refused_oauthbearer_token_fails_the_login() -> None:
    """The broker refuses an expired or malformed token with an RFC 7628 challenge and no error
    code; aiokafka took it for a success (then read the next answer as metadata)."""
    import aiokafka.conn
    from aiokafka.errors import SaslAuthenticationFailed

    def authenticator() -> Any:  # what aiokafka's connection builds for OAUTHBEARER
        return aiokafka.conn.OAuthAuthenticator(sasl_oauth_token_provider=_Token())

    ok = authenticator()
    first = await ok.step(None)
    assert first is not None
    assert first[0].startswith(b"n,,\x01auth=Bearer ")
    assert await ok.step(b"") is None  # the broker's empty answer: logged in
    refused = authenticator()
    await refused.step(None)
    with pytest.raises(SaslAuthenticationFailed, match="invalid_token"):
        await refused.step(b'{"status":"invalid_token"}')


def test_a_refused_client_certificate_is_told_as_such() -> None:
    import ssl

    alert = ssl.SSLError(1, "[SSL: SSLV3_ALERT_BAD_CERTIFICATE] sslv3 alert bad certificate")
    alert.reason = "SSLV3_ALERT_BAD_CERTIFICATE"
    failure = kafka._failure(alert, tls=True)
    assert failure.certain
    assert failure.hint is not None
    assert "kafka.ssl_certfile" in failure.hint
    other = ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number")
    other.reason = "WRONG_VERSION_NUMBER"
    assert not kafka._failure(other, tls=True).certain
