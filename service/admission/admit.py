"""Turn a raw Kafka record into an admitted request or a rejection with a reason.

Checks run cheapest first and the first failure decides: size, decoding,
schema, identity, model policy, `max_tokens` cap. Signatures, replays and
budgets plug in as further checks (see `Admission.extra_checks`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from service.admission.registry import Partner, Registry
from service.contracts.reasons import Reason
from service.contracts.schemas import SchemaViolation, validate

Headers = Sequence[tuple[str, bytes]]


class RecordLike(Protocol):
    """The parts of a Kafka record (aiokafka's `ConsumerRecord`) admission looks at."""

    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def timestamp(self) -> int | None: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...
    @property
    def headers(self) -> Headers: ...


@dataclass(frozen=True, slots=True)
class Record:
    """A plain record, for tests and tools."""

    topic: str
    partition: int
    offset: int
    timestamp: int | None
    key: bytes | None
    value: bytes | None
    headers: Headers = ()


@dataclass(frozen=True, slots=True)
class Admitted:
    partner: Partner
    request_id: str
    params: dict[str, Any]
    metadata: Mapping[str, str] | None
    est_input_tokens: int
    """Conservative estimate: the request's bytes over chars-per-token."""

    @property
    def model(self) -> str:
        return str(self.params["model"])

    @property
    def max_tokens(self) -> int:
        return int(self.params["max_tokens"])


@dataclass(frozen=True, slots=True)
class Rejected:
    partner_id: str
    reason: Reason
    detail: str
    request_id: str | None = None


Check = Callable[[RecordLike, Partner, dict[str, Any]], Rejected | None]


class Admission:
    """Admission against the current registry (swapped on reload)."""

    def __init__(self, registry: Registry, extra_checks: Sequence[Check] = ()) -> None:
        self.registry = registry
        self.extra_checks = list(extra_checks)

    def admit(self, rec: RecordLike) -> Admitted | Rejected:
        registry = self.registry
        partner = registry.by_topic.get(rec.topic)
        if partner is None:
            pid = registry.partner_id_for_topic(rec.topic)
            return Rejected(
                pid, Reason.UNKNOWN_PARTNER, f"topic {rec.topic!r} belongs to no configured partner"
            )
        pid = partner.id
        ps = partner.settings
        if not ps.enabled:
            return Rejected(pid, Reason.PARTNER_DISABLED, f"partner {pid!r} is disabled")
        value = rec.value
        if value is None or not value:
            return Rejected(pid, Reason.MALFORMED_JSON, "empty message value (no JSON document)")
        if len(value) > ps.max_request_bytes:
            return Rejected(
                pid,
                Reason.OVERSIZE,
                f"message is {len(value)} bytes; partners[{pid}].max_request_bytes is {ps.max_request_bytes}",
            )
        try:
            doc = orjson.loads(value)
        except orjson.JSONDecodeError as exc:
            try:
                value.decode("utf-8")
            except UnicodeDecodeError as uexc:
                return Rejected(
                    pid, Reason.INVALID_ENCODING, f"value is not valid UTF-8 at byte {uexc.start}"
                )
            return Rejected(pid, Reason.MALFORMED_JSON, f"invalid JSON: {exc}")
        request_id = _request_id_of(doc)
        try:
            validate("request", doc)
        except SchemaViolation as exc:
            return Rejected(pid, Reason.SCHEMA_VIOLATION, f"request.v1 schema: {exc}", request_id)
        assert request_id is not None
        claimed = doc.get("partner")
        if claimed is not None and claimed != pid:
            return Rejected(
                pid,
                Reason.IDENTITY_MISMATCH,
                f"message claims partner {claimed[:64]!r} but was written to the topic of {pid!r}",
                request_id,
            )
        params: dict[str, Any] = doc["params"]
        model = params["model"]
        if model not in registry.settings.models:
            return Rejected(
                pid, Reason.UNKNOWN_MODEL, f"model {model[:128]!r} is not known to the gateway", request_id
            )
        if ps.allowed_models is not None and model not in ps.allowed_models:
            return Rejected(
                pid,
                Reason.MODEL_NOT_ALLOWED,
                f"model {model!r} is not in partners[{pid}].allowed_models",
                request_id,
            )
        cap = ps.max_tokens_cap
        if cap is not None and params["max_tokens"] > cap:
            if ps.max_tokens_policy == "reject":
                return Rejected(
                    pid,
                    Reason.MAX_TOKENS_EXCEEDED,
                    f"max_tokens {params['max_tokens']} exceeds partners[{pid}].max_tokens_cap {cap}",
                    request_id,
                )
            params["max_tokens"] = cap
        for check in self.extra_checks:
            rejected = check(rec, partner, doc)
            if rejected is not None:
                return rejected
        est = math.ceil(len(value) / registry.settings.runtime.estimate_chars_per_token)
        return Admitted(partner, request_id, params, doc.get("metadata"), est)


def _request_id_of(doc: object) -> str | None:
    if isinstance(doc, dict):
        rid = doc.get("request_id")
        if isinstance(rid, str) and 0 < len(rid) <= 128:
            return rid
    return None
