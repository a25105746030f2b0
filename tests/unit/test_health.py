"""The HTTP endpoint without a broker: liveness heartbeat, readiness reasons, scrape refresh, logs."""

from __future__ import annotations

import asyncio
import io
import logging
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from opentelemetry.sdk.trace import TracerProvider
from pydantic import SecretStr

from service.app import Gateway
from service.config.loader import parse_config
from service.telemetry.http import HealthServer
from service.telemetry.logs import MASK, JsonFormatter, redact, register_secrets
from service.telemetry.metrics import Metrics
from tests.support.clock import FakeClock


async def _get(port: int, path: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}{path}") as r:
        body = await r.read()
        return r.status, (orjson.loads(body) if r.content_type == "application/json" else body.decode())


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., Any]]:
    servers: list[HealthServer] = []

    async def start(**kw: Any) -> HealthServer:
        kw.setdefault("ready", lambda: (True, "ok"))
        server = HealthServer(kw.pop("metrics", Metrics()), kw.pop("ready"), "127.0.0.1", 0, **kw)
        await server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.stop()


async def test_healthz_answers_while_the_heartbeat_is_recent(serve: Callable[..., Any]) -> None:
    clock = FakeClock()
    server = await serve(clock=clock, heartbeat_interval_s=3600, stale_after_s=10)
    assert server.port
    status, body = await _get(server.port, "/healthz")
    assert (status, body["status"]) == (200, "ok")
    clock.advance(11)  # no tick for longer than stale_after_s
    status, body = await _get(server.port, "/healthz")
    assert (status, body["status"]) == (503, "stalled")
    assert body["heartbeat_age_s"] == pytest.approx(11)


async def test_healthz_fails_when_the_heartbeat_task_died(serve: Callable[..., Any]) -> None:
    server = await serve(heartbeat_interval_s=0.01)
    assert server._heartbeat is not None
    server._heartbeat.cancel()
    await asyncio.sleep(0.02)
    assert server.port
    status, body = await _get(server.port, "/healthz")
    assert (status, body["status"]) == (503, "stalled")


async def test_healthz_reports_event_loop_lag(serve: Callable[..., Any]) -> None:
    server = await serve(heartbeat_interval_s=0.02)
    await asyncio.sleep(0.05)
    time.sleep(0.3)  # block the loop, as a CPU-bound bug would  # noqa: ASYNC251
    await asyncio.sleep(0.05)
    assert server.port
    status, body = await _get(server.port, "/healthz")
    assert status == 200
    assert body["max_loop_lag_s"] >= 0.2


async def test_readyz_says_why_and_sets_the_ready_gauge(serve: Callable[..., Any]) -> None:
    state = {"ok": False, "reason": "not in the consumer group yet: joining"}
    metrics = Metrics()
    server = await serve(
        metrics=metrics, ready=lambda: (state["ok"], state["reason"]), status=lambda: {"redis_degraded": True}
    )
    assert server.port
    status, body = await _get(server.port, "/readyz")
    assert status == 503
    assert body == {
        "ready": False,
        "reason": "not in the consumer group yet: joining",
        "redis_degraded": True,
    }
    assert metrics.registry.get_sample_value("gateway_ready") == 0
    state.update(ok=True, reason="ok")
    status, body = await _get(server.port, "/readyz")
    assert (status, body["ready"]) == (200, True)
    # a scrape refreshes the gauge too, without anyone calling /readyz
    state.update(ok=False, reason="draining")
    _, text = await _get(server.port, "/metrics")
    assert "gateway_ready 0.0" in text


async def test_scrape_runs_refreshers_and_survives_a_broken_one(serve: Callable[..., Any]) -> None:
    metrics = Metrics()
    calls: list[str] = []

    def broken() -> None:
        raise RuntimeError("boom")

    metrics.on_scrape(broken)
    metrics.on_scrape(lambda: (calls.append("ok"), metrics.queued.labels("acme").set(7))[0])
    server = await serve(metrics=metrics)
    assert server.port
    status, text = await _get(server.port, "/metrics")
    assert status == 200
    assert calls == ["ok"]
    assert 'gateway_queued{partner="acme"} 7.0' in text


def test_ratelimit_headers_become_remaining_gauges() -> None:
    metrics = Metrics()
    metrics.observe_ratelimit_headers(
        {
            "anthropic-ratelimit-requests-remaining": "49",
            "anthropic-ratelimit-input-tokens-remaining": "19000",
            "anthropic-ratelimit-output-tokens-limit": "8000",  # no remaining: nothing set
            "anthropic-ratelimit-tokens-remaining": "oops",
        }
    )
    sample = metrics.registry.get_sample_value
    assert sample("gateway_upstream_ratelimit_remaining_requests", {}) == 0  # until scraped
    metrics.refresh()
    assert sample("gateway_upstream_ratelimit_remaining_requests", {}) == 49
    assert sample("gateway_upstream_ratelimit_remaining_tokens", {"direction": "input"}) == 19000
    assert sample("gateway_upstream_ratelimit_remaining_tokens", {"direction": "output"}) is None


