"""The organisation's batches: creation, lookup by workspace, the newest-first list, deletion.

Batch ids are `msgbatch_01` + the engine's id prefix + the creation number in 14 hex digits,
so their order is their creation order and a page cursor (`before_id` / `after_id`) stays
valid when the batch it names has been deleted. A key sees the batches of its workspace
(keys outside any workspace share the default one), as the API lists "within a Workspace".

An ended batch is deleted `retention_s` after its creation (Anthropic keeps results 29 days),
so the memory of a long run is bounded by the batches of one retention period.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator
from typing import Any

from service.simulator.batches.model import PENDING, Batch

_ID = re.compile(r"msgbatch_01(?P<prefix>[0-9a-f]+?)(?P<number>[0-9a-f]{14})")


class CursorError(ValueError):
    """A `before_id` / `after_id` that is not a batch id of this simulator."""


class BatchStore:
    """Batches by id, oldest first; `active` holds those not yet ended."""

    def __init__(self, id_prefix: str) -> None:
        self._prefix = id_prefix
        self._numbers = itertools.count(1)
        self._batches: dict[str, Batch] = {}
        self._active: dict[str, Batch] = {}
        self.ordinal = 0
        """Batches created since the last `clear()` (what each batch's generator is seeded with)."""

    def __len__(self) -> int:
        return len(self._batches)

    def new_id(self) -> str:
        """The id of the next batch."""
        return f"msgbatch_01{self._prefix}{next(self._numbers):014x}"

    def _number(self, batch_id: str) -> int:
        match = _ID.fullmatch(batch_id)
        if match is None or match["prefix"] != self._prefix:
            raise CursorError(batch_id)
        return int(match["number"], 16)

    def add(self, batch: Batch) -> None:
        """Store a new (in-progress) batch."""
        self.ordinal += 1
        self._batches[batch.id] = batch
        self._active[batch.id] = batch

    def get(self, batch_id: str, workspace: str | None) -> Batch | None:
        """The batch, if it exists and belongs to `workspace`."""
        batch = self._batches.get(batch_id)
        if batch is None or batch.workspace != workspace:
            return None
        return batch

    def active(self) -> list[Batch]:
        """Batches in progress or canceling, oldest first (a copy: the caller may end them)."""
        return list(self._active.values())

    def ended(self, batch: Batch) -> None:
        """`batch` has ended: it is no longer active."""
        self._active.pop(batch.id, None)

    def delete(self, batch_id: str) -> None:
        """Forget a batch and its results."""
        self._active.pop(batch_id, None)
        self._batches.pop(batch_id, None)

    def clear(self) -> None:
        """Forget every batch (ids keep counting; seeding starts over)."""
        self._batches.clear()
        self._active.clear()
        self.ordinal = 0

    def queued_requests(self) -> int:
        """Entries still processing, over every active batch."""
        return sum(batch.counts[PENDING] for batch in self._active.values())

    def purge(self, now_s: float, retention_s: float) -> None:
        """Delete the ended batches created more than `retention_s` ago."""
        expired = [b.id for b in self._batches.values() if b.ended and now_s - b.created_s >= retention_s]
        for batch_id in expired:
            self.delete(batch_id)

    def page(
        self, workspace: str | None, limit: int, before_id: str | None, after_id: str | None
    ) -> tuple[list[Batch], bool]:
        """One page of the workspace's batches, newest first, and whether more lie beyond it.

        `after_id`: the batches created before that one (further down the list);
        `before_id`: the `limit` batches created just after it (further up), still newest
        first, and `has_more` says whether newer ones remain. Raises `CursorError`."""
        visible = [b for b in reversed(self._batches.values()) if b.workspace == workspace]
        if before_id is not None:
            cursor = self._number(before_id)
            newer = [b for b in visible if self._number(b.id) > cursor]
            return newer[-limit:], len(newer) > limit
        if after_id is not None:
            cursor = self._number(after_id)
            visible = [b for b in visible if self._number(b.id) < cursor]
        return visible[:limit], len(visible) > limit

    def snapshot(self) -> dict[str, Any]:
        """Current figures for `/_sim/stats`."""
        return {
            "stored": len(self._batches),
            "in_progress": len(self._active),
        }

    def __iter__(self) -> Iterator[Batch]:
        return iter(list(self._batches.values()))
