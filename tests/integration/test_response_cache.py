"""The response cache end to end: a real broker, a real Redis, the simulator over real HTTP and
the gateway in-process. Calls per request come from the simulator (`x-gateway-request-id`),
outcomes from the read_committed topics, spend from the budget hashes in Redis.

- a repeated request is served from the cache: `cached: true`, the same message and usage,
  `attempts: 0`, no call, no fair turn, no budget spent;
- partner isolation: the same params from another partner call upstream; a sharing group shares;
- error answers and responses too large to publish are not cached;
- a partner without `cache.enabled` never hits;
- Redis down or slow: every request is still answered (misses), /readyz says so; back: hits again.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import orjson
import pytest
import redis.asyncio as aioredis

from service.app import Gateway
from service.contracts.schemas import validate
from service.simulator import SimulatorServer
from tests.support.gateway import World, collect, make_world, produce, request
from tests.support.outcomes import calls_of, sim_config, start_gateway, stop_gateway, world_with_limits
from tests.support.polling import until
from tests.support.tcp_proxy import TcpProxy
from tests.support.trust import metric

pytestmark = pytest.mark.integration

ON = {"cache": {"enabled": True}}


def _config(
    world: World, sim_url: str, redis_url: str, partners: dict[str, dict[str, Any]], **extra: Any
) -> dict[str, Any]:
    entries = world.settings_dict(sim_url)["partners"]
    return {
        "redis": {"url": redis_url, "key_prefix": f"t-{uuid.uuid4().hex[:8]}", "timeout_s": 0.2},
        "partners": [{**e, **partners.get(e["id"], {})} for e in entries],
        **extra,
    }


def _cache_count(gateway: Gateway, partner: str, result: str) -> float:
    return metric(
        gateway.metrics.registry, "gateway_response_cache_total", {"partner": partner, "result": result}
    )


class Sender:
    """Send one request at a time and wait for its outcome (outcomes accumulate per world)."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.sent = 0

    async def __call__(self, partner: str, rid: str, **kw: Any) -> dict[str, Any]:
        await produce(
            self.world.bootstrap, [(self.world.request_topic(partner), rid.encode(), request(rid, **kw))]
        )
        self.sent += 1
        out = await collect(self.world, self.sent, timeout_s=60)
        docs = [d for d in out.responses + out.dead_letters if d["request_id"] == rid]
        assert len(docs) == 1, f"{rid}: {len(docs)} outcomes"
        return docs[0]


@pytest.fixture
async def world(kafka_bootstrap: str, tmp_path: Path) -> World:
    return await make_world(kafka_bootstrap, tmp_path, ["acme", "globex", "initech"], partitions=1)


async def test_a_repeated_request_is_served_from_the_cache_without_a_call_a_turn_or_spend(
    world: World, redis_url: str
) -> None:
    async with SimulatorServer(sim_config(world)) as sim:
        cfg = _config(world, sim.url, redis_url, {"acme": {**ON, "budget": {"usd_per_day": 100}}})
        gateway, stop, task = await start_gateway(world, sim.url, **cfg)
        send = Sender(world)
        direct = aioredis.Redis.from_url(redis_url)
        try:
            first = await send("acme", "r1", metadata={"n": "1"})
            await until(lambda: _cache_count(gateway, "acme", "store") == 1)
            prefix = cfg["redis"]["key_prefix"]
            budget_keys = [k async for k in direct.scan_iter(match=f"{{{prefix}}}:budget:acme:*")]
            spent = [await direct.hgetall(k) for k in budget_keys]
            turns = metric(gateway.metrics.registry, "gateway_queue_wait_seconds_count", {"partner": "acme"})
            tokens = metric(gateway.metrics.registry, "gateway_tokens_total", {"partner": "acme"})

            hit = await send("acme", "r2", metadata={"n": "2"})

            assert [await direct.hgetall(k) for k in budget_keys] == spent, "a hit spends no budget"
            assert budget_keys, "the budget was kept in Redis"
            reg = gateway.metrics.registry
            assert metric(reg, "gateway_queue_wait_seconds_count", {"partner": "acme"}) == turns == 1
            assert metric(reg, "gateway_tokens_total", {"partner": "acme"}) == tokens > 0
            assert metric(reg, "gateway_response_cache_hit_seconds_count", {"partner": "acme"}) == 1
            assert metric(reg, "gateway_requests_total", {"partner": "acme", "outcome": "response"}) == 2
        finally:
            await stop_gateway(stop, task)
            await direct.aclose()
        calls = calls_of(sim, "acme")

    assert calls == {"r1": {"ok": 1, "billed": 1, "all": 1}}, "one call: r2 never reached Claude"
    validate("response", first)
    validate("response", hit)
    assert first["cached"] is False
    assert first["attempts"] == 1
    assert hit["cached"] is True
    assert hit["attempts"] == 0
    assert hit["message"] == first["message"], "the original message, id and all"
    assert hit["usage"] == first["usage"], "its usage as billed originally"
    assert hit["upstream_request_id"] is None
    assert hit["cached_from"]["upstream_request_id"] == first["upstream_request_id"] is not None
    assert hit["metadata"] == {"n": "2"}, "this request's metadata, not the first one's"
    assert hit["timings"]["upstream_ms"] == 0


