"""Fetch from Kafka so that no record can stop the consume loop, even one the client cannot decode.

`await fetch(consumer, timeout_ms)` is `consumer.getmany(timeout_ms=...)` plus a list of the
records that could not be decoded:

    fetched = await fetch(consumer, timeout_ms=100)
    for tp, records in fetched.records.items(): ...        # as getmany returns them
    for bad in fetched.undecodable: ...                    # dead-letter each, `undecodable_record`

Why: aiokafka decodes every header name as strict UTF-8, in its C extension and in its Python
reader, and raises out of `getmany()` at the first record with a name that is not. The records
of other partitions drained in the same call are then lost (their positions have moved on),
and the next call raises again at the same record, forever.

How (the C reader stays in use for every record that decodes):

1. The consumer's fetch buffer (`Fetcher._records`) is replaced, once, by a dict that guards
   the record iterator of each fetched partition as it is buffered. An error while decoding
   ends that partition's iteration where it stands instead of propagating: `getmany()`
   returns the records before it and the other partitions' records as usual, and the
   partition's position stays at the first record not returned. The error is noted.
2. For each partition noted, the same data is fetched again from its position, by a Fetch
   request of our own (same isolation level, so `read_committed` holds), and read with a
   lenient reader (`service.ingest.rawrecords`) inside aiokafka's own `PartitionRecords`
   (aborted transactions and control batches are skipped exactly as the fetcher skips them).
   Its good records are returned after the ones `getmany()` gave; each record that cannot be
   decoded becomes an `Undecodable`; then the partition is `seek`ed past what was read.

Every record is returned once, in order, as a record or as an `Undecodable`: nothing is lost
or repeated. `max_records` bounds both together. If the partition was revoked, paused or
moved meanwhile, or its re-fetch fails, nothing of it is returned and nothing is skipped: the
next call meets the record again.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

import aiokafka.errors as Errors
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.protocol.fetch import FetchRequest

from service.ingest.rawrecords import LenientPartition, RawHeaders, Undecodable

__all__ = ["Fetched", "RawHeaders", "Undecodable", "fetch", "until_stopped"]

log = logging.getLogger(__name__)

_GUARDED: Final = "_gateway_guarded"
T = TypeVar("T")


@dataclass(slots=True)
class Fetched:
    """What one `fetch` got: records per partition, in offset order, as `getmany()` returns
    them, and the records that could not be decoded, in the order they were met."""

    records: dict[TopicPartition, list[ConsumerRecord[Any, Any]]] = field(default_factory=dict)
    undecodable: list[Undecodable] = field(default_factory=list)

    def __len__(self) -> int:
        return sum(len(r) for r in self.records.values()) + len(self.undecodable)


async def fetch(
    consumer: AIOKafkaConsumer,
    timeout_ms: int,
    partitions: Sequence[TopicPartition] = (),
    max_records: int | None = None,
) -> Fetched:
    """`consumer.getmany(*partitions, timeout_ms=timeout_ms, max_records=max_records)`, except
    that a record the client cannot decode does not raise: it is skipped (the partition is
    `seek`ed past it) and returned in `Fetched.undecodable`, once.

    The caller must give each `Undecodable` its outcome, as for any record (a dead letter
    `undecodable_record`), and track its offset like a record's for the commit point. Errors
    of the consumer itself (`KafkaError`, a stopped consumer) propagate as from `getmany()`.
    """
    faults = _faults(consumer)
    records: dict[TopicPartition, list[ConsumerRecord[Any, Any]]] = await consumer.getmany(
        *partitions, timeout_ms=timeout_ms, max_records=max_records
    )
    fetched = Fetched(records)
    if not faults:
        return fetched
    room = None if max_records is None else max_records - len(fetched)
    for tp, error in list(faults.items()):
        del faults[tp]
        if room is not None and room <= 0:
            continue  # nothing was skipped: the next call meets it first
        log.warning(
            "a fetched record could not be decoded; reading its partition leniently",
            extra={"topic": tp.topic, "partition": tp.partition, "error": type(error).__name__},
        )
        try:
            good, bad = await _isolate(consumer, tp, room)
        except Exception:  # the records getmany() gave are returned whatever happens here
            log.exception("lenient re-read failed", extra={"topic": tp.topic, "partition": tp.partition})
            continue
        if good:
            fetched.records.setdefault(tp, []).extend(good)
        fetched.undecodable.extend(bad)
        if room is not None:
            room -= len(good) + len(bad)
    for u in fetched.undecodable:
        log.warning(
            "undecodable record skipped",
            extra={
                "topic": u.topic,
                "partition": u.partition,
                "offset": u.offset,
                "last_offset": u.last_offset,
                "error": u.error,
                "detail": u.detail,
            },
        )
    return fetched


# -- 1. the guard on the fetch buffer ------------------------------------------------------------


def _guarded(
    tp: TopicPartition, inner: Iterator[Any], faults: dict[TopicPartition, Exception]
) -> Iterator[Any]:
    try:
        yield from inner
    except Exception as exc:  # noqa: BLE001  # any failure to decode: isolate it, do not stop
        faults[tp] = exc


def _guard(tp: TopicPartition, result: Any, faults: dict[TopicPartition, Exception]) -> None:
    """Wrap the record iterator of one buffered `FetchResult` (errors are buffered as
    `FetchError`, which has none, and are raised by `getmany()` as before)."""
    partition_records: Any = getattr(result, "_partition_records", None)
    inner = getattr(partition_records, "_records_iterator", None)
    if inner is None or getattr(inner, "gi_code", None) is _guarded.__code__:
        return
    partition_records._records_iterator = _guarded(tp, inner, faults)


class _GuardedBuffer(OrderedDict[Any, Any]):
    """The fetcher's `_records`, guarding each `FetchResult` as the fetcher stores it."""

    def __init__(self, existing: OrderedDict[Any, Any]) -> None:
        super().__init__()
        self.faults: dict[TopicPartition, Exception] = {}
        for tp, result in existing.items():
            self[tp] = result

    def __setitem__(self, tp: Any, result: Any) -> None:
        _guard(tp, result, self.faults)
        super().__setitem__(tp, result)


