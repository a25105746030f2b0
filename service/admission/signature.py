"""Verify a request's HMAC-SHA256 signature (contract: `service.contracts.signing`).

The partner signs `v1\\n{topic}\\n{key}\\n{request_id}\\n{timestamp}\\n{sha256(value)}`
with one of its signing keys and sends the key id, the timestamp (unix ms) and
the signature (lowercase hex) as the headers `x-gateway-key-id`,
`x-gateway-timestamp` and `x-gateway-signature`. Several key ids can be valid
at once, so keys rotate without a gap.

Outcomes, in the order they are checked:

| what | reason |
| --- | --- |
| a signature header missing (when `signing.required`, or when any is present) | `missing_signature` |
| a signature header given twice | `bad_signature` |
| key id not among the partner's `signing.keys` | `unknown_signing_key` |
| timestamp not decimal unix milliseconds | `stale_timestamp` |
| HMAC differs (compared in constant time), or the record key is not UTF-8 | `bad_signature` |
| authentic, but further than `signing.max_skew_s` from the reference time | `stale_timestamp` |

The reference time is when the broker appended the record, if the topic keeps
that (`message.timestamp.type=LogAppendTime`): a request that waited in a
backlog is then not stale, while a copy produced later still is. Otherwise it
is the gateway's clock when it reads the record (the producer's CreateTime
proves nothing: the producer chooses it).

An unsigned request of a partner whose `signing.required` is false passes; a
signed one is verified all the same, so a partner can start signing before
the operator makes it required. Replays are caught later, by
`service.admission.replay` (it needs Redis, so it runs asynchronously), in the
same clock: a copy is a replay while its reference time is within the signed
timestamp + `max_skew_s` (`verify` returns the signed timestamp for that).
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Callable, Sequence

from service.admission.registry import Partner
from service.contracts.reasons import Reason
from service.contracts.signing import (
    KEY_ID_HEADER,
    SIGNATURE_HEADER,
    SIGNATURE_HEADERS,
    TIMESTAMP_HEADER,
    canonical_string,
    signature,
)

MAX_TIMESTAMP_DIGITS = 16


class SignatureError(ValueError):
    """Why a signature is refused: a dead-letter reason and a detail without secrets."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class SignatureVerifier:
    """Checks one record against its partner's current signing keys."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock

    def verify(
        self,
        *,
        topic: str,
        key: bytes | None,
        value: bytes,
        headers: Sequence[tuple[str, bytes | None]],
        request_id: str,
        partner: Partner,
        appended_ms: int | None = None,
    ) -> int | None:
        """The signed timestamp (unix ms) of an acceptable signed record, None for an
        acceptable unsigned one; raise `SignatureError` otherwise.

        `appended_ms`: the broker's LogAppendTime of the record, if known (see above)."""
        pid = partner.id
        signing = partner.settings.signing
        found: dict[str, list[bytes]] = {}
        for name, raw in _iter_headers(headers):
            if name in SIGNATURE_HEADERS:
                found.setdefault(name, []).append(raw)
        if not found and not signing.required:
            return None
        missing = [h for h in SIGNATURE_HEADERS if h not in found]
        if missing:
            why = "required by partners[{pid}].signing.required" if signing.required else "partly signed"
            raise SignatureError(
                Reason.MISSING_SIGNATURE, f"header(s) {', '.join(missing)} missing ({why.format(pid=pid)})"
            )
        for name, values in found.items():
            if len(values) > 1:
                raise SignatureError(Reason.BAD_SIGNATURE, f"header {name} appears {len(values)} times")
        key_id = _ascii(found[KEY_ID_HEADER][0])
        secret = partner.signing_keys.get(key_id) if key_id is not None else None
        if key_id is None or secret is None:
            shown = repr(key_id[:64]) if key_id is not None else "(not ASCII)"
            raise SignatureError(
                Reason.UNKNOWN_SIGNING_KEY, f"key id {shown} is not among partners[{pid}].signing.keys"
            )
        ts_text = _ascii(found[TIMESTAMP_HEADER][0])
        if ts_text is None or not ts_text.isdigit() or len(ts_text) > MAX_TIMESTAMP_DIGITS:
            raise SignatureError(
                Reason.STALE_TIMESTAMP, f"header {TIMESTAMP_HEADER} is not decimal unix milliseconds"
            )
        try:
            canonical = canonical_string(topic, key, request_id, ts_text, value)
        except UnicodeDecodeError:
            raise SignatureError(
                Reason.BAD_SIGNATURE, "the record key is not UTF-8, so it cannot be part of a signature"
            ) from None
        expected = signature(secret.get_secret_value(), canonical).encode("ascii")
        provided = found[SIGNATURE_HEADER][0].strip().lower()
        if not hmac.compare_digest(expected, provided):
            raise SignatureError(
                Reason.BAD_SIGNATURE, f"signature does not match the request (key id {key_id!r})"
            )
        reference_ms = appended_ms if appended_ms is not None else int(self._clock() * 1000)
        skew_ms = reference_ms - int(ts_text)
        max_skew_ms = signing.max_skew_s * 1000
        if abs(skew_ms) > max_skew_ms:
            when = f"{abs(skew_ms) / 1000:.1f}s {'before' if skew_ms > 0 else 'after'}"
            ref = "the broker appended it" if appended_ms is not None else "the gateway read it"
            raise SignatureError(
                Reason.STALE_TIMESTAMP,
                f"signed {when} {ref}; partners[{pid}].signing.max_skew_s is {signing.max_skew_s:g}",
            )
        return int(ts_text)


def _iter_headers(headers: Sequence[tuple[str, bytes | None]]) -> list[tuple[str, bytes]]:
    # Kafka allows a header without a value (None here): treated as empty
    return [(name.lower(), raw or b"") for name, raw in headers]


def _ascii(raw: bytes) -> str | None:
    try:
        return raw.decode("ascii")
    except UnicodeDecodeError:
        return None
