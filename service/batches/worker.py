"""The batch worker: forms Message Batches from the pending topic, exactly once.

It consumes `batches.pending_topic` (one partition) in the group `<group_id>.batches`,
so one replica at a time is the worker; on assignment it initialises the
transactional producer `<group_id>.batches.<partition>`, which fences the previous
worker, reads the open batches from the state topic and resumes each (`tracker.py`).

Forming and the pending partitions' owners: `pending.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition

from service.batches.pending import BatchContext, PendingOwner
from service.batches.store import ensure_topics
from service.config.kafka import client_kwargs
from service.ingest.fetch import until_stopped
from service.ingest.hanging import Mark

log = logging.getLogger(__name__)


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, worker: BatchWorker) -> None:
        self.worker = worker

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        await self.worker.revoked(list(revoked))

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        try:
            await self.worker.assigned(list(assigned))
        except Exception as exc:  # noqa: BLE001 - the run loop raises it: the worker starts again
            self.worker.failure = exc


class BatchWorker:
    def __init__(self, ctx: BatchContext) -> None:
        self.ctx = ctx
        self._consumer: AIOKafkaConsumer | None = None
        self._owners: dict[TopicPartition, PendingOwner] = {}
        self.failure: Exception | None = None
        """Taking a partition over failed (in the rebalance listener)."""
        self._stopping = False

    async def run(self, stop: asyncio.Event) -> None:
        """Work until `stop`; an unexpected error restarts the worker (with backoff) from the
        committed state, it never ends the batch path."""
        delay = 1.0
        while not stop.is_set():
            try:
                await self._run(stop)
            except Exception:
                log.exception("the batch worker failed; it starts again from its committed state")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
                delay = min(delay * 2, 60.0)

    async def _run(self, stop: asyncio.Event) -> None:
        self._stopping = False
        await ensure_topics(self.ctx.settings())
        k = self.ctx.settings().kafka
        self._consumer = AIOKafkaConsumer(
            **client_kwargs(k),
            group_id=self.ctx.group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed",
            session_timeout_ms=k.session_timeout_ms,
            heartbeat_interval_ms=k.heartbeat_interval_ms,
            max_poll_interval_ms=k.max_poll_interval_ms,
        )
        try:  # a start that fails or is cancelled is stopped too
            await self._consumer.start()
            pending = self.ctx.settings().batches.pending_topic
            for _ in range(100):  # a topic just created: the group must see its partition to assign it
                await self._consumer._client.force_metadata_update()
                if self._consumer._client.cluster.partitions_for_topic(pending):
                    break
                await asyncio.sleep(0.1)
            self._consumer.subscribe([pending], listener=_Listener(self))
            while not stop.is_set():
                fetched = await until_stopped(
                    self._consumer, stop, self._consumer.getmany(timeout_ms=200, max_records=1000), {}
                )
                if self.failure is not None:
                    failure, self.failure = self.failure, None
                    raise failure
                for tp, records in fetched.items():
                    owner = self._owners.get(tp)
                    if owner is not None:
                        owner.offer(records)
                for tp, owner in list(self._owners.items()):
                    if owner.full():
                        self._consumer.pause(tp)
                    else:
                        self._consumer.resume(tp)
                    await owner.form_if_due()  # a failure restarts the worker from its committed state
                    if tp in self._consumer.assignment() and not owner.buffer:
                        await owner.pass_markers(await self._consumer.position(tp))
                self.refresh_metrics()
        finally:
            self._stopping = True  # an assignment during consumer.stop() must start nothing
            await self.revoked(list(self._owners))
            await asyncio.shield(self._consumer.stop())  # closed even when this task is cancelled
            await self.revoked(list(self._owners))

    def markers(self) -> list[Mark]:
        """The `mark` of each pending partition's worker here (`hanging.watch`)."""
        return [owner.mark for owner in self._owners.values()]

    async def assigned(self, tps: list[TopicPartition]) -> None:
        assert self._consumer is not None
        for tp in tps:
            if self._stopping:
                return
            owner = PendingOwner(self.ctx, tp)
            try:
                committed = await owner.start(self._consumer)
            except BaseException:  # failed or cancelled: its producer is stopped, not left open
                await owner.stop()
                raise
            if self._stopping or tp not in self._consumer.assignment():  # revoked or stopping meanwhile
                await owner.stop()
                continue
            self._consumer.seek(tp, committed)
            self._owners[tp] = owner

    async def revoked(self, tps: list[TopicPartition]) -> None:
        for tp in tps:
            owner = self._owners.pop(tp, None)
            if owner is not None:
                await owner.stop()

    def refresh_metrics(self) -> None:
        m = self.ctx.metrics.batch
        forming = sum(len(o.buffer) for o in self._owners.values())
        m.requests.labels("forming").set(forming)
        trackers = [t for o in self._owners.values() for t in o.trackers.values()]
        m.requests.labels("submitted").set(sum(len(t.state.members) for t in trackers if t.state.batch_id))
        for phase in ("intent", "in_progress", "publishing"):
            m.batches.labels(phase).set(sum(t.phase == phase for t in trackers))
        now = time.time()
        m.oldest_age.set(max((now - t.state.intent_at for t in trackers), default=0.0))
        m.expected_turnaround.set(self.ctx.router.turnaround.expected(self.ctx.settings().batches))
