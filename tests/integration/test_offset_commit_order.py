"""The broker's rule that the producers taking turns rely on (service/ingest/turns.py), on the
real broker: of two transactions' offset commits for one partition, the group keeps the one
written later in `__consumer_offsets`, whatever order the transactions end in. So a tick sent
while the one before commits (its offsets sent after that one's were acked) can never be
overtaken by it, even if the markers of the earlier one come last."""

from __future__ import annotations

import uuid

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from service.config.settings import KafkaSettings
from service.ingest.stable_offsets import fetch_committed_stable
from tests.support.kafka import started_transactional

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("first_to_end", ["earlier", "later"])
async def test_the_later_offset_record_is_kept_whatever_order_the_transactions_end(
    kafka_bootstrap: str,
    kafka_admin: AIOKafkaAdminClient,
    producers: list[AIOKafkaProducer],
    first_to_end: str,
) -> None:
    topic = f"order-{uuid.uuid4().hex[:8]}"
    await kafka_admin.create_topics([NewTopic(topic, 1, 1)])
    group, tp = f"{topic}-group", TopicPartition(topic, 0)
    settings = KafkaSettings.model_validate({"bootstrap_servers": kafka_bootstrap})
    earlier = await started_transactional(settings, producers, f"{group}.{topic}.0")
    later = await started_transactional(settings, producers, f"{group}.{topic}.0.1")

    await earlier.begin_transaction()
    await earlier.send_offsets_to_transaction({tp: (10, "earlier")}, group)
    await later.begin_transaction()
    await later.send_offsets_to_transaction({tp: (20, "later")}, group)  # written after: acked first
    ends = [earlier, later] if first_to_end == "earlier" else [later, earlier]
    for producer in ends:
        await producer.commit_transaction()

    consumer = AIOKafkaConsumer(bootstrap_servers=kafka_bootstrap, group_id=group)
    await consumer.start()
    try:
        assert await fetch_committed_stable(consumer._coordinator, tp) == (20, "later")
    finally:
        await consumer.stop()
