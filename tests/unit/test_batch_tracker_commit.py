"""Tracker._commit / _publish (service/batches/tracker.py).

1. A results transaction that fails (a Kafka error the process survives) is retried by
   `_run` from `_poll`/`_publish` in the same process: `state.published` must not have moved
   past the chunk that was never published, or its members never get an outcome.
2. `settle_once` keys a chunk by where it ends: after a crash between the settle and the
   transaction, a reload of `results_chunk` moves the chunk's end and its members are settled
   a second time."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace
from typing import Any

from service.admission.budget import Budgets, LocalLedger, periods
from service.admission.pricing import Amount
from service.admission.registry import Registry
from service.batches import tracker as tracker_mod
from service.batches.records import BatchState
from service.batches.results import Decision
from service.batches.tracker import Tracker
from service.config.loader import parse_config
from service.ingest.sending import OutMessage
from service.telemetry.metrics import Metrics


class _Results:
    def __init__(self, n: int) -> None:
        self.n = n

    def __aiter__(self) -> Any:
        async def gen() -> Any:
            for i in range(self.n):
                yield {"custom_id": f"c{i}", "result": {"type": "succeeded"}}

        return gen()


def _setup(n: int, chunk: int, budget: bool = False) -> tuple[Any, Tracker, list[list[OutMessage]], Any]:
    box: dict[str, Any] = {"gs": parse_config(
        {
            "batches": {"enabled": True, "results_chunk": chunk},  # type: ignore[dict-item]
            "partners": [{"id": "acme", "api_key": {"env": "K"}, "budget": {"usd_per_day": 1000}}],
        }
    )}  # fmt: skip
    registry = Registry.build(box["gs"], environ={"K": "sk"})
    budgets = Budgets(lambda: registry, local=LocalLedger()) if budget else None
    batches = SimpleNamespace(results=lambda *a, **k: _async(_Results(n)))
    ctx: Any = SimpleNamespace(
        settings=lambda: box["gs"], claude=SimpleNamespace(batches=lambda pid: batches),
        router=None, metrics=Metrics(), admission=SimpleNamespace(budgets=budgets, registry=registry),
    )  # fmt: skip
    sent: list[list[OutMessage]] = []
    owner: Any = SimpleNamespace(known_ids=set(), trackers={}, fail=0)

    async def transact(messages: list[OutMessage], **kw: Any) -> None:
        if owner.fail:
            owner.fail -= 1
            raise RuntimeError("KafkaTimeoutError: the transaction was aborted")
        sent.append([m for m in messages if m.topic == "out"])

    owner.transact = transact
    st = BatchState(key="acme.k", partner="acme", intent_at=1.0e9, members=list(range(n)), batch_id="b1",
                    reserved=[[10, 100] for _ in range(n)], shared=False)  # fmt: skip
    st.handoffs = {f"c{i}": (i, SimpleNamespace(partner="acme", model="claude-haiku-4-5")) for i in range(n)}
    t = Tracker(ctx, owner, None, st, recovered=False)  # type: ignore[arg-type]
    return box, t, sent, owner


async def _async(x: Any) -> Any:
    return x


def _decide(gs: Any, router: Any, h: Any, result: Any, label: Any) -> Decision:
    return Decision([OutMessage("out", b"k", repr(h).encode())], "response", kind="succeeded")


async def test_a_failed_results_transaction_is_published_when_retried(monkeypatch: Any) -> None:
    monkeypatch.setattr(tracker_mod, "decide", _decide)
    _, t, sent, owner = _setup(n=4, chunk=2)
    owner.fail = 1  # the first chunk's transaction fails once; the process goes on
    with contextlib.suppress(RuntimeError):
        await t._publish()
    await t._publish()  # what `_run` does next (after `_poll`)
    published = sum(len(batch) for batch in sent)
    assert published == 4, f"{4 - published} of the batch's 4 results were never published"


async def test_a_results_chunk_reload_after_a_crash_does_not_settle_a_member_twice(monkeypatch: Any) -> None:
    monkeypatch.setattr(tracker_mod, "decide", _decide)
    box, t, _, owner = _setup(n=4, chunk=4, budget=True)
    budgets = t.ctx.admission.budgets
    partner = t.ctx.admission.registry.by_id["acme"]
    ps = periods(partner.settings.budget, t.state.intent_at)
    budgets.local.reserve("acme", ps, Amount(40, 400))  # the four members' reservations
    owner.fail = 1  # stands for a crash after batch.settled (the settle is in Redis, the chunk is not)
    with contextlib.suppress(RuntimeError):
        await t._publish()
    t.state.published = 0  # the restarted worker reads the last committed state
    box["gs"] = box["gs"].model_copy(
        update={"batches": box["gs"].batches.model_copy(update={"results_chunk": 2})}
    )
    await t._publish()
    used = budgets.local.used("acme", ps[0])
    assert used == Amount(0, 0), f"every reservation released once: {used}"


async def test_a_batch_whose_publish_is_retried_is_one_turnaround() -> None:
    import datetime as dt

    from service.batches.routing import Router, Turnaround

    _, t, _, _ = _setup(n=1, chunk=1)
    gs = t.ctx.settings()
    t.ctx.router = Router(Turnaround(gs.batches))
    created = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    ended = SimpleNamespace(
        processing_status="ended", created_at=created, ended_at=created + dt.timedelta(hours=24)
    )

    async def retrieve(*a: Any, **k: Any) -> Any:
        return ended

    t.ctx.claude = SimpleNamespace(batches=lambda pid: SimpleNamespace(retrieve=retrieve))
    for _ in range(25):  # `_run`: poll, publish fails (results unavailable, say), poll again, ...
        await t._poll()
    seen = t.ctx.router.turnaround.take_unshared()
    assert len(seen) == 1, (
        f"one 24 h batch counted {len(seen)} times (p95 {t.ctx.router.turnaround.expected_s:.0f} s)"
    )
