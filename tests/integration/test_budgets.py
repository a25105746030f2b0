"""Budgets end to end: real broker, real Redis, the Claude simulator.

- A partner with a small USD budget is cut off at the request whose reservation no longer fits
  (so what is left is less than one reservation), while another partner is not affected.
- The counters live in Redis: a restarted gateway still refuses, and a reload that raises the
  budget lets the partner through again without a restart. A Redis that loses the gateway's
  data gets the counters back from the replica's copy: the partner stays cut off.
- `on_exhausted: defer` holds requests instead of dead-lettering them; the partner's partitions
  are paused once its queue is full, and a reload raising the budget releases everything.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from service.app import Gateway
from service.simulator import SimulatorConfig, SimulatorServer
from tests.support.gateway import World, collect, committed_offsets, make_world, produce, request
from tests.support.trust import metric

pytestmark = pytest.mark.integration

IN_USD, OUT_USD = 1.0, 5.0  # claude-haiku-4-5 per Mtok, the default price table
MAX_TOKENS = 200
BUDGET_USD = 0.004


def _nano_cost(usage: dict[str, Any]) -> int:
    return round(
        (usage.get("input_tokens", 0) * IN_USD + usage.get("output_tokens", 0) * OUT_USD
         + (usage.get("cache_read_input_tokens") or 0) * 0.1
         + (usage.get("cache_creation_input_tokens") or 0) * 1.25) * 1000
    )  # fmt: skip


def _nano_reservation(value: bytes) -> int:
    est_input = math.ceil(len(value) / 3.0)  # runtime.estimate_chars_per_token default
    return math.ceil((est_input * IN_USD + MAX_TOKENS * OUT_USD) * 1000)


@pytest.fixture
async def world(kafka_bootstrap: str, tmp_path: Path) -> World:
    return await make_world(kafka_bootstrap, tmp_path, ["acme", "globex", "initech"])


def _overrides(
    world: World, redis_url: str, prefix: str, acme_budget: float, **initech: Any
) -> dict[str, Any]:
    key = world.key_dir
    return {
        "redis": {"url": redis_url, "key_prefix": prefix},
        "runtime": {"budget_defer_poll_s": 0.5},
        "partners": [
            {
                "id": "acme",
                "api_key": {"file": str(key / "acme.key")},
                "budget": {"usd_per_day": acme_budget},
            },
            {"id": "globex", "api_key": {"file": str(key / "globex.key")}},
            {"id": "initech", "api_key": {"file": str(key / "initech.key")}, **initech},
        ],
    }


async def _one(world: World, rid: str, already: int) -> dict[str, Any]:
    """Send one acme request and wait for its outcome (outcomes so far: `already`)."""
    value = request(rid, max_tokens=MAX_TOKENS)
    await produce(world.bootstrap, [(world.request_topic("acme"), rid.encode(), value)])
    out = await collect(world, already + 1, timeout_s=60)
    for doc in out.responses + out.dead_letters:
        if doc["request_id"] == rid:
            return doc
    raise AssertionError(f"no outcome for {rid}")


async def _lose_redis_data(redis_url: str, prefix: str) -> None:
    """Every key of the gateway's prefix gone, as after a restart of a Redis that kept nothing."""
    client = aioredis.Redis.from_url(redis_url)
    try:
        await client.delete(*[k async for k in client.scan_iter(match=f"{{{prefix}}}:*")])
    finally:
        await client.aclose()


