"""Runs the batches: each entry's outcome at its due time, expiry, cancellation, retention.

One asyncio task per server, started by the first create and idle (waiting on an event) while
no batch is in progress. `advance(now)` does the work: it visits the entries that are due,
at most `CHUNK` per call so that a batch of 100,000 never holds the event loop for long, and
says when it next has something to do. The task is the only writer of entries; handlers read
the counts as they stand, so `request_counts` is what has really been decided at every poll.

An entry's outcome, in this order:

1. Its params fail the `/v1/messages` validation: `errored` with that error
   (`invalid_request_error`, or `not_found_error` for an unknown model).
2. With `api_error_rate` / `overloaded_rate` / `expire_rate`, one draw: `errored` with
   `api_error` / `overloaded_error`, or left to expire.
3. Otherwise `succeeded`: input tokens, output draw and Message exactly as `/v1/messages`
   makes them (service/simulator/completion.py), `usage.service_tier` "batch", billed at the
   batch tier. Entries draw on no ITPM/OTPM bucket (batches have their own queue limit).

A batch ends when its last entry is decided; entries still undecided at `expires_at` end
`expired` (the batch ends then); a cancel ends the undecided ones `canceled`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from array import array
from typing import Any

import orjson

from service.simulator.batches.model import CANCELED, CANCELING, ERRORED, EXPIRED, PENDING, SUCCEEDED, Batch
from service.simulator.completion import draw_completion, message_of
from service.simulator.config import SimulatorConfig
from service.simulator.engine import SimulatorEngine
from service.simulator.errors import ApiError
from service.simulator.tokens import count_input_tokens
from service.simulator.validation import validate_messages

log = logging.getLogger(__name__)

#: Entries decided per `advance` call before the task yields to the event loop.
CHUNK = 200
#: Longest sleep between two looks at the clock (an injected clock may jump).
MAX_SLEEP_S = 0.25
#: Shortest sleep when the next entry is due soon: entries due meanwhile are done together.
MIN_SLEEP_S = 0.005
_RESULT_NAMES = {ERRORED: "errored", CANCELED: "canceled", EXPIRED: "expired"}


def compact_json(value: Any) -> bytes:
    """`value` as JSON in bytes of its own size, for keeping: the bytes orjson returns hold on
    to its whole write buffer (4 KB at least, measured with tracemalloc on orjson 3.8)."""
    return bytes(memoryview(orjson.dumps(value)))


def error_payload(error_type: str, message: str) -> bytes:
    """The `error` of an errored result: an API error body (`ErrorResponse` in the SDK)."""
    return compact_json({"type": "error", "error": {"type": error_type, "message": message}})


class BatchProcessor:
    """Decides the entries of the engine's batches over time."""

    def __init__(self, engine: SimulatorEngine) -> None:
        self.engine = engine
        self.failure: BaseException | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._purge_at = 0.0

    # -- the work ------------------------------------------------------------------

    def advance(self, now_s: float, budget: int = CHUNK) -> float | None:
        """Decide what is due at `now_s`, at most `budget` entries. Returns the seconds until
        something is next due: 0 when more is due already, None when no batch is in progress."""
        engine = self.engine
        config = engine.config
        store = engine.batches
        if now_s >= self._purge_at:  # a scan of every stored batch: once a second is enough
            store.purge(now_s, config.batches.retention_s)
            self._purge_at = now_s + 1.0
        wait: float | None = None
        for batch in store.active():
            if budget <= 0:
                return 0.0
            budget, batch_wait = self._advance_batch(batch, now_s, budget, config)
            if batch_wait is not None:
                wait = batch_wait if wait is None else min(wait, batch_wait)
        return wait

    def _advance_batch(
        self, batch: Batch, now_s: float, budget: int, config: SimulatorConfig
    ) -> tuple[int, float | None]:
        if batch.status == CANCELING:
            self._finish(batch, CANCELED, now_s)
            return budget, None
        due = batch.due(min(now_s, batch.expires_s))
        while batch.cursor < due and budget > 0:
            self._decide(batch, batch.cursor, config)
            batch.cursor += 1
            budget -= 1
        if batch.cursor < due:
            return budget, 0.0
        if batch.cursor == batch.size and batch.stalled == 0:  # every entry decided
            self._finish(batch, None, min(batch.created_s + batch.processing_s, batch.expires_s))
            return budget, None
        if now_s >= batch.expires_s:
            self._finish(batch, EXPIRED, batch.expires_s)
            return budget, None
        next_s = batch.expires_s
        if batch.cursor < batch.size:
            next_s = min(next_s, batch.due_at(batch.cursor))
        return budget, max(0.0, next_s - now_s)

    def _decide(self, batch: Batch, position: int, config: SimulatorConfig) -> None:
        """One entry's result. A failure of the simulator on it (a bug) ends that entry
        `api_error`: it ended the task, and every batch endpoint answered 500 until a restart."""
        try:
            self._decide_entry(batch, position, config)
        except Exception:
            log.exception("the simulator failed on a batch entry", extra={"batch_id": batch.id})
            if batch.kinds[position] == PENDING:
                text = "the simulator failed on this entry (see its log)"
                batch.resolve(position, ERRORED, error_payload("api_error", text))
                self.engine.stats.batches.unbilled(batch.custom_id_at(position), "errored", "api_error")

    def _decide_entry(self, batch: Batch, position: int, config: SimulatorConfig) -> None:
        engine = self.engine
        stats = engine.stats.batches
        custom_id = batch.custom_id_at(position)
        params = batch.take_params(position)
        try:
            validate_messages(params, engine.models, config.max_tokens_limit)
        except ApiError as exc:
            batch.resolve(position, ERRORED, error_payload(exc.error_type, exc.message))
            stats.unbilled(custom_id, "errored", exc.error_type)
            return
        rng = batch.rng
        assert rng is not None  # an ended batch is never decided
        settings = config.batches
        if settings.outcome_rate > 0:
            u = rng.random()
            for rate, error_type in (
                (settings.api_error_rate, "api_error"),
                (settings.overloaded_rate, "overloaded_error"),
            ):
                if u < rate:
                    text = f"{error_type} (injected by the simulator for this batch entry)"
                    batch.resolve(position, ERRORED, error_payload(error_type, text))
                    stats.unbilled(custom_id, "errored", error_type)
                    return
                u -= rate
            if u < settings.expire_rate:
                batch.stalled += 1
                return
        input_tokens = count_input_tokens(params)
        completion = draw_completion(rng, config.output, params)
        message = message_of(
            engine.next_message_id(), params, input_tokens, completion, batch=True, with_content=False
        )
        batch.resolve(position, SUCCEEDED, compact_json(message), completion.output_tokens)
        stats.succeeded(custom_id, batch.key_name, params["model"], input_tokens, completion.output_tokens)

    def _finish(self, batch: Batch, kind: int | None, at_s: float) -> None:
        """End `batch` at `at_s`; its undecided entries end `kind` (canceled or expired)."""
        stats = self.engine.stats.batches
        if batch.counts[PENDING]:
            assert kind is not None
            name = _RESULT_NAMES[kind]
            kinds = batch.kinds
            for position in range(batch.size):
                if kinds[position] == PENDING:
                    batch.resolve(position, kind)
                    stats.unbilled(batch.custom_id_at(position), name)
        batch.end(at_s)
        self.engine.batches.ended(batch)
        stats.ended += 1

    # -- the task ------------------------------------------------------------------

    def kick(self) -> None:
        """Something changed (a batch created or canceled): start the task, or wake it."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="simulator-batches")
            self._task.add_done_callback(self._done)
        self._wake.set()

    def _done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            self.failure = task.exception()
            log.error("the simulator's batch processor failed", exc_info=self.failure)

    async def _run(self) -> None:
        clock = self.engine.clock
        while True:
            self._wake.clear()
            wait = self.advance(clock())
            if wait == 0.0:
                await asyncio.sleep(0)
                continue
            timeout: float | None = MAX_SLEEP_S  # ended batches wait for their retention
            if wait is not None:
                timeout = min(MAX_SLEEP_S, max(MIN_SLEEP_S, wait))
            elif not len(self.engine.batches):
                timeout = None  # nothing stored: sleep until the next create
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()

    async def aclose(self) -> None:
        """Stop the task. Safe to call twice."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def new_batch(
    engine: SimulatorEngine, key_name: str, workspace: str | None, custom_ids: list[str], params: list[Any]
) -> Batch:
    """A batch created now: its processing time drawn, its order shuffled, from a generator
    seeded by the config's seed and the batch's ordinal (so other traffic changes nothing)."""
    config = engine.config
    settings = config.batches
    seed = config.seed
    store = engine.batches
    rng = random.Random() if seed is None else random.Random(f"{seed}:batch:{store.ordinal + 1}")
    processing_s = settings.processing_s
    if settings.processing_max_s is not None and settings.processing_max_s > processing_s:
        processing_s = rng.uniform(processing_s, settings.processing_max_s)
    order = array("I", range(len(custom_ids)))
    if settings.shuffle_results:
        rng.shuffle(order)
    now_s = engine.clock()
    return Batch(
        id=store.new_id(),
        key_name=key_name,
        workspace=workspace,
        created_s=now_s,
        created_wall_us=round(engine.wall_clock() * 1_000_000),
        processing_s=processing_s,
        expires_s=now_s + settings.expiry_s,
        custom_ids=custom_ids,
        params=params,
        order=order,
        rng=rng,
    )
