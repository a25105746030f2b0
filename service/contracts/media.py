"""What can be known of an image or a PDF sent as base64 in a Messages API content block,
cheaply and without trusting it (admission estimates from it, the simulator bills from it).

- `image_size`: width and height from the header of a PNG, JPEG, GIF or WebP, decoding
  only the few bytes it reads (a JPEG is walked marker by marker, jumping over the
  segments in between), never the whole image.
- `pdf_facts`: the pages of a PDF and an upper bound of the text its pages draw (the bytes
  of its content streams, inflated), with bounded work: the PDFs of one request inflate at
  most `REQUEST_INFLATED_BYTES` together (an `InflateBudget`), one PDF at most
  `MAX_INFLATED_BYTES`, a chunk at a time, so a stream that inflates to gigabytes costs
  what the budget allows and is never held whole. A PDF whose content streams do not fit
  is reported `over_budget`, its content unknown like whatever cannot be read: unknown,
  not guessed low, and no more work is spent on it.

Anything malformed answers None (unknown): the caller then reserves its conservative default.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import re
import zlib
from dataclasses import dataclass

MAX_JPEG_MARKERS = 1_000
MAX_INFLATED_BYTES = 4 * 1024 * 1024
"""The most one PDF's object and content streams are inflated to (images and fonts are not
inflated): a 300-page PDF of dense text has about 2 MB of content streams."""
REQUEST_INFLATED_BYTES = 8 * 1024 * 1024
"""The most the PDFs of one request are inflated to, together: about 12 ms of inflating,
the most a request's PDFs cost admission (which runs on the event loop below 64 KB)."""
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # start-of-frame markers carry the size
MAX_PDF_PAGES = 1_000
"""The most pages a PDF is counted as. Claude takes at most 100 (600 on 1M-context models) pages a
request and refuses more (400, not billed); a `/Count` is the sender's word, so a 100-byte PDF may
claim 10**30 pages, or a count of 5,000 digits that `int()` refuses (Python's 4,300-digit limit)."""


class _B64:
    """Random access to the bytes of base64 text, decoding only the 4-character groups asked for."""

    def __init__(self, text: str) -> None:
        self._text = text
        self.size = len(text) // 4 * 3 - (2 if text.endswith("==") else 1 if text.endswith("=") else 0)

    def read(self, offset: int, n: int) -> bytes | None:
        if offset < 0 or n <= 0 or offset + n > self.size:
            return None
        first, last = offset // 3, (offset + n - 1) // 3
        chunk = self._text[first * 4 : (last + 1) * 4]
        try:
            raw = base64.b64decode(chunk, validate=True)
        except (binascii.Error, ValueError):
            return None
        start = offset - first * 3
        out = raw[start : start + n]
        return out if len(out) == n else None


