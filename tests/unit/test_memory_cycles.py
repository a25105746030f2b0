"""Garbage that the collector must not be needed for, and the collector's policy (issue 9).

- aiokafka's `PartitionRecords` dropped before its end (a paused, revoked or seeked partition)
  is freed at once by reference counting, with its fetched bytes: no cycle.
- The clock's full collections free a cycle however high the thresholds are.
"""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import Iterator
from typing import Any

import pytest
from aiokafka import TopicPartition
from aiokafka.consumer.fetcher import PartitionRecords
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from aiokafka.record.memory_records import MemoryRecords

import service.ingest  # noqa: F401  # installs the fix, as the service does
from service import gc_policy
from service.ingest import fetch_cycles

TP = TopicPartition("claude.requests.acme", 0)
READ_UNCOMMITTED = 0


def _batch(n: int, value_bytes: int = 1000) -> bytes:
    builder = DefaultRecordBatchBuilder(
        magic=2,
        compression_type=0,
        is_transactional=0,
        producer_id=-1,
        producer_epoch=-1,
        base_sequence=-1,
        batch_size=1 << 24,
    )
    for i in range(n):
        builder.append(i, timestamp=None, key=b"k%d" % i, value=b"x" * value_bytes, headers=[])
    return bytes(builder.build())


def _records(n: int, init: Any = None) -> Any:
    args = (TP, MemoryRecords(_batch(n)), None, 0, None, None, True, READ_UNCOMMITTED)
    if init is None:
        return PartitionRecords(*args)
    obj = PartitionRecords.__new__(PartitionRecords)
    init(obj, *args)
    return obj


@pytest.fixture
def no_automatic_gc() -> Iterator[None]:
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def test_the_fix_is_installed_by_the_ingest_package() -> None:
    assert fetch_cycles.installed()
    assert fetch_cycles.install()  # idempotent


def test_partly_read_fetch_buffer_is_freed_without_the_collector(no_automatic_gc: None) -> None:
    records = _records(50)
    assert [next(records).offset for _ in range(20)] == list(range(20))  # as getmany(max_records=20)
    assert records.next_fetch_offset == 20
    gone = weakref.ref(records)
    del records  # as FetchResult.check_assignment does for a partition paused meanwhile
    assert gone() is None


def test_unread_fetch_buffer_is_freed_without_the_collector(no_automatic_gc: None) -> None:
    records = _records(5)
    gone = weakref.ref(records)
    del records  # as Fetcher.seek_to and a revocation do
    assert gone() is None


def test_reading_to_the_end_still_yields_every_record() -> None:
    records = _records(30)
    assert [r.offset for r in records] == list(range(30))
    assert records.next_fetch_offset == 30


def test_without_the_fix_a_dropped_buffer_is_a_cycle(no_automatic_gc: None) -> None:
    """What aiokafka 0.14 does on its own: this documents the cause (and fails once aiokafka
    breaks the cycle itself; then `fetch_cycles` can go)."""
    original = PartitionRecords.__init__.__wrapped__  # type: ignore[misc]
    records = _records(50, init=original)
    next(records)
    gone = weakref.ref(records)
    del records
    assert gone() is not None, "aiokafka no longer makes the cycle"
    gc.collect()
    assert gone() is None


@pytest.fixture
def restore_gc() -> Iterator[None]:
    thresholds = gc.get_threshold()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)


def test_apply_freezes_start_up_and_sets_thresholds(restore_gc: None) -> None:
    gc_policy.apply(gc_policy.GcPolicy(young_threshold=12_345, older_thresholds=(7, 9)))
    assert gc.get_threshold() == (12_345, 7, 9)
    assert gc.get_freeze_count() > 0


class _Cycle:
    def __init__(self) -> None:
        self.me = self
        self.payload = bytes(1 << 20)  # bytes: invisible to the collector's counts


async def test_the_clock_collects_a_cycle_the_thresholds_never_would(restore_gc: None) -> None:
    gc.set_threshold(10**9, 10**6, 10**6)
    freed = asyncio.Event()
    cycle = _Cycle()
    gone = weakref.ref(cycle, lambda _: freed.set())
    del cycle
    assert gone() is not None
    stop = asyncio.Event()
    policy = gc_policy.GcPolicy(full_every_s=0.05)
    collecting = asyncio.create_task(gc_policy.collect_periodically(stop, policy))
    try:
        async with asyncio.timeout(5):
            await freed.wait()
    finally:
        stop.set()
        async with asyncio.timeout(1):  # stops at once when told
            await collecting
