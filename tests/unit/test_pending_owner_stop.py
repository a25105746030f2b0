"""A batch worker's pending partition revoked while it records an intent (service/batches/pending.py).

Seen in chaos seed 14: the intent transaction committed as the batches group rebalanced, the
owner was stopped meanwhile, and `form` then started a tracker on the stopped owner. That
tracker created the batch while the partition's next owner (in the same process) recovered
the same intent, found no batch yet, and created it again: 14 requests billed in two batches.
A stopped owner now forms and tracks nothing; the next owner recovers the intent."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka import TopicPartition
from aiokafka.errors import KafkaError

from service.batches import pending, worker
from service.batches.pending import PendingOwner, _Member, _Taken
from service.config.loader import parse_config

TP = TopicPartition("t.gateway.batch-pending", 0)


class _Tracker:
    started: list[str] = []
    intents = 0

    def __init__(self, ctx: Any, owner: Any, tp: Any, st: Any, **_: Any) -> None:
        self.key = st.key

    def start(self) -> None:
        _Tracker.started.append(self.key)


def _owner(monkeypatch: pytest.MonkeyPatch, revoked_during_transaction: bool) -> PendingOwner:
    gs = parse_config({"batches": {"enabled": True}, "partners": []})
    ctx: Any = SimpleNamespace(
        settings=lambda: gs, admission=SimpleNamespace(budgets=None), group="g.batches"
    )
    owner = PendingOwner(ctx, TP)
    _Tracker.started, _Tracker.intents = [], 0
    monkeypatch.setattr(pending, "Tracker", _Tracker)

    async def take(_gs: Any) -> _Taken:
        taken = _Taken(last_offset=5)
        for offset in (4, 5):
            rec = SimpleNamespace(offset=offset, value=b"{}", timestamp=0)
            handoff = SimpleNamespace(custom_id=f"acme-{offset}")
            adm = SimpleNamespace(params={"model": "claude-haiku-4-5", "max_tokens": 16, "messages": []})
            taken.members[("acme", ())].append(_Member(rec, handoff, adm))  # type: ignore[arg-type]
        return taken

    async def transact(messages: list[Any], **_: Any) -> None:
        assert [m.topic for m in messages] == [gs.batches.state_topic]  # the intent
        _Tracker.intents += 1
        if revoked_during_transaction:
            await owner.stop()  # the rebalance listener, while the commit is in flight

    monkeypatch.setattr(owner, "_take", take)
    monkeypatch.setattr(owner, "transact", transact)
    return owner


async def test_an_intent_recorded_by_a_live_owner_is_tracked(monkeypatch: pytest.MonkeyPatch) -> None:
    owner = _owner(monkeypatch, revoked_during_transaction=False)
    await owner.form()
    assert len(_Tracker.started) == 1
    assert _Tracker.started[0].startswith("acme.")


async def test_an_owner_revoked_during_its_intent_transaction_starts_no_tracker(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    owner = _owner(monkeypatch, revoked_during_transaction=True)
    await owner.form()
    assert _Tracker.started == []  # the next owner recovers the intent, and alone creates it
    assert owner.trackers == {}
    owner.buffer.append(SimpleNamespace(offset=6, value=b"{}", timestamp=1))  # type: ignore[arg-type]
    await owner.form_if_due()  # a stopped owner forms nothing more
    assert _Tracker.started == []
    assert _Tracker.intents == 1


@pytest.mark.parametrize("ending", ["error", "cancel"])
async def test_an_owner_whose_start_fails_or_is_cancelled_is_stopped(
    monkeypatch: pytest.MonkeyPatch, ending: str
) -> None:
    """A takeover of a pending partition that fails, or that a stopping worker cancels, stops
    the owner's producer: it is in no `_owners` yet, so no revocation would (CI's `Unclosed
    AIOKafkaConnection` was this kind of leak on the request path)."""
    gs = parse_config({"batches": {"enabled": True}, "partners": []})
    ctx: Any = SimpleNamespace(settings=lambda: gs, group="g.batches")
    stopped: list[TopicPartition] = []
    entered = asyncio.Event()

    async def start(self: PendingOwner, consumer: Any) -> int:
        entered.set()
        if ending == "error":
            raise KafkaError("coordinator not available")
        await asyncio.Event().wait()  # until cancelled
        return 0

    async def stop(self: PendingOwner) -> None:
        stopped.append(self.tp)

    monkeypatch.setattr(PendingOwner, "start", start)
    monkeypatch.setattr(PendingOwner, "stop", stop)
    batch_worker = worker.BatchWorker(ctx)
    batch_worker._consumer = SimpleNamespace(assignment=lambda: {TP})  # type: ignore[assignment]
    assigning = asyncio.create_task(batch_worker.assigned([TP]))
    await asyncio.wait_for(entered.wait(), 2)
    if ending == "cancel":
        assigning.cancel()
    with pytest.raises(asyncio.CancelledError if ending == "cancel" else KafkaError):
        await asyncio.wait_for(assigning, 2)
    assert stopped == [TP], "the owner that never took the partition is stopped"
    assert batch_worker._owners == {}