async def until_stopped(
    consumer: AIOKafkaConsumer, stop: asyncio.Event, fetching: Awaitable[T], empty: T
) -> T:
    """`fetching` (a fetch from `consumer`), given up for `empty` once `stop` is set. While a
    rebalance is in progress aiokafka's `getmany` waits for the next assignment whatever its
    timeout (`Fetcher.fetched_records`); in a group that kept rebalancing (replicas killed and
    started) a replica asked to stop waited there for over 40 s, then was killed."""
    if not consumer._subscription.reassignment_in_progress:
        return await fetching
    task = asyncio.ensure_future(fetching)
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
        return task.result() if task.done() else empty
    finally:
        stopping.cancel()
        task.cancel()  # what it would fetch stays for the next owner, from the commit point


def _faults(consumer: AIOKafkaConsumer) -> dict[TopicPartition, Exception] | None:
    """The consumer's noted decoding errors, guarding its fetch buffer on first use; None (and
    plain `getmany()` behaviour) if this aiokafka has no buffer to guard."""
    fetcher: Any = getattr(consumer, "_fetcher", None)
    buffer = getattr(fetcher, "_records", None)
    if isinstance(buffer, _GuardedBuffer):
        return buffer.faults
    if type(buffer) is not OrderedDict:
        if fetcher is not None and not getattr(consumer, _GUARDED, False):
            setattr(consumer, _GUARDED, True)
            log.error("aiokafka's fetcher has changed: records it cannot decode will stop the loop")
        return None
    guarded = _GuardedBuffer(buffer)
    fetcher._records = guarded
    return guarded.faults


# -- 2. the lenient re-read of one partition -----------------------------------------------------


def _state(consumer: AIOKafkaConsumer, tp: TopicPartition) -> Any:
    """The partition's `TopicPartitionState` in the current assignment, or None."""
    subscription = consumer._subscription.subscription
    assignment = None if subscription is None else subscription.assignment
    if assignment is None or not assignment.active:
        return None
    return assignment.state_value(tp)


