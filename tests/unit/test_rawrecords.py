"""The lenient batch reader, without a broker: what aiokafka cannot decode becomes an `Undecodable`."""

from __future__ import annotations

import base64

import orjson
import pytest
from aiokafka import ConsumerRecord, TopicPartition
from aiokafka.record.default_records import _DefaultRecordBatchBuilderPy
from aiokafka.record.memory_records import MemoryRecords

from service.contracts.outcomes import DeadLetter, encode_deadletter
from service.contracts.reasons import Reason
from service.contracts.schemas import validate
from service.ingest.rawrecords import LenientPartition, Undecodable

TP = TopicPartition("claude.requests.acme", 3)
BAD_NAME = b"\xff\xfebad"


class RawName(str):
    """A header name that the Python batch builder writes as these exact bytes."""

    raw: bytes

    def __new__(cls, raw: bytes) -> RawName:
        name = super().__new__(cls, raw.decode("latin-1"))
        name.raw = raw
        return name

    def encode(self, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        return self.raw


Spec = tuple[bytes, list[tuple[str, bytes | None]]]


def batch(base: int, specs: list[Spec], *, compression: int = 0) -> bytes:
    builder = _DefaultRecordBatchBuilderPy(2, compression, 0, -1, -1, -1, 1 << 20)
    for i, (value, headers) in enumerate(specs):
        builder.append(i, 1_700_000_000_000 + i, b"k%d" % (base + i), value, headers)
    data = bytearray(builder.build())
    data[0:8] = base.to_bytes(8, "big")  # the broker assigns the base offset
    return bytes(data)


def good(n: int) -> Spec:
    return b"good-%d" % n, [("traceparent", b"00-x"), ("x-null", None)]


def bad(n: int) -> Spec:
    return b"bad-%d" % n, [("ok", b"1"), (RawName(BAD_NAME), b"v"), ("x-null", None)]


def read(data: bytes, fetch_offset: int = 0, check_crcs: bool = True) -> tuple[list[object], int]:
    reader = LenientPartition(
        TP,
        data,
        None,
        fetch_offset,
        key_deserializer=None,
        value_deserializer=None,
        check_crcs=check_crcs,
        isolation_level=1,
    )
    return list(reader), reader.next_fetch_offset


def summary(items: list[object]) -> list[tuple[str, int, bytes | None]]:
    out: list[tuple[str, int, bytes | None]] = []
    for item in items:
        if isinstance(item, Undecodable):
            out.append(("bad", item.offset, item.value))
        else:
            assert isinstance(item, ConsumerRecord)
            out.append(("good", item.offset, item.value))
    return out


def test_aiokafka_itself_raises_on_a_header_name_that_is_not_utf8() -> None:
    records = MemoryRecords(batch(0, [good(0), bad(1)]))
    with pytest.raises(UnicodeDecodeError):
        list(records.next_batch())


@pytest.mark.parametrize("compression", [0, 1, 2, 3, 4], ids=["plain", "gzip", "snappy", "lz4", "zstd"])
def test_bad_records_are_reported_in_place_and_the_rest_is_read(compression: int) -> None:
    data = batch(10, [bad(0), good(1), bad(2), bad(3), good(4)], compression=compression)
    data += batch(15, [good(5)])
    items, next_offset = read(data)
    assert summary(items) == [
        ("bad", 10, b"bad-0"),
        ("good", 11, b"good-1"),
        ("bad", 12, b"bad-2"),
        ("bad", 13, b"bad-3"),
        ("good", 14, b"good-4"),
        ("good", 15, b"good-5"),
    ]
    assert next_offset == 16
    first = items[0]
    assert isinstance(first, Undecodable)
    assert (first.topic, first.partition, first.last_offset) == (TP.topic, TP.partition, 10)
    assert first.error == "UnicodeDecodeError"
    assert first.key == b"k10"
    assert first.headers == ((b"ok", b"1"), (BAD_NAME, b"v"), (b"x-null", None))
    assert first.timestamp == 1_700_000_000_000
    ok = items[1]
    assert isinstance(ok, ConsumerRecord)
    assert ok.headers == (("traceparent", b"00-x"), ("x-null", None))
    assert (ok.key, ok.timestamp, ok.serialized_value_size) == (b"k11", 1_700_000_000_001, 6)


def test_records_before_the_fetch_offset_are_not_read_again() -> None:
    items, next_offset = read(batch(0, [good(0), bad(1), good(2), bad(3)]), fetch_offset=2)
    assert summary(items) == [("good", 2, b"good-2"), ("bad", 3, b"bad-3")]
    assert next_offset == 4


def test_a_batch_whose_crc_does_not_match_is_one_undecodable_range() -> None:
    broken = bytearray(batch(0, [good(0), good(1), good(2)]))
    broken[-1] ^= 0xFF
    items, next_offset = read(bytes(broken) + batch(3, [good(3)]))
    assert summary(items) == [("bad", 0, None), ("good", 3, b"good-3")]
    whole = items[0]
    assert isinstance(whole, Undecodable)
    assert (whole.last_offset, whole.error) == (2, "CorruptRecordException")
    assert next_offset == 4


def test_a_record_whose_lengths_do_not_add_up_is_undecodable_alone() -> None:
    data = bytearray(batch(0, [good(0), (b"odd", [("ZZ", b"v")]), good(2)]))
    at = data.index(b"ZZ")
    assert data[at - 1] == 4  # zigzag varint of the name's length, 2
    data[at - 1] = 0x7E  # 63: runs past the record
    items, next_offset = read(bytes(data), check_crcs=False)
    assert summary(items) == [("good", 0, b"good-0"), ("bad", 1, b"odd"), ("good", 2, b"good-2")]
    assert isinstance(items[1], Undecodable)
    assert items[1].error == "CorruptRecordException"
    assert next_offset == 3


def test_a_failing_deserializer_makes_an_undecodable_not_an_exception() -> None:
    def strict(raw: bytes | None) -> str:
        assert raw is not None
        return raw.decode("ascii")

    reader = LenientPartition(
        TP,
        batch(0, [good(0), (b"\xe9t\xe9", []), good(2)]),
        None,
        0,
        key_deserializer=None,
        value_deserializer=strict,
        check_crcs=True,
        isolation_level=0,
    )
    items = list(reader)
    assert [type(i).__name__ for i in items] == ["ConsumerRecord", "Undecodable", "ConsumerRecord"]
    assert isinstance(items[1], Undecodable)
    assert (items[1].error, items[1].value) == ("UnicodeDecodeError", b"\xe9t\xe9")


def test_an_undecodable_record_makes_a_valid_dead_letter() -> None:
    items, _ = read(batch(0, [bad(0)]))
    (u,) = items
    assert isinstance(u, Undecodable)
    dl = DeadLetter("acme", Reason.UNDECODABLE_RECORD, u.describe(), u.origin())
    doc = orjson.loads(encode_deadletter(dl, failed_at=0, max_original_bytes=1024))
    validate("deadletter", doc)
    assert doc["reason"] == "undecodable_record"
    assert doc["retryable"] is False
    assert doc["detail"].startswith(
        "the Kafka client cannot decode the record at offset 0: UnicodeDecodeError"
    )
    original = doc["original"]
    assert (original["topic"], original["partition"], original["offset"]) == (TP.topic, TP.partition, 0)
    assert base64.b64decode(original["value_b64"]) == b"bad-0"
    names = [(h["key"], h.get("key_b64")) for h in original["headers"]]
    assert names == [
        ("ok", None),
        ("\\xff\\xfebad", base64.b64encode(BAD_NAME).decode()),
        ("x-null", None),
    ]
