"""Outcomes the gateway writes validate against the published schemas."""

from __future__ import annotations

import base64
import hashlib

import orjson
import pytest

from service.admission.pricing import quote
from service.config.settings import GatewaySettings
from service.contracts.outcomes import (
    DeadLetter,
    Origin,
    Timings,
    UpstreamInfo,
    encode_deadletter,
    encode_response,
)
from service.contracts.reasons import Reason
from service.contracts.schemas import SchemaViolation, validate

DEFAULT_PRICES = GatewaySettings(partners=[]).models
ORIGIN = Origin(
    "claude.requests.acme", 2, 41, 1_700_000_000_000, b"key", b'{"x": 1}', (("traceparent", b"00-ab"),)
)


def test_response_matches_schema() -> None:
    body = {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "claude-haiku-4-5",
        "content": [{"type": "text", "text": "hello"}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": 3, "output_tokens": 2},
    }
    raw = encode_response(
        partner="acme",
        request_id="r1",
        message_body=body,
        attempts=2,
        upstream_request_id="req_1",
        timings=Timings(received_at=1_700_000_000.0, queue_s=0.01, upstream_s=0.2),
        completed_at=1_700_000_000.5,
        request_timestamp_ms=1_700_000_000_000,
        metadata={"k": "v"},
        cost=quote(DEFAULT_PRICES["claude-haiku-4-5"], body["usage"], price_version="v1").doc(),
    )
    doc = orjson.loads(raw)
    validate("response", doc)
    assert doc["cost"]["nano_usd"] == 3 * 1_000 + 2 * 5_000
    assert doc["usage"] == body["usage"]
    assert doc["timings"]["total_ms"] == 500.0


@pytest.mark.parametrize("reason", list(Reason))
def test_every_dead_letter_reason_matches_schema(reason: Reason) -> None:
    dl = DeadLetter(
        "acme", reason, "why", ORIGIN, "r1", 3, UpstreamInfo(429, "rate_limit_error", None, "req")
    )
    doc = orjson.loads(encode_deadletter(dl, failed_at=1_700_000_000.0, max_original_bytes=1024))
    validate("deadletter", doc)
    assert base64.b64decode(doc["original"]["value_b64"]) == ORIGIN.value
    assert doc["original"]["headers"] == [
        {"key": "traceparent", "value_b64": base64.b64encode(b"00-ab").decode()}
    ]


def test_oversize_original_is_truncated_with_digest() -> None:
    big = b"a" * 5000
    origin = Origin("t", 0, 0, None, None, big)
    doc = orjson.loads(
        encode_deadletter(
            DeadLetter("acme", Reason.OVERSIZE, "big", origin), failed_at=0, max_original_bytes=100
        )
    )
    validate("deadletter", doc)
    o = doc["original"]
    assert o["truncated"] is True
    assert len(base64.b64decode(o["value_b64"])) == 100
    assert (o["value_size"], o["value_sha256"]) == (5000, hashlib.sha256(big).hexdigest())


def test_schema_rejects_unknown_reason() -> None:
    dl = DeadLetter("acme", Reason.REPLAY, "x", ORIGIN)
    doc = orjson.loads(encode_deadletter(dl, failed_at=0, max_original_bytes=10))
    doc["reason"] = "made_up"
    with pytest.raises(SchemaViolation):
        validate("deadletter", doc)
