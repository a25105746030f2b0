"""`service.ingest.fetch` on the real broker: records whose header names are not UTF-8, written byte
for byte among good ones, are reported once each and skipped; every good record comes once, in
order; the loop goes on. Also under `read_committed`, with committed and aborted transactions.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.producer.message_accumulator import BatchBuilder
from aiokafka.record.default_records import _DefaultRecordBatchBuilderPy

from service.ingest.fetch import Fetched, Undecodable, fetch
from tests.support.kafka import TopicFactory, unique_name

pytestmark = pytest.mark.integration

BAD_NAME = b"x-\xff\xfe-name"
Headers = list[tuple[str, bytes | None]]


class RawName(str):
    """A header name that the Python batch builder writes as these exact bytes (the standard
    producer encodes names from str, so it cannot write one that is not UTF-8)."""

    raw: bytes

    def __new__(cls, raw: bytes) -> RawName:
        name = super().__new__(cls, raw.decode("latin-1"))
        name.raw = raw
        return name

    def encode(self, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        return self.raw


class RawBatch(BatchBuilder):  # type: ignore[misc]
    """A producer batch written by aiokafka's pure-Python record builder."""

    def __init__(self, *, transactional: bool = False) -> None:
        super().__init__(1 << 20, 0, is_transactional=int(transactional))
        self._builder = _DefaultRecordBatchBuilderPy(2, 0, int(transactional), -1, -1, 0, 1 << 20)

    def _set_producer_state(self, producer_id: int, producer_epoch: int, base_sequence: int) -> None:
        self._builder.set_producer_state(producer_id, producer_epoch, base_sequence)


def good(value: str) -> tuple[bytes, Headers]:
    return value.encode(), [("traceparent", b"00-ok"), ("x-null", None)]


def bad(value: str) -> tuple[bytes, Headers]:
    return value.encode(), [("x-ok", b"1"), (RawName(BAD_NAME), b"v"), ("x-null", None)]


async def send_batch(
    producer: AIOKafkaProducer, topic: str, partition: int, records: Sequence[tuple[bytes, Headers]]
) -> None:
    """One record batch with exactly these records, in this order."""
    batch = RawBatch(transactional=producer._txn_manager is not None)
    for value, headers in records:
        assert batch.append(timestamp=None, key=value, value=value, headers=headers) is not None
    await (await producer.send_batch(batch, topic, partition=partition))


@asynccontextmanager
async def producer_for(bootstrap: str, **kw: Any) -> AsyncIterator[AIOKafkaProducer]:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", **kw)
    await producer.start()
    try:
        yield producer
    finally:
        await producer.stop()


@asynccontextmanager
async def consumer_for(bootstrap: str, tps: list[TopicPartition]) -> AsyncIterator[AIOKafkaConsumer]:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=unique_name("group"),
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
    )
    await consumer.start()
    consumer.assign(tps)
    try:
        yield consumer
    finally:
        await consumer.stop()


class Seen:
    """Everything the fetches returned, in order, per partition."""

    def __init__(self) -> None:
        self.good: dict[int, list[tuple[int, bytes]]] = {}
        self.bad: dict[int, list[int]] = {}
        self.undecodable: list[Undecodable] = []

    def add(self, fetched: Fetched) -> None:
        for tp, records in fetched.records.items():
            self.good.setdefault(tp.partition, []).extend((r.offset, r.value) for r in records)
        for u in fetched.undecodable:
            self.bad.setdefault(u.partition, []).append(u.offset)
        self.undecodable.extend(fetched.undecodable)

    def count(self) -> int:
        return sum(map(len, self.good.values())) + sum(map(len, self.bad.values()))


