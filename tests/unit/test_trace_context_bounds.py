"""A request's trace context headers are bounded before they reach an outcome, whatever their size
and bytes: with tracing off (copied) and on (extracted, then injected)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from service.admission.admit import Record
from service.telemetry.tracecontext import (
    TRACESTATE_MAX_CHARS,
    TRACESTATE_MAX_MEMBERS,
    Headers,
    bounded_tracestate,
    trace_context,
    valid_traceparent,
)
from service.telemetry.tracing import Tracing, forwarded_headers

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TP = f"00-{TRACE_ID}-{PARENT_ID}-01".encode()
MEGABYTE = 1024 * 1024


def _size(headers: tuple[tuple[str, bytes], ...]) -> int:
    return sum(len(k) + len(v) for k, v in headers)


def test_a_megabyte_tracestate_is_cut_to_the_w3c_bound_when_tracing_is_off() -> None:
    """The case of the issue: it used to be copied whole, and the dead letter exceeded the broker's limit."""
    huge = b",".join(b"k%d=%s" % (i, b"v" * 200) for i in range(5000))  # ~1 MB of valid members
    headers: Headers = [("traceparent", TP), ("tracestate", huge), ("x-sig", b"s")]
    with Tracing(None).produce("claude.deadletter.acme", b"k", headers) as forwarded:
        assert forwarded[0] == ("traceparent", TP)
        name, state = forwarded[1]
        assert name == "tracestate"
        assert len(state) <= TRACESTATE_MAX_CHARS
        assert state == b"k0=" + b"v" * 200 + b",k1=" + b"v" * 200  # the leftmost that fit
        assert _size(forwarded) < 1024


@pytest.mark.parametrize(
    "value",
    [
        b"0" * MEGABYTE,
        TP + b"-00",
        TP[:-1],
        TP.upper(),
        b"ff" + TP[2:],
        f"00-{'0' * 32}-{PARENT_ID}-01".encode(),
        f"00-{TRACE_ID}-{'0' * 16}-01".encode(),
        b"00-" + "é".encode() * 26 + b"-" + b"a" * 16 + b"-01",
        b"\xff" * 55,
        b"",
    ],
    ids=[
        "megabyte",
        "too-long",
        "too-short",
        "uppercase",
        "version-ff",
        "zero-trace-id",
        "zero-parent-id",
        "non-ascii",
        "invalid-utf8",
        "empty",
    ],
)
def test_a_traceparent_that_is_not_w3c_is_dropped_with_its_tracestate(value: bytes) -> None:
    assert not valid_traceparent(value)
    assert forwarded_headers([("traceparent", value), ("tracestate", b"a=1")]) == ()


def test_a_valid_context_is_copied_unchanged_and_names_match_any_case() -> None:
    assert valid_traceparent(TP)
    assert forwarded_headers([("TraceParent", TP), ("TRACESTATE", b"a=1,b=2")]) == (
        ("traceparent", TP),
        ("tracestate", b"a=1,b=2"),
    )
    assert forwarded_headers([("traceparent", TP)]) == (("traceparent", TP),)
    assert forwarded_headers([("tracestate", b"a=1")]) == ()  # no traceparent, no tracestate


def test_only_the_first_traceparent_counts() -> None:
    other = f"00-{'1' * 32}-{'2' * 16}-00".encode()
    assert forwarded_headers([("traceparent", TP), ("traceparent", other)]) == (("traceparent", TP),)
    assert forwarded_headers([("traceparent", b"junk"), ("traceparent", TP)]) == ()


def test_header_names_that_are_not_utf8_and_null_values_are_ignored() -> None:
    headers: Headers = [(b"\xff\xfe", b"x"), (b"traceparent", TP), ("traceparent", None), ("traceparent", TP)]
    assert trace_context(headers) == (("traceparent", TP),)


def test_tracestate_keeps_only_valid_members_once_each() -> None:
    raw = [b" a=1 ,\tb=2,,BAD=3,c=\xff\xfe,d=caf\xc3\xa9, e = 5,a=9,f@sys=6,=7,g=", b"h=8"]
    assert bounded_tracestate(raw) == b"a=1,b=2,f@sys=6,h=8"
    assert bounded_tracestate([b"\xff" * MEGABYTE]) is None
    assert bounded_tracestate([]) is None


def test_tracestate_keeps_at_most_32_members() -> None:
    state = bounded_tracestate([b",".join(b"k%d=1" % i for i in range(100))])
    assert state is not None
    assert state.split(b",") == [b"k%d=1" % i for i in range(TRACESTATE_MAX_MEMBERS)]


def test_tracestate_over_512_drops_long_members_first_then_from_the_right() -> None:
    long = [b"l%d=%s" % (i, b"x" * 200) for i in range(2)]
    short = [b"s%d=%s" % (i, b"y" * 60) for i in range(8)]  # 8 x 63 + 7 commas = 511
    state = bounded_tracestate([b",".join([long[0], *short[:4], long[1], *short[4:]])])
    assert state == b",".join(short)
    state = bounded_tracestate([b",".join([*short, b"t=1"])])  # 515: the rightmost goes
    assert state == b",".join(short)
    assert len(state) <= TRACESTATE_MAX_CHARS


def test_a_tracestate_read_only_in_part_never_keeps_a_cut_member() -> None:
    member = b"k=" + b"v" * 100
    state = bounded_tracestate([b",".join([member] * 2000)])
    assert state is not None
    assert set(state.split(b",")) == {member}


@pytest.fixture
def tracing() -> Iterator[Tracing]:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(InMemorySpanExporter()))
    yield Tracing(provider, consumer_group="gw")
    provider.shutdown()


def test_with_tracing_on_the_injected_context_is_bounded_too(tracing: Tracing) -> None:
    huge = b",".join(b"k%d=%s" % (i, b"v" * 200) for i in range(5000))
    headers = (("traceparent", TP), ("tracestate", huge), ("baggage", b"a=" + b"b" * MEGABYTE))
    rec = Record("claude.requests.acme", 0, 7, None, b"r-1", b"{}", headers)
    with tracing.process(rec) as span, tracing.produce("claude.responses.acme", b"r-1", headers) as out:
        assert span is not None
        assert format(span.get_span_context().trace_id, "032x") == TRACE_ID
    injected = dict(out)
    assert injected["traceparent"].startswith(f"00-{TRACE_ID}-".encode())
    assert len(injected["tracestate"]) <= TRACESTATE_MAX_CHARS
    assert "baggage" not in injected
    assert _size(out) < 1024
