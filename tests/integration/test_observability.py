"""Issue 4, "See every partner", on the real broker with the Claude simulator over HTTP.

- a scrape of the running service passes `promtool check metrics`, and every declared metric
  has samples after traffic with a retry, dead letters and backpressure;
- the metric values equal what happened (the responses' usage, the simulator's own stats);
- a request's `traceparent` is continued: process span under the producer's span, the
  admission/queue/limiter/upstream/produce spans under it, the SDK's CLIENT span under each
  attempt, and the outcome's headers carry the same trace;
- no secret (partner keys, signing keys, the Kafka SASL password, a revoked key) reaches a log
  line, a metric, a span or a dead letter, after an upstream 401 and bad requests too;
- /readyz is 503 until the gateway joined the consumer group and while draining; /healthz stays 200.
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import shutil
import time
import uuid
from asyncio.subprocess import PIPE
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from prometheus_client.parser import text_string_to_metric_families

from service.admission.pricing import cost_usd
from service.app import Gateway
from service.simulator import SimulatorConfig, SimulatorServer
from service.simulator.tokens import count_input_tokens
from service.telemetry.logs import JsonFormatter
from tests.support.gateway import MODEL, World, collect, make_world, request
from tests.support.polling import until
from tests.support.semconv import assert_semconv

pytestmark = pytest.mark.integration

Message = tuple[str, bytes | None, bytes | None, list[tuple[str, bytes]]]


# -- helpers ---------------------------------------------------------------------------------


async def _http(port: int, path: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}{path}") as r:
        body = await r.read()
        return r.status, (orjson.loads(body) if r.content_type == "application/json" else body.decode())


async def _wait_ready(gateway: Gateway, task: asyncio.Task[None], timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if task.done():
            task.result()  # raises what stopped it
            raise AssertionError("the gateway stopped before it was ready")
        if gateway.http is not None and gateway.http.port:
            status, _ = await _http(gateway.http.port, "/readyz")
            if status == 200:
                return
        await asyncio.sleep(0.1)
    raise AssertionError(f"not ready after {timeout_s}s: {gateway.readiness()}")


@asynccontextmanager
async def running(
    world: World, sim_url: str, tracer_provider: TracerProvider | None = None, **overrides: Any
) -> AsyncIterator[Gateway]:
    gateway = Gateway(world.settings(sim_url, **overrides), tracer_provider=tracer_provider)
    stop = asyncio.Event()
    task = asyncio.create_task(gateway.run(stop))
    try:
        await _wait_ready(gateway, task)
        yield gateway
    finally:
        stop.set()
        await task


async def produce(bootstrap: str, messages: list[Message]) -> None:
    """(topic, key, value, headers) messages, acknowledged."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, acks="all")
    await producer.start()
    try:
        futures = [await producer.send(t, v, key=k, headers=h) for t, k, v, h in messages]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def scrape(gateway: Gateway) -> str:
    assert gateway.http is not None
    assert gateway.http.port is not None
    status, text = await _http(gateway.http.port, "/metrics")
    assert status == 200
    return str(text)


def samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def total(text: str, name: str, **labels: str) -> float:
    return sum(v for lab, v in samples(text).get(name, []) if all(lab.get(k) == x for k, x in labels.items()))


async def scrape_when(gateway: Gateway, name: str, at_least: float, timeout_s: float = 10.0) -> str:
    """Scrape once `name` sums to `at_least`: counters are updated just after the outcome's
    transaction commits, so a reader of the outcome topics can be a moment ahead of them."""
    deadline = time.monotonic() + timeout_s
    while True:
        text = await scrape(gateway)
        if total(text, name) >= at_least or time.monotonic() > deadline:
            return text
        await asyncio.sleep(0.05)


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool is not installed (make tools-promtool)")
    return path


def _sim(world: World, **kw: Any) -> SimulatorConfig:
    return SimulatorConfig.model_validate({"api_keys": world.keys, "seed": 11, **kw})


