"""The cyclic garbage collector's policy for a running gateway: rare young collections, full ones
by the clock.

- `apply()` at start-up: one collection, then `gc.freeze()` (everything built so far, some
  170,000 objects of imported modules, settings and clients, is never scanned again), and
  thresholds `(20_000, 10, 10)`.
- `collect_periodically()` while serving: a full collection every `full_every_s` (10 s), spaced
  further when one takes long so that they never use more than `max_share` (1%) of the time.

Why: with the interpreter's defaults (700, 10, 10) and nothing frozen, full collections scanned
the start-up objects every few hundred messages, about a quarter of the service's CPU. The
earlier tuning, `gc.freeze()` with (20_000, 50, 100), removed that but also every full
collection after the first seconds (the third generation waited for 100 x 50 x 20,000 new
objects). The collector counts objects, not bytes: a cycle of a few objects holding a megabyte
(aiokafka's dropped fetch buffers, see `service.ingest.fetch_cycles`; an exception whose
traceback holds a request) does not bring a collection closer, so such garbage grew without
bound (issue 9: 338 MB to 2,118 MB in 100 s). The clock bounds how long any garbage lives,
whatever its size and whatever the counts; the thresholds keep young collections rare.

Measured with the pipeline bench (6,000 requests, collector CPU from `gc.callbacks`, start-up
included): defaults 1.6-1.7 s; freeze alone 0.8-0.9 s; freeze with (700, 10, 10) 0.6-0.7 s;
(5,000, 10, 10) 0.45 s; (20,000, 10, 10) with the clock 0.2-0.3 s; the old tuning 0.2-0.25 s.
A full collection of the unfrozen heap under load takes 10-50 ms.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)

SLOW_COLLECTION_S = 0.25
"""A full collection longer than this is logged as a warning (the event loop stood still)."""


@dataclass(frozen=True, slots=True)
class GcPolicy:
    young_threshold: int = 20_000
    """New container objects (net) between young collections; the interpreter's default is 700."""
    older_thresholds: tuple[int, int] = (10, 10)
    """Young collections per middle one, middle ones per full one (the interpreter's defaults)."""
    full_every_s: float = 10.0
    """A full collection at least this often: no garbage outlives it by much, whatever its size."""
    max_share: float = 0.01
    """The clock's full collections take at most this share of the time: after one that took
    t seconds, the next comes no sooner than t / max_share."""


DEFAULT = GcPolicy()


def apply(policy: GcPolicy = DEFAULT) -> None:
    """Freeze what start-up built and set the thresholds. Call once, when serving begins."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(policy.young_threshold, *policy.older_thresholds)


async def collect_periodically(stop: asyncio.Event, policy: GcPolicy = DEFAULT) -> None:
    """Run a full collection every `policy.full_every_s` (or later, see `max_share`) until `stop`."""
    delay = policy.full_every_s
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=delay)
        if stop.is_set():
            return
        started = time.perf_counter()
        found = gc.collect()
        took = time.perf_counter() - started
        delay = max(policy.full_every_s, took / policy.max_share)
        level = logging.WARNING if took > SLOW_COLLECTION_S else logging.DEBUG
        if log.isEnabledFor(level):
            log.log(
                level,
                "full garbage collection",
                extra={"unreachable": found, "seconds": round(took, 4), "next_in_s": round(delay, 1)},
            )
