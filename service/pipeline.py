"""One request's path: admission, fair turn, budget, claim, Claude call with retries, outcome.

`Pipeline.handle` returns once the request's single outcome (a response or a
dead letter) is committed through the record's sink (`service/ingest/`), which
also marks the offset finished. A Claude call starts only once its claim is
committed: if this replica dies mid-call, the partition's next owner knows the
call may have been billed and applies the partner's `on_unknown` policy. A
timeout or dropped connection after the request was sent is unknown too.
An unexpected error becomes an `internal_error` dead letter. A partner with `cache.enabled` may
be answered from the response cache right after admission, with none of that (`_serve_cached`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import anthropic

from service.admin.pauses import Pauses
from service.admission.admit import Admission, Admitted, Deferred, RecordLike, Rejected, request_id_in
from service.admission.pricing import billed, price_version, quote, unbilled
from service.batches.records import BadHandoff, pending_message, read_handoff
from service.batches.routing import Router, Turnaround
from service.config.settings import GatewaySettings
from service.contracts.outcomes import DeadLetter, Origin, Timings, UpstreamInfo, encode_response, utc_iso
from service.contracts.reasons import Reason
from service.egress.claims import claim_doc, owner_lost, previous_claim
from service.egress.emit import Emitter, Sink
from service.egress.metering import Metered
from service.ingest.partition import Fenced, Revoked
from service.response_cache.cache import Lookup, ResponseCache, cached_response
from service.scheduling.scheduler import NOT_CALLED, Cost, Draining, Grant, Scheduler, Usage
from service.telemetry.metrics import Metrics
from service.telemetry.tracing import Tracing
from service.upstream.client import ClaudeClient, UnknownPartnerKey, UpstreamResult
from service.upstream.errors import (
    Failure,
    InvalidParams,
    classify,
    describe,
    may_have_been_sent,
    status_class,
)
from service.upstream.retry import RetryPolicy

log = logging.getLogger(__name__)

MAX_CLAIMS = 2
"""Calls that may be billed for one request under `on_unknown: retry`: the first and one extra."""


@dataclass(slots=True)
class _Success:
    result: UpstreamResult
    attempts: int
    adm: Admitted
    unknown_retry: dict[str, Any] | None = None


@dataclass(slots=True)
class _Failed:
    failure: Failure
    attempts: int
    detail: str
    adm: Admitted
    unknown: bool = False
    """The call may have been billed: the reservation is kept."""
    claim: dict[str, Any] | None = None


class Pipeline:
    def __init__(
        self,
        settings: GatewaySettings,
        admission: Admission,
        scheduler: Scheduler,
        claude: ClaudeClient,
        metrics: Metrics,
        retry: RetryPolicy | None = None,
        tracing: Tracing | None = None,
        router: Router | None = None,
        cache: ResponseCache | None = None,
    ) -> None:
        self.settings = settings
        self.admission = admission
        self.scheduler = scheduler
        self.claude = claude
        self.metrics = metrics
        self.retry = retry or RetryPolicy(settings.retry)
        self.tracing = tracing or Tracing()
        self.emit = Emitter(settings, metrics, self.tracing)
        self.router = router or Router(Turnaround(settings.batches))
        """Real time or a Message Batch (`service/batches/routing.py`)."""
        self.pauses: Pauses | None = None
        """Partners paused or drained from the admin console: their requests wait here."""
        self.cache = cache
        """The exact response cache (service/response_cache/); None: off for everyone."""

    async def handle(self, rec: RecordLike, sink: Sink) -> None:
        """Process one record until its outcome is committed (or left to another owner)."""
        self.emit.settings = self.settings
        with self.tracing.process(rec):  # the request's CONSUMER span, current throughout
            await self._handle(rec, sink)

    async def _handle(self, rec: RecordLike, sink: Sink) -> None:
        timings = Timings(received_at=time.time())
        back = rec.topic == self.settings.realtime_topic()
        if back:  # sent back to real time by the batch path: the request as the partner sent it
            try:
                _, rec = read_handoff(rec)
            except BadHandoff as exc:
                log.critical(
                    "record on the realtime topic without a readable handoff", extra={"error": str(exc)}
                )
                await sink.publish([])  # only the gateway writes that topic: nothing to answer
                return
        origin = Origin(rec.topic, rec.partition, rec.offset, rec.timestamp, rec.key, rec.value, rec.headers)
        with self.tracing.span("admission"):
            try:
                verdict = await self.admission.admit_checked(rec, verified=back)
            except (Draining, Revoked, Fenced, asyncio.CancelledError):
                raise
            except Exception as exc:  # noqa: BLE001 - logged by _fault; a bug must not stop the partition
                pid = self.admission.registry.partner_id_for_topic(rec.topic)
                rid = request_id_in(rec.value)  # so the partner can still match its dead letter
                dl = self._fault("admission", exc, origin, pid, rid)
                verdict = Rejected(pid, dl.reason, dl.detail, rid)
        self.tracing.annotate(
            partner=verdict.partner_id if isinstance(verdict, Rejected) else verdict.partner.id,
            request_id=verdict.request_id,
        )
        if isinstance(verdict, Rejected):
            dl = DeadLetter(verdict.partner_id, verdict.reason, verdict.detail, origin, verdict.request_id)
            await self.emit.dead_letter(sink, dl, model="")
            return
        pid = verdict.partner.id
        if self.pauses is not None and pid in self.pauses.holds:
            await self.pauses.wait(pid)  # held, not dead-lettered; cancelled on revocation or stop
        inherited = sink.inherited
        if inherited is not None and (
            verdict.partner.settings.on_unknown == "deadletter" or inherited.attempts >= MAX_CLAIMS
        ):
            self.metrics.unknown_outcomes.labels(pid, "owner_lost").inc()
            dl = owner_lost(verdict.partner.settings, inherited, origin, verdict.request_id, MAX_CLAIMS)
            await self.emit.dead_letter(sink, dl, model=verdict.model)
            return
        lookup = None
        if self.cache is not None and self.cache.enabled_for(pid):  # before any turn, reservation or claim
            with self.tracing.span("response_cache"):
                lookup = await self.cache.lookup(verdict)
            if lookup is not None and lookup.entry is not None:
                if await self._serve_cached(lookup, verdict, timings, origin, sink):
                    return
                lookup = replace(lookup, entry=None)  # unservable: a miss, whose answer replaces it
        if (
            not back
            and inherited is None
            and self.router.route(self.settings.batches, verdict.urgency, timings.received_at) == "batch"
        ):
            try:
                await self._to_batch(verdict, rec, sink, timings.received_at)
            except (Draining, Revoked, Fenced, asyncio.CancelledError):
                raise
            except Exception as exc:  # noqa: BLE001 - logged by _fault; a bug must not lose the request
                dl = self._fault("batch_handoff", exc, origin, pid, verdict.request_id)
                await self.emit.dead_letter(sink, dl, model=verdict.model)
            return
        self.metrics.batch.routed.labels(pid, "realtime").inc()
        try:
            outcome = await self._call(verdict, timings, sink)
        except (Draining, Revoked, Fenced, asyncio.CancelledError):
            raise  # not called, or left to the partition's next owner
        except Exception as exc:  # noqa: BLE001 - logged by _fault; a bug must not lose the request
            dl = self._fault("call", exc, origin, pid, verdict.request_id)
            await self.emit.dead_letter(sink, dl, model=verdict.model)
            return
        if isinstance(outcome, _Failed):
            f = outcome.failure
            if not outcome.unknown:
                await self.admission.release(outcome.adm)  # answered with an error: not billed
            await self.emit.dead_letter(
                sink,
                DeadLetter(
                    pid,
                    f.reason,
                    outcome.detail,
                    origin,
                    verdict.request_id,
                    outcome.attempts,
                    UpstreamInfo(f.status, f.error_type, f.error_code, f.request_id),
                    claim=outcome.claim,
                ),
                model=verdict.model,
            )
            return
        await self._respond(outcome, timings, origin, sink, lookup)

    def _fault(
        self, where: str, exc: Exception, origin: Origin, pid: str, request_id: str | None
    ) -> DeadLetter:
        """A fault of the gateway itself while handling a record (`where`: admission, batch_handoff,
        call, respond), logged with its traceback and counted: the record's `internal_error` dead
        letter, so the partition goes on past it. Call it from the `except` block."""
        at = {"topic": origin.topic, "partition": origin.partition, "offset": origin.offset}
        log.exception(f"unexpected error ({where})", extra={**at, "request_id": request_id, "partner": pid})
        self.metrics.internal_errors.labels(pid, where).inc()
        detail = f"gateway error: {type(exc).__name__}"
        return DeadLetter(pid, Reason.INTERNAL_ERROR, detail, origin, request_id)

    async def _to_batch(self, adm: Admitted, rec: RecordLike, sink: Sink, now: float) -> None:
        """Hand the request to the batch path: the pending record and this offset's finish
        are one transaction, so the input partition never waits for the batch."""
        pending = pending_message(self.settings.batches.pending_topic, adm, rec, now)
        await sink.publish([pending], linger=True)  # nobody waits on it: it shares a transaction
        self.metrics.batch.routed.labels(adm.partner.id, "batch").inc()
        self.tracing.outcome("batch")

    async def _dispatch(self, adm: Admitted, cost: Cost, sink: Sink) -> tuple[Grant, Admitted] | Rejected:
        """A fair turn, then the budget, then the claim: a request holds a reservation only
        once it is about to be called, so a crash strands no queued reservation."""
        pid = adm.partner.id
        while True:
            asked_ns = time.time_ns()
            grant = await self.scheduler.acquire(pid, cost)
            try:
                if adm.reservation is None:
                    reserved = await self.admission.reserve(adm)
                    if isinstance(reserved, Rejected):
                        self.scheduler.release(grant, NOT_CALLED)
                        return reserved
                    if isinstance(reserved, Deferred):
                        self.scheduler.release(grant, NOT_CALLED)  # hold no slot while waiting
                        await self.admission.wait_for_budget(reserved)
                        continue
                    adm = reserved
                if not sink.claimed:
                    await sink.claim(sink.attempts + 1)
            except BaseException:
                self.scheduler.release(grant, NOT_CALLED)
                if not sink.claimed:
                    await self.admission.release(adm)  # never called: nothing billed
                raise
            self.tracing.waits(asked_ns, grant.queue_wait_s, grant.limiter_wait_s, 1)
            return grant, adm

    async def _call(self, adm: Admitted, timings: Timings, sink: Sink) -> _Success | _Failed:
        pid = adm.partner.id
        cost = Cost(adm.est_input_tokens, adm.max_tokens, self.scheduler.model_class(adm.model))
        started = time.monotonic()
        attempt = 0
        m = self.metrics
        unknown_retry: dict[str, Any] | None = None
        if sink.inherited is not None:  # on_unknown: retry, after an owner died mid-call
            m.unknown_retries.labels(pid).inc()
            unknown_retry = {**previous_claim(claim_doc(sink.inherited)), "cause": "owner_lost"}
        while True:
            attempt += 1
            try:
                if sink.claimed and sink.handed_off:  # a retry on a partition gone elsewhere
                    raise Revoked(f"{adm.request_id} is left to its partition's next owner")
                dispatched = await self._dispatch(adm, cost, sink)
            except (Draining, Revoked):
                if sink.claimed:  # a retry, and every call under our claim was unbilled:
                    # the next owner calls it afresh rather than take its outcome for unknown
                    await sink.release()
                    await self.admission.release(adm)
                elif unknown_retry is not None:  # the extra call after an unknown outcome: the
                    sink.leave()  # next owner makes it, under the claim of the one that may be billed
                raise
            if isinstance(dispatched, Rejected):
                if unknown_retry is not None:  # the extra call refused: the first may be billed
                    m.unknown_outcomes.labels(pid, "extra_call_refused").inc()
                    detail = (
                        f"{unknown_retry['cause']} after the request was sent: it may have been "
                        f"billed; the extra call on_unknown: retry allows was refused: {dispatched.detail}"
                    )
                    claim = {
                        "claimed_at": utc_iso(time.time()),
                        "attempts": sink.attempts,
                        "owner": sink.owner,
                    }
                    f = Failure(False, Reason.OUTCOME_UNKNOWN, unknown_retry["cause"])
                    return _Failed(f, attempt - 1, detail, adm, unknown=True, claim=claim)
                return _Failed(
                    Failure(False, dispatched.reason, "budget"), attempt - 1, dispatched.detail, adm
                )
            grant, adm = dispatched
            timings.queue_s += grant.queue_wait_s + grant.limiter_wait_s
            m.queue_wait.labels(pid).observe(grant.queue_wait_s)
            m.limiter_wait.labels(pid).observe(grant.limiter_wait_s)
            m.in_flight.labels(pid).inc()
            span = self.tracing.attempt(attempt, adm.model, adm.max_tokens)
            call_started = time.perf_counter()
            try:
                with span:  # the SDK's CLIENT span becomes its child
                    result = await self.claude.create_message(
                        pid, adm.params, request_key=f"{pid}:{adm.request_id}"
                    )
                span.succeeded(200, result.body)
            except anthropic.AnthropicError as exc:
                elapsed = time.perf_counter() - call_started
                timings.upstream_s += elapsed
                failure = classify(exc)
                span.failed(failure)
                answered = isinstance(exc, anthropic.APIStatusError)
                over: str | None = None
                if isinstance(exc, anthropic.APIStatusError):
                    # answered: nothing billed for an error; the headers still tell the budget
                    self.scheduler.release(grant, Usage(0, 0))
                    self.scheduler.observe_headers(grant, exc.response.headers)
                    m.observe_ratelimit_headers(exc.response.headers)
                    if failure.rate_limited:  # bigger than the limit itself, or: pause the org pool
                        over = self.scheduler.over_limit(grant, exc.response.headers)  # or its key's scope
                        if over is None:
                            self.scheduler.rate_limited(grant, exc.response.headers, failure.retry_after_s)
                else:
                    self.scheduler.release(grant, None)  # maybe billed: keep the reservation
                m.upstream_latency.labels(pid, adm.model).observe(elapsed)
                code = str(failure.status or "none")
                m.upstream_calls.labels(pid, status_class(failure.status), code).inc()
                if failure.status == 429:
                    m.upstream_429.inc()
                if over is not None:  # no wait helps: the request itself must change
                    span.decided("fail")
                    f = Failure(False, Reason.OVER_RATE_LIMIT, "over_rate_limit", 429, failure.error_type)
                    return _Failed(f, attempt, f"{over}; lower it, or raise the limit", adm)
                if not answered and may_have_been_sent(exc):
                    # it may have reached Claude and been billed: the partner's policy decides
                    if adm.partner.settings.on_unknown == "deadletter" or unknown_retry is not None:
                        span.decided("fail")
                        m.unknown_outcomes.labels(pid, failure.label).inc()
                        detail = (
                            f"{failure.label} after the request was sent: it may have been billed; "
                            f"partners[{pid}].on_unknown is {adm.partner.settings.on_unknown}"
                            + ("" if unknown_retry is None else " and its one extra call was used")
                        )
                        claim = {
                            "claimed_at": utc_iso(time.time()),
                            "attempts": sink.attempts,
                            "owner": sink.owner,
                        }
                        f = Failure(False, Reason.OUTCOME_UNKNOWN, failure.label)
                        return _Failed(f, attempt, detail, adm, unknown=True, claim=claim)
                    m.unknown_retries.labels(pid).inc()
                    unknown_retry = {"cause": failure.label, "previous_attempts": attempt}
                    sink.claimed = False  # the extra call is claimed anew: a crash during it ends the retries
                    # the call that may be billed keeps its reservation (as an unknown outcome's
                    # does): the extra call reserves its own, settled to what it costs
                    adm = replace(adm, reservation=None)
                if not failure.retryable:
                    span.decided("fail")
                    return _Failed(failure, attempt, describe(failure, exc), adm, unknown=not answered)
                delay = self.retry.delay_s(attempt, failure.retry_after_s)
                if not self.retry.should_retry(attempt, time.monotonic() - started, delay):
                    span.decided("give_up")
                    detail = f"gave up after {attempt} attempts; last: {describe(failure, exc)}"
                    return _Failed(failure, attempt, detail, adm, unknown=not answered)
                span.decided("retry", delay)
                m.retries.labels(pid, failure.label).inc()
                await sink.backoff(delay)
                continue
            except InvalidParams as exc:  # the SDK refused the content before sending: the partner's
                span.decided("fail")
                self.scheduler.release(grant, NOT_CALLED)
                detail = f"the anthropic SDK refused the request's params: {exc}"
                return _Failed(exc.failure(), attempt, detail, adm)
            except UnknownPartnerKey:
                span.decided("fail")
                self.scheduler.release(grant, NOT_CALLED)
                return _Failed(
                    Failure(False, Reason.UPSTREAM_AUTHENTICATION, "no_key"),
                    attempt,
                    f"no Anthropic key is loaded for partner {pid!r}",
                    adm,
                )
            except BaseException:  # not the SDK's (a non-JSON 200 body, cancellation): maybe billed
                self.scheduler.release(grant, None)
                raise
            finally:
                m.in_flight.labels(pid).dec()
                span.end()
            timings.upstream_s += result.elapsed_s
            b = billed(usage_of(result.body))
            # ITPM: cache reads are free
            self.scheduler.release(grant, Usage(b.input + b.cache_write, b.output))
            self.scheduler.observe_headers(grant, result.headers)
            m.observe_ratelimit_headers(result.headers)
            m.upstream_latency.labels(pid, adm.model).observe(result.elapsed_s)
            m.upstream_calls.labels(pid, "2xx", "200").inc()
            return _Success(result, attempt, adm, unknown_retry)

    async def _serve_cached(
        self, hit: Lookup, adm: Admitted, timings: Timings, origin: Origin, sink: Sink
    ) -> bool:
        """Publish a cached answer: no turn, grant, reservation, claim or call, nothing billed.
        The one place a request is answered from the cache. False, with nothing published, when
        the entry cannot be served (the caller then takes it for a miss); True once the request
        has its outcome."""
        assert hit.entry is not None
        pid, body = adm.partner.id, hit.entry.message
        try:
            cost = unbilled(price_version(self.settings))  # a zero-cost metering record, served_by cache
            value = cached_response(hit.entry, adm, timings, origin.timestamp_ms, cost.doc())
            usage = dict(usage_of(body))
            metered = Metered(pid, adm.request_id, adm.model, usage, cost, origin, "cache", None, 0)
        except Exception:  # an entry that is not an answer (Redis' contents): a miss, never a crash
            log.exception("response cache hit unservable: a miss", extra={"partner": pid})
            self.metrics.internal_errors.labels(pid, "response_cache").inc()
            return False
        published = await self.emit.response(
            sink, pid, adm.request_id, value, origin, body=body, attempts=0, metered=metered
        )
        if not published:
            return True  # a dead letter in its place (too large): the request's outcome
        served_s = max(0.0, time.time() - timings.received_at)
        self.metrics.response_cache_hit_latency.labels(pid).observe(served_s)
        self.metrics.requests.labels(pid, adm.model, "response").inc()
        self.emit.observe_e2e(pid, origin)
        self.tracing.annotate(cached=True)
        self.tracing.outcome("response")
        return True

    async def _respond(
        self, ok: _Success, timings: Timings, origin: Origin, sink: Sink, lookup: Lookup | None = None
    ) -> None:
        adm = ok.adm
        pid = adm.partner.id
        body = ok.result.body
        usage = usage_of(body)
        # one quote for the response's `cost`, the metering record, the budget and the metric
        cost = quote(self.settings.models.get(adm.model), usage, price_version=price_version(self.settings))
        await self.admission.settle(adm, cost.amount)  # billed, whether or not published
        completed_at = time.time()
        self.metrics.billed(pid, adm.model, cost)  # billed, whether or not published
        metered = Metered(
            pid,
            adm.request_id,
            adm.model,
            usage,
            cost,
            origin,
            "realtime",
            ok.result.request_id,
            ok.attempts,
            billed_at=completed_at,
        )
        try:
            value = encode_response(
                partner=pid,
                request_id=adm.request_id,
                message_body=body,
                attempts=ok.attempts,
                upstream_request_id=ok.result.request_id,
                timings=timings,
                completed_at=completed_at,
                request_timestamp_ms=origin.timestamp_ms,
                metadata=adm.metadata,
                unknown_retry=ok.unknown_retry,
                cost=cost.doc(),
            )
        except Exception as exc:  # noqa: BLE001 - logged by _fault; billed: dead-lettered with its metering
            dl = self._fault("respond", exc, origin, pid, adm.request_id)
            await self.emit.dead_letter(sink, dl, model=adm.model, metered=metered)
            return
        published = await self.emit.response(
            sink, pid, adm.request_id, value, origin, body=body, attempts=ok.attempts, metered=metered
        )
        if not published:
            return  # a dead letter now (too large, say): not an answer to cache
        if lookup is not None and self.cache is not None:
            await self.cache.store(lookup, body, ok.result.request_id)
        self.metrics.requests.labels(pid, adm.model, "response").inc()
        self.emit.observe_e2e(pid, origin)
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


def usage_of(body: Mapping[str, Any]) -> Mapping[str, Any]:
    """The answer's `usage` object; `{}` when it is missing or not an object (a hostile or
    broken upstream): priced as nothing, never a crash after the call was billed."""
    usage = body.get("usage")
    return usage if isinstance(usage, Mapping) else {}


def _origin_ctx(origin: Origin) -> dict[str, Any]:
    return {"topic": origin.topic, "partition": origin.partition, "offset": origin.offset}


def _log_ctx(rec: RecordLike, request_id: str | None) -> dict[str, Any]:
    return {"topic": rec.topic, "partition": rec.partition, "offset": rec.offset, "request_id": request_id}
