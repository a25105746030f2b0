"""The consume loop: fetch, dispatch concurrently, pause on backpressure, commit safely.

- Records of one partition are processed concurrently; each partition's commit
  point is the low watermark of finished records (`PartitionOffsets`).
- A partner with `max_queue` records outstanding has its partitions paused;
  they resume at half that. The loop keeps polling, so the consumer stays in
  its group, and memory stays bounded whatever the backlog.
- On revocation, in-flight work of the lost partitions gets a short grace to
  finish, then what finished is committed; nothing unfinished is committed.
- On stop: fetching stops, in-flight work drains within the grace period,
  finished work is committed, the rest is left for redelivery.
- Readiness needs the broker to answer: a probe asks it for metadata every
  `broker_probe_interval_s`; a fetch with records or a commit counts too
  (`broker_silent_s`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections import defaultdict
from collections.abc import Callable, Iterable

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, ConsumerRecord, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError

from service.admission.registry import Registry
from service.config.kafka import client_kwargs
from service.config.settings import GatewaySettings
from service.ingest.offsets import PartitionOffsets
from service.pipeline import Pipeline
from service.scheduling.scheduler import Draining
from service.telemetry.metrics import Metrics

log = logging.getLogger(__name__)

DEFAULT_MAX_QUEUE = 1_000
BROKER_PROBE_INTERVAL_S = 5.0
BROKER_PROBE_TIMEOUT_S = 10.0


class FatalPipelineError(RuntimeError):
    """A record could get no outcome at all (not even a dead letter): the service must stop."""


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, loop: IngestLoop) -> None:
        self._loop = loop

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        await self._loop.on_revoked(list(revoked))

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        self._loop.on_assigned(list(assigned))


class IngestLoop:
    def __init__(
        self,
        settings: GatewaySettings,
        pipeline: Pipeline,
        metrics: Metrics,
        registry: Callable[[], Registry],
        consumer: AIOKafkaConsumer | None = None,
    ) -> None:
        self.settings = settings
        self.pipeline = pipeline
        self.metrics = metrics
        self._registry = registry
        self._consumer = consumer
        self._offsets: dict[TopicPartition, PartitionOffsets] = {}
        self._tasks: dict[TopicPartition, set[asyncio.Task[None]]] = defaultdict(set)
        self._outstanding: dict[str, int] = defaultdict(int)
        self._paused_partners: set[str] = set()
        self._fatal: BaseException | None = None
        self._next_commit = 0.0
        self.assigned = False
        self.draining = False
        self._started = False
        self.broker_seen_at: float | None = None
        """`time.monotonic()` of the broker's last answer (metadata probe, fetch with records, commit)."""
        self.broker_probe_interval_s = BROKER_PROBE_INTERVAL_S

    # -- lifecycle -----------------------------------------------------------------

    async def start(self) -> None:
        if self._started:
            raise RuntimeError("IngestLoop.start() called twice")
        self._started = True
        k = self.settings.kafka
        if self._consumer is None:
            self._consumer = AIOKafkaConsumer(
                **client_kwargs(k),
                group_id=k.group_id,
                enable_auto_commit=False,
                auto_offset_reset="earliest",
                max_poll_records=k.max_poll_records,
                session_timeout_ms=k.session_timeout_ms,
                heartbeat_interval_ms=k.heartbeat_interval_ms,
                max_poll_interval_ms=k.max_poll_interval_ms,
                isolation_level="read_committed",
            )
        await self._consumer.start()
        pattern = "^" + re.escape(k.request_topic_prefix) + ".+"
        self._consumer.subscribe(pattern=pattern, listener=_Listener(self))

    @property
    def consumer(self) -> AIOKafkaConsumer:
        assert self._consumer is not None, "IngestLoop.start() was not awaited"
        return self._consumer

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until `stop` is set, then drain, commit and return."""
        consumer = self.consumer
        probe = asyncio.get_running_loop().create_task(self._probe_broker(), name="broker-probe")
        try:
            while not stop.is_set():
                if self._fatal is not None:
                    raise FatalPipelineError("a record could not be given any outcome") from self._fatal
                batches = await consumer.getmany(timeout_ms=100)
                if batches:
                    self.broker_seen_at = time.monotonic()
                for tp, records in batches.items():
                    self._dispatch(tp, records)
                self._apply_backpressure()
                now = time.monotonic()
                if now >= self._next_commit:
                    self._next_commit = now + self.settings.runtime.commit_interval_s
                    await self.commit()
                    self._observe_lag()
        finally:
            probe.cancel()
            await self._drain()

    def outstanding(self) -> dict[str, int]:
        """Records fetched and not finished, per partner (what backpressure counts)."""
        return dict(self._outstanding)

    def broker_silent_s(self) -> float | None:
        """Seconds since the broker last answered; None before it ever did."""
        seen = self.broker_seen_at
        return None if seen is None else time.monotonic() - seen

    async def _probe_broker(self) -> None:
        while (consumer := self._consumer) is not None:
            try:
                await asyncio.wait_for(consumer.topics(), timeout=BROKER_PROBE_TIMEOUT_S)
            except (KafkaError, TimeoutError) as exc:
                log.debug("broker probe failed", extra={"error": type(exc).__name__})
            else:
                self.broker_seen_at = time.monotonic()
            await asyncio.sleep(self.broker_probe_interval_s)

    async def stop(self) -> None:
        if self._consumer is not None and self._started:
            consumer, self._consumer = self._consumer, None
            await consumer.stop()

    # -- dispatch and backpressure ---------------------------------------------------

    def _dispatch(self, tp: TopicPartition, records: list[ConsumerRecord]) -> None:
        offsets = self._offsets.get(tp)
        if offsets is None:  # assigned callback not seen yet (should not happen)
            offsets = self._offsets[tp] = PartitionOffsets()
        pid = self._registry().partner_id_for_topic(tp.topic)
        tasks = self._tasks[tp]
        for rec in records:
            offsets.start(rec.offset)
            self._outstanding[pid] += 1
            task = asyncio.create_task(self._process(tp, offsets, pid, rec))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    async def _process(
        self, tp: TopicPartition, offsets: PartitionOffsets, pid: str, rec: ConsumerRecord
    ) -> None:
        try:
            await self.pipeline.handle(rec)
        except asyncio.CancelledError:
            raise
        except Draining:
            pass  # not started before the stop: left uncommitted for redelivery
        except BaseException as exc:  # recorded here, re-raised by the loop
            log.critical(
                "record got no outcome; stopping without committing it",
                extra={"partner": pid, "topic": tp.topic, "partition": tp.partition, "offset": rec.offset},
                exc_info=exc,
            )
            self._fatal = exc
        else:
            offsets.finish(rec.offset)
        finally:
            self._outstanding[pid] -= 1
            if pid in self._paused_partners and self._outstanding[pid] <= self._max_queue(pid) // 2:
                self._resume(pid)

    def _max_queue(self, pid: str) -> int:
        partner = self._registry().by_id.get(pid)
        return partner.settings.max_queue if partner is not None else DEFAULT_MAX_QUEUE

    def _partner_partitions(self, pid: str) -> list[TopicPartition]:
        if self._consumer is None:
            return []
        registry = self._registry()
        return [tp for tp in self._consumer.assignment() if registry.partner_id_for_topic(tp.topic) == pid]

    def _apply_backpressure(self) -> None:
        for pid, n in self._outstanding.items():
            if pid not in self._paused_partners and n >= self._max_queue(pid):
                tps = self._partner_partitions(pid)
                self.consumer.pause(*tps)
                self._paused_partners.add(pid)
                self.metrics.paused_partitions.labels(pid).set(len(tps))
                log.info("partner at capacity: partitions paused", extra={"partner": pid, "outstanding": n})

    def _resume(self, pid: str) -> None:
        self._paused_partners.discard(pid)
        if self._consumer is None or self.draining:
            return
        tps = [tp for tp in self._partner_partitions(pid) if tp in self._consumer.paused()]
        if tps:
            self._consumer.resume(*tps)
        self.metrics.paused_partitions.labels(pid).set(0)

    # -- commits and rebalances ----------------------------------------------------

    async def commit(self, only: Iterable[TopicPartition] | None = None) -> None:
        """Commit the low watermark of every (or the given) assigned partition."""
        if self._consumer is None:
            return
        tps = list(only) if only is not None else list(self._offsets)
        to_commit: dict[TopicPartition, int] = {}
        for tp in tps:
            offsets = self._offsets.get(tp)
            if offsets is not None:
                point = offsets.committable()
                if point is not None:
                    to_commit[tp] = point
        if not to_commit:
            return
        try:
            await self._consumer.commit(to_commit)
        except (CommitFailedError, IllegalStateError) as exc:
            # the group moved on (rebalance): the new owner redoes what we could not commit
            log.warning("commit refused by the group", extra={"error": type(exc).__name__})
            return
        except KafkaError as exc:
            log.warning("commit failed, will retry", extra={"error": type(exc).__name__})
            return
        self.broker_seen_at = time.monotonic()
        for tp, point in to_commit.items():
            offsets = self._offsets.get(tp)
            if offsets is not None:
                offsets.committed = point

    async def on_revoked(self, revoked: list[TopicPartition]) -> None:
        pending = [t for tp in revoked for t in self._tasks.get(tp, ())]
        if pending:
            grace = min(10.0, self.settings.runtime.drain_timeout_s)
            await asyncio.wait(pending, timeout=grace)
        await self.commit(revoked)
        for tp in revoked:
            self._offsets.pop(tp, None)
            self._tasks.pop(tp, None)
            pid = self._registry().partner_id_for_topic(tp.topic)
            with contextlib.suppress(KeyError):  # no longer ours: its lag is another replica's to report
                self.metrics.consumer_lag.remove(tp.topic, str(tp.partition), pid)
        self.assigned = bool(self._offsets)

    def on_assigned(self, assigned: list[TopicPartition]) -> None:
        for tp in assigned:
            self._offsets[tp] = PartitionOffsets()
        self.assigned = True
        self.broker_seen_at = time.monotonic()  # joining the group took the broker's answers
        self._next_commit = 0.0
        # a new assignment starts unpaused; the next loop turn re-pauses partners at capacity
        for pid in self._paused_partners:
            self.metrics.paused_partitions.labels(pid).set(0)
        self._paused_partners.clear()
        log.info("partitions assigned", extra={"count": len(assigned)})

    def _observe_lag(self) -> None:
        consumer = self._consumer
        if consumer is None:
            return
        registry = self._registry()
        for tp, offsets in self._offsets.items():
            high = consumer.highwater(tp)
            # before our first commit, the first offset not finished stands for the group's position
            point = offsets.committed if offsets.committed is not None else offsets.low_watermark
            if high is not None and point is not None:
                pid = registry.partner_id_for_topic(tp.topic)
                self.metrics.consumer_lag.labels(tp.topic, str(tp.partition), pid).set(max(0, high - point))

    async def _drain(self) -> None:
        self.draining = True
        self.pipeline.scheduler.close()
        consumer = self._consumer
        if consumer is not None:
            with contextlib.suppress(IllegalStateError):
                consumer.pause(*consumer.assignment())
        pending = [t for ts in self._tasks.values() for t in ts]
        if pending:
            log.info("draining in-flight requests", extra={"count": len(pending)})
            _, still = await asyncio.wait(pending, timeout=self.settings.runtime.drain_timeout_s)
            for t in still:
                t.cancel()
            if still:
                log.warning(
                    "drain timed out; unfinished requests will be redelivered", extra={"count": len(still)}
                )
                await asyncio.wait(still, timeout=5)
        await self.commit()
