"""The Message Batches API through the official SDK: lifecycle, results, list, cancel, expiry.

ANTHROPIC.md (Message Batches): up to 100,000 requests, `processing_status` in_progress ->
canceling -> ended with honest `request_counts`, results as JSONL at `results_url` in any
order, `expired` after 24 h (compressed here: seconds stand for hours). Validation errors are
in test_sim_batches_validation.py; billing, calls and limits in test_sim_batches_billing.py.
"""

from __future__ import annotations

import asyncio
import gc
import tracemalloc
from datetime import timedelta

import aiohttp
import anthropic
import pytest
from anthropic.types.messages import MessageBatchRequestCounts

from service.simulator import SimulatorConfig
from tests.simulator.batchkit import HAIKU, OPUS, SONNET, ended, entry, params, results, wait_until
from tests.simulator.conftest import ClientFactory, SimFactory
from tests.simulator.simkit import FakeClock, headers

WEATHER_TOOL = {
    "name": "get_weather",
    "description": "The weather at a place",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
}


def counts(**nonzero: int) -> MessageBatchRequestCounts:
    return MessageBatchRequestCounts(
        **{"processing": 0, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0, **nonzero}
    )


async def test_a_mixed_batch_ends_with_the_right_counts_and_per_entry_results(
    make_sim: SimFactory, make_client: ClientFactory
) -> None:
    sim = await make_sim(SimulatorConfig(seed=3, output={"fixed_tokens": 40}, batches={"processing_s": 0.2}))
    client = make_client(sim)
    valid = {
        "haiku-short": params(HAIKU, 100, "Hi"),
        "sonnet-long": params(SONNET, 1000, "word " * 2000),
        "opus-capped": params(OPUS, 10, "Write a long poem"),
        "haiku-tool": params(HAIKU, 200, "Weather in Paris?", tools=[WEATHER_TOOL]),
        "sonnet-system": params(SONNET, 300, "Hi", system="Be brief."),
    }
    invalid = {
        "no-messages": {"model": HAIKU, "max_tokens": 10, "messages": []},
        "unknown-model": params("claude-imaginary-1", 10),
    }
    requests = [{"custom_id": cid, "params": p} for cid, p in {**valid, **invalid}.items()]
    batch = await client.messages.batches.create(requests=requests)  # type: ignore[arg-type]

    assert batch.id.startswith("msgbatch_")
    assert batch.type == "message_batch"
    assert batch.processing_status == "in_progress"
    assert batch.request_counts == counts(processing=7)
    assert (batch.results_url, batch.ended_at, batch.cancel_initiated_at, batch.archived_at) == (None,) * 4
    assert batch.expires_at - batch.created_at == timedelta(seconds=24)  # 24 h, one second an hour

    done = await ended(client, batch.id)
    assert done.request_counts == counts(succeeded=5, errored=2)
    assert done.ended_at is not None
    assert done.ended_at - done.created_at == timedelta(seconds=0.2)
    assert done.results_url == f"{sim.url}/v1/messages/batches/{batch.id}/results"

    lines = await results(client, batch.id)
    by_id = {line.custom_id: line.result for line in lines}
    assert len(lines) == 7
    assert set(by_id) == set(valid) | set(invalid)
    for custom_id, entry_params in valid.items():
        result = by_id[custom_id]
        assert result.type == "succeeded", custom_id
        message = result.message
        same = await client.messages.create(**entry_params)  # the same params through /v1/messages
        assert message.model == entry_params["model"]
        assert message.usage.service_tier == "batch"
        assert same.usage.service_tier == "standard"
        assert message.usage.model_dump(exclude={"service_tier"}) == same.usage.model_dump(
            exclude={"service_tier"}
        )
        assert (message.stop_reason, message.content) == (same.stop_reason, same.content)
        assert message.id != same.id
    usage = {cid: by_id[cid].message.usage for cid in valid}  # type: ignore[union-attr]
    assert usage["haiku-short"].output_tokens == 40
    assert usage["opus-capped"].output_tokens == 10
    assert by_id["opus-capped"].message.stop_reason == "max_tokens"  # type: ignore[union-attr]
    assert usage["sonnet-long"].input_tokens > 2_000 > usage["haiku-short"].input_tokens
    assert usage["haiku-tool"].input_tokens > 346  # the tool-use system prompt is billed

    bad = by_id["no-messages"]
    assert bad.type == "errored"
    assert bad.error.type == "error"
    assert bad.error.error.type == "invalid_request_error"
    assert "messages" in bad.error.error.message
    unknown = by_id["unknown-model"]
    assert unknown.type == "errored"
    assert unknown.error.error.type == "not_found_error"  # what /v1/messages answers for it


