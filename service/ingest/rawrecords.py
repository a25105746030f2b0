"""A lenient reader of Kafka record batches: what aiokafka cannot decode becomes an `Undecodable`.

aiokafka (its C extension and its Python reader alike) decodes header names as strict UTF-8
and raises on the first record whose name is not, so the whole fetch fails. This reader is
used only for the fetch response of a partition where that happened (`service.ingest.fetch`):

- `Records` and `Batch` read the v2 batch format (magic 2) byte for byte; a record that cannot
  be decoded (a header name not UTF-8, lengths that do not add up) is yielded as an
  `Unreadable` that keeps its raw key, value and headers, and the batch goes on; a batch whose
  CRC does not match, or whose compressed body cannot be inflated, is one `Unreadable` for the
  whole batch. Batches of the old formats (magic 0 and 1, no headers) go to aiokafka's reader.
- `LenientPartition` is aiokafka's own `PartitionRecords` (so aborted transactions, control
  batches and the position are handled exactly as the fetcher handles them), yielding a
  `ConsumerRecord` or an `Undecodable` per record.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Final

from aiokafka import ConsumerRecord, TopicPartition
from aiokafka.codec import gzip_decode, lz4_decode, snappy_decode, zstd_decode
from aiokafka.consumer.fetcher import PartitionRecords
from aiokafka.record.legacy_records import LegacyRecordBatch
from aiokafka.record.util import calc_crc32c

from service.contracts.outcomes import Origin

RawHeaders = tuple[tuple[bytes, bytes | None], ...]

# the v2 batch header (aiokafka's DefaultRecordBase.HEADER_STRUCT)
_HEADER: Final = struct.Struct(">qiibIhiqqqhii")
_ATTRIBUTES_OFFSET: Final = struct.calcsize(">qiibI")
_LOG_OVERHEAD: Final = 12  # base offset, length
_MAGIC_OFFSET: Final = 16
_CODEC_MASK: Final = 0x07
_TIMESTAMP_TYPE_MASK: Final = 0x08
_TRANSACTIONAL_MASK: Final = 0x10
_CONTROL_MASK: Final = 0x20
_LOG_APPEND_TIME: Final = 1
_DETAIL_CHARS: Final = 300
_DECODERS: Final[dict[int, Callable[[bytes], bytes]]] = {
    1: gzip_decode,
    2: snappy_decode,
    3: lz4_decode,
    4: zstd_decode,
}


@dataclass(frozen=True, slots=True)
class Undecodable:
    """A record the Kafka client could not decode, as far as it could be read.

    `error` is the class name of what failed (`UnicodeDecodeError` for a header name that is
    not UTF-8, `CorruptRecordException` for bytes that do not parse or a CRC that does not
    match, a deserializer's own error). `offset` is the record's; when a whole batch could not
    be read, `offset`..`last_offset` is its range and the raw fields are None. Header names are
    bytes, as they were written.
    """

    topic: str
    partition: int
    offset: int
    error: str
    detail: str
    last_offset: int
    timestamp: int | None = None
    timestamp_type: int | None = None
    key: bytes | None = None
    value: bytes | None = None
    headers: RawHeaders | None = None

    @property
    def tp(self) -> TopicPartition:
        return TopicPartition(self.topic, self.partition)

    def describe(self) -> str:
        """A one-line cause, for a dead letter's `detail`."""
        where = f"offset {self.offset}"
        if self.last_offset > self.offset:
            where = f"offsets {self.offset}-{self.last_offset} (a whole batch)"
        return f"the Kafka client cannot decode the record at {where}: {self.error}: {self.detail}"

    def origin(self) -> Origin:
        """The record as a dead letter's `original` (header names as bytes, see `encode_deadletter`)."""
        return Origin(
            self.topic, self.partition, self.offset, self.timestamp, self.key, self.value, self.headers or ()
        )


@dataclass(frozen=True, slots=True)
class Record:
    """One decoded record (the fields aiokafka's `PartitionRecords` reads)."""

    offset: int
    timestamp: int
    timestamp_type: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes | None]]
    checksum: None = None


@dataclass(frozen=True, slots=True)
class Unreadable:
    """A record (or, `offset` < `last_offset`, a whole batch) that could not be decoded."""

    offset: int
    last_offset: int
    error: str
    detail: str
    timestamp: int | None = None
    timestamp_type: int | None = None
    key: bytes | None = None
    value: bytes | None = None
    headers: RawHeaders | None = None


