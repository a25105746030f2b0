"""What one tick's transaction carries (service/ingest/tick.py): claims over the limit wait,
outcomes that come while it waits for its partitions join it, and its metadata covers exactly
what it carries."""

from __future__ import annotations

from typing import Any

import pytest
from aiokafka import TopicPartition

from service.ingest import tick as tick_module
from service.ingest.ledger import Claim, MetadataTooLarge, PartitionLedger, Snapshot, decode
from service.ingest.sending import Item
from service.ingest.tick import TickContents

TP = TopicPartition("claude.requests.p", 0)


def _ledger(started: range) -> PartitionLedger:
    ledger = PartitionLedger(Snapshot(started.start))
    for offset in started:
        ledger.start(offset)
    return ledger


def _outcome(offset: int) -> Item:
    return Item(offset, finish=True)


def _claim(offset: int) -> Item:
    return Item(offset, claim=Claim(offset, 1, 1, "me"))


async def test_claims_over_the_limit_wait_in_their_order() -> None:
    items = [_claim(0), _outcome(1), _claim(2), _claim(3), _outcome(4)]
    tick = TickContents(_ledger(range(5)), "me", 1, items)
    assert [i.offset for i in tick.items] == [0, 1, 4]
    assert [i.offset for i in tick.left] == [2, 3]
    committed = decode(*tick.offsets(TP)[TP])
    assert [c.offset for c in committed.claims] == [0]
    assert committed.finished == {1, 4}


async def test_outcomes_join_and_the_metadata_covers_them() -> None:
    tick = TickContents(_ledger(range(4)), "me", 10, [_outcome(1)])
    queue = [_outcome(0), _claim(2), _outcome(3)]
    late = tick.join(queue)
    assert [i.offset for i in late] == [0, 3]
    assert [i.offset for i in queue] == [2]  # the claim waits for the next tick
    assert [i.offset for i in tick.items] == [1, 0, 3]
    commit, metadata = tick.offsets(TP)[TP]
    assert commit == 2  # 0 and 1 finished: the commit point moved past them
    assert decode(commit, metadata).finished == {3}
    assert tick.join(queue) == []


async def test_outcomes_that_would_not_fit_the_metadata_do_not_join(monkeypatch: pytest.MonkeyPatch) -> None:
    tick = TickContents(_ledger(range(1, 4)), "me", 10, [_outcome(2)])
    before = tick.offsets(TP)

    def too_large(snapshot: Snapshot, *_: Any) -> str:
        raise MetadataTooLarge("no room")

    monkeypatch.setattr(tick_module, "encode", too_large)
    queue = [_outcome(3)]
    assert tick.join(queue) == []
    assert [i.offset for i in queue] == [3]
    assert [i.offset for i in tick.items] == [2]
    assert tick.offsets(TP) == before
