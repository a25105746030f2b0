"""The batch path's records: a request handed off (pending or back to real time) and a batch's state.

A handed-off request is the partner's record itself (same key, same value bytes,
same headers, so its signature still verifies) plus one header, `gateway-batch`,
with where it came from and how it is routed. Only the gateway writes the
internal topics; a partner's own `gateway-batch` header is dropped when copying.
The request's W3C trace context is read back from its own headers (`Handoff.trace`), so
a batch's outcomes carry it as the real-time path's do.

A batch's state (`batches.state_topic`, compacted, keyed by the batch's key) is one
JSON document, rewritten at each step:

    {"v": 1, "key": "...", "partner": "...", "phase": "intent" | "submitted",
     "intent_at": 1764612000.0, "batch_id": null | "msgbatch_...", "submitted_at": ...,
     "members": [[first, last], ...],   # pending-topic offsets, as ranges
     "published": 0,                    # results published so far, in results order
     "reserved": [[tokens, nano_usd], ...], "shared": true}  # budget held, per member

and once every result is published, a small `done` document (its batch id and when), so
that a worker recovering an intent knows every batch id it ever recorded: a batch found
upstream that the state topic knows is never taken for a lost create.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import orjson

from service.admission.admit import Admitted, Record, RecordLike
from service.batches.routing import custom_id
from service.ingest.sending import OutMessage
from service.telemetry.tracecontext import trace_context

HEADER = "gateway-batch"
STATE_VERSION = 1


@dataclass(frozen=True, slots=True)
class Handoff:
    partner: str
    request_id: str
    respond_by: float | None
    routed_at: float
    topic: str
    """The request's original topic, partition, offset and timestamp."""
    partition: int
    offset: int
    timestamp_ms: int | None
    model: str = ""
    metadata: dict[str, str] | None = None
    submissions: int = 0
    """Batches this request was submitted in so far."""
    not_before: float = 0.0
    """Wait until then before forming it into a batch (its budget was exhausted)."""
    back_to_realtime: str | None = None
    """Why the batch path sent it to real time (`expired`, `errored`, ...), with the batch id."""
    trace: tuple[tuple[str, bytes], ...] = field(default=(), compare=False)
    """The request's `traceparent`/`tracestate` as its outcomes carry them (`trace_context`):
    read from the record's own headers by `read_handoff`, never written in the header."""

    @property
    def custom_id(self) -> str:
        return custom_id(self.partner, self.request_id)

    def next(self, **changes: Any) -> Handoff:
        return replace(self, **changes)


def pending_message(topic: str, adm: Admitted, rec: RecordLike, now: float) -> OutMessage:
    """An admitted request handed to the batch path (for the pending topic)."""
    handoff = Handoff(
        partner=adm.partner.id,
        request_id=adm.request_id,
        respond_by=adm.urgency.respond_by,
        routed_at=now,
        topic=rec.topic,
        partition=rec.partition,
        offset=rec.offset,
        timestamp_ms=rec.timestamp,
        model=adm.model,
        metadata=dict(adm.metadata) if adm.metadata else None,
    )
    return handoff_message(topic, rec, handoff)


def _headers_without_ours(headers: Iterable[tuple[Any, Any]]) -> list[tuple[str, bytes]]:
    out: list[tuple[str, bytes]] = []
    for name, value in headers:
        if name == HEADER or not isinstance(name, str):
            continue  # a name that is not UTF-8 could not be sent again; it was checked before
        out.append((name, value if value is not None else b""))
    return out


def handoff_message(topic: str, rec: RecordLike, handoff: Handoff) -> OutMessage:
    """The request, as it came, with the batch path's header: for `topic`."""
    value = rec.value if rec.value is not None else b""
    doc = asdict(handoff)
    del doc["trace"]  # the record's own headers carry it
    headers = (*_headers_without_ours(rec.headers), (HEADER, orjson.dumps(doc)))
    return OutMessage(topic, rec.key, value, headers)


class BadHandoff(ValueError):
    """An internal record without a readable `gateway-batch` header (not written by the gateway)."""