def _detail(exc: BaseException) -> str:
    return str(exc)[:_DETAIL_CHARS]


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    """A zigzag varint at `pos`: (value, next position). ValueError when it is cut or too long."""
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("varint cut short")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return (result >> 1) ^ -(result & 1), pos
        shift += 7
        if shift > 63:
            raise ValueError("varint longer than 10 bytes")


def _nullable(buf: bytes, pos: int) -> tuple[bytes | None, int]:
    size, pos = _varint(buf, pos)
    if size < 0:
        return None, pos
    if pos + size > len(buf):
        raise ValueError(f"a field of {size} bytes runs past the record")
    return buf[pos : pos + size], pos + size


def _read_record(body: bytes, batch: Batch) -> Record | Unreadable:
    """One v2 record (its bytes after the length), leniently."""
    _, pos = _varint(body, 0)  # attributes, unused
    ts_delta, pos = _varint(body, pos)
    offset_delta, pos = _varint(body, pos)
    offset = batch.base_offset + offset_delta
    ts_type = batch.timestamp_type
    timestamp = batch.max_timestamp if ts_type == _LOG_APPEND_TIME else batch.first_timestamp + ts_delta
    key: bytes | None = None
    value: bytes | None = None
    raw: list[tuple[bytes, bytes | None]] = []
    try:
        key, pos = _nullable(body, pos)
        value, pos = _nullable(body, pos)
        count, pos = _varint(body, pos)
        if count < 0:
            raise ValueError(f"negative header count {count}")
        for _ in range(count):
            name, pos = _nullable(body, pos)
            if name is None:
                raise ValueError("a header name is null")
            header_value, pos = _nullable(body, pos)
            raw.append((name, header_value))
        if pos != len(body):
            raise ValueError(f"{len(body) - pos} bytes left after the headers")
    except ValueError as exc:
        return Unreadable(
            offset, offset, "CorruptRecordException", _detail(exc), timestamp, ts_type, key, value, tuple(raw)
        )
    try:
        headers = [(name.decode("utf-8"), v) for name, v in raw]
    except UnicodeDecodeError as exc:
        detail = f"a header name is not UTF-8: {_detail(exc)}"
        return Unreadable(
            offset, offset, type(exc).__name__, detail, timestamp, ts_type, key, value, tuple(raw)
        )
    return Record(offset, timestamp, ts_type, key, value, headers)


class Batch:
    """A v2 record batch, read leniently. Iterating yields `Record` or `Unreadable` items."""

    def __init__(self, data: bytes, *, check_crc: bool, floor: int = 0) -> None:
        (
            self.base_offset,
            _length,
            _leader_epoch,
            self.magic,
            self.crc,
            self.attributes,
            self.last_offset_delta,
            self.first_timestamp,
            self.max_timestamp,
            self.producer_id,
            self.producer_epoch,
            self.base_sequence,
            self._count,
        ) = _HEADER.unpack_from(data)
        self._data = data
        self._check_crc = check_crc
        self._floor = floor  # an unreadable range starts no lower: the fetch offset
        self._items: Iterator[Record | Unreadable] | None = None

    @property
    def timestamp_type(self) -> int:
        return 1 if self.attributes & _TIMESTAMP_TYPE_MASK else 0

    @property
    def is_transactional(self) -> bool:
        return bool(self.attributes & _TRANSACTIONAL_MASK)

    @property
    def is_control_batch(self) -> bool:
        return bool(self.attributes & _CONTROL_MASK)

    @property
    def next_offset(self) -> int:
        return int(self.base_offset + self.last_offset_delta + 1)

    def validate_crc(self) -> bool:
        """Always true: a CRC mismatch is reported by iterating (one `Unreadable` for the batch)."""
        return True

    def __iter__(self) -> Batch:
        return self

    def __next__(self) -> Record | Unreadable:
        if self._items is None:
            self._items = self._read()
        return next(self._items)

    def _whole(self, first: int, error: str, detail: str) -> Unreadable:
        return Unreadable(max(first, self._floor), self.next_offset - 1, error, detail)

    def _read(self) -> Iterator[Record | Unreadable]:
        data = self._data
        if self._check_crc and calc_crc32c(data[_ATTRIBUTES_OFFSET:]) != self.crc:
            yield self._whole(self.base_offset, "CorruptRecordException", "the batch's CRC does not match")
            return
        body = data[_HEADER.size :]
        codec = self.attributes & _CODEC_MASK
        if codec:
            decoder = _DECODERS.get(codec)
            try:
                if decoder is None:
                    raise ValueError(f"unknown compression codec {codec}")
                body = bytes(decoder(body))
            except Exception as exc:  # noqa: BLE001  # any codec failure: the batch cannot be read
                yield self._whole(self.base_offset, type(exc).__name__, _detail(exc))
                return
        pos = 0
        expected = self.base_offset
        for _ in range(self._count):
            try:
                size, pos = _varint(body, pos)
                if size < 0 or pos + size > len(body):
                    raise ValueError(f"a record of {size} bytes runs past the batch")
                item = _read_record(body[pos : pos + size], self)
            except ValueError as exc:  # record boundaries are lost: the rest of the batch goes
                yield self._whole(expected, "CorruptRecordException", _detail(exc))
                return
            pos += size
            expected = item.last_offset + 1 if isinstance(item, Unreadable) else item.offset + 1
            yield item


