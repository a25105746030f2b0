"""The request-signature contract (v1): header names, canonical string, encoding.

The gateway's verifier (`service.admission.signature`) uses this module; the
partner client (the `claude-gateway-client` distribution, which must not need the
gateway) carries the same contract in `claude_gateway_client.signing`. The tests
sign with the client and verify with the gateway (tests/unit/test_signing.py), and
compare both canonical strings (tests/unit/test_partner_client.py).

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

See docs/signing.md for the partner's view, with examples in several languages.
"""

from __future__ import annotations

import hashlib
import hmac

VERSION = "v1"
KEY_ID_HEADER = "x-gateway-key-id"
TIMESTAMP_HEADER = "x-gateway-timestamp"
SIGNATURE_HEADER = "x-gateway-signature"
SIGNATURE_HEADERS = (KEY_ID_HEADER, TIMESTAMP_HEADER, SIGNATURE_HEADER)


def canonical_string(topic: str, key: bytes | None, request_id: str, timestamp: str, value: bytes) -> bytes:
    """The bytes that are signed. `timestamp` is the header's text, unparsed.

    Raises `UnicodeDecodeError` for a key that is not UTF-8: such a record cannot be signed.
    """
    key_text = "" if key is None else key.decode("utf-8")
    digest = hashlib.sha256(value).hexdigest()
    return "\n".join((VERSION, topic, key_text, request_id, timestamp, digest)).encode("utf-8")


def signature(secret: str, canonical: bytes) -> str:
    """HMAC-SHA256 of the canonical string, lowercase hex."""
    return hmac.new(secret.encode("utf-8"), canonical, hashlib.sha256).hexdigest()