async def test_results_keep_their_order_across_fetches(
    make_sim: SimFactory, make_client: ClientFactory
) -> None:
    sim = await make_sim(SimulatorConfig(seed=5, batches={"processing_s": 0.05}))
    client = make_client(sim)
    ids = [f"req-{i:03d}" for i in range(60)]
    batch = await client.messages.batches.create(requests=[entry(cid) for cid in ids])
    await ended(client, batch.id)
    first = [(line.custom_id, line.result.message.id) for line in await results(client, batch.id)]  # type: ignore[union-attr]
    second = [(line.custom_id, line.result.message.id) for line in await results(client, batch.id)]  # type: ignore[union-attr]
    assert first == second
    order = [cid for cid, _ in first]
    assert sorted(order) == ids
    assert order != ids  # "in any order": a seeded shuffle, fixed per batch

    sim.update_config({"batches": {"shuffle_results": False}})
    batch = await client.messages.batches.create(requests=[entry(cid) for cid in ids])
    await ended(client, batch.id)
    assert [line.custom_id for line in await results(client, batch.id)] == ids


async def test_list_is_newest_first_and_paginates_like_the_api(
    make_sim: SimFactory, make_client: ClientFactory
) -> None:
    sim = await make_sim(SimulatorConfig(batches={"processing_s": 60.0}))
    client = make_client(sim)
    created = [(await client.messages.batches.create(requests=[entry(f"b{i}")])).id for i in range(5)]
    newest = created[::-1]

    page = await client.messages.batches.list(limit=2)
    assert [b.id for b in page.data] == newest[:2]
    assert (page.has_more, page.first_id, page.last_id) == (True, newest[0], newest[1])
    assert [b.id async for b in client.messages.batches.list(limit=2)] == newest  # follows after_id

    after = await client.messages.batches.list(limit=10, after_id=newest[1])
    assert [b.id for b in after.data] == newest[2:]
    assert after.has_more is False
    before = await client.messages.batches.list(limit=2, before_id=newest[4])
    assert [b.id for b in before.data] == newest[2:4]
    assert before.has_more is True
    # The SDK pages on with before_id=first_id: the newer batches come next.
    upward = [b.id async for b in client.messages.batches.list(limit=2, before_id=newest[4])]
    assert upward == newest[2:4] + newest[0:2]

    for _ in range(16):
        await client.messages.batches.create(requests=[entry("x")])
    default = await client.messages.batches.list()
    assert len(default.data) == 20  # the API's default page
    assert default.has_more is True

    for bad in ({"limit": 0}, {"limit": 1001}, {"after_id": "msgbatch_nope"}):
        with pytest.raises(anthropic.BadRequestError):
            await client.messages.batches.list(**bad)  # type: ignore[arg-type]
    with pytest.raises(anthropic.BadRequestError, match="both"):
        await client.messages.batches.list(before_id=newest[0], after_id=newest[1])


