"""Build the two outcomes of a request: a response or a dead letter (bytes on the wire)."""

from __future__ import annotations

import base64
import hashlib
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

from service.contracts.reasons import RETRYABLE_REASONS, Reason

SCHEMA_VERSION = 1
Headers = Sequence[tuple[str, bytes]]
RecordHeaders = Sequence[tuple[str | bytes, bytes | None]]
"""A request's headers as read: a value may be null, a name is bytes when it is not UTF-8."""


def utc_iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a request came from: enough to find, understand and replay it."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int | None
    key: bytes | None
    value: bytes | None
    headers: RecordHeaders = ()


@dataclass(slots=True)
class Timings:
    received_at: float
    queue_s: float = 0.0
    upstream_s: float = 0.0


@dataclass(frozen=True, slots=True)
class UpstreamInfo:
    status: int | None = None
    error_type: str | None = None
    error_code: str | None = None
    request_id: str | None = None


@dataclass(frozen=True, slots=True)
class DeadLetter:
    partner: str
    reason: Reason
    detail: str
    origin: Origin
    request_id: str | None = None
    attempts: int = 0
    upstream: UpstreamInfo | None = None
    extra_headers: Headers = field(default_factory=tuple)
    response: Mapping[str, Any] | None = None
    """For `response_too_large`: the response's `value` (bytes), digest, size and usage."""
    claim: Mapping[str, Any] | None = None
    """For `outcome_unknown`: when the call was claimed, by which owner, after how many attempts."""


def _b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode("ascii")


def encode_response(
    *,
    partner: str,
    request_id: str,
    message_body: Mapping[str, Any],
    attempts: int,
    upstream_request_id: str | None,
    timings: Timings,
    completed_at: float,
    request_timestamp_ms: int | None,
    metadata: Mapping[str, str] | None,
    cost: Mapping[str, Any],
    unknown_retry: Mapping[str, Any] | None = None,
    served_by: Mapping[str, Any] | None = None,
    cached_from: Mapping[str, Any] | None = None,
) -> bytes:
    """The response document; `cost` is the call's cost object (`pricing.Quote.doc()`).
    `served_by`: a Message Batches result. `cached_from` (the original call's
    `upstream_request_id` and `cached_at`) makes it a response served from the response
    cache: `cached: true`, and `upstream_request_id` null (no call was made for this one)."""
    usage = message_body.get("usage") or {}
    doc: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "request_id": request_id,
        "partner": partner,
        "message": message_body,
        "usage": usage,
        "cost": cost,
        "attempts": attempts,
        "cached": cached_from is not None,
        "upstream_request_id": upstream_request_id,
        "timings": {
            "request_timestamp_ms": request_timestamp_ms,
            "received_at": utc_iso(timings.received_at),
            "completed_at": utc_iso(completed_at),
            "queue_ms": round(timings.queue_s * 1000, 3),
            "upstream_ms": round(timings.upstream_s * 1000, 3),
            "total_ms": round(max(0.0, completed_at - timings.received_at) * 1000, 3),
        },
    }
    if metadata:
        doc["metadata"] = dict(metadata)
    if unknown_retry is not None:
        doc["unknown_retry"] = dict(unknown_retry)
    if served_by is not None:
        doc["served_by"] = dict(served_by)
    if cached_from is not None:
        doc["cached_from"] = dict(cached_from)
    return orjson.dumps(doc)


MAX_HEADER_BYTES = 64 * 1024
"""Original header values kept inline in a dead letter, all together; beyond, values are digested."""
MAX_HEADER_VALUE_BYTES = 8 * 1024
"""One header value kept inline (W3C baggage's own bound); a longer one is digested."""
MAX_HEADERS = 64
"""Original headers listed in a dead letter; later ones are only counted (`headers_count`)."""
MAX_HEADER_NAME_BYTES = 256
MAX_KEY_BYTES = 4 * 1024
MAX_DETAIL_CHARS = 4096
"""A dead letter's `detail`, at most (a longer one is cut, saying how much was cut): it may quote
the partner's input (a refused field's name), which must not make the dead letter too large to
publish."""


def bounded_detail(detail: str) -> str:
    """`detail` as a dead letter carries it: at most `MAX_DETAIL_CHARS`, cut with a note."""
    if len(detail) <= MAX_DETAIL_CHARS:
        return detail
    note = f"... ({len(detail):,} characters, cut)"
    return detail[: MAX_DETAIL_CHARS - len(note)] + note


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _header_name(name: str | bytes) -> tuple[str, bytes | None]:
    """A header name as dead-letter text, cut to `MAX_HEADER_NAME_BYTES`, and its raw bytes when
    it is not UTF-8 (shown with backslash escapes)."""
    if isinstance(name, bytes):
        raw = bytes(name)
        try:
            name = raw.decode("utf-8")
        except UnicodeDecodeError:
            raw = raw[:MAX_HEADER_NAME_BYTES]
            return raw.decode("utf-8", "backslashreplace")[:MAX_HEADER_NAME_BYTES], raw
    if len(name) <= MAX_HEADER_NAME_BYTES // 4:
        return name, None
    return name.encode("utf-8", "surrogatepass")[:MAX_HEADER_NAME_BYTES].decode("utf-8", "ignore"), None


