"""How far admission's input-token estimate is from what the upstream bills, per kind of content.

The reservation before a call uses a conservative estimate, block by block
(service/admission/estimate.py); settlement refunds the difference. This measures
estimate / billed against the simulator's billing (service/simulator/media.py: text at
~4 characters a token, images by their size after Anthropic's resizing, PDFs by page
image and text, the tool-use system prompt, server tool results), over:

- `text`: English-like prompts, one to six turns;
- `image`: base64 PNG, JPEG and WebP images from thumbnails to 12 MP photos;
- `pdf`: base64 PDFs of 1 to 20 pages, sparse to dense text;
- `tools`: client tool definitions beside a prompt;
- `url_document`, `url_image`, `server_tool`: sizes this side cannot know (reported, not
  held to "never below 1").

Targets (issue 10): p50 over all samples within [1.0, 1.5]; never below 1.0 where the size
is knowable (text, image, pdf, tools).
"""

from __future__ import annotations

import base64
import random
import zlib
from collections.abc import Callable
from typing import Any

import orjson

from service.admission.admit import Admission, Admitted, Record
from service.admission.registry import Registry
from service.config.loader import parse_config
from service.simulator import count_input_tokens

_WORDS = ["the", "of", "and", "to", "in", "a", "is", "that", "for", "it", "as", "was", "with", "be", "by"]
MODELS = ("claude-haiku-4-5", "claude-sonnet-4-5", "claude-opus-4-1")
KNOWABLE = ("text", "image", "pdf", "tools")


def _admission() -> Admission:
    settings = parse_config(
        {"partners": [{"id": "acme", "api_key": {"env": "K"}, "max_request_bytes": 32_000_000}]}
    )
    return Admission(Registry.build(settings, environ={"K": "sk-estimation"}))


def estimate_and_billed(admission: Admission, params: dict[str, Any]) -> tuple[int, int]:
    value = orjson.dumps({"request_id": "r", "params": params})
    verdict = admission.admit(Record("claude.requests.acme", 0, 0, None, b"r", value))
    if not isinstance(verdict, Admitted):
        raise ValueError(f"not admitted: {verdict}")
    return verdict.est_input_tokens, count_input_tokens(params)


def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(n))


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


IMAGE_SIZES: tuple[tuple[int, int], ...] = (
    (320, 240),
    (800, 600),
    (1024, 768),
    (1092, 1092),
    (1920, 1080),
    (4032, 3024),
)
"""Width x height of the images `image_block` makes: thumbnails to 12 MP photos."""
MAX_PDF_PAGES = 20