class Records:
    """The record set of one partition in a fetch response, batch by batch (aiokafka's
    `MemoryRecords` interface); v2 batches are read by `Batch`."""

    def __init__(self, data: bytes, *, check_crcs: bool, fetch_offset: int = 0) -> None:
        self._data = bytes(data)
        self._pos = 0
        self._check_crcs = check_crcs
        self._fetch_offset = fetch_offset

    def size_in_bytes(self) -> int:
        return len(self._data)

    def _next_end(self) -> int | None:
        pos = self._pos
        if len(self._data) - pos < _LOG_OVERHEAD:
            return None
        (length,) = struct.unpack_from(">i", self._data, pos + 8)
        end = int(pos + _LOG_OVERHEAD + length)
        return end if length >= 0 and end <= len(self._data) else None  # the last may be cut

    def has_next(self) -> bool:
        return self._next_end() is not None

    def next_batch(self) -> Any:
        end = self._next_end()
        if end is None:
            return None
        data = self._data[self._pos : end]
        self._pos = end
        magic = data[_MAGIC_OFFSET]
        if magic < 2:
            return LegacyRecordBatch(data, magic)
        return Batch(data, check_crc=self._check_crcs, floor=self._fetch_offset)


class LenientPartition(PartitionRecords):  # type: ignore[misc]  # aiokafka is untyped
    """aiokafka's `PartitionRecords` over `Records`: iterating yields `ConsumerRecord` and
    `Undecodable` items in offset order; `next_fetch_offset` is where to go on from."""

    def __init__(
        self,
        tp: TopicPartition,
        data: bytes,
        aborted_transactions: list[tuple[int, int]] | None,
        fetch_offset: int,
        *,
        key_deserializer: Callable[[bytes | None], Any] | None,
        value_deserializer: Callable[[bytes | None], Any] | None,
        check_crcs: bool,
        isolation_level: int,
    ) -> None:
        super().__init__(
            tp,
            Records(data, check_crcs=check_crcs, fetch_offset=fetch_offset),
            aborted_transactions,
            fetch_offset,
            key_deserializer,
            value_deserializer,
            False,  # Batch checks its CRC itself, and reports a mismatch instead of raising
            isolation_level,
        )

    def _consumer_record(self, tp: TopicPartition, record: Any) -> ConsumerRecord[Any, Any] | Undecodable:
        if isinstance(record, Unreadable):
            return Undecodable(
                tp.topic,
                tp.partition,
                record.offset,
                record.error,
                record.detail,
                record.last_offset,
                record.timestamp,
                record.timestamp_type,
                record.key,
                record.value,
                record.headers,
            )
        try:
            consumer_record: ConsumerRecord[Any, Any] = super()._consumer_record(tp, record)
        except Exception as exc:  # noqa: BLE001  # a deserializer failed: it cannot be handed over
            headers = tuple((n.encode("utf-8"), v) for n, v in record.headers)
            return Undecodable(
                tp.topic,
                tp.partition,
                record.offset,
                type(exc).__name__,
                _detail(exc),
                record.offset,
                record.timestamp,
                record.timestamp_type,
                record.key,
                record.value,
                headers,
            )
        return consumer_record
