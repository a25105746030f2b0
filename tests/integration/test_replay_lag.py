"""Issue 12, replay protection on the clock of the staleness check, on the real broker.

The request topic keeps LogAppendTime, so a backlog does not go stale. A partner signs a
request and produces it, then a backlog, then a verbatim copy of the request, all within
`max_skew_s` of the signature (1 s; the replay window is its default, 2 s). The partner's
queue is tiny and Claude slow, so the gateway reads the copy several seconds (more than
the window) after the original: the copy must be refused as `replay`, exactly once, while
every other request is answered.

- one gateway: its in-process store holds the sighting;
- two gateways sharing Redis, the copy on a partition the other replica reads: Redis does.
"""

from __future__ import annotations

import asyncio
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from claude_gateway_client.signing import sign

from service.app import Gateway
from service.simulator import SimulatorConfig, SimulatorServer
from tests.support.gateway import World, collect, make_world, request
from tests.support.outcomes import start_gateway

pytestmark = pytest.mark.integration

SECRET = "replay-lag-signing-secret-0123"
WINDOW_S = 2.0  # 2 x max_skew_s
BACKLOG = 9
LATENCY_S = 0.5


@pytest.fixture
async def world(kafka_bootstrap: str, tmp_path: Path) -> World:
    return await make_world(
        kafka_bootstrap,
        tmp_path,
        ["acme"],
        partitions=2,
        request_configs={"message.timestamp.type": "LogAppendTime"},
    )


def _overrides(world: World, sim_url: str, redis_url: str | None = None) -> dict[str, Any]:
    (world.key_dir / "acme.sign").write_text(SECRET)
    acme = world.settings_dict(sim_url)["partners"][0]
    acme["signing"] = {
        "required": True,
        "keys": {"k1": {"file": str(world.key_dir / "acme.sign")}},
        "max_skew_s": 1,
    }
    acme["max_concurrency"] = 1
    acme["max_queue"] = 2  # the partition pauses: the backlog waits in Kafka
    extra: dict[str, Any] = {"partners": [acme]}
    if redis_url is not None:
        extra["redis"] = {"url": redis_url, "key_prefix": world.tag}
    return extra


def _signed(world: World, rid: str) -> tuple[bytes, bytes, list[tuple[str, bytes]]]:
    value = request(rid, max_tokens=8)
    return rid.encode(), value, sign(world.request_topic("acme"), rid.encode(), value, rid, "k1", SECRET)


async def _produce(
    world: World, records: list[tuple[int, tuple[bytes, bytes, list[tuple[str, bytes]]]]]
) -> None:
    """All at once, in order: appended within a fraction of `max_skew_s`."""
    producer = AIOKafkaProducer(bootstrap_servers=world.bootstrap, acks="all", linger_ms=20)
    await producer.start()
    try:
        futures = [
            await producer.send(world.request_topic("acme"), value, key=key, headers=headers, partition=p)
            for p, (key, value, headers) in records
        ]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def _owned(gateways: list[Gateway], tasks: list[asyncio.Task[None]], counts: list[int]) -> None:
    for _ in range(600):
        for t in tasks:
            if t.done():
                t.result()
        if sorted(len(g.ingest.ownership.ready) for g in gateways) == counts:
            return
        await asyncio.sleep(0.1)
    raise AssertionError("the partitions were not assigned as expected")


def _ts(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def _check(world: World, outcomes: Any, copy_partition: int) -> None:
    rids = [d["request_id"] for d in outcomes.responses]
    assert sorted(rids) == sorted(["orig", *(f"b{i}" for i in range(BACKLOG))]), rids
    assert len(outcomes.dead_letters) == 1, outcomes.dead_letters
    dl = outcomes.dead_letters[0]
    assert (dl["request_id"], dl["reason"]) == ("orig", "replay"), dl
    assert dl["original"]["partition"] == copy_partition
    assert f"{world.request_topic('acme')}/0/0" in dl["detail"]
    original = next(d for d in outcomes.responses if d["request_id"] == "orig")
    lag = _ts(dl["failed_at"]) - _ts(original["timings"]["received_at"])
    # the scenario itself: the copy was read later than the window after the original
    assert lag > WINDOW_S, f"the copy was read only {lag:.1f}s after the original"


def _sim(world: World) -> SimulatorConfig:
    return SimulatorConfig.model_validate(
        {"api_keys": world.keys, "latency": {"distribution": "fixed", "fixed_s": LATENCY_S}}
    )


async def test_a_lagging_gateway_refuses_a_copy_appended_in_time(world: World) -> None:
    async with SimulatorServer(_sim(world)) as sim:
        gateway, stop, task = await start_gateway(world, sim.url, **_overrides(world, sim.url))
        try:
            await _owned([gateway], [task], [2])
            orig = _signed(world, "orig")
            backlog = [(0, _signed(world, f"b{i}")) for i in range(BACKLOG)]
            await _produce(world, [(0, orig), *backlog, (0, orig)])
            outcomes = await collect(world, BACKLOG + 2, timeout_s=90, settle_s=1.0)
        finally:
            stop.set()
            await asyncio.wait_for(task, 60)
    _check(world, outcomes, copy_partition=0)


async def test_a_late_copy_read_by_another_replica_is_refused_through_redis(
    world: World, redis_url: str
) -> None:
    async with SimulatorServer(_sim(world)) as sim:
        overrides = _overrides(world, sim.url, redis_url)
        started = [await start_gateway(world, sim.url, **overrides) for _ in range(2)]
        gateways, tasks = [g for g, _, _ in started], [t for _, _, t in started]
        try:
            await _owned(gateways, tasks, [1, 1])
            orig = _signed(world, "orig")
            backlog = [(1, _signed(world, f"b{i}")) for i in range(BACKLOG)]
            await _produce(world, [(0, orig), *backlog, (1, orig)])
            outcomes = await collect(world, BACKLOG + 2, timeout_s=90, settle_s=1.0)
        finally:
            for _, stop, _ in started:
                stop.set()
            await asyncio.wait_for(asyncio.gather(*tasks), 60)
    _check(world, outcomes, copy_partition=1)
