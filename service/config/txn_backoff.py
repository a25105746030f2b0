"""A short retry for a new transaction's first coordinator request while the last one ends.

After a commit the transaction coordinator writes the commit markers; until it is done, the
next transaction's first AddPartitionsToTxn or AddOffsetsToTxn is answered
CONCURRENT_TRANSACTIONS. aiokafka retries AddPartitionsToTxn after 20 ms in that case
(KAFKA-5477) but AddOffsetsToTxn after the whole `retry_backoff_ms` (100 ms), and a tick with
only claims starts with AddOffsetsToTxn. Here both retry after `FAST_BACKOFF_S`, at most
`FAST_RETRIES` times in a row; then aiokafka's own backoff applies again. Nothing else
changes: InitProducerId, the coordinator lookup, the produce requests and every other error
keep aiokafka's backoff (a producer-wide 10 ms `retry_backoff_ms` stalled a chaos run's
takeovers: commit 954a4fe).

aiokafka offers no hook for this, so `install` swaps the class of a producer's sender for a
subclass that only changes these two handlers (tests/unit/test_txn_backoff.py checks the
aiokafka internals it relies on).
"""

from __future__ import annotations

from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.client import CoordinationType
from aiokafka.errors import ConcurrentTransactions, for_code
from aiokafka.producer.sender import AddOffsetsToTxnHandler, AddPartitionsToTxnHandler, Sender

FAST_BACKOFF_S = 0.005
FAST_RETRIES = 10
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
    """aiokafka's sender with the two handlers above (the same code as its own methods)."""

    async def _coordinator(self) -> int:
        node_id: int = await self._find_coordinator(
            CoordinationType.TRANSACTION, self._txn_manager.transactional_id
        )
        return node_id

    async def _do_add_partitions_to_txn(self, tps: Any) -> bool:
        node_id = await self._coordinator()
        ok: bool = await _AddPartitions(self, tps).do(node_id)
        return ok

    async def _do_add_offsets_to_txn(self, group_id: str) -> bool:
        node_id = await self._coordinator()
        ok: bool = await _AddOffsets(self, group_id).do(node_id)
        return ok


def install(producer: AIOKafkaProducer) -> AIOKafkaProducer:
    """Give a transactional producer (not started yet) the short retry; returns it."""
    sender = producer._sender
    if type(sender) is not Sender:
        raise TypeError(f"unexpected aiokafka sender {type(sender).__name__}: see {__name__}")
    sender.__class__ = _Sender
    return producer