async def test_the_same_params_from_another_partner_call_upstream_unless_they_share(
    kafka_bootstrap: str, tmp_path: Path, redis_url: str
) -> None:
    world = await make_world(
        kafka_bootstrap, tmp_path, ["acme", "globex", "initech", "umbrella"], partitions=1
    )
    async with SimulatorServer(sim_config(world)) as sim:
        partners = {p: ON for p in world.partners}
        cfg = _config(world, sim.url, redis_url, partners, response_cache={"share": [["acme", "globex"]]})
        gateway, stop, task = await start_gateway(world, sim.url, **cfg)
        send = Sender(world)
        try:
            a1 = await send("acme", "a1")
            await until(lambda: _cache_count(gateway, "acme", "store") == 1)
            i1 = await send("initech", "i1")  # same params, not in the group: its own miss
            await until(lambda: _cache_count(gateway, "initech", "store") == 1)
            u1 = await send("umbrella", "u1")  # same params, neither acme's nor initech's entry
            g1 = await send("globex", "g1")  # same params, in acme's group: acme's answer
            i2 = await send("initech", "i2")  # initech's own entry
            other = await send("globex", "g2", max_tokens=33)  # other params: a miss in the group
        finally:
            await stop_gateway(stop, task)
        calls = {p: set(calls_of(sim, p)) for p in world.partners}

    assert calls == {"acme": {"a1"}, "globex": {"g2"}, "initech": {"i1"}, "umbrella": {"u1"}}
    assert [d["cached"] for d in (a1, i1, u1, g1, i2, other)] == [False, False, False, True, True, False]
    assert len({orjson.dumps(d["message"]) for d in (a1, i1, u1)}) == 3
    assert g1["message"] == a1["message"]
    assert g1["partner"] == "globex"
    assert i2["message"] == i1["message"]
    assert _cache_count(gateway, "initech", "hit") == 1


