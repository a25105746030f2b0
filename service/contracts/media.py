"""What can be known of an image or a PDF sent as base64 in a Messages API content block,
cheaply and without trusting it (admission estimates from it, the simulator bills from it).

- `image_size`: width and height from the header of a PNG, JPEG, GIF or WebP, decoding
  only the few bytes it reads (a JPEG is walked marker by marker, jumping over the
  segments in between), never the whole image.
- `pdf_facts`: the pages of a PDF and an upper bound of the text its pages draw (the bytes
  of its content streams, inflated), with bounded work: at most `MAX_INFLATED_BYTES` are
  inflated, and whatever cannot be read is reported unknown, not guessed low.

Anything malformed answers None (unknown): the caller then reserves its conservative default.
"""

from __future__ import annotations

import base64
import binascii
import re
import zlib
from dataclasses import dataclass

MAX_JPEG_MARKERS = 1_000
MAX_INFLATED_BYTES = 64 * 1024 * 1024
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # start-of-frame markers carry the size


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


@dataclass(frozen=True, slots=True)
class PdfFacts:
    pages: int
    content_bytes: int | None
    """Bytes of the page content streams, inflated (None: some could not be read): an upper
    bound of the text the pages draw."""
    text_chars: int
    """Characters in the strings the content streams show (inside BT ... ET): the text."""


_PAGE = re.compile(rb"/Type\s*/Page(?![A-Za-z])")
_PAGES_COUNT = re.compile(
    rb"/Type\s*/Pages\b[^>]{0,200}?/Count\s+(\d+)|/Count\s+(\d+)[^>]{0,200}?/Type\s*/Pages\b"
)
_STREAM = re.compile(rb">>\s*stream\r?\n")
_HEADER_BYTES = 4096
"""How far before `stream` a stream's dictionary is looked for (from its object's ` obj`)."""
_NOT_CONTENT = re.compile(
    rb"/Subtype\s*/Image|/FontFile|/Length[123]\s|/N\s+\d|/Type\s*/(?:XRef|Metadata|EmbeddedFile|CMap)"
)
_OBJSTM = re.compile(rb"/Type\s*/ObjStm")
_TEXT_OPERATOR = re.compile(rb"\b(BT|ET)\b")
_HEX_STRING = re.compile(rb"<([0-9A-Fa-f\s]*)>")


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
    strings in the content's text objects."""
    chars = 0
    for body in _text_objects(content):
        i, n = 0, len(body)
        while i < n:
            c = body[i]
            if c == 0x28:  # '(': a literal string, parentheses nest
                depth, i = 1, i + 1
                while i < n and depth:
                    c = body[i]
                    if c == 0x5C:  # backslash: the next byte is one character
                        i += 1
                    elif c == 0x28:
                        depth += 1
                    elif c == 0x29:
                        depth -= 1
                        if not depth:
                            break
                    chars += 1
                    i += 1
            elif c == 0x3C and i + 1 < n and body[i + 1] != 0x3C:  # '<' not '<<': a hex string
                m = _HEX_STRING.match(body, i)
                if m is not None:
                    chars += len(re.sub(rb"\s", b"", m.group(1))) // 2
                    i = m.end() - 1
            i += 1
    return chars


def pdf_facts(data: str) -> PdfFacts | None:
    """Pages and content-stream bytes of a base64 PDF, or None when it is not a readable PDF."""
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        return None
    if not raw.startswith(b"%PDF-"):
        return None
    pages = len(_PAGE.findall(raw))
    content = shown = 0
    unreadable = False
    budget = MAX_INFLATED_BYTES
    pos = 0
    while (m := _STREAM.search(raw, pos)) is not None:
        window = raw[max(0, m.start() - _HEADER_BYTES) : m.start()]
        header = window[window.rfind(b" obj") + 1 :]
        end = raw.find(b"endstream", m.end())
        if end < 0:
            unreadable = True
            break
        pos = end + len(b"endstream")
        body = raw[m.end() : end]
        if b"/Encrypt" in header:
            unreadable = True
            continue
        if b"/FlateDecode" in header:
            try:
                inflater = zlib.decompressobj()
                body = inflater.decompress(body, budget)
            except zlib.error:
                unreadable = True
                continue
            budget -= len(body)
            if budget <= 0:
                unreadable = True
                break
        elif b"/Filter" in header:
            if not _NOT_CONTENT.search(header):
                unreadable = True  # another filter: its text cannot be bounded here
            continue
        if _OBJSTM.search(header):
            pages += len(_PAGE.findall(body))
        elif not _NOT_CONTENT.search(header):
            content += len(body)
            shown += _shown_chars(body)
    counted = [int(a or b) for a, b in _PAGES_COUNT.findall(raw)]
    pages = max([pages, *counted])
    if pages == 0:
        return None
    return PdfFacts(pages, None if unreadable or b"/Encrypt" in raw else content, shown)
