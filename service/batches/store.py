"""The batch worker's Kafka plumbing: its transactions, its state, and re-reading pending requests.

Every step of the batch path is one transaction of the worker's transactional
producer (`<group_id>.batches.<partition>`): initialising it fences a previous
worker, so a zombie can neither record a batch nor publish a result.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.structs import ConsumerRecord

from service.batches.records import BatchState
from service.config.kafka import client_kwargs
from service.config.settings import KafkaSettings
from service.ingest.sending import OutMessage


def transactional_producer(k: KafkaSettings, txn_id: str) -> AIOKafkaProducer:
    return AIOKafkaProducer(
        **client_kwargs(k),
        acks="all",
        enable_idempotence=True,
        transactional_id=txn_id,
        transaction_timeout_ms=k.transaction_timeout_ms,
        linger_ms=0,
        compression_type=k.producer_compression,
        max_request_size=k.producer_max_request_bytes,
        max_batch_size=k.producer_max_batch_bytes,
    )


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
    k: KafkaSettings, tp: TopicPartition, first: int | None, stop_at: int | None
) -> list[ConsumerRecord]:
    """Committed records of `tp` from `first` (None: the beginning) up to `stop_at`
    (exclusive; None: the end as of now)."""
    consumer = AIOKafkaConsumer(
        **client_kwargs(k), enable_auto_commit=False, isolation_level="read_committed", group_id=None
    )
    await consumer.start()
    try:
        consumer.assign([tp])
        end = (await consumer.end_offsets([tp]))[tp]
        limit = end if stop_at is None else min(end, stop_at)
        if first is None:
            await consumer.seek_to_beginning(tp)
        else:
            consumer.seek(tp, first)
        out: list[ConsumerRecord] = []
        while await consumer.position(tp) < limit:
            fetched = await consumer.getmany(tp, timeout_ms=1000)
            for rec in fetched.get(tp, []):
                if rec.offset < limit:
                    out.append(rec)
        return out
    finally:
        await consumer.stop()


async def load_states(k: KafkaSettings, tp: TopicPartition) -> dict[str, BatchState]:
    """The open batches recorded in the state topic partition (tombstones remove them)."""
    states: dict[str, BatchState] = {}
    for rec in await _read_range(k, tp, None, None):
        if rec.key is None:
            continue
        key = rec.key.decode()
        if rec.value is None:
            states.pop(key, None)
        else:
            states[key] = BatchState.decode(rec.value)
    return states


async def read_pending(
    k: KafkaSettings, tp: TopicPartition, offsets: Iterable[int]
) -> dict[int, ConsumerRecord]:
    """The pending-topic records at `offsets` (read in one pass from the first to the last)."""
    wanted = set(offsets)
    if not wanted:
        return {}
    records = await _read_range(k, tp, min(wanted), max(wanted) + 1)
    return {r.offset: r for r in records if r.offset in wanted}
