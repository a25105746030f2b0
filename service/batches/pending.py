"""A pending partition's owner in the batch worker: its transactions, and forming batches.

Forming: pending requests are buffered until a partner's batch would exceed
`max_requests` / `max_bytes`, or the oldest waited `max_age_s`. Then, for the
buffer's prefix taken, each request is admitted again (its params as first admitted;
the signature and replay were checked when it was first read) and reserves its
budget at batch price; and ONE transaction records a state document (an *intent*)
per partner batch, the dead letters of the refused, the deferred ones written
back to the pending topic, and the pending offset past everything taken. Only
then is any batch created: a crash before leaves nothing behind but the
untouched pending records, a crash after leaves an intent the next worker finishes.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.structs import ConsumerRecord

from service.admission.admit import Admission, Admitted, Deferred, Rejected
from service.admission.budget import Reservation, periods
from service.admission.pricing import Amount
from service.batches.records import BadHandoff, BatchState, Handoff, handoff_message, read_handoff
from service.batches.results import dead_letter, origin_of
from service.batches.routing import Router
from service.batches.store import commit, load_states
from service.batches.tracker import Tracker
from service.config.kafka import start_whole, transactional_producer
from service.config.settings import GatewaySettings
from service.contracts.outcomes import DeadLetter
from service.contracts.params import header_values
from service.contracts.reasons import Reason
from service.ingest import failpoints
from service.ingest.hanging import heal, mark_partitions, producer_id, written_topics
from service.ingest.sending import OutMessage
from service.ingest.stable_offsets import fetch_committed_stable
from service.scheduling.scheduler import Draining
from service.telemetry.metrics import Metrics
from service.upstream.client import ClaudeClient

log = logging.getLogger(__name__)

DEFER_RETRY_S = 60.0
"""A request whose budget is exhausted (on_exhausted: defer) is looked at again this often."""
PASS_IDLE_S = 2.0
"""An idle partition's position is committed this long after its last commit (`pass_markers`);
under load the next batch's offsets pass the markers anyway, with no transaction of its own."""


@dataclass
class BatchContext:
    settings: Callable[[], GatewaySettings]
    admission: Admission
    claude: ClaudeClient
    router: Router
    metrics: Metrics

    @property
    def group(self) -> str:
        return f"{self.settings().kafka.group_id}.batches"


@dataclass
class _Member:
    rec: ConsumerRecord
    handoff: Handoff
    adm: Admitted
    amount: tuple[int, int] = (0, 0)


Group = tuple[str, tuple[tuple[str, str], ...]]
"""A batch's partner and its members' header fields (`header_values`): one batch each."""


@dataclass
class _Taken:
    members: dict[Group, list[_Member]] = field(default_factory=lambda: defaultdict(list))
    messages: list[OutMessage] = field(default_factory=list)
    last_offset: int = -1