def image_block(rng: random.Random, max_size: tuple[int, int] | None = None) -> dict[str, Any]:
    """A base64 PNG, JPEG or WebP image block of one of `IMAGE_SIZES` (of those at most
    `max_size` wide and high, when given), its bytes about as many as a compressed image's."""
    sizes = IMAGE_SIZES
    if max_size is not None:
        sizes = tuple((w, h) for w, h in IMAGE_SIZES if w <= max_size[0] and h <= max_size[1])
        if not sizes:
            raise ValueError(f"no image size within {max_size}: {IMAGE_SIZES}")
    w, h = rng.choice(sizes)
    body = bytes(rng.getrandbits(8) for _ in range(64)) * (w * h // 200)  # ~ a compressed image
    kind = rng.choice(["png", "jpeg", "webp"])
    if kind == "png":
        ihdr = b"\x00\x00\x00\rIHDR" + w.to_bytes(4, "big") + h.to_bytes(4, "big") + b"\x08\x02\x00\x00\x00"
        raw, media = b"\x89PNG\r\n\x1a\n" + ihdr + b"\x00" * 4 + body, "image/png"
    elif kind == "jpeg":
        sof = b"\xff\xc0" + (17).to_bytes(2, "big") + b"\x08" + h.to_bytes(2, "big") + w.to_bytes(2, "big")
        app1 = b"\xff\xe1" + (4002).to_bytes(2, "big") + b"E" * 4000
        raw, media = b"\xff\xd8" + app1 + sof + b"\x00" * 10 + b"\xff\xda" + body, "image/jpeg"
    else:
        vp8x = b"VP8X" + (10).to_bytes(4, "little") + b"\x00" * 4
        size = (w - 1).to_bytes(3, "little") + (h - 1).to_bytes(3, "little")
        raw, media = (
            b"RIFF" + (len(body) + 30).to_bytes(4, "little") + b"WEBP" + vp8x + size + body,
            "image/webp",
        )
    return {"type": "image", "source": {"type": "base64", "media_type": media, "data": _b64(raw)}}


def pdf_block(rng: random.Random, max_pages: int = MAX_PDF_PAGES) -> dict[str, Any]:
    """A base64 PDF document block of 1 to `max_pages` pages, sparse to dense text."""
    pages = rng.randint(1, max_pages)
    objs = [b"<< /Type /Catalog /Pages 2 0 R >>"]
    kids = " ".join(f"{3 + 2 * i} 0 R" for i in range(pages))
    objs.append(f"<< /Type /Pages /Kids [{kids}] /Count {pages} >>".encode())
    density = rng.choice([5, 20, 45])  # lines a page: a slide, a letter, a dense report
    for i in range(pages):
        lines = [_words(rng, rng.randint(6, 14)) for _ in range(rng.randint(1, density))]
        content = b"".join(
            b"BT /F1 11 Tf 72 %d Td (%s) Tj ET\n" % (760 - 15 * k, ln.encode()) for k, ln in enumerate(lines)
        )
        objs.append(
            f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents {4 + 2 * i} 0 R >>".encode()
        )
        data = zlib.compress(content)
        objs.append(b"<< /Length %d /Filter /FlateDecode >>\nstream\n" % len(data) + data + b"\nendstream")
    out = b"%PDF-1.5\n" + b"".join(b"%d 0 obj\n" % (n + 1) + o + b"\nendobj\n" for n, o in enumerate(objs))
    raw = out + b"trailer\n<< /Root 1 0 R >>\n%%EOF\n"
    return {
        "type": "document",
        "source": {"type": "base64", "media_type": "application/pdf", "data": _b64(raw)},
    }


def _params(rng: random.Random, content: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {
        "model": rng.choice(MODELS),
        "max_tokens": 64,
        "messages": [{"role": "user", "content": content}],
        **extra,
    }


def _question(rng: random.Random) -> dict[str, Any]:
    return {"type": "text", "text": _words(rng, rng.randint(5, 40))}


def _text(rng: random.Random) -> dict[str, Any]:
    turns = [_words(rng, rng.randint(3, 400)) for _ in range(rng.randint(1, 6))]
    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]
    if len(messages) % 2 == 0:
        messages.append({"role": "user", "content": _words(rng, 10)})
    return {"model": rng.choice(MODELS), "max_tokens": 64, "messages": messages}


def tool_definitions(rng: random.Random) -> list[dict[str, Any]]:
    """One to eight client tool definitions (`params.tools`)."""
    return [
        {
            "name": f"tool_{i}",
            "description": _words(rng, rng.randint(5, 60)),
            "input_schema": {"type": "object", "properties": {f"p{j}": {"type": "string"} for j in range(4)}},
        }
        for i in range(rng.randint(1, 8))
    ]


def _tools(rng: random.Random) -> dict[str, Any]:
    tools = tool_definitions(rng)
    return _params(rng, [_question(rng)], tools=tools)


def _server_tool(rng: random.Random) -> dict[str, Any]:
    tool = rng.choice(
        [
            {"type": "web_search_20250305", "name": "web_search", "max_uses": 1},
            {"type": "web_fetch_20250910", "name": "web_fetch", "max_uses": 1, "max_content_tokens": 20_000},
        ]
    )
    return _params(rng, [_question(rng)], tools=[tool])


def _url(kind: str) -> Callable[[random.Random], dict[str, Any]]:
    def make(rng: random.Random) -> dict[str, Any]:
        url = f"https://files.example.com/{rng.getrandbits(64):x}.{'pdf' if kind == 'document' else 'jpg'}"
        return _params(rng, [{"type": kind, "source": {"type": "url", "url": url}}, _question(rng)])

    return make


KINDS: dict[str, Callable[[random.Random], dict[str, Any]]] = {
    "text": _text,
    "image": lambda rng: _params(
        rng, [image_block(rng) for _ in range(rng.randint(1, 3))] + [_question(rng)]
    ),
    "pdf": lambda rng: _params(rng, [pdf_block(rng), _question(rng)]),
    "tools": _tools,
    "url_document": _url("document"),
    "url_image": _url("image"),
    "server_tool": _server_tool,
}


def _quantiles(ratios: list[float]) -> dict[str, float]:
    ratios = sorted(ratios)
    return {
        "min": round(ratios[0], 3),
        "p50": round(ratios[len(ratios) // 2], 3),
        "p99": round(ratios[int(len(ratios) * 0.99)], 3),
        "max": round(ratios[-1], 3),
    }


def estimation_error(
    samples: int = 2000, seed: int = 7, kinds: tuple[str, ...] = ("text",)
) -> dict[str, float]:
    """Quantiles of estimate / billed input tokens over `samples` requests of `kinds`."""
    rng = random.Random(seed)
    admission = _admission()
    ratios = []
    for i in range(samples):
        est, billed = estimate_and_billed(admission, KINDS[kinds[i % len(kinds)]](rng))
        ratios.append(est / billed)
    return _quantiles(ratios)


def run() -> dict[str, Any]:
    per_kind = {kind: estimation_error(300, seed=11 + i, kinds=(kind,)) for i, kind in enumerate(KINDS)}
    overall = estimation_error(300 * len(KINDS), seed=7, kinds=tuple(KINDS))
    knowable_min = min(per_kind[k]["min"] for k in KNOWABLE)
    return {
        "bench": "estimation",
        "estimate_over_billed": overall,
        "estimate_over_billed_by_kind": per_kind,
        "estimate_over_billed_knowable_min": knowable_min,
        "input_estimate_over_billed": per_kind["text"],
        "conservative": knowable_min >= 1.0,
        "samples": 300 * len(KINDS),
        "targets_met": {
            "estimate_over_billed_p50": 1.0 <= overall["p50"] <= 1.5,
            "estimate_never_below_billed_where_knowable": knowable_min >= 1.0,
        },
    }
