"""Finding transactions left hanging from successive reads of last stable offsets and high
watermarks (service/ingest/hanging.py, `StuckPartitions`)."""

from __future__ import annotations

from aiokafka import TopicPartition

from service.ingest.hanging import StuckPartitions, holders

A, B = TopicPartition("claude.responses.a", 0), TopicPartition("claude.deadletter.a", 1)


def test_stuck_below_the_high_watermark_for_long_enough() -> None:
    stuck = StuckPartitions(after_s=100)
    assert stuck.update({A: (5, 9), B: (7, 7)}, now=0) == []
    assert stuck.update({A: (5, 12), B: (7, 7)}, now=99) == []  # not long enough yet
    assert stuck.update({A: (5, 12), B: (7, 7)}, now=100) == [A]  # B is read to its end


def test_a_moving_stable_offset_is_not_stuck() -> None:
    stuck = StuckPartitions(after_s=100)
    for t, stable in enumerate(range(5, 50, 5)):
        assert stuck.update({A: (stable, stable + 3)}, now=t * 60) == []


def test_reported_once_per_stuck_offset_and_told_once_when_not_ended() -> None:
    stuck = StuckPartitions(after_s=10)
    stuck.update({A: (5, 9), B: (2, 4)}, now=0)
    assert stuck.update({A: (5, 9), B: (2, 4)}, now=10) == [A, B]
    assert stuck.unended == []  # just reported: the marks come now
    assert stuck.update({A: (5, 9), B: (4, 4)}, now=40) == []  # not reported again
    assert stuck.unended == [A]  # still at 5 after its marks; B was ended
    assert stuck.update({A: (5, 9), B: (4, 4)}, now=70) == []
    assert stuck.unended == []  # said once
    # it moves, then sticks again further on: a new report
    assert stuck.update({A: (9, 14)}, now=80) == []
    assert stuck.update({A: (9, 14)}, now=90) == [A]
    assert stuck.unended == []


def test_a_partition_not_read_starts_again() -> None:
    stuck = StuckPartitions(after_s=10)
    stuck.update({A: (5, 9)}, now=0)
    assert stuck.update({}, now=5) == []  # no leader at this read
    assert stuck.update({A: (5, 9)}, now=11) == []  # counted from here
    assert stuck.update({A: (5, 9)}, now=21) == [A]


def test_the_holder_is_the_producer_whose_open_transaction_began_at_the_stable_offset() -> None:
    offsets = {A: (5, 12), B: (7, 9)}
    open_txns = {
        A: {101: 5, 102: 8},  # 102's transaction began later: it waits behind 101's, holds nothing
        B: {103: 7},
        TopicPartition("claude.responses.a", 2): {104: 3},  # not read: nothing known of it
    }
    assert holders(offsets, open_txns) == {101: [A], 103: [B]}
    assert holders(offsets, {A: {}}) == {}


def test_stuck_counts_the_partitions_stuck_past_the_threshold_now() -> None:
    stuck = StuckPartitions(after_s=100)
    stuck.update({A: (5, 9), B: (7, 9)}, now=0)
    assert stuck.stuck == 0  # not long enough yet
    stuck.update({A: (5, 9), B: (7, 9)}, now=100)
    assert stuck.stuck == 2
    stuck.update({A: (5, 9), B: (9, 9)}, now=105)  # B read to its end
    assert stuck.stuck == 1
    stuck.update({A: (6, 9)}, now=110)  # A moved on
    assert stuck.stuck == 0
