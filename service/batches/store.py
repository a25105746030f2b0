"""The batch worker's Kafka plumbing: its transactions, its state, and re-reading pending requests.

Every step of the batch path is one transaction of the worker's transactional
producer (`<group_id>.batches.<partition>`): initialising it fences a previous
worker, so a zombie can neither record a batch nor publish a result.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Sequence

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import NewTopic
from aiokafka.structs import ConsumerRecord

from service.batches.records import BatchState
from service.config.kafka import client_kwargs, create_missing, running
from service.config.settings import GatewaySettings, KafkaSettings
from service.ingest.sending import OutMessage


async def commit(
    producer: AIOKafkaProducer,
    messages: Sequence[OutMessage],
    *,
    tombstones: Iterable[tuple[str, bytes]] = (),
    offsets: dict[TopicPartition, int] | None = None,
    group_id: str | None = None,
) -> None:
    """Send `messages` and `tombstones` (topic, key) and commit `offsets` for `group_id`,
    all or nothing."""
    async with producer.transaction():
        futures = [
            await producer.send(m.topic, m.value, key=m.key, headers=list(m.headers)) for m in messages
        ]
        futures += [await producer.send(topic, None, key=key) for topic, key in tombstones]
        if futures:
            await asyncio.gather(*futures)
        if offsets:
            await producer.send_offsets_to_transaction(offsets, group_id)


async def _read_range(
    k: KafkaSettings, tp: TopicPartition, first: int | None, stop_at: int | None, timeout_s: float = 60.0
) -> list[ConsumerRecord]:
    """Committed records of `tp` from `first` (None: the beginning) up to `stop_at`
    (exclusive), or to the partition's last stable offset as of the read. (The fetch
    responses' last stable offset: `end_offsets` may answer a stale 0 right after a
    transaction committed.)"""
    consumer = AIOKafkaConsumer(
        **client_kwargs(k), enable_auto_commit=False, isolation_level="read_committed", group_id=None
    )
    async with running(consumer):  # stopped even when the read is cancelled
        consumer.assign([tp])
        if first is None:
            await consumer.seek_to_beginning(tp)
        else:
            consumer.seek(tp, first)
        out: list[ConsumerRecord] = []
        deadline = time.monotonic() + timeout_s
        while True:
            fetched = await consumer.getmany(tp, timeout_ms=200)
            for rec in fetched.get(tp, []):
                if stop_at is None or rec.offset < stop_at:
                    out.append(rec)
            position = await consumer.position(tp)
            if stop_at is not None and position >= stop_at:
                return out
            stable = consumer.last_stable_offset(tp)
            if stable is not None and position >= stable and not fetched:
                return out
            if time.monotonic() > deadline:
                raise TimeoutError(f"reading {tp.topic}[{tp.partition}] took over {timeout_s:g}s")


async def load_states(k: KafkaSettings, tp: TopicPartition) -> tuple[dict[str, BatchState], set[str]]:
    """The open batches recorded in the state topic partition, in the order their intents
    were recorded, and the ids of the batches that are done."""
    states: dict[str, BatchState] = {}
    done: set[str] = set()
    for rec in await _read_range(k, tp, None, None):
        if rec.key is None:
            continue
        key = rec.key.decode()
        state = BatchState.decode(rec.value) if rec.value is not None else None
        if state is None or state.phase == "done":
            states.pop(key, None)
            if state is not None and state.batch_id:
                done.add(state.batch_id)
        else:
            states[key] = state
    return states, done


async def read_pending(
    k: KafkaSettings, tp: TopicPartition, offsets: Iterable[int]
) -> dict[int, ConsumerRecord]:
    """The pending-topic records at `offsets` (read in one pass from the first to the last)."""
    wanted = set(offsets)
    if not wanted:
        return {}
    records = await _read_range(k, tp, min(wanted), max(wanted) + 1)
    return {r.offset: r for r in records if r.offset in wanted}


PENDING_RETENTION_MS = 7 * 24 * 3600 * 1000
"""Pending requests are re-read until their batch ends (up to 24 h, then retries): a week."""
STATE_RETENTION_MS = 30 * 24 * 3600 * 1000
"""The state topic is compacted (one document per batch) and its done documents deleted after
30 days (an open batch is rewritten at every step and ends within a day or two)."""


def batch_topics(settings: GatewaySettings, replication: int, realtime_partitions: int) -> list[NewTopic]:
    """The batch path's own topics: pending (one partition: one worker), state (compacted),
    and the way back to real time."""
    b = settings.batches
    big = str(max(8 * 1024 * 1024, settings.kafka.producer_max_request_bytes))
    return [
        NewTopic(
            b.pending_topic,
            1,
            replication,
            topic_configs={"retention.ms": str(PENDING_RETENTION_MS), "max.message.bytes": big},
        ),
        NewTopic(
            b.state_topic,
            1,
            replication,
            topic_configs={
                "cleanup.policy": "compact,delete",
                "retention.ms": str(STATE_RETENTION_MS),
                "max.message.bytes": big,
            },
        ),
        NewTopic(
            settings.realtime_topic(),
            realtime_partitions,
            replication,
            topic_configs={"max.message.bytes": big},
        ),
    ]


async def ensure_topics(settings: GatewaySettings) -> None:
    """Create the batch path's topics when missing (a broker with fewer than 3 nodes gets
    fewer replicas)."""
    await create_missing(settings.kafka, lambda r: batch_topics(settings, r, 3))
