"""One Message Batch: its entries, their outcomes in a stable order, its counts and its times.

Entries are kept in flat per-entry arrays, not one object each, so that a batch of 100,000
costs a few megabytes besides its params (which are dropped as each entry is processed) and
its stored results. Positions are the order of processing and of the results file: a seeded
shuffle of the requests (or their order), fixed at creation, so the results of a batch come
in the same order at every fetch and a consumer may resume by index.

Times are the engine's clock (monotonic seconds); the API's timestamps are the wall-clock
time of creation (whole microseconds) plus the clock time since, so that `expires_at -
created_at` is exactly the configured expiry. The schedule is linear: with `n` entries and a processing
time `d`, the entry at position `p` is due `d * (p + 1) / n` after creation.
"""

from __future__ import annotations

import random
from array import array
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

PENDING, SUCCEEDED, ERRORED, CANCELED, EXPIRED = range(5)
#: `request_counts` names, indexed by the kinds above (a pending entry is "processing").
COUNT_NAMES = ("processing", "succeeded", "errored", "canceled", "expired")

IN_PROGRESS, CANCELING, ENDED = "in_progress", "canceling", "ended"

# Float slack so that an entry is due at exactly its scheduled time.
_EPSILON = 1e-9


def rfc3339(wall_us: int) -> str:
    """A wall-clock time in microseconds as the API writes it: `2024-08-20T18:37:24.100435Z`."""
    seconds, micros = divmod(wall_us, 1_000_000)
    return datetime.fromtimestamp(seconds, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{micros:06d}Z"


@dataclass(eq=False, slots=True)
class Batch:
    """A batch's state. Only the processor changes entries; handlers read."""

    id: str
    key_name: str
    workspace: str | None
    created_s: float
    created_wall_us: int
    processing_s: float
    expires_s: float
    custom_ids: list[str]
    params: list[Any]
    order: array[int]
    rng: random.Random | None
    kinds: bytearray = field(init=False)
    payloads: list[bytes | None] = field(init=False)
    output_tokens: array[int] = field(init=False)
    counts: list[int] = field(init=False)
    status: str = IN_PROGRESS
    cursor: int = 0
    """Positions visited so far, in order."""
    stalled: int = 0
    """Visited positions left to expire (`expire_rate`)."""
    cancel_initiated_s: float | None = None
    ended_s: float | None = None

    def __post_init__(self) -> None:
        n = len(self.custom_ids)
        self.kinds = bytearray(n)
        self.payloads = [None] * n
        self.output_tokens = array("I", bytes(4 * n))
        self.counts = [n, 0, 0, 0, 0]

    @property
    def size(self) -> int:
        """Number of entries."""
        return len(self.custom_ids)

    @property
    def ended(self) -> bool:
        """True once processing has ended (results are available)."""
        return self.status == ENDED

    def due(self, now_s: float) -> int:
        """How many positions are due at `now_s` (the schedule only, not the expiry)."""
        n = len(self.custom_ids)
        elapsed = now_s - self.created_s
        if elapsed < 0:
            return 0
        if self.processing_s <= 0:
            return n
        return min(n, int(n * elapsed / self.processing_s + _EPSILON))

    def due_at(self, position: int) -> float:
        """When the entry at `position` is due (clock seconds)."""
        return self.created_s + self.processing_s * (position + 1) / len(self.custom_ids)

    def resolve(self, position: int, kind: int, payload: bytes | None = None, output_tokens: int = 0) -> None:
        """Give the entry at `position` its outcome (it must be pending)."""
        self.kinds[position] = kind
        self.payloads[position] = payload
        if output_tokens:
            self.output_tokens[position] = output_tokens
        self.counts[PENDING] -= 1
        self.counts[kind] += 1

    def custom_id_at(self, position: int) -> str:
        """The custom_id of the entry at `position`."""
        return self.custom_ids[self.order[position]]

    def take_params(self, position: int) -> Any:
        """The params of the entry at `position`, released from the batch."""
        index = self.order[position]
        params, self.params[index] = self.params[index], None
        return params

    def end(self, at_s: float) -> None:
        """Mark the batch ended at `at_s` and release what processing needed."""
        self.status = ENDED
        self.ended_s = at_s
        self.params = []
        self.rng = None

    def wall_us(self, clock_s: float) -> int:
        """A clock time of this batch as a wall-clock time in microseconds."""
        return self.created_wall_us + round((clock_s - self.created_s) * 1_000_000)

    def as_json(self, origin: str) -> dict[str, Any]:
        """The `MessageBatch` object; `origin` (`http://host:port`) prefixes `results_url`."""
        ended = self.ended_s
        cancel = self.cancel_initiated_s
        return {
            "id": self.id,
            "type": "message_batch",
            "processing_status": self.status,
            "request_counts": dict(zip(COUNT_NAMES, self.counts, strict=True)),
            "created_at": rfc3339(self.wall_us(self.created_s)),
            "expires_at": rfc3339(self.wall_us(self.expires_s)),
            "ended_at": None if ended is None else rfc3339(self.wall_us(ended)),
            "cancel_initiated_at": None if cancel is None else rfc3339(self.wall_us(cancel)),
            "archived_at": None,
            "results_url": f"{origin}/v1/messages/batches/{self.id}/results" if self.ended else None,
        }
