"""A 200 whose `usage` (or body) no Claude would send: the pipeline neither crashes nor leaks
the call's grant, the outcome goes out with its metering record, every figure fits 64 bits."""

from __future__ import annotations

from typing import Any

import httpx2
import orjson
import pytest

from service.admission import pricing
from service.admission.admit import Admission
from service.admission.budget import Budgets
from service.admission.pricing import billed, quote
from service.admission.registry import Registry
from service.config.loader import parse_config
from service.config.prices import default_models
from service.contracts.schemas import validate
from service.pipeline import Pipeline
from service.scheduling.scheduler import Scheduler
from service.telemetry.metrics import Metrics
from service.upstream.client import ClaudeClient
from tests.support.answers import answer, request_record
from tests.support.sink import MemorySink

USAGE_TOPIC = "t.usage"


def _message(usage: Any) -> bytes:
    return orjson.dumps(answer(usage))


async def _handle(answer: bytes) -> tuple[MemorySink, Scheduler, Metrics]:
    settings = parse_config(
        {
            "kafka": {"usage_topic": USAGE_TOPIC},
            "retry": {"max_attempts": 1, "base_delay_s": 0.001, "max_delay_s": 0.001},
            "partners": [
                {
                    "id": "acme",
                    "api_key": {"env": "K"},
                    "max_concurrency": 1,
                    "budget": {"usd_per_day": 100.0},
                }
            ],
        }
    )
    registry = Registry.build(settings, environ={"K": "sk-acme"})

    def handler(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(
            200, content=answer, headers={"request-id": "req_up", "content-type": "application/json"}
        )

    claude = ClaudeClient(
        settings.anthropic, http_client=httpx2.AsyncClient(transport=httpx2.MockTransport(handler))
    )
    claude.sync_keys(registry.api_keys())
    metrics = Metrics()
    scheduler = Scheduler(settings)
    admission = Admission(registry, budgets=Budgets(lambda: registry, metrics=metrics))
    sink = MemorySink(7)
    await Pipeline(settings, admission, scheduler, claude, metrics).handle(request_record(), sink)
    return sink, scheduler, metrics


def test_usage_that_is_not_an_object_counts_nothing() -> None:
    for usage in ("lots", [1, 2], 5, None):
        assert billed(usage).units == (0,) * 7  # type: ignore[arg-type]


def test_an_absurd_usage_is_capped_so_every_figure_fits_64_bits() -> None:
    price = default_models()["claude-opus-4-1"]
    usage = {
        "input_tokens": 2**63 - 1,
        "output_tokens": 2**64 - 1,
        "cache_read_input_tokens": 2**63,
        "cache_creation_input_tokens": 2**63,
        "cache_creation": {"ephemeral_5m_input_tokens": 2**62, "ephemeral_1h_input_tokens": 2**62},
        "server_tool_use": {"web_search_requests": 2**63},
        "speed": "fast",
    }
    q = quote(price, usage, price_version="v")
    assert max(q.billed.units) == pricing.MAX_UNITS
    assert q.nusd is not None
    assert 0 <= q.nusd < 2**63
    orjson.dumps(q.doc())  # raises beyond 64 bits


@pytest.mark.parametrize("usage", ["lots", [1, 2], {"input_tokens": 2**63 - 1, "output_tokens": 2**63 - 1}])
async def test_a_hostile_usage_still_gets_its_response_and_metering_and_frees_the_grant(usage: Any) -> None:
    sink, scheduler, metrics = await _handle(_message(usage))
    topics = [m.topic for m in sink.published]
    assert topics == ["claude.responses.acme", USAGE_TOPIC]
    record = orjson.loads(sink.published[1].value)
    validate("usage", record)
    response = orjson.loads(sink.published[0].value)
    assert response["cost"] == record["cost"]
    assert metrics.cost.labels("acme", "claude-haiku-4-5")._value.get() == pytest.approx(
        record["cost"]["nano_usd"] / 1e9
    )
    assert scheduler.in_flight("acme") == 0


async def test_a_200_whose_body_is_no_object_is_an_unknown_outcome_and_frees_the_grant() -> None:
    sink, scheduler, _ = await _handle(b"[1, 2]")
    (dead,) = sink.published
    assert dead.topic == "claude.deadletter.acme"
    assert orjson.loads(dead.value)["reason"] == "outcome_unknown"
    assert scheduler.in_flight("acme") == 0
