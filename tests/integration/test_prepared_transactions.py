"""Transactions begun ahead (service/config/txn_sender.py, service/ingest/transactions.py) on
the real broker: a partition added ahead holds no reader back, a prepared transaction carries
records and offsets, and a takeover fences a writer whose transaction is open ahead."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import ProducerFenced

from service.config import txn_sender
from service.config.settings import KafkaSettings
from tests.support.kafka import read_committed_values, started_transactional

pytestmark = pytest.mark.integration


@pytest.fixture
async def topic(kafka_admin: AIOKafkaAdminClient) -> str:
    name = f"prepared-{uuid.uuid4().hex[:8]}"
    await kafka_admin.create_topics([NewTopic(name, 3, 1)])
    return name


@pytest.fixture
async def settings(kafka_bootstrap: str) -> KafkaSettings:
    return KafkaSettings.model_validate({"bootstrap_servers": kafka_bootstrap})


async def test_a_partition_added_ahead_holds_no_reader_back(
    kafka_bootstrap: str, topic: str, settings: KafkaSettings, producers: list[AIOKafkaProducer]
) -> None:
    tp = TopicPartition(topic, 1)
    ahead = await started_transactional(settings, producers, f"{topic}.ahead")
    await ahead.begin_transaction()
    await asyncio.wait_for(txn_sender.ready(ahead, [tp], f"{topic}-group"), 30)
    other = await started_transactional(settings, producers, f"{topic}.other")
    async with other.transaction():
        await other.send(topic, b"committed by another", partition=tp.partition)
    # while `ahead` stays open with the partition added, the other's commit is readable
    began = time.monotonic()
    assert await read_committed_values(kafka_bootstrap, tp, 1, timeout_s=5) == [b"committed by another"]
    assert time.monotonic() - began < 5
    await ahead.abort_transaction()


async def test_a_prepared_transaction_carries_records_and_offsets(
    kafka_bootstrap: str,
    kafka_admin: AIOKafkaAdminClient,
    topic: str,
    settings: KafkaSettings,
    producers: list[AIOKafkaProducer],
) -> None:
    group = f"{topic}-group"
    producer = await started_transactional(settings, producers, f"{topic}.writer")
    key = b"request-7"
    partition = await txn_sender.partition_of(producer, topic, key)
    tp = TopicPartition(topic, partition)
    for round_ in range(3):
        await producer.begin_transaction()
        txn_sender.prepare(producer, [tp], group)  # in the background, as after a commit
        await asyncio.wait_for(txn_sender.ready(producer, [tp], group), 30)
        ack = await producer.send(topic, f"r{round_}".encode(), key=key, partition=partition)
        await asyncio.wait_for(ack, 30)
        await producer.send_offsets_to_transaction({TopicPartition(topic, 0): round_ + 1}, group)
        await producer.commit_transaction()
    await producer.begin_transaction()  # begun ahead, then nothing came
    txn_sender.prepare(producer, [tp], group)
    await producer.abort_transaction()
    assert await read_committed_values(kafka_bootstrap, tp, 3, timeout_s=10) == [b"r0", b"r1", b"r2"]
    offsets = await kafka_admin.list_consumer_group_offsets(group)
    assert offsets[TopicPartition(topic, 0)].offset == 3
    # the partition the records name is the one the producer itself chooses for the key
    assert await _plain_partition(kafka_bootstrap, topic, key) == partition


async def _plain_partition(bootstrap: str, topic: str, key: bytes) -> int:
    p = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await p.start()
    try:
        meta = await p.send_and_wait(topic, b"plain", key=key)
        return int(meta.partition)
    finally:
        await p.stop()


async def test_a_takeover_fences_a_transaction_open_ahead(
    topic: str, settings: KafkaSettings, producers: list[AIOKafkaProducer]
) -> None:
    tp = TopicPartition(topic, 0)
    txn_id = f"{topic}.fenced"
    old = await started_transactional(settings, producers, txn_id)
    await old.begin_transaction()
    await asyncio.wait_for(txn_sender.ready(old, [tp], f"{topic}-group"), 30)
    new = await started_transactional(settings, producers, txn_id)  # aborts the open one, bumps the epoch
    async with new.transaction():
        await new.send(topic, b"new owner", partition=0)
    with pytest.raises(ProducerFenced):
        await asyncio.wait_for(_finish(old, topic), 30)


async def _finish(p: AIOKafkaProducer, topic: str) -> None:
    ack = await p.send(topic, b"zombie", partition=0)
    await ack
    await p.commit_transaction()