async def test_small_budget_cuts_off_at_the_right_request_and_survives_a_restart(
    world: World, redis_url: str
) -> None:
    prefix = f"gw-{uuid.uuid4().hex[:8]}"
    budget_nano = round(BUDGET_USD * 1e9)
    sim_cfg = SimulatorConfig.model_validate({"api_keys": world.keys, "seed": 11})
    async with SimulatorServer(sim_cfg) as sim:
        settings = world.settings(sim.url, **_overrides(world, redis_url, prefix, BUDGET_USD))
        gateway = Gateway(settings, serve_http=False)
        stop = asyncio.Event()
        task = asyncio.create_task(gateway.run(stop))
        try:
            # the other partner, unlimited, runs alongside
            globex = world.request_topic("globex")
            await produce(
                world.bootstrap, [(globex, None, request(f"g-{i}", max_tokens=200)) for i in range(20)]
            )
            spent, outcomes, cut_at = 0, 20, None
            for i in range(40):
                rid = f"a-{i}"
                reservation = _nano_reservation(request(rid, max_tokens=MAX_TOKENS))
                doc = await _one(world, rid, outcomes)
                outcomes += 1
                fits = spent + reservation <= budget_nano
                if "reason" in doc:
                    assert doc["reason"] == "budget_exhausted", doc
                    assert not fits, f"{rid} refused although {spent} + {reservation} <= {budget_nano}"
                    assert "partners[acme].budget.usd_per_day" in doc["detail"]
                    assert doc["retryable"] is True
                    cut_at = cut_at if cut_at is not None else i
                    if i >= cut_at + 2:
                        break
                else:
                    assert fits, f"{rid} admitted although {spent} + {reservation} > {budget_nano}"
                    assert cut_at is None, "once cut off, a partner stays cut off"
                    spent += _nano_cost(doc["usage"])
            assert cut_at is not None, "the budget must run out"
            assert cut_at >= 2, "the budget allows a few requests, then none"
            assert budget_nano - spent < reservation, "cut off within one request's reservation"
            remaining = metric(gateway.metrics.registry, "gateway_budget_remaining_usd", {"partner": "acme"})
            assert remaining == pytest.approx((budget_nano - spent) / 1e9)

            out = await collect(world, outcomes)
            globex = [d for d in out.responses if d["partner"] == "globex"]
            assert len(globex) == 20, "the other partner is unaffected"
            assert not [d for d in out.dead_letters if d["partner"] == "globex"]

            # Redis loses the gateway's data (restarted without persistence): the replica writes
            # its copy of the counters back, and acme stays cut off
            await _lose_redis_data(redis_url, prefix)
            doc = await _one(world, "after-redis-lost-its-data", outcomes)
            outcomes += 1
            assert doc.get("reason") == "budget_exhausted", "the budget restarted from zero"
            assert metric(gateway.metrics.registry, "gateway_redis_data_lost_total") == 1
        finally:
            stop.set()
            await asyncio.wait_for(task, 60)

        # the counter is in Redis: every reservation settled to the real cost
        client = aioredis.Redis.from_url(redis_url)
        try:
            day = time.strftime("%Y-%m-%d", time.gmtime())
            stored = await client.hgetall(f"{{{prefix}}}:budget:acme:day:{day}")
        finally:
            await client.aclose()
        assert int(stored[b"nusd"]) == spent

        # a new gateway (a restart) still refuses; a reload raising the budget lets it through
        gateway = Gateway(settings, serve_http=False)
        stop = asyncio.Event()
        task = asyncio.create_task(gateway.run(stop))
        try:
            doc = await _one(world, "after-restart", outcomes)
            outcomes += 1
            assert doc.get("reason") == "budget_exhausted"
            gateway.reload(world.settings(sim.url, **_overrides(world, redis_url, prefix, 1.0)))
            doc = await _one(world, "after-reload", outcomes)
            outcomes += 1
            assert "reason" not in doc, doc
        finally:
            stop.set()
            await asyncio.wait_for(task, 60)
    committed = await committed_offsets(world, f"{world.tag}-gateway")
    assert sum(committed.values()) == outcomes


async def test_defer_holds_requests_pauses_partitions_and_a_raised_budget_releases_them(
    world: World, redis_url: str
) -> None:
    prefix = f"gw-{uuid.uuid4().hex[:8]}"
    n = 30
    initech = {"budget": {"usd_per_day": 0.0035, "on_exhausted": "defer"}, "max_queue": 6}
    sim_cfg = SimulatorConfig.model_validate({"api_keys": world.keys, "seed": 12})
    async with SimulatorServer(sim_cfg) as sim:
        settings = world.settings(sim.url, **_overrides(world, redis_url, prefix, 1.0, **initech))
        gateway = Gateway(settings, serve_http=False)
        stop = asyncio.Event()
        task = asyncio.create_task(gateway.run(stop))
        try:
            initech_topic = world.request_topic("initech")
            await produce(
                world.bootstrap, [(initech_topic, None, request(f"i-{i}", max_tokens=200)) for i in range(n)]
            )
            await produce(
                world.bootstrap, [(world.request_topic("globex"), None, request(f"g-{i}")) for i in range(5)]
            )
            first = await collect(world, 5 + 3, timeout_s=60, settle_s=2.0)
            held = n - len([d for d in first.responses if d["partner"] == "initech"])
            assert held > 0
            assert not first.dead_letters, "deferred, not dead-lettered"
            assert len([d for d in first.responses if d["partner"] == "globex"]) == 5, "others unaffected"
            deadline = time.monotonic() + 5  # a slot freed a moment ago may still be refilling
            while True:
                paused = [
                    tp
                    for tp in gateway.ingest.consumer.paused()
                    if tp.topic == world.request_topic("initech")
                ]
                if paused or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.05)
            assert gateway.ingest.outstanding()["initech"] <= 6, "never more held than max_queue"
            assert paused, "a full queue of held requests pauses the partner's partitions"
            assert metric(gateway.metrics.registry, "gateway_paused_partitions", {"partner": "initech"}) > 0
            events = [f for e, f in gateway.audit.emitted if e == "budget_exhausted"]
            assert [f["partner"] for f in events] == ["initech"]
            assert events[0]["on_exhausted"] == "defer"

            raised = {**initech, "budget": {"usd_per_day": 10.0, "on_exhausted": "defer"}}
            gateway.reload(world.settings(sim.url, **_overrides(world, redis_url, prefix, 1.0, **raised)))
            out = await collect(world, n + 5, timeout_s=90, settle_s=1.0)
        finally:
            stop.set()
            await asyncio.wait_for(task, 60)
    assert not out.dead_letters
    assert sorted(d["request_id"] for d in out.responses if d["partner"] == "initech") == sorted(
        f"i-{i}" for i in range(n)
    )
    committed = await committed_offsets(world, f"{world.tag}-gateway")
    assert sum(committed.values()) == n + 5