def _headers_doc(headers: RecordHeaders) -> tuple[list[dict[str, Any]], bool]:
    """The original headers, bounded, so a hostile record cannot make an unpublishable dead letter:
    at most `MAX_HEADERS`, names cut to `MAX_HEADER_NAME_BYTES`, and a value kept inline only
    while it fits `MAX_HEADER_VALUE_BYTES` and the `MAX_HEADER_BYTES` budget of all of them;
    otherwise it is replaced by its digest (`value_digest`, `size`, `truncated`)."""
    out: list[dict[str, Any]] = []
    budget = MAX_HEADER_BYTES
    for k, v in headers[:MAX_HEADERS]:
        name, raw_name = _header_name(k)
        item: dict[str, Any] = {"key": name, "value_b64": None}
        if raw_name is not None:
            item["key_b64"] = _b64(raw_name)
        if v is not None:
            if len(v) <= min(budget, MAX_HEADER_VALUE_BYTES):
                budget -= len(v)
                item["value_b64"] = _b64(v)
            else:
                item.update(truncated=True, size=len(v), value_digest=_digest(v))
        out.append(item)
    return out, len(headers) > MAX_HEADERS


MAX_EXCEPTION_MESSAGE_BYTES = 1024
DLT_ORIGINAL_TOPIC = "kafka_dlt-original-topic"
DLT_ORIGINAL_PARTITION = "kafka_dlt-original-partition"
DLT_ORIGINAL_OFFSET = "kafka_dlt-original-offset"
DLT_ORIGINAL_TIMESTAMP = "kafka_dlt-original-timestamp"
DLT_ORIGINAL_GROUP = "kafka_dlt-original-consumer-group"
DLT_EXCEPTION_FQCN = "kafka_dlt-exception-fqcn"
DLT_EXCEPTION_MESSAGE = "kafka_dlt-exception-message"
DLT_REASON = "gateway-reason"


def deadletter_headers(dl: DeadLetter, group_id: str) -> tuple[tuple[str, bytes], ...]:
    """Where the request was and why it failed, as headers in the style of Spring Kafka's
    dead-letter publishing (same names and encodings: partition a 4-byte and offset and
    timestamp 8-byte big-endian integers, the rest UTF-8), so tools that route or replay
    dead letters need not parse the body. The "exception class" is the reason
    (`claude_gateway.reasons.<reason>`); its message is the detail, cut to 1 KiB."""
    o = dl.origin
    headers = [
        (DLT_REASON, dl.reason.value.encode()),
        (DLT_ORIGINAL_TOPIC, o.topic.encode()),
        (DLT_ORIGINAL_PARTITION, struct.pack(">i", o.partition)),
        (DLT_ORIGINAL_OFFSET, struct.pack(">q", o.offset)),
    ]
    if o.timestamp_ms is not None:
        headers.append((DLT_ORIGINAL_TIMESTAMP, struct.pack(">q", o.timestamp_ms)))
    message = dl.detail.encode("utf-8", "replace")[:MAX_EXCEPTION_MESSAGE_BYTES]
    headers += [
        (DLT_ORIGINAL_GROUP, group_id.encode()),
        (DLT_EXCEPTION_FQCN, f"claude_gateway.reasons.{dl.reason.value}".encode()),
        (DLT_EXCEPTION_MESSAGE, message.decode("utf-8", "ignore").encode()),
    ]
    return tuple(headers)


def encode_deadletter(
    dl: DeadLetter, *, failed_at: float, max_original_bytes: int, max_response_bytes: int = 0
) -> bytes:
    """The dead letter document. Original bytes beyond `max_original_bytes` are cut
    (flagged `truncated`, with the digest and size of the whole value); keys beyond
    `MAX_KEY_BYTES` too (`key_truncated`). Headers are bounded as `_headers_doc` says;
    beyond `MAX_HEADERS` of them, `headers_truncated` and `headers_count`."""
    value = dl.origin.value
    truncated = value is not None and len(value) > max_original_bytes
    kept = value[:max_original_bytes] if (value is not None and truncated) else value
    headers, headers_truncated = _headers_doc(dl.origin.headers)
    key = dl.origin.key
    upstream = None
    if dl.upstream is not None:
        u = dl.upstream
        upstream = {
            "status": u.status,
            "error_type": u.error_type,
            "error_code": u.error_code,
            "request_id": u.request_id,
        }
    original: dict[str, Any] = {
        "topic": dl.origin.topic,
        "partition": dl.origin.partition,
        "offset": dl.origin.offset,
        "timestamp_ms": dl.origin.timestamp_ms,
        "key_b64": _b64(key if key is None else key[:MAX_KEY_BYTES]),
        "headers": headers,
        "value_b64": _b64(kept),
        "value_sha256": None if value is None else hashlib.sha256(value).hexdigest(),
        "value_size": 0 if value is None else len(value),
        "truncated": truncated,
    }
    if headers_truncated:
        original.update(headers_truncated=True, headers_count=len(dl.origin.headers))
    if key is not None and len(key) > MAX_KEY_BYTES:
        original.update(key_truncated=True, key_size=len(key))
    doc = {
        "schema_version": SCHEMA_VERSION,
        "request_id": dl.request_id,
        "partner": dl.partner,
        "reason": dl.reason.value,
        "detail": bounded_detail(dl.detail),
        "retryable": dl.reason in RETRYABLE_REASONS,
        "attempts": dl.attempts,
        "upstream": upstream,
        "failed_at": utc_iso(failed_at),
        "original": original,
    }
    if dl.claim is not None:
        doc["claim"] = dict(dl.claim)
    if dl.response is not None:
        response = dict(dl.response)
        raw = response.pop("value", b"") or b""
        kept = raw[:max_response_bytes]
        response.update(value_b64=_b64(kept), truncated=len(kept) < len(raw))
        doc["response"] = response
    return orjson.dumps(doc)
