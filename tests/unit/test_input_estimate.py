"""The input-token estimate, block by block (issue 10): honest in both directions.

ANTHROPIC (vision): an image costs about width x height / 750 tokens after being scaled down
to a long edge of 1568 px and about 1,600 tokens; (PDF support): a page is billed as text
plus an image of the page. Before, the estimate was the request's bytes / 3: a 1 MB base64
image reserved ~350,000 tokens, a URL document almost nothing.

The simulator (service/simulator/media.py) bills what the estimate is measured against.
"""

from __future__ import annotations

import base64
import functools
import tracemalloc
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.admission import estimate
from service.admission.estimate import estimate_input_tokens
from service.config.settings import EstimateSettings
from service.contracts import media
from service.contracts.media import MAX_PDF_PAGES, image_size, pdf_facts
from service.simulator.tokens import count_input_tokens

E = EstimateSettings()
CPT = 3.0


def est(params: dict[str, object]) -> int:
    return estimate_input_tokens(params, E, CPT)


def png(w: int, h: int, body: int = 0) -> bytes:
    ihdr = b"\x00\x00\x00\rIHDR" + w.to_bytes(4, "big") + h.to_bytes(4, "big") + b"\x08\x02\x00\x00\x00"
    return b"\x89PNG\r\n\x1a\n" + ihdr + b"\x00" * (4 + body)


def gif(w: int, h: int) -> bytes:
    return b"GIF89a" + w.to_bytes(2, "little") + h.to_bytes(2, "little") + b"\x00" * 20


def webp(kind: bytes, w: int, h: int) -> bytes:
    head = b"RIFF" + (100).to_bytes(4, "little") + b"WEBP" + kind + (80).to_bytes(4, "little")
    if kind == b"VP8 ":
        return (
            head + b"\x00\x00\x00\x9d\x01\x2a" + w.to_bytes(2, "little") + h.to_bytes(2, "little") + b"\0" * 8
        )
    if kind == b"VP8L":
        bits = (w - 1) | ((h - 1) << 14)
        return head + b"\x2f" + bits.to_bytes(4, "little") + b"\0" * 8
    return (
        head + b"\x00\x00\x00\x00" + (w - 1).to_bytes(3, "little") + (h - 1).to_bytes(3, "little") + b"\0" * 8
    )


def jpeg(w: int, h: int, exif_bytes: int = 30_000) -> bytes:
    app1 = b"\xff\xe1" + (exif_bytes + 2).to_bytes(2, "big") + b"E" * exif_bytes
    dqt = b"\xff\xdb" + (67).to_bytes(2, "big") + b"\x00" * 65
    sof = (
        b"\xff\xc2"
        + (17).to_bytes(2, "big")
        + b"\x08"
        + h.to_bytes(2, "big")
        + w.to_bytes(2, "big")
        + b"\0" * 10
    )
    return b"\xff\xd8" + app1 + dqt + sof + b"\xff\xda" + b"\0" * 64


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def pdf(pages: list[str], compress: bool = True) -> str:
    objs = [b"<< /Type /Catalog /Pages 2 0 R >>"]
    kids = " ".join(f"{3 + 2 * i} 0 R" for i in range(len(pages)))
    objs.append(f"<< /Type /Pages /Kids [{kids}] /Count {len(pages)} >>".encode())
    for i, text in enumerate(pages):
        lines = [text[j : j + 80] for j in range(0, len(text), 80)] or [""]
        content = b"".join(
            b"BT /F1 11 Tf 72 %d Td (%s) Tj ET\n" % (740 - 13 * k, ln.encode()) for k, ln in enumerate(lines)
        )
        objs.append(
            f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents {4 + 2 * i} 0 R >>".encode()
        )
        data, filt = (zlib.compress(content), b" /Filter /FlateDecode") if compress else (content, b"")
        objs.append(b"<< /Length %d%s >>\nstream\n" % (len(data), filt) + data + b"\nendstream")
    out = b"%PDF-1.4\n" + b"".join(b"%d 0 obj\n" % (n + 1) + o + b"\nendobj\n" for n, o in enumerate(objs))
    return b64(out + b"trailer\n<< /Root 1 0 R >>\n%%EOF\n")


@pytest.mark.parametrize(
    ("raw", "size"),
    [
        (png(1920, 1080), (1920, 1080)),
        (gif(320, 200), (320, 200)),
        (webp(b"VP8 ", 800, 600), (800, 600)),
        (webp(b"VP8L", 1000, 3000), (1000, 3000)),
        (webp(b"VP8X", 5000, 4000), (5000, 4000)),
        (jpeg(4032, 3024), (4032, 3024)),
    ],
)
def test_image_sizes_are_read_from_the_header(raw: bytes, size: tuple[int, int]) -> None:
    assert image_size(b64(raw)) == size


