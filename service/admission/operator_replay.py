"""Accept a dead letter replayed by an operator (contract: `service.contracts.operator_replay`).

A record with the `x-gateway-replay` header is an operator replay only if the
header parses, its key id is among `operator_replay.keys`, its HMAC matches
the record, and it was signed within `operator_replay.max_age_s` of now.
Then its partner signature is judged against the time the partner signed it
(the bytes must still match; only its age is forgiven), and the replay check
remembers it by request id and dead letter (`sighting_id`), at least until the
mark is `max_age_s` old. Anything else with
that header is refused (`bad_signature`): a partner cannot mark its own
records as replays.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from pydantic import SecretStr

from service.config.settings import GatewaySettings
from service.contracts import operator_replay as contract
from service.contracts.reasons import Reason
from service.contracts.signing import TIMESTAMP_HEADER

Headers = Sequence[tuple[str, bytes | None]]


@dataclass(frozen=True, slots=True)
class Accepted:
    mark: contract.ReplayMark
    signed_ms: int | None
    """When the partner signed the original (the reference time of its signature check)."""
    valid_until_ms: int
    """The last time a copy of this replay is accepted (`operator_replay.max_age_s` after the
    mark): the replay check remembers it at least that long."""


def _header(headers: Headers, name: str) -> list[bytes]:
    return [v or b"" for k, v in headers if isinstance(k, str) and k.lower() == name]


def sighting_id(headers: Headers, request_id: str) -> str:
    """What the replay check remembers: the request id, or for an (accepted) operator
    replay the request id and the dead letter it came from."""
    raw = _header(headers, contract.HEADER)
    mark = contract.parse(raw[0]) if len(raw) == 1 else None
    return request_id if mark is None else contract.sighting_key(request_id, mark)


class OperatorReplays:
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._keys: Mapping[str, SecretStr] = {}
        self._max_age_s = 300.0

    def configure(self, settings: GatewaySettings) -> None:
        """Read the operator keys now (raises `SecretResolutionError` naming the reference)."""
        cfg = settings.operator_replay
        self._keys = {} if cfg is None else {kid: ref.resolve() for kid, ref in cfg.keys.items()}
        self._max_age_s = 300.0 if cfg is None else cfg.max_age_s

    def secrets(self) -> list[SecretStr]:
        return list(self._keys.values())

    def verify(
        self, topic: str, value: bytes, headers: Headers, request_id: str
    ) -> Accepted | tuple[Reason, str] | None:
        """None: no replay header. `Accepted`, or (reason, detail) when refused."""
        raw = _header(headers, contract.HEADER)
        if not raw:
            return None
        if len(raw) > 1:
            return Reason.BAD_SIGNATURE, f"header {contract.HEADER} appears {len(raw)} times"
        mark = contract.parse(raw[0])
        if mark is None:
            return Reason.BAD_SIGNATURE, f"header {contract.HEADER} is not key_id:ms:dead-letter:hmac"
        secret = self._keys.get(mark.key_id)
        if secret is None:
            return Reason.UNKNOWN_SIGNING_KEY, (
                f"operator replay key id {mark.key_id[:64]!r} is not among operator_replay.keys"
            )
        if not contract.valid(mark, secret.get_secret_value(), topic, request_id, value):
            return Reason.BAD_SIGNATURE, f"operator replay signature does not match (key id {mark.key_id!r})"
        age_s = self._clock() - mark.timestamp_ms / 1000
        if abs(age_s) > self._max_age_s:
            return Reason.STALE_TIMESTAMP, (
                f"operator replay signed {abs(age_s):.0f}s from now; operator_replay.max_age_s is "
                f"{self._max_age_s:g}"
            )
        ts = _header(headers, TIMESTAMP_HEADER)
        signed_ms = int(ts[0]) if len(ts) == 1 and ts[0].isdigit() and len(ts[0]) <= 16 else None
        return Accepted(mark, signed_ms, mark.timestamp_ms + int(self._max_age_s * 1000))
