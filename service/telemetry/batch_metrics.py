"""Metrics of the Message Batches path (on the gateway's one registry).

What an SRE needs to see: requests waiting to form a batch and in submitted
batches, batches by phase and the age of the oldest, the turnaround expected
(what routing assumes) against the turnaround achieved, and every result.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_TURNAROUND_BUCKETS = (1, 5, 15, 60, 300, 900, 1800, 3600, 7200, 14400, 28800, 43200, 86400)


class BatchMetrics:
    def __init__(self, r: CollectorRegistry) -> None:
        self.routed = Counter(
            "gateway_batch_routed",
            "Requests by the path routing chose (realtime or batch).",
            ["partner", "route"],
            registry=r,
        )
        self.requests = Gauge(
            "gateway_batch_requests",
            "Requests on the batch path: forming (waiting for a batch) or submitted (in a batch not ended).",
            ["state"],
            registry=r,
        )
        self.batches = Gauge(
            "gateway_batches",
            "Open batches by phase: intent (recorded, not created), in_progress, publishing.",
            ["phase"],
            registry=r,
        )
        self.oldest_age = Gauge(
            "gateway_batch_oldest_age_seconds",
            "Age of the oldest open batch (since its intent was recorded).",
            registry=r,
        )
        self.expected_turnaround = Gauge(
            "gateway_batch_expected_turnaround_seconds",
            "The turnaround routing assumes (p95 of the last batches, or the configured prior).",
            registry=r,
        )
        self.turnaround = Histogram(
            "gateway_batch_turnaround_seconds",
            "Achieved turnaround of ended batches (created to ended).",
            buckets=_TURNAROUND_BUCKETS,
            registry=r,
        )
        self.results = Counter(
            "gateway_batch_results",
            "Batch results by type and what was done (response, rebatched, realtime, deadletter).",
            ["partner", "result", "action"],
            registry=r,
        )
        self.api_errors = Counter(
            "gateway_batch_api_errors",
            "Failed calls to the Message Batches API, by operation.",
            ["operation"],
            registry=r,
        )
        self.recovered = Counter(
            "gateway_batch_recovered",
            "Intents found without a batch id after a crash: found by listing, or created anew.",
            ["outcome"],
            registry=r,
        )
        for state in ("forming", "submitted"):
            self.requests.labels(state)
        for phase in ("intent", "in_progress", "publishing"):
            self.batches.labels(phase)
        for operation in ("create", "retrieve", "results"):
            self.api_errors.labels(operation)
        for outcome in ("found", "created_anew"):
            self.recovered.labels(outcome)

    def init_partner(self, partner: str) -> None:
        """Zero samples, so panels and alerts see 0 before the first batch."""
        for route in ("realtime", "batch"):
            self.routed.labels(partner, route)
        for result, action in (
            ("succeeded", "response"),
            ("expired", "deadletter"),
            ("errored", "deadletter"),
        ):
            self.results.labels(partner, result, action)