# -- the gateway's readiness and gauges, without running it -----------------------------------


@pytest.fixture
async def gateway(tmp_path: Path) -> AsyncIterator[Gateway]:
    (tmp_path / "acme.key").write_text("sk-ant-acme-unit-0123456789")
    settings = parse_config(
        {
            "kafka": {"bootstrap_servers": "127.0.0.1:1"},
            "org_limits": {"rpm": 600, "itpm": 100000},
            "partners": [
                {"id": "acme", "api_key": {"file": str(tmp_path / "acme.key")}, "limits": {"rpm": 60}},
            ],
        }
    )
    gw = Gateway(settings, serve_http=False, tracer_provider=TracerProvider())
    yield gw
    await gw.claude.aclose()


def test_gateway_readiness_reasons(gateway: Gateway) -> None:
    ingest = gateway.ingest
    assert gateway.readiness() == (False, "not in the consumer group yet: joining")
    ingest.partitions = 2  # owning partitions is not what counts: being a member is
    assert gateway.readiness() == (False, "not in the consumer group yet: joining")
    ingest.partitions = 0
    ingest.joined = True  # joined, but more replicas than partitions: nothing to own
    ingest.broker_seen_at = time.monotonic()
    assert gateway.readiness() == (True, "ok"), "a member without partitions is ready"
    assert (gateway.status()["joined"], gateway.status()["partitions"]) == (True, 0)
    ingest.broker_seen_at = None
    ok, reason = gateway.readiness()
    assert not ok
    assert "broker has answered never" in reason
    ingest.broker_seen_at = time.monotonic()
    assert gateway.readiness() == (True, "ok")
    ingest.broker_seen_at = time.monotonic() - gateway.broker_silence_limit_s - 5
    ok, reason = gateway.readiness()
    assert not ok
    assert "not for 35s" in reason
    ingest.draining = True
    assert gateway.readiness() == (False, "draining: the gateway is stopping")
    status = gateway.status()
    assert status["draining"] is True
    assert status["redis_degraded"] is False
    assert status["tracing"] is True


def test_gateway_refreshes_limiter_levels_and_queues_on_scrape(gateway: Gateway) -> None:
    gateway.metrics.refresh()
    sample = gateway.metrics.registry.get_sample_value
    assert sample("gateway_limiter_available_requests", {"scope": "org"}) == 600
    assert sample("gateway_limiter_available_tokens", {"scope": "org", "direction": "input"}) == 100000
    assert sample("gateway_limiter_available_requests", {"scope": "acme"}) == 60
    assert sample("gateway_queued", {"partner": "acme"}) == 0
    gateway.ingest._outstanding["acme"] = 5  # fetched, unfinished
    gateway.metrics.in_flight.labels("acme").inc(2)  # of which 2 at Claude
    gateway.metrics.refresh()
    assert sample("gateway_queued", {"partner": "acme"}) == 3
    assert sample("gateway_redis_degraded") == 0


def test_gateway_registers_its_secrets_for_log_masking(gateway: Gateway) -> None:
    assert redact("key=sk-ant-acme-unit-0123456789;") == f"key={MASK};"


# -- JSON logs -------------------------------------------------------------------------------


def _capture() -> tuple[logging.Logger, io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger(f"test.logs.{time.monotonic_ns()}")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    return logger, stream


def test_json_log_lines_carry_context_and_trace_ids_and_mask_secrets() -> None:
    register_secrets(["sk-live-secret-value-42", SecretStr("sig-secret-value-43"), "short"])
    logger, stream = _capture()
    provider = TracerProvider()
    with provider.get_tracer("t").start_as_current_span("x") as span:
        try:
            raise ValueError("bad key sk-live-secret-value-42")
        except ValueError:
            logger.exception(
                "failed",
                extra={
                    "partner": "acme",
                    "request_id": "r1",
                    "topic": "t",
                    "partition": 1,
                    "offset": 2,
                    "key": SecretStr("anything"),
                    "sig": "sig-secret-value-43",
                    "word": "short",
                },
            )
    (line,) = stream.getvalue().splitlines()
    event = orjson.loads(line)
    assert event["event"] == "failed"
    assert event["trace_id"] == format(span.get_span_context().trace_id, "032x")
    assert event["span_id"] == format(span.get_span_context().span_id, "016x")
    assert (event["partner"], event["request_id"], event["partition"], event["offset"]) == (
        "acme",
        "r1",
        1,
        2,
    )
    assert event["key"] == MASK
    assert event["sig"] == MASK
    assert event["word"] == "short"  # too short to be a secret: left alone
    assert "sk-live-secret-value-42" not in line
    assert MASK in event["traceback"]
