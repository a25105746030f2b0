"""Settings of the Message Batches path (`batches:`): routing by urgency and the batch worker.

A request says how urgent it is (`service_class`: `realtime`, `batch` or `auto`, and
`respond_by`, an RFC 3339 time); each partner has a default class. `auto` goes to a
batch when `respond_by` leaves room for the expected turnaround times
`turnaround_factor` plus `margin_s`. See docs/batches.md.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from service.config.frozen import Frozen

ANTHROPIC_MAX_BATCH_REQUESTS = 100_000
ANTHROPIC_MAX_BATCH_BYTES = 256 * 1024 * 1024

ServiceClass = Literal["realtime", "batch", "auto"]


class BatchSettings(Frozen):
    enabled: bool = False
    """Off: every request is served in real time, whatever its class."""
    pending_topic: str = "claude.gateway.batch-pending"
    """Requests handed to the batch worker (one partition: one worker creates batches)."""
    state_topic: str = "claude.gateway.batch-state"
    """The worker's durable record of every open batch (compacted, one partition)."""
    realtime_topic: str | None = None
    """Requests the batch path sends back to real time (expired, errored near their
    deadline); default `<request_topic_prefix>_gateway.realtime`, which the ingest
    loop's subscription already covers. Only the gateway may write it."""
    max_requests: int = Field(default=10_000, gt=0, le=ANTHROPIC_MAX_BATCH_REQUESTS)
    max_bytes: int = Field(default=64 * 1024 * 1024, gt=0, le=ANTHROPIC_MAX_BATCH_BYTES)
    """Of the create call's body; Anthropic allows 256 MB."""
    max_age_s: float = Field(default=60.0, gt=0)
    """A forming batch is submitted when its oldest request waited this long."""
    expected_turnaround_s: float = Field(default=3600.0, gt=0)
    """The turnaround assumed until batches have been observed (then the p95 of the last ones)."""
    turnaround_factor: float = Field(default=1.5, ge=1)
    margin_s: float = Field(default=600.0, ge=0)
    realtime_reserve_s: float = Field(default=300.0, ge=0)
    """An expired or errored request goes real-time only if its deadline is at least this far."""
    max_submissions: int = Field(default=3, ge=1)
    """Batches one request may be part of (errored results are retried in a new batch)."""
    poll_min_s: float = Field(default=2.0, gt=0)
    poll_max_s: float = Field(default=60.0, gt=0)
    create_timeout_s: float = Field(default=120.0, gt=0)
    create_grace_s: float = Field(default=30.0, ge=0)
    """Recovery: after an intent with no recorded batch id, wait create_timeout_s plus this
    since the intent before listing batches and deciding the create never happened."""
    results_chunk: int = Field(default=500, gt=0)
    """Results published per transaction."""
    max_queued_requests: int | None = Field(default=None, gt=0)
    """Requests in submitted batches not yet ended, at most (Anthropic's batch queue limit)."""

    @model_validator(mode="after")
    def _sane(self) -> BatchSettings:
        if self.poll_max_s < self.poll_min_s:
            raise ValueError("batches.poll_max_s must be at least batches.poll_min_s")
        if len({self.pending_topic, self.state_topic, self.realtime_topic}) < 3:
            raise ValueError("batches: pending_topic, state_topic and realtime_topic must differ")
        return self
