"""Sign a request the way the gateway verifies it (contract: `service.contracts.signing`).

    headers = sign(topic, key, value, request_id, key_id="k2025a", secret=secret)
    await producer.send_and_wait(topic, value, key=key, headers=headers)

docs/signing.md shows the same in other languages.
"""

from __future__ import annotations

import time

from service.contracts.signing import (
    KEY_ID_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    canonical_string,
    signature,
)


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
