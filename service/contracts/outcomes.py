"""Build the two outcomes of a request: a response or a dead letter (bytes on the wire)."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

from service.contracts.reasons import RETRYABLE_REASONS, Reason

SCHEMA_VERSION = 1
Headers = Sequence[tuple[str, bytes]]


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
    headers: Headers = ()


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
) -> bytes:
    usage = message_body.get("usage") or {}
    doc: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "request_id": request_id,
        "partner": partner,
        "message": message_body,
        "usage": usage,
        "attempts": attempts,
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
    return orjson.dumps(doc)


MAX_HEADER_BYTES = 64 * 1024
"""Original header bytes kept in a dead letter; beyond, values are cut and headers dropped."""
MAX_KEY_BYTES = 4 * 1024


def _headers_doc(headers: Headers) -> tuple[list[dict[str, Any]], bool]:
    """The original headers, bounded: a hostile record must not make an unpublishable dead letter."""
    out: list[dict[str, Any]] = []
    budget = MAX_HEADER_BYTES
    for k, v in headers:
        if budget <= 0:
            return out, True
        name = k[:256]
        budget -= len(name)
        item: dict[str, Any] = {"key": name, "value_b64": None}
        if v is not None:
            kept = v[: max(0, budget)]
            budget -= len(kept)
            item["value_b64"] = _b64(kept)
            if len(kept) < len(v):
                item.update(truncated=True, size=len(v))
        out.append(item)
    return out, False


def encode_deadletter(dl: DeadLetter, *, failed_at: float, max_original_bytes: int) -> bytes:
    """The dead letter document. Original bytes beyond `max_original_bytes` are cut
    (flagged `truncated`, with the digest and size of the whole value); so are
    headers beyond `MAX_HEADER_BYTES` (`headers_truncated`) and keys beyond
    `MAX_KEY_BYTES` (`key_truncated`)."""
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
        "detail": dl.detail,
        "retryable": dl.reason in RETRYABLE_REASONS,
        "attempts": dl.attempts,
        "upstream": upstream,
        "failed_at": utc_iso(failed_at),
        "original": original,
    }
    return orjson.dumps(doc)
