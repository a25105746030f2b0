"""OpenTelemetry traces: one CONSUMER span per request, its children, W3C context in Kafka headers.

The spans of one request (messaging and GenAI semantic conventions; every attribute name
comes from the installed `opentelemetry-semantic-conventions` package, never a
deprecated one, or is the gateway's own `gateway.*`):

    process claude.requests.acme         CONSUMER; parent: the `traceparent` of the request
    ├── admission                        INTERNAL
    ├── queue wait                       INTERNAL; per attempt, from `Grant.queue_wait_s`
    ├── limiter wait                     INTERNAL; per attempt, from `Grant.limiter_wait_s`
    ├── upstream attempt                 INTERNAL; attempt number, status, retry decision,
    │   │                                gateway.stop_reason (the SDK's span lacks finish_reasons)
    │   └── anthropic.messages.create    CLIENT, made by the anthropic SDK: gen_ai.provider.name,
    │                                    gen_ai.operation.name, gen_ai.request.model/max_tokens,
    │                                    gen_ai.response.id, gen_ai.usage.input/output_tokens
    └── send claude.responses.acme       PRODUCER; its context goes into the outcome's headers

Without a tracer provider (`Tracing(None)`) no span is made and nothing of the
OpenTelemetry SDK runs per message: the request's `traceparent`/`tracestate`
are copied to its outcome, so downstream consumers still join the partner's
trace. The anthropic SDK then gets `open_telemetry=False`.

Trace context comes from the partner, so it is bounded before it is used or copied, with
tracing on or off (`service.telemetry.tracecontext`); any other context header a
propagator asks for (baggage, ...) is read only up to 8 KiB, W3C baggage's own bound.

`provider_from_env` builds the SDK provider from the standard `OTEL_*`
variables. Unlike the OpenTelemetry default (`otlp`), no variable at all
means no tracing: tracing is opt-in, because it costs CPU per message.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any, Final

import anthropic
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.propagators.textmap import Getter
from opentelemetry.semconv._incubating.attributes import messaging_attributes as msg
from opentelemetry.semconv.attributes import error_attributes, http_attributes
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer, TracerProvider

from service.telemetry.tracecontext import (
    OTHER_CONTEXT_MAX_BYTES,
    TRACE_HEADERS,
    Headers,
    named_values,
    trace_context,
)

if TYPE_CHECKING:
    from service.admission.admit import RecordLike
    from service.upstream.errors import Failure

log = logging.getLogger(__name__)

SCOPE = "claude-partner-gateway"
SERVICE_NAME = "claude-gateway"


class TracingConfigError(ValueError):
    """The OTEL_* environment asks for something this service cannot do; the message names the variable."""


# -- the provider, from the standard environment -------------------------------------------


def provider_from_env(environ: Mapping[str, str]) -> TracerProvider | None:
    """An SDK `TracerProvider` as the `OTEL_*` variables describe it, or None for no tracing.

    Read here: `OTEL_SDK_DISABLED`, `OTEL_TRACES_EXPORTER` (`otlp`, `console`, `none`, comma
    separated), `OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT` (implies `otlp` when no exporter is named),
    `OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL` (only `http/protobuf` is installed). The SDK itself reads
    the rest: `OTEL_TRACES_SAMPLER[_ARG]`, `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`,
    `OTEL_EXPORTER_OTLP_*` (headers, timeout, certificates) and `OTEL_BSP_*`.
    """
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    names = [n.strip().lower() for n in environ.get("OTEL_TRACES_EXPORTER", "").split(",") if n.strip()]
    if not names and (
        environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    ):
        names = ["otlp"]
    names = [n for n in names if n != "none"]
    if not names:
        return None

    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

    exporters: list[SpanExporter] = []
    for name in names:
        if name == "otlp":
            protocol = (
                environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
                or "http/protobuf"
            ).strip()
            if protocol != "http/protobuf":
                raise TracingConfigError(
                    f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r}: only 'http/protobuf' is installed "
                    "(opentelemetry-exporter-otlp-proto-http)"
                )
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporters.append(OTLPSpanExporter())
        elif name == "console":
            exporters.append(ConsoleSpanExporter())
        else:
            raise TracingConfigError(
                f"OTEL_TRACES_EXPORTER: unknown exporter {name!r} (use otlp, console or none)"
            )
    named = "OTEL_SERVICE_NAME" in environ or "service.name" in environ.get("OTEL_RESOURCE_ATTRIBUTES", "")
    resource = Resource.create({} if named else {"service.name": SERVICE_NAME})
    provider = SdkTracerProvider(resource=resource)  # sampler: OTEL_TRACES_SAMPLER, read by the SDK
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    log.info("tracing enabled", extra={"exporters": ",".join(names)})
    return provider


def shutdown_provider(provider: TracerProvider | None) -> None:
    """Flush and stop an SDK provider (a no-op for providers without `shutdown`)."""
    shutdown = getattr(provider, "shutdown", None)
    if callable(shutdown):
        shutdown()


# -- Kafka headers as a carrier ------------------------------------------------------------


class _KafkaHeaders(Getter[Headers]):
    """Kafka headers as the propagators read them, bounded like `trace_context`."""

    def get(self, carrier: Headers, key: str) -> list[str] | None:
        key = key.lower()
        if key in TRACE_HEADERS:
            found = [v.decode("ascii") for k, v in trace_context(carrier) if k == key]
            return found or None
        value = next(named_values(carrier, key), None)
        if value is None or len(value) > OTHER_CONTEXT_MAX_BYTES:
            return None
        return [value.decode("utf-8", "replace")]

    def keys(self, carrier: Headers) -> list[str]:
        return [k if isinstance(k, str) else k.decode("utf-8", "replace") for k, _ in carrier]


_GETTER: Final = _KafkaHeaders()


def forwarded_headers(headers: Headers) -> tuple[tuple[str, bytes], ...]:
    """The request's own trace context headers, bounded, to copy onto its outcome when tracing is off."""
    return trace_context(headers)


