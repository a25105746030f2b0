"""How long a new owner waits before fencing the previous one (service/ingest/takeover.py),
on virtual time: for a live owner's claims and pending commits, not for a gone owner's.

The previous owner is scripted: what the group's committed offsets show (a read without
`require_stable`) and whether a commit of the partition is pending, as functions of time.
"""

from __future__ import annotations

import asyncio
import types
from collections.abc import Callable

import pytest
from aiokafka import TopicPartition

from service.config.settings import KafkaSettings
from service.ingest import takeover
from service.ingest.ledger import Claim, Snapshot, encode
from tests.support import vtime

TP = TopicPartition("requests", 0)
OLD, NEW = "replica-a", "replica-b"
EPOCH_MS = 1_800_000_000_000
SETTINGS = KafkaSettings.model_validate({"bootstrap_servers": "unused:9092", "eos_handoff_max_s": 30})


class Owner:
    """The previous owner as the group shows it, `t` seconds into the takeover."""

    def __init__(
        self,
        committed: Callable[[float], Snapshot],
        pending: Callable[[float], bool] = lambda t: False,
    ) -> None:
        self.committed = committed
        self.pending = pending

    def now(self) -> float:
        return asyncio.get_running_loop().time()

    async def fetch(self, tp: TopicPartition, stable: bool) -> tuple[int | None, str]:
        assert not stable  # before fencing: a stable read would wait for a killed owner's commit
        snap = self.committed(self.now())
        return snap.commit, encode(snap)

    async def commit_pending(self, tp: TopicPartition) -> bool:
        return self.pending(self.now())


def waited(owner: Owner, monkeypatch: pytest.MonkeyPatch) -> float:
    """Seconds (virtual) `await_handoff` waited."""

    async def scenario() -> float:
        loop = asyncio.get_running_loop()
        clock = types.SimpleNamespace(monotonic=loop.time, time=lambda: EPOCH_MS / 1000 + loop.time())
        monkeypatch.setattr(takeover, "time", clock)
        start = loop.time()
        await takeover.await_handoff(owner.fetch, TP, SETTINGS, NEW, owner.commit_pending)
        return loop.time() - start

    return vtime.run(scenario())


def snap(
    t: float, commit: int = 10, claims: tuple[Claim, ...] = (), written_s: float | None = None
) -> Snapshot:
    written = t if written_s is None else written_s
    return Snapshot(commit, claims=claims, owner=OLD, written_at_ms=EPOCH_MS + int(written * 1000))


def test_nothing_in_flight_and_nothing_pending_takes_over_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    assert waited(Owner(lambda t: snap(t, written_s=-60)), monkeypatch) == 0


def test_a_commit_in_flight_is_waited_for_and_then_the_claims_it_carried(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    claim = Claim(10, EPOCH_MS, 1, OLD)
    # idle for a minute, then a tick with a claim commits (pending for 0.5 s); the owner
    # heartbeats while the call is in flight and publishes its outcome at 6 s
    owner = Owner(
        lambda t: snap(t, written_s=-60) if t < 0.5 else snap(t, claims=(claim,)) if t < 6 else snap(t, 11),
        pending=lambda t: t < 0.5,
    )
    assert 6 <= waited(owner, monkeypatch) < 6.5


def test_a_claims_commit_landing_between_the_two_reads_is_not_missed(monkeypatch: pytest.MonkeyPatch) -> None:
    """The pending check comes before the read of the committed state. The other way round,
    a tick's commit pending at the read (its claims not shown yet) and marked before the
    check (pending no more) passed for nothing in flight: the new owner fenced the old one,
    whose call was made, and dead-lettered it `outcome_unknown` (2 of 900 requests in one CI
    run of test_replicas' graceful join and leave)."""
    claim = Claim(10, EPOCH_MS, 1, OLD)
    landed: list[float] = []

    class Landing(Owner):
        async def fetch(self, tp: TopicPartition, stable: bool) -> tuple[int | None, str]:
            out = await super().fetch(tp, stable)
            landed.append(self.now())  # the commit's markers are written just after the first read
            return out

    def committed(t: float) -> Snapshot:
        if not landed:
            return snap(t, written_s=-60)
        return snap(t, claims=(claim,)) if t < 6 else snap(t, 11)  # its outcome at 6 s

    owner = Landing(committed, pending=lambda t: not landed)
    assert 6 <= waited(owner, monkeypatch) < 6.5


def test_a_busy_owner_committing_continuously_is_live_however_old_its_first_commit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # a commit pending at every read (transactions begun ahead write offsets), a new one
    # landing every 100 ms, each carrying its first write time: the owner is finishing work
    owner = Owner(lambda t: snap(t, commit=10 + int(t * 10), written_s=-60), pending=lambda t: t < 10)
    assert 10 <= waited(owner, monkeypatch) < 10.5


def test_a_commit_a_gone_owner_left_pending_holds_the_takeover_three_seconds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    claim = Claim(10, EPOCH_MS - 500, 1, OLD)
    owner = Owner(lambda t: snap(t, claims=(claim,), written_s=-0.5), pending=lambda t: True)
    assert 2.5 <= waited(owner, monkeypatch) <= 3.5


def test_no_live_owner_holds_the_takeover_longer_than_the_handoff_maximum(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    claim = Claim(10, EPOCH_MS, 1, OLD)
    owner = Owner(lambda t: snap(t, claims=(claim,)), pending=lambda t: True)  # heartbeats for good
    assert 30 <= waited(owner, monkeypatch) < 30.5


def test_our_own_last_commit_is_not_waited_for(monkeypatch: pytest.MonkeyPatch) -> None:
    claim = Claim(10, EPOCH_MS, 1, NEW)
    mine = Owner(
        lambda t: Snapshot(10, claims=(claim,), owner=NEW, written_at_ms=EPOCH_MS), pending=lambda t: True
    )
    assert waited(mine, monkeypatch) == 0


def test_a_live_owner_whose_heartbeats_come_late_is_waited_for(monkeypatch: pytest.MonkeyPatch) -> None:
    """A loaded host (replicas starting on two cores) delays the owner's heartbeat commits: its
    last one is 4 s old when we look, yet it commits again at 2 s and 4.5 s and publishes at
    7 s. Taken for gone at once, its call's answer would be lost (an unknown outcome in a
    graceful join)."""
    claim = Claim(10, EPOCH_MS - 4_000, 1, OLD)

    def committed(t: float) -> Snapshot:
        if t >= 7:
            return snap(t, 11, written_s=7)
        return snap(t, claims=(claim,), written_s=-4 if t < 2 else 2 if t < 4.5 else 4.5)

    owner = Owner(committed)
    assert 7 <= waited(owner, monkeypatch) < 7.5


def test_a_silent_owner_whose_last_commit_is_younger_than_a_session_is_watched_three_seconds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    claim = Claim(10, EPOCH_MS - 30_000, 1, OLD)
    owner = Owner(lambda t: snap(t, claims=(claim,), written_s=-30))  # 30 s old, then nothing
    assert 3 <= waited(owner, monkeypatch) < 3.5


def test_the_claims_of_an_owner_gone_for_a_session_do_not_hold_the_takeover(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # killed with a call in flight: its partitions move once its session (45 s) expired, at
    # most one consumer heartbeat (3 s) after its last commit
    claim = Claim(10, EPOCH_MS - 43_000, 1, OLD)
    owner = Owner(lambda t: snap(t, claims=(claim,), written_s=-42))
    assert waited(owner, monkeypatch) == 0