def _traceparent() -> tuple[str, str, bytes]:
    trace_id, span_id = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    return trace_id, span_id, f"00-{trace_id}-{span_id}-01".encode()


@pytest.fixture
async def two(kafka_bootstrap: str, tmp_path: Path) -> World:
    return await make_world(kafka_bootstrap, tmp_path, ["acme", "globex"])


@pytest.fixture
def spans() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider, exporter
    provider.shutdown()


# -- promtool and coverage of every declared metric -------------------------------------------


async def test_scrape_passes_promtool_and_every_declared_metric_has_samples(two: World) -> None:
    promtool = _promtool()
    partners = two.settings_dict("x")["partners"]
    partners[0] = {**partners[0], "max_queue": 2, "limits": {"rpm": 100_000}, "budget": {"usd_per_day": 100}}
    partners[1] = {**partners[1], "cache": {"enabled": True}}  # the response cache's series exist
    overrides = {
        "partners": partners,
        "org_limits": {"rpm": 100_000, "itpm": 10_000_000, "otpm": 1_000_000},
        "retry": {"max_attempts": 20, "base_delay_s": 0.01, "max_delay_s": 0.05},
    }
    cfg = _sim(two, faults={"api_error_rate": 0.25}, latency={"distribution": "fixed", "fixed_s": 0.05})
    async with SimulatorServer(cfg) as sim, running(two, sim.url, **overrides) as gateway:
        messages: list[Message] = [(two.request_topic("acme"), None, request(f"a{i}"), []) for i in range(20)]
        messages += [(two.request_topic("globex"), None, request(f"g{i}"), []) for i in range(10)]
        messages += [
            (two.request_topic("globex"), None, b"{not json", []),
            (two.request_topic("globex"), None, request("g-bad", model="gpt-5"), []),
        ]
        await produce(two.bootstrap, messages)
        out = await collect(two, 32)
        await asyncio.sleep(0.6)  # a commit and a lag observation after the last outcome
        text = await scrape(gateway)
        collected = gateway.metrics.registry.collect()
        declared = {m.name + ("_info" if m.type == "info" else "") for m in collected}
    assert out.total == 32
    assert out.reasons() == {"malformed_json": 1, "unknown_model": 1}
    assert any(d["attempts"] > 1 for d in out.responses), "the injected 500s must have caused a retry"

    rc, stdout, stderr = await _promtool_check(promtool, text)
    assert rc == 0, stdout + stderr
    assert stdout.strip() == "", stdout  # no lint problems
    assert stderr.strip() == "", stderr

    got = samples(text)
    families = {f.name for f in text_string_to_metric_families(text) if f.samples}
    assert declared <= families, f"declared but never updated: {sorted(declared - families)}"
    for name, values in got.items():  # bounded labels: never a request id
        for labels, _ in values:
            assert not any(v.startswith(("a", "g")) and v[1:].isdigit() for v in labels.values()), (
                name,
                labels,
            )
    assert total(text, "gateway_paused_partitions", partner="acme") >= 0  # present; backpressure happened:
    assert any(lab.get("partner") == "acme" for lab, _ in got["gateway_paused_partitions"])
    lags = {(lab["topic"], lab["partition"], lab["partner"]): v for lab, v in got["gateway_consumer_lag"]}
    assert {(t, p) for t, _, p in lags} == {(two.request_topic(p), p) for p in two.partners}
    assert all(v == 0 for v in lags.values()), lags  # everything finished and committed
    assert {lab["scope"] for lab, _ in got["gateway_limiter_available_requests"]} >= {"org", "acme"}
    tokens = {(lab["scope"], lab["direction"]) for lab, _ in got["gateway_limiter_available_tokens"]}
    assert {("org", "input"), ("org", "output")} <= tokens
    assert got["gateway_upstream_ratelimit_remaining_requests"][0][1] > 0
    remaining = {lab["direction"] for lab, _ in got["gateway_upstream_ratelimit_remaining_tokens"]}
    assert remaining == {"input", "output"}
    assert total(text, "gateway_ready") == 1


