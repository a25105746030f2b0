"""A claim's call waits until its commit is seen in the group's offsets (service/ingest/claims_seen.py):
seen, it starts; never seen, the writer ends the hanging commit; overtaken by another owner's
commit, it never starts."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka import TopicPartition

from service.ingest import claims_seen
from service.ingest.claims_seen import ClaimsSeen
from service.ingest.ledger import Claim, Snapshot, encode
from service.ingest.partition import Fenced
from service.ingest.sending import Item

TP = TopicPartition("claude.requests.p", 0)


class _Offsets:
    """The group's offsets as a read without require_stable shows them."""

    def __init__(self) -> None:
        self.shown = Snapshot(-1)
        self.marks = 0

    async def fetch(self, tp: TopicPartition, stable: bool) -> tuple[int | None, str]:
        assert not stable  # materialized commits only: a stable read would wait for our own
        if self.shown.commit < 0:
            return None, ""
        return self.shown.commit, encode(self.shown)

    def show(self, owner: str, seq: int) -> None:
        self.shown = Snapshot(10, owner=owner, seq=seq)

    async def mark(self) -> None:
        self.marks += 1
        self.show("me", 7)  # the COMMIT marker: the hanging commit is seen


def _claim(offset: int) -> Item:
    return Item(offset, claim=Claim(offset, 1, 1, "me"))


async def test_claims_start_once_their_commit_is_seen() -> None:
    offsets = _Offsets()
    seen = ClaimsSeen(TP, "me", offsets.fetch, offsets.mark, Fenced)
    first, second = _claim(1), _claim(2)
    seen.add(5, [first])
    seen.add(6, [second])
    offsets.show("me", 4)  # the commit before: not theirs yet
    await asyncio.sleep(0.1)
    assert not first.done.done()
    offsets.show("me", 5)
    await asyncio.wait_for(first.done, 1)
    assert not second.done.done()
    offsets.show("me", 7)  # a later commit of ours holds it too
    await asyncio.wait_for(second.done, 1)
    await seen.close(Fenced("closed"))
    assert offsets.marks == 0


async def test_a_commit_never_seen_is_ended_by_the_writer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(claims_seen, "HANGING_AFTER_S", 0.2)
    offsets = _Offsets()
    offsets.show("me", 4)
    seen = ClaimsSeen(TP, "me", offsets.fetch, offsets.mark, Fenced)
    claim = _claim(1)
    seen.add(5, [claim])
    await asyncio.wait_for(claim.done, 2)  # after the mark
    assert offsets.marks == 1
    await seen.close(Fenced("closed"))


async def test_another_owner_s_commit_past_theirs_stops_the_calls() -> None:
    offsets = _Offsets()
    offsets.show("me", 4)
    seen = ClaimsSeen(TP, "me", offsets.fetch, offsets.mark, Fenced)
    claim = _claim(1)
    seen.add(5, [claim])
    offsets.show("the-next-owner", 6)
    with pytest.raises(Fenced):
        await asyncio.wait_for(claim.done, 1)
    await seen.close(Fenced("closed"))


async def test_a_failed_read_is_read_again() -> None:
    offsets = _Offsets()
    failures = [RuntimeError("a bug in a read"), None]

    async def fetch(tp: TopicPartition, stable: bool) -> tuple[int | None, str]:
        failure = failures.pop(0) if failures else None
        if failure is not None:
            raise failure
        return await offsets.fetch(tp, stable)

    seen = ClaimsSeen(TP, "me", fetch, offsets.mark, Fenced)
    claim = _claim(1)
    seen.add(5, [claim])
    offsets.show("me", 5)
    await asyncio.wait_for(claim.done, 1)
    await seen.close(Fenced("closed"))
