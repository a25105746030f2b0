"""Takeovers: one that fails for a reason not the broker's is tried again, and a replica on
its way out takes no partition over and leaves no writer behind.

Between the drain and the consumer leaving the group the replica is still a
member: a rebalance then (another replica joining or leaving) assigns it
partitions. Found by CI: such a rebalance opened writers whose takeover read
commits through a consumer already stopped (`Task exception was never
retrieved`), and their transactional producers were never closed.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from service.app import Gateway
from service.ingest.partition import State
from service.simulator import SimulatorConfig, SimulatorServer
from tests.support.gateway import World, collect, make_world, produce, spread
from tests.support.polling import until

pytestmark = pytest.mark.integration


@pytest.fixture
async def world(kafka_bootstrap: str, tmp_path: Path) -> World:
    return await make_world(kafka_bootstrap, tmp_path, ["acme", "globex"], partitions=2)


@pytest.fixture
async def sim(world: World) -> AsyncIterator[SimulatorServer]:
    async with SimulatorServer(SimulatorConfig.model_validate({"api_keys": world.keys, "seed": 3})) as s:
        yield s


async def test_a_rebalance_after_the_drain_opens_no_writer(world: World, sim: SimulatorServer) -> None:
    gateway = Gateway(world.settings(sim.url), serve_http=False)
    ingest = gateway.ingest
    ownership = ingest.ownership
    real_stop = ingest.stop
    seen: dict[str, object] = {}

    async def rebalanced_then_stop() -> None:
        # drained; the consumer is still in the group and a rebalance assigns it everything
        ingest.on_assigned(assigned)
        seen["starting"] = dict(ownership._starting)
        seen["writers"] = dict(ownership.writers)
        await asyncio.sleep(1.0)  # what an opened writer's takeover would do meanwhile
        await real_stop()

    ingest.stop = rebalanced_then_stop  # type: ignore[method-assign]  # bound when `run` starts it
    stop = asyncio.Event()
    task = asyncio.create_task(gateway.run(stop))
    await until(lambda: len(ownership.ready) == 4, 60)
    assigned = list(ownership.writers)
    stop.set()
    await asyncio.wait_for(task, 60)
    assert seen == {"starting": {}, "writers": {}}, "a draining replica took partitions over"


async def test_stopping_without_a_drain_closes_the_writers_still_starting(
    world: World, sim: SimulatorServer
) -> None:
    """`stop` before `run` ever drained (a start-up step failed): the takeovers under way are
    cancelled and awaited, and their writers closed, before the consumer goes."""
    gateway = Gateway(world.settings(sim.url), serve_http=False)
    ingest = gateway.ingest
    ownership = ingest.ownership

    async def hanging(*_: object, **__: object) -> tuple[int | None, str]:
        await asyncio.Event().wait()
        return None, ""

    ownership._fetch_committed = hanging  # type: ignore[method-assign]  # each takeover hangs
    await ingest.start()  # the group's assignment comes; `run` never does
    try:
        await until(lambda: len(ownership._starting) == 4, 60)
        starting = list(ownership._starting.values())
        writers = list(ownership.writers.values())
        await asyncio.sleep(0.5)
        assert not any(t.done() for t in starting)
    finally:
        await ingest.stop()
    assert all(t.done() for t in starting)
    assert [t.exception() for t in starting if not t.cancelled()] == []
    assert {w.state for w in writers} == {State.CLOSED}
    assert ownership.writers == {}
    assert ownership._starting == {}


async def test_a_takeover_that_fails_unexpectedly_is_tried_again(world: World, sim: SimulatorServer) -> None:
    """Not only the broker's errors: a takeover given up would leave its partition unread
    until the next rebalance, its requests without an outcome."""
    gateway = Gateway(world.settings(sim.url), serve_http=False)
    ownership = gateway.ingest.ownership
    real = ownership._fetch_committed
    failed: list[object] = []

    async def fails_once_per_partition(tp: object, stable: bool = True) -> tuple[int | None, str]:
        if tp not in failed:
            failed.append(tp)
            raise RuntimeError("unexpected")
        return await real(tp, stable)  # type: ignore[arg-type]

    ownership._fetch_committed = fails_once_per_partition  # type: ignore[method-assign]
    await produce(world.bootstrap, spread(world, 40, "t"))
    stop = asyncio.Event()
    task = asyncio.create_task(gateway.run(stop))
    try:
        out = await collect(world, 40, timeout_s=90)
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)
    assert len(failed) == 4
    assert sorted(out.request_ids()) == sorted(f"t-{i}" for i in range(40))
