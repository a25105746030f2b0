"""Read a partition's committed offset and metadata *stably* (OffsetFetch v7, KIP-447).

A transactional offset commit becomes visible only once its transaction's
marker reaches the group coordinator. An OffsetFetch without `require_stable`
(aiokafka 0.14 sends v1-v3) may answer the previous commit meanwhile, and a
new owner would then redo finished work. With `require_stable` the broker
answers UNSTABLE_OFFSET_COMMIT (88) while such a commit is pending; we wait
and ask again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

from aiokafka import TopicPartition
from aiokafka.errors import (
    GroupCoordinatorNotAvailableError,
    KafkaError,
    NotCoordinatorForGroupError,
    for_code,
)
from aiokafka.protocol.api import Request, RequestStruct, Response
from aiokafka.protocol.types import (
    Boolean,
    CompactArray,
    CompactString,
    Int16,
    Int32,
    Int64,
    Schema,
    TaggedFields,
)

log = logging.getLogger(__name__)

UNSTABLE_OFFSET_COMMIT = 88
NO_OFFSET = -1
RETRY_S = 0.05
MAX_WAIT_S = 60.0


class UnstableOffset(KafkaError):  # type: ignore[misc]
    """The broker kept answering UNSTABLE_OFFSET_COMMIT: a transactional commit stayed pending
    (a transaction left hanging, if the committing producer id has since been initialised:
    `service/ingest/hanging.py`)."""


class OffsetFetchResponse_v7(Response):  # type: ignore[misc]
    API_KEY = 9
    API_VERSION = 7
    SCHEMA = Schema(
        ("throttle_time_ms", Int32),
        (
            "topics",
            CompactArray(
                ("name", CompactString("utf-8")),
                (
                    "partitions",
                    CompactArray(
                        ("partition_index", Int32),
                        ("committed_offset", Int64),
                        ("committed_leader_epoch", Int32),
                        ("metadata", CompactString("utf-8")),
                        ("error_code", Int16),
                        ("tags", TaggedFields),
                    ),
                ),
                ("tags", TaggedFields),
            ),
        ),
        ("error_code", Int16),
        ("tags", TaggedFields),
    )


class OffsetFetchRequest_v7(RequestStruct):  # type: ignore[misc]
    FLEXIBLE_VERSION = True
    API_KEY = 9
    API_VERSION = 7
    RESPONSE_TYPE = OffsetFetchResponse_v7
    SCHEMA = Schema(
        ("group_id", CompactString("utf-8")),
        (
            "topics",
            CompactArray(
                ("name", CompactString("utf-8")),
                ("partition_indexes", CompactArray(Int32)),
                ("tags", TaggedFields),
            ),
        ),
        ("require_stable", Boolean),
        ("tags", TaggedFields),
    )


def topic_partitions(tps: Iterable[TopicPartition]) -> list[tuple[str, list[int], dict[int, bytes]]]:
    """`tps` as a flexible request's topics: (topic, its partition indexes, no tagged fields)."""
    by_topic: dict[str, list[int]] = {}
    for tp in tps:
        by_topic.setdefault(tp.topic, []).append(tp.partition)
    return [(topic, parts, {}) for topic, parts in by_topic.items()]


class StableOffsetFetchRequest(Request[OffsetFetchRequest_v7]):  # type: ignore[misc]
    API_KEY = 9

    def __init__(self, group_id: str, tps: list[TopicPartition], require_stable: bool = True) -> None:
        self._group_id = group_id
        self._require_stable = require_stable
        self._topics = topic_partitions(tps)

    def build(self, request_struct_class: type[OffsetFetchRequest_v7]) -> OffsetFetchRequest_v7:
        return request_struct_class(self._group_id, self._topics, self._require_stable, {})


async def fetch_committed_stable(
    coordinator: Any, tp: TopicPartition, *, stable: bool = True, unstable_max_s: float = MAX_WAIT_S
) -> tuple[int | None, str]:
    """The group's committed (offset, metadata) for `tp`, waiting out pending transactional
    commits (`stable=False`: the last completed commit at once, even while a transaction
    is open, e.g. one a killed owner left until its producer is fenced). `coordinator` is
    the consumer's group coordinator (aiokafka internals: it finds the coordinator node
    and sends to it). Raises `UnstableOffset` once the commit has been answered unstable for
    `unstable_max_s`, a `KafkaError` once nothing better came for `MAX_WAIT_S`."""
    delay = RETRY_S
    waited = 0.0
    pending = 0.0
    while True:
        await coordinator.ensure_coordinator_known()
        try:
            request = StableOffsetFetchRequest(coordinator.group_id, [tp], require_stable=stable)
            response = await coordinator._send_req(request)
        except KafkaError as exc:
            if not exc.retriable:
                raise
            await asyncio.sleep(delay)
            continue
        unstable = pending_commit = False
        if response.error_code:
            _raise_or_retry(response.error_code, coordinator)
            unstable = True
        for _topic, partitions, _tags in response.topics:
            for partition, offset, _epoch, metadata, error_code, _ptags in partitions:
                if partition != tp.partition:
                    continue
                if error_code == UNSTABLE_OFFSET_COMMIT:
                    unstable = pending_commit = True
                elif error_code:
                    _raise_or_retry(error_code, coordinator)
                    unstable = True
                else:
                    return (None if offset == NO_OFFSET else offset), metadata or ""
        if not unstable:
            return None, ""
        if pending_commit and pending >= unstable_max_s:
            raise UnstableOffset(f"the committed offset of {tp} stayed unstable for {pending:.0f}s")
        if waited > MAX_WAIT_S:
            raise KafkaError(f"the committed offset of {tp} stayed unstable for {waited:.0f}s")
        await asyncio.sleep(delay)
        waited += delay
        pending = pending + delay if pending_commit else 0.0
        delay = min(delay * 2, 1.0)


async def commit_pending(coordinator: Any, tp: TopicPartition) -> bool:
    """Whether a transactional offset commit of `tp` is pending in the group right now
    (answered UNSTABLE_OFFSET_COMMIT): one stable read that does not wait it out."""
    try:
        await fetch_committed_stable(coordinator, tp, stable=True, unstable_max_s=0.0)
    except UnstableOffset:
        return True
    return False


def _raise_or_retry(code: int, coordinator: Any) -> None:
    if code == UNSTABLE_OFFSET_COMMIT:
        return
    error = for_code(code)
    if error in (NotCoordinatorForGroupError, GroupCoordinatorNotAvailableError):
        coordinator.coordinator_dead()
        return
    if getattr(error, "retriable", False) or error.__name__ == "GroupLoadInProgressError":
        return
    raise error()
