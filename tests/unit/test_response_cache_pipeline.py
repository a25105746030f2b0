"""The response cache through the pipeline, without Kafka or Redis: an entry that cannot be
served is a miss answered by a call (whose answer replaces it), never a crash of the partition."""

from __future__ import annotations

import time
from typing import Any

import httpx2
import orjson
import pytest

from service.admission.admit import Admission, Record
from service.admission.registry import Registry
from service.config.loader import parse_config
from service.pipeline import Pipeline
from service.response_cache.cache import ResponseCache
from service.response_cache.entry import Entry, decode, encode
from service.response_cache.key import cache_key
from service.response_cache.store import LocalStore
from service.scheduling.scheduler import Scheduler
from service.telemetry.metrics import Metrics
from tests.support.answers import answer, params
from tests.support.sink import MemorySink

PARAMS = params()
ANSWER = answer({"input_tokens": 10, "output_tokens": 5})


async def test_an_unservable_hit_is_a_miss_whose_answer_replaces_it(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = parse_config(
        {
            "kafka": {"usage_topic": "t.usage"},
            "partners": [{"id": "acme", "api_key": {"env": "K"}, "cache": {"enabled": True}}],
        }
    )
    registry = Registry.build(settings, environ={"K": "sk"})
    calls: list[Any] = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        calls.append(request)
        return httpx2.Response(200, json=ANSWER, headers={"request-id": "req_up"})

    from service.upstream.client import ClaudeClient

    claude = ClaudeClient(
        settings.anthropic, http_client=httpx2.AsyncClient(transport=httpx2.MockTransport(handler))
    )
    claude.sync_keys(registry.api_keys())
    store = LocalStore()
    metrics = Metrics()
    cache = ResponseCache(settings, store, metrics)
    pipeline = Pipeline(settings, Admission(registry), Scheduler(settings), claude, metrics, cache=cache)
    key = cache_key("partner:acme", PARAMS)
    now = time.time()
    await store.put(key, encode(Entry(ANSWER, None, now, now + 60), 1024), now, now + 60, 10**6)
    # an entry the reader's checks let through but the hit cannot publish (a future field, a bug)
    monkeypatch.setattr(
        "service.pipeline.cached_response", lambda *a, **k: (_ for _ in ()).throw(TypeError("not an answer"))
    )
    value = orjson.dumps({"request_id": "r1", "params": PARAMS})
    sink = MemorySink(1)
    await pipeline.handle(Record("claude.requests.acme", 0, 1, 1_700_000_000_000, b"k", value), sink)
    assert len(calls) == 1, "answered by a call"
    (response,) = [orjson.loads(m.value) for m in sink.published if m.topic.endswith("acme")]
    assert response["cached"] is False
    stored = await store.get(key)
    assert stored is not None
    assert decode(stored).upstream_request_id == "req_up", "the call's answer replaced the entry"
    assert (
        metrics.registry.get_sample_value(
            "gateway_internal_errors_total", {"partner": "acme", "where": "response_cache"}
        )
        == 1
    )
