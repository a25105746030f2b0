"""A metering record for every billed call, in the same `sink.publish` as the call's outcome.

A partition writer publishes one `publish([...])` list and finishes the request's offset in one
Kafka transaction (service/ingest/partition.py), so "in the same list" is "exactly once with
the outcome". Every path of `Emitter` that publishes a billed call's outcome is covered: the
response; the response refused for size (a `response_too_large` dead letter); the dead letter
cut down; quarantine; and the usage topic refusing the record (the outcome still goes out).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import httpx2
import orjson
import pytest
from aiokafka.errors import KafkaError, MessageSizeTooLargeError, TopicAuthorizationFailedError

from service.admission.admit import Admission
from service.admission.pricing import price_version, quote, unbilled
from service.admission.registry import Registry
from service.config.loader import parse_config
from service.config.settings import GatewaySettings
from service.contracts.outcomes import DeadLetter, Origin
from service.contracts.reasons import Reason
from service.contracts.schemas import validate
from service.egress.emit import Emitter
from service.egress.metering import Metered, metering_message
from service.ingest.sending import OutMessage
from service.pipeline import Pipeline
from service.scheduling.scheduler import Scheduler
from service.telemetry.metrics import Metrics
from service.telemetry.tracing import Tracing
from service.topics import wanted
from service.upstream.client import ClaudeClient
from tests.support.answers import answer, request_record
from tests.support.sink import MemorySink

USAGE_TOPIC = "t.usage"
ORIGIN = Origin("claude.requests.acme", 2, 41, 1_700_000_000_000, b"r1", b'{"request_id": "r1"}')
USAGE = {
    "input_tokens": 100,
    "output_tokens": 20,
    "cache_read_input_tokens": 4000,
    "cache_creation_input_tokens": 1500,
    "cache_creation": {"ephemeral_5m_input_tokens": 500, "ephemeral_1h_input_tokens": 1000},
    "service_tier": "standard",
}
Refuse = Callable[[list[OutMessage]], KafkaError | None]


class Sink(MemorySink):
    """Records each `publish` list (one transaction each); `refuse` may fail one, as a broker would."""

    def __init__(self, refuse: Refuse | None = None) -> None:
        super().__init__(ORIGIN.offset)
        self.refuse = refuse
        self.tried: list[list[OutMessage]] = []
        self.committed: list[list[OutMessage]] = []

    async def publish(self, messages: list[OutMessage], *, linger: bool = False) -> None:
        self.tried.append(list(messages))
        error = self.refuse(messages) if self.refuse is not None else None
        if error is not None:
            raise error
        self.committed.append(list(messages))


def _settings() -> GatewaySettings:
    return parse_config(
        {
            "kafka": {"usage_topic": USAGE_TOPIC},
            "retry": {"max_attempts": 2, "base_delay_s": 0.001, "max_delay_s": 0.001},
            "partners": [{"id": "acme", "api_key": {"env": "K"}}],
        }
    )


def _metered(settings: GatewaySettings) -> Metered:
    cost = quote(settings.models["claude-haiku-4-5"], USAGE, price_version=price_version(settings))
    return Metered(
        "acme", "r1", "claude-haiku-4-5", USAGE, cost, ORIGIN, "realtime", "req_1", 1, 1_700_000_001.0
    )


def _emitter() -> tuple[Emitter, Metrics, Metered]:
    settings, metrics = _settings(), Metrics()
    return Emitter(settings, metrics, Tracing()), metrics, _metered(settings)


def _doc(message: OutMessage) -> dict[str, Any]:
    doc: dict[str, Any] = orjson.loads(message.value)
    return doc


def _topics(messages: list[OutMessage]) -> list[str]:
    return [m.topic.split(".")[1] if m.topic != USAGE_TOPIC else "usage" for m in messages]


def _record(messages: list[OutMessage]) -> dict[str, Any]:
    (record,) = [m for m in messages if m.topic == USAGE_TOPIC]
    assert record.key == b"acme"
    doc = _doc(record)
    validate("usage", doc)
    return doc


def _refusing(topic_part: str, error: Callable[[], KafkaError], times: int = 1_000) -> Refuse:
    left = [times]

    def refuse(messages: list[OutMessage]) -> KafkaError | None:
        if left[0] > 0 and any(topic_part in m.topic for m in messages):
            left[0] -= 1
            return error()
        return None

    return refuse


async def test_a_response_goes_out_with_its_metering_record_in_one_transaction() -> None:
    emit, _, metered = _emitter()
    sink = Sink()
    assert await emit.response(sink, "acme", "r1", b"{}", ORIGIN, body={}, attempts=1, metered=metered)
    (published,) = sink.committed
    assert _topics(published) == ["responses", "usage"]
    record = _record(published)
    assert record["outcome"] == "response"
    assert record["outcome_reason"] is None
    assert record["cost"] == metered.cost.doc()
    assert record["origin"] == {"topic": ORIGIN.topic, "partition": 2, "offset": 41}
    assert (record["served_by"], record["upstream_request_id"], record["attempts"]) == (
        "realtime",
        "req_1",
        1,
    )
    assert record["billed_at"] == "2023-11-14T22:13:21.000Z"


async def test_a_response_refused_for_size_becomes_a_dead_letter_with_the_record() -> None:
    emit, _, metered = _emitter()
    sink = Sink(_refusing(".responses.", MessageSizeTooLargeError))
    body = {"model": "claude-haiku-4-5", "usage": USAGE}
    published = await emit.response(
        sink, "acme", "r1", b"x" * 100, ORIGIN, body=body, attempts=1, metered=metered
    )
    assert not published
    assert [_topics(t) for t in sink.tried] == [["responses", "usage"], ["deadletter", "usage"]]
    (committed,) = sink.committed
    record = _record(committed)
    assert (record["outcome"], record["outcome_reason"]) == ("deadletter", "response_too_large")
    assert record["cost"] == metered.cost.doc()


async def test_a_dead_letter_cut_down_keeps_its_record() -> None:
    emit, _, metered = _emitter()
    sink = Sink(_refusing(".deadletter.", MessageSizeTooLargeError, times=2))
    dl = DeadLetter("acme", Reason.RESPONSE_TOO_LARGE, "big", ORIGIN, "r1", 1)
    await emit.dead_letter(sink, dl, model="claude-haiku-4-5", metered=metered)
    assert len(sink.tried) == 3
    (committed,) = sink.committed
    assert _topics(committed) == ["deadletter", "usage"]
    assert _record(committed)["outcome_reason"] == "response_too_large"


async def test_a_quarantined_billed_call_still_publishes_its_record() -> None:
    emit, metrics, metered = _emitter()
    sink = Sink(_refusing(".deadletter.", TopicAuthorizationFailedError))
    dl = DeadLetter("acme", Reason.RESPONSE_TOO_LARGE, "big", ORIGIN, "r1", 1)
    await emit.dead_letter(sink, dl, model="claude-haiku-4-5", metered=metered)
    (committed,) = sink.committed
    assert _topics(committed) == ["usage"]  # finishes the offset, and bills the call
    record = _record(committed)
    assert (record["outcome"], record["outcome_reason"]) == ("quarantined", "response_too_large")
    assert metrics.quarantined.labels("acme")._value.get() == 1
    assert metrics.metering_lost.labels("acme")._value.get() == 0


async def test_a_refused_usage_topic_never_costs_the_partner_its_response(
    caplog: pytest.LogCaptureFixture,
) -> None:
    emit, metrics, metered = _emitter()
    sink = Sink(_refusing(USAGE_TOPIC, TopicAuthorizationFailedError))
    with caplog.at_level(logging.CRITICAL, logger="service.egress.emit"):
        assert await emit.response(sink, "acme", "r1", b"{}", ORIGIN, body={}, attempts=1, metered=metered)
    (committed,) = sink.committed
    assert _topics(committed) == ["responses"]
    assert metrics.metering_lost.labels("acme")._value.get() == 1
    (line,) = [r for r in caplog.records if "metering record could not be published" in r.getMessage()]
    assert orjson.loads(line.record)["cost"] == metered.cost.doc()  # type: ignore[attr-defined]


async def test_quarantine_with_the_usage_topic_refused_too_finishes_with_nothing() -> None:
    emit, metrics, metered = _emitter()
    sink = Sink(lambda messages: TopicAuthorizationFailedError() if messages else None)
    dl = DeadLetter("acme", Reason.INTERNAL_ERROR, "x", ORIGIN, "r1", 1)
    await emit.dead_letter(sink, dl, model="claude-haiku-4-5", metered=metered)
    assert sink.committed == [[]]
    assert metrics.quarantined.labels("acme")._value.get() == 1
    assert metrics.metering_lost.labels("acme")._value.get() == 1


async def test_a_dead_letter_of_no_billed_call_has_no_record() -> None:
    emit, _, _ = _emitter()
    sink = Sink()
    await emit.dead_letter(sink, DeadLetter("acme", Reason.SCHEMA_VIOLATION, "x", ORIGIN), model="")
    assert [_topics(t) for t in sink.committed] == [["deadletter"]]


def test_the_builder_serves_the_cache_and_the_batch_paths_too() -> None:
    settings = _settings()
    version = price_version(settings)
    hit = Metered("acme", "r1", "claude-haiku-4-5", USAGE, unbilled(version), ORIGIN, served_by="cache")
    record = _doc(metering_message(USAGE_TOPIC, hit))
    validate("usage", record)
    assert (record["served_by"], record["cost"]["nano_usd"], record["cost"]["reason"]) == (
        "cache",
        0,
        "cache_hit",
    )
    batch_cost = quote(
        settings.models["claude-haiku-4-5"],
        {"input_tokens": 1000},
        price_version=version,
        service_tier="batch",
    )
    batch = Metered(
        "acme", "r2", "claude-haiku-4-5", {"input_tokens": 1000}, batch_cost, ORIGIN, served_by="batch"
    )
    record = _doc(metering_message(USAGE_TOPIC, batch, "deadletter", "response_too_large"))
    validate("usage", record)
    assert (record["served_by"], record["cost"]["nano_usd"]) == ("batch", 500_000)


# -- through the pipeline ----------------------------------------------------------------


def _pipeline(answer: dict[str, Any]) -> tuple[Pipeline, Metrics]:
    settings = _settings()
    registry = Registry.build(settings, environ={"K": "sk-acme"})

    def handler(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(200, json=answer, headers={"request-id": "req_up"})

    claude = ClaudeClient(
        settings.anthropic, http_client=httpx2.AsyncClient(transport=httpx2.MockTransport(handler))
    )
    claude.sync_keys(registry.api_keys())
    metrics = Metrics()
    return Pipeline(settings, Admission(registry), Scheduler(settings), claude, metrics), metrics


async def test_the_pipeline_prices_once_for_the_response_the_record_and_the_metric() -> None:
    pipeline, metrics = _pipeline(answer(USAGE))
    sink = Sink()
    await pipeline.handle(request_record(), sink)
    (published,) = sink.committed
    assert _topics(published) == ["responses", "usage"]
    response, record = _doc(published[0]), _record(published)
    validate("response", response)
    assert response["cost"] == record["cost"]
    assert record["upstream_request_id"] == "req_up"
    assert record["origin"] == {"topic": "claude.requests.acme", "partition": 0, "offset": 7}
    nano = 100 * 1_000 + 20 * 5_000 + 4000 * 100 + 500 * 1_250 + 1000 * 2_000
    assert response["cost"]["nano_usd"] == nano
    assert metrics.cost.labels("acme", "claude-haiku-4-5")._value.get() == pytest.approx(
        nano / 1e9, abs=1e-15
    )


def test_topics_ensure_creates_the_usage_topic_once() -> None:
    settings = parse_config(
        {
            "kafka": {"usage_topic": USAGE_TOPIC},
            "partners": [{"id": p, "api_key": {"env": "K"}} for p in ("acme", "globex")],
        }
    )
    topics = wanted(settings, 3, 1, deadletter_retention_days=30, usage_retention_days=7)
    usage = [t for t in topics if t.name == USAGE_TOPIC]
    assert len(usage) == 1
    assert usage[0].topic_configs == {"retention.ms": str(7 * 86_400_000)}
    assert len(topics) == 2 * 3 + 1


def test_end_to_end_latency_skips_records_that_carry_no_time() -> None:
    """A record timestamped 0 or -1 (converted from the old message format, or a producer that
    sets none) or far ahead of this clock tells no latency: observing it would put ~1.8e9 s in
    the histogram (and fire `ClaudeGatewayEndToEndLatencyHigh`) or hide the wait as 0."""
    emitter, metrics, _ = _emitter()

    def origin(ts: int | None) -> Origin:
        return Origin("claude.requests.acme", 0, 0, ts, None, b"{}")

    now_ms = int(time.time() * 1000)
    for ts in (None, 0, -1, now_ms + 3_600_000):
        emitter.observe_e2e("acme", origin(ts))
    count = "gateway_end_to_end_latency_seconds_count"
    assert metrics.registry.get_sample_value(count, {"partner": "acme"}) in (None, 0.0)
    emitter.observe_e2e("acme", origin(now_ms - 2_000))
    emitter.observe_e2e("acme", origin(now_ms + 1_000))  # a little clock skew: counted as 0
    assert metrics.registry.get_sample_value(count, {"partner": "acme"}) == 2
    total = metrics.registry.get_sample_value("gateway_end_to_end_latency_seconds_sum", {"partner": "acme"})
    assert total is not None
    assert 2.0 <= total < 10.0
