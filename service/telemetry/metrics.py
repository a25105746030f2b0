"""The service's Prometheus metrics, one registry per running gateway.

Names follow Prometheus conventions (base units, `_total`, `_seconds`);
labels are bounded: partner, model, outcome, reason, kind, bucket; never a
request id.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_WAIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry if registry is not None else CollectorRegistry()
        self.requests = Counter(
            "gateway_requests", "Requests by final outcome.", ["partner", "model", "outcome"], registry=r
        )
        self.dead_letters = Counter(
            "gateway_dead_letters", "Dead letters by reason.", ["partner", "reason"], registry=r
        )
        self.retries = Counter(
            "gateway_retries", "Upstream attempts retried, by cause.", ["partner", "reason"], registry=r
        )
        self.tokens = Counter(
            "gateway_tokens", "Tokens billed, by kind.", ["partner", "model", "kind"], registry=r
        )
        self.cost = Counter("gateway_cost_usd", "Cost in US dollars.", ["partner", "model"], registry=r)
        self.upstream_calls = Counter(
            "gateway_upstream_calls",
            "Upstream attempts by HTTP status class.",
            ["partner", "status"],
            registry=r,
        )
        self.upstream_429 = Counter("gateway_upstream_429", "429 answers from the upstream.", registry=r)
        self.upstream_latency = Histogram(
            "gateway_upstream_latency_seconds",
            "Duration of one upstream attempt.",
            ["partner", "model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.end_to_end = Histogram(
            "gateway_end_to_end_latency_seconds",
            "Request timestamp to outcome acknowledged.",
            ["partner"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "gateway_queue_wait_seconds",
            "Wait for a concurrency slot and a fair turn.",
            ["partner"],
            buckets=_WAIT_BUCKETS,
            registry=r,
        )
        self.limiter_wait = Histogram(
            "gateway_limiter_wait_seconds",
            "Wait for rate-limit capacity.",
            ["partner"],
            buckets=_WAIT_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge("gateway_in_flight", "Requests being processed.", ["partner"], registry=r)
        self.queued = Gauge("gateway_queued", "Requests waiting for their turn.", ["partner"], registry=r)
        self.paused_partitions = Gauge(
            "gateway_paused_partitions", "Request partitions paused by backpressure.", ["partner"], registry=r
        )
        self.consumer_lag = Gauge(
            "gateway_consumer_lag",
            "Messages behind the end of the partition.",
            ["topic", "partition"],
            registry=r,
        )
        self.limiter_available = Gauge(
            "gateway_limiter_available", "Capacity left in a limiter bucket.", ["scope", "bucket"], registry=r
        )
        self.upstream_remaining = Gauge(
            "gateway_upstream_ratelimit_remaining",
            "Last anthropic-ratelimit-*-remaining value.",
            ["bucket"],
            registry=r,
        )
        self.redis_degraded = Gauge(
            "gateway_redis_degraded", "1 while shared limits fall back to a local share.", registry=r
        )
        self.budget_remaining = Gauge(
            "gateway_budget_remaining_usd",
            "USD left in the partner's budget period.",
            ["partner", "period"],
            registry=r,
        )
        self.ready = Gauge("gateway_ready", "1 when the service is ready to process.", registry=r)
