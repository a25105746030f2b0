"""Which producer ids hold a transaction open in a partition (DescribeProducers v0, KIP-664).

The broker keeps, for each partition, the producers that wrote to it lately and, for each, the
offset where its open transaction began (-1: none). The last stable offset of a partition is
the earliest such offset, so the producer whose transaction began there is the one holding
`read_committed` readers back. `kafka-transactions.sh find-hanging` reads the same. aiokafka
0.14 has no DescribeProducers: the request is written here, as `stable_offsets.py` does for
OffsetFetch v7.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

from aiokafka import AIOKafkaClient, TopicPartition
from aiokafka.cluster import ClusterMetadata
from aiokafka.protocol.api import Request, RequestStruct, Response
from aiokafka.protocol.types import CompactArray, CompactString, Int16, Int32, Int64, Schema, TaggedFields

from service.ingest.stable_offsets import topic_partitions

API_KEY = 61
NO_TRANSACTION = -1


class DescribeProducersResponse_v0(Response):  # type: ignore[misc]
    API_KEY = API_KEY
    API_VERSION = 0
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
                        ("error_code", Int16),
                        ("error_message", CompactString("utf-8")),
                        (
                            "active_producers",
                            CompactArray(
                                ("producer_id", Int64),
                                ("producer_epoch", Int32),
                                ("last_sequence", Int32),
                                ("last_timestamp", Int64),
                                ("coordinator_epoch", Int32),
                                ("current_txn_start_offset", Int64),
                                ("tags", TaggedFields),
                            ),
                        ),
                        ("tags", TaggedFields),
                    ),
                ),
                ("tags", TaggedFields),
            ),
        ),
        ("tags", TaggedFields),
    )


class DescribeProducersRequest_v0(RequestStruct):  # type: ignore[misc]
    FLEXIBLE_VERSION = True
    API_KEY = API_KEY
    API_VERSION = 0
    RESPONSE_TYPE = DescribeProducersResponse_v0
    SCHEMA = Schema(
        (
            "topics",
            CompactArray(
                ("name", CompactString("utf-8")),
                ("partition_indexes", CompactArray(Int32)),
                ("tags", TaggedFields),
            ),
        ),
        ("tags", TaggedFields),
    )


class DescribeProducersRequest(Request[DescribeProducersRequest_v0]):  # type: ignore[misc]
    API_KEY = API_KEY

    def __init__(self, partitions: Iterable[TopicPartition]) -> None:
        self._topics = topic_partitions(partitions)

    def build(self, request_struct_class: type[DescribeProducersRequest_v0]) -> DescribeProducersRequest_v0:
        return request_struct_class(self._topics, {})


def by_leader(
    metadata: ClusterMetadata, partitions: Iterable[TopicPartition]
) -> dict[int, list[TopicPartition]]:
    """`partitions` by the node that leads each (those without a leader are left out)."""
    out: dict[int, list[TopicPartition]] = defaultdict(list)
    for tp in partitions:
        leader = metadata.leader_for_partition(tp)
        if leader is not None and leader >= 0:
            out[leader].append(tp)
    return out


async def open_transactions(
    client: AIOKafkaClient, metadata: ClusterMetadata, partitions: Iterable[TopicPartition]
) -> dict[TopicPartition, dict[int, int]]:
    """For each partition, the producer ids with a transaction open in it and the offset where
    each began ({partition: {producer id: start offset}}), from its leader. Partitions without
    a leader or answered with an error are left out."""
    out: dict[TopicPartition, dict[int, int]] = {}
    for node, tps in by_leader(metadata, partitions).items():
        response = await client.send(node, DescribeProducersRequest(tps))
        for topic, parts, _tags in response.topics:
            for index, error, _message, producers, _ptags in parts:
                if error:
                    continue
                out[TopicPartition(topic, index)] = {
                    pid: start
                    for pid, _epoch, _seq, _ts, _coord, start, _t in producers
                    if start != NO_TRANSACTION
                }
    return out