class PendingOwner:
    """The worker of one pending partition while this replica owns it."""

    def __init__(self, ctx: BatchContext, tp: TopicPartition) -> None:
        self.ctx = ctx
        self.tp = tp
        self.buffer: list[ConsumerRecord] = []
        self._buffer_bytes = 0
        self.trackers: dict[str, Tracker] = {}
        self._producer: AIOKafkaProducer | None = None
        self._txn = asyncio.Lock()
        self._creating = asyncio.Lock()
        self.known_ids: set[str] = set()
        """Ids of the batches the state topic says are done (a lost create is never one of them)."""
        self.stopped = False
        """Revoked or stopping: no batch is formed or tracked here any more."""
        self.committed = 0
        self._pass_after = 0.0

    async def start(self, consumer: AIOKafkaConsumer) -> int:
        """Fence the previous worker, resume the open batches; returns the offset to read from."""
        gs = self.ctx.settings()
        self._producer = transactional_producer(gs.kafka, f"{self.ctx.group}.{self.tp.partition}")
        await start_whole([self._producer])  # initialises the transactional id: the old worker is fenced
        # always, before reading what the old worker wrote: a transaction of its left hanging
        # would hide its records and all after them from `load_states` (which reads up to the
        # last stable offset) and keep the pending offset unstable (hanging.py). One start per
        # assignment of the pending partition: an empty transaction is cheap here
        await heal(self._producer, self.ctx.group, written_topics(gs))
        states, self.known_ids = await load_states(
            gs.kafka, TopicPartition(gs.batches.state_topic, self.tp.partition)
        )
        for st in states.values():
            self._track(st, recovered=True)
        offset, _ = await fetch_committed_stable(consumer._coordinator, self.tp)
        log.info("batch worker started", extra={"open_batches": len(states), "offset": offset})
        self.committed, self._pass_after = offset or 0, time.monotonic() + PASS_IDLE_S
        return self.committed

    async def stop(self) -> None:
        # first: a `form` whose intent transaction is in flight must start no tracker after
        # this (it would create the batch while the next owner recovers the same intent)
        self.stopped = True
        for tracker in list(self.trackers.values()):
            await tracker.cancel()
        if self._producer is not None:
            await asyncio.shield(self._producer.stop())

    async def transact(self, messages: list[OutMessage], **kw: Any) -> None:
        assert self._producer is not None
        async with self._txn:
            await commit(self._producer, messages, **kw)

    async def mark(self, partitions: list[TopicPartition], pids: Collection[int] | None = None) -> bool:
        """A transaction holding `partitions` (if the producer has one of `pids`): ends
        what this id left hanging there (`hanging.py`). True if it was committed."""
        if self._producer is None or not (pids is None or producer_id(self._producer) in pids):
            return False
        async with self._txn:
            await mark_partitions(self._producer, self.ctx.group, partitions)
        return True

    def creating_lock(self) -> asyncio.Lock:
        """One create (or recovery listing) at a time, first come first served (asyncio's
        locks are FIFO), in the order the intents were recorded, before and after a crash.
        Only the first intent without a recorded id can then have a batch upstream."""
        return self._creating

    def done(self, key: str) -> None:
        self.trackers.pop(key, None)

    def _track(self, st: BatchState, *, recovered: bool, members: dict[str, Any] | None = None) -> None:
        if self.stopped:  # the intent is recorded: the partition's next owner recovers it
            return
        tracker = Tracker(self.ctx, self, self.tp, st, recovered=recovered, members=members)
        self.trackers[st.key] = tracker
        tracker.start()

    # -- forming --------------------------------------------------------------------------

    def offer(self, records: list[ConsumerRecord]) -> None:
        for rec in records:
            self.buffer.append(rec)
            self._buffer_bytes += len(rec.value or b"")

    def full(self) -> bool:
        s = self.ctx.settings().batches
        return len(self.buffer) >= 2 * s.max_requests or self._buffer_bytes >= 2 * s.max_bytes

    def _queued(self) -> int:
        return sum(len(t.state.members) for t in self.trackers.values())

    async def form_if_due(self) -> None:
        if self.stopped or not self.buffer:
            return
        s = self.ctx.settings().batches
        oldest = self.buffer[0].timestamp / 1000 if self.buffer[0].timestamp else time.time()
        due = time.time() - oldest >= s.max_age_s or self.full() or len(self.buffer) >= s.max_requests
        if not due:
            return
        if s.max_queued_requests is not None and self._queued() >= s.max_queued_requests:
            return  # Anthropic's batch queue is full: wait for batches to end
        await self.form()

    async def form(self) -> None:
        gs = self.ctx.settings()
        taken = await self._take(gs)
        if taken.last_offset < 0:
            return
        now = time.time()
        new: list[tuple[BatchState, dict[str, Any]]] = []
        for (partner, headers), members in taken.members.items():
            st = BatchState(
                key=f"{partner}.{uuid.uuid4().hex}",
                partner=partner,
                headers=dict(headers),
                chunk=gs.batches.results_chunk,
                intent_at=now,
                members=[m.rec.offset for m in members],
                reserved=[list(m.amount) for m in members],
                shared=self.ctx.admission.budgets is not None
                and self.ctx.admission.budgets.shared is not None,
            )
            st.handoffs = {m.handoff.custom_id: (m.rec.offset, m.handoff) for m in members}
            new.append((st, {m.handoff.custom_id: m.adm.params for m in members}))
            taken.messages.append(st.message(gs.batches.state_topic))
        try:
            await self.transact(
                taken.messages, offsets={self.tp: taken.last_offset + 1}, group_id=self.ctx.group
            )
        except BaseException:
            for st, _ in new:  # nothing was recorded: give the reservations back
                await self._release(st)
            raise
        self.committed, self._pass_after = taken.last_offset + 1, time.monotonic() + PASS_IDLE_S
        failpoints.hit("batch.intent")
        for st, params in new:
            self._track(st, recovered=False, members=params)

    async def pass_markers(self, position: int) -> None:
        """Nothing buffered and nothing committed for `PASS_IDLE_S`: commit the position, past
        what holds no record (the marker after each gateway transaction that wrote here,
        aborted records). The last batch's offsets stop before them: the group's lag stayed
        at 1 or more while idle (`kafka-consumer-groups`, lag alerts)."""
        if self.stopped or self.buffer or position <= self.committed or time.monotonic() < self._pass_after:
            return
        await self.transact([], offsets={self.tp: position}, group_id=self.ctx.group)
        self.committed = position

    async def _release(self, st: BatchState) -> None:
        budgets = self.ctx.admission.budgets
        partner = self.ctx.admission.registry.by_id.get(st.partner)
        if budgets is None or partner is None:
            return
        for offset, (_, h) in zip(st.members, st.handoffs.values(), strict=False):
            tokens, nusd = st.reserved_of(offset)
            ps = periods(partner.settings.budget, st.intent_at)
            await budgets.release(Reservation(st.partner, h.model, ps, Amount(tokens, nusd), st.shared))

    async def _admit(self, h: Handoff, original: Any) -> Admitted | Rejected:
        """The request's verdict now; a fault of the gateway's own is its `internal_error`
        (the step would fail on it at every try, and the partition stop behind it)."""
        try:
            return await self.ctx.admission.admit_checked(original, verified=True)
        except Exception as exc:  # noqa: BLE001 - logged with its traceback, counted
            return self._fault(h, exc, "batch_admission")

    async def _reserve(self, h: Handoff, adm: Admitted) -> Admitted | Rejected | Deferred:
        try:
            return await self.ctx.admission.reserve(adm, service_tier="batch")
        except Draining:
            raise  # the service stops: the request stays pending, for the next worker
        except Exception as exc:  # noqa: BLE001 - as `_admit`
            return self._fault(h, exc, "batch_reserve")

    def _fault(self, h: Handoff, exc: Exception, where: str) -> Rejected:
        log.exception(f"unexpected error ({where})", extra={"partner": h.partner, "request_id": h.request_id})
        self.ctx.metrics.internal_errors.labels(h.partner, where).inc()
        return Rejected(
            h.partner, Reason.INTERNAL_ERROR, f"gateway error: {type(exc).__name__}", h.request_id
        )

    async def _take(self, gs: GatewaySettings) -> _Taken:
        """Decide the buffer's prefix: members of a partner batch, dead letters, or deferred."""
        taken = _Taken()
        try:
            return await self._fill(gs, taken)
        except BaseException:  # nothing of this pass is recorded: give its reservations back
            for members in taken.members.values():
                for m in members:
                    await self.ctx.admission.release(m.adm)
            raise

    async def _fill(self, gs: GatewaySettings, taken: _Taken) -> _Taken:
        s = gs.batches
        sizes: dict[Group, int] = defaultdict(int)
        seen: dict[str, set[str]] = defaultdict(set)
        now = time.time()
        count = 0
        for rec in self.buffer:
            try:
                handoff, original = read_handoff(rec)
            except BadHandoff as exc:
                log.critical(
                    "pending record without a readable handoff; skipped",
                    extra={"offset": rec.offset, "error": str(exc)},
                )
                count += 1
                continue
            pid = handoff.partner
            size = len(rec.value or b"") + 256
            if size > s.max_bytes:  # no batch can ever hold it: waiting for one would wedge the partition
                count += 1
                why = f"too large for a batch ({size} bytes, batches.max_bytes {s.max_bytes})"
                taken.messages += _not_batched(gs, self.ctx.router, rec, handoff, why, now)
                continue
            if handoff.not_before > now or handoff.custom_id in seen[pid]:
                # deferred (budget), or the same request id twice: into a later batch
                count += 1
                taken.messages.append(handoff_message(s.pending_topic, rec, handoff))
                continue
            verdict = await self._admit(handoff, original)
            # a batch's calls carry one `workspace_id` / `user_profile_id`: one batch per set
            group = (pid, tuple(sorted(header_values(getattr(verdict, "params", {})).items())))
            if len(taken.members.get(group, ())) >= s.max_requests or sizes[group] + size > s.max_bytes:
                break  # this batch is full: the rest waits for the next one
            count += 1
            if (
                isinstance(verdict, Admitted)
                and verdict.urgency.service_class == "auto"
                and not self.ctx.router.can_batch_again(s, handoff.respond_by, now)
            ):  # routed here when its deadline left room; it waited (worker down, queue or budget full)
                why = "its deadline no longer leaves room for a batch"
                taken.messages += _not_batched(gs, self.ctx.router, rec, handoff, why, now)
                continue
            if isinstance(verdict, Admitted):
                reserved = await self._reserve(handoff, verdict)
                if isinstance(reserved, Deferred):
                    later = handoff.next(not_before=min(reserved.period_end, now + DEFER_RETRY_S))
                    taken.messages.append(handoff_message(s.pending_topic, rec, later))
                    continue
                verdict = reserved
            if isinstance(verdict, Rejected):
                taken.messages += _rejected(gs, handoff, verdict)
                continue
            res = verdict.reservation
            amount = (res.amount.tokens, res.amount.nusd) if res is not None else (0, 0)
            h = handoff.next(submissions=handoff.submissions + 1, model=verdict.model)
            taken.members[group].append(_Member(rec, h, verdict, amount))
            seen[pid].add(h.custom_id)
            sizes[group] += size
        if count:
            taken.last_offset = self.buffer[count - 1].offset
            for rec in self.buffer[:count]:
                self._buffer_bytes -= len(rec.value or b"")
            del self.buffer[:count]
        return taken


def _not_batched(
    gs: GatewaySettings, router: Router, rec: ConsumerRecord, h: Handoff, why: str, now: float
) -> list[OutMessage]:
    """A pending request no batch will take: real time while its deadline allows, else a dead
    letter `batch_expired` (as for an expired result)."""
    if router.can_go_realtime(gs.batches, h.respond_by, now):
        return [handoff_message(gs.realtime_topic(), rec, h.next(back_to_realtime=f"not batched: {why}"))]
    dl = DeadLetter(
        h.partner, Reason.BATCH_EXPIRED, f"not batched: {why}, nor for real time", origin_of(h),
        h.request_id, h.submissions,
    )  # fmt: skip
    return dead_letter(gs, dl, time.time(), h.trace)


def _rejected(gs: GatewaySettings, h: Handoff, rejected: Rejected) -> list[OutMessage]:
    detail = rejected.detail
    dl = DeadLetter(h.partner, rejected.reason, detail, origin_of(h), h.request_id, h.submissions)
    return dead_letter(gs, dl, time.time(), h.trace)
