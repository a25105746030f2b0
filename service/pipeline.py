"""One request's path: admission, fair turn, Claude call with retries, outcome published.

`Pipeline.handle` returns only once the request's single outcome (a response
or a dead letter) has been acknowledged by the broker; the ingest loop then
marks the offset finished. It never lets a request vanish: an unexpected error
becomes an `internal_error` dead letter, and if even that cannot be published
the error propagates and the service stops without committing the offset.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import anthropic
from aiokafka.errors import KafkaError, MessageSizeTooLargeError

from service.admission.admit import Admission, Admitted, RecordLike, Rejected
from service.config.settings import GatewaySettings, ModelPrice
from service.contracts.outcomes import (
    DeadLetter,
    Origin,
    Timings,
    UpstreamInfo,
    encode_deadletter,
    encode_response,
)
from service.contracts.reasons import Reason
from service.egress.publisher import Publisher
from service.scheduling.scheduler import Cost, Draining, Scheduler, Usage
from service.telemetry.metrics import Metrics
from service.telemetry.tracing import Tracing
from service.upstream.client import ClaudeClient, UnknownPartnerKey, UpstreamResult
from service.upstream.errors import Failure, classify
from service.upstream.retry import RetryPolicy

log = logging.getLogger(__name__)

MAX_ORIGINAL_BYTES = 512 * 1024
FALLBACK_ORIGINAL_BYTES = 16 * 1024
MAX_DEADLETTER_KEY_BYTES = 1024
JSON_HEADERS: tuple[tuple[str, bytes], ...] = (("content-type", b"application/json"),)


@dataclass(slots=True)
class _Success:
    result: UpstreamResult
    attempts: int


@dataclass(slots=True)
class _Failed:
    failure: Failure
    attempts: int
    detail: str


def _usage_numbers(usage: Mapping[str, Any]) -> tuple[int, int, int, int]:
    return (
        int(usage.get("input_tokens") or 0),
        int(usage.get("output_tokens") or 0),
        int(usage.get("cache_read_input_tokens") or 0),
        int(usage.get("cache_creation_input_tokens") or 0),
    )


def cost_usd(price: ModelPrice, usage: Mapping[str, Any]) -> float:
    inp, out, cache_read, cache_write = _usage_numbers(usage)
    return (
        inp * price.input_per_mtok_usd
        + out * price.output_per_mtok_usd
        + cache_read * price.cache_read_per_mtok_usd
        + cache_write * price.cache_write_per_mtok_usd
    ) / 1_000_000


class Pipeline:
    def __init__(
        self,
        settings: GatewaySettings,
        admission: Admission,
        scheduler: Scheduler,
        claude: ClaudeClient,
        publisher: Publisher,
        metrics: Metrics,
        retry: RetryPolicy | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        self.settings = settings
        self.admission = admission
        self.scheduler = scheduler
        self.claude = claude
        self.publisher = publisher
        self.metrics = metrics
        self.retry = retry or RetryPolicy(settings.retry)
        self.tracing = tracing or Tracing()

    async def handle(self, rec: RecordLike) -> None:
        """Process one record until its outcome is acknowledged by the broker."""
        with self.tracing.process(rec):  # the request's CONSUMER span, current throughout
            await self._handle(rec)

    async def _handle(self, rec: RecordLike) -> None:
        timings = Timings(received_at=time.time())
        origin = Origin(rec.topic, rec.partition, rec.offset, rec.timestamp, rec.key, rec.value, rec.headers)
        with self.tracing.span("admission"):
            verdict = await self.admission.admit_and_reserve(rec)  # may wait: budget on_exhausted=defer
        self.tracing.annotate(
            partner=verdict.partner_id if isinstance(verdict, Rejected) else verdict.partner.id,
            request_id=verdict.request_id,
        )
        if isinstance(verdict, Rejected):
            await self._dead_letter(
                DeadLetter(verdict.partner_id, verdict.reason, verdict.detail, origin, verdict.request_id),
                model="",
            )
            return
        pid = verdict.partner.id
        try:
            outcome = await self._call(verdict, timings)
        except Draining:
            await self.admission.release(verdict)  # not started: nothing billed
            raise
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug must not lose the request: dead-letter it
            log.exception(
                "unexpected error while calling upstream",
                extra={**_log_ctx(rec, verdict.request_id), "partner": pid},
            )
            await self._dead_letter(
                DeadLetter(
                    pid,
                    Reason.INTERNAL_ERROR,
                    f"gateway error: {type(exc).__name__}",
                    origin,
                    verdict.request_id,
                ),
                model=verdict.model,
            )
            return
        if isinstance(outcome, _Failed):
            f = outcome.failure
            if f.label not in ("timeout", "connection"):  # not billed; a lost answer may have been
                await self.admission.release(verdict)
            await self._dead_letter(
                DeadLetter(
                    pid,
                    f.reason,
                    outcome.detail,
                    origin,
                    verdict.request_id,
                    outcome.attempts,
                    UpstreamInfo(f.status, f.error_type, f.error_code, f.request_id),
                ),
                model=verdict.model,
            )
            return
        await self._respond(verdict, outcome, timings, origin)

    async def _call(self, adm: Admitted, timings: Timings) -> _Success | _Failed:
        pid = adm.partner.id
        cost = Cost(adm.est_input_tokens, adm.max_tokens)
        started = time.monotonic()
        attempt = 0
        m = self.metrics
        while True:
            attempt += 1
            asked_ns = time.time_ns()
            grant = await self.scheduler.acquire(pid, cost)
            timings.queue_s += grant.queue_wait_s + grant.limiter_wait_s
            m.queue_wait.labels(pid).observe(grant.queue_wait_s)
            m.limiter_wait.labels(pid).observe(grant.limiter_wait_s)
            self.tracing.waits(asked_ns, grant.queue_wait_s, grant.limiter_wait_s, attempt)
            m.in_flight.labels(pid).inc()
            span = self.tracing.attempt(attempt, adm.model, adm.max_tokens)
            call_started = time.perf_counter()
            try:
                with span:  # the SDK's CLIENT span becomes its child
                    result = await self.claude.create_message(pid, adm.params)
                span.succeeded(200, result.body)
            except anthropic.AnthropicError as exc:
                elapsed = time.perf_counter() - call_started
                timings.upstream_s += elapsed
                failure = classify(exc)
                span.failed(failure)
                if isinstance(exc, anthropic.APIStatusError):
                    # answered: nothing billed for an error; the headers still tell the budget
                    self.scheduler.release(grant, Usage(0, 0))
                    self.scheduler.observe_headers(exc.response.headers)
                    m.observe_ratelimit_headers(exc.response.headers)
                else:
                    self.scheduler.release(grant, None)  # unknown outcome: keep the reservation
                if failure.rate_limited:
                    self.scheduler.rate_limited(failure.retry_after_s)
                m.upstream_latency.labels(pid, adm.model).observe(elapsed)
                m.upstream_calls.labels(pid, _status_class(failure.status)).inc()
                if failure.status == 429:
                    m.upstream_429.inc()
                if not failure.retryable:
                    span.decided("fail")
                    return _Failed(failure, attempt, _describe(failure, exc))
                delay = self.retry.delay_s(attempt, failure.retry_after_s)
                if not self.retry.should_retry(attempt, time.monotonic() - started, delay):
                    span.decided("give_up")
                    detail = f"gave up after {attempt} attempts; last: {_describe(failure, exc)}"
                    return _Failed(failure, attempt, detail)
                span.decided("retry", delay)
                m.retries.labels(pid, failure.label).inc()
                await asyncio.sleep(delay)
                continue
            except UnknownPartnerKey:
                span.decided("fail")
                self.scheduler.release(grant, Usage(0, 0))
                return _Failed(
                    Failure(False, Reason.UPSTREAM_AUTHENTICATION, "no_key"),
                    attempt,
                    f"no Anthropic key is loaded for partner {pid!r}",
                )
            finally:
                m.in_flight.labels(pid).dec()
                span.end()
            timings.upstream_s += result.elapsed_s
            inp, out, _, _ = _usage_numbers(result.body.get("usage") or {})
            self.scheduler.release(grant, Usage(inp, out))
            self.scheduler.observe_headers(result.headers)
            m.observe_ratelimit_headers(result.headers)
            m.upstream_latency.labels(pid, adm.model).observe(result.elapsed_s)
            m.upstream_calls.labels(pid, "2xx").inc()
            return _Success(result, attempt)

    async def _respond(self, adm: Admitted, ok: _Success, timings: Timings, origin: Origin) -> None:
        pid = adm.partner.id
        body = ok.result.body
        await self.admission.settle(adm, body.get("usage") or {})  # billed, whether or not published
        value = encode_response(
            partner=pid,
            request_id=adm.request_id,
            message_body=body,
            attempts=ok.attempts,
            upstream_request_id=ok.result.request_id,
            timings=timings,
            completed_at=time.time(),
            request_timestamp_ms=origin.timestamp_ms,
            metadata=adm.metadata,
        )
        topic, key = self.settings.response_topic(pid), adm.request_id.encode()
        try:
            with self.tracing.produce(topic, key, origin.headers) as trace_headers:
                await self.publisher.publish(topic, key, value, (*JSON_HEADERS, *trace_headers))
        except KafkaError as exc:
            await self._dead_letter(
                DeadLetter(
                    pid,
                    Reason.INTERNAL_ERROR,
                    f"the response could not be published: {type(exc).__name__}",
                    origin,
                    adm.request_id,
                    ok.attempts,
                ),
                model=adm.model,
            )
            return
        self._account(pid, adm.model, body.get("usage") or {})
        self.metrics.requests.labels(pid, adm.model, "response").inc()
        self._observe_e2e(pid, origin)
        self.tracing.outcome("response")
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "response published",
                extra={
                    **_origin_ctx(origin),
                    "partner": pid,
                    "request_id": adm.request_id,
                    "attempts": ok.attempts,
                },
            )

    def _account(self, pid: str, model: str, usage: Mapping[str, Any]) -> None:
        inp, out, cache_read, cache_write = _usage_numbers(usage)
        tokens = self.metrics.tokens
        tokens.labels(pid, model, "input").inc(inp)
        tokens.labels(pid, model, "output").inc(out)
        tokens.labels(pid, model, "cache_read").inc(cache_read)
        tokens.labels(pid, model, "cache_creation").inc(cache_write)
        price = self.settings.models.get(model)
        if price is not None:
            self.metrics.cost.labels(pid, model).inc(cost_usd(price, usage))

    async def _dead_letter(self, dl: DeadLetter, model: str) -> None:
        value = encode_deadletter(dl, failed_at=time.time(), max_original_bytes=MAX_ORIGINAL_BYTES)
        headers = (*JSON_HEADERS, ("gateway-reason", dl.reason.value.encode()))
        self.tracing.outcome("deadletter", dl.reason.value)
        topic = self.settings.deadletter_topic(dl.partner)
        key = _deadletter_key(dl.origin.key)
        with self.tracing.produce(topic, key, dl.origin.headers) as trace_headers:
            try:
                await self.publisher.publish(topic, key, value, (*headers, *trace_headers))
            except MessageSizeTooLargeError:
                # the broker's limit is below ours: keep the digest and size, cut the bytes
                value = encode_deadletter(
                    dl, failed_at=time.time(), max_original_bytes=FALLBACK_ORIGINAL_BYTES
                )
                await self.publisher.publish(topic, key, value, (*headers, *trace_headers))
        self.metrics.dead_letters.labels(dl.partner, dl.reason.value).inc()
        self.metrics.requests.labels(dl.partner, model, "deadletter").inc()
        self._observe_e2e(dl.partner, dl.origin)
        log.info(
            "dead-lettered",
            extra={
                **_origin_ctx(dl.origin),
                "partner": dl.partner,
                "request_id": dl.request_id,
                "reason": dl.reason.value,
            },
        )

    def _observe_e2e(self, pid: str, origin: Origin) -> None:
        if origin.timestamp_ms is not None:
            self.metrics.end_to_end.labels(pid).observe(max(0.0, time.time() - origin.timestamp_ms / 1000))


def _deadletter_key(key: bytes | None) -> bytes | None:
    """The dead letter's Kafka key: the original key, or its SHA-256 when it is huge
    (a hostile key must not push the dead letter past the broker's size limit)."""
    if key is None or len(key) <= MAX_DEADLETTER_KEY_BYTES:
        return key
    return b"sha256:" + hashlib.sha256(key).hexdigest().encode()


def _status_class(status: int | None) -> str:
    return "error" if status is None else f"{status // 100}xx"


def _describe(failure: Failure, exc: BaseException) -> str:
    if isinstance(exc, anthropic.APIStatusError):
        msg = (exc.api_message or "")[:300]
        return f"HTTP {exc.status_code} {exc.type or ''}: {msg}".strip()
    return f"{failure.label}: {type(exc).__name__}"


def _origin_ctx(origin: Origin) -> dict[str, Any]:
    return {"topic": origin.topic, "partition": origin.partition, "offset": origin.offset}


def _log_ctx(rec: RecordLike, request_id: str | None) -> dict[str, Any]:
    return {"topic": rec.topic, "partition": rec.partition, "offset": rec.offset, "request_id": request_id}
