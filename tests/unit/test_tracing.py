"""Tracing without a broker: the OTEL_* environment, Kafka header carriers, the span API."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased
from opentelemetry.trace import SpanKind, StatusCode

from service.admission.admit import Record
from service.contracts.reasons import Reason
from service.telemetry.tracing import (
    Tracing,
    TracingConfigError,
    forwarded_headers,
    provider_from_env,
    shutdown_provider,
)
from service.upstream.errors import Failure
from tests.support.semconv import assert_semconv, problems

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def tracing(exporter: InMemorySpanExporter) -> Iterator[Tracing]:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield Tracing(provider, consumer_group="gw")
    provider.shutdown()


def _record(headers: list[tuple[str, bytes]] | None = None) -> Record:
    return Record("claude.requests.acme", 2, 41, 1_700_000_000_000, b"req-1", b"{}", tuple(headers or ()))


def _by_name(spans: tuple[ReadableSpan, ...]) -> dict[str, ReadableSpan]:
    return {s.name: s for s in spans}


# -- the environment ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"OTEL_TRACES_EXPORTER": "none"},
        {"OTEL_TRACES_EXPORTER": "console", "OTEL_SDK_DISABLED": "true"},
        {"OTEL_SERVICE_NAME": "x", "OTEL_TRACES_SAMPLER": "always_on"},  # no exporter named
    ],
)
def test_no_exporter_means_no_provider(env: dict[str, str]) -> None:
    assert provider_from_env(env) is None


def test_console_exporter_and_service_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES", raising=False)
    provider = provider_from_env({"OTEL_TRACES_EXPORTER": "console"})
    assert isinstance(provider, TracerProvider)
    try:
        assert provider.resource.attributes["service.name"] == "claude-gateway"
        processors = provider._active_span_processor._span_processors
        assert len(processors) == 1
        assert isinstance(processors[0], BatchSpanProcessor)
        assert isinstance(processors[0].span_exporter, ConsoleSpanExporter)
    finally:
        shutdown_provider(provider)


def test_otlp_endpoint_alone_enables_otlp_and_the_sdk_reads_the_sampler(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "parentbased_traceidratio")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0.25")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "gw-eu")
    provider = provider_from_env(
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318", "OTEL_SERVICE_NAME": "gw-eu"}
    )
    assert isinstance(provider, TracerProvider)
    try:
        assert provider.resource.attributes["service.name"] == "gw-eu"
        assert isinstance(provider.sampler, ParentBased)
        assert "0.25" in provider.sampler.get_description()
        exporter = provider._active_span_processor._span_processors[0].span_exporter  # type: ignore[attr-defined]
        assert isinstance(exporter, OTLPSpanExporter)
    finally:
        shutdown_provider(provider)


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({"OTEL_TRACES_EXPORTER": "zipkin"}, "OTEL_TRACES_EXPORTER"),
        (
            {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
            "OTEL_EXPORTER_OTLP_PROTOCOL",
        ),
    ],
)
def test_unusable_settings_are_refused_naming_the_variable(env: dict[str, str], names: str) -> None:
    with pytest.raises(TracingConfigError, match=names):
        provider_from_env(env)


# -- disabled: nothing but forwarding ------------------------------------------------------


async def test_disabled_tracing_makes_no_span_and_forwards_the_request_context() -> None:
    tracing = Tracing(None)
    assert not tracing.enabled
    assert tracing.sdk_option() is False
    rec = _record([("traceparent", TRACEPARENT.encode()), ("tracestate", b"v=1"), ("x-sig", b"s")])
    with tracing.process(rec) as span:
        assert span is None
        tracing.annotate(partner="acme")
        tracing.waits(0, 1.0, 1.0, 1)
        attempt = tracing.attempt(1, "m", 5)
        with attempt:
            pass
        attempt.end()
        with tracing.produce("claude.responses.acme", b"k", rec.headers) as headers:
            assert headers == (("traceparent", TRACEPARENT.encode()), ("tracestate", b"v=1"))


def test_forwarded_headers_skip_null_values_and_others() -> None:
    assert forwarded_headers(()) == ()
    assert forwarded_headers([("traceparent", None), ("signature", b"x")]) == ()


# -- enabled: the span tree ----------------------------------------------------------------


async def test_process_span_continues_the_producer_trace(
    tracing: Tracing, exporter: InMemorySpanExporter
) -> None:
    rec = _record([("traceparent", TRACEPARENT.encode())])
    with tracing.process(rec):
        tracing.annotate(partner="acme", request_id="req-1", missing=None)
        with tracing.span("admission"):
            pass
        tracing.waits(1_000_000_000, 0.25, 0.5, 1)
        attempt = tracing.attempt(1, "claude-haiku-4-5", 32)
        with attempt:
            await asyncio.sleep(0)
        attempt.failed(
            Failure(True, Reason.RETRIES_EXHAUSTED, "overloaded", status=529, error_type="overloaded_error")
        )
        attempt.decided("retry", 0.5)
        attempt.end()
        attempt.end()  # twice is harmless
        ok = tracing.attempt(2, "claude-haiku-4-5", 32)
        ok.succeeded(200, {"stop_reason": "end_turn"})
        ok.end()
        with tracing.produce("claude.responses.acme", b"req-1", rec.headers) as headers:
            produced = dict(headers)
        tracing.outcome("response")
    spans = exporter.get_finished_spans()
    names = [s.name for s in spans]
    assert names.count("upstream attempt") == 2
    by = _by_name(spans)
    process = by["process claude.requests.acme"]
    assert process.kind is SpanKind.CONSUMER
    assert process.parent is not None
    assert process.parent.is_remote
    assert format(process.parent.span_id, "016x") == PARENT_ID
    assert format(process.context.trace_id, "032x") == TRACE_ID
    assert dict(process.attributes or {}) == {
        "messaging.system": "kafka",
        "messaging.operation.type": "process",
        "messaging.operation.name": "process",
        "messaging.destination.name": "claude.requests.acme",
        "messaging.destination.partition.id": "2",
        "messaging.kafka.offset": 41,
        "messaging.consumer.group.name": "gw",
        "messaging.kafka.message.key": "req-1",
        "messaging.message.body.size": 2,
        "gateway.partner": "acme",
        "gateway.request_id": "req-1",
        "gateway.outcome": "response",
    }
    for s in spans:
        if s is not process:
            assert s.parent is not None, s.name
            assert s.parent.span_id == process.context.span_id, s.name
            assert s.context.trace_id == process.context.trace_id
    queue, limiter = by["queue wait"], by["limiter wait"]
    assert (queue.start_time, queue.end_time) == (1_000_000_000, 1_250_000_000)
    assert (limiter.start_time, limiter.end_time) == (1_250_000_000, 1_750_000_000)
    first, second = [s for s in spans if s.name == "upstream attempt"]
    assert first.attributes is not None
    assert second.attributes is not None
    assert first.attributes["gateway.attempt"] == 1
    assert first.attributes["gateway.retry.decision"] == "retry"
    assert first.attributes["http.response.status_code"] == 529
    assert first.attributes["error.type"] == "overloaded_error"
    assert first.status.status_code is StatusCode.ERROR
    assert second.attributes["gateway.retry.decision"] == "none"
    assert second.attributes["gateway.stop_reason"] == "end_turn"
    assert not any(k.startswith("gen_ai.") for k in second.attributes)  # on the SDK's CLIENT span
    send = by["send claude.responses.acme"]
    assert send.kind is SpanKind.PRODUCER
    assert produced["traceparent"] == f"00-{TRACE_ID}-{format(send.context.span_id, '016x')}-01".encode()


async def test_without_a_traceparent_a_new_trace_starts(
    tracing: Tracing, exporter: InMemorySpanExporter
) -> None:
    with tracing.process(_record()):
        tracing.outcome("deadletter", "malformed_json")
    (span,) = exporter.get_finished_spans()
    assert span.parent is None
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes is not None
    assert span.attributes["gateway.deadletter.reason"] == "malformed_json"


async def test_a_garbled_traceparent_is_ignored(tracing: Tracing, exporter: InMemorySpanExporter) -> None:
    with tracing.process(_record([("traceparent", b"\xff\xfegarbage"), ("traceparent", None)])):  # type: ignore[list-item]
        pass
    (span,) = exporter.get_finished_spans()
    assert span.parent is None


def test_the_sdk_gets_our_provider(tracing: Tracing) -> None:
    option = tracing.sdk_option()
    assert option is not False
    assert option is not None
    assert option["tracer_provider"] is tracing.provider


async def test_an_unsampled_request_makes_no_child_spans_but_passes_its_trace_on(
    tracing: Tracing, exporter: InMemorySpanExporter
) -> None:
    unsampled = f"00-{TRACE_ID}-{PARENT_ID}-00"
    rec = _record([("traceparent", unsampled.encode())])
    with tracing.process(rec) as span:
        assert span is not None
        assert not span.is_recording()
        with tracing.span("admission") as child:
            assert child is None
        tracing.waits(0, 0.1, 0.1, 1)
        attempt = tracing.attempt(1, "m", 5)
        attempt.end()
        with tracing.produce("claude.responses.acme", b"k", rec.headers) as headers:
            (traceparent,) = (v for k, v in headers if k == "traceparent")
    assert exporter.get_finished_spans() == ()
    version, trace_id, _, flags = traceparent.decode().split("-")
    assert (version, trace_id, flags) == ("00", TRACE_ID, "00")


async def test_span_attributes_are_current_semantic_conventions(
    tracing: Tracing, exporter: InMemorySpanExporter
) -> None:
    """Every attribute name is the gateway's own or a current name of the installed
    opentelemetry-semantic-conventions package, on the span kind the conventions give it."""
    rec = _record([("traceparent", TRACEPARENT.encode())])
    with tracing.process(rec):
        tracing.annotate(partner="acme", request_id="req-1")
        attempt = tracing.attempt(1, "claude-haiku-4-5", 32)
        attempt.failed(
            Failure(True, Reason.RETRIES_EXHAUSTED, "overloaded", status=529, error_type="overloaded")
        )
        attempt.end()
        ok = tracing.attempt(2, "claude-haiku-4-5", 32)
        ok.succeeded(200, {"stop_reason": "end_turn"})
        ok.end()
        with tracing.produce("claude.responses.acme", b"req-1", rec.headers):
            pass
        tracing.outcome("deadletter", "retries_exhausted")
    spans = exporter.get_finished_spans()
    assert len(spans) == 4
    assert_semconv(spans)
    # the checker itself: a deprecated name and a GenAI attribute on an INTERNAL span are caught
    with tracing.process(rec):
        bad = tracing.attempt(3, "claude-haiku-4-5", 32)
        assert bad._span is not None
        bad._span.set_attribute("messaging.kafka.message.offset", 1)
        bad._span.set_attribute("gen_ai.operation.name", "chat")
        bad.end()
    found = problems([s for s in exporter.get_finished_spans() if s.name == "upstream attempt"][-1:])
    assert found == [
        "upstream attempt: messaging.kafka.message.offset is deprecated",
        "upstream attempt: gen_ai.operation.name on a INTERNAL span (GenAI belongs on CLIENT)",
    ]
