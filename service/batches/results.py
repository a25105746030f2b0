"""What one batch result becomes: a response, a dead letter, a new batch, or a real-time call.

- `succeeded`: a response, marked served by batch with the batch id; the budget is
  settled with its usage (billed at batch price: `usage.service_tier` is `batch`).
- `errored`: an error of a kind worth retrying (`api_error`, `overloaded_error`,
  `rate_limit_error`, `timeout_error`) goes into a new batch while the request has
  submissions left and its deadline allows one more turnaround, else to real time
  while its deadline leaves `realtime_reserve_s`, else a dead letter. Any other error
  (`invalid_request_error`, ...) is the request's own: a dead letter at once.
- `expired` and `canceled` (and a member the results never mention): real time while
  the deadline allows, else a dead letter `batch_expired` / `batch_canceled`.

Nothing here talks to Kafka or Claude: the worker commits the messages and applies the
budget action after the commit.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import orjson

from service.admission.pricing import Quote, price_version, quote
from service.batches.records import Handoff, handoff_message
from service.batches.routing import Router
from service.config.settings import GatewaySettings
from service.contracts.outcomes import (
    DeadLetter,
    Origin,
    Timings,
    UpstreamInfo,
    deadletter_headers,
    encode_deadletter,
    encode_response,
)
from service.contracts.reasons import Reason
from service.egress.metering import Metered, metering_message
from service.ingest.sending import OutMessage

log = logging.getLogger(__name__)

RETRYABLE_ERRORS = frozenset({"api_error", "overloaded_error", "rate_limit_error", "timeout_error"})
_ERROR_REASONS = {
    "invalid_request_error": Reason.UPSTREAM_BAD_REQUEST,
    "authentication_error": Reason.UPSTREAM_AUTHENTICATION,
    "permission_error": Reason.UPSTREAM_PERMISSION,
    "not_found_error": Reason.UPSTREAM_NOT_FOUND,
    "request_too_large": Reason.UPSTREAM_TOO_LARGE,
    "billing_error": Reason.UPSTREAM_SPEND_LIMIT,
}
JSON = (("content-type", b"application/json"),)


@dataclass(frozen=True, slots=True)
class Decision:
    messages: list[OutMessage]
    action: str
    """response | rebatched | realtime | deadletter (for metrics)."""
    cost: Quote | None = None
    """Billed (at batch price): settle the budget with this; None: release the reservation."""
    needs_record: bool = False
    """Rebatched or sent to real time: the message needs the original record (set by the worker)."""
    handoff: Handoff | None = None
    kind: str = ""
    """The result's type: succeeded, errored, expired, canceled (or missing)."""


def origin_of(h: Handoff) -> Origin:
    return Origin(h.topic, h.partition, h.offset, h.timestamp_ms, None, None)


def served_by(batch_id: str) -> dict[str, Any]:
    return {"path": "batch", "batch_id": batch_id}


def _response(
    gs: GatewaySettings, h: Handoff, message: Mapping[str, Any], batch_id: str, now: float
) -> Decision:
    usage = message.get("usage") or {}
    model = h.model or str(message.get("model") or "")
    cost = quote(gs.models.get(model), usage, price_version=price_version(gs), service_tier="batch")
    metered = Metered(
        h.partner, h.request_id, model, usage, cost, origin_of(h), "batch", None, h.submissions, now
    )
    try:
        value = encode_response(
            partner=h.partner,
            request_id=h.request_id,
            message_body=message,
            attempts=h.submissions,
            upstream_request_id=None,
            timings=Timings(received_at=h.routed_at),
            completed_at=now,
            request_timestamp_ms=h.timestamp_ms,
            metadata=h.metadata,
            cost=cost.doc(),
            served_by=served_by(batch_id),
        )
    except orjson.JSONEncodeError as exc:  # nested deeper than orjson writes: billed, so metered
        log.exception(
            "a batch result could not be written", extra={"partner": h.partner, "batch_id": batch_id}
        )
        dl = DeadLetter(
            h.partner, Reason.INTERNAL_ERROR, f"gateway error: {type(exc).__name__}", origin_of(h),
            h.request_id, h.submissions,
        )  # fmt: skip
        return _billed_dead_letter(gs, h, dl, metered, now)
    if len(value) > gs.kafka.producer_max_request_bytes - 4096:
        dl = DeadLetter(
            h.partner,
            Reason.RESPONSE_TOO_LARGE,
            f"the batch result ({len(value)} bytes) is over the producer's size limit",
            origin_of(h),
            h.request_id,
            h.submissions,
            response={"value": b"", "value_size": len(value), "usage": usage},
        )
        return _billed_dead_letter(gs, h, dl, metered, now)
    msg = OutMessage(gs.response_topic(h.partner), h.request_id.encode(), value, (*JSON, *h.trace))
    return Decision([msg, metering_message(gs.kafka.usage_topic, metered)], "response", cost=cost)