async def _promtool_check(promtool: str, text: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        promtool, "check", "metrics", stdin=PIPE, stdout=PIPE, stderr=PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(text.encode()), timeout=60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_promtool_would_catch_a_badly_named_metric() -> None:
    bad = "# HELP gateway_things Things.\n# TYPE gateway_things counter\ngateway_things 1\n"
    rc, stdout, stderr = await _promtool_check(_promtool(), bad)
    assert rc != 0
    assert "_total" in stdout + stderr


# -- the numbers are what happened -------------------------------------------------------------


async def test_token_request_and_cost_counters_equal_what_happened(two: World) -> None:
    n = 30
    cfg = _sim(two, output={"distribution": "fixed", "fixed_tokens": 20}, faults={"api_error_rate": 0.2})
    docs: dict[str, dict[str, Any]] = {}
    messages: list[Message] = []
    for i in range(n):
        p = two.partners[i % 2]
        rid = f"{p}-{i}"
        params = {
            "model": MODEL,
            "max_tokens": 64,
            "system": "Answer briefly." * (i % 3),
            "messages": [{"role": "user", "content": "Tell me about Kafka. " * (i + 1)}],
        }
        docs[rid] = params
        messages.append(
            (two.request_topic(p), rid.encode(), orjson.dumps({"request_id": rid, "params": params}), [])
        )
    async with SimulatorServer(cfg) as sim:
        async with running(
            two, sim.url, retry={"max_attempts": 20, "base_delay_s": 0.01, "max_delay_s": 0.05}
        ) as gw:
            await produce(two.bootstrap, messages)
            out = await collect(two, n)
            text = await scrape_when(gw, "gateway_requests_total", n)
        async with aiohttp.ClientSession() as s, s.get(f"{sim.url}/_sim/stats") as r:
            stats = await r.json()
    assert len(out.responses) == n, out.reasons()
    price = two.settings("x").models[MODEL]
    for p in two.partners:
        mine = [d for d in out.responses if d["partner"] == p]
        want_in = sum(count_input_tokens(docs[d["request_id"]]) for d in mine)
        assert want_in == sum(d["usage"]["input_tokens"] for d in mine)
        assert total(text, "gateway_tokens_total", partner=p, kind="input") == want_in
        assert total(text, "gateway_tokens_total", partner=p, kind="output") == 20 * len(mine)
        assert total(text, "gateway_tokens_total", partner=p, kind="cache_read") == 0
        assert total(text, "gateway_requests_total", partner=p, model=MODEL, outcome="response") == len(mine)
        assert total(text, "gateway_cost_usd_total", partner=p, model=MODEL) == pytest.approx(
            sum(cost_usd(price, d["usage"]) for d in mine)
        )
        assert total(text, "gateway_end_to_end_latency_seconds_count", partner=p) == len(mine)
    attempts = sum(d["attempts"] for d in out.responses)
    assert stats["input_tokens_total"] == total(text, "gateway_tokens_total", kind="input")
    assert stats["output_tokens_total"] == total(text, "gateway_tokens_total", kind="output") == 20 * n
    assert stats["calls_by_endpoint"]["messages"] == attempts == total(text, "gateway_upstream_calls_total")
    assert stats["status_counts"]["500"] == total(text, "gateway_upstream_calls_total", status="5xx") > 0
    assert total(text, "gateway_retries_total", reason="server_error") == attempts - n
    assert total(text, "gateway_upstream_latency_seconds_count") == attempts
    assert total(text, "gateway_queue_wait_seconds_count") == attempts
    assert total(text, "gateway_limiter_wait_seconds_count") == attempts
    assert total(text, "gateway_requests_total", outcome="deadletter") == 0
    assert total(text, "gateway_in_flight") == 0


# -- traces -------------------------------------------------------------------------------------


async def _outcomes_with_headers(world: World) -> dict[str, tuple[dict[str, Any], dict[str, bytes]]]:
    """Every outcome by its request's Kafka key, with its trace headers."""
    topics = [t for p in world.partners for t in (world.response_topic(p), world.deadletter_topic(p))]
    out = {}
    for value, headers in await _all_records(world.bootstrap, topics, world.partitions):
        doc = orjson.loads(value)
        key = doc.get("request_id") or base64.b64decode(doc["original"]["key_b64"]).decode()
        out[key] = (doc, {k: v for k, v in headers if k in ("traceparent", "tracestate")})
    return out


def _children(spans: list[ReadableSpan], parent: ReadableSpan) -> list[ReadableSpan]:
    return [s for s in spans if s.parent is not None and s.parent.span_id == parent.context.span_id]


async def _finished(
    exporter: InMemorySpanExporter, processes: int, timeout_s: float = 10
) -> list[ReadableSpan]:
    """The spans once `processes` process spans ended (a span ends just after its outcome is acked)."""
    deadline = time.monotonic() + timeout_s
    while True:
        spans = list(exporter.get_finished_spans())
        if sum(s.kind is SpanKind.CONSUMER for s in spans) >= processes or time.monotonic() > deadline:
            return spans
        await asyncio.sleep(0.05)


async def test_the_partner_trace_is_continued_through_the_gateway(
    two: World, spans: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    provider, exporter = spans
    (two.key_dir / "globex.key").write_text("sk-ant-revoked-globex")  # upstream answers 401
    sent: dict[str, tuple[str, str]] = {}  # kafka key -> (trace id, producer span id)
    messages: list[Message] = []
    for i in range(8):
        rid = f"ok-{i}"
        trace_id, span_id, tp = _traceparent()
        sent[rid] = (trace_id, span_id)
        messages.append((two.request_topic("acme"), rid.encode(), request(rid), [("traceparent", tp)]))
    for rid, value, partner in (("bad-1", b"{oops", "acme"), ("auth-1", request("auth-1"), "globex")):
        trace_id, span_id, tp = _traceparent()
        sent[rid] = (trace_id, span_id)
        headers = [("traceparent", tp), ("tracestate", b"partner=1")]
        messages.append((two.request_topic(partner), rid.encode(), value, headers))
    async with (
        SimulatorServer(_sim(two, faults={"api_error_rate": 0.5})) as sim,
        running(two, sim.url, provider, retry={"max_attempts": 30, "base_delay_s": 0.01}) as gateway,
    ):
        await produce(two.bootstrap, messages)
        out = await collect(two, len(messages))
        finished = await _finished(exporter, len(messages))
    group = gateway.settings.kafka.group_id

    # the outcomes carry the request's trace, in the context of the gateway's PRODUCER span
    by_id = {s.context.span_id: s for s in finished}
    outcomes = await _outcomes_with_headers(two)
    assert set(outcomes) == set(sent)
    for key, (_, h) in outcomes.items():
        version, trace_id, span_id, flags = h["traceparent"].decode().split("-")
        assert (version, flags) == ("00", "01")
        assert trace_id == sent[key][0], key
        producer = by_id[int(span_id, 16)]
        assert producer.kind is SpanKind.PRODUCER
        assert producer.name.startswith(f"send {two.tag}.")

    processes = [s for s in finished if s.kind is SpanKind.CONSUMER]
    assert len(processes) == len(messages)
    retried = 0
    for process in processes:
        attrs = dict(process.attributes or {})
        key = str(attrs["messaging.kafka.message.key"])
        trace_id, parent_span_id = sent[key]
        assert format(process.context.trace_id, "032x") == trace_id
        assert process.parent is not None
        assert process.parent.is_remote
        assert format(process.parent.span_id, "016x") == parent_span_id
        topic = two.request_topic("globex" if key == "auth-1" else "acme")
        assert process.name == f"process {topic}"
        assert attrs["messaging.system"] == "kafka"
        assert attrs["messaging.operation.type"] == "process"
        assert attrs["messaging.destination.name"] == topic
        assert attrs["messaging.consumer.group.name"] == group
        assert isinstance(attrs["messaging.destination.partition.id"], str)
        assert isinstance(attrs["messaging.kafka.offset"], int)
        assert_semconv(finished)

        children = _children(finished, process)
        names = Counter(s.name for s in children)
        attempts = [s for s in children if s.name == "upstream attempt"]
        sends = [s for s in children if s.kind is SpanKind.PRODUCER]
        assert len(sends) == 1
        assert names["admission"] == 1
        assert names["queue wait"] == names["limiter wait"] == len(attempts), names
        assert set(names) <= {"admission", "queue wait", "limiter wait", "upstream attempt", sends[0].name}
        for child in children:
            assert child.context.trace_id == process.context.trace_id
            assert child.start_time is not None
            assert child.end_time is not None
            assert process.start_time is not None
            assert process.end_time is not None
            assert process.start_time <= child.start_time <= child.end_time <= process.end_time, child.name

        if key == "bad-1":
            assert attempts == []
            assert attrs["gateway.deadletter.reason"] == "malformed_json"
            assert process.status.status_code is StatusCode.ERROR
            continue
        attempts.sort(key=lambda s: dict(s.attributes or {})["gateway.attempt"])
        decisions = [dict(s.attributes or {})["gateway.retry.decision"] for s in attempts]
        for number, attempt in enumerate(attempts, 1):
            a = dict(attempt.attributes or {})
            assert a["gateway.attempt"] == number
            (client,) = _children(finished, attempt)  # the anthropic SDK's own span
            c = dict(client.attributes or {})
            assert client.kind is SpanKind.CLIENT
            assert c["gen_ai.provider.name"] == "anthropic"
            assert c["gen_ai.operation.name"] == "chat"
            assert c["gen_ai.request.model"] == MODEL
            assert c["gen_ai.request.max_tokens"] == 32
            assert c["http.response.status_code"] == a["http.response.status_code"]
        if key == "auth-1":
            assert decisions == ["fail"]
            assert attrs["gateway.deadletter.reason"] == "upstream_authentication"
            assert process.status.status_code is StatusCode.ERROR
            continue
        assert decisions == ["retry"] * (len(attempts) - 1) + ["none"]
        retried += len(attempts) > 1
        response = next(d for d in out.responses if d["request_id"] == key)
        assert response["attempts"] == len(attempts)
        last = dict(_children(finished, attempts[-1])[0].attributes or {})
        assert last["gen_ai.response.id"] == response["message"]["id"]
        assert last["gen_ai.usage.input_tokens"] == response["usage"]["input_tokens"]
        assert last["gen_ai.usage.output_tokens"] == response["usage"]["output_tokens"]
        assert (
            dict(attempts[-1].attributes or {})["gateway.stop_reason"] == response["message"]["stop_reason"]
        )
        assert attrs["gateway.outcome"] == "response"
        assert attrs["gateway.partner"] == "acme"
        assert process.status.status_code is not StatusCode.ERROR
    assert retried > 0, "half the calls fail with 500: some request must have been retried"


async def test_without_tracing_the_request_context_is_forwarded_unchanged(two: World) -> None:
    _, _, tp = _traceparent()
    async with SimulatorServer(_sim(two)) as sim, running(two, sim.url) as gateway:
        assert not gateway.tracing.enabled
        await produce(
            two.bootstrap,
            [
                (
                    two.request_topic("acme"),
                    b"r1",
                    request("r1"),
                    [("traceparent", tp), ("tracestate", b"a=1")],
                ),
                (two.request_topic("acme"), b"r2", b"{oops", [("traceparent", tp)]),
                (two.request_topic("acme"), b"r3", request("r3"), []),
            ],
        )
        await collect(two, 3)
    by_key = {key: h for key, (_, h) in (await _outcomes_with_headers(two)).items()}
    assert by_key == {"r1": {"traceparent": tp, "tracestate": b"a=1"}, "r2": {"traceparent": tp}, "r3": {}}


# -- secrets ------------------------------------------------------------------------------------


@pytest.fixture
def debug_logs() -> Iterator[io.StringIO]:
    """Every log line of the process, as JSON, at DEBUG (the libraries' too)."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    noisy = [logging.getLogger(n) for n in ("aiokafka", "anthropic", "httpx2", "httpcore", "service")]
    saved = (root.level, [n.level for n in noisy])
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    for logger in noisy:
        logger.setLevel(logging.DEBUG)
    yield stream
    root.removeHandler(handler)
    root.setLevel(saved[0])
    for logger, level in zip(noisy, saved[1], strict=True):
        logger.setLevel(level)


async def _all_records(
    bootstrap: str, topics: list[str], partitions: int
) -> list[tuple[bytes, list[tuple[str, bytes]]]]:
    """Every record's value and headers on `topics`."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [TopicPartition(t, i) for t in topics for i in range(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        end = await consumer.end_offsets(tps)
        out: list[tuple[bytes, list[tuple[str, bytes]]]] = []

        async def behind() -> bool:
            return any([await consumer.position(tp) < end[tp] for tp in tps])

        while await behind():
            for records in (await consumer.getmany(timeout_ms=500)).values():
                for r in records:
                    out.append((r.value or b"", [(k, v or b"") for k, v in r.headers]))
        return out
    finally:
        await consumer.stop()


async def test_no_secret_reaches_logs_metrics_spans_or_dead_letters(
    two: World, spans: tuple[TracerProvider, InMemorySpanExporter], debug_logs: io.StringIO
) -> None:
    provider, exporter = spans
    tag = uuid.uuid4().hex
    revoked = f"sk-ant-revoked-{tag}"
    signing = f"signing-secret-{tag}"
    sasl = f"kafka-sasl-password-{tag}"
    (two.key_dir / "globex.key").write_text(revoked)
    (two.key_dir / "signing.key").write_text(signing)
    (two.key_dir / "sasl.pw").write_text(sasl)
    secrets = [*two.keys.values(), revoked, signing, sasl]
    partners = two.settings_dict("x")["partners"]
    partners[0] = {**partners[0], "signing": {"keys": {"k1": {"file": str(two.key_dir / "signing.key")}}}}
    overrides = {
        "partners": partners,
        # the test broker speaks PLAINTEXT only, so no sasl_mechanism: the password is still
        # configured, and the gateway reads it (to mask it in its logs)
        "kafka": {
            "sasl_username": "gateway",
            "sasl_password": {"file": str(two.key_dir / "sasl.pw")},
        },
    }
    first_not_user = {
        "request_id": "bad-upstream",
        "params": {"model": MODEL, "max_tokens": 8, "messages": [{"role": "assistant", "content": "hi"}]},
    }
    messages: list[Message] = [
        (two.request_topic("acme"), b"ok", request("ok"), []),
        (two.request_topic("acme"), b"bad-upstream", orjson.dumps(first_not_user), []),  # upstream 400
        (two.request_topic("acme"), b"bad-json", b'{"request_id": "x", ', []),
        (two.request_topic("acme"), b"bad-schema", request("bad-schema", max_tokens=0), []),
        (two.request_topic("globex"), b"auth", request("auth"), []),  # upstream 401
    ]
    sim_cfg = _sim(two, faults={"api_error_rate": 0.3})
    async with SimulatorServer(sim_cfg) as sim, running(two, sim.url, provider, **overrides) as gateway:
        await produce(two.bootstrap, messages)
        out = await collect(two, len(messages))
        text = await scrape(gateway)
        finished = await _finished(exporter, len(messages))
    assert {d["request_id"]: d["reason"] for d in out.dead_letters if d.get("request_id")} == {
        "bad-upstream": "invalid_request",
        "auth": "upstream_authentication",
        "bad-schema": "schema_violation",
    }
    assert len(out.responses) == 1
    records = await _all_records(
        two.bootstrap,
        [two.deadletter_topic(p) for p in two.partners] + [two.response_topic(p) for p in two.partners],
        two.partitions,
    )
    assert len(records) == len(messages)
    logs = debug_logs.getvalue()
    lines = logs.splitlines()
    assert len(lines) > 50  # the libraries' DEBUG lines are in there too
    span_dump = "\n".join(s.to_json() for s in finished)
    for secret in secrets:
        assert secret not in logs, "a secret reached the logs"
        assert secret not in text, "a secret reached the metrics"
        assert secret not in span_dump, "a secret reached a span"
        for value, headers in records:
            assert secret.encode() not in value
            assert all(secret.encode() not in v and secret not in k for k, v in headers)
            assert base64.b64encode(secret.encode()) not in value

    # and the logs are what they should be: JSON lines with context and trace ids
    events = [orjson.loads(line) for line in lines]
    dead = [e for e in events if e.get("event") == "dead-lettered"]
    assert len(dead) == 4
    for e in dead:
        assert {"partner", "topic", "partition", "offset", "reason", "trace_id", "span_id"} <= set(e), e
        assert e["logger"] == "service.egress.emit"
    assert {e["request_id"] for e in dead} == {"bad-upstream", "auth", "bad-schema", None}
    published = [e for e in events if e.get("event") == "response published"]
    assert [e["request_id"] for e in published] == ["ok"]


# -- health and readiness -----------------------------------------------------------------------


async def test_readyz_follows_assignment_and_draining_while_healthz_stays_up(two: World) -> None:
    cfg = _sim(two, latency={"distribution": "fixed", "fixed_s": 1.5})
    async with SimulatorServer(cfg) as sim:
        gateway = Gateway(two.settings(sim.url))
        assert gateway.http is not None
        await gateway.http.start()  # the endpoint alone: no consumer yet
        try:
            assert gateway.http.port is not None
            status, body = await _http(gateway.http.port, "/readyz")
            assert status == 503
            assert "not in the consumer group" in body["reason"]
            assert (body["joined"], body["assigned"]) == (False, False)
            status, _ = await _http(gateway.http.port, "/healthz")
            assert status == 200
        finally:
            await gateway.http.stop()

        stop = asyncio.Event()
        task = asyncio.create_task(gateway.run(stop))
        try:
            await _wait_ready(gateway, task)
            port = gateway.http.port
            # a member is ready from its first assignment, which can be empty (the pattern
            # matched no topic yet in the metadata it had when it joined); partitions come
            # with the rebalance that follows, and readiness stays ok meanwhile
            deadline = time.monotonic() + 30
            while True:
                status, body = await _http(port, "/readyz")
                assert (status, body["reason"], body["draining"]) == (200, "ok", False), body
                if body["assigned"] or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.1)
            assert body["assigned"] is True, body
            assert body["broker_silent_s"] < 30
            await produce(
                two.bootstrap, [(two.request_topic("acme"), None, request(f"d{i}"), []) for i in range(4)]
            )
            # all four called (each takes 1.5 s): a draining gateway starts no call, so a stop
            # after the first call only would leave the others to the next owner
            await until(lambda: sim.stats()["calls_by_endpoint"].get("messages", 0) >= 4, 30)
            stop.set()  # requests are in flight: the drain takes ~1.5 s
            seen: list[tuple[int, str]] = []
            while not task.done():
                status, body = await _http(port, "/readyz")
                seen.append((status, body["reason"]))
                health, _ = await _http(port, "/healthz")
                assert health == 200
                if status == 503:
                    break
                await asyncio.sleep(0.02)
            assert seen
            assert seen[-1] == (503, "draining: the gateway is stopping"), seen
            _, text = await _http(port, "/metrics")
            assert "gateway_ready 0.0" in text
        finally:
            stop.set()
            await task
    out = await collect(two, 4)
    assert len(out.responses) == 4  # the in-flight ones finished during the drain
