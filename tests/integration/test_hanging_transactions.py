"""A transaction left hanging (service/ingest/hanging.py) on the real broker: the coordinator
ended it but its markers never reached a partition and the group's offsets. Readers stop at
it and a stable offset read never answers; a new owner of the transactional id ends it, and
so does a live writer of the id once the watch finds the partition stuck.

The hang is made the way the broker makes it when it skips markers: records and an offset
commit that the coordinator does not know belong to the transaction. With KIP-890's
verification on (the default) the broker refuses such records, so the test turns it off on
the broker for its own duration.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Collection

import pytest
from aiokafka import AIOKafkaClient, AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from service.config.settings import KafkaSettings
from service.ingest.hanging import Mark, heal, holders, producer_id, stable_and_high, watch
from service.ingest.open_transactions import open_transactions
from service.ingest.partition import PartitionWriter
from service.ingest.sending import OutMessage
from service.ingest.stable_offsets import UnstableOffset, fetch_committed_stable
from service.ingest.takeover import FetchCommitted
from tests.support.kafka import read_committed_values, started_transactional
from tests.support.polling import until

pytestmark = pytest.mark.integration

VERIFICATION = "transaction.partition.verification.enable"


@pytest.fixture
async def unverified(kafka_admin: AIOKafkaAdminClient) -> AsyncIterator[None]:
    """The broker without KIP-890 verification while the test runs."""
    brokers = (await kafka_admin.describe_cluster())["brokers"]
    ids = [str(b["node_id"]) for b in brokers]

    async def alter(value: str) -> None:
        resources = [ConfigResource(ConfigResourceType.BROKER, i, configs={VERIFICATION: value}) for i in ids]
        for response in await kafka_admin.alter_configs(resources):
            for resource in response.resources:
                assert resource[0] == 0, resource

    await alter("false")
    await asyncio.sleep(0.5)
    try:
        yield
    finally:
        await alter("true")


@pytest.fixture
async def topics(kafka_admin: AIOKafkaAdminClient) -> tuple[str, str]:
    """(a request topic, an output topic)."""
    suffix = uuid.uuid4().hex[:8]
    names = (f"hang-in-{suffix}", f"hang-out-{suffix}")
    await kafka_admin.create_topics([NewTopic(n, 2, 1) for n in names])
    return names


@pytest.fixture
async def settings(kafka_bootstrap: str) -> KafkaSettings:
    return KafkaSettings.model_validate({"bootstrap_servers": kafka_bootstrap})


@pytest.fixture
async def coordinator(kafka_bootstrap: str, topics: tuple[str, str]) -> AsyncIterator[object]:
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka_bootstrap, group_id=f"{topics[0]}-group")
    await consumer.start()
    yield consumer._coordinator
    await consumer.stop()


async def _hang(
    producer: AIOKafkaProducer, out: TopicPartition, group: str, offsets: dict[TopicPartition, int]
) -> None:
    """Commit a transaction whose record in `out` and offset commit the coordinator never
    learns of: they stay open, as when the broker skipped their markers."""
    other = TopicPartition(out.topic, 1 - out.partition)
    txn = producer._txn_manager
    await producer.begin_transaction()
    await (await producer.send(other.topic, b"marked", partition=other.partition))  # added: gets its marker
    txn._pending_txn_partitions.add(out)
    txn.partition_added(out)  # taken for added: no AddPartitionsToTxn
    txn.consumer_group_added(group)  # likewise, no AddOffsetsToTxn
    await (await producer.send(out.topic, b"hanging", partition=out.partition))
    if offsets:
        await producer.send_offsets_to_transaction(offsets, group)
    await producer.commit_transaction()


def _writer(
    settings: KafkaSettings, tp_in: TopicPartition, output: str, replica: str, coordinator: object
) -> PartitionWriter:
    """The gateway's writer of request partition `tp_in`, in the group `<request topic>-group`,
    writing `output`."""
    group = settings.model_copy(update={"group_id": f"{tp_in.topic}-group"})
    return PartitionWriter(tp_in, group, replica, _fetcher(coordinator), written_topics=lambda: [output])


def _fetcher(coordinator: object) -> FetchCommitted:
    """A writer's stable offset read that takes an offset unstable for 1 s for hanging."""

    async def fetch(tp: TopicPartition, stable: bool) -> tuple[int | None, str]:
        return await fetch_committed_stable(coordinator, tp, stable=stable, unstable_max_s=1.0)

    return fetch


