"""The service's Prometheus metrics, one registry per running gateway.

Names follow Prometheus conventions (base units, `_total`, `_seconds`, one unit
per metric: requests and tokens are never in one metric); labels are bounded:
partner, model, outcome, reason, kind, status, code, direction; never a request id.
The registry also has the default `process_*`, `python_info` and `python_gc_*`
collectors and `gateway_build_info{version, python}`. A partner's gauges exist
(at 0) from start, so panels and alerts see 0, not "no data".

Most are updated where things happen (pipeline, ingest loop). Gauges of state
held elsewhere (limiter bucket levels, scheduler queues, readiness) are
refreshed just before each scrape by the callbacks given to `on_scrape`.
"""

from __future__ import annotations

import logging
import platform
from collections.abc import Callable, Mapping

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
)

from service.admission.pricing import NANO_PER_USD, Quote
from service.scheduling.limiter import parse_ratelimit_headers
from service.telemetry.batch_metrics import BatchMetrics
from service.version import version

log = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_TOKEN_DIRECTIONS = {"itpm": "input", "otpm": "output"}
_HIT_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25, 0.5, 1, 5)
_WAIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry if registry is not None else CollectorRegistry()
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        self.build_info = Info("gateway_build", "The running gateway's version.", registry=r)
        self.build_info.info({"version": version(), "python": platform.python_version()})
        self.batch = BatchMetrics(r)
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
        self.cost = Counter(
            "gateway_cost_usd",
            "Cost of billed calls in US dollars (the sum of their `cost.nano_usd` / 1e9).",
            ["partner", "model"],
            registry=r,
        )
        self.upstream_calls = Counter(
            "gateway_upstream_calls",
            "Upstream attempts by HTTP status class (2xx, 4xx, 5xx, error: no answer) and code.",
            ["partner", "status", "code"],
            registry=r,
        )
        self.upstream_429 = Counter(
            "gateway_upstream_429",
            'Deprecated (to be removed): use gateway_upstream_calls_total{code="429"}.',
            registry=r,
        )
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
        self.in_flight = Gauge(
            "gateway_in_flight", "Requests in an upstream call right now.", ["partner"], registry=r
        )
        self.queued = Gauge(
            "gateway_queued",
            "Requests in memory waiting (admission, a fair turn, a retry, publishing), not in a call.",
            ["partner"],
            registry=r,
        )
        self.paused_partitions = Gauge(
            "gateway_paused_partitions", "Request partitions paused by backpressure.", ["partner"], registry=r
        )
        self.consumer_lag = Gauge(
            "gateway_consumer_lag",
            "Messages behind the end of the partition (from the last commit).",
            ["topic", "partition", "partner"],
            registry=r,
        )
        self.limiter_requests = Gauge(
            "gateway_limiter_available_requests",
            "Requests left in a limiter's per-minute bucket (scope: org or a partner).",
            ["scope"],
            registry=r,
        )
        self.limiter_tokens = Gauge(
            "gateway_limiter_available_tokens",
            "Tokens left in a limiter's per-minute bucket (direction: input or output).",
            ["scope", "direction"],
            registry=r,
        )
        self.upstream_remaining_requests = Gauge(
            "gateway_upstream_ratelimit_remaining_requests",
            "Last anthropic-ratelimit-requests-remaining value.",
            registry=r,
        )
        self.upstream_remaining_tokens = Gauge(
            "gateway_upstream_ratelimit_remaining_tokens",
            "Last anthropic-ratelimit-{input,output}-tokens-remaining value.",
            ["direction"],
            registry=r,
        )
        self.redis_degraded = Gauge(
            "gateway_redis_degraded",
            "1 while Redis is down: limits, budgets and replay checks fall back to local state.",
            registry=r,
        )
        self.redis_data_lost = Counter(
            "gateway_redis_data_lost",
            "Times this replica found Redis without the gateway's data (restarted empty, flushed, "
            "failed over to a replica without it) and wrote back its budget counters, replay "
            "sightings and pauses.",
            registry=r,
        )
        self.redis_may_evict = Gauge(
            "gateway_redis_may_evict",
            "1 while Redis has a maxmemory and a maxmemory-policy other than noeviction: it may "
            "drop budget counters, replay sightings or pauses when full, without a trace.",
            registry=r,
        )
        self.redis_evicted_keys = Counter(
            "gateway_redis_evicted_keys",
            "Keys Redis evicted (its INFO evicted_keys, as it rose while this replica watched): "
            "the gateway's may be among them.",
            registry=r,
        )
        self.redis_pool_busy = Counter(
            "gateway_redis_pool_busy",
            "Redis calls that found every pooled connection in use for redis.pool_timeout_s (a burst, "
            "not an outage): each fell back to local state.",
            registry=r,
        )

        self.budget_remaining = Gauge(
            "gateway_budget_remaining_usd",
            "USD left in the partner's budget period.",
            ["partner", "period"],
            registry=r,
        )
        self.ready = Gauge("gateway_ready", "1 when the service is ready to process.", registry=r)
        self.unknown_outcomes = Counter(
            "gateway_unknown_outcomes",
            "Calls with an unknown outcome (owner lost mid-call, or no answer after sending).",
            ["partner", "cause"],
            registry=r,
        )
        self.unknown_retries = Counter(
            "gateway_unknown_retries",
            "Extra calls made under on_unknown: retry (each may be billed a second time).",
            ["partner"],
            registry=r,
        )
        self.quarantined = Counter(
            "gateway_quarantined",
            "Records whose dead letter could not be published at all (finished with no outcome message).",
            ["partner"],
            registry=r,
        )
        self.metering_lost = Counter(
            "gateway_metering_lost",
            "Billed calls whose outcome was published without its metering record "
            "(the usage topic refused it).",
            ["partner"],
            registry=r,
        )
        self.internal_errors = Counter(
            "gateway_internal_errors",
            "Faults of the gateway itself, by where.",
            ["partner", "where"],
            registry=r,
        )
        self.eos_transactions = Gauge(
            "gateway_eos_transactions",
            "Transactions committed by the partition writers of this process (since start).",
            registry=r,
        )
        self.eos_writers = Gauge(
            "gateway_eos_writers",
            "Partition writers (transactional producers) open in this process.",
            registry=r,
        )
        self.eos_window = Gauge(
            "gateway_eos_window_offsets",
            "Largest window of offsets above a commit point, per partner (paused at kafka.eos_window).",
            ["partner"],
            registry=r,
        )
        self.eos_claims = Gauge(
            "gateway_eos_claims", "Calls claimed and not yet finished, per partner.", ["partner"], registry=r
        )
        self.eos_hanging = Counter(
            "gateway_eos_hanging_partitions",
            "Partitions found holding a transaction left hanging, then marked: by the writer of this"
            " process with the producer id holding it (its last stable offset stuck 10 s), or by every"
            " writer of this process (stuck past the transaction timeout).",
            registry=r,
        )
        self.eos_stuck = Gauge(
            "gateway_eos_stuck_partitions",
            "Partitions written in transactions whose last stable offset has stayed put past the"
            " transaction timeout, after every writer of this process marked them: outcomes behind"
            " it are invisible to read_committed readers until the id that left it ends it.",
            registry=r,
        )
        self.response_cache = Counter(
            "gateway_response_cache",
            "Response cache lookups (hit, miss, unavailable: Redis down or failing) and stores "
            "(store, skip_stop_reason, skip_too_large, skip_no_room, skip_unavailable), by partner.",
            ["partner", "result"],
            registry=r,
        )
        self.response_cache_hit_latency = Histogram(
            "gateway_response_cache_hit_seconds",
            "A response served from the cache: the record received to its response committed.",
            ["partner"],
            buckets=_HIT_BUCKETS,
            registry=r,
        )
        self.response_cache_evictions = Counter(
            "gateway_response_cache_evictions",
            "Unexpired entries evicted to keep the response cache within its max bytes.",
            registry=r,
        )
        self.response_cache_bytes = Gauge(
            "gateway_response_cache_bytes",
            "Bytes the response cache holds (in Redis: as of this replica's last store).",
            registry=r,
        )
        self._ratelimit_headers: Mapping[str, str] | None = None
        self._refreshers: list[Callable[[], None]] = [self._refresh_ratelimit]

    def billed(self, partner: str, model: str, cost: Quote) -> None:
        """A billed call: its tokens by kind and its cost (one quote for every figure)."""
        b = cost.billed
        self.tokens.labels(partner, model, "input").inc(b.input)
        self.tokens.labels(partner, model, "output").inc(b.output)
        self.tokens.labels(partner, model, "cache_read").inc(b.cache_read)
        self.tokens.labels(partner, model, "cache_creation").inc(b.cache_write)
        if cost.nusd is not None:
            self.cost.labels(partner, model).inc(cost.nusd / NANO_PER_USD)

    def init_partner(self, partner: str) -> None:
        """Zero samples for a partner's counters of rare events, so alerts and dashboards
        see a 0 (not "no data") until the first one happens."""
        self.unknown_outcomes.labels(partner, "owner_lost")
        self.batch.init_partner(partner)
        for gauge in (self.in_flight, self.queued, self.paused_partitions, self.eos_window, self.eos_claims):
            gauge.labels(partner)
        self.unknown_retries.labels(partner)
        self.quarantined.labels(partner)
        self.metering_lost.labels(partner)
        self.internal_errors.labels(partner, "call")

    def on_scrape(self, refresh: Callable[[], None]) -> None:
        """Call `refresh` before every scrape (`refresh()`), to update gauges of outside state."""
        self._refreshers.append(refresh)

    def refresh(self) -> None:
        """Run the scrape callbacks; one that fails is logged and leaves its gauges as they were."""
        for refresh in self._refreshers:
            try:
                refresh()
            except Exception:  # a broken gauge must not break the scrape
                log.exception("metrics refresh failed", extra={"callback": getattr(refresh, "__name__", "?")})

    def in_flight_now(self, partner: str) -> int:
        """The current `gateway_in_flight{partner}`."""
        return int(self.in_flight.labels(partner)._value.get())

    def observe_ratelimit_headers(self, headers: Mapping[str, str]) -> None:
        """Keep an upstream answer's headers for `gateway_upstream_ratelimit_remaining_{requests,tokens}`.

        Only the newest answer matters to a gauge, so the headers are parsed at scrape time,
        not for every answer (a dozen case-insensitive lookups per message otherwise).
        """
        self._ratelimit_headers = headers

    def set_limiter_level(self, scope: str, bucket: str, level: float) -> None:
        """A limiter bucket's level: `rpm` in requests, `itpm`/`otpm` in tokens."""
        if bucket == "rpm":
            self.limiter_requests.labels(scope).set(level)
        elif bucket in _TOKEN_DIRECTIONS:
            self.limiter_tokens.labels(scope, _TOKEN_DIRECTIONS[bucket]).set(level)

    def _refresh_ratelimit(self) -> None:
        headers, self._ratelimit_headers = self._ratelimit_headers, None
        if headers is None:
            return
        for bucket, (_, remaining) in parse_ratelimit_headers(headers).items():
            if remaining is None:
                continue
            if bucket == "rpm":
                self.upstream_remaining_requests.set(remaining)
            elif bucket in _TOKEN_DIRECTIONS:
                self.upstream_remaining_tokens.labels(_TOKEN_DIRECTIONS[bucket]).set(remaining)
