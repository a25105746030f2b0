"""Forming a batch (service/batches/pending.py `_take`) re-checks what routing decided.

- An `auto` request was routed to the batch path when its deadline left room for a batch; if
  it then waited in the pending topic (worker down, `max_queued_requests` reached, budget
  deferred) until the deadline no longer does, it goes to real time (or a dead letter
  `batch_expired`), not into a batch that will answer after its deadline.
- A request larger than `batches.max_bytes` can be in no batch: it goes to real time instead
  of stopping the pending partition for every partner."""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

import orjson
from aiokafka import TopicPartition

from service.admission.admit import Admission, Record
from service.admission.registry import Registry
from service.batches.pending import PendingOwner
from service.batches.records import pending_message, read_handoff
from service.batches.routing import Router, Turnaround
from service.config.loader import parse_config
from service.telemetry.metrics import Metrics


def _owner(**batches: Any) -> tuple[Any, Admission, PendingOwner]:
    gs = parse_config(
        {
            "batches": {"enabled": True, **batches},  # type: ignore[dict-item]
            "partners": [{"id": "acme", "api_key": {"env": "K"}, "max_request_bytes": 4 * 1024 * 1024}],
        }
    )
    adm = Admission(Registry.build(gs, environ={"K": "sk"}))
    ctx: Any = SimpleNamespace(
        settings=lambda: gs,
        admission=adm,
        router=Router(Turnaround(gs.batches)),
        group="g.batches",
        metrics=Metrics(),
    )
    return gs, adm, PendingOwner(ctx, TopicPartition(gs.batches.pending_topic, 0))


async def _pending(gs: Any, adm: Admission, offset: int, rid: str, **kw: Any) -> Any:
    doc: dict[str, Any] = {
        "request_id": rid,
        "service_class": kw.get("cls", "auto"),
        "params": {
            "model": "claude-haiku-4-5",
            "max_tokens": 16,
            "messages": [{"role": "user", "content": kw.get("text", "hi")}],
        },
    }
    if kw.get("respond_by") is not None:
        doc["respond_by"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(kw["respond_by"]))
    now_ms = int(time.time() * 1000)
    rec = Record("claude.requests.acme", 0, offset, now_ms, rid.encode(), orjson.dumps(doc), ())
    verdict = await adm.admit_checked(rec)
    m = pending_message(gs.batches.pending_topic, verdict, rec, time.time() - 7200)  # type: ignore[arg-type]
    return SimpleNamespace(
        topic=m.topic, partition=0, offset=offset, timestamp=now_ms, key=m.key, value=m.value,
        headers=list(m.headers),
    )  # fmt: skip


async def test_an_auto_request_whose_deadline_passed_while_pending_is_not_batched() -> None:
    gs, adm, owner = _owner()
    now = time.time()
    owner.offer(
        [
            await _pending(gs, adm, 0, "soon", respond_by=now + 1200),  # room for real time only
            await _pending(gs, adm, 1, "gone", respond_by=now - 60),  # no room for anything
            await _pending(gs, adm, 2, "asked", respond_by=now - 60, cls="batch"),  # the partner's choice
            await _pending(gs, adm, 3, "later", respond_by=now + 6 * 3600),
        ]
    )
    taken = await owner._take(gs)
    assert sorted(m.handoff.request_id for m in taken.members[("acme", ())]) == ["asked", "later"]
    by_topic = {m.topic: m for m in taken.messages}
    back = by_topic[gs.realtime_topic()]
    handoff, _ = read_handoff(SimpleNamespace(headers=back.headers, key=back.key, value=back.value))
    assert handoff.request_id == "soon"
    assert handoff.back_to_realtime is not None
    dl = orjson.loads(by_topic[gs.deadletter_topic("acme")].value)
    assert (dl["request_id"], dl["reason"]) == ("gone", "batch_expired")
    assert taken.last_offset == 3


async def test_a_request_larger_than_any_batch_does_not_stop_the_pending_partition() -> None:
    gs, adm, owner = _owner(max_bytes=1024 * 1024)
    owner.offer(
        [
            await _pending(gs, adm, 0, "big", text="x" * (1536 * 1024)),
            await _pending(gs, adm, 1, "small"),
        ]
    )
    taken = await owner._take(gs)
    assert taken.last_offset == 1, "the pending partition goes on"
    assert [m.handoff.request_id for m in taken.members[("acme", ())]] == ["small"]
    assert [m.topic for m in taken.messages] == [gs.realtime_topic()]
    assert owner.buffer == []


async def test_a_fault_admitting_one_pending_request_is_its_dead_letter_and_forming_goes_on(
    monkeypatch: Any,
) -> None:
    gs, adm, owner = _owner()
    owner.offer([await _pending(gs, adm, 0, "boom"), await _pending(gs, adm, 1, "fine")])
    admit = adm.admit_checked

    async def failing(rec: Any, **kw: Any) -> Any:
        if b"boom" in rec.value:
            raise KeyError("a bug")
        return await admit(rec, **kw)

    monkeypatch.setattr(adm, "admit_checked", failing)
    taken = await owner._take(gs)
    assert taken.last_offset == 1, "the pending partition goes on"
    assert [m.handoff.request_id for m in taken.members[("acme", ())]] == ["fine"]
    dl = orjson.loads(next(m.value for m in taken.messages if m.topic == gs.deadletter_topic("acme")))
    assert (dl["request_id"], dl["reason"]) == ("boom", "internal_error")
