"""Transactions begun ahead (service/config/txn_sender.py, service/ingest/transactions.py) on
the real broker: a partition added ahead holds no reader back, a prepared transaction carries
records and offsets, one that wrote the last offsets again sends its records and offsets
together with neither refused, and a takeover fences a writer whose transaction is open ahead."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import ProducerFenced

from service.config import txn_sender
from service.config.settings import KafkaSettings
from service.ingest.sending import Item, OutMessage
from service.ingest.stable_offsets import fetch_committed_stable
from service.ingest.transactions import Transactions
from tests.support.kafka import read_committed_values, started_transactional, wait_for_topics

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


async def test_offsets_written_ahead_let_records_and_offsets_go_together_unrefused(
    kafka_bootstrap: str,
    kafka_admin: AIOKafkaAdminClient,
    topic: str,
    settings: KafkaSettings,
    producers: list[AIOKafkaProducer],
) -> None:
    """`Transactions.begin_ahead` with the last tick's offsets writes them again once the
    partitions are added; the next tick then sends its records and its offsets at once. The
    broker rule this relies on (KIP-890): the group coordinator asks the transaction
    coordinator only about a transaction's first offset commit, so the records' leader asks
    alone. Were both asked, one would be refused (and sent again 100 ms later): every answer
    must be without error, and each tick's offsets on their way before its records are acked."""
    group, source = f"{topic}-group", TopicPartition(topic, 0)
    await wait_for_topics(kafka_admin, [topic], 3)
    producer = await started_transactional(settings, producers, f"{topic}.ahead-offsets")
    log: list[tuple[str, str]] = []
    errors: list[tuple[int, str, int]] = []
    send = producer.client.send

    async def recording(node_id: int, request: Any, *args: Any, **kw: Any) -> Any:
        name = type(request).__name__.split("_")[0]
        log.append(("sent", name))
        response = await send(node_id, request, *args, **kw)
        log.append(("answered", name))
        tick = sum(1 for event, _ in log if event == "tick")  # 0: the first, with nothing written ahead
        errors.extend((tick, name, code) for code in _error_codes(response) if code)
        return response

    producer.client.send = recording  # type: ignore[method-assign]
    txns = Transactions(group, prepared_idle_s=5.0)
    txns.reset(producer)
    ticks = 4
    for n in range(ticks):
        items = [
            Item(n, [OutMessage(topic, f"key-{n}-{i}".encode(), f"tick {n}".encode())]) for i in range(3)
        ]
        offsets = {source: (n + 1, f"tick {n}")}
        if n:
            log.append(("tick", str(n)))
        refused, resend = await asyncio.wait_for(txns.send(items, list, lambda o=offsets: o), 30)
        assert (refused, resend) == ([], [])
        if n < ticks - 1:
            await asyncio.wait_for(txns.commit(), 30)
            await txns.begin_ahead(expected=True, offsets=offsets)
    await asyncio.wait_for(txns.commit(), 30)

    assert [e for e in errors if e[0] > 0] == []  # nothing refused once written ahead
    commits = [what for event, what in log if event == "sent" and what == "TxnOffsetCommitRequest"]
    assert len(commits) == 2 * ticks - 1  # each tick's, and each begun ahead wrote the last again
    for n in range(1, ticks):
        tick = log[log.index(("tick", str(n))) :]
        tick = tick[: tick.index(("sent", "EndTxnRequest"))]
        ahead, own = (i for i, e in enumerate(tick) if e == ("sent", "TxnOffsetCommitRequest"))
        # the offsets written ahead were answered before the records went
        assert tick.index(("answered", "TxnOffsetCommitRequest")) < tick.index(("sent", "ProduceRequest"))
        assert ahead < own < tick.index(("answered", "ProduceRequest"))  # the records and offsets together
    expected: dict[int, list[bytes]] = {}
    for n in range(ticks):
        for i in range(3):
            partition = await txn_sender.partition_of(producer, topic, f"key-{n}-{i}".encode())
            expected.setdefault(partition, []).append(f"tick {n}".encode())
    for partition, values in expected.items():
        tp = TopicPartition(topic, partition)
        assert await read_committed_values(kafka_bootstrap, tp, len(values), timeout_s=10) == values
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka_bootstrap, group_id=group)
    await consumer.start()
    try:
        assert await fetch_committed_stable(consumer._coordinator, source) == (ticks, f"tick {ticks - 1}")
    finally:
        await consumer.stop()


def _error_codes(response: Any) -> list[int]:
    """The partitions' error codes of a Produce or TxnOffsetCommit response (none of others)."""
    name = type(response).__name__
    if name.startswith("ProduceResponse"):
        return [int(p[1]) for _, partitions in response.topics for p in partitions]
    if name.startswith("TxnOffsetCommitResponse"):
        return [int(code) for _, partitions in response.errors for _, code in partitions]
    return []


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
