"""The partition ledger and its commit metadata: round trips, bounds, and the commit point."""

from __future__ import annotations

import random

import pytest

from service.ingest.ledger import (
    METADATA_MAX_BYTES,
    Claim,
    MetadataCorrupt,
    MetadataTooLarge,
    PartitionLedger,
    Snapshot,
    decode,
    encode,
)


def test_round_trip_keeps_finished_claims_owner_and_seq() -> None:
    snap = Snapshot(
        1_000_000,
        frozenset({1_000_001, 1_000_007, 1_004_000}),
        (
            Claim(1_000_003, 1_764_000_000_123, 2, "pod-a-1"),
            Claim(1_000_009, 1_764_000_000_999, 1, "pod-b-7"),
        ),
        "pod-a-1",
        1_764_000_001_000,
        42,
    )
    back = decode(snap.commit, encode(snap))
    assert back.finished == snap.finished
    assert sorted(back.claims, key=lambda c: c.offset) == sorted(snap.claims, key=lambda c: c.offset)
    assert (back.owner, back.written_at_ms, back.seq, back.commit) == (
        "pod-a-1",
        1_764_000_001_000,
        42,
        1_000_000,
    )


def test_empty_metadata_means_nothing_known_and_foreign_metadata_is_refused() -> None:
    assert decode(5, "") == Snapshot(5)
    assert decode(5, None) == Snapshot(5)
    with pytest.raises(MetadataCorrupt):
        decode(5, "written by some other tool")
    with pytest.raises(MetadataCorrupt):
        decode(5, "cgw1:!!!not base64")


def test_worst_case_window_and_claims_fit_the_broker_default() -> None:
    """The largest window and claim count the settings allow, with no pattern for zlib
    to exploit, still fit `offset.metadata.max.bytes` (4096)."""
    rng = random.Random(7)
    commit = 10**12
    finished = frozenset(commit + i for i in range(8_192) if rng.random() < 0.5)
    claims = tuple(
        Claim(
            commit + 8_192 + i,
            1_764_000_000_000 + rng.randrange(10**9),
            rng.randrange(1, 9),
            f"owner-{i % 3}",
        )
        for i in range(128)
    )
    text = encode(Snapshot(commit, finished, claims, "owner-0", 1_764_000_000_000, 2**40))
    assert len(text) <= METADATA_MAX_BYTES
    assert decode(commit, text).finished == finished


def test_encode_refuses_what_would_not_fit() -> None:
    rng = random.Random(1)
    finished = frozenset(i for i in range(200_000) if rng.random() < 0.5)
    with pytest.raises(MetadataTooLarge):
        encode(Snapshot(0, finished, (), "x", 0, 1))


def test_commit_point_is_the_first_unfinished_offset_whatever_the_order() -> None:
    ledger = PartitionLedger(Snapshot(100))
    for o in range(100, 110):
        ledger.start(o)
    order = list(range(100, 110))
    random.Random(3).shuffle(order)
    done: set[int] = set()
    for o in order:
        snap = ledger.snapshot("me", 0, finished=[o])
        ledger.apply([o], [], snap.seq)
        done.add(o)
        expected = min((x for x in range(100, 110) if x not in done), default=110)
        assert ledger.low_watermark == expected == snap.commit
        # everything finished above the commit point is recorded, nothing else
        assert snap.finished == frozenset(x for x in done if x >= expected)


def test_a_new_owner_skips_what_was_finished_and_sees_what_was_claimed() -> None:
    old = PartitionLedger(Snapshot(0))
    for o in range(6):
        old.start(o)
    claim = Claim(1, 123, 1, "old")
    snap = old.snapshot("old", 1, finished=[2, 4], claims=[claim, Claim(2, 1, 1, "old")])
    text = encode(snap)
    # offset 2 was claimed and finished in the same transaction: finished wins
    new = PartitionLedger(decode(snap.commit, text))
    assert snap.commit == 0
    assert [new.finished_before(o) for o in range(6)] == [False, False, True, False, True, False]
    assert new.inherited_claim(1) == claim
    assert new.inherited_claim(0) is None
    assert new.inherited_claim(2) is None


def test_the_commit_point_passes_offsets_that_hold_no_record_once_all_before_are_finished() -> None:
    """Records 10 and 11, then a transaction marker (12) and an aborted transaction (13-15)
    and its marker (16): the consumer's position is 17 and no record below it is left."""
    ledger = PartitionLedger(Snapshot(10))
    ledger.start(10)
    ledger.start(11)
    assert not ledger.pass_to(17)  # 10 and 11 are not finished: the commit point waits
    assert ledger.snapshot("me", 0).commit == 10
    ledger.apply([10], [], 1)
    assert ledger.snapshot("me", 0).commit == 11
    ledger.apply([11], [], 2)
    assert ledger.snapshot("me", 0).commit == 17
    assert ledger.low_watermark == 17
    assert not ledger.pass_to(17)  # no further: nothing moves
    assert not ledger.pass_to(12)  # a position behind (a seek back) never moves it back
    assert ledger.snapshot("me", 0).commit == 17
    assert ledger.pass_to(20)  # idle, and the position moved on: a commit is due
    assert ledger.snapshot("me", 0).commit == 20
    assert not ledger.accept(19)
    assert ledger.accept(20)
    # no commit point yet (an empty group): the first record sets one, not the position
    fresh = PartitionLedger(Snapshot(-1))
    assert not fresh.pass_to(5)
    assert fresh.accept(5)


def test_a_stale_fetch_below_the_restored_commit_is_not_work() -> None:
    ledger = PartitionLedger(Snapshot(50))
    assert not ledger.accept(49)
    assert ledger.accept(50)
    ledger.start(50)
    assert not ledger.accept(50)


def test_resolving_an_inherited_claim_removes_it_from_the_next_commit() -> None:
    ledger = PartitionLedger(Snapshot(0, claims=(Claim(0, 5, 1, "gone"),)))
    ledger.start(0)
    assert ledger.inherited_claim(0) is not None
    snap = ledger.snapshot("me", 9, finished=[0])
    assert snap.claims == ()
    assert snap.commit == 1
    ledger.apply([0], [], snap.seq)
    assert ledger.inherited_claim(0) is None
    assert ledger.claims == {}


def test_a_released_claim_leaves_its_offset_unfinished_for_the_next_owner() -> None:
    ledger = PartitionLedger(Snapshot(0))
    for o in range(3):
        ledger.start(o)
    claimed = ledger.snapshot("me", 1, claims=[Claim(1, 5, 1, "me")])
    ledger.apply([], [Claim(1, 5, 1, "me")], claimed.seq)
    # its call was answered with an error and the replica stops: the claim is dropped, the
    # offset stays above the commit point, unfinished
    snap = ledger.snapshot("me", 9, finished=[0, 2], released=[1])
    assert (snap.commit, snap.claims, snap.finished) == (1, (), frozenset({2}))
    ledger.apply([0, 2], [], snap.seq, released=[1])
    assert ledger.claims == {}
    assert ledger.low_watermark == 1
    new = PartitionLedger(decode(snap.commit, encode(snap)))
    assert new.inherited_claim(1) is None, "the next owner calls it afresh"
    assert not new.finished_before(1)
