"""Hostile documents found by a fuzzing probe of the media parsers (service/contracts/media.py),
the estimate (service/admission/estimate.py) and the simulator's billing (service/simulator/
tokens.py). Admission reads a request under 64 KB on the event loop: what it costs there is
what every partner waits. Each test fails without its fix (the figures before are in each).
"""

from __future__ import annotations

import base64
import time
import tracemalloc
import zlib
from collections.abc import Callable
from typing import Any

import pytest

from service.admission.estimate import MAX_CONTENT_TOKENS, estimate_input_tokens
from service.config.settings import EstimateSettings
from service.contracts.media import MAX_INFLATED_BYTES, MAX_PDF_PAGES, pdf_facts
from service.contracts.params import check_request
from service.simulator.caching import _points
from service.simulator.tokens import count_input_tokens

E = EstimateSettings()
PAGE = b"<< /Type /Page >>"


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def est(params: dict[str, Any]) -> int:
    return estimate_input_tokens(params, E, 3.0)


def stream(entries: bytes, data: bytes) -> bytes:
    return b"<< /Length %d %s >>\nstream\n" % (len(data), entries) + data + b"\nendstream"


def raw_pdf(*objs: bytes, tail: bytes = b"") -> str:
    body = b"".join(b"%d 0 obj\n" % (n + 1) + o + b"\nendobj\n" for n, o in enumerate(objs))
    return b64(b"%PDF-1.5\n" + body + tail + b"%%EOF\n")


def doc(data: str, **extra: Any) -> dict[str, Any]:
    return {
        "type": "document",
        "source": {"type": "base64", "media_type": "application/pdf", "data": data},
        **extra,
    }


def request(blocks: Any, **top: Any) -> dict[str, Any]:
    params = {
        "model": "claude-haiku-4-5",
        "max_tokens": 8,
        "messages": [{"role": "user", "content": blocks}],
        **top,
    }
    check_request({"request_id": "r", "params": params})  # the gateway's contract admits it
    return params


def _seconds(fn: Callable[[], object]) -> float:
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def test_a_run_of_digits_after_a_count_is_read_in_one_pass() -> None:
    """The regex that paired `/Count` with `/Type /Pages` retried a 200-byte scan at every
    digit: 1 MB of digits held the GIL 1.4 s (a thread does not help), 47 KB ~100 ms on the
    event loop. Against the base64 decoding of the same bytes, in the same run: it was about
    a thousand times that; now a few times."""
    raw = b"%PDF-1.5\n" + PAGE + b"\n/Count " + b"1" * 1_000_000
    data = b64(raw)
    facts = pdf_facts(data)
    assert facts is not None
    assert facts.pages == 1, "a /Count with no page tree near it is not a page count"
    ratio = _seconds(lambda: pdf_facts(data)) / _seconds(lambda: base64.b64decode(data))
    assert ratio < 50, f"{ratio:.0f} times the decoding"


def test_the_pages_of_an_object_stream_are_counted_without_a_list_of_every_match() -> None:
    """Two object streams, each 4 MB of `/Type /Page` once inflated, in a 22 KB request: the
    pages were listed with findall (22.5 MB peak, 94 ms on the event loop)."""
    objstm = raw_pdf(
        stream(
            b"/Type /ObjStm /N 1 /First 0 /Filter /FlateDecode", zlib.compress(b"/Type /Page " * 349_000, 9)
        )
    )
    params = request([doc(objstm), doc(objstm)])
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    tracemalloc.reset_peak()
    try:
        est(params)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        if started:
            tracemalloc.stop()
    assert peak < 12 * 1024 * 1024, f"peak {peak / 1e6:.1f} MB"
    facts = pdf_facts(objstm)
    assert facts is not None
    assert facts.pages == MAX_PDF_PAGES


TEXT = b"BT (" + b"x" * 600_000 + b") Tj ET"


