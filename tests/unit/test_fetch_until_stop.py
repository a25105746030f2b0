"""The ingest loop's and the batch worker's fetches give up when the replica is asked to stop,
even while aiokafka waits for a rebalance to end (service/ingest/fetch.py, `until_stopped`)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any, cast

from aiokafka import AIOKafkaConsumer, TopicPartition

from service.ingest.fetch import Fetched, fetch, until_stopped

TP = TopicPartition("claude.requests.p", 0)


def _fetch(consumer: _Consumer, stop: asyncio.Event) -> Any:
    c = cast(AIOKafkaConsumer, consumer)
    return until_stopped(c, stop, fetch(c, timeout_ms=100), Fetched())


class _Consumer:
    """getmany as aiokafka's while a rebalance is in progress: it waits for the next assignment,
    whatever its timeout; the assignment comes when `assigned` is set."""

    def __init__(self, rebalancing: bool) -> None:
        self._subscription = SimpleNamespace(reassignment_in_progress=rebalancing)
        self.assigned = asyncio.Event()
        self.cancelled = False

    async def getmany(self, *_: Any, timeout_ms: int, **__: Any) -> dict[TopicPartition, list[Any]]:
        if self._subscription.reassignment_in_progress:
            try:
                await self.assigned.wait()
            except asyncio.CancelledError:
                self.cancelled = True
                raise
        return {TP: ["a record"]}


async def test_a_stop_ends_the_wait_for_a_rebalance() -> None:
    consumer, stop = _Consumer(rebalancing=True), asyncio.Event()
    fetching = asyncio.create_task(_fetch(consumer, stop))
    await asyncio.sleep(0.3)  # well past the timeout: aiokafka still waits
    assert not fetching.done()
    stop.set()
    fetched = await asyncio.wait_for(fetching, 1.0)
    assert len(fetched) == 0
    await asyncio.sleep(0)
    assert consumer.cancelled  # the wait in getmany was given up, not left behind


async def test_records_come_as_usual_when_the_rebalance_ends_first() -> None:
    consumer, stop = _Consumer(rebalancing=True), asyncio.Event()
    fetching = asyncio.create_task(_fetch(consumer, stop))
    await asyncio.sleep(0.05)
    consumer.assigned.set()
    fetched = await asyncio.wait_for(fetching, 1.0)
    assert fetched.records == {TP: ["a record"]}


async def test_no_rebalance_no_race() -> None:
    consumer, stop = _Consumer(rebalancing=False), asyncio.Event()
    stop.set()  # not looked at: a plain fetch
    fetched = await _fetch(consumer, stop)
    assert fetched.records == {TP: ["a record"]}


async def test_the_batch_worker_s_plain_getmany_gives_up_too() -> None:
    consumer, stop = _Consumer(rebalancing=True), asyncio.Event()
    c = cast(AIOKafkaConsumer, consumer)
    fetching = asyncio.create_task(until_stopped(c, stop, c.getmany(timeout_ms=200, max_records=1000), {}))
    await asyncio.sleep(0.3)
    stop.set()
    assert await asyncio.wait_for(fetching, 1.0) == {}