def test_only_the_header_is_decoded() -> None:
    """A JPEG's size sits after its EXIF segment: the walk jumps over it; what follows the
    frame header is never decoded (here it is not even valid base64)."""
    data = b64(jpeg(640, 480, exif_bytes=60_000))
    assert image_size(data[:81_000] + "!!!! not base64 !!!!" * 1000) == (640, 480)
    assert image_size(b64(b"not an image at all")) is None
    assert image_size("%%%") is None


@pytest.mark.parametrize(
    ("size", "tokens"),
    [((200, 200), 54), ((1000, 1000), 1334), ((1092, 1092), 1590), ((4000, 3000), 1600), ((3000, 200), 219)],
)
def test_an_image_costs_its_size_after_anthropics_resizing(size: tuple[int, int], tokens: int) -> None:
    source = {"type": "base64", "media_type": "image/png", "data": b64(png(*size, body=500_000))}
    params = {"model": "claude-sonnet-4-5", "max_tokens": 8, "messages": [{"role": "user", "content": [
        {"type": "image", "source": source}
    ]}]}  # fmt: skip
    assert est(params) == tokens + 4  # the message's framing
    assert count_input_tokens(params) <= est(params)


def test_a_big_base64_image_no_longer_reserves_its_bytes() -> None:
    data = b64(png(1024, 768, body=1_000_000))  # 1.3 MB of base64
    params = {"model": "claude-haiku-4-5", "max_tokens": 8, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": data}}
    ]}]}  # fmt: skip
    assert est(params) < 1_200  # was len(data) / 3 = 450,000


def test_urls_count_the_most_they_can_cost() -> None:
    image = {"type": "image", "source": {"type": "url", "url": "https://example.com/a.jpg"}}
    doc = {"type": "document", "source": {"type": "url", "url": "https://example.com/a.pdf"}}
    for model, cap in (("claude-haiku-4-5", 1600), ("claude-opus-4-8", 4784)):
        params = {"model": model, "max_tokens": 8, "messages": [{"role": "user", "content": [image]}]}
        assert est(params) == cap + 4
        assert count_input_tokens(params) <= est(params)  # an upper bound: the size is unknown
    params = {"model": "claude-haiku-4-5", "max_tokens": 8, "messages": [{"role": "user", "content": [doc]}]}
    assert est(params) >= E.unknown_document_tokens


