"""The ingest loop's task per record (service/ingest/consumer.py `_spawn`): its bookkeeping
holds even when the task is cancelled before it ever ran, as a revocation or the drain can do
right after a fetch dispatched it. Seen in CI (test_replicas' join and leave, run on two
workers): `coroutine 'Pipeline.handle' was never awaited`; the partner's outstanding count,
which backpressure reads, never came back down."""

from __future__ import annotations

import asyncio
from typing import Any, cast

from aiokafka import ConsumerRecord, TopicPartition

from service.config.loader import parse_config
from service.ingest.consumer import IngestLoop
from service.ingest.ownership import RecordSink
from service.pipeline import Pipeline
from service.telemetry.metrics import Metrics
from tests.support.sink import MemorySink

TP = TopicPartition("claude.requests.acme", 0)


class _Pipeline:
    def __init__(self) -> None:
        self.started: list[int] = []

    async def handle(self, rec: Any, sink: Any) -> None:
        self.started.append(rec.offset)
        await asyncio.sleep(0.01)


def _loop(pipeline: _Pipeline) -> IngestLoop:
    settings = parse_config({"partners": []})
    return IngestLoop(settings, cast(Pipeline, pipeline), Metrics(), lambda: cast(Any, None))


def _record(offset: int) -> ConsumerRecord[bytes, bytes]:
    return ConsumerRecord(TP.topic, TP.partition, offset, 0, 0, b"k", b"{}", None, 1, 2, [])


async def test_a_record_task_cancelled_before_it_ran_leaves_nothing_outstanding() -> None:
    pipeline = _Pipeline()
    loop = _loop(pipeline)
    for offset in range(3):
        loop._spawn(TP, cast(RecordSink, MemorySink(offset)), "acme", _record(offset))
    assert loop.outstanding() == {"acme": 3}
    tasks = [task for _, task in loop.ownership.sinks[TP].values()]
    tasks[0].cancel()  # before it ran: the revocation came in the same loop turn
    await asyncio.gather(*tasks, return_exceptions=True)
    await asyncio.sleep(0)  # done callbacks
    assert pipeline.started == [1, 2]
    assert loop.outstanding() == {"acme": 0}
    assert loop.ownership.sinks[TP] == {}


async def test_a_record_task_that_ran_counts_as_finished_and_leaves_nothing_outstanding() -> None:
    pipeline = _Pipeline()
    loop = _loop(pipeline)
    loop._spawn(TP, cast(RecordSink, MemorySink(7)), "acme", _record(7))
    (task,) = [task for _, task in loop.ownership.sinks[TP].values()]
    await task
    await asyncio.sleep(0)
    assert pipeline.started == [7]
    assert loop.outstanding() == {"acme": 0}
    assert loop._finished["acme"] == 1