def image_size(data: str) -> tuple[int, int] | None:
    """(width, height) in pixels of a base64 PNG, JPEG, GIF or WebP, or None."""
    b = _B64(data)
    head = b.read(0, min(32, b.size))
    if head is None or len(head) < 10:
        return None
    if head.startswith(b"\x89PNG\r\n\x1a\n") and len(head) >= 24:
        return _positive(int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big"))
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return _positive(int.from_bytes(head[6:8], "little"), int.from_bytes(head[8:10], "little"))
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP" and len(head) >= 30:
        return _webp(head)
    if head.startswith(b"\xff\xd8"):
        return _jpeg(b)
    return None


def _positive(w: int, h: int) -> tuple[int, int] | None:
    return (w, h) if w > 0 and h > 0 else None


def _webp(head: bytes) -> tuple[int, int] | None:
    kind = head[12:16]
    if kind == b"VP8 ":  # lossy: 14-bit sizes after the frame tag and start code
        w = int.from_bytes(head[26:28], "little") & 0x3FFF
        h = int.from_bytes(head[28:30], "little") & 0x3FFF
        return _positive(w, h)
    if kind == b"VP8L":  # lossless: 14 bits each, minus one, after the signature byte
        bits = int.from_bytes(head[21:25], "little")
        return _positive((bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1)
    if kind == b"VP8X":  # extended: 24 bits each, minus one
        return _positive(int.from_bytes(head[24:27], "little") + 1, int.from_bytes(head[27:30], "little") + 1)
    return None


def _jpeg(b: _B64) -> tuple[int, int] | None:
    offset = 2
    for _ in range(MAX_JPEG_MARKERS):
        marker = b.read(offset, 4)
        if marker is None or marker[0] != 0xFF:
            return None
        kind = marker[1]
        if kind == 0xFF:  # fill byte
            offset += 1
            continue
        if kind in (0x01, *range(0xD0, 0xD8)):  # markers without a length
            offset += 2
            continue
        length = int.from_bytes(marker[2:4], "big")
        if kind in _SOF:
            frame = b.read(offset + 5, 4)
            if frame is None:
                return None
            return _positive(int.from_bytes(frame[2:4], "big"), int.from_bytes(frame[0:2], "big"))
        if kind == 0xDA or length < 2:  # scan data before any frame header: not a valid JPEG
            return None
        offset += 2 + length
    return None


@dataclass(slots=True)
class InflateBudget:
    """What the PDFs of one request may still inflate, together: `pdf_facts` takes at most
    `MAX_INFLATED_BYTES` of it for one PDF and counts what it inflated in `inflated`."""

    left: int = REQUEST_INFLATED_BYTES
    inflated: int = 0
    pages_left: int = REQUEST_INFLATED_BYTES // 2
    """What the object streams, which may hold the pages, may still inflate: apart, so PDFs
    whose content streams spent `left` leave the pages of the next ones countable (two small
    bombs before a 100-page PDF made it unknown: 100k tokens estimated, 160k-478k billed)."""


@dataclass(frozen=True, slots=True)
class PdfFacts:
    pages: int
    content_bytes: int | None
    """Bytes of the page content streams, inflated (None: some could not be read, or were
    not, `over_budget`): an upper bound of the text the pages draw."""
    text_chars: int
    """Characters in the strings the content streams show (inside BT ... ET): the text
    (0 when not asked for, `pdf_facts(text=False)`)."""
    inflated: int = 0
    """Bytes its streams were inflated to, reading it: the work it cost (at most
    `MAX_INFLATED_BYTES` + 1)."""
    over_budget: bool = False
    """Its content streams were not all read: they inflate to more than the budget left, so
    `content_bytes` is None (the estimate then counts its text by page)."""
    content_read: int = 0
    """Bytes of the content streams that were read (inflated), even when `content_bytes` is
    None: a lower bound of what the text shown can be (`text_chars` is never above it)."""


_PAGE = re.compile(rb"/Type\s*+/Page(?![A-Za-z])")
_COUNT = re.compile(rb"/Count\s++(\d++)")
_PAGES_TYPE = re.compile(rb"/Type\s*+/Pages\b")
_COUNT_NEAR = 200
"""A `/Count` is the count of a page tree when a `/Type /Pages` is within this many bytes of
it, before or after, with no `>` between (the same dictionary). Found by two linear scans and
paired by position: a regex that looked for both at once backtracked 200 steps a digit (a
1 MB run of digits after one `/Count` held the GIL 1.4 s; 47 KB, under the event loop's 64 KB,
~100 ms)."""
_STREAM = re.compile(rb">>\s*stream\r?\n")
_HEADER_BYTES = 4096
"""How far before `stream` a stream's dictionary is looked for (from its object's ` obj`)."""
_NOT_CONTENT = re.compile(
    rb"/Subtype\s*/Image|/FontFile|/Length[123]\s|/N\s+\d|/Type\s*/(?:XRef|Metadata|EmbeddedFile|CMap)"
)
_OBJSTM = re.compile(rb"/Type\s*/ObjStm")
_INFLATE_CHUNK = 256 * 1024
_TEXT_OPERATOR = re.compile(rb"\b(BT|ET)\b")
_STRING = re.compile(rb"\(([^()\\]*)\)|(\()|<(?!<)([0-9A-Fa-f\s]*)>")
"""The next string: a literal without parentheses or backslashes inside (whole), the `(` of
any other literal, or a hex string (`<` not `<<`: a dictionary)."""
_LITERAL_STOP = re.compile(
    rb"(?P<pairs>(?:\([^()\\]*\))+)|(?P<open>\(+)|(?P<close>\)+)|(?P<escape>(?:\\.)+|\\)", re.DOTALL
)
"""Inside a literal, the next: balanced parentheses without any inside, `(`s, `)`s or an escape."""
_WHITESPACE = b" \t\n\r\f\v"


def _text_objects(content: bytes) -> list[bytes]:
    """The bodies of BT ... ET text objects, in one pass."""
    out: list[bytes] = []
    start: int | None = None
    for m in _TEXT_OPERATOR.finditer(content):
        if m.group(1) == b"BT" and start is None:
            start = m.end()
        elif m.group(1) == b"ET" and start is not None:
            out.append(content[start : m.start()])
            start = None
    return out


def _shown_chars(content: bytes) -> int:
    """Characters of the literal strings (balanced parentheses, backslash escapes) and hex
    strings in the content's text objects. Regexes jump from one string to the next (a
    string without parentheses or escapes inside in one step) and, inside the others, from
    one run of parentheses or backslash to the next: the bytes between are counted by their
    positions, not one by one."""
    chars = 0
    for body in _text_objects(content):
        i = 0
        while (m := _STRING.search(body, i)) is not None:
            plain, opened, digits = m.groups()
            if plain is not None:
                chars += len(plain)
                i = m.end()
            elif opened is not None:
                shown, i = _literal(body, m.end())
                chars += shown
            else:
                chars += len(digits.translate(None, _WHITESPACE)) // 2
                i = m.end()
    return chars


def _literal(body: bytes, i: int) -> tuple[int, int]:
    """(characters, where it ends) of the literal string opened just before `i`: each byte
    counts one, an escape (a backslash and the byte after it) one, the closing `)` none; an
    unclosed string runs to the end of `body`."""
    depth = 1
    chars = 0
    while (m := _LITERAL_STOP.search(body, i)) is not None:
        j, k = m.span()
        chars += j - i
        kind = m.lastgroup
        if kind == "escape":  # each backslash and the byte after it are one character
            chars += max(1, (k - j) // 2)
            i = max(k, j + 2)
        elif kind == "pairs":  # every byte a character, the depth unchanged
            chars += k - j
            i = k
        elif kind == "open":  # as many as there are: they nest
            depth += k - j
            chars += k - j
            i = k
        elif k - j < depth:  # ')', none closing the string
            depth -= k - j
            chars += k - j
            i = k
        else:  # the depth-th ')' closes it
            return chars + depth - 1, j + depth
    return chars + max(0, len(body) - i), len(body)


class _OverBudget(Exception):
    """A stream inflates to more than what is left of the budget."""


class _Share:
    """One PDF's part of a request's `InflateBudget`: at most `MAX_INFLATED_BYTES` of what
    is left of it."""

    def __init__(self, budget: InflateBudget, *, pages: bool = False) -> None:
        self.budget = budget
        self._pages = pages
        """Draws on `budget.pages_left` (object streams), not `budget.left`."""
        self.room = min(budget.pages_left if pages else budget.left, MAX_INFLATED_BYTES)
        self.spent = 0

    def inflate(self, body: bytes, keep: bool) -> tuple[int, bytes]:
        """(size, the bytes when `keep`) of a FlateDecode stream, inflated a chunk at a
        time and counted as they come, never past the room left: one byte more raises
        _OverBudget (and nothing more is inflated). Raises zlib.error if it is not zlib."""
        inflater = zlib.decompressobj()
        parts: list[bytes] = []
        size = 0
        tail = body
        while not inflater.eof:
            if self.spent > self.room:
                raise _OverBudget
            want = min(_INFLATE_CHUNK, self.room - self.spent + 1)
            out = inflater.decompress(tail, want)
            size += len(out)
            self.spent += len(out)
            self.budget.inflated += len(out)
            if self._pages:
                self.budget.pages_left = max(0, self.budget.pages_left - len(out))
            else:
                self.budget.left = max(0, self.budget.left - len(out))
            if self.spent > self.room:
                raise _OverBudget
            if keep:
                parts.append(out)
            tail = inflater.unconsumed_tail
            if len(out) < want:  # room to spare: all its input read (a truncated stream ends so)
                break
        return size, b"".join(parts)


def _pages(buf: bytes, have: int) -> int:
    """`have` plus the `/Type /Page` objects in `buf`, at most `MAX_PDF_PAGES` (the scan stops
    there: no list of a million matches for 8 MB of `/Type /Page`)."""
    if have >= MAX_PDF_PAGES:
        return have
    for _ in _PAGE.finditer(buf):
        have += 1
        if have >= MAX_PDF_PAGES:
            break
    return have


def _page_counts(raw: bytes) -> list[int]:
    """The `/Count`s of page trees (`_COUNT_NEAR`), each at most `MAX_PDF_PAGES`, in linear time."""
    spans = [m.span() for m in _PAGES_TYPE.finditer(raw)]
    starts = [a for a, _ in spans]
    out: list[int] = []
    for m in _COUNT.finditer(raw):
        i = bisect.bisect_left(starts, m.start())
        if i > 0:  # the nearest /Type /Pages before it
            end = spans[i - 1][1]
            if m.start() - end <= _COUNT_NEAR and raw.find(b">", end, m.start()) < 0:
                out.append(_count(m.group(1)))
                continue
        if i < len(spans):  # the nearest after it
            start = spans[i][0]
            if start - m.end() <= _COUNT_NEAR and raw.find(b">", m.end(), start) < 0:
                out.append(_count(m.group(1)))
        if out and out[-1] >= MAX_PDF_PAGES:  # nothing counts more
            break
    return out


def _count(digits: bytes) -> int:
    """A `/Count`, at most `MAX_PDF_PAGES` (its digits are not converted past that)."""
    return MAX_PDF_PAGES if len(digits) > len(str(MAX_PDF_PAGES)) else min(int(digits), MAX_PDF_PAGES)


def pdf_facts(data: str, budget: InflateBudget | None = None, *, text: bool = True) -> PdfFacts | None:
    """Pages and content-stream bytes of a base64 PDF, or None when it is not a readable PDF
    (or when its object streams, which may hold its pages, do not fit in the budget).

    It inflates at most `MAX_INFLATED_BYTES` of `budget` (by default a budget of its own):
    object streams first (they may hold the pages), then content streams, a chunk at a
    time; images, fonts and the other streams that draw no text are not inflated. When a
    stream does not fit in what is left it stops there: `over_budget`, `content_bytes` None.
    `text`: count the characters shown (`text_chars`; the simulator bills them, admission
    does not need them).
    """
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        return None
    if not raw.startswith(b"%PDF-"):
        return None
    budget = InflateBudget(MAX_INFLATED_BYTES) if budget is None else budget
    share, page_share = _Share(budget), _Share(budget, pages=True)
    pages = _pages(raw, 0)
    object_streams: list[tuple[bytes, bytes]] = []
    contents: list[tuple[bytes, bytes]] = []
    unreadable = False
    pos = 0
    while (m := _STREAM.search(raw, pos)) is not None:
        # its dictionary: from its object's ` obj`, within _HEADER_BYTES and after the last stream
        lo = max(pos, m.start() - _HEADER_BYTES)
        obj = raw.rfind(b" obj", lo, m.start())
        header = raw[obj + 1 if obj >= 0 else lo : m.start()]
        end = raw.find(b"endstream", m.end())
        if end < 0:
            unreadable = True
            break
        pos = end + len(b"endstream")
        if b"/Encrypt" in header:
            unreadable = True
        elif _OBJSTM.search(header):
            object_streams.append((header, raw[m.end() : end]))
        elif not _NOT_CONTENT.search(header):
            contents.append((header, raw[m.end() : end]))
    for header, body in object_streams:
        if b"/FlateDecode" in header:
            try:
                body = page_share.inflate(body, keep=True)[1]
            except zlib.error:
                unreadable = True
                continue
            except _OverBudget:
                return None  # its pages cannot be counted
        elif b"/Filter" in header:
            if not _NOT_CONTENT.search(header):
                unreadable = True
            continue
        pages = _pages(body, pages)
    content = shown = read = 0
    over_budget = False
    for header, body in contents:
        if b"/FlateDecode" in header:
            try:
                size, body = share.inflate(body, keep=text)
            except zlib.error:
                unreadable = True
                continue
            except _OverBudget:
                over_budget = True
                break
            content += size
            read += size
        elif b"/Filter" in header:
            unreadable = True  # another filter: its text cannot be bounded here
            continue
        else:
            content += len(body)
            read += len(body)
        if text:
            shown += _shown_chars(body)
    counted = _page_counts(raw)
    pages = min(MAX_PDF_PAGES, max([pages, *counted]))
    if pages == 0:
        return None
    known = not (unreadable or over_budget or b"/Encrypt" in raw)
    inflated = share.spent + page_share.spent
    return PdfFacts(pages, content if known else None, shown, inflated, over_budget, read)
