"""A hostile record cannot make its dead letter unpublishable: headers and key are bounded in it."""

from __future__ import annotations

import base64

import orjson

from service.contracts.outcomes import MAX_HEADER_BYTES, MAX_KEY_BYTES, DeadLetter, Origin, encode_deadletter
from service.contracts.reasons import Reason
from service.contracts.schemas import validate


def test_huge_and_numerous_headers_and_a_huge_key_are_cut() -> None:
    headers = [("x-gateway-signature", b"s" * 200_000), *((f"h{i}", b"v" * 20) for i in range(50_000))]
    origin = Origin("claude.requests.acme", 0, 1, None, b"k" * 300_000, b"{" * 900_000, tuple(headers))
    body = encode_deadletter(
        DeadLetter("acme", Reason.OVERSIZE, "big", origin), failed_at=0, max_original_bytes=512 * 1024
    )
    assert len(body) < 1_000_000 - 4 * MAX_KEY_BYTES
    doc = orjson.loads(body)
    validate("deadletter", doc)
    original = doc["original"]
    assert original["headers_truncated"] is True
    assert original["headers_count"] == len(headers)
    first = original["headers"][0]
    assert (first["key"], first["truncated"], first["size"]) == ("x-gateway-signature", True, 200_000)
    kept = sum(len(base64.b64decode(h["value_b64"])) + len(h["key"]) for h in original["headers"])
    assert kept <= MAX_HEADER_BYTES
    assert (original["key_truncated"], original["key_size"]) == (True, 300_000)
    assert len(base64.b64decode(original["key_b64"])) == MAX_KEY_BYTES


def test_ordinary_headers_are_kept_whole() -> None:
    headers = (("traceparent", b"00-abc-def-01"), ("x-gateway-key-id", b"k1"), ("empty", None))
    origin = Origin("t", 0, 1, None, b"r-1", b"{}", headers)  # type: ignore[arg-type]
    doc = orjson.loads(
        encode_deadletter(DeadLetter("acme", Reason.REPLAY, "x", origin), failed_at=0, max_original_bytes=10)
    )
    assert doc["original"]["headers"] == [
        {"key": "traceparent", "value_b64": base64.b64encode(b"00-abc-def-01").decode()},
        {"key": "x-gateway-key-id", "value_b64": base64.b64encode(b"k1").decode()},
        {"key": "empty", "value_b64": None},
    ]
    assert "headers_truncated" not in doc["original"]
    assert "key_truncated" not in doc["original"]
