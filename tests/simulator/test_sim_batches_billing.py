"""Message Batches: billing at the batch tier, calls per custom_id, and the rate limits.

ANTHROPIC.md: batches cost 50% of the standard price (so the stats keep their tokens apart),
rate limits apply to the HTTP calls and to the requests waiting in the queue, and entries do
not draw on ITPM/OTPM. The chaos verifier counts billed calls per request: a succeeded entry
is one billed call of its custom_id, so one billed in two batches shows.
"""

from __future__ import annotations

import aiohttp
import anthropic
import pytest

from service.simulator import SimulatorConfig
from service.simulator.batches.intake import CUSTOM_ID
from service.simulator.calls import HEADER, batch_custom_id
from tests.simulator.batchkit import HAIKU, SONNET, ended, entry, params, results
from tests.simulator.conftest import SDK_KEY, ClientFactory, SimFactory
from tests.simulator.simkit import FakeClock


async def test_batch_billing_in_stats_and_calls_per_custom_id(
    make_sim: SimFactory, make_client: ClientFactory, http: aiohttp.ClientSession
) -> None:
    config = SimulatorConfig(
        api_keys={"alice": SDK_KEY}, output={"fixed_tokens": 30}, batches={"processing_s": 0.05}
    )
    sim = await make_sim(config)
    client = make_client(sim)
    r1, r2, r3 = (batch_custom_id(f"acme:r{i}") for i in (1, 2, 3))
    first = await client.messages.batches.create(
        requests=[
            entry(r1),
            entry(r2, model=SONNET, text="a longer question " * 20),
            {"custom_id": "acme-bad", "params": {"model": HAIKU, "max_tokens": 10, "messages": []}},
        ]
    )
    # The gateway retried acme:r1 in a second batch: billed twice, and it shows.
    second = await client.messages.batches.create(requests=[entry(r1), entry(r3)])
    lines = []
    for batch in (first, second):
        await ended(client, batch.id)
        lines += await results(client, batch.id)
    usages = [line.result.message.usage for line in lines if line.result.type == "succeeded"]
    assert len(usages) == 4
    # acme:r2 also went through /v1/messages (keyed by the gateway's header): counted apart.
    await client.messages.create(**params(), extra_headers={HEADER: "acme:r2"})

    stats = sim.stats()
    batches = stats["batches"]
    assert batches["created"] == 2
    assert batches["requests_received"] == 5
    assert batches["ended"] == 2
    assert batches["request_counts"] == {
        "processing": 0,
        "succeeded": 4,
        "errored": 1,
        "canceled": 0,
        "expired": 0,
    }
    assert batches["errored_by_type"] == {"invalid_request_error": 1}
    assert batches["succeeded_by_model"] == {HAIKU: 3, SONNET: 1}
    assert batches["input_tokens"] == sum(u.input_tokens for u in usages)
    assert batches["output_tokens"] == 4 * 30
    assert batches["billed_by_key"] == {
        "alice": {"requests": 4, "input_tokens": batches["input_tokens"], "output_tokens": 120}
    }
    # Standard-tier totals hold only the one /v1/messages call.
    assert stats["output_tokens_total"] == 30
    assert stats["billed_by_key"]["alice"]["requests"] == 1
    assert stats["batch_calls"]["billed_more_than_once"] == 1
    assert stats["calls_by_endpoint"]["batches.create"] == 2

    async with http.get(f"{sim.url}/_sim/calls?min_billed=2") as resp:
        twice = await resp.json()
    assert twice["batch_calls_by_custom_id"] == {r1: {"ok": 2, "billed": 2, "all": 2}}
    assert twice["calls_by_request"] == {}
    every = sim.calls()
    assert every["batch_calls_by_custom_id"] == {
        r1: {"ok": 2, "billed": 2, "all": 2},
        r2: {"ok": 1, "billed": 1, "all": 1},
        r3: {"ok": 1, "billed": 1, "all": 1},
        "acme-bad": {"ok": 0, "billed": 0, "all": 1},
    }
    assert every["calls_by_request"] == {"acme:r2": {"ok": 1, "billed": 1, "all": 1}}
    assert every["batch_calls"]["tracked"] == 4
    # What a verifier adds up per request: acme:r2 was billed once in each path.
    billed = {
        key: every["calls_by_request"].get(key, {}).get("billed", 0)
        + every["batch_calls_by_custom_id"][batch_custom_id(key)]["billed"]
        for key in ("acme:r1", "acme:r2", "acme:r3")
    }
    assert billed == {"acme:r1": 2, "acme:r2": 2, "acme:r3": 1}


def test_batch_custom_id_fits_the_api_pattern() -> None:
    longest = "p" * 63 + ":" + "r" * 128  # the longest partner id and request id
    for key in ("acme:r-1", "acme:a.b:c", longest):
        custom_id = batch_custom_id(key)
        assert CUSTOM_ID.fullmatch(custom_id), key
        assert len(custom_id) == 64
    assert batch_custom_id("acme:r-1") != batch_custom_id("acme:r-2")


async def test_entries_draw_no_tokens_and_a_create_is_one_request(
    make_sim: SimFactory, make_client: ClientFactory
) -> None:
    clock = FakeClock()
    config = SimulatorConfig(limits={"rpm": 2, "itpm": 50, "otpm": 50}, batches={"processing_s": 0.0})
    sim = await make_sim(config, clock=clock)
    client = make_client(sim)
    big = params(max_tokens=1000, text="word " * 400)  # more than the whole ITPM and OTPM
    batch = await client.messages.batches.create(requests=[{"custom_id": "big", "params": big}])
    done = await ended(client, batch.id)
    assert done.request_counts.succeeded == 1
    with pytest.raises(anthropic.RateLimitError, match="on its own"):  # /v1/messages: never
        await client.messages.create(**big)
    levels = sim.stats()["buckets"]["default"]
    assert levels["input_tokens"]["level"] == 50
    assert levels["output_tokens"]["level"] == 50
    assert levels["requests"]["level"] == 1

    await client.messages.batches.create(requests=[entry("second")])
    with pytest.raises(anthropic.RateLimitError) as info:
        await client.messages.batches.create(requests=[entry("third")])
    assert info.value.type == "rate_limit_error"
    assert info.value.response.headers["retry-after"] == "30"  # 2 RPM: one request every 30 s
    assert info.value.response.headers["anthropic-ratelimit-requests-remaining"] == "0"
    await client.messages.batches.retrieve(batch.id)  # polling draws on nothing
    assert sim.stats()["batches"]["created"] == 2


async def test_max_queued_requests_refuses_a_create(make_sim: SimFactory, make_client: ClientFactory) -> None:
    clock = FakeClock()
    config = SimulatorConfig(batches={"processing_s": 10.0, "max_queued_requests": 5})
    sim = await make_sim(config, clock=clock)
    client = make_client(sim)
    first = await client.messages.batches.create(requests=[entry(f"a{i}") for i in range(3)])
    with pytest.raises(anthropic.RateLimitError, match="queue") as info:
        await client.messages.batches.create(requests=[entry(f"b{i}") for i in range(3)])
    assert info.value.type == "rate_limit_error"
    assert str(info.value.request_id).startswith("req_")
    second = await client.messages.batches.create(requests=[entry(f"c{i}") for i in range(2)])  # 3 + 2
    assert sim.stats()["batches"]["queue_limited_429"] == 1
    assert sim.stats()["batches"]["request_counts"]["processing"] == 5
    clock.advance(10.0)
    await ended(client, first.id)
    await ended(client, second.id)
    await client.messages.batches.create(requests=[entry(f"d{i}") for i in range(5)])  # the queue is free
