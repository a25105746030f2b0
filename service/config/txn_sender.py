"""aiokafka's transaction sender with two changes: a short retry while the last transaction
ends, and transactions prepared ahead of their records.

**Short retry.** After a commit the transaction coordinator writes the commit markers; until
it is done, the next transaction's first AddPartitionsToTxn or AddOffsetsToTxn is answered
CONCURRENT_TRANSACTIONS. aiokafka retries AddPartitionsToTxn after 20 ms in that case
(KAFKA-5477) but AddOffsetsToTxn after the whole `retry_backoff_ms` (100 ms). Here both retry
after `FAST_BACKOFF_S`, at most `FAST_RETRIES` times in a row; then aiokafka's own backoff
applies again. InitProducerId, the coordinator lookup, the produce requests and every other
error keep aiokafka's backoff (a producer-wide 10 ms `retry_backoff_ms` stalled a chaos run's
takeovers: commit 954a4fe).

**Prepared transactions.** A transaction with records and an offset commit costs, in turn:
AddPartitionsToTxn, Produce, AddOffsetsToTxn, TxnOffsetCommit, EndTxn. A writer can `prepare`
its next transaction as soon as one commits: begin it and add, in the background, the
partitions it will likely write and its consumer group. When the records come, `ready` adds
whatever is still missing and waits for it; then Produce, TxnOffsetCommit and EndTxn.

- Adding a partition writes nothing to it: the partition's last stable offset only waits for
  a transaction that wrote there, so readers of a prepared partition are not held back; its
  EndTxn writes a marker there, as for a partition whose records failed.
- Nothing is sent while a partition or the group is being added. Since Kafka 3.6 the leader
  of a partition asks the coordinator whether a transaction's first record there belongs to
  it (KIP-890); asked while the coordinator applies an AddPartitions or AddOffsets, it answers
  CONCURRENT_TRANSACTIONS, the broker refuses the records NOT_ENOUGH_REPLICAS and aiokafka
  sends them again 100 ms later. `ready` waits for every addition before anything is sent.
  (The writer sends its offsets only once its records are acked, for the same reason: the
  group coordinator asks too, and of two questions pending for one transaction the broker
  fails the first.)
- The records name their partition (`partition_of`, the producer's own partitioner), so what
  a transaction writes is known before it is sent.

aiokafka offers no hook for either, so `install` swaps the class of a producer's sender for a
subclass (tests/unit/test_txn_sender.py checks the aiokafka internals it relies on).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.client import CoordinationType
from aiokafka.errors import ConcurrentTransactions, KafkaError, for_code
from aiokafka.producer.sender import AddOffsetsToTxnHandler, AddPartitionsToTxnHandler, Sender
from aiokafka.util import create_task

FAST_BACKOFF_S = 0.002
FAST_RETRIES = 25
"""In a row, per producer: 50 ms of markers at most, then aiokafka's backoff."""


def _concurrent(codes: list[int]) -> bool:
    return any(for_code(c) is ConcurrentTransactions for c in codes)


def _fast(sender: Any, backoff: float | None, codes: list[int]) -> float | None:
    """The backoff to use: short while the transaction has nothing yet and the coordinator
    reports the previous one still ending."""
    if backoff is None:
        sender._fast_txn_retries = 0
        return None
    txn = sender._txn_manager
    retries: int = getattr(sender, "_fast_txn_retries", 0)
    if not _concurrent(codes) or txn.txn_partitions or retries >= FAST_RETRIES:
        return backoff
    sender._fast_txn_retries = retries + 1
    return min(backoff, FAST_BACKOFF_S)


class _AddPartitions(AddPartitionsToTxnHandler):  # type: ignore[misc]
    def handle_response(self, resp: Any) -> float | None:
        backoff: float | None = super().handle_response(resp)
        codes = [code for _, partitions in resp.errors for _, code in partitions]
        return _fast(self._sender, backoff, codes)


class _AddOffsets(AddOffsetsToTxnHandler):  # type: ignore[misc]
    def handle_response(self, resp: Any) -> float | None:
        backoff: float | None = super().handle_response(resp)
        return _fast(self._sender, backoff, [resp.error_code])


