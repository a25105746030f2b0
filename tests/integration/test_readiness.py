"""Issue 12, /readyz with more replicas than partitions, on the real broker.

Readiness means "a working member of the consumer group": a replica that joined the group
but owns no partition (two gateways, one partition) is ready, since it takes partitions at
the next rebalance; a replica that has not joined yet is not. The first replica stays
ready while the second joins (a rebalance does not make members unready).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from service.app import Gateway
from service.simulator import SimulatorConfig, SimulatorServer
from tests.support.gateway import World, make_world

pytestmark = pytest.mark.integration


@pytest.fixture
async def world(kafka_bootstrap: str, tmp_path: Path) -> World:
    return await make_world(kafka_bootstrap, tmp_path, ["acme"], partitions=1)


async def _readyz(gateway: Gateway) -> tuple[int, dict[str, Any]]:
    assert gateway.http is not None
    assert gateway.http.port
    url = f"http://127.0.0.1:{gateway.http.port}/readyz"
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        return r.status, orjson.loads(await r.read())


async def _until_ready(gateway: Gateway, task: asyncio.Task[None], other: Gateway | None = None) -> list[Any]:
    """Poll /readyz of `gateway` (and of `other`, each time) until it is 200; the answers seen."""
    seen: list[Any] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if task.done():
            task.result()
            raise AssertionError("the gateway stopped before it was ready")
        if gateway.http is not None and gateway.http.port:
            status, body = await _readyz(gateway)
            seen.append((status, body["reason"], body["joined"]))
            if other is not None:
                seen.append(("other", *await _readyz(other)))
            if status == 200:
                return seen
        await asyncio.sleep(0.05)
    raise AssertionError(f"not ready after 60s: {gateway.readiness()}; seen {seen[-5:]}")


async def test_two_gateways_on_one_partition_are_both_ready_and_not_before_joining(world: World) -> None:
    sim_cfg = SimulatorConfig.model_validate({"api_keys": world.keys})
    async with SimulatorServer(sim_cfg) as sim:
        first, second = Gateway(world.settings(sim.url)), Gateway(world.settings(sim.url))
        assert second.http is not None
        await second.http.start()  # the endpoint alone: the consumer has not joined
        try:
            status, body = await _readyz(second)
            assert (status, body["reason"]) == (503, "not in the consumer group yet: joining")
            assert (body["joined"], body["partitions"]) == (False, 0)
        finally:
            await second.http.stop()

        stops = [asyncio.Event(), asyncio.Event()]
        task_a = asyncio.create_task(first.run(stops[0]))
        task_b: asyncio.Task[None] | None = None
        try:
            await _until_ready(first, task_a)
            task_b = asyncio.create_task(second.run(stops[1]))
            seen = await _until_ready(second, task_b, other=first)
            for entry in seen:
                if entry[0] == "other":
                    assert entry[1] == 200, f"the first replica went unready while the second joined: {entry}"
                elif entry[0] == 503:
                    assert entry[1:] == ("not in the consumer group yet: joining", False), entry
            owned: list[int] = []
            for _ in range(300):  # both finish the same rebalance, one a moment after the other
                answers = [await _readyz(gateway) for gateway in (first, second)]
                for status, body in answers:
                    assert (status, body["reason"], body["joined"]) == (200, "ok", True), body
                owned = sorted(body["partitions"] for _, body in answers)
                if owned == [0, 1]:
                    break
                await asyncio.sleep(0.1)
            assert owned == [0, 1], "one owns the partition, the other is a ready standby"
        finally:
            for stop in stops:
                stop.set()
            await asyncio.wait_for(asyncio.gather(task_a, *([task_b] if task_b else [])), 60)
