"""Low-watermark offset tracking for messages processed out of order.

Messages of one partition finish in any order. The offset that may be
committed is the first one not yet finished: everything before it has an
acknowledged outcome. This is the approach of Confluent's Parallel Consumer.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


@dataclass
class PartitionOffsets:
    """Offsets of one partition: started in order, finished in any order."""

    _pending: deque[int] = field(default_factory=deque)
    _done: set[int] = field(default_factory=set)
    _next: int | None = None
    """The offset after the last one started: the commit point when nothing is pending."""
    committed: int | None = None

    def start(self, offset: int) -> None:
        if self._next is not None and offset < self._next:
            # a seek back (re-delivery after a rebalance or reset): forget what follows
            self._pending = deque(o for o in self._pending if o < offset)
            self._done = {o for o in self._done if o < offset}
        self._pending.append(offset)
        self._next = offset + 1

    def finish(self, offset: int) -> None:
        if not self._pending:
            return
        if self._pending[0] == offset:
            self._pending.popleft()
            while self._pending and self._pending[0] in self._done:
                self._done.discard(self._pending.popleft())
        else:
            self._done.add(offset)

    @property
    def in_flight(self) -> int:
        return len(self._pending) - len(self._done)

    @property
    def low_watermark(self) -> int | None:
        """The first offset not finished (everything before it is done); None before any start."""
        return self._pending[0] if self._pending else self._next

    def committable(self) -> int | None:
        """The offset to commit (the next to consume), or None if nothing new finished."""
        if self._pending:
            candidate: int | None = self._pending[0]
        else:
            candidate = self._next
        if candidate is None or candidate == self.committed:
            return None
        return candidate