def read_handoff(rec: RecordLike) -> tuple[Handoff, Record]:
    """The handoff and the original request record (as the partner produced it)."""
    raw = None
    for name, value in rec.headers:
        if name == HEADER:
            raw = value
    if raw is None:
        raise BadHandoff(f"no {HEADER} header")
    try:
        doc = orjson.loads(raw)
        doc.pop("trace", None)
        handoff = Handoff(**doc)
    except (orjson.JSONDecodeError, TypeError, AttributeError) as exc:
        raise BadHandoff(f"unreadable {HEADER} header: {type(exc).__name__}") from None
    original = Record(
        handoff.topic,
        handoff.partition,
        handoff.offset,
        handoff.timestamp_ms,
        rec.key,
        rec.value,
        tuple(_headers_without_ours(rec.headers)),
    )
    return replace(handoff, trace=trace_context(original.headers)), original


# -- a batch's state ----------------------------------------------------------------------------


def to_ranges(offsets: Iterable[int]) -> list[list[int]]:
    ranges: list[list[int]] = []
    for o in sorted(offsets):
        if ranges and o == ranges[-1][1] + 1:
            ranges[-1][1] = o
        else:
            ranges.append([o, o])
    return ranges


def from_ranges(ranges: Sequence[Sequence[int]]) -> list[int]:
    return [o for first, last in ranges for o in range(first, last + 1)]


@dataclass(slots=True)
class BatchState:
    key: str
    partner: str
    intent_at: float
    members: list[int]
    """Pending-topic offsets of the batch's requests."""
    phase: str = "intent"
    batch_id: str | None = None
    submitted_at: float | None = None
    published: int = 0
    reserved: list[list[int]] = field(default_factory=list)
    """Per member (in `members` order), the budget reserved at batch price: [tokens, nano-USD]."""
    shared: bool = False
    """The reservations were made in Redis."""
    headers: dict[str, str] = field(default_factory=dict)
    """The members' `HEADER_FIELDS` (`workspace_id`, `user_profile_id`): one value for the whole
    batch, passed to each of its calls (create, list, retrieve, results)."""
    chunk: int = 0
    """Results per transaction, fixed for the batch (`results_chunk` when it was formed): a
    chunk redone after a crash ends where it ended before, so its `settle_once` key is the same
    (0: recorded by an older version; `results_chunk` when its results are published)."""
    handoffs: dict[str, tuple[int, Handoff]] = field(default_factory=dict)
    """custom_id -> (pending offset, handoff): read from the pending topic, not stored."""
    _pos: dict[int, int] = field(default_factory=dict)

    def encode(self) -> bytes:
        return orjson.dumps(
            {
                "v": STATE_VERSION,
                "key": self.key,
                "partner": self.partner,
                "phase": self.phase,
                "intent_at": self.intent_at,
                "batch_id": self.batch_id,
                "submitted_at": self.submitted_at,
                "members": to_ranges(self.members),
                "published": self.published,
                "reserved": self.reserved,
                "shared": self.shared,
                **({"headers": self.headers} if self.headers else {}),
                **({"chunk": self.chunk} if self.chunk else {}),
            }
        )

    @classmethod
    def decode(cls, value: bytes) -> BatchState:
        doc = orjson.loads(value)
        return cls(
            key=doc["key"],
            partner=doc["partner"],
            intent_at=float(doc["intent_at"]),
            members=from_ranges(doc["members"]),
            phase=doc["phase"],
            batch_id=doc.get("batch_id"),
            submitted_at=doc.get("submitted_at"),
            published=int(doc.get("published") or 0),
            reserved=list(doc.get("reserved") or []),
            shared=bool(doc.get("shared")),
            headers={str(k): str(v) for k, v in (doc.get("headers") or {}).items()},
            chunk=int(doc.get("chunk") or 0),
        )

    def message(self, topic: str) -> OutMessage:
        return OutMessage(topic, self.key.encode(), self.encode())

    def done(self, topic: str, at: float) -> OutMessage:
        """The record that ends the batch: only its id stays known (no members)."""
        doc = {
            "v": STATE_VERSION,
            "key": self.key,
            "partner": self.partner,
            "phase": "done",
            "intent_at": self.intent_at,
            "batch_id": self.batch_id,
            "done_at": at,
            "members": [],
        }
        return OutMessage(topic, self.key.encode(), orjson.dumps(doc))

    def reserved_of(self, offset: int) -> tuple[int, int]:
        if len(self._pos) != len(self.members):
            self._pos = {o: i for i, o in enumerate(self.members)}
        i = self._pos.get(offset)
        if i is None or i >= len(self.reserved):
            return 0, 0
        tokens, nusd = self.reserved[i]
        return int(tokens), int(nusd)
