"""A takeover while the previous owner's commit is in flight (service/ingest/takeover.py), on
the real broker.

Found by CI: a replica joined under load, and the one giving a partition up was committing
a tick with claims at that moment. The new owner's read did not show them yet (a
transactional offset commit shows only once its marker is written), so it fenced at once;
the commit then landed, the calls went on, their outcomes could no longer be published, and
a graceful rebalance dead-lettered five requests `outcome_unknown`. A new owner now waits
while a live owner's commit is pending, and not for long when its owner is gone.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError

from service.config.settings import KafkaSettings
from service.ingest.ledger import Claim, Snapshot, encode
from service.ingest.partition import PartitionWriter, transactional_id
from service.ingest.stable_offsets import commit_pending, fetch_committed_stable
from tests.support.kafka import started_transactional

pytestmark = pytest.mark.integration

OLD, NEW = "replica-a", "replica-b"


@pytest.fixture
async def tp(kafka_admin: AIOKafkaAdminClient) -> TopicPartition:
    name = f"handoff-{uuid.uuid4().hex[:8]}"
    await kafka_admin.create_topics([NewTopic(name, 1, 1)])
    return TopicPartition(name, 0)


@pytest.fixture
async def settings(kafka_bootstrap: str, tp: TopicPartition) -> KafkaSettings:
    return KafkaSettings.model_validate(
        {"bootstrap_servers": kafka_bootstrap, "group_id": f"{tp.topic}-group", "eos_handoff_max_s": 20}
    )


@pytest.fixture
async def coordinator(kafka_bootstrap: str, settings: KafkaSettings) -> AsyncIterator[object]:
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka_bootstrap, group_id=settings.group_id)
    await consumer.start()
    yield consumer._coordinator
    await consumer.stop()


def _writer(tp: TopicPartition, settings: KafkaSettings, coordinator: object) -> PartitionWriter:
    async def fetch(t: TopicPartition, stable: bool) -> tuple[int | None, str]:
        return await fetch_committed_stable(coordinator, t, stable=stable, unstable_max_s=5.0)

    async def pending(t: TopicPartition) -> bool:
        return await commit_pending(coordinator, t)

    return PartitionWriter(tp, settings, NEW, fetch, commit_pending=pending)


async def _offsets(
    old: AIOKafkaProducer, settings: KafkaSettings, tp: TopicPartition, commit: int, claims: tuple[Claim, ...]
) -> None:
    """The previous owner's tick: its offset commit, sent inside its open transaction."""
    now_ms = int(time.time() * 1000)
    metadata = encode(Snapshot(commit, claims=claims, owner=OLD, written_at_ms=now_ms))
    await old.send_offsets_to_transaction({tp: (commit, metadata)}, settings.group_id)


async def test_a_takeover_waits_for_a_live_owners_commit_in_flight_and_the_claims_it_carries(
    tp: TopicPartition, settings: KafkaSettings, producers: list[AIOKafkaProducer], coordinator: object
) -> None:
    old = await started_transactional(settings, producers, transactional_id(settings.group_id, tp))
    await old.begin_transaction()
    claim = Claim(5, int(time.time() * 1000), 1, OLD)
    await _offsets(old, settings, tp, 5, (claim,))  # a tick with a claim, committing

    writer = _writer(tp, settings, coordinator)
    start = asyncio.create_task(writer.start())
    try:
        await asyncio.sleep(1.0)
        assert not start.done(), "the new owner fenced a live owner whose commit was in flight"
        await old.commit_transaction()  # it lands: the claim shows, its owner still commits
        await asyncio.sleep(1.0)
        assert not start.done(), "the new owner fenced a live owner with a call in flight"
        async with old.transaction():  # the call's outcome: offset 5 finished, the claim gone
            await _offsets(old, settings, tp, 6, ())
        snapshot = await asyncio.wait_for(start, 15)
    finally:
        await writer.close()
    assert (snapshot.commit, snapshot.claims, snapshot.owner) == (6, (), OLD)


async def test_a_commit_left_open_by_an_owner_that_is_gone_holds_the_takeover_briefly(
    tp: TopicPartition, settings: KafkaSettings, producers: list[AIOKafkaProducer], coordinator: object
) -> None:
    old = await started_transactional(settings, producers, transactional_id(settings.group_id, tp))
    await old.begin_transaction()
    await _offsets(old, settings, tp, 5, (Claim(5, int(time.time() * 1000), 1, OLD),))
    # ... and the owner is killed: its transaction stays open until fenced or timed out

    writer = _writer(tp, settings, coordinator)
    began = time.monotonic()
    try:
        snapshot = await asyncio.wait_for(writer.start(), 15)
    finally:
        await writer.close()
    waited = time.monotonic() - began
    assert 2.5 <= waited < 10, f"waited {waited:.1f}s for a commit nobody will end (3 s expected)"
    assert snapshot.commit == -1, "the commit left open was aborted by the fencing"
    with pytest.raises(KafkaError):
        await old.commit_transaction()
