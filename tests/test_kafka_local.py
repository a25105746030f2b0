"""The test services really work: Kafka (with aiokafka, as the gateway uses it) and Redis.

Against the session broker (the local Apache Kafka of scripts/kafka_local.py on this machine):
produce/consume with a consumer group and committed offsets, the idempotent producer,
transactions read with read_committed, and the fixtures' unique topics. Plus the script's own
start/status/stop contract, and the Redis fixture.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.structs import ConsumerRecord

from service.ingest.stable_offsets import fetch_committed_stable
from tests.support.kafka import ROOT, PartnerTopics, TopicFactory, kafka_local, unique_name

pytestmark = pytest.mark.integration


async def _drain(consumer: AIOKafkaConsumer, expected: int, timeout_s: float = 30.0) -> list[ConsumerRecord]:
    records: list[ConsumerRecord] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while len(records) < expected and loop.time() < deadline:
        batches = await consumer.getmany(timeout_ms=200)
        for batch in batches.values():
            records.extend(batch)
    return records


async def test_produce_consume_with_a_group_commits_and_resumes(
    kafka_bootstrap: str, new_topic: TopicFactory, unique_group: str
) -> None:
    topic = await new_topic("roundtrip", partitions=3)
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    await producer.start()
    try:
        for i in range(30):
            await producer.send(topic, f"v{i}".encode(), key=f"k{i % 7}".encode())
        await producer.flush()
    finally:
        await producer.stop()

    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=kafka_bootstrap,
        group_id=unique_group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    try:
        records = await _drain(consumer, 30)
        assert sorted(r.value for r in records) == sorted(f"v{i}".encode() for i in range(30))
        assert {r.partition for r in records} == {0, 1, 2}  # 7 keys spread over 3 partitions
        await consumer.commit()
        tps = [TopicPartition(topic, p) for p in range(3)]
        ends = await consumer.end_offsets(tps)
        assert {tp: await consumer.committed(tp) for tp in tps} == ends
    finally:
        await consumer.stop()

    # The same group resumes at its committed offsets: only what is new arrives.
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(topic, b"after-commit", key=b"k0")
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=kafka_bootstrap, group_id=unique_group, enable_auto_commit=False
    )
    await consumer.start()
    try:
        records = await _drain(consumer, 1)
        records += await _drain(consumer, 1, timeout_s=1.0)  # nothing else may come
        assert [r.value for r in records] == [b"after-commit"]
    finally:
        await consumer.stop()


async def test_idempotent_producer_writes_each_message_once_in_order(
    kafka_bootstrap: str, new_topic: TopicFactory
) -> None:
    topic = await new_topic("idempotent", partitions=1)
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, enable_idempotence=True, linger_ms=2)
    await producer.start()
    try:
        futures = [await producer.send(topic, str(i).encode(), key=b"same") for i in range(200)]
        metadata = await asyncio.gather(*futures)
    finally:
        await producer.stop()
    assert [m.offset for m in metadata] == list(range(200))

    consumer = AIOKafkaConsumer(topic, bootstrap_servers=kafka_bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    try:
        records = await _drain(consumer, 200)
    finally:
        await consumer.stop()
    assert [int(r.value) for r in records] == list(range(200))


async def _send_then_fail(producer: AIOKafkaProducer, topic: str, value: bytes) -> None:
    async with producer.transaction():
        await producer.send(topic, value)
        raise RuntimeError("abort")


async def test_transactions_commit_abort_and_send_offsets(
    kafka_bootstrap: str, new_topic: TopicFactory, unique_group: str
) -> None:
    topic = await new_topic("tx", partitions=1)
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, transactional_id=unique_name("tx"))
    await producer.start()
    try:
        async with producer.transaction():
            await producer.send(topic, b"committed-1")
        with pytest.raises(RuntimeError, match="abort"):
            await _send_then_fail(producer, topic, b"aborted")
        async with producer.transaction():
            await producer.send(topic, b"committed-2")
            await producer.send_offsets_to_transaction({TopicPartition(topic, 0): 1}, unique_group)
    finally:
        await producer.stop()

    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=kafka_bootstrap,
        isolation_level="read_committed",
        auto_offset_reset="earliest",
    )
    await consumer.start()
    try:
        records = await _drain(consumer, 2)
        records += await _drain(consumer, 1, timeout_s=1.0)
    finally:
        await consumer.stop()
    assert [r.value for r in records] == [b"committed-1", b"committed-2"]

    group = AIOKafkaConsumer(bootstrap_servers=kafka_bootstrap, group_id=unique_group)
    await group.start()
    try:
        assert await group.committed(TopicPartition(topic, 0)) == 1
    finally:
        await group.stop()


async def test_new_topic_makes_unique_topic_sets_with_their_partitions(
    new_topic: TopicFactory, kafka_admin: AIOKafkaAdminClient
) -> None:
    first = await new_topic.partner(partitions=2)
    second = await new_topic.partner(partitions=2)
    assert first.partner != second.partner
    assert first == PartnerTopics.named(first.partner)
    assert first.requests == f"claude.requests.{first.partner}"
    exact = await new_topic.create(f"exact.{first.partner}", partitions=4)
    described = {t["topic"]: t for t in await kafka_admin.describe_topics([*first.all, *exact])}
    assert {name: len(d["partitions"]) for name, d in described.items()} == {
        first.requests: 2,
        first.responses: 2,
        first.deadletter: 2,
        exact[0]: 4,
    }


@pytest.mark.skipif(shutil.which("java") is None, reason="needs java for the local broker")
def test_kafka_local_cli_start_status_stop(tmp_path: Path) -> None:
    """The script's contract: start prints the bootstrap last, is idempotent, stop twice is fine."""
    script = [sys.executable, str(ROOT / "scripts" / "kafka_local.py")]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*script, *args], capture_output=True, text=True, env=env, timeout=120)

    started = run("start", "--dir", str(tmp_path))
    try:
        assert started.returncode == 0, started.stderr
        bootstrap = started.stdout.strip().splitlines()[-1]
        assert bootstrap.startswith("127.0.0.1:")
        assert (tmp_path / "bootstrap").read_text().strip() == bootstrap
        assert run("start", "--dir", str(tmp_path)).stdout.strip().splitlines()[-1] == bootstrap
        status = run("status", "--dir", str(tmp_path))
        assert status.returncode == 0
        assert bootstrap in status.stdout
        assert kafka_local().status(tmp_path) == bootstrap
    finally:
        assert run("stop", "--dir", str(tmp_path)).returncode == 0
    assert run("stop", "--dir", str(tmp_path)).returncode == 0
    assert run("status", "--dir", str(tmp_path)).returncode == 1
    assert not (tmp_path / "broker.pid").exists()


