"""What one tick's transaction carries: its items, and the offset commit's snapshot and metadata
for exactly those items (service/ingest/partition.py).

- Claims beyond `kafka.eos_max_claims`, or that would not fit the metadata, wait for a later
  tick (`left`).
- Outcomes that come while the transaction waits for its partitions to be added join it
  (`join`): nothing has been sent yet, and their finish goes in the same metadata. Claims do
  not join: their limit is counted when the tick is filled.
- A tick sent while the one before it commits (`turns.py`) is built on it (`base`): its
  metadata describes the state once both committed, and its seq follows the base's.
- A writer whose partition was revoked holds its queued claims back (`hold_claims`): a claim
  committed after the revocation could land after the next owner looked for a live owner's
  claims, and that owner would take its call, made meanwhile, for one whose outcome is lost.
"""

from __future__ import annotations

import time
from dataclasses import replace

from aiokafka import TopicPartition

from service.ingest.ledger import MetadataTooLarge, PartitionLedger, Snapshot, encode
from service.ingest.sending import Item


class TickContents:
    def __init__(
        self,
        ledger: PartitionLedger,
        owner: str,
        max_claims: int,
        items: list[Item],
        base: TickContents | None = None,
        hold_claims: bool = False,
    ) -> None:
        self._ledger = ledger
        self._owner = owner
        self._base = base
        """The tick committing while this one is sent (applied to the ledger once it has)."""
        self.items: list[Item] = []
        self.left: list[Item] = []
        """Claims that wait for a later tick, in their order."""
        claims = len(ledger.claims) + (0 if base is None else sum(i.claim is not None for i in base.items))
        for item in items:
            if item.claim is not None and (hold_claims or claims >= max_claims):
                self.left.append(item)
                continue
            claims += item.claim is not None
            self.items.append(item)
        while True:
            try:
                self.snap, self.metadata = self._snapshot(self.items)
                return
            except MetadataTooLarge:
                if not any(i.claim is not None for i in self.items):
                    raise
                last = max(i for i, it in enumerate(self.items) if it.claim is not None)
                self.left.append(self.items.pop(last))

    def _snapshot(self, items: list[Item]) -> tuple[Snapshot, str]:
        base = self._base
        if base is not None and self._ledger.seq >= base.snap.seq:
            base = None  # committed and applied meanwhile
        if base is not None:
            items = base.items + items
        finished = [i.offset for i in items if i.finish]
        new_claims = [i.claim for i in items if i.claim is not None]
        released = [i.offset for i in items if i.release]
        snap = self._ledger.snapshot(self._owner, int(time.time() * 1000), finished, new_claims, released)
        if base is not None:
            snap = replace(snap, seq=base.snap.seq + 1)
        return snap, encode(snap)

    def join(self, queue: list[Item]) -> list[Item]:
        """Take the outcomes waiting in `queue` (removed from it) into this tick, if the metadata
        still fits; returns them."""
        late = [i for i in queue if i.claim is None]
        if not late:
            return []
        try:
            self.snap, self.metadata = self._snapshot(self.items + late)
        except MetadataTooLarge:
            return []
        queue[:] = [i for i in queue if i.claim is not None]
        self.items.extend(late)
        return late

    def offsets(self, tp: TopicPartition) -> dict[TopicPartition, tuple[int, str]]:
        """The offset commit of `tp` (the writer's partition)."""
        return {tp: (self.snap.commit, self.metadata)}
