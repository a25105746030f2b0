"""Turn a raw Kafka record into an admitted request or a rejection with a reason.

Checks run cheapest first and the first failure decides: size (value, key
and headers), decoding, shape (`contracts/shape.py`), schema (`contracts/params.py`),
signature (`signature.py`), identity, model policy, `max_tokens` cap, the model's `max_tokens`
maximum and the partner's params policy (`policy.py`), then any `extra_checks`. Those are
synchronous (run in a worker thread for a large value: `IN_THREAD_BYTES`); `admit_and_reserve`
then runs the two that may need Redis: the replay check (`replay.py`) and the budget reservation
(`budget.py`). The pipeline settles or releases the reservation once the call is done (`settle`,
`release`).
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol

import orjson

from service.admission.estimate import estimate_input_tokens
from service.admission.operator_replay import Accepted, OperatorReplays, sighting_id
from service.admission.policy import check_params
from service.admission.registry import Partner, Registry
from service.admission.replay import Origin, ReplayGuard, replay_window_s
from service.admission.signature import SignatureError, SignatureVerifier
from service.batches.routing import REALTIME, Urgency, UrgencyError, parse_urgency
from service.contracts.params import check_request
from service.contracts.reasons import Reason
from service.contracts.schemas import SchemaViolation, compiled
from service.contracts.shape import MAX_REQUEST_HEADERS, too_deep

if TYPE_CHECKING:
    from service.admission.budget import Budgets, Reservation
    from service.admission.pricing import Amount

log = logging.getLogger(__name__)

Headers = Sequence[tuple[str, bytes]]

IN_THREAD_BYTES = 64 * 1024
"""A value this large is admitted in a worker thread: parsing and checking a document of many
small blocks is pure Python (0.5 s for 1 MB of them), which would hold every partner's requests
on the event loop meanwhile. The thread gives the loop the interpreter back every few
milliseconds (`sys.getswitchinterval`). Smaller ones take well under a millisecond here."""


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
    timestamp_type: int = 0
    """0: the producer set `timestamp` (CreateTime); 1: the broker did (LogAppendTime)."""


@dataclass(frozen=True, slots=True)
class Deferred:
    """The partner's budget is exhausted and it defers: look again after `wait_for_budget`."""

    period_end: float