async def test_error_answers_and_responses_too_large_to_publish_are_not_cached(
    kafka_bootstrap: str, tmp_path: Path, redis_url: str
) -> None:
    world = await world_with_limits(
        kafka_bootstrap, tmp_path, ["acme"], response_configs={"max.message.bytes": "3000"}
    )
    async with SimulatorServer(sim_config(world, output={"fixed_tokens": 2000})) as sim:
        cfg = _config(world, sim.url, redis_url, {"acme": ON}, retry={"max_attempts": 1})
        gateway, stop, task = await start_gateway(world, sim.url, **cfg)
        send = Sender(world)
        try:
            sim.update_config({"faults": {"api_error_rate": 1.0}})
            e1 = await send("acme", "e1", max_tokens=16)  # a 500, not retried: a dead letter
            sim.update_config({"faults": {"api_error_rate": 0.0}})
            e2 = await send("acme", "e2", max_tokens=16)  # the same params: called, answered
            await until(lambda: _cache_count(gateway, "acme", "store") == 1)
            e3 = await send("acme", "e3", max_tokens=16)  # now a hit
            big1 = await send("acme", "big1", max_tokens=2000)  # answered, over the topic's limit
            big2 = await send("acme", "big2", max_tokens=2000)
        finally:
            await stop_gateway(stop, task)
        calls = calls_of(sim, "acme")

    assert e1["reason"] == "retries_exhausted"
    assert e1["upstream"]["status"] == 500
    assert e2["cached"] is False
    assert e3["cached"] is True
    assert e3["message"] == e2["message"]
    assert (big1["reason"], big2["reason"]) == ("response_too_large", "response_too_large")
    assert set(calls) == {"e1", "e2", "big1", "big2"}, "e1's error was not cached; big1 was not stored"
    assert calls["big2"]["ok"] == 1
    assert _cache_count(gateway, "acme", "store") == 1


async def test_a_partner_without_cache_enabled_never_hits(world: World, redis_url: str) -> None:
    async with SimulatorServer(sim_config(world)) as sim:
        cfg = _config(world, sim.url, redis_url, {"acme": ON})  # globex: the default, off
        gateway, stop, task = await start_gateway(world, sim.url, **cfg)
        send = Sender(world)
        try:
            docs = [await send("globex", f"g{i}") for i in range(3)]
        finally:
            await stop_gateway(stop, task)
        calls = calls_of(sim, "globex")

    assert [d["cached"] for d in docs] == [False, False, False]
    assert set(calls) == {"g0", "g1", "g2"}
    assert metric(gateway.metrics.registry, "gateway_response_cache_total", {"partner": "globex"}) == 0


@pytest.fixture
async def proxy(redis_url: str) -> AsyncIterator[TcpProxy]:
    p = TcpProxy(urlparse(redis_url).port or 6379)
    await p.start()
    yield p
    await p.stop()


async def test_redis_down_or_slow_requests_are_still_answered_as_misses(
    world: World, proxy: TcpProxy
) -> None:
    async with SimulatorServer(sim_config(world)) as sim:
        cfg = _config(world, sim.url, proxy.url, {"acme": ON})
        gateway, stop, task = await start_gateway(world, sim.url, **cfg)
        send = Sender(world)
        try:
            d1 = await send("acme", "d1")
            await until(lambda: _cache_count(gateway, "acme", "store") == 1)
            await proxy.stop()  # the outage
            d2 = await send("acme", "d2")
            d3 = await send("acme", "d3")
            status = gateway.status()["redis"]
            await proxy.start()  # back: the shared health's probe finds it
            await until(lambda: not gateway.redis_degraded)
            d4 = await send("acme", "d4")
            proxy.delay_s = 0.5  # slow: the lookup times out (timeout_s 0.2)
            d5 = await send("acme", "d5")
            slow_state = gateway.redis_health.state if gateway.redis_health else None
            proxy.delay_s = 0.0
            # The lookup is one timed-out call; the budget's and the limiter's calls in the same
            # half second may make it three in a row, which is `down` by design (a single slow
            # call is not an outage: test_redis_outage.py). Either way the probe brings it back.
            await until(lambda: not gateway.redis_degraded)
            d6 = await send("acme", "d6")
        finally:
            await stop_gateway(stop, task)
        calls = calls_of(sim, "acme")

    assert [d.get("cached") for d in (d1, d2, d3, d4, d5, d6)] == [False, False, False, True, False, True]
    assert set(calls) == {"d1", "d2", "d3", "d5"}
    assert slow_state in ("slow", "down"), "the timed-out lookup was seen"
    assert status["state"] == "down"
    assert status["local_fallback"]["response_cache"] is True
    assert _cache_count(gateway, "acme", "unavailable") == 3
    assert _cache_count(gateway, "acme", "skip_unavailable") == 3
    assert d4["message"] == d1["message"]
    assert orjson.loads(orjson.dumps(d4))["cached_from"]["upstream_request_id"] == d1["upstream_request_id"]
