"""What a partition's writer reads when it takes the partition over: the committed state, and
whether a live previous owner still has calls to finish."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from aiokafka import TopicPartition

from service.config.settings import KafkaSettings
from service.ingest.ledger import MetadataCorrupt, Snapshot, decode

log = logging.getLogger(__name__)

FetchCommitted = Callable[[TopicPartition, bool], Awaitable[tuple[int | None, str]]]
"""The group's committed (offset, metadata) of a partition (offset None: never committed);
the flag asks for a stable answer (no transactional commit pending)."""

CommitPending = Callable[[TopicPartition], Awaitable[bool]]
"""Whether a transactional offset commit of the partition is pending (not yet marked)."""


async def read_committed(fetch: FetchCommitted, tp: TopicPartition, stable: bool = True) -> Snapshot:
    """The committed state of `tp` (`Snapshot(-1)`: never committed)."""
    offset, metadata = await fetch(tp, stable)
    if offset is None or offset < 0:
        return Snapshot(-1)  # never committed: the consumer's reset policy decides
    try:
        return decode(offset, metadata)
    except MetadataCorrupt as exc:
        log.warning(
            "commit metadata is not ours; nothing known above the commit point",
            extra={"topic": tp.topic, "partition": tp.partition, "error": str(exc)},
        )
        return Snapshot(offset)


async def await_handoff(
    fetch: FetchCommitted,
    tp: TopicPartition,
    settings: KafkaSettings,
    owner: str,
    commit_pending: CommitPending | None = None,
) -> None:
    """Before fencing, give a live previous owner time to publish its calls in flight (at
    most `eos_handoff_max_s`): while the committed state shows another replica's claims and
    that replica still commits (heartbeats), and while a commit of its is pending.

    A commit in flight at the rebalance may carry claims the read below cannot see yet (a
    transactional offset commit shows only once its marker is written); fencing then would
    let the commit land with its claims and the calls go on unpublished: unknown outcomes
    from a graceful handoff. A commit that stays pending while nothing new shows for three
    heartbeats (at least 3 s) belongs to an owner that is gone (killed with a transaction
    open): fencing aborts it.

    Its heartbeats: it is live while its last commit is at most three heartbeats old (by its
    clock), or, on a loaded host whose heartbeats come late, while we have not yet watched
    that commit stay unchanged for three heartbeats, unless it is older than a group session
    less a consumer heartbeat. An owner killed with claims loses its partitions only once its
    session expired, at least that long after its last commit (made before its last consumer
    heartbeat, or at most one consumer heartbeat after it): it is gone at once."""
    deadline = time.monotonic() + settings.eos_handoff_max_s
    stale_ms = max(3_000, int(settings.eos_heartbeat_s * 3_000))
    seen: Snapshot | None = None
    changed = time.monotonic()
    while time.monotonic() < deadline:
        # pending first: a commit not pending then is, by the read, visible or not yet sent,
        # and a revoked owner sends no claim after it rejoined (`PartitionWriter.settle`).
        # The other way round, a claim's commit could land between the two unseen.
        pending = commit_pending is not None and await commit_pending(tp)
        # advisory, before fencing: a transaction a killed owner left open would keep
        # a stable read waiting until it times out
        snap = await read_committed(fetch, tp, stable=False)
        if snap.owner == owner:
            return
        foreign = any(c.owner != owner for c in snap.claims)
        if not foreign and not pending:
            return
        now = time.monotonic()
        if snap != seen:
            seen, changed = snap, now
        age_ms, quiet_ms = time.time() * 1000 - snap.written_at_ms, (now - changed) * 1000
        late = age_ms < settings.session_timeout_ms - settings.heartbeat_interval_ms and quiet_ms <= stale_ms
        heartbeats = age_ms <= stale_ms or late
        commits = pending and quiet_ms <= stale_ms
        if not heartbeats and not commits:
            return  # its owner stopped committing: gone
        await asyncio.sleep(0.2 if foreign else 0.05)
