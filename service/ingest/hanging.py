"""Transactions left hanging: ended by the coordinator, their markers never written.

Seen in a chaos run (a single broker stopped with SIGTERM, then started again): a writer's
EndTxn(COMMIT) came while the broker shut down. Its controlled shutdown had left every
partition without a leader, so the transaction coordinator, having written PrepareCommit,
found no leader for the transaction's four partitions, took them for deleted and skipped
their markers (Kafka's `TransactionMarkerChannelManager`: "these partitions are likely
deleted already and hence can be skipped"), then wrote CompleteCommit. After the restart the
transaction was still open in each of those partitions, and nothing in Kafka times it out:

- `read_committed` readers of the response partition stopped at its first record;
- the group's offset commit stayed pending, so every new owner's stable OffsetFetch answered
  UNSTABLE_OFFSET_COMMIT until it gave up, and the request partition was never read again
  (2,092 of 10,000 requests without an outcome).

The producer id that left a transaction open can end it: a marker of that producer id (at
any later epoch) ends the open transaction in the partition it lands in, with the marker's
result. So a new owner whose producer is initialised (every transaction of its id that the
coordinator knows of is then complete) and still finds its offset unstable after
`HANGING_AFTER_S` commits an empty transaction holding the consumer group and every
partition of the topics the gateway writes in transactions (`heal`): the coordinator writes a
COMMIT marker to each. Where this producer id has nothing open a marker changes nothing. The
batch worker does so at every start, before it reads the state topic (up to its last stable
offset, which a hanging transaction would hold back): it starts once per assignment.

COMMIT, because the coordinator had decided before it skipped the markers, and writers end
far more transactions with a commit than with an abort. A writer that aborted re-reads the
commit afterwards and takes what it finds (`PartitionWriter._reopen_verified`), so an
aborted tick closed this way counts as committed there too: its outcomes and its offset
commit are published together, once. For the same reason a transaction begun ahead that got
nothing is committed empty, not aborted (`transactions.py`): a live writer's next
transactions end what it left hanging in the partitions they hold.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable

from aiokafka import AIOKafkaProducer, TopicPartition

from service.config import txn_sender
from service.config.settings import GatewaySettings

log = logging.getLogger(__name__)

HANGING_AFTER_S = 10.0
"""How long an initialised producer's offset may stay unstable before it is taken for hanging:
the coordinator writes a transaction's markers in milliseconds, and initialising the producer
waited for its id's last transaction to end."""


def written_topics(settings: GatewaySettings) -> list[str]:
    """Every topic the gateway writes in a transaction: the partners' responses and dead
    letters, the usage topic, and the batch path's topics (pending, state, back to real time)."""
    topics = {settings.kafka.usage_topic, settings.realtime_topic()}
    for partner in settings.partners:
        topics.add(settings.response_topic(partner.id))
        topics.add(settings.deadletter_topic(partner.id))
    topics.add(settings.batches.pending_topic)
    topics.add(settings.batches.state_topic)
    return sorted(topics)


async def heal(producer: AIOKafkaProducer, group_id: str, topics: Iterable[str]) -> int:
    """End whatever transaction `producer`'s id left open in `group_id`'s offsets or in any
    partition of `topics` (those that exist): commit an empty transaction holding them all.
    Returns how many partitions got a marker."""
    metadata = await producer.client.fetch_all_metadata()
    partitions = [
        TopicPartition(topic, p)
        for topic in sorted(set(topics))
        for p in sorted(metadata.partitions_for_topic(topic) or ())
    ]
    await producer.begin_transaction()
    try:
        await txn_sender.ready(producer, partitions, group_id)
        await producer.commit_transaction()
    except BaseException:
        with contextlib.suppress(Exception):
            await producer.abort_transaction()
        raise
    log.info(
        "committed markers to the group's offsets and every partition written: nothing of this"
        " transactional id is left hanging",
        extra={"transactional_id": producer._txn_manager.transactional_id, "partitions": len(partitions)},
    )
    return len(partitions)