async def test_cancel_ends_the_undecided_entries_canceled(
    make_sim: SimFactory, make_client: ClientFactory
) -> None:
    clock = FakeClock()
    sim = await make_sim(SimulatorConfig(batches={"processing_s": 10.0}), clock=clock)
    client = make_client(sim)
    ids = [f"c{i}" for i in range(10)]
    batch = await client.messages.batches.create(requests=[entry(cid) for cid in ids])
    clock.advance(5.0)  # half the entries are due
    half = await wait_until(client, batch.id, lambda b: b.request_counts.succeeded == 5)
    assert half.processing_status == "in_progress"
    assert half.request_counts == counts(processing=5, succeeded=5)

    canceling = await client.messages.batches.cancel(batch.id)
    assert canceling.processing_status == "canceling"
    assert canceling.cancel_initiated_at is not None
    done = await ended(client, batch.id)
    assert done.request_counts == counts(succeeded=5, canceled=5)
    assert done.cancel_initiated_at == canceling.cancel_initiated_at
    kinds = {line.custom_id: line.result.type for line in await results(client, batch.id)}
    assert sorted(kinds.values()) == ["canceled"] * 5 + ["succeeded"] * 5
    assert set(kinds) == set(ids)
    with pytest.raises(anthropic.BadRequestError, match="ended"):
        await client.messages.batches.cancel(batch.id)
    assert sim.stats()["batches"]["cancels"] == 1
    canceled = next(cid for cid, kind in kinds.items() if kind == "canceled")
    assert sim.calls()["batch_calls_by_custom_id"][canceled] == {"ok": 0, "billed": 0, "all": 1}

    deleted = await client.messages.batches.delete(batch.id)
    assert (deleted.id, deleted.type) == (batch.id, "message_batch_deleted")
    with pytest.raises(anthropic.NotFoundError):
        await client.messages.batches.retrieve(batch.id)
    assert sim.stats()["batches"]["stored"] == 0


async def test_unfinished_entries_expire_at_expires_at(
    make_sim: SimFactory, make_client: ClientFactory
) -> None:
    clock = FakeClock()
    sim = await make_sim(SimulatorConfig(batches={"processing_s": 30.0, "expiry_s": 24.0}), clock=clock)
    client = make_client(sim)
    batch = await client.messages.batches.create(requests=[entry(f"e{i}") for i in range(10)])
    clock.advance(12.0)  # 10 entries over 30 s: 4 are due
    await wait_until(client, batch.id, lambda b: b.request_counts.succeeded == 4)
    clock.advance(20.0)  # past the expiry: the 8 due before it succeed, the rest expire
    done = await ended(client, batch.id)
    assert done.request_counts == counts(succeeded=8, expired=2)
    assert done.ended_at == done.expires_at
    assert sorted(line.result.type for line in await results(client, batch.id)).count("expired") == 2


async def test_expire_rate_leaves_entries_to_expire(make_sim: SimFactory, make_client: ClientFactory) -> None:
    clock = FakeClock()
    config = SimulatorConfig(seed=2, batches={"processing_s": 1.0, "expiry_s": 24.0, "expire_rate": 0.5})
    sim = await make_sim(config, clock=clock)
    client = make_client(sim)
    batch = await client.messages.batches.create(requests=[entry(f"x{i}") for i in range(40)])
    clock.advance(1.0)  # every entry is due: about half are left to expire
    waiting = await wait_until(client, batch.id, lambda b: b.request_counts.processing < 40)
    assert waiting.processing_status == "in_progress"
    stalled = waiting.request_counts.processing
    assert 8 <= stalled <= 32
    assert waiting.request_counts.succeeded == 40 - stalled
    clock.advance(23.0)
    done = await ended(client, batch.id)
    assert done.request_counts == counts(succeeded=40 - stalled, expired=stalled)
    assert done.ended_at == done.expires_at
    assert sim.stats()["batches"]["request_counts"]["expired"] == stalled


async def test_injected_entry_errors_are_seeded(make_sim: SimFactory, make_client: ClientFactory) -> None:
    config = SimulatorConfig(
        seed=7, batches={"processing_s": 0.05, "api_error_rate": 0.3, "overloaded_rate": 0.2}
    )
    outcomes = []
    for _ in range(2):  # two simulators with the same seed draw the same outcomes
        sim = await make_sim(config)
        client = make_client(sim)
        batch = await client.messages.batches.create(requests=[entry(f"p{i}") for i in range(200)])
        done = await ended(client, batch.id)
        lines = await results(client, batch.id)
        errors = {
            line.custom_id: line.result.error.error.type for line in lines if line.result.type == "errored"
        }
        assert done.request_counts == counts(succeeded=200 - len(errors), errored=len(errors))
        by_type = sim.stats()["batches"]["errored_by_type"]
        assert by_type == {
            "api_error": list(errors.values()).count("api_error"),
            "overloaded_error": list(errors.values()).count("overloaded_error"),
        }
        assert 35 <= by_type["api_error"] <= 85  # 30% of 200
        assert 20 <= by_type["overloaded_error"] <= 60  # 20% of 200
        outcomes.append(errors)
    assert outcomes[0] == outcomes[1]