async def _committed_after(
    settings: KafkaSettings, producers: list[AIOKafkaProducer], out: TopicPartition
) -> None:
    """Another producer commits a record after the hanging one."""
    later = await started_transactional(settings, producers, f"{out.topic}.later")
    async with later.transaction():
        await later.send(out.topic, b"later", partition=out.partition)


async def test_heal_ends_a_hanging_transaction_in_a_partition_and_the_group_offsets(
    kafka_bootstrap: str,
    unverified: None,
    topics: tuple[str, str],
    settings: KafkaSettings,
    producers: list[AIOKafkaProducer],
    coordinator: object,
) -> None:
    request, output = topics
    group, tp_in, out = f"{request}-group", TopicPartition(request, 0), TopicPartition(output, 0)
    txn_id = f"{request}.0"
    await _hang(await started_transactional(settings, producers, txn_id), out, group, {tp_in: 5})
    await _committed_after(settings, producers, out)

    # hanging: the reader stops before it, the offset stays unstable
    assert await read_committed_values(kafka_bootstrap, out, 1, timeout_s=3) == []
    assert await read_committed_values(kafka_bootstrap, TopicPartition(output, 1), 1, timeout_s=10) == [
        b"marked"
    ]
    with pytest.raises(UnstableOffset):
        await fetch_committed_stable(coordinator, tp_in, unstable_max_s=1.0)

    owner = await started_transactional(settings, producers, txn_id)  # a new owner of the id
    marked = await asyncio.wait_for(heal(owner, group, [output, "no-such-topic"]), 30)
    assert marked == 2
    assert await read_committed_values(kafka_bootstrap, out, 2, timeout_s=10) == [b"hanging", b"later"]
    assert await fetch_committed_stable(coordinator, tp_in, unstable_max_s=5.0) == (5, "")


async def test_a_writer_taking_over_ends_its_ids_hanging_transaction(
    kafka_bootstrap: str,
    unverified: None,
    topics: tuple[str, str],
    settings: KafkaSettings,
    producers: list[AIOKafkaProducer],
    coordinator: object,
) -> None:
    request, output = topics
    tp_in, out = TopicPartition(request, 1), TopicPartition(output, 0)
    txn_id = f"{request}-group.{request}.1"  # the writer's own id (partition.transactional_id)
    await _hang(await started_transactional(settings, producers, txn_id), out, f"{request}-group", {tp_in: 7})

    writer = _writer(settings, tp_in, output, "replica-b", coordinator)
    try:
        snapshot = await asyncio.wait_for(writer.start(), 60)
    finally:
        await writer.close()
    assert snapshot.commit == 7  # the hanging commit, ended as committed
    assert await read_committed_values(kafka_bootstrap, out, 1, timeout_s=10) == [b"hanging"]


async def test_the_watch_has_a_live_writer_end_what_it_left_hanging(
    kafka_bootstrap: str,
    unverified: None,
    topics: tuple[str, str],
    settings: KafkaSettings,
    producers: list[AIOKafkaProducer],
    coordinator: object,
) -> None:
    """The writer lived through the hang and does not write that partition again: the watch
    finds its last stable offset stuck and the writer's `mark` ends it; the writer goes on."""
    request, output = topics
    tp_in, out = TopicPartition(request, 0), TopicPartition(output, 0)

    writer = _writer(settings, tp_in, output, "replica-a", coordinator)
    client = AIOKafkaClient(bootstrap_servers=kafka_bootstrap)
    stop, found = asyncio.Event(), []
    try:
        await asyncio.wait_for(writer.start(), 60)
        producers_of_writer = writer._turns.producers
        assert len(producers_of_writer) == 2  # they take turns (service/ingest/turns.py)
        # the id of the one that does not go first, while it lives: each producer marks
        await _hang(producers_of_writer[-1], out, f"{request}-group", {})
        await _committed_after(settings, producers, out)
        assert await read_committed_values(kafka_bootstrap, out, 1, timeout_s=3) == []

        await client.bootstrap()
        watching = asyncio.create_task(
            watch(client, lambda: [output], lambda: [writer.mark], stop, 1.0, 0.3, found.append)
        )
        values = await read_committed_values(kafka_bootstrap, out, 2, timeout_s=20)
        stop.set()
        await asyncio.wait_for(watching, 5)
        assert values == [b"hanging", b"later"]
        assert found == [1]  # the stuck partition only: partition 1 holds a committed record

        assert writer.ledger is not None
        writer.ledger.start(0)  # the writer goes on after its mark
        await asyncio.wait_for(writer.publish(0, [OutMessage(output, b"k", b"after")]), 30)
        assert writer.failure is None
    finally:
        stop.set()
        await writer.close()
        await client.close()


