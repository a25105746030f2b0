"""Metering records: one per billed call, published with the call's outcome, exactly once.

A metering record (schemas/usage.v1.json) goes to `kafka.usage_topic`, keyed by partner, in
the same `sink.publish([...])` as the outcome it accounts for: the response, or the dead
letter that replaced it. A partition writer publishes that list and finishes the request's
offset in one Kafka transaction (service/ingest/partition.py), so a consumer reading the
usage topic `read_committed` sees each billed call once, across crashes, rebalances and
zombies: never for an outcome that was not published, never twice.

Any path that publishes an outcome of a billed call builds the record with
`metering_message` and puts it in the same list: the realtime pipeline (through `Emitter`),
the response cache (`served_by="cache"`, a `pricing.unbilled` cost), a batch worker with its
own transactional sink (`served_by="batch"`, `pricing.quote(..., service_tier="batch")`).
The record's `cost` is the same object as the response's (`Quote.doc()`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson

from service.admission.pricing import Quote
from service.contracts.outcomes import SCHEMA_VERSION, Origin, utc_iso
from service.ingest.sending import OutMessage

ServedBy = Literal["realtime", "batch", "cache"]
"""Who served the outcome: a Claude call now, a Message Batches result, the response cache."""
Outcome = Literal["response", "deadletter", "quarantined"]
"""What was published for the request: its response, a dead letter in its place (the call was
billed but its response could not be published), or nothing but this record (quarantine)."""
HEADERS: tuple[tuple[str, bytes], ...] = (("content-type", b"application/json"),)


@dataclass(frozen=True, slots=True)
class Metered:
    """A billed call, as its metering record tells it; the outcome is named when published."""

    partner: str
    request_id: str
    model: str
    usage: Mapping[str, Any]
    cost: Quote
    origin: Origin
    """The request record: its topic, partition and offset identify the request exactly."""
    served_by: ServedBy = "realtime"
    upstream_request_id: str | None = None
    """Anthropic's `request-id` of the billed call (None for a cache hit)."""
    attempts: int = 1
    billed_at: float = field(default_factory=time.time)
    """Unix time the call's answer was received (or the cache served it)."""


def encode_usage(metered: Metered, outcome: Outcome, reason: str | None = None) -> bytes:
    """The metering record document; `reason` is the dead letter's reason when the outcome is
    not the response."""
    m, o = metered, metered.origin
    return orjson.dumps(
        {
            "schema_version": SCHEMA_VERSION,
            "partner": m.partner,
            "request_id": m.request_id,
            "model": m.model,
            "served_by": m.served_by,
            "outcome": outcome,
            "outcome_reason": reason,
            "usage": dict(m.usage),
            "cost": m.cost.doc(),
            "upstream_request_id": m.upstream_request_id,
            "attempts": m.attempts,
            "billed_at": utc_iso(m.billed_at),
            "origin": {"topic": o.topic, "partition": o.partition, "offset": o.offset},
        }
    )


def metering_message(
    topic: str, metered: Metered, outcome: Outcome = "response", reason: str | None = None
) -> OutMessage:
    """The metering record of `metered` as a message for `topic` (`kafka.usage_topic`), to
    publish in the same `sink.publish([...])` as the outcome it accounts for."""
    return OutMessage(topic, metered.partner.encode(), encode_usage(metered, outcome, reason), HEADERS)
