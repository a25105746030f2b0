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

A writer that lives through such a restart ends what it left in the partitions its next
transactions hold (its group's offsets and usage partition at every tick), but not in a
response or dead-letter partition it does not write again, and a partition taken over may
never be written by that id again. So every replica also watches the partitions of those
topics (`watch`). One whose last stable offset stays below its high watermark, unmoved, for
`HANGING_AFTER_S` is asked of its leader which producer id holds it (`open_transactions`),
and the writer here with that id, if any, commits a transaction holding the partition
(`PartitionWriter.mark`). One still stuck for longer than any transaction may stay open
(`kafka.transaction_timeout_ms`, after which the coordinator aborts it, plus two reads) gets
such a transaction from every writer of the replica (the partition writers and the batch
path's). Only the id that left it can end it, and whichever replica owns that id marks it
too. A partition still stuck at the same offset afterwards is not marked again (no live id
of the gateway left it): the error log says so.

COMMIT, because the coordinator had decided before it skipped the markers, and writers end
far more transactions with a commit than with an abort. A writer that aborted re-reads the
commit afterwards and takes what it finds (`PartitionWriter._reopen_verified`), so an
aborted tick closed this way counts as committed there too: its outcomes and its offset
commit are published together, once. For the same reason a transaction begun ahead that got
nothing is committed (with nothing new), not aborted (`transactions.py`): a live writer's next
transactions end what it left hanging in the partitions they hold.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping
from typing import Protocol

from aiokafka import AIOKafkaClient, AIOKafkaProducer, TopicPartition
from aiokafka.cluster import ClusterMetadata
from aiokafka.errors import KafkaError
from aiokafka.protocol.offset import OffsetRequest

from service.config import txn_sender
from service.config.settings import GatewaySettings
from service.ingest.open_transactions import by_leader, open_transactions

log = logging.getLogger(__name__)

HANGING_AFTER_S = 10.0
"""How long an initialised producer's offset may stay unstable before it is taken for hanging:
the coordinator writes a transaction's markers in milliseconds, and initialising the producer
waited for its id's last transaction to end. Also how long a partition's last stable offset may
stay put before the watch asks which producer id holds it."""


WATCH_EVERY_S = 5.0
"""How often each replica reads the last stable offsets of the partitions written in transactions."""
LATEST, READ_UNCOMMITTED, READ_COMMITTED = -1, 0, 1


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


def partitions_of(metadata: ClusterMetadata, topics: Iterable[str]) -> list[TopicPartition]:
    """Every partition of `topics` (those that exist)."""
    return [
        TopicPartition(topic, p)
        for topic in sorted(set(topics))
        for p in sorted(metadata.partitions_for_topic(topic) or ())
    ]


async def heal(producer: AIOKafkaProducer, group_id: str, topics: Iterable[str]) -> int:
    """End whatever transaction `producer`'s id left open in `group_id`'s offsets or in any
    partition of `topics` (those that exist): commit an empty transaction holding them all.
    Returns how many partitions got a marker."""
    partitions = partitions_of(await producer.client.fetch_all_metadata(), topics)
    await mark_partitions(producer, group_id, partitions)
    log.info(
        "committed markers to the group's offsets and every partition written: nothing of this"
        " transactional id is left hanging",
        extra={"transactional_id": producer._txn_manager.transactional_id, "partitions": len(partitions)},
    )
    return len(partitions)


async def mark_partitions(
    producer: AIOKafkaProducer, group_id: str, partitions: Iterable[TopicPartition]
) -> None:
    """Commit an empty transaction holding `partitions` and `group_id`'s offsets: a COMMIT marker
    of this producer id in each. `producer` must have no transaction open."""
    await producer.begin_transaction()
    try:
        await txn_sender.ready(producer, partitions, group_id)
        await producer.commit_transaction()
    except BaseException:
        with contextlib.suppress(Exception):
            await producer.abort_transaction()
        raise


class StuckPartitions:
    """Which partitions hold a transaction left hanging, from successive reads of their last
    stable and high offsets: one whose last stable offset stays below its high watermark, at
    the same offset, for `after_s`. Each is reported once per stuck offset."""

    def __init__(self, after_s: float) -> None:
        self.after_s = after_s
        self._since: dict[TopicPartition, tuple[int, float]] = {}
        """Each partition read stuck: at which last stable offset, since when."""
        self._reported: dict[TopicPartition, int] = {}
        self._told: set[TopicPartition] = set()
        self.unended: list[TopicPartition] = []
        """After `update`: partitions reported at an earlier read and stuck at the same offset
        since (their marks did not end them), each listed once."""

    @property
    def stuck(self) -> int:
        """Partitions stuck for `after_s` at their offset of the last read (reported, or now)."""
        return len(self._reported)

    def update(self, offsets: Mapping[TopicPartition, tuple[int, int]], now: float) -> list[TopicPartition]:
        """Take a read ({partition: (last stable offset, high watermark)}); returns the partitions
        newly found stuck."""
        found: list[TopicPartition] = []
        earlier = dict(self._reported)
        for tp in [tp for tp in self._since if tp not in offsets]:
            del self._since[tp]  # not read this time (no leader, deleted): starts again
            self._reported.pop(tp, None)
            self._told.discard(tp)
        for tp, (stable, high) in offsets.items():
            seen = self._since.get(tp)
            if stable >= high or (seen is not None and seen[0] != stable):
                self._since.pop(tp, None)
                self._reported.pop(tp, None)
                self._told.discard(tp)
                seen = None
            if stable >= high:
                continue
            if seen is None:
                self._since[tp] = (stable, now)
            elif now - seen[1] >= self.after_s and self._reported.get(tp) != stable:
                self._reported[tp] = stable
                found.append(tp)
        self.unended = [
            tp for tp, stable in earlier.items() if self._reported.get(tp) == stable and tp not in self._told
        ]
        self._told.update(self.unended)
        return found


async def stable_and_high(
    client: AIOKafkaClient, metadata: ClusterMetadata, partitions: Iterable[TopicPartition]
) -> dict[TopicPartition, tuple[int, int]]:
    """The last stable offset and the high watermark of each partition (ListOffsets v2 or v3,
    latest, to its leader: read_committed, then read_uncommitted). Partitions without a leader or
    answered with an error are left out."""
    out: dict[TopicPartition, tuple[int, int]] = {}
    for node, tps in by_leader(metadata, partitions).items():
        topics: dict[str, list[tuple[int, int]]] = defaultdict(list)
        for tp in tps:
            topics[tp.topic].append((tp.partition, LATEST))
        ends: list[dict[TopicPartition, int]] = []
        for isolation in (READ_COMMITTED, READ_UNCOMMITTED):
            response = await client.send(node, OffsetRequest(-1, isolation, list(topics.items())))
            ends.append(
                {
                    TopicPartition(topic, p): offset
                    for topic, parts in response.topics
                    for p, error, _, offset in parts
                    if error == 0
                }
            )
        stable, high = ends
        out.update({tp: (offset, high[tp]) for tp, offset in stable.items() if tp in high})
    return out


class Mark(Protocol):
    """A live writer's `mark`: commit a transaction of its producer id(s) holding `partitions`;
    with `pids`, only on those of its producers that have one of these ids. True if it
    committed one."""

    def __call__(
        self, partitions: list[TopicPartition], pids: Collection[int] | None = None
    ) -> Awaitable[bool]: ...


def producer_id(producer: AIOKafkaProducer | None) -> int | None:
    """The producer id of a transactional producer (None: not initialised, not transactional)."""
    txn = producer._txn_manager if producer is not None else None
    pid = txn.producer_id if txn is not None else -1
    return pid if pid is not None and pid >= 0 else None


def holders(
    offsets: Mapping[TopicPartition, tuple[int, int]], open_txns: Mapping[TopicPartition, Mapping[int, int]]
) -> dict[int, list[TopicPartition]]:
    """Which producer id holds each stuck partition back: the one whose open transaction began
    at its last stable offset ({producer id: its partitions})."""
    out: dict[int, list[TopicPartition]] = defaultdict(list)
    for tp, began in open_txns.items():
        stable = offsets[tp][0] if tp in offsets else None
        for pid, start in began.items():
            if start == stable:
                out[pid].append(tp)
    return dict(out)


async def watch(
    client: AIOKafkaClient,
    topics: Callable[[], list[str]],
    markers: Callable[[], list[Mark]],
    stop: asyncio.Event,
    stuck_after_s: float,
    every_s: float = WATCH_EVERY_S,
    found: Callable[[int], None] = lambda n: None,
    holder_after_s: float = HANGING_AFTER_S,
    stuck_now: Callable[[int], None] = lambda n: None,
) -> None:
    """Until `stop`: every `every_s`, read the partitions of `topics`.

    - Stuck for `holder_after_s`: ask their leaders which producer id holds each back
      (`open_transactions`); a writer here with that id marks it (`Mark`'s `pids`).
      A live writer's transaction stays open milliseconds, so this ends a hang within
      seconds of the broker's return, and asks no other writer for anything.
    - Stuck for `stuck_after_s` (longer than any transaction may stay open): every writer here
      marks it, whichever id holds it (ids no writer here has are another replica's to end).
      `stuck_now` hears, at each read, how many are stuck so (`StuckPartitions.stuck`)."""
    quick, stuck = StuckPartitions(holder_after_s), StuckPartitions(stuck_after_s)
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every_s)
        if stop.is_set():
            return
        try:
            metadata = await client.fetch_all_metadata()
            offsets = await stable_and_high(client, metadata, partitions_of(metadata, topics()))
        except (KafkaError, OSError) as exc:
            log.debug("reading the last stable offsets failed", extra={"error": type(exc).__name__})
            continue
        except Exception:  # a fault of the watch must not stop the gateway
            log.exception("reading the last stable offsets failed")
            continue
        now = time.monotonic()
        suspects = quick.update(offsets, now)
        open_txns: dict[TopicPartition, dict[int, int]] = {}
        if suspects:
            try:
                open_txns = await open_transactions(client, metadata, suspects)
            except (KafkaError, OSError, NotImplementedError) as exc:  # before Kafka 2.8: no such request
                log.warning("no answer on who holds a partition", extra={"error": type(exc).__name__})
        hanging = stuck.update(offsets, now)
        stuck_now(stuck.stuck)
        for tp in stuck.unended:
            log.error(
                "a transaction left hanging was not ended by any writer of this replica",
                extra={"topic": tp.topic, "partition": tp.partition, "stable_offset": offsets[tp][0]},
            )
        for pid, tps in holders(offsets, open_txns).items():
            if await _mark_all(markers(), tps, {pid}):
                found(len(tps))
                log.warning(
                    "a transaction left hanging: its producer id's writer marked its partitions",
                    extra={"producer_id": pid, "partitions": _names(tps)},
                )
        if hanging:
            found(len(hanging))
            log.warning(
                "transactions left hanging: marking their partitions from every writer",
                extra={"partitions": _names(hanging)},
            )
            await _mark_all(markers(), hanging, None)


def _names(tps: Iterable[TopicPartition]) -> str:
    return ",".join(f"{tp.topic}-{tp.partition}" for tp in tps)


async def _mark_all(marks: list[Mark], tps: list[TopicPartition], pids: Collection[int] | None) -> bool:
    """Whether any of `marks` committed a transaction."""
    marked = False
    for mark in marks:
        try:
            marked = await mark(tps, pids) or marked
        except KafkaError as exc:  # the writer's next tick finds its transaction's state
            log.warning("a writer could not mark", extra={"error": type(exc).__name__})
        except Exception:  # a fault of the watch must not stop the gateway
            log.exception("a writer could not mark")
    return marked