def inject_headers() -> tuple[tuple[str, bytes], ...]:
    """The current context as Kafka headers, by the registered propagator (W3C by default)."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return tuple((k, v.encode()) for k, v in carrier.items())


def _key_text(key: bytes | None) -> str | None:
    if key is None:
        return None
    try:
        return key.decode("utf-8")
    except UnicodeDecodeError:
        return None


# -- per request ---------------------------------------------------------------------------


class Attempt:
    """One upstream attempt's span; `with attempt:` makes it current for the SDK's CLIENT span."""

    __slots__ = ("_span", "_token")

    def __init__(self, span: Span | None) -> None:
        self._span = span
        self._token: contextvars.Token[otel_context.Context] | None = None

    def __enter__(self) -> Attempt:
        if self._span is not None:
            self._token = otel_context.attach(trace.set_span_in_context(self._span))
        return self

    def __exit__(self, *exc: object) -> None:
        if self._token is not None:
            otel_context.detach(self._token)
            self._token = None

    def succeeded(self, status: int, body: Mapping[str, Any]) -> None:
        span = self._span
        if span is None:
            return
        span.set_attribute(http_attributes.HTTP_RESPONSE_STATUS_CODE, status)
        stop_reason = body.get("stop_reason")
        if isinstance(stop_reason, str):  # the SDK's CLIENT span lacks gen_ai.response.finish_reasons
            span.set_attribute("gateway.stop_reason", stop_reason)
        span.set_attribute("gateway.retry.decision", "none")
        span.set_status(Status(StatusCode.OK))

    def failed(self, failure: Failure) -> None:
        span = self._span
        if span is None:
            return
        if failure.status is not None:
            span.set_attribute(http_attributes.HTTP_RESPONSE_STATUS_CODE, failure.status)
        span.set_attribute(error_attributes.ERROR_TYPE, failure.error_type or failure.label)
        span.set_attribute("gateway.failure", failure.label)
        span.set_status(Status(StatusCode.ERROR, failure.label))

    def decided(self, decision: str, delay_s: float | None = None) -> None:
        """`retry` (after `delay_s`), `give_up` (retries exhausted) or `fail` (not retryable)."""
        span = self._span
        if span is None:
            return
        span.set_attribute("gateway.retry.decision", decision)
        if delay_s is not None:
            span.set_attribute("gateway.retry.delay_s", delay_s)

    def end(self) -> None:
        """End the span (once; later calls do nothing)."""
        span, self._span = self._span, None
        if span is not None:
            span.end()


_NO_ATTEMPT: Final = Attempt(None)


class Tracing:
    """The gateway's spans. `Tracing(None)` is off and costs next to nothing per message."""

    def __init__(self, provider: TracerProvider | None = None, *, consumer_group: str = "") -> None:
        self.provider = provider
        self.enabled = provider is not None
        self._tracer: Tracer | None = provider.get_tracer(SCOPE) if provider is not None else None
        self._group = consumer_group

    def sdk_option(self) -> anthropic.OpenTelemetryClientOption:
        """The anthropic SDK's `open_telemetry` option: our provider, or no spans at all."""
        if self.provider is None:
            return False
        return {"tracer_provider": self.provider}

    # -- the CONSUMER span ----------------------------------------------------------------

    def process(self, rec: RecordLike) -> AbstractContextManager[Span | None]:
        """The request's CONSUMER span, current for the whole of its processing."""
        if self._tracer is None:
            return nullcontext()
        return self._process(self._tracer, rec)

    @contextlib.contextmanager
    def _process(self, tracer: Tracer, rec: RecordLike) -> Iterator[Span | None]:
        parent = propagate.extract(rec.headers or (), getter=_GETTER)
        attributes: dict[str, Any] = {
            msg.MESSAGING_SYSTEM: msg.MessagingSystemValues.KAFKA.value,
            msg.MESSAGING_OPERATION_TYPE: msg.MessagingOperationTypeValues.PROCESS.value,
            msg.MESSAGING_OPERATION_NAME: "process",
            msg.MESSAGING_DESTINATION_NAME: rec.topic,
            msg.MESSAGING_DESTINATION_PARTITION_ID: str(rec.partition),
            msg.MESSAGING_KAFKA_OFFSET: rec.offset,
            msg.MESSAGING_CONSUMER_GROUP_NAME: self._group,
        }
        key = _key_text(rec.key)
        if key is not None:
            attributes[msg.MESSAGING_KAFKA_MESSAGE_KEY] = key
        if rec.value is not None:
            attributes[msg.MESSAGING_MESSAGE_BODY_SIZE] = len(rec.value)
        with tracer.start_as_current_span(
            f"process {rec.topic}", context=parent, kind=SpanKind.CONSUMER, attributes=attributes
        ) as span:
            yield span

    def annotate(self, **attributes: str | int | float | bool | None) -> None:
        """Add `gateway.<name>` attributes to the current (process) span; None values are skipped."""
        if self._tracer is None:
            return
        span = trace.get_current_span()
        for name, value in attributes.items():
            if value is not None:
                span.set_attribute(f"gateway.{name}", value)

    def outcome(self, outcome: str, reason: str | None = None) -> None:
        """Record the request's outcome on the process span; a dead letter marks it an error."""
        if self._tracer is None:
            return
        span = trace.get_current_span()
        span.set_attribute("gateway.outcome", outcome)
        if reason is not None:
            span.set_attribute("gateway.deadletter.reason", reason)
            span.set_attribute(error_attributes.ERROR_TYPE, reason)
            span.set_status(Status(StatusCode.ERROR, reason))

    # -- children ---------------------------------------------------------------------------
    # A request whose process span is not sampled gets no child spans at all: they would
    # not be recorded either, and making them costs as much CPU as the rest of the request.

    def _recording(self) -> Tracer | None:
        tracer = self._tracer
        if tracer is None or not trace.get_current_span().is_recording():
            return None
        return tracer

    def span(self, name: str) -> AbstractContextManager[Span | None]:
        """An INTERNAL child of the current span (`admission`, ...)."""
        tracer = self._recording()
        if tracer is None:
            return nullcontext()
        return tracer.start_as_current_span(name)

    def waits(self, started_ns: int, queue_wait_s: float, limiter_wait_s: float, attempt: int) -> None:
        """The `queue wait` and `limiter wait` spans of one turn, after the fact."""
        tracer = self._recording()
        if tracer is None:
            return
        attrs = {"gateway.attempt": attempt}
        queue_end = started_ns + int(queue_wait_s * 1e9)
        tracer.start_span("queue wait", attributes=attrs, start_time=started_ns).end(end_time=queue_end)
        limiter_end = queue_end + int(limiter_wait_s * 1e9)
        tracer.start_span("limiter wait", attributes=attrs, start_time=queue_end).end(end_time=limiter_end)

    def attempt(self, number: int, model: str, max_tokens: int) -> Attempt:
        """The span of upstream attempt `number` (1-based); end it with `Attempt.end()`."""
        tracer = self._recording()
        if tracer is None:
            return _NO_ATTEMPT
        span = tracer.start_span(
            "upstream attempt",
            # the GenAI attributes (gen_ai.operation.name, provider, model, usage...) are on the
            # SDK's CLIENT span beneath this one, where the conventions put them
            attributes={"gateway.attempt": number, "gateway.model": model, "gateway.max_tokens": max_tokens},
        )
        return Attempt(span)

    def produce(
        self, topic: str, key: bytes | None, request_headers: Headers
    ) -> AbstractContextManager[tuple[tuple[str, bytes], ...]]:
        """The PRODUCER span of an outcome. Entering gives the headers that carry its context
        (off: the request's own `traceparent`/`tracestate`)."""
        if self._tracer is None:
            return nullcontext(forwarded_headers(request_headers))
        tracer = self._recording()
        if tracer is None:  # not sampled: pass the process span's context on, unsampled
            return nullcontext(inject_headers())
        attributes: dict[str, Any] = {
            msg.MESSAGING_SYSTEM: msg.MessagingSystemValues.KAFKA.value,
            msg.MESSAGING_OPERATION_TYPE: msg.MessagingOperationTypeValues.SEND.value,
            msg.MESSAGING_OPERATION_NAME: "send",
            msg.MESSAGING_DESTINATION_NAME: topic,
        }
        text = _key_text(key)
        if text is not None:
            attributes[msg.MESSAGING_KAFKA_MESSAGE_KEY] = text
        return self._produce(tracer, f"send {topic}", attributes)

    @staticmethod
    @contextlib.contextmanager
    def _produce(
        tracer: Tracer, name: str, attributes: dict[str, Any]
    ) -> Iterator[tuple[tuple[str, bytes], ...]]:
        with tracer.start_as_current_span(name, kind=SpanKind.PRODUCER, attributes=attributes):
            yield inject_headers()
