"""One batch from its intent to its last result: create, record, poll, publish, forget.

Each step is durable before the next starts:

1. the intent (members, reservations) is in the state topic (`pending.py`);
2. `batches.create`, then one transaction records the batch id. Creates are made one
   at a time, in the order the intents were recorded (`PendingOwner.creating_lock`),
   so a crash leaves at most one create whose id was not recorded: the first intent
   without an id, in that order. The next worker resumes the intents in the same
   order; for that first one it waits until any create the dead worker had in flight
   must have ended (`create_timeout_s + create_grace_s` after the intent), then lists
   the key's recent batches: one created after the intent (less a clock skew
   allowance), unknown to the state (open or done: the state topic keeps every batch id
   it recorded for 30 days) and with as many requests as members is the one. If there
   is none, the create never happened and is made now. (The key must not be used to create batches by anyone
   else, or a foreign batch of the same size could be taken for it: docs/batches.md.)
3. poll with backoff until `ended`;
4. the results are read in the file's order (stable for a batch) and published in
   transactions of `results_chunk`, each also recording how many are published: a
   crash re-reads the file and skips that many. A member the results never mention
   is treated as expired;
5. a `done` document ends the batch (its id stays known; its members are forgotten).

Budgets are settled (billed results) or released (the rest) after the transaction
that published the result.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any

import anthropic
from aiokafka import TopicPartition

from service.admission.budget import Reservation, periods
from service.admission.pricing import Amount
from service.batches.records import BatchState, read_handoff
from service.batches.results import Decision, decide, result_dict, with_record
from service.batches.store import read_pending
from service.contracts.params import body_params
from service.ingest import failpoints
from service.upstream.errors import may_have_been_sent

if TYPE_CHECKING:
    from service.batches.pending import BatchContext, PendingOwner

log = logging.getLogger(__name__)

LIST_SKEW_S = 30.0
"""A batch created this long before its intent is not a candidate (clock skew allowance)."""


class Tracker:
    def __init__(
        self,
        ctx: BatchContext,
        owner: PendingOwner,
        tp: TopicPartition,
        state: BatchState,
        *,
        recovered: bool,
        members: dict[str, Any] | None = None,
    ) -> None:
        self.ctx = ctx
        self.owner = owner
        self.tp = tp
        self.state = state
        self.recovered = recovered
        self._params = members or {}
        self.phase = "intent" if state.batch_id is None else "in_progress"
        self._task: asyncio.Task[None] | None = None
        self._observed = False

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"batch-{self.state.key}")

    async def cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    @property
    def _log(self) -> dict[str, Any]:
        return {"partner": self.state.partner, "batch_key": self.state.key, "batch_id": self.state.batch_id}

    async def _run(self) -> None:
        delay = 1.0
        while True:
            try:
                if self.state.batch_id is None:
                    # the lock first, before any I/O: the waiters queue in the order the
                    # trackers were started, which is the order the intents were recorded
                    async with self.owner.creating_lock():
                        await self._create()
                    if self.state.batch_id is None:  # refused as a whole: every member answered
                        self.owner.done(self.state.key)
                        return
                if not self.state.handoffs:
                    await self._load_members()
                await self._poll()
                await self._publish()
                self.owner.done(self.state.key)
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("batch step failed; trying again", extra=self._log)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 60.0)

    async def _load_members(self) -> None:
        """After a crash: the members' handoffs (and params, to create) from the pending topic."""
        gs = self.ctx.settings()
        records = await read_pending(gs.kafka, self.tp, self.state.members)
        for offset in self.state.members:
            rec = records.get(offset)
            if rec is None:
                log.critical(
                    "a batch member is gone from the pending topic", extra={**self._log, "offset": offset}
                )
                continue
            handoff, original = read_handoff(rec)
            verdict = await self.ctx.admission.admit_checked(original, verified=True)
            model = getattr(verdict, "model", "")
            h = handoff.next(submissions=handoff.submissions + 1, model=model)
            self.state.handoffs[h.custom_id] = (offset, h)
            if self.state.batch_id is None and hasattr(verdict, "params"):
                self._params[h.custom_id] = verdict.params

    # -- 2. create and record ----------------------------------------------------------------

    def _batches(self) -> Any:
        return self.ctx.claude.batches(self.state.partner)

    @property
    def _workspace(self) -> dict[str, str]:
        """The batch's workspace (the `anthropic-workspace-id` header of every call after the
        create, which alone takes the user profile as well)."""
        return {k: v for k, v in self.state.headers.items() if k == "workspace_id"}

    async def _create(self) -> None:
        """Under the owner's creating lock: find (after a crash) or create the batch, record its id."""
        s = self.ctx.settings().batches
        if not self.state.handoffs or not self._params:
            await self._load_members()
        batch_id = await self._find_created() if self.recovered else None
        if batch_id is None:
            batch_id = await self._create_call(s.create_timeout_s)
        if batch_id is None:
            return  # refused: every member was given its outcome
        failpoints.hit("batch.created")
        self.state.batch_id = batch_id
        self.state.phase = "submitted"
        self.state.submitted_at = time.time()
        await self.owner.transact([self.state.message(s.state_topic)])
        self.phase = "in_progress"
        log.info("batch submitted", extra={**self._log, "requests": len(self.state.members)})

    async def _create_call(self, timeout_s: float) -> str | None:
        requests = [{"custom_id": cid, "params": body_params(p)} for cid, p in self._params.items()]
        delay = 1.0
        while True:
            try:
                batch = await self._batches().create(
                    requests=requests, timeout=timeout_s, **self.state.headers
                )
                return str(batch.id)
            except anthropic.APIStatusError as exc:
                self.ctx.metrics.batch.api_errors.labels("create").inc()
                if exc.status_code == 429 or exc.status_code >= 500:
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 60.0)
                    continue
                detail = f"the batch was refused: HTTP {exc.status_code} {exc.type or ''}".strip()
                await self._refused(detail)
                return None
            except anthropic.APIConnectionError as exc:  # includes timeouts
                self.ctx.metrics.batch.api_errors.labels("create").inc()
                if may_have_been_sent(exc):
                    found = await self._find_created()
                    if found is not None:
                        return found
                await asyncio.sleep(delay)
                delay = min(delay * 2, 60.0)

    async def _find_created(self) -> str | None:
        """An intent without a batch id: was the batch created? (see the module's docstring)."""
        s = self.ctx.settings().batches
        wait = self.state.intent_at + s.create_timeout_s + s.create_grace_s - time.time()
        if wait > 0:
            await asyncio.sleep(wait)
        known = self.owner.known_ids | {
            t.state.batch_id for t in self.owner.trackers.values() if t.state.batch_id
        }
        found: list[tuple[float, str]] = []
        async for b in self._batches().list(limit=100, **self._workspace):
            created = b.created_at.timestamp()
            if created < self.state.intent_at - LIST_SKEW_S:
                break
            counts = b.request_counts
            total = counts.processing + counts.succeeded + counts.errored + counts.canceled + counts.expired
            if (
                b.id not in known
                and total == len(self.state.members)
                and created >= self.state.intent_at - LIST_SKEW_S
            ):
                found.append((created, str(b.id)))
        outcome = "found" if found else "created_anew"
        self.ctx.metrics.batch.recovered.labels(outcome).inc()
        log.warning("batch intent without an id recovered", extra={**self._log, "outcome": outcome})
        return min(found)[1] if found else None

    async def _refused(self, detail: str) -> None:
        """The create was refused as a whole: each member goes to real time (or a dead letter)."""
        result = {"type": "canceled"}
        gs, label = self.ctx.settings(), f"(not created: {detail})"
        decisions = [
            (cid, decide(gs, self.ctx.router, h, result, label))
            for cid, (_, h) in self.state.handoffs.items()
        ]
        await self._commit(decisions, published=0, final=True)

    # -- 3. poll ---------------------------------------------------------------------------

    async def _poll(self) -> None:
        s = self.ctx.settings().batches
        delay = s.poll_min_s
        while True:
            try:
                b = await self._batches().retrieve(self.state.batch_id, **self._workspace)
            except anthropic.NotFoundError:
                log.error("batch not found upstream: its members are treated as expired", extra=self._log)
                return
            except anthropic.APIError:
                self.ctx.metrics.batch.api_errors.labels("retrieve").inc()
            else:
                if b.processing_status == "ended":
                    if b.ended_at is not None and not self._observed:
                        self._observed = True  # `_run` polls again after a failed publish
                        took = (b.ended_at - b.created_at).total_seconds()
                        self.ctx.router.turnaround.observe(took)
                        self.ctx.metrics.batch.turnaround.observe(took)
                    return
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, s.poll_max_s)

    # -- 4. publish ------------------------------------------------------------------------

    async def _publish(self) -> None:
        gs = self.ctx.settings()
        self.phase = "publishing"
        if not self.state.chunk:  # recorded by an older version: from now on, this one
            self.state.chunk = gs.batches.results_chunk
        assert self.state.batch_id is not None
        batch_id = self.state.batch_id
        index = 0
        chunk: list[tuple[str, Decision]] = []
        answered: set[str] = set()
        try:
            results = await self._batches().results(batch_id, **self._workspace)
        except anthropic.NotFoundError:
            results = None
        except anthropic.APIError:
            self.ctx.metrics.batch.api_errors.labels("results").inc()
            raise
        if results is not None:
            async for entry in results:
                cid, result = result_dict(entry)
                index += 1
                member = self.state.handoffs.get(cid)
                if member is None or cid in answered:
                    log.error(
                        "a batch result for no member; ignored", extra={**self._log, "custom_id": cid[:64]}
                    )
                    continue
                answered.add(cid)
                if index <= self.state.published:
                    continue  # published before a crash
                chunk.append((cid, decide(gs, self.ctx.router, member[1], result, batch_id)))
                if len(chunk) >= self.state.chunk:
                    await self._commit(chunk, published=index)
                    chunk = []
        missing = [cid for cid in self.state.handoffs if cid not in answered]
        for cid in missing:
            chunk.append(
                (cid, decide(gs, self.ctx.router, self.state.handoffs[cid][1], {"type": "expired"}, batch_id))
            )
        await self._commit(chunk, published=index, final=True)
        log.info("batch published", extra={**self._log, "results": index, "missing": len(missing)})

    async def _commit(
        self, chunk: list[tuple[str, Decision]], *, published: int, final: bool = False
    ) -> None:
        gs = self.ctx.settings()
        needing = [self.state.handoffs[cid][0] for cid, d in chunk if d.needs_record]
        records = await read_pending(gs.kafka, self.tp, needing) if needing else {}
        messages = []
        for cid, d in chunk:
            if d.needs_record:
                rec = records.get(self.state.handoffs[cid][0])
                if rec is None:
                    log.critical(
                        "a batch member is gone from the pending topic", extra={**self._log, "custom_id": cid}
                    )
                    continue
                d = with_record(gs, d, rec)
            messages += d.messages
        before, self.state.published = self.state.published, published
        # before the transaction, once per chunk: a crash between the two redoes the chunk
        # (published again, from `state.published`) and finds its settle made; the other way
        # round it would leave the chunk's budget at the batch-price estimate for good
        await self._settle(chunk, f"batch:{self.state.key}:{published}:{'final' if final else 'part'}")
        failpoints.hit("batch.settled")
        try:
            if final:
                await self.owner.transact([*messages, self.state.done(gs.batches.state_topic, time.time())])
            else:
                await self.owner.transact([*messages, self.state.message(gs.batches.state_topic)])
        except BaseException:  # not published: a retry in this process publishes the chunk again
            self.state.published = before
            raise
        if final and self.state.batch_id is not None:
            self.owner.known_ids.add(self.state.batch_id)
        failpoints.hit("batch.published")
        self._count(chunk)

    async def _settle(self, chunk: list[tuple[str, Decision]], once: str) -> None:
        """The chunk's members' reservations replaced by what they cost (0 when not billed: a
        new batch or the real-time call reserves again), as one change of the partner's budget."""
        budgets = self.ctx.admission.budgets
        partner = self.ctx.admission.registry.by_id.get(self.state.partner)
        if budgets is None or partner is None or not chunk:
            return
        delta = Amount(0, 0)
        for cid, d in chunk:
            offset, _ = self.state.handoffs[cid]
            delta = delta - Amount(*self.state.reserved_of(offset))
            if d.cost is not None:
                delta = delta + d.cost.amount
        ps = periods(partner.settings.budget, self.state.intent_at)
        model = self.state.handoffs[chunk[0][0]][1].model
        res = Reservation(self.state.partner, model, ps, Amount(0, 0), self.state.shared)
        await budgets.settle_once(res, delta, once)

    def _count(self, chunk: list[tuple[str, Decision]]) -> None:
        m = self.ctx.metrics.batch
        for cid, d in chunk:
            _, h = self.state.handoffs[cid]
            m.results.labels(h.partner, d.kind, d.action).inc()
            if d.action in ("response", "deadletter"):
                self.ctx.metrics.requests.labels(h.partner, h.model, d.action).inc()
            if d.cost is not None:
                self.ctx.metrics.billed(h.partner, h.model, d.cost)
