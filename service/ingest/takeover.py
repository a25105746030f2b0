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
    fetch: FetchCommitted, tp: TopicPartition, settings: KafkaSettings, owner: str
) -> None:
    """While the committed state shows another replica's calls in flight and that replica
    still commits (heartbeats), give it time to publish them (at most `eos_handoff_max_s`)."""
    deadline = time.monotonic() + settings.eos_handoff_max_s
    stale_ms = max(3_000, int(settings.eos_heartbeat_s * 3_000))
    while time.monotonic() < deadline:
        # advisory, before fencing: a transaction a killed owner left open would keep
        # a stable read waiting until it times out
        snap = await read_committed(fetch, tp, stable=False)
        foreign = [c for c in snap.claims if c.owner != owner]
        if not foreign or snap.owner == owner:
            return
        if time.time() * 1000 - snap.written_at_ms > stale_ms:
            return  # its owner stopped committing: gone
        await asyncio.sleep(0.2)
