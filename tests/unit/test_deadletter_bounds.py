"""A hostile record cannot make its dead letter unpublishable: headers and key are bounded in it."""

from __future__ import annotations

import base64
import hashlib
from typing import Any

import orjson

from service.admission.admit import Admission, Record, Rejected
from service.admission.registry import Registry
from service.config.loader import parse_config
from service.contracts.outcomes import (
    MAX_DETAIL_CHARS,
    MAX_HEADER_BYTES,
    MAX_HEADER_NAME_BYTES,
    MAX_HEADER_VALUE_BYTES,
    MAX_HEADERS,
    MAX_KEY_BYTES,
    DeadLetter,
    Origin,
    RecordHeaders,
    encode_deadletter,
)
from service.contracts.reasons import Reason
from service.contracts.schemas import validate

BROKER_LIMIT = 1_048_588  # message.max.bytes, the broker's default


def _dead_letter(headers: RecordHeaders, value: bytes = b"{}", max_original_bytes: int = 512 * 1024) -> bytes:
    origin = Origin("claude.requests.acme", 0, 1, None, b"r-1", value, tuple(headers))
    return encode_deadletter(
        DeadLetter("acme", Reason.OVERSIZE, "x", origin), failed_at=0, max_original_bytes=max_original_bytes
    )


def _inline(doc: dict[str, Any]) -> int:
    return sum(len(base64.b64decode(h["value_b64"])) for h in doc["original"]["headers"] if h["value_b64"])


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
    assert len(original["headers"]) == MAX_HEADERS
    first = original["headers"][0]
    assert first == {
        "key": "x-gateway-signature",
        "value_b64": None,
        "truncated": True,
        "size": 200_000,
        "value_digest": "sha256:" + hashlib.sha256(b"s" * 200_000).hexdigest(),
    }
    assert original["headers"][1] == {"key": "h0", "value_b64": base64.b64encode(b"v" * 20).decode()}
    assert (original["key_truncated"], original["key_size"]) == (True, 300_000)
    assert len(base64.b64decode(original["key_b64"])) == MAX_KEY_BYTES


def test_a_megabyte_trace_header_leaves_a_small_dead_letter() -> None:
    tracestate = b"a=" + b"b" * 1_000_000
    doc = orjson.loads(
        body := _dead_letter([("traceparent", b"00-" + b"1" * 52), ("tracestate", tracestate)])
    )
    validate("deadletter", doc)
    assert len(body) < 4096
    assert doc["original"]["headers"][1]["value_digest"] == "sha256:" + hashlib.sha256(tracestate).hexdigest()


def test_values_are_inline_within_the_total_budget_then_digested() -> None:
    per = MAX_HEADER_VALUE_BYTES
    headers = [(f"h{i}", bytes([65 + i]) * per) for i in range(MAX_HEADER_BYTES // per + 3)]
    doc = orjson.loads(_dead_letter(headers))
    validate("deadletter", doc)
    kept = doc["original"]["headers"]
    inline = [h for h in kept if h["value_b64"] is not None]
    assert len(inline) == MAX_HEADER_BYTES // per
    assert _inline(doc) == MAX_HEADER_BYTES
    assert all(h["truncated"] and h["size"] == per for h in kept[len(inline) :])
    assert "headers_truncated" not in doc["original"]


def test_many_empty_headers_cannot_blow_up_the_dead_letter() -> None:
    """2 bytes each on the wire, ~30 bytes each as JSON: only the first MAX_HEADERS are listed."""
    headers: list[tuple[str | bytes, bytes | None]] = [("", None)] * 500_000
    doc = orjson.loads(body := _dead_letter(headers))
    validate("deadletter", doc)
    assert len(body) < 4096
    assert (doc["original"]["headers_truncated"], doc["original"]["headers_count"]) == (True, 500_000)


def test_header_names_are_cut_and_a_name_that_is_not_utf8_is_kept_as_bytes() -> None:
    long_name = "é" * 10_000
    raw_name = b"x-\xff\xfe" + b"\x00" * 1000
    doc = orjson.loads(_dead_letter([(long_name, b"1"), (raw_name, b"2")]))
    validate("deadletter", doc)
    first, second = doc["original"]["headers"]
    assert len(first["key"].encode()) <= MAX_HEADER_NAME_BYTES
    assert first["key"] == "é" * (MAX_HEADER_NAME_BYTES // 2)
    assert second["key"].startswith("x-\\xff\\xfe\x00")
    assert len(second["key"]) <= MAX_HEADER_NAME_BYTES
    assert base64.b64decode(second["key_b64"]) == raw_name[:MAX_HEADER_NAME_BYTES]
    assert base64.b64decode(second["value_b64"]) == b"2"


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


def test_a_detail_quoting_huge_input_is_cut_so_the_dead_letter_stays_publishable() -> None:
    """A refused field's name is quoted in the detail (repr: one DEL byte becomes four
    characters): a 260 KB name made a dead letter over the broker's limit, so the record was
    quarantined with no outcome. The detail is cut, saying so; a short one is kept as it is."""
    admission = Admission(
        Registry.build(
            parse_config({"partners": [{"id": "acme", "api_key": {"env": "K"}}]}), environ={"K": "x"}
        )
    )
    messages = [{"role": "user", "content": "hi"}]
    doc = {
        "request_id": "r-1",
        "params": {"model": "claude-haiku-4-5", "max_tokens": 5, "messages": messages},
    }
    doc["\x7f" * 260_000] = 1
    value = orjson.dumps(doc)
    verdict = admission.admit(Record("claude.requests.acme", 0, 1, None, b"r-1", value))
    assert isinstance(verdict, Rejected)
    assert len(verdict.detail) > 1_000_000
    origin = Origin("claude.requests.acme", 0, 1, None, b"r-1", value)
    dl = DeadLetter("acme", verdict.reason, verdict.detail, origin, "r-1")
    encoded = encode_deadletter(dl, failed_at=0, max_original_bytes=0)
    assert len(encoded) < 64 * 1024
    out = orjson.loads(encoded)
    validate("deadletter", out)
    assert len(out["detail"]) == MAX_DETAIL_CHARS
    assert out["detail"].startswith("request.v1 schema: ")
    assert out["detail"].endswith(f"({len(verdict.detail):,} characters, cut)")
    short = DeadLetter("acme", Reason.SCHEMA_VIOLATION, "params.max_tokens must be a JSON integer", origin)
    assert orjson.loads(encode_deadletter(short, failed_at=0, max_original_bytes=0))["detail"] == short.detail