@dataclass(frozen=True, slots=True)
class Admitted:
    partner: Partner
    request_id: str
    params: dict[str, Any]
    metadata: Mapping[str, str] | None
    est_input_tokens: int
    """Conservative estimate, block by block (`estimate.py`)."""
    reservation: Reservation | None = None
    """The budget this request holds until `Admission.settle` / `release` (set by `admit_and_reserve`)."""
    urgency: Urgency = REALTIME
    """Its service class and deadline (`service/batches/routing.py`)."""
    valid_until_ms: int | None = None
    """The last reference time (`signature.py`) at which a copy of this record still passes the
    signature check: the replay check remembers the request id at least that long."""

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

    def __init__(
        self,
        registry: Registry,
        extra_checks: Sequence[Check] = (),
        *,
        signatures: SignatureVerifier | None = None,
        replay: ReplayGuard | None = None,
        budgets: Budgets | None = None,
        operator_replays: OperatorReplays | None = None,
    ) -> None:
        self.registry = registry
        self.extra_checks = list(extra_checks)
        self.signatures = signatures or SignatureVerifier()
        self.replay = replay or ReplayGuard()
        self.budgets = budgets
        self.operator_replays = operator_replays or OperatorReplays()
        self._in_order: weakref.WeakValueDictionary[tuple[str, int], asyncio.Lock] = (
            weakref.WeakValueDictionary()
        )
        """A lock per partition while one of its records is being admitted (`_admit_in_order`)."""
        compiled("request")  # compile the request schema now (~1 s), not on the first request

    async def admit_and_reserve(self, rec: RecordLike) -> Admitted | Rejected:
        """`admit`, then the replay check and the budget reservation (which may wait, see `budget.py`)."""
        verdict = await self.admit_checked(rec)
        if isinstance(verdict, Rejected) or self.budgets is None:
            return verdict
        reservation = await self.budgets.reserve(verdict.partner, verdict)
        if isinstance(reservation, Rejected):
            return reservation
        assert not isinstance(reservation, Deferred)  # waiting reserve never defers
        return replace(verdict, reservation=reservation)

    async def reserve(self, adm: Admitted, service_tier: str | None = None) -> Admitted | Rejected | Deferred:
        """Reserve the budget at dispatch, without waiting: a request that never reaches
        Claude holds nothing (a crash strands no queued reservation). `service_tier`
        `batch` reserves at batch price."""
        if self.budgets is None:
            return adm
        reservation = await self.budgets.reserve(adm.partner, adm, wait=False, service_tier=service_tier)
        if isinstance(reservation, Rejected | Deferred):
            return reservation
        return replace(adm, reservation=reservation)

    async def wait_for_budget(self, deferred: Deferred) -> None:
        assert self.budgets is not None
        await self.budgets.wait_for_budget(deferred)

    async def admit_checked(self, rec: RecordLike, *, verified: bool = False) -> Admitted | Rejected:
        """`admit`, then the replay check (no budget reserved yet). `verified`: the record
        came back from the batch path; its signature and replay were checked when first read."""
        verdict = await self._admit_in_order(rec, verified)
        if isinstance(verdict, Rejected) or verified:
            return verdict
        ps = verdict.partner.settings
        first = await self.replay.first_seen(  # an operator replay: by request id and dead letter
            ps,
            sighting_id(rec.headers, verdict.request_id),
            Origin(rec.topic, rec.partition, rec.offset),
            appended_ms=_log_append_time(rec),  # the clock of the staleness check
            valid_until_ms=verdict.valid_until_ms,
        )
        if first is not None:
            return Rejected(
                ps.id,
                Reason.REPLAY,
                f"request id {verdict.request_id!r} was already seen at {first}, and its sighting "
                f"still holds (partners[{ps.id}].replay_window_s {replay_window_s(ps) or 0:g}s, "
                "and at least while its signature is valid)",
                verdict.request_id,
            )
        return verdict

    async def _admit_in_order(self, rec: RecordLike, verified: bool) -> Admitted | Rejected:
        """`admit`, a large value in a worker thread (`IN_THREAD_BYTES`), each partition's records
        in the order they come: those behind a large one wait for it rather than pass it, so a
        partition's requests still reach the scheduler in offset order (its commit point moves
        with them). Without a large one ahead, nothing waits."""
        key = (rec.topic, rec.partition)
        lock = self._in_order.get(key)
        if lock is None:
            lock = self._in_order[key] = asyncio.Lock()
        async with lock:  # free: taken without yielding to the loop
            if rec.value is not None and len(rec.value) >= IN_THREAD_BYTES:
                return await asyncio.to_thread(self.admit, rec, verified=verified)
            return self.admit(rec, verified=verified)

    async def settle(self, adm: Admitted, cost: Amount) -> None:
        """The call was billed: replace the budget reservation by what it cost
        (`pricing.Quote.amount`). Never raises."""
        if self.budgets is not None and adm.reservation is not None:
            try:
                await self.budgets.settle(adm.reservation, cost)
            except Exception:  # the outcome matters more than the counter
                log.exception("budget settlement failed", extra={"partner": adm.partner.id})

    async def release(self, adm: Admitted) -> None:
        """The call failed and nothing was billed: give the reservation back. Never raises."""
        if self.budgets is not None and adm.reservation is not None:
            try:
                await self.budgets.release(adm.reservation)
            except Exception:  # the outcome matters more than the counter
                log.exception("budget release failed", extra={"partner": adm.partner.id})

    def admit(self, rec: RecordLike, *, verified: bool = False) -> Admitted | Rejected:
        registry = self.registry
        partner = registry.by_topic.get(rec.topic)
        if partner is None:
            pid = registry.partner_id_for_topic(rec.topic)
            return Rejected(
                pid,
                Reason.UNKNOWN_PARTNER,
                f"topic {rec.topic!r} belongs to no configured partner",
                request_id_in(rec.value),
            )
        pid = partner.id
        ps = partner.settings
        if not ps.enabled:
            return Rejected(
                pid, Reason.PARTNER_DISABLED, f"partner {pid!r} is disabled", request_id_in(rec.value)
            )
        if len(rec.headers) > MAX_REQUEST_HEADERS:  # before anything reads them through
            return Rejected(
                pid,
                Reason.OVERSIZE,
                f"message has {len(rec.headers):,} headers; at most {MAX_REQUEST_HEADERS:,}",
            )
        value = rec.value
        if value is None or not value:
            return Rejected(pid, Reason.MALFORMED_JSON, "empty message value (no JSON document)")
        size = len(value) + len(rec.key or b"") + sum(len(k) + len(v or b"") for k, v in rec.headers)
        if size > ps.max_request_bytes:
            return Rejected(
                pid,
                Reason.OVERSIZE,
                f"message is {size} bytes (value {len(value)}, key and headers {size - len(value)}); "
                f"partners[{pid}].max_request_bytes is {ps.max_request_bytes}",
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
        deep = too_deep(doc, value)
        if deep is not None:
            return Rejected(pid, Reason.SCHEMA_VIOLATION, f"request.v1 schema: {deep}", request_id)
        try:
            check_request(doc)
        except SchemaViolation as exc:
            return Rejected(pid, Reason.SCHEMA_VIOLATION, f"request.v1 schema: {exc}", request_id)
        assert request_id is not None
        try:
            urgency = parse_urgency(doc, ps.service_class)
        except UrgencyError as exc:
            return Rejected(pid, Reason.SCHEMA_VIOLATION, f"request.v1 schema: {exc}", request_id)
        valid_until: int | None = None
        if not verified:  # a request back from the batch path was verified when first read
            checked = self._verify(rec, partner, value, request_id)
            if isinstance(checked, Rejected):
                return checked
            valid_until = checked
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
        refused = check_params(partner, params, registry.settings.models[model])
        if refused is not None:  # the model's maximum, the partner's policy
            return Rejected(pid, *refused, request_id)
        for check in self.extra_checks:
            rejected = check(rec, partner, doc)
            if rejected is not None:
                return rejected
        gs = registry.settings
        est = estimate_input_tokens(params, gs.estimates, gs.runtime.estimate_chars_per_token)
        return Admitted(
            partner, request_id, params, doc.get("metadata"), est, urgency=urgency, valid_until_ms=valid_until
        )

    def _verify(
        self, rec: RecordLike, partner: Partner, value: bytes, request_id: str
    ) -> Rejected | int | None:
        """An operator replay's signature, then the partner's signature. Not refused: the last
        reference time at which a copy would pass too (None: unsigned, no limit)."""
        pid = partner.id
        replayed = self.operator_replays.verify(rec.topic, value, rec.headers, request_id)
        if isinstance(replayed, tuple):
            return Rejected(pid, *replayed, request_id)
        try:
            signed_ms = self.signatures.verify(
                topic=rec.topic,
                key=rec.key,
                value=value,
                headers=rec.headers,
                request_id=request_id,
                partner=partner,
                # an operator replay's partner signature is judged at the time it was signed
                appended_ms=replayed.signed_ms if isinstance(replayed, Accepted) else _log_append_time(rec),
            )
        except SignatureError as exc:
            return Rejected(pid, exc.reason, exc.detail, request_id)
        if isinstance(replayed, Accepted):  # its freshness is the operator mark's
            return replayed.valid_until_ms
        return None if signed_ms is None else signed_ms + int(partner.settings.signing.max_skew_s * 1000)


def _log_append_time(rec: RecordLike) -> int | None:
    """The broker's append time, when the topic records it (`message.timestamp.type=LogAppendTime`).

    Not part of `RecordLike`: aiokafka's `ConsumerRecord` has it, simpler stand-ins may not.
    """
    if getattr(rec, "timestamp_type", 0) == 1 and rec.timestamp is not None:
        return rec.timestamp
    return None


_REQUEST_ID_READ_MAX_BYTES = 1 << 20
"""A refused record's `request_id` is read (for the partner to match its dead letter) from a
value up to this size; a larger one's is not looked for."""


def request_id_in(value: bytes | None) -> str | None:
    """The `request_id` of a record refused before it is read (its partner is unknown or
    disabled), if its value is a JSON object that has a valid one."""
    if not value or len(value) > _REQUEST_ID_READ_MAX_BYTES:
        return None
    try:
        return _request_id_of(orjson.loads(value))
    except orjson.JSONDecodeError:
        return None


def _request_id_of(doc: object) -> str | None:
    if isinstance(doc, dict):
        rid = doc.get("request_id")
        if isinstance(rid, str) and 0 < len(rid) <= 128:
            return rid
    return None
