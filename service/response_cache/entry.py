"""One cached answer and its bytes.

    byte 0      format: 0 raw JSON, 1 zlib-compressed JSON
    bytes 1-8   stored at (Unix ms, big-endian)
    bytes 9-16  expires at (Unix ms, big-endian)
    the rest    {"message": <the Messages API body as returned>, "upstream_request_id": ...}

The times are in front so an expired entry is told without decompressing it. JSON is
compressed (zlib from the standard library, level 6) from `compress_min_bytes` on, and kept
compressed only when that saves at least a tenth: Claude's text compresses to a third or so,
base64 and short answers do not.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from typing import Any

import orjson

_HEAD = struct.Struct(">BQQ")
RAW, ZLIB = 0, 1
MAX_INFLATED_BYTES = 64 * 1024 * 1024
"""The most an entry's body may inflate to (an answer is a few MB at most): beyond, it is corrupt
(a zlib bomb put in Redis would otherwise hold the event loop and its memory)."""


class CorruptEntry(ValueError):
    """The bytes are not an entry this gateway wrote."""


@dataclass(frozen=True, slots=True)
class Entry:
    message: dict[str, Any]
    """The Messages API response body, unchanged (its `usage` as billed then)."""
    upstream_request_id: str | None
    """Anthropic's request id of the call that produced it."""
    stored_at: float
    expires_at: float
    """Unix seconds."""

    def fresh(self, now: float, max_age_s: float) -> bool:
        """Not expired, and not older than `max_age_s` (the reading partner's ttl)."""
        return now < self.expires_at and now - self.stored_at <= max_age_s


def encode(entry: Entry, compress_min_bytes: int) -> bytes:
    body = orjson.dumps({"message": entry.message, "upstream_request_id": entry.upstream_request_id})
    kind = RAW
    if len(body) >= compress_min_bytes:
        packed = zlib.compress(body, 6)
        if len(packed) <= len(body) * 0.9:
            body, kind = packed, ZLIB
    return _HEAD.pack(kind, _ms(entry.stored_at), _ms(entry.expires_at)) + body


def times(blob: bytes) -> tuple[float, float]:
    """(stored at, expires at) of an entry's bytes, without decoding the rest."""
    if len(blob) < _HEAD.size:
        raise CorruptEntry(f"{len(blob)} bytes: shorter than an entry's header")
    _, stored_ms, expires_ms = _HEAD.unpack_from(blob)
    return stored_ms / 1000, expires_ms / 1000


def decode(blob: bytes) -> Entry:
    stored_at, expires_at = times(blob)
    kind = blob[0]
    body = blob[_HEAD.size :]
    try:
        if kind == ZLIB:
            inflate = zlib.decompressobj()
            body = inflate.decompress(body, MAX_INFLATED_BYTES)
            if inflate.unconsumed_tail:  # not what this gateway writes (a bomb put in Redis)
                raise CorruptEntry(f"an entry inflating past {MAX_INFLATED_BYTES} bytes")
        elif kind != RAW:
            raise CorruptEntry(f"unknown entry format {kind}")
        doc = orjson.loads(body)
        message, rid = doc["message"], doc["upstream_request_id"]
    except (zlib.error, orjson.JSONDecodeError, KeyError, TypeError) as exc:
        raise CorruptEntry(f"{type(exc).__name__} while decoding an entry") from exc
    if not isinstance(message, dict) or not (rid is None or isinstance(rid, str)):
        raise CorruptEntry("an entry without a message object")
    if not isinstance(message.get("content"), list) or not isinstance(message.get("usage"), dict):
        # what a hit publishes and meters: a Messages API body, never a crash on the hit
        raise CorruptEntry("an entry whose message has no content list or no usage object")
    return Entry(message, rid, stored_at, expires_at)


def _ms(ts: float) -> int:
    return max(0, int(ts * 1000))