@pytest.mark.parametrize("compress", [True, False])
def test_a_pdf_counts_its_pages_and_its_text(compress: bool) -> None:
    data = pdf(["Quarterly report. " * 150, "Figures (see table) " * 100, ""], compress)
    facts = pdf_facts(data)
    assert facts is not None
    assert facts.pages == 3
    assert facts.text_chars == 18 * 150 + 20 * 100
    params = {"model": "claude-sonnet-4-5", "max_tokens": 8, "messages": [{"role": "user", "content": [
        {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": data}}
    ]}]}  # fmt: skip
    billed = count_input_tokens(params)
    assert billed == 3 * 1600 + (18 * 150 + 20 * 100) // 4 + 3
    assert billed <= est(params) <= 1.5 * billed


def test_an_unreadable_pdf_counts_the_conservative_default() -> None:
    source = {"type": "base64", "media_type": "application/pdf", "data": b64(b"%PDF-1.7 garbage")}
    params = {"model": "claude-sonnet-4-5", "max_tokens": 8, "messages": [{"role": "user", "content": [
        {"type": "document", "source": source}
    ]}]}  # fmt: skip
    assert est(params) >= E.unknown_document_tokens


def test_tools_and_server_tools_are_counted() -> None:
    tools = [{"name": "lookup", "description": "find a record", "input_schema": {"type": "object"}}]
    base = {"model": "claude-sonnet-4-5", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
    with_tools = {**base, "tools": tools}
    assert est(with_tools) - est(base) >= 346  # Anthropic's tool-use system prompt
    assert count_input_tokens(with_tools) <= est(with_tools)
    search = {**base, "tools": [{"type": "web_search_20250305", "name": "web_search", "max_uses": 3}]}
    assert est(search) >= 3 * E.server_tool_tokens_per_use
    assert count_input_tokens(search) <= est(search)


def test_a_max_uses_beyond_any_call_is_counted_up_to_the_cap() -> None:
    """`max_uses` of 2**64 was estimated at ~1.8e19 tokens: more than any ITPM bucket holds, every
    partner's calls waited until that one settled. It counts `server_tool_max_uses` at most."""
    base = {"model": "claude-sonnet-4-5", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}

    def search(max_uses: int) -> dict[str, object]:
        return {
            **base,
            "tools": [{"type": "web_search_20250305", "name": "web_search", "max_uses": max_uses}],
        }

    at_cap = est(search(E.server_tool_max_uses))
    assert est(search(E.server_tool_max_uses - 1)) == at_cap - E.server_tool_tokens_per_use
    for beyond in (E.server_tool_max_uses + 1, 2**64 - 1):  # the same but for its digits in the definition
        assert at_cap <= est(search(beyond)) <= at_cap + 10
    assert at_cap < E.server_tool_max_uses * E.server_tool_tokens_per_use + 10_000


text = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=3000)


@settings(max_examples=200, deadline=None)
@given(
    texts=st.lists(text, min_size=1, max_size=6),
    images=st.lists(st.tuples(st.integers(1, 9000), st.integers(1, 9000)), max_size=3),
    pages=st.lists(text, max_size=4),
    model=st.sampled_from(["claude-haiku-4-5", "claude-sonnet-4-5", "claude-opus-4-8"]),
    tools=st.booleans(),
)
def test_never_below_what_is_billed_where_the_size_is_knowable(
    texts: list[str], images: list[tuple[int, int]], pages: list[str], model: str, tools: bool
) -> None:
    blocks: list[dict[str, object]] = [{"type": "text", "text": t} for t in texts]
    blocks += [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": b64(png(w, h))}}
        for w, h in images
    ]
    if pages:
        safe = ["".join(c for c in p if c.isascii() and c.isprintable()) for p in pages]
        source = {"type": "base64", "media_type": "application/pdf", "data": pdf(safe)}
        blocks.append({"type": "document", "source": source})
    params: dict[str, object] = {
        "model": model,
        "max_tokens": 8,
        "messages": [{"role": "user", "content": blocks}],
    }
    if tools:
        params["tools"] = [
            {"name": "t", "input_schema": {"type": "object", "properties": {"q": {"type": "string"}}}}
        ]
    assert est(params) >= count_input_tokens(params)


# Hostile PDFs: the work of reading them is bounded per request, and what is not read is
# counted from the pages (a hostile-input probe: a 52 KB request whose one FlateDecode
# stream inflates to 40 MB held admission 6 to 10 s on the event loop and reserved 13.3M
# input tokens; a request of five of them cost 41 s of CPU).

PAGE = E.image_max_tokens + E.document_page_text_tokens
"""What a page of a PDF whose text is not read counts on a model that is not high-res."""


def stream(entries: bytes, data: bytes) -> bytes:
    return b"<< /Length %d %s >>\nstream\n" % (len(data), entries) + data + b"\nendstream"


def raw_pdf(*objs: bytes) -> str:
    out = b"%PDF-1.5\n" + b"".join(b"%d 0 obj\n" % (n + 1) + o + b"\nendobj\n" for n, o in enumerate(objs))
    return b64(out + b"%%EOF\n")


@functools.cache
def bomb() -> str:
    """The probe's PDF: one page and 39 KB of zlib that inflates to 40 MB, text operators
    around 20M unclosed hex strings."""
    content = b"BT " + b"<0" * 20_000_000 + b" ET"
    return raw_pdf(b"<< /Type /Page >>", stream(b"/Filter /FlateDecode", zlib.compress(content, 9)))


def pdf_request(*datas: str) -> dict[str, object]:
    docs = [
        {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": d}}
        for d in datas
    ]
    return {"model": "claude-haiku-4-5", "max_tokens": 8, "messages": [{"role": "user", "content": docs}]}


Read = list[tuple["media.InflateBudget | None", "media.PdfFacts | None"]]


@pytest.fixture
def read_pdfs(monkeypatch: pytest.MonkeyPatch) -> Read:
    """(budget, facts) of each PDF the estimate reads."""
    seen: Read = []

    def spy(
        data: str, budget: media.InflateBudget | None = None, *, text: bool = True
    ) -> media.PdfFacts | None:
        facts = media.pdf_facts(data, budget, text=text)
        seen.append((budget, facts))
        return facts

    monkeypatch.setattr(estimate, "pdf_facts", spy)
    return seen


def test_a_zip_bomb_is_read_no_further_than_the_budget() -> None:
    facts = pdf_facts(bomb())
    assert facts is not None
    assert facts.over_budget
    assert facts.content_bytes is None
    assert facts.inflated == media.MAX_INFLATED_BYTES + 1  # one byte past what a PDF may inflate
    assert (facts.pages, facts.text_chars) == (1, 0)  # what was not read is not scanned either


def test_a_zip_bomb_is_estimated_from_its_pages_without_being_held() -> None:
    """Never inflated whole, not even to the budget: a chunk at a time, counted, dropped."""
    params = pdf_request(bomb())
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    tracemalloc.reset_peak()
    try:
        tokens = est(params)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        if started:
            tracemalloc.stop()
    assert peak < 2 * 1024 * 1024  # was 88 MB: the 40 MB inflated, then copied
    assert tokens == 4 + PAGE  # was 13,334,940: its 40 MB / 3
    assert count_input_tokens(params) <= tokens  # still at least what is billed


def test_the_pdfs_of_a_request_share_one_budget(read_pdfs: Read) -> None:
    params = pdf_request(*[bomb()] * 5)
    tokens = est(params)
    budgets = {id(b) for b, _ in read_pdfs}
    assert len(read_pdfs) == 5
    assert len(budgets) == 1
    budget = read_pdfs[0][0]
    assert isinstance(budget, media.InflateBudget)
    assert budget.left == 0
    inflated = [f.inflated for _, f in read_pdfs if isinstance(f, media.PdfFacts) and f.over_budget]
    assert len(inflated) == 5
    assert budget.inflated == sum(inflated)
    assert max(inflated) <= media.MAX_INFLATED_BYTES + 1
    assert budget.inflated <= media.REQUEST_INFLATED_BYTES + 5  # each stops one byte past
    assert tokens == 4 + 5 * PAGE
    assert count_input_tokens(params) <= tokens


def test_a_pdf_after_a_bomb_is_still_read(read_pdfs: Read) -> None:
    """One PDF takes at most MAX_INFLATED_BYTES of the request's budget: the next one is read."""
    legit = pdf(["Quarterly report. " * 150, "Figures (see table) " * 100])
    both = est(pdf_request(bomb(), legit))
    assert both == est(pdf_request(bomb())) + est(pdf_request(legit)) - 4
    facts = read_pdfs[1][1]
    assert isinstance(facts, media.PdfFacts)
    assert facts.content_bytes is not None
    assert not facts.over_budget


def test_pages_in_object_streams_are_counted_before_the_content() -> None:
    """Object streams may hold the page objects: they are read first, so a content stream
    that spends the budget cannot hide them (the text then counts by page)."""
    pages = zlib.compress(b"<< /Type /Page /Parent 2 0 R >>\n" * 50)
    data = raw_pdf(
        stream(b"/Filter /FlateDecode", zlib.compress(b"BT " + b"(x) Tj " * 1_000_000 + b"ET", 9)),
        stream(b"/Type /ObjStm /N 50 /First 0 /Filter /FlateDecode", pages),
    )
    facts = pdf_facts(data)
    assert facts is not None
    assert facts.pages == 50
    assert facts.over_budget
    params = pdf_request(data)
    assert est(params) == 4 + 50 * PAGE
    assert count_input_tokens(params) <= est(params)


def test_an_object_stream_past_the_budget_leaves_the_pages_unknown() -> None:
    """Its pages cannot be counted: the document counts as one of unknown size (it counted
    3M pages, 4.8 billion tokens, after inflating 54 MB)."""
    objects = zlib.compress(b"<< /Type /Page >> " * 3_000_000, 9)
    data = raw_pdf(stream(b"/Type /ObjStm /N 1 /First 0 /Filter /FlateDecode", objects))
    assert pdf_facts(data) is None
    assert est(pdf_request(data)) == 4 + E.unknown_document_tokens


def test_the_text_shown_is_counted_string_by_string() -> None:
    """Literal strings (nested parentheses, escapes) and hex strings inside BT ... ET."""
    content = b"BT (a\\(b) Tj <48 65> Tj [(x(y)z) -20 (w)] TJ << /A 1 >> ET (outside) Tj BT (unclosed"
    facts = pdf_facts(raw_pdf(b"<< /Type /Page >>", stream(b"", content)))
    assert facts is not None
    assert facts.text_chars == 3 + 2 + 5 + 1
    assert facts.content_bytes == len(content) + 1  # with the end of line before `endstream`
    counted = pdf_facts(raw_pdf(b"<< /Type /Page >>", stream(b"", content)), text=False)
    assert counted is not None
    assert (counted.content_bytes, counted.text_chars) == (len(content) + 1, 0)  # not scanned


@pytest.mark.parametrize("digits", [4, 15, 30, 5000])
def test_a_pdf_that_claims_countless_pages_counts_at_most_the_cap(digits: int) -> None:
    """`/Count` is the sender's word: 10**15 pages priced beyond 64 bits (a batch retried
    forever), 10**30 made an estimate no bucket holds, and 5,000 digits raised in `int()`
    (an `internal_error` with no request id)."""
    data = b64(b"%PDF-1.4\n1 0 obj<</Type/Pages/Count " + b"9" * digits + b">>endobj\n")
    facts = pdf_facts(data)
    assert facts is not None
    assert facts.pages == MAX_PDF_PAGES
    doc = {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": data}}
    params = {"model": "claude-sonnet-4-5", "max_tokens": 8, "messages": [{"role": "user", "content": [doc]}]}
    assert est(params) <= MAX_PDF_PAGES * 3_000
    assert count_input_tokens(params) <= MAX_PDF_PAGES * 3_000, "the simulator bills it so too"
