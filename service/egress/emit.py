"""A request's one outcome on the wire: a response or a dead letter, through its record's sink.

A billed call's outcome goes out with its metering record (`metering.py`) in one
`sink.publish([outcome, record])`, so in one transaction: the record says `response`, or
`deadletter` and the reason when a dead letter replaced the response. Nothing billed is
thrown away and no record can stop the service:

- a response the broker refuses for its size becomes a `response_too_large`
  dead letter carrying as much of the body as fits, with its digest and usage;
- a dead letter the broker refuses is cut down (original bytes, then all of
  them); if even the smallest is refused, the record is *quarantined*: its
  offset is finished with no message, a critical log names topic, partition
  and offset, and `gateway_quarantined_total` (alerted) counts it. A billed call's
  metering record (`outcome: quarantined`) is still published, alone, finishing the offset;
- metering never costs a partner its outcome: when an outcome with its metering record is
  refused for another reason than size (the usage topic missing from the ACLs, say), the
  outcome goes out alone; the record is then lost: `gateway_metering_lost_total` (alerted)
  counts it and a critical log line carries the whole record, to replay by hand. (A refusal
  for size is the outcome's: a metering record is a few hundred bytes.)
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from aiokafka.errors import KafkaError

from service.config.settings import GatewaySettings
from service.contracts.outcomes import DeadLetter, Origin, deadletter_headers, encode_deadletter
from service.contracts.reasons import Reason
from service.egress.metering import Metered, Outcome, encode_usage, metering_message
from service.ingest.ledger import Claim
from service.ingest.partition import Fenced
from service.ingest.sending import OutMessage
from service.telemetry.metrics import Metrics
from service.telemetry.tracing import Tracing

log = logging.getLogger(__name__)

MAX_ORIGINAL_BYTES = 512 * 1024
FALLBACK_ORIGINAL_BYTES = 16 * 1024
RESPONSE_KEPT_BYTES = (256 * 1024, 16 * 1024, 0)
MAX_DEADLETTER_KEY_BYTES = 1024
E2E_MAX_CLOCK_AHEAD_S = 300.0
"""A request timestamped further ahead of this clock is not observed end to end."""
JSON_HEADERS: tuple[tuple[str, bytes], ...] = (("content-type", b"application/json"),)


class Sink(Protocol):
    """Where one record's claim and outcome go (its partition's writer)."""

    offset: int
    inherited: Claim | None
    claimed: bool
    attempts: int
    owner: str

    @property
    def handed_off(self) -> bool:
        """The partition went to another replica: calls not yet made are left to it."""
        ...

    async def claim(self, attempts: int) -> None: ...
    async def release(self) -> None: ...
    def leave(self) -> None: ...
    async def backoff(self, delay_s: float) -> None: ...
    async def publish(self, messages: list[OutMessage], *, linger: bool = False) -> None: ...


def _refused_for_size(exc: BaseException) -> bool:
    return type(exc).__name__ in {
        "MessageSizeTooLargeError",
        "RecordTooLargeError",
        "RecordBatchTooLargeError",
    }


class Emitter:
    def __init__(self, settings: GatewaySettings, metrics: Metrics, tracing: Tracing) -> None:
        self.settings = settings
        self.metrics = metrics
        self.tracing = tracing

    async def response(
        self,
        sink: Sink,
        partner: str,
        request_id: str,
        value: bytes,
        origin: Origin,
        *,
        body: Mapping[str, Any],
        attempts: int,
        metered: Metered | None = None,
    ) -> bool:
        """Publish a response (with the metering record of its billed call, if any); True if it
        went out as one, False if it became a dead letter."""
        topic, key = self.settings.response_topic(partner), request_id.encode()
        try:
            with self.tracing.produce(topic, key, origin.headers) as trace_headers:
                message = OutMessage(topic, key, value, (*JSON_HEADERS, *trace_headers))
                await self._publish(sink, message, metered, "response")
            return True
        except Fenced:
            raise
        except KafkaError as exc:
            if _refused_for_size(exc):
                reason, detail = (
                    Reason.RESPONSE_TOO_LARGE,
                    f"the response ({len(value)} bytes) is over the response topic's size limit",
                )
            else:
                reason, detail = (
                    Reason.INTERNAL_ERROR,
                    f"the response could not be published: {type(exc).__name__}",
                )
        await self.dead_letter(
            sink,
            DeadLetter(
                partner, reason, detail, origin, request_id, attempts, response=_response_doc(value, body)
            ),
            model=str(body.get("model") or ""),
            metered=metered,
        )
        return False

    async def dead_letter(
        self, sink: Sink, dl: DeadLetter, model: str, metered: Metered | None = None
    ) -> None:
        """Publish a dead letter (with the metering record of a billed call, if any), cut down
        until the broker takes it; quarantine the record if it takes none."""
        headers = (*JSON_HEADERS, *deadletter_headers(dl, self.settings.kafka.group_id))
        self.tracing.outcome("deadletter", dl.reason.value)
        topic = self.settings.deadletter_topic(dl.partner)
        key = _deadletter_key(dl.origin.key)
        last: BaseException | None = None
        with self.tracing.produce(topic, key, dl.origin.headers) as trace_headers:
            for original_bytes, response_bytes in (
                (MAX_ORIGINAL_BYTES, RESPONSE_KEPT_BYTES[0]),
                (FALLBACK_ORIGINAL_BYTES, RESPONSE_KEPT_BYTES[1]),
                (0, RESPONSE_KEPT_BYTES[2]),
            ):
                value = encode_deadletter(
                    dl,
                    failed_at=time.time(),
                    max_original_bytes=original_bytes,
                    max_response_bytes=response_bytes,
                )
                message = OutMessage(topic, key, value, (*headers, *trace_headers))
                try:
                    await self._publish(sink, message, metered, "deadletter", dl.reason.value)
                except Fenced:
                    raise
                except KafkaError as exc:
                    last = exc
                    if not _refused_for_size(exc):
                        break
                    continue
                self._count(dl, model)
                return
        await self._quarantine(sink, dl, last, metered)

    async def _publish(
        self,
        sink: Sink,
        message: OutMessage,
        metered: Metered | None,
        outcome: Outcome,
        reason: str | None = None,
    ) -> None:
        """`message` and, for a billed call, its metering record, in one transaction. Raises
        the broker's refusal of `message` (the caller makes a smaller outcome)."""
        if metered is None:
            await sink.publish([message])
            return
        record = metering_message(self.settings.kafka.usage_topic, metered, outcome, reason)
        try:
            await sink.publish([message, record])
        except Fenced:
            raise
        except KafkaError as exc:
            if _refused_for_size(exc):
                raise
            await sink.publish([message])  # the usage topic's refusal, or the outcome's: raised
            self._metering_lost(metered, outcome, reason, exc)

    def _metering_lost(
        self, metered: Metered, outcome: Outcome, reason: str | None, exc: BaseException | None
    ) -> None:
        self.metrics.metering_lost.labels(metered.partner).inc()
        log.critical(
            "metering record could not be published; replay it from this line (see the runbook)",
            extra={
                **_origin_ctx(metered.origin),
                "partner": metered.partner,
                "request_id": metered.request_id,
                "usage_topic": self.settings.kafka.usage_topic,
                "error": type(exc).__name__ if exc is not None else None,
                "record": encode_usage(metered, outcome, reason).decode(),
            },
        )

    async def _quarantine(
        self, sink: Sink, dl: DeadLetter, exc: BaseException | None, metered: Metered | None
    ) -> None:
        finished = False
        if metered is not None:  # the call was billed: its record finishes the offset
            topic = self.settings.kafka.usage_topic
            record = metering_message(topic, metered, "quarantined", dl.reason.value)
            try:
                await sink.publish([record])
                finished = True
            except Fenced:
                raise
            except KafkaError as refused:
                self._metering_lost(metered, "quarantined", dl.reason.value, refused)
        if not finished:
            await sink.publish([])  # finished with no message: the loop goes on
        self.metrics.quarantined.labels(dl.partner).inc()
        log.critical(
            "dead letter could not be published; record quarantined (see the runbook)",
            extra={
                **_origin_ctx(dl.origin),
                "partner": dl.partner,
                "request_id": dl.request_id,
                "reason": dl.reason.value,
                "error": type(exc).__name__ if exc is not None else None,
                "value_sha256": None
                if dl.origin.value is None
                else hashlib.sha256(dl.origin.value).hexdigest(),
            },
        )

    def _count(self, dl: DeadLetter, model: str) -> None:
        self.metrics.dead_letters.labels(dl.partner, dl.reason.value).inc()
        self.metrics.requests.labels(dl.partner, model, "deadletter").inc()
        self.observe_e2e(dl.partner, dl.origin)
        log.info(
            "dead-lettered",
            extra={
                **_origin_ctx(dl.origin),
                "partner": dl.partner,
                "request_id": dl.request_id,
                "reason": dl.reason.value,
            },
        )

    def observe_e2e(self, pid: str, origin: Origin) -> None:
        """The request record's age at its outcome. A timestamp of 0 or -1 (no time: a record
        converted from Kafka's old message format) or far ahead of this clock tells no latency,
        and observing it would put ~1.8e9 s (or 0) in the histogram and fire the latency alert."""
        ts = origin.timestamp_ms
        if ts is None or ts <= 0:
            return
        age = time.time() - ts / 1000
        if age >= -E2E_MAX_CLOCK_AHEAD_S:
            self.metrics.end_to_end.labels(pid).observe(max(0.0, age))


def _response_doc(value: bytes, body: Mapping[str, Any]) -> dict[str, Any]:
    """What a dead letter keeps of a response it replaces: digest, size, usage and (cut to
    fit by `encode_deadletter`) the bytes."""
    return {
        "value": value,
        "value_sha256": hashlib.sha256(value).hexdigest(),
        "value_size": len(value),
        "usage": body.get("usage") or {},
        "message_id": body.get("id"),
    }


def _deadletter_key(key: bytes | None) -> bytes | None:
    """The dead letter's Kafka key: the original key, or its SHA-256 when it is huge
    (a hostile key must not push the dead letter past the broker's size limit)."""
    if key is None or len(key) <= MAX_DEADLETTER_KEY_BYTES:
        return key
    return b"sha256:" + hashlib.sha256(key).hexdigest().encode()


def _origin_ctx(origin: Origin) -> dict[str, Any]:
    return {"topic": origin.topic, "partition": origin.partition, "offset": origin.offset}


__all__: Sequence[str] = ("JSON_HEADERS", "Emitter", "Sink")