async def test_the_id_holding_a_stuck_partition_is_found_and_only_its_writer_marks(
    kafka_bootstrap: str,
    unverified: None,
    topics: tuple[str, str],
    settings: KafkaSettings,
    producers: list[AIOKafkaProducer],
    coordinator: object,
) -> None:
    """Long before the transaction timeout (the watch's every-writer rule is 10 minutes away
    here), DescribeProducers names the producer id whose open transaction began at the stuck
    partition's last stable offset, and only the writer with that id marks it."""
    request, output = topics
    out = TopicPartition(output, 0)
    writers = [
        _writer(settings, TopicPartition(request, p), output, "replica-a", coordinator) for p in (0, 1)
    ]
    client = AIOKafkaClient(bootstrap_servers=kafka_bootstrap)
    stop, found = asyncio.Event(), []
    calls: list[tuple[int, frozenset[int] | None, bool]] = []

    def spy(i: int) -> Mark:
        async def mark(partitions: list[TopicPartition], pids: Collection[int] | None = None) -> bool:
            marked = await writers[i].mark(partitions, pids)
            calls.append((i, None if pids is None else frozenset(pids), marked))
            return marked

        return mark

    try:
        for w in writers:
            await asyncio.wait_for(w.start(), 60)
        holder = writers[0]._turns.producers[-1]
        await _hang(holder, out, f"{request}-group", {})
        await _committed_after(settings, producers, out)
        pid = producer_id(holder)
        assert pid is not None

        await client.bootstrap()
        metadata = await client.fetch_all_metadata()
        offsets = await stable_and_high(client, metadata, [out])
        open_txns = await open_transactions(client, metadata, [out])
        assert open_txns[out].get(pid) == offsets[out][0] == 0  # the hanging record is offset 0
        assert holders(offsets, open_txns) == {pid: [out]}

        watching = asyncio.create_task(
            watch(
                client,
                lambda: [output],
                lambda: [spy(0), spy(1)],
                stop,
                stuck_after_s=600.0,
                every_s=0.3,
                found=found.append,
                holder_after_s=1.0,
            )
        )
        values = await read_committed_values(kafka_bootstrap, out, 2, timeout_s=20)
        stop.set()
        await asyncio.wait_for(watching, 5)
        assert values == [b"hanging", b"later"]
        assert found == [1]
        assert sorted(calls) == [(0, frozenset({pid}), True), (1, frozenset({pid}), False)]
    finally:
        stop.set()
        for w in writers:
            await w.close()
        await client.close()


async def test_a_hang_no_writer_here_can_end_is_reported_until_its_id_ends_it(
    kafka_bootstrap: str,
    unverified: None,
    topics: tuple[str, str],
    settings: KafkaSettings,
    producers: list[AIOKafkaProducer],
) -> None:
    """The id that left the hang belongs to no writer of this replica: the watch reports the
    partition stuck (`gateway_eos_stuck_partitions`, the alert ClaudeGatewayTransactionLeftHanging)
    for as long as it stays so, and 0 once that id's new owner ends it."""
    request, output = topics
    out = TopicPartition(output, 0)
    txn_id = f"{request}.elsewhere"
    await _hang(await started_transactional(settings, producers, txn_id), out, f"{request}-group", {})
    await _committed_after(settings, producers, out)

    client = AIOKafkaClient(bootstrap_servers=kafka_bootstrap)
    stop, reported, found = asyncio.Event(), [], []
    await client.bootstrap()
    watching = asyncio.create_task(
        watch(
            client,
            lambda: [output],
            lambda: [],
            stop,
            stuck_after_s=1.0,
            every_s=0.3,
            found=found.append,
            holder_after_s=0.5,
            stuck_now=reported.append,
        )
    )
    try:
        await until(
            lambda: reported[-3:] == [1, 1, 1], timeout_s=20
        )  # reported, and again: no writer here ended it
        assert found == [1]  # found once by the every-writer rule (no writer here holds the id)
        owner = await started_transactional(settings, producers, txn_id)  # the id's new owner
        await asyncio.wait_for(heal(owner, f"{request}-group", [output]), 30)
        await until(lambda: reported[-1:] == [0], timeout_s=20)
        assert await read_committed_values(kafka_bootstrap, out, 2, timeout_s=10) == [b"hanging", b"later"]
    finally:
        stop.set()
        await asyncio.wait_for(watching, 5)
        await client.close()
