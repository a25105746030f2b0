"""Read a topic from a point in time to its end, as downstream consumers must (read_committed)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterable
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

from service.config.kafka import client_kwargs
from service.config.settings import KafkaSettings

READ_TIMEOUT_S = 60.0


def consumer(settings: KafkaSettings) -> AIOKafkaConsumer:
    """A consumer in no group (nothing committed): the tools only read."""
    return AIOKafkaConsumer(
        **client_kwargs(settings),
        group_id=None,
        enable_auto_commit=False,
        isolation_level="read_committed",
        auto_offset_reset="earliest",
    )


async def read(
    c: AIOKafkaConsumer, topics: Iterable[str], since_ms: int | None = None
) -> AsyncIterator[ConsumerRecord[Any, Any]]:
    """Every committed record of `topics` from `since_ms` (record timestamp; None: the
    beginning) up to the end offsets as they were when reading started. Missing topics
    are skipped."""
    # the consumer holds no metadata for topics it is not subscribed to: ask for all of it
    cluster = await c._client.fetch_all_metadata()
    tps: list[TopicPartition] = []
    for topic in topics:
        tps += [TopicPartition(topic, p) for p in sorted(cluster.partitions_for_topic(topic) or ())]
    if not tps:
        return
    c.assign(tps)
    ends = await c.end_offsets(tps)
    starts: dict[TopicPartition, int] = {}
    if since_ms is not None:
        found = await c.offsets_for_times(dict.fromkeys(tps, since_ms))
        for tp in tps:
            at = found.get(tp)
            starts[tp] = at.offset if at is not None else ends[tp]
    else:
        starts = await c.beginning_offsets(tps)
    todo = {tp for tp in tps if starts[tp] < ends[tp]}
    for tp in tps:
        c.seek(tp, starts[tp])
    deadline = time.monotonic() + READ_TIMEOUT_S
    while todo:
        if time.monotonic() > deadline:
            raise TimeoutError(f"could not read {sorted(t.topic for t in todo)} to their end")
        batches = await c.getmany(*todo, timeout_ms=500)
        for tp, records in batches.items():
            for rec in records:
                if rec.offset < ends[tp]:
                    yield rec
        for tp in list(todo):
            if await c.position(tp) >= ends[tp]:
                todo.discard(tp)
