"""a form pass that runs while the service stops (Budgets.close(): reserve raises
Draining) must not answer pending requests with `internal_error` dead letters; they stay
pending (redelivered to the next worker), and what the pass reserved is given back."""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

import orjson
import pytest
from aiokafka import TopicPartition

from service.admission.admit import Admission, Record
from service.admission.budget import Budgets
from service.admission.registry import Registry
from service.batches.pending import PendingOwner
from service.batches.records import pending_message
from service.batches.routing import Router, Turnaround
from service.config.loader import parse_config
from service.scheduling.scheduler import Draining
from service.telemetry.metrics import Metrics


def _owner() -> tuple[Any, Admission, PendingOwner, Budgets]:
    gs = parse_config(
        {
            "batches": {"enabled": True},  # type: ignore[dict-item]
            "partners": [{"id": "acme", "api_key": {"env": "K"}, "budget": {"usd_per_day": 100}}],
        }
    )
    registry = Registry.build(gs, environ={"K": "sk"})
    budgets = Budgets(lambda: registry)
    adm = Admission(registry, budgets=budgets)
    ctx: Any = SimpleNamespace(
        settings=lambda: gs, admission=adm, router=Router(Turnaround(gs.batches)),
        group="g.batches", metrics=Metrics(),
    )  # fmt: skip
    return gs, adm, PendingOwner(ctx, TopicPartition(gs.batches.pending_topic, 0)), budgets


async def _pending(gs: Any, adm: Admission, offset: int, rid: str) -> Any:
    params = {"model": "claude-haiku-4-5", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
    doc = {"request_id": rid, "service_class": "batch", "params": params}
    now_ms = int(time.time() * 1000)
    rec = Record("claude.requests.acme", 0, offset, now_ms, rid.encode(), orjson.dumps(doc), ())
    verdict = await adm.admit_checked(rec)
    m = pending_message(gs.batches.pending_topic, verdict, rec, time.time())  # type: ignore[arg-type]
    return SimpleNamespace(
        topic=m.topic, partition=0, offset=offset, timestamp=now_ms, key=m.key, value=m.value,
        headers=list(m.headers),
    )  # fmt: skip


async def test_a_pass_interrupted_by_the_stop_dead_letters_nothing_and_keeps_no_reservation(
    monkeypatch: Any,
) -> None:
    gs, adm, owner, budgets = _owner()
    owner.offer([await _pending(gs, adm, 0, "first"), await _pending(gs, adm, 1, "second")])
    reserve = adm.reserve

    async def stopping(a: Any, **kw: Any) -> Any:
        out = await reserve(a, **kw)
        budgets.close()  # the stop arrives while the pass is under way
        return out

    monkeypatch.setattr(adm, "reserve", stopping)
    with pytest.raises(Draining):  # not the pass's dead letters (internal_error) for the rest
        await owner._take(gs)
    assert len(owner.buffer) == 2, "both stay pending, for the next worker"
    assert all(u.nusd == 0 for _, _, _, u, _ in budgets.local.entries()), "the pass's reservations given back"


async def test_a_pass_of_only_rejected_or_unbatched_requests_forms_no_empty_batch() -> None:
    gs, adm, owner, _ = _owner()
    rec = await _pending(gs, adm, 0, "first")
    # a partner disabled by a reload: its pending request is rejected, not a member
    registry = Registry.build(
        parse_config(
            {
                "batches": {"enabled": True},
                "partners": [{"id": "acme", "api_key": {"env": "K"}, "enabled": False}],
            }
        ),  # type: ignore[dict-item]
        environ={"K": "sk"},
    )
    adm.registry = registry
    owner.offer([rec])
    taken = await owner._take(gs)
    assert taken.last_offset == 0
    empty = [g for g, members in taken.members.items() if not members]
    assert not empty, f"form() would record and create a batch without members for {empty}"