def _billed_dead_letter(
    gs: GatewaySettings, h: Handoff, dl: DeadLetter, metered: Metered, now: float
) -> Decision:
    """A billed result that cannot be a response: its dead letter and its metering record; the
    budget is settled with what it cost."""
    messages = [
        *dead_letter(gs, dl, now, h.trace),
        metering_message(gs.kafka.usage_topic, metered, "deadletter", dl.reason.value),
    ]
    return Decision(messages, "deadletter", cost=metered.cost)


def dead_letter(
    gs: GatewaySettings, dl: DeadLetter, now: float, trace: tuple[tuple[str, bytes], ...] = ()
) -> list[OutMessage]:
    """The dead letter's message; `trace`: the request's trace context (`Handoff.trace`)."""
    headers = (*JSON, *trace, *deadletter_headers(dl, gs.kafka.group_id))
    value = encode_deadletter(dl, failed_at=now, max_original_bytes=0)
    return [
        OutMessage(
            gs.deadletter_topic(dl.partner), dl.request_id.encode() if dl.request_id else None, value, headers
        )
    ]


def _give_up(
    gs: GatewaySettings,
    h: Handoff,
    reason: Reason,
    detail: str,
    now: float,
    upstream: UpstreamInfo | None = None,
) -> Decision:
    dl = DeadLetter(h.partner, reason, detail, origin_of(h), h.request_id, h.submissions, upstream)
    return Decision(dead_letter(gs, dl, now, h.trace), "deadletter")


def decide(
    gs: GatewaySettings,
    router: Router,
    h: Handoff,
    result: Mapping[str, Any],
    batch_id: str,
    now: float | None = None,
) -> Decision:
    """The decision for one result (`{"type": ..., ...}`, the SDK's result as a dict)."""
    now = time.time() if now is None else now
    kind = str(result.get("type") or "missing")
    try:
        return replace(_decide(gs, router, h, result, batch_id, now), kind=kind)
    except Exception as exc:  # one result must not stop the batch's other results
        # (a usage whose cost is beyond 64 bits, say): retrying cannot change it, so the member
        # gets its outcome now and the batch goes on; its metering record could not be written
        log.exception(
            "a batch result could not be decided", extra={"partner": h.partner, "batch_id": batch_id}
        )
        detail = f"gateway error: {type(exc).__name__}"
        return replace(_give_up(gs, h, Reason.INTERNAL_ERROR, detail, now), kind=kind)


def _decide(
    gs: GatewaySettings, router: Router, h: Handoff, result: Mapping[str, Any], batch_id: str, now: float
) -> Decision:
    s = gs.batches
    kind = str(result.get("type") or "missing")
    if kind == "succeeded":
        return _response(gs, h, result.get("message") or {}, batch_id, now)
    if kind == "errored":
        error = (result.get("error") or {}).get("error") or {}
        etype = str(error.get("type") or "api_error")
        message = str(error.get("message") or "")[:300]
        upstream = UpstreamInfo(None, etype, None, None)
        if etype in RETRYABLE_ERRORS:
            if h.submissions < s.max_submissions and router.can_batch_again(s, h.respond_by, now):
                return Decision([], "rebatched", needs_record=True, handoff=h.next(back_to_realtime=None))
            if router.can_go_realtime(s, h.respond_by, now):
                why = f"errored ({etype}) in {batch_id}"
                return Decision([], "realtime", needs_record=True, handoff=h.next(back_to_realtime=why))
            return _give_up(
                gs, h, Reason.RETRIES_EXHAUSTED,
                f"batch {batch_id}: {etype} after {h.submissions} submissions, no time left: {message}",
                now, upstream,
            )  # fmt: skip
        reason = _ERROR_REASONS.get(etype, Reason.UPSTREAM_REJECTED)
        return _give_up(gs, h, reason, f"batch {batch_id}: {etype}: {message}", now, upstream)
    reason = Reason.BATCH_CANCELED if kind == "canceled" else Reason.BATCH_EXPIRED
    if router.can_go_realtime(s, h.respond_by, now):
        return Decision(
            [], "realtime", needs_record=True, handoff=h.next(back_to_realtime=f"{kind} in {batch_id}")
        )
    return _give_up(
        gs,
        h,
        reason,
        f"batch {batch_id}: the request {kind} and its deadline leaves no time for real time",
        now,
    )


def with_record(gs: GatewaySettings, d: Decision, rec: Any) -> Decision:
    """A rebatched or real-time decision, completed with the original request record."""
    assert d.handoff is not None
    topic = gs.batches.pending_topic if d.action == "rebatched" else gs.realtime_topic()
    return replace(d, messages=[handoff_message(topic, rec, d.handoff)], needs_record=False)


def result_dict(entry: Any) -> tuple[str, dict[str, Any]]:
    """(custom_id, result) of one line of the results, from the SDK's model or a dict."""
    if isinstance(entry, Mapping):
        return str(entry.get("custom_id")), dict(entry.get("result") or {})
    doc = orjson.loads(entry.to_json()) if hasattr(entry, "to_json") else entry.model_dump(mode="json")
    return str(doc.get("custom_id")), dict(doc.get("result") or {})
