"""Dead letters carry where the request was and why it failed as headers (Spring Kafka's names
and encodings), bounded whatever the request was."""

from __future__ import annotations

import struct

from service.contracts.outcomes import DeadLetter, Origin, deadletter_headers
from service.contracts.reasons import Reason


def _dl(detail: str = "bad signature", timestamp_ms: int | None = 1_700_000_000_123) -> DeadLetter:
    origin = Origin("claude.requests.acme", 7, 123_456_789_012, timestamp_ms, b"k", b"{}", ())
    return DeadLetter("acme", Reason.BAD_SIGNATURE, detail, origin, "r-1")


def test_headers_name_the_original_record_and_the_failure() -> None:
    h = dict(deadletter_headers(_dl(), "claude-gateway"))
    assert h["kafka_dlt-original-topic"] == b"claude.requests.acme"
    assert struct.unpack(">i", h["kafka_dlt-original-partition"]) == (7,)
    assert struct.unpack(">q", h["kafka_dlt-original-offset"]) == (123_456_789_012,)
    assert struct.unpack(">q", h["kafka_dlt-original-timestamp"]) == (1_700_000_000_123,)
    assert h["kafka_dlt-original-consumer-group"] == b"claude-gateway"
    assert h["kafka_dlt-exception-fqcn"] == b"claude_gateway.reasons.bad_signature"
    assert h["kafka_dlt-exception-message"] == b"bad signature"
    assert h["gateway-reason"] == b"bad_signature"


def test_no_timestamp_header_without_a_timestamp() -> None:
    names = [n for n, _ in deadletter_headers(_dl(timestamp_ms=None), "g")]
    assert "kafka_dlt-original-timestamp" not in names
    assert len(names) == len(set(names))


def test_the_message_is_cut_to_one_kib_of_valid_utf8() -> None:
    h = dict(deadletter_headers(_dl(detail="é" * 5000), "g"))
    message = h["kafka_dlt-exception-message"]
    assert len(message) <= 1024
    assert message.decode("utf-8") == "é" * 512