class _Sender(Sender):  # type: ignore[misc]
    """aiokafka's sender with the two handlers above, a consumer group added ahead of its
    offsets (`_group_to_add`), and a signal after every addition (`_progress`)."""

    _group_to_add: str | None = None
    _progress: asyncio.Future[None] | None = None

    async def _coordinator(self) -> int:
        node_id: int = await self._find_coordinator(
            CoordinationType.TRANSACTION, self._txn_manager.transactional_id
        )
        return node_id

    async def _do_add_partitions_to_txn(self, tps: Any) -> bool:
        try:
            node_id = await self._coordinator()
            ok: bool = await _AddPartitions(self, tps).do(node_id)
            return ok
        finally:
            self._signal()

    async def _do_add_offsets_to_txn(self, group_id: str) -> bool:
        try:
            node_id = await self._coordinator()
            ok: bool = await _AddOffsets(self, group_id).do(node_id)
            return ok
        finally:
            self._signal()

    def _maybe_do_transactional_request(self) -> Any:
        txn = self._txn_manager
        group = self._group_to_add
        if group is not None and (not txn.is_in_transaction() or txn._txn_consumer_group is not None):
            self._group_to_add = group = None
        if group is not None and not txn.partitions_to_add():
            return create_task(self._do_add_offsets_to_txn(group))
        return super()._maybe_do_transactional_request()

    def _signal(self) -> None:
        progress, self._progress = self._progress, None
        if progress is not None and not progress.done():
            progress.set_result(None)

    def _waiter(self) -> asyncio.Future[None]:
        if self._progress is None:
            self._progress = asyncio.get_running_loop().create_future()
        return self._progress


def install(producer: AIOKafkaProducer) -> AIOKafkaProducer:
    """Give a transactional producer (not started yet) this sender; returns it."""
    sender = producer._sender
    if type(sender) is not Sender:
        raise TypeError(f"unexpected aiokafka sender {type(sender).__name__}: see {__name__}")
    sender.__class__ = _Sender
    return producer


async def partition_of(producer: AIOKafkaProducer, topic: str, key: bytes | None) -> int:
    """The partition `send` would choose for a record of `key` (the producer's partitioner:
    the murmur2 hash of the key over the topic's partitions, as Java's)."""
    await producer.partitions_for(topic)  # the topic's metadata
    partition: int = producer._partition(topic, None, key, None, key, None)
    return partition


def _missing(producer: AIOKafkaProducer, partitions: Iterable[TopicPartition], group_id: str) -> bool:
    txn = producer._txn_manager
    if txn._txn_consumer_group != group_id:
        return True
    return not txn.txn_partitions.issuperset(partitions)


def prepare(producer: AIOKafkaProducer, partitions: Iterable[TopicPartition], group_id: str) -> None:
    """Add `partitions` and the consumer group to the open transaction, in the background."""
    sender, txn = producer._sender, producer._txn_manager
    for tp in partitions:
        txn.maybe_add_partition_to_txn(tp)
    if txn._txn_consumer_group != group_id:
        sender._group_to_add = group_id
    txn.notify_task_waiter()


async def ready(producer: AIOKafkaProducer, partitions: Iterable[TopicPartition], group_id: str) -> None:
    """Add what the open transaction still lacks of `partitions` and the group, and wait until
    the coordinator has added all of it. Raises the transaction's error if it fails first."""
    wanted = set(partitions)
    sender, txn = producer._sender, producer._txn_manager
    _check_open(txn)
    prepare(producer, wanted, group_id)
    while _missing(producer, wanted, group_id):
        progress = sender._waiter()
        await asyncio.wait({progress, txn.wait_for_transaction_end()}, return_when=asyncio.FIRST_COMPLETED)
        _check_open(txn)


def _check_open(txn: Any) -> None:
    """Raise the transaction's error (or say it is not open): what was prepared failed."""
    if txn.is_in_transaction():
        return
    ended = txn.wait_for_transaction_end()
    if ended is not None and ended.done() and ended.exception() is not None:
        raise ended.exception()
    raise KafkaError(f"the transaction is {txn.state.name}, not open")
