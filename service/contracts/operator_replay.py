"""The operator-replay contract (v1): a dead letter re-produced by `claude-gateway dlq replay`.

A replayed request carries its original bytes, key and headers (the partner's
signature too) and one more header:

    x-gateway-replay  {key id}:{unix ms}:{dead letter}:{HMAC-SHA256 hex}

where `{dead letter}` is `topic/partition/offset` of the dead letter it came
from, and the HMAC (with the operator key `operator_replay.keys[{key id}]`)
covers, UTF-8, lines joined by "\\n":

    replay-v1
    {request topic}
    {request_id}
    {unix ms, as in the header}
    {dead letter}
    {sha256 of the record value, lowercase hex}

The gateway accepts such a record although its partner signature is older than
`max_skew_s` and its request id was seen before: the partner signature must
still match the bytes, the operator signature must be fresh
(`operator_replay.max_age_s`), and the replay check keys on the request id *and*
the dead letter, so the same dead letter replayed twice within the window is a
`replay` again.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

HEADER = "x-gateway-replay"
VERSION = "replay-v1"


@dataclass(frozen=True, slots=True)
class ReplayMark:
    key_id: str
    timestamp_ms: int
    deadletter: str
    """`topic/partition/offset` of the dead letter replayed."""
    signature: str

    def encode(self) -> bytes:
        return f"{self.key_id}:{self.timestamp_ms}:{self.deadletter}:{self.signature}".encode("ascii")


def parse(raw: bytes) -> ReplayMark | None:
    """The header's parts, or None when it is not `kid:ms:topic/partition/offset:hex`."""
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        return None
    kid, _, rest = text.partition(":")
    ts, _, rest = rest.partition(":")
    ref, _, sig = rest.rpartition(":")
    if not (kid and ts.isdigit() and len(ts) <= 16 and ref.count("/") >= 2 and sig):
        return None
    return ReplayMark(kid, int(ts), ref, sig.strip().lower())


def canonical(topic: str, request_id: str, timestamp_ms: int, deadletter: str, value: bytes) -> bytes:
    digest = hashlib.sha256(value).hexdigest()
    return "\n".join((VERSION, topic, request_id, str(timestamp_ms), deadletter, digest)).encode("utf-8")


def sign(
    secret: str, key_id: str, topic: str, request_id: str, deadletter: str, value: bytes, timestamp_ms: int
) -> ReplayMark:
    mac = hmac.new(
        secret.encode("utf-8"), canonical(topic, request_id, timestamp_ms, deadletter, value), hashlib.sha256
    )
    return ReplayMark(key_id, timestamp_ms, deadletter, mac.hexdigest())


def valid(mark: ReplayMark, secret: str, topic: str, request_id: str, value: bytes) -> bool:
    expected = sign(secret, mark.key_id, topic, request_id, mark.deadletter, value, mark.timestamp_ms)
    return hmac.compare_digest(expected.signature.encode(), mark.signature.encode())


def sighting_key(request_id: str, mark: ReplayMark) -> str:
    """The id the replay check remembers for an operator replay: one per dead letter."""
    return f"{request_id}#replay:{mark.deadletter}"