async def test_redis_fixture_serves(redis_url: str) -> None:
    client = aioredis.from_url(redis_url)
    try:
        assert await client.ping() is True
        key = unique_name("counter")
        assert await client.incr(key) == 1
        assert await client.incr(key) == 2
    finally:
        await client.aclose()


def test_cluster_ids_never_start_with_a_dash() -> None:
    """The storage tool reads an id starting with '-' as an option."""
    kl = kafka_local()
    assert all(not kl._cluster_id().startswith("-") for _ in range(5000))


@pytest.mark.skipif(shutil.which("java") is None, reason="needs java for the local broker")
async def test_kafka_local_restart_keeps_the_data(tmp_path: Path) -> None:
    """`restart` (and `start --keep-data`) bring back the same broker: same bootstrap, the
    records, a transaction's outcome and the group's committed offset are all still there."""
    kl = kafka_local()
    script = [sys.executable, str(ROOT / "scripts" / "kafka_local.py")]
    topic, group = unique_name("kept"), unique_name("group")
    tp = TopicPartition(topic, 0)
    bootstrap: str = await asyncio.to_thread(kl.start, tmp_path, die_with_parent=True, heap="384m")
    try:
        assert "-Xmx384m" in _broker_command(tmp_path)
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:
            await admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])
        finally:
            await admin.close()
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, transactional_id=unique_name("tx"))
        await producer.start()
        try:
            async with producer.transaction():
                for i in range(20):
                    await producer.send(topic, f"v{i}".encode())
                await producer.send_offsets_to_transaction({tp: 7}, group)
        finally:
            await producer.stop()

        async def still_there() -> None:
            consumer = AIOKafkaConsumer(
                bootstrap_servers=bootstrap, isolation_level="read_committed", enable_auto_commit=False
            )
            await consumer.start()
            try:
                consumer.assign([tp])
                await consumer.seek_to_beginning(tp)
                records = await _drain(consumer, 20)
            finally:
                await consumer.stop()
            assert [r.value for r in records] == [f"v{i}".encode() for i in range(20)]
            grouped = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group)
            await grouped.start()
            try:
                # a transactional commit is visible once its marker is applied: read it stably
                # (OffsetFetch v7 require_stable), as the gateway does, not with `committed()`
                offset, _ = await fetch_committed_stable(grouped._coordinator, tp)
                assert offset == 7
            finally:
                await grouped.stop()

        restarted = await asyncio.to_thread(
            subprocess.run, [*script, "restart", "--dir", str(tmp_path)], capture_output=True, text=True
        )
        assert restarted.returncode == 0, restarted.stderr
        assert restarted.stdout.strip().splitlines()[-1] == bootstrap
        assert "-Xmx384m" in _broker_command(tmp_path)  # the heap it was started with
        await still_there()

        await asyncio.to_thread(kl.stop, tmp_path)
        assert await asyncio.to_thread(kl.start, tmp_path, keep_data=True, die_with_parent=True) == bootstrap
        await still_there()
    finally:
        await asyncio.to_thread(kl.stop, tmp_path)
    # the broker the command line's `restart` stopped was this process's child: reaped too
    # (else a zombie, and a `ResourceWarning: subprocess ... is still running` at exit)
    assert [pid for pid, child in kl._CHILDREN.items() if child.poll() is not None] == []


def _broker_command(d: Path) -> list[str]:
    pid = (d / "broker.pid").read_text().strip()
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")


def test_kafka_local_restart_needs_a_broker_to_restart(tmp_path: Path) -> None:
    kl = kafka_local()
    with pytest.raises(kl.KafkaLocalError, match="no broker to restart"):
        kl.restart(tmp_path / "empty")
