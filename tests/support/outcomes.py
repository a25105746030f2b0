"""Helpers for the outcome-guarantee tests: worlds with topic size limits, an in-process
gateway, per-request call counts from the simulator, and a raw record builder that writes
header names that are not UTF-8 (the standard producer cannot)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.producer.message_accumulator import BatchBuilder
from aiokafka.record.default_records import _DefaultRecordBatchBuilderPy

from service.app import Gateway
from service.simulator import SimulatorConfig, SimulatorServer
from tests.support.gateway import World

RawHeaders = list[tuple[str, bytes | None]]
Message = tuple[str, bytes | None, bytes | None]
"""(topic, key, value), as `tests.support.gateway.produce` takes them."""


async def world_with_limits(
    bootstrap: str,
    tmp: Path,
    partners: list[str],
    partitions: int = 1,
    response_configs: dict[str, str] | None = None,
    deadletter_configs: dict[str, str] | None = None,
) -> World:
    """A world (as `make_world` makes it) whose response and dead-letter topics have these configs."""
    tag = f"t{uuid.uuid4().hex[:10]}"
    keys = {p: f"sk-ant-{p}-{uuid.uuid4().hex}" for p in partners}
    for p, k in keys.items():
        (tmp / f"{p}.key").write_text(k)
    world = World(bootstrap, tag, partners, keys, tmp, partitions)
    configs = {world.response_topic(p): response_configs for p in partners}
    configs.update({world.deadletter_topic(p): deadletter_configs for p in partners})
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(t, partitions, 1, topic_configs=configs.get(t)) for t in world.all_topics()]
        )
    finally:
        await admin.close()
    return world


def sim_config(world: World, **kw: Any) -> SimulatorConfig:
    return SimulatorConfig.model_validate({"api_keys": world.keys, "seed": 7, **kw})


def partners_with(world: World, sim_url: str, **extra: dict[str, Any]) -> dict[str, Any]:
    """The `partners` override: each partner's default entry plus `extra[partner_id]`."""
    entries = world.settings_dict(sim_url)["partners"]
    return {"partners": [{**e, **extra.get(e["id"], {})} for e in entries]}


async def start_gateway(
    world: World, sim_url: str, **overrides: Any
) -> tuple[Gateway, asyncio.Event, asyncio.Task[None]]:
    gateway = Gateway(world.settings(sim_url, **overrides), serve_http=False)
    stop = asyncio.Event()
    return gateway, stop, asyncio.create_task(gateway.run(stop))


async def stop_gateway(stop: asyncio.Event, task: asyncio.Task[None]) -> None:
    """Stop a gateway that must still be running (a crashed one fails the test here)."""
    assert not task.done(), f"the gateway stopped by itself: {task.exception()!r}"
    stop.set()
    await asyncio.wait_for(task, 60)


def calls_of(sim: SimulatorServer, partner: str) -> dict[str, dict[str, int]]:
    """request id -> {ok, billed, all} for one partner's calls."""
    prefix = f"{partner}:"
    return {
        key.removeprefix(prefix): counts
        for key, counts in sim.calls()["calls_by_request"].items()
        if key.startswith(prefix)
    }


class RawName(str):
    """A header name that the pure-Python batch builder writes as these exact bytes."""

    raw: bytes

    def __new__(cls, raw: bytes) -> RawName:
        name = super().__new__(cls, raw.decode("latin-1"))
        name.raw = raw
        return name

    def encode(self, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        return self.raw


class _RawBatch(BatchBuilder):  # type: ignore[misc]
    def __init__(self) -> None:
        super().__init__(1 << 20, 0, is_transactional=0)
        self._builder = _DefaultRecordBatchBuilderPy(2, 0, 0, -1, -1, 0, 1 << 20)

    def _set_producer_state(self, producer_id: int, producer_epoch: int, base_sequence: int) -> None:
        self._builder.set_producer_state(producer_id, producer_epoch, base_sequence)


async def send_raw_batch(
    bootstrap: str, topic: str, partition: int, records: Sequence[tuple[bytes, bytes, RawHeaders]]
) -> None:
    """One record batch of (key, value, headers), written byte for byte, in this order."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        batch = _RawBatch()
        for key, value, headers in records:
            assert batch.append(timestamp=None, key=key, value=value, headers=headers) is not None
        await (await producer.send_batch(batch, topic, partition=partition))
    finally:
        await producer.stop()
