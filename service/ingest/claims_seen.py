"""A claim's call starts once the claim is committed *and* seen in the group's offsets.

A transaction's commit returns once its coordinator has written PrepareCommit; the markers
follow. Kafka can skip them (`hanging.py`: a single broker's controlled shutdown), and a later
ABORT marker of the same producer id in the group's offsets partition then drops the pending
offset commit, claims and all, although the coordinator had decided to commit it. Such an
ABORT comes when a new owner initialises the producer while the transaction begun ahead is
open (`transactions.py`): seen in a chaos run, where the writer of `claude.requests.bravo`
partition 0 committed the claim of offset 590 47 ms before the broker's SIGTERM (PrepareCommit
and CompleteCommit, no marker), made the call, began its next transaction with the group,
and was killed during the broker's restart. The new owner's initialisation aborted that
transaction, its ABORT marker in `__consumer_offsets` ended the claim's commit as aborted,
and the new owner called offset 590 again: two billed calls for one request.

So a tick's claims are handed here after its commit, and their calls wait until the group's
offsets, read without `require_stable` (only commits whose marker has come), show this
writer's commit at or past theirs: usually a few milliseconds, the markers' time. A commit
not seen after `HANGING_AFTER_S` is one left hanging: the writer ends it (`mark`, a
transaction holding the group: its COMMIT marker makes the commit seen). Another owner's
commit past theirs means the partition was taken over first: their calls do not start
(`Fenced`), and that owner resolves the claims it read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from aiokafka import TopicPartition
from aiokafka.errors import KafkaError

from service.ingest.hanging import HANGING_AFTER_S
from service.ingest.sending import Item, fail
from service.ingest.takeover import FetchCommitted, read_committed

log = logging.getLogger(__name__)

FIRST_READ_S = 0.002
"""The first read after a commit: the coordinator writes the markers in milliseconds."""
MAX_READ_S = 0.05


class ClaimsSeen:
    """The claims of one partition writer waiting to be seen committed."""

    def __init__(
        self,
        tp: TopicPartition,
        owner: str,
        fetch: FetchCommitted,
        mark: Callable[[], Awaitable[object]],
        fenced: Callable[[str], BaseException],
    ) -> None:
        self._tp = tp
        self._owner = owner
        self._fetch = fetch
        self._mark = mark
        self._fenced = fenced
        self._waiting: list[tuple[int, list[Item]]] = []
        """(the commit's seq, its claims), in commit order."""
        self._since = 0.0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def add(self, seq: int, claims: list[Item]) -> None:
        """The claims of the commit numbered `seq` (done once it is seen)."""
        if not self._waiting:
            self._since = time.monotonic()
        self._waiting.append((seq, claims))
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"claims-{self._tp.topic}-{self._tp.partition}"
            )
        self._wake.set()

    def fail(self, exc: BaseException) -> None:
        """No waiting claim's call may start (the writer stops)."""
        waiting, self._waiting = self._waiting, []
        fail((item for _, items in waiting for item in items), exc)

    async def close(self, exc: BaseException) -> None:
        self.fail(exc)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        delay = FIRST_READ_S
        while True:
            if not self._waiting:
                await self._wake.wait()
            if self._wake.is_set():  # claims came (a commit): its markers come in milliseconds
                self._wake.clear()
                delay = FIRST_READ_S
            await asyncio.sleep(delay)
            delay = min(delay * 2, MAX_READ_S)
            try:
                seen = await read_committed(self._fetch, self._tp, stable=False)
            except KafkaError as exc:
                log.warning("reading the committed claims failed", extra={"error": type(exc).__name__})
                continue
            except Exception:  # never silent, never the end of the reads: the claims would wait
                log.exception("reading the committed claims failed")
                continue
            if seen.owner == self._owner:
                self._done(seen.seq)
            elif self._waiting and seen.seq >= self._waiting[0][0]:
                self.fail(self._fenced(f"{self._tp}: another owner committed before the claims were seen"))
            if self._waiting and time.monotonic() - self._since >= HANGING_AFTER_S:
                log.warning(
                    "a commit of claims stayed unseen: ending a transaction left hanging",
                    extra={"topic": self._tp.topic, "partition": self._tp.partition},
                )
                self._since = time.monotonic()
                try:
                    await self._mark()
                except KafkaError as exc:
                    log.warning("ending a hanging commit failed", extra={"error": type(exc).__name__})
                except Exception:
                    log.exception("ending a hanging commit failed")

    def _done(self, seq: int) -> None:
        resolved = False
        while self._waiting and self._waiting[0][0] <= seq:
            _, items = self._waiting.pop(0)
            resolved = True
            for item in items:
                if not item.done.done():
                    item.done.set_result(None)
        if resolved:
            self._since = time.monotonic()  # the oldest claims waiting now came later