@pytest.mark.parametrize(
    "data",
    [
        raw_pdf(PAGE, stream(b"", TEXT), tail=b"% /Encrypt\n"),
        raw_pdf(PAGE, stream(b"", TEXT), stream(b"/Filter /DCTDecode", b"x")),
        raw_pdf(
            PAGE,
            stream(b"/Filter /FlateDecode", zlib.compress(b"BT (" + b"x" * 4_100_000 + b") Tj ET", 9)),
            stream(b"/Filter /FlateDecode", zlib.compress(b"\0" * (MAX_INFLATED_BYTES // 2), 9)),
        ),
        b64(b"%PDF-1.4\n" + b"A" * 700_000),
    ],
    ids=["encrypt-in-a-comment", "an-image-stream", "a-stream-past-the-budget", "no-page"],
)
def test_text_read_is_counted_when_the_rest_of_the_pdf_is_not(data: str) -> None:
    """With anything unknown the estimate counted pages only and dropped the text it had read:
    4,604 estimated against 151,603 and 1,026,603 billed; a "PDF" with no page 100,004 against
    233,362 (the simulator bills such a block by its JSON)."""
    params = request([doc(data)])
    assert est(params) >= count_input_tokens(params)


def test_the_simulator_reads_a_requests_pdfs_under_one_budget() -> None:
    """Each PDF had a budget of its own in the simulator: 50 small PDFs that inflate to 4 MB
    each (a 403 KB request) were read whole, 10.6 s of its event loop, and billed 20,080,003
    against an estimate of 2,890,676. And the prompt-cache planner read them all again."""
    one = raw_pdf(
        PAGE, stream(b"/Filter /FlateDecode", zlib.compress(b"BT " + b"(ab) " * 800_000 + b" ET", 9))
    )
    params = request([doc(one)] * 50)
    billed = count_input_tokens(params)
    assert billed <= est(params)
    assert billed < 2 * MAX_INFLATED_BYTES // 4 + 50 * 2_000  # what one budget can show, and the pages
    cached = request([doc(one, cache_control={"type": "ephemeral"})] + [doc(one)] * 9)
    points = _points(cached, cached["model"], 10**9)
    assert points[-1].tokens <= count_input_tokens(cached) + 10


def test_a_server_tool_that_asks_for_countless_tokens_counts_a_context_at_most() -> None:
    """`max_content_tokens: 2**63-1` estimated 46,116,860,184,273,879,420 tokens: a bucket
    never holds it, a budget refuses it as spent."""
    tools = [{"type": "web_fetch_20250910", "name": "web_fetch", "max_content_tokens": 2**63 - 1}]
    params = request("hi", tools=tools)
    assert est(params) <= E.server_tool_max_uses * MAX_CONTENT_TOKENS + 1_000


def test_content_bombs_before_it_leave_a_pdfs_pages_countable() -> None:
    """The pages of a PDF 1.5 are in its object streams, which must be inflated to count them:
    two small PDFs whose content streams spent the request's budget left a 100-page PDF after
    them unknown (100,000 tokens estimated; 100 pages are 160,000 as images alone)."""
    spender = raw_pdf(PAGE, stream(b"/Filter /FlateDecode", zlib.compress(b"\0" * MAX_INFLATED_BYTES, 9)))
    pages = b"".join(b"%d 0 obj << /Type /Page /Parent 1 0 R >> endobj " % (n + 2) for n in range(100))
    objstm = raw_pdf(stream(b"/Type /ObjStm /N 100 /First 0 /Filter /FlateDecode", zlib.compress(pages, 9)))
    facts = pdf_facts(objstm)
    assert facts is not None
    assert facts.pages == 100
    alone = est(request([doc(spender), doc(spender)]))
    with_it = est(request([doc(spender), doc(spender), doc(objstm)]))
    assert with_it - alone >= 100 * E.image_max_tokens  # its pages counted, its text known empty
