"""What the simulator bills for images, documents and tools, as Anthropic documents them.

- An image is scaled down, keeping its aspect ratio, until its long edge is at most 1568
  pixels and it costs at most 1,600 tokens (2576 pixels and 4,784 tokens on the
  high-resolution models), then costs ceil(width x height / 750) tokens. A base64 image's
  size is read from its header; an image by URL or file id gets a size drawn from its URL
  (the simulator fetches nothing), one of a few common photo and screenshot sizes.
- A PDF is billed per page: the page as an image at the largest size (the cap), plus the
  text its content streams show at four characters a token. A document by URL or file id
  gets a page count drawn from its URL (1 to 60 pages of 1,500 text tokens).
- Tools add the system prompt Anthropic adds for them (346 tokens with `tool_choice`
  auto or none, 313 with any or tool). Each server tool use (one per `web_search` or
  `web_fetch` tool, as `usage.server_tool_use` reports) adds the results it brought:
  8,000 to 20,000 tokens for a search, 3,000 to 30,000 (at most `max_content_tokens`) for
  a fetched page, drawn from the request's text.

Draws are deterministic (a hash of the request's own bytes), so a request costs the same
every time and `count_tokens` agrees with `usage`.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from typing import Any

from service.contracts.media import InflateBudget, image_size, pdf_facts

HIGH_RES_MODELS = ("opus-4-7", "opus-4-8")
URL_IMAGE_SIZES = ((640, 480), (1024, 768), (1280, 720), (1920, 1080), (4032, 3024), (512, 512))
URL_DOCUMENT_PAGE_TEXT_TOKENS = 1_500
TOOL_PROMPT_TOKENS = {"auto": 346, "none": 346, "any": 313, "tool": 313}


def _caps(model: str) -> tuple[int, int]:
    """(long edge in pixels, tokens) an image is scaled down to fit on `model`."""
    return (2576, 4784) if any(m in model for m in HIGH_RES_MODELS) else (1568, 1600)


def _draw(seed: str, n: int) -> int:
    """A deterministic number in [0, n) from `seed`."""
    return int.from_bytes(hashlib.sha256(seed.encode("utf-8", "surrogatepass")).digest()[:8], "big") % n


def image_tokens(width: int, height: int, model: str) -> int:
    max_edge, max_tokens = _caps(model)
    w, h = float(width), float(height)
    if max(w, h) > max_edge:
        scale = max_edge / max(w, h)
        w, h = w * scale, h * scale
    return max(1, min(max_tokens, math.ceil(w * h / 750)))


def image_source_tokens(source: Any, model: str) -> int:
    if isinstance(source, Mapping):
        kind, data = source.get("type"), source.get("data")
        if kind == "base64" and isinstance(data, str):
            size = image_size(data)
            if size is not None:
                return image_tokens(*size, model)
        elif kind in ("url", "file"):
            ref = str(source.get("url") or source.get("file_id") or "")
            return image_tokens(*URL_IMAGE_SIZES[_draw(ref, len(URL_IMAGE_SIZES))], model)
    return _caps(model)[1]


def pdf_tokens(source: Mapping[str, Any], model: str, budget: InflateBudget | None = None) -> int | None:
    """Tokens of a document source that is a PDF (base64, URL or file), or None if it is not one.
    `budget`: what the request's PDFs may still inflate, together (as admission reads them)."""
    kind = source.get("type")
    page_image = _caps(model)[1]
    if kind == "base64" and isinstance(source.get("data"), str):
        facts = pdf_facts(source["data"], budget)
        if facts is None:
            return None
        return facts.pages * page_image + math.ceil(facts.text_chars / 4)
    if kind in ("url", "file"):
        ref = str(source.get("url") or source.get("file_id") or "")
        pages = 1 + _draw(ref, 60)
        return pages * (page_image + URL_DOCUMENT_PAGE_TEXT_TOKENS)
    return None


def tool_tokens(body: Mapping[str, Any], seed: str) -> int:
    """The tool-use system prompt and the results of server tool uses."""
    tools = body.get("tools")
    if not isinstance(tools, list) or not tools:
        return 0
    choice = body.get("tool_choice")
    kind = choice.get("type") if isinstance(choice, Mapping) else "auto"
    total = TOOL_PROMPT_TOKENS.get(str(kind), 346)
    for i, tool in enumerate(tools):
        if not isinstance(tool, Mapping) or tool.get("max_uses") == 0:
            continue
        name = str(tool.get("type") or "")
        if name.startswith("web_search_"):
            total += 8_000 + _draw(f"{seed}:{i}", 12_001)
        elif name.startswith("web_fetch_"):
            most = tool.get("max_content_tokens")
            drawn = 3_000 + _draw(f"{seed}:{i}", 27_001)
            total += min(drawn, most) if isinstance(most, int) and most > 0 else drawn
    return total
