"""aiokafka's fetch buffers are garbage cycles when dropped unread: build them without the cycle.

What makes the cycle (aiokafka 0.14, `aiokafka/consumer/fetcher.py`): a `PartitionRecords` keeps
the generator that unpacks it, `self._records_iterator = self._unpack_records()`, and that
generator's frame holds `self`. So `PartitionRecords -> generator -> frame -> PartitionRecords`,
and the frame also holds the fetched record set (the partition's bytes of one Fetch response,
up to `max_partition_fetch_bytes`, 1 MiB by default) and the batch and record being read.
aiokafka breaks the cycle only when the iteration runs to its end (`__next__` drops the
generator on `StopIteration`). It drops buffered records unread whenever:

- the partition is paused while records of it are buffered (`FetchResult.check_assignment`):
  with `max_poll_records` below what one fetch brings, this happens at every pause of a
  partner at capacity, and the same data is fetched again on resume;
- the partition is revoked, or `seek()`ed, or its offset reset (`del Fetcher._records[tp]`);
- a reader is left before its end (`service.ingest.fetch` re-reads a partition leniently and
  stops at `max_records`).

Each drop leaves the whole fetched record set for the cyclic collector, and the collector counts
objects, not bytes: a few objects holding a megabyte do not bring a collection closer. With
`max_queue: 20` and `max_poll_records: 20` this grew the gateway by gigabytes (issue 9).

The fix: `install()` makes `PartitionRecords.__init__` build its generator over a weak proxy of
the instance, so the generator no longer keeps its owner alive. The generator is only ever
advanced through its owner (`PartitionRecords.__next__`), so the proxy is alive whenever it is
used; when the owner goes, reference counting frees the generator and the record set at once.
Subclasses (`service.ingest.rawrecords.LenientPartition`) get the same.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any, Final

from aiokafka.consumer import fetcher

log = logging.getLogger(__name__)

_MARK: Final = "_gateway_acyclic"


def install() -> bool:
    """Patch aiokafka's `PartitionRecords` (once; later calls do nothing). False, with an error
    logged, when this aiokafka no longer has the shape the patch expects."""
    cls: Any = fetcher.PartitionRecords
    if getattr(cls.__init__, _MARK, False):
        return True
    if not callable(getattr(cls, "_unpack_records", None)):
        log.error("aiokafka's PartitionRecords has changed: dropped fetch buffers may wait for a full GC")
        return False
    original = cls.__init__

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        # the generator made by the original holds `self`; it has not started: replace it
        self._records_iterator = type(self)._unpack_records(weakref.proxy(self))

    setattr(__init__, _MARK, True)
    __init__.__wrapped__ = original  # type: ignore[attr-defined]
    cls.__init__ = __init__
    return True


def installed() -> bool:
    return bool(getattr(fetcher.PartitionRecords.__init__, _MARK, False))
