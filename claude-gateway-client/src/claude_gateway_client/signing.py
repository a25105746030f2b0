"""Sign a request the way the gateway verifies it: the request-signature contract, v1.

    headers = sign(topic, key, value, request_id, key_id="k2025a", secret=secret)
    await producer.send_and_wait(topic, value, key=key, headers=headers)

A signed request carries three Kafka headers:

    x-gateway-key-id     the key id, ASCII (e.g. "k2025a")
    x-gateway-timestamp  unix time in milliseconds, decimal ASCII (e.g. "1764003600000")
    x-gateway-signature  HMAC-SHA256(secret, canonical string), lowercase hex (64 chars)

The canonical string is UTF-8, lines joined by "\\n", no trailing newline:

    v1
    {topic}
    {record key as UTF-8 text; "" when there is no key (a signed record's key must be UTF-8)}
    {request_id}
    {timestamp, exactly as sent in the header}
    {sha256 of the record value, lowercase hex}

The gateway's docs (docs/signing.md) show the same in other languages, with a test vector.
"""

from __future__ import annotations

import hashlib
import hmac
import time

VERSION = "v1"
KEY_ID_HEADER = "x-gateway-key-id"
TIMESTAMP_HEADER = "x-gateway-timestamp"
SIGNATURE_HEADER = "x-gateway-signature"
SIGNATURE_HEADERS = (KEY_ID_HEADER, TIMESTAMP_HEADER, SIGNATURE_HEADER)


def canonical_string(topic: str, key: bytes | None, request_id: str, timestamp: str, value: bytes) -> bytes:
    """The bytes that are signed. `timestamp` is the header's text.

    Raises `UnicodeDecodeError` for a key that is not UTF-8: such a record cannot be signed.
    """
    key_text = "" if key is None else key.decode("utf-8")
    digest = hashlib.sha256(value).hexdigest()
    return "\n".join((VERSION, topic, key_text, request_id, timestamp, digest)).encode("utf-8")


def signature(secret: str, canonical: bytes) -> str:
    """HMAC-SHA256 of the canonical string, lowercase hex."""
    return hmac.new(secret.encode("utf-8"), canonical, hashlib.sha256).hexdigest()


def sign(
    topic: str,
    key: bytes | None,
    value: bytes,
    request_id: str,
    key_id: str,
    secret: str,
    timestamp_ms: int | None = None,
) -> list[tuple[str, bytes]]:
    """The three signature headers for one record (timestamp: now, unless given).

    `secret` is the signing key's text exactly as stored in the gateway's secret
    file or variable. Raises `ValueError` when the record key is not UTF-8.
    """
    ts = str(int(time.time() * 1000) if timestamp_ms is None else timestamp_ms)
    try:
        canonical = canonical_string(topic, key, request_id, ts, value)
    except UnicodeDecodeError as exc:
        raise ValueError("a signed record's key must be UTF-8 text (use the request id)") from exc
    return [
        (KEY_ID_HEADER, key_id.encode("ascii")),
        (TIMESTAMP_HEADER, ts.encode("ascii")),
        (SIGNATURE_HEADER, signature(secret, canonical).encode("ascii")),
    ]