async def _until_end_offset(bootstrap: str, tp: TopicPartition, offset: int, timeout_s: float = 10.0) -> None:
    """Until the partition's log (markers included) ends at `offset`."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        deadline = time.monotonic() + timeout_s
        while (await consumer.end_offsets([tp]))[tp] < offset:
            assert time.monotonic() < deadline, "timed out"
            await asyncio.sleep(0.02)
    finally:
        await consumer.stop()


async def drain(consumer: AIOKafkaConsumer, seen: Seen, total: int, max_records: int | None = None) -> None:
    """Fetch until `total` items were seen, then check that nothing more (no repeat) comes."""
    deadline = time.monotonic() + 60
    while seen.count() < total:
        assert time.monotonic() < deadline, f"only {seen.count()} of {total} fetched"
        fetched = await fetch(consumer, timeout_ms=500, max_records=max_records)
        if max_records is not None:
            assert len(fetched) <= max_records
        seen.add(fetched)
    for _ in range(2):
        seen.add(await fetch(consumer, timeout_ms=300, max_records=max_records))
    assert seen.count() == total


async def getmany_for(consumer: AIOKafkaConsumer, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        await consumer.getmany(timeout_ms=500)


@pytest.mark.parametrize("max_records", [None, 2])
async def test_undecodable_records_are_reported_once_and_the_good_ones_all_come_in_order(
    kafka_bootstrap: str, new_topic: TopicFactory, max_records: int | None
) -> None:
    topic = await new_topic("fetch", partitions=2)
    tps = [TopicPartition(topic, 0), TopicPartition(topic, 1)]
    async with producer_for(kafka_bootstrap) as producer:
        await send_batch(
            producer, topic, 0, [good("a0"), bad("a1"), good("a2"), good("a3"), bad("a4"), good("a5")]
        )
        await send_batch(producer, topic, 0, [good("a6")])
        await send_batch(producer, topic, 1, [bad("b0"), good("b1"), good("b2"), bad("b3")])
        await send_batch(producer, topic, 1, [bad("b4")])
        await producer.send_and_wait(topic, b"b5", key=b"b5", partition=1, headers=[("h", b"v")])

    # the Kafka client itself stops at the first one
    async with consumer_for(kafka_bootstrap, tps) as plain:
        with pytest.raises(UnicodeDecodeError):
            await getmany_for(plain, 10.0)

    async with consumer_for(kafka_bootstrap, tps) as consumer:
        seen = Seen()
        await drain(consumer, seen, 13, max_records)
        assert seen.good == {
            0: [(0, b"a0"), (2, b"a2"), (3, b"a3"), (5, b"a5"), (6, b"a6")],
            1: [(1, b"b1"), (2, b"b2"), (5, b"b5")],
        }
        assert seen.bad == {0: [1, 4], 1: [0, 3, 4]}
        first = next(u for u in seen.undecodable if (u.partition, u.offset) == (0, 1))
        assert (first.topic, first.last_offset, first.error) == (topic, 1, "UnicodeDecodeError")
        assert (first.key, first.value) == (b"a1", b"a1")
        assert first.headers == ((b"x-ok", b"1"), (BAD_NAME, b"v"), (b"x-null", None))
        assert first.timestamp is not None

        # the loop goes on: later records, bad and good, come as they are written
        async with producer_for(kafka_bootstrap) as producer:
            await send_batch(producer, topic, 0, [good("a7"), bad("a8")])
            await send_batch(producer, topic, 1, [good("b6")])
        await drain(consumer, seen, 16, max_records)
        assert seen.good[0][-1] == (7, b"a7")
        assert seen.bad[0][-1] == 8
        assert seen.good[1][-1] == (6, b"b6")
        assert await consumer.position(tps[0]) == 9
        assert await consumer.position(tps[1]) == 7


async def test_read_committed_skips_aborted_transactions_while_reading_leniently(
    kafka_bootstrap: str, new_topic: TopicFactory
) -> None:
    topic = await new_topic("fetch-txn", partitions=1)
    tp = TopicPartition(topic, 0)
    async with producer_for(kafka_bootstrap, transactional_id=unique_name("txn")) as producer:
        async with producer.transaction():  # offsets 0-2, commit marker 3
            await send_batch(producer, topic, 0, [good("t0"), bad("t1"), good("t2")])
        await producer.begin_transaction()  # offsets 4-5, abort marker 6
        await send_batch(producer, topic, 0, [bad("t4"), good("t5")])
        await producer.abort_transaction()
        async with producer.transaction():  # offsets 7-8, commit marker 9
            await send_batch(producer, topic, 0, [good("t7"), bad("t8")])
    # the commit returns once the coordinator has prepared it; its marker may land later
    await _until_end_offset(kafka_bootstrap, tp, 10)
    async with producer_for(kafka_bootstrap) as plain:
        await plain.send_and_wait(topic, b"t10", partition=0)

    async with consumer_for(kafka_bootstrap, [tp]) as consumer:
        seen = Seen()
        await drain(consumer, seen, 6)
        assert seen.good == {0: [(0, b"t0"), (2, b"t2"), (7, b"t7"), (10, b"t10")]}
        assert seen.bad == {0: [1, 8]}
        assert await consumer.position(tp) == 11


async def test_an_open_transaction_is_not_read_past_its_last_stable_offset(
    kafka_bootstrap: str, new_topic: TopicFactory
) -> None:
    topic = await new_topic("fetch-open", partitions=1)
    tp = TopicPartition(topic, 0)
    async with producer_for(kafka_bootstrap) as plain:
        await send_batch(plain, topic, 0, [good("o0"), bad("o1")])
    async with (
        producer_for(kafka_bootstrap, transactional_id=unique_name("txn")) as producer,
        consumer_for(kafka_bootstrap, [tp]) as consumer,
    ):
        await producer.begin_transaction()
        await send_batch(producer, topic, 0, [bad("o2"), good("o3")])
        seen = Seen()
        await drain(consumer, seen, 2)  # nothing of the open transaction
        assert (seen.good, seen.bad) == ({0: [(0, b"o0")]}, {0: [1]})
        await producer.commit_transaction()
        await asyncio.sleep(0)
        await drain(consumer, seen, 4)
        assert (seen.good, seen.bad) == ({0: [(0, b"o0"), (3, b"o3")]}, {0: [1, 2]})