async def test_an_entry_the_simulator_fails_on_errors_alone(
    make_sim: SimFactory, make_client: ClientFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug on one entry (a usage beyond 64 bits once made `compact_json` raise) ended the
    processor task: that batch never ended and every batch endpoint answered 500."""
    from service.simulator.batches import processor

    count = processor.count_input_tokens

    def failing(p: dict[str, object]) -> int:
        if "boom" in str(p["messages"]):
            raise TypeError("Integer exceeds 64-bit range")
        return count(p)

    monkeypatch.setattr(processor, "count_input_tokens", failing)
    sim = await make_sim(SimulatorConfig(seed=7, batches={"processing_s": 0.05}))
    client = make_client(sim)
    first = await client.messages.batches.create(
        requests=[entry("ok-1"), entry("bad", text="boom"), entry("ok-2")]
    )
    done = await ended(client, first.id)
    assert done.request_counts == counts(succeeded=2, errored=1)
    errored = [line for line in await results(client, first.id) if line.result.type == "errored"]
    assert [(line.custom_id, line.result.error.error.type) for line in errored] == [("bad", "api_error")]
    second = await client.messages.batches.create(requests=[entry("next")])
    assert (await ended(client, second.id)).request_counts == counts(succeeded=1)


async def test_results_and_delete_before_the_end_are_refused(
    make_sim: SimFactory, make_client: ClientFactory
) -> None:
    sim = await make_sim(SimulatorConfig(batches={"processing_s": 60.0}))
    client = make_client(sim)
    batch = await client.messages.batches.create(requests=[entry("early")])
    with pytest.raises(anthropic.AnthropicError, match="results_url"):  # the SDK checks first
        await client.messages.batches.results(batch.id)
    with pytest.raises(anthropic.BadRequestError, match="in_progress") as info:  # the URL itself
        await client.get(f"/v1/messages/batches/{batch.id}/results", cast_to=object)
    assert info.value.type == "invalid_request_error"
    assert info.value.request_id is not None
    with pytest.raises(anthropic.BadRequestError, match="cancel it first"):
        await client.messages.batches.delete(batch.id)
    for call in (
        client.messages.batches.retrieve,
        client.messages.batches.cancel,
        client.messages.batches.delete,
    ):
        with pytest.raises(anthropic.NotFoundError) as missing:
            await call("msgbatch_01unknown")
        assert missing.value.type == "not_found_error"


async def test_auth_failures_are_answered_like_messages(
    make_sim: SimFactory, make_client: ClientFactory, http: aiohttp.ClientSession
) -> None:
    sim = await make_sim(SimulatorConfig(api_keys={"alice": "sk-sim-alice"}, batches={"processing_s": 0.0}))
    batch = await make_client(sim).messages.batches.create(requests=[entry("a")])
    await ended(make_client(sim), batch.id)
    bad = make_client(sim, api_key="sk-wrong").messages.batches
    calls = {
        "create": lambda: bad.create(requests=[entry("b")]),
        "retrieve": lambda: bad.retrieve(batch.id),
        "list": lambda: bad.list(),
        "cancel": lambda: bad.cancel(batch.id),
        "delete": lambda: bad.delete(batch.id),
        "results": lambda: bad.results(batch.id),
    }
    for name, call in calls.items():
        with pytest.raises(anthropic.AuthenticationError) as info:
            await call()
        assert info.value.type == "authentication_error", name
        assert str(info.value.request_id).startswith("req_"), name
    async with http.get(f"{sim.url}/v1/messages/batches", headers=headers("sk-sim-alice")) as resp:
        assert resp.status == 200
    no_version = {"x-api-key": "sk-sim-alice"}
    async with http.get(f"{sim.url}/v1/messages/batches", headers=no_version) as resp:
        assert resp.status == 400
        assert "anthropic-version" in (await resp.json())["error"]["message"]
    async with http.put(f"{sim.url}/v1/messages/batches", headers=headers("sk-sim-alice")) as resp:
        assert resp.status == 405
    stats = sim.stats()
    assert stats["batches"]["created"] == 1
    assert stats["status_counts"]["401"] == 6


async def test_a_workspace_sees_only_its_batches(make_sim: SimFactory, make_client: ClientFactory) -> None:
    config = SimulatorConfig(
        api_keys={"alice": "sk-a", "bob": "sk-b"}, workspaces={"team-a": {"keys": ["alice"]}}
    )
    sim = await make_sim(config)
    alice, bob = make_client(sim, api_key="sk-a"), make_client(sim, api_key="sk-b")
    batch = await alice.messages.batches.create(requests=[entry("w")])
    assert [b.id for b in (await alice.messages.batches.list()).data] == [batch.id]
    assert (await bob.messages.batches.list()).data == []
    with pytest.raises(anthropic.NotFoundError):
        await bob.messages.batches.retrieve(batch.id)


async def test_retention_and_reset_forget_batches(
    make_sim: SimFactory, make_client: ClientFactory, http: aiohttp.ClientSession
) -> None:
    clock = FakeClock()
    sim = await make_sim(SimulatorConfig(batches={"processing_s": 0.0, "retention_s": 100.0}), clock=clock)
    client = make_client(sim)
    old = await client.messages.batches.create(requests=[entry("old")])
    await ended(client, old.id)
    clock.advance(50.0)
    young = await client.messages.batches.create(requests=[entry("young")])
    clock.advance(50.0)  # `old` is 100 s old: gone (29 days, compressed); `young` stays
    for _ in range(200):
        if sim.stats()["batches"]["stored"] == 1:
            break
        await asyncio.sleep(0.02)
    with pytest.raises(anthropic.NotFoundError):
        await client.messages.batches.retrieve(old.id)
    assert (await client.messages.batches.retrieve(young.id)).processing_status == "ended"

    async with http.post(f"{sim.url}/_sim/reset") as resp:
        assert resp.status == 200
    assert (await client.messages.batches.list()).data == []
    assert sim.stats()["batches"]["created"] == 0


async def test_processing_time_drawn_in_a_range(make_sim: SimFactory, make_client: ClientFactory) -> None:
    clock = FakeClock()
    config = SimulatorConfig(seed=4, batches={"processing_s": 1.0, "processing_max_s": 5.0})
    sim = await make_sim(config, clock=clock)
    client = make_client(sim)
    ids = [(await client.messages.batches.create(requests=[entry("r")])).id for _ in range(6)]
    clock.advance(5.0)
    durations = set()
    for batch_id in ids:
        done = await ended(client, batch_id)
        assert done.ended_at is not None
        durations.add((done.ended_at - done.created_at).total_seconds())
    assert all(1.0 <= d <= 5.0 for d in durations)
    assert len(durations) > 1


async def test_stored_results_are_small_and_delete_frees_them(
    make_sim: SimFactory, make_client: ClientFactory
) -> None:
    """Per entry: its Message without the text (added when read), not the 4 KB buffer orjson
    returns; a delete frees it all. Measured with tracemalloc around processing only, counting
    what was allocated under the simulator's own code: in the whole suite, threads left by
    earlier tests (exporters, clients) allocate meanwhile too, and once doubled the total."""
    n = 3_000
    clock = FakeClock()
    config = SimulatorConfig(output={"fixed_tokens": 1_000}, batches={"processing_s": 1.0})
    sim = await make_sim(config, clock=clock)
    client = make_client(sim)
    batch = await client.messages.batches.create(
        requests=[entry(f"m{i}", max_tokens=2_000) for i in range(n)]
    )
    simulator = [tracemalloc.Filter(True, "*/service/simulator/*", all_frames=True)]

    def held() -> int:
        gc.collect()
        return sum(t.size for t in tracemalloc.take_snapshot().filter_traces(simulator).traces)

    tracemalloc.start(12)
    try:
        before = held()
        clock.advance(1.0)  # everything is due now
        await ended(client, batch.id)
        stored = held() - before
        await client.messages.batches.delete(batch.id)
        left = held() - before
    finally:
        tracemalloc.stop()
    assert stored > n * 100  # what is counted includes the stored results
    assert stored < n * 800  # a Message with 1,000 tokens of text would be 4 KB alone
    assert left < stored / 2  # what stays: the per-custom_id call counts
    assert len(sim.engine.batches) == 0