def position(consumer: AIOKafkaConsumer, tp: TopicPartition) -> int | None:
    """The consumer's position on `tp` (the next offset it returns), or None when it has none.
    aiokafka moves it past each record returned and past transaction markers, aborted
    transactions' records and compacted gaps it read over, never past a record not returned."""
    state = _state(consumer, tp)
    if state is None or not state.has_valid_position:
        return None
    return int(state.position)


def _partition_data(response: Any, tp: TopicPartition) -> tuple[bytes, list[tuple[int, int]] | None] | None:
    """The record set and aborted transactions of `tp` in a Fetch response (the layouts aiokafka's
    fetcher reads), or None when the broker answered with an error."""
    for topic, partitions in response.topics:
        for partition, error_code, _highwater, *part_data in partitions:
            if (topic, partition) != (tp.topic, tp.partition):
                continue
            error = Errors.for_code(error_code)
            if error is not Errors.NoError:
                log.warning(
                    "lenient re-fetch answered with an error",
                    extra={"topic": tp.topic, "partition": tp.partition, "error": error.__name__},
                )
                return None
            if response.API_VERSION >= 11:
                aborted = part_data[2]  # lso, log_start_offset, aborted, preferred replica, records
            elif response.API_VERSION >= 4:
                aborted = part_data[-2]
            else:
                aborted = None
            return bytes(part_data[-1]), aborted
    return None


async def _isolate(
    consumer: AIOKafkaConsumer, tp: TopicPartition, room: int | None
) -> tuple[list[ConsumerRecord[Any, Any]], list[Undecodable]]:
    """Re-fetch `tp` from its position, read it leniently (at most `room` items), seek past what
    was read. Nothing is returned, and nothing skipped, unless the partition is still ours, not
    paused, and at the same position when the answer comes."""
    state = _state(consumer, tp)
    if state is None or state.paused or not state.has_valid_position:
        return [], []
    position: int = state.position
    fetcher = consumer._fetcher
    client = consumer._client
    node = client.cluster.leader_for_partition(tp)
    if node is None or node < 0:
        return [], []
    request = FetchRequest(
        0,  # max wait: the data is there, it was just fetched
        1,
        fetcher._fetch_max_bytes,
        fetcher._isolation_level,
        [(tp.topic, [(tp.partition, position, fetcher._max_partition_fetch_bytes)])],
    )
    try:
        response = await client.send(node, request)
    except Errors.KafkaError as exc:
        log.warning(
            "lenient re-fetch failed",
            extra={"topic": tp.topic, "partition": tp.partition, "error": type(exc).__name__},
        )
        return [], []
    found = _partition_data(response, tp)
    if found is None:
        return [], []
    data, aborted = found
    reader = LenientPartition(
        tp,
        data,
        aborted,
        position,
        key_deserializer=fetcher._key_deserializer,
        value_deserializer=fetcher._value_deserializer,
        check_crcs=fetcher._check_crcs,
        isolation_level=fetcher._isolation_level,
    )
    good: list[ConsumerRecord[Any, Any]] = []
    bad: list[Undecodable] = []
    try:
        for item in reader:
            if isinstance(item, Undecodable):
                bad.append(item)
            else:
                good.append(item)
            if room is not None and len(good) + len(bad) >= room:
                break
    except Exception as exc:  # not even a batch boundary: stop there, keep what was read
        log.error(
            "a partition cannot be read past this point, even leniently",
            extra={"topic": tp.topic, "partition": tp.partition, "error": type(exc).__name__},
            exc_info=True,
        )
    after: int = reader.next_fetch_offset
    if bad:
        after = max(after, bad[-1].last_offset + 1)
    now = _state(consumer, tp)
    if now is not state or now.paused or not now.has_valid_position or now.position != position:
        return [], []
    if after > position and tp in consumer.assignment():
        consumer.seek(tp, after)
    return good, bad
