"""How many input tokens a request will be billed, estimated before the call, block by block.

The estimate is what the limiter reserves in ITPM and what the budget reserves before a
call; settlement then replaces it with the billed `usage`. It must not undercount what can
be known (a 429, a budget overrun), nor overcount by orders of magnitude (false
`budget_exhausted`, an ITPM queue stalled by reservations that never bill).

- Text (strings, `text` and `thinking` blocks, tool inputs and results, the system prompt)
  counts its UTF-8 bytes over `runtime.estimate_chars_per_token` (3: below the ~4
  characters a token of English text, and a token per character for CJK).
- An image costs about width x height / 750 tokens once scaled down to fit the model's
  limits (long edge `image_max_long_edge_px`, at most `image_max_tokens`; larger on
  `high_res_models`), as Anthropic documents. The size is read from the base64 header
  (`service/contracts/media.py`); an image given by URL or file id, or unreadable, counts the most an image
  can cost on that model, which is an upper bound.
- A PDF counts its pages (each also billed as an image at the model's largest size) and
  the text its content streams can draw; a PDF whose streams cannot be read counts
  `document_page_text_tokens` a page; a document whose size cannot be known here (URL,
  file id, unreadable) counts `unknown_document_tokens`. The PDFs of a request share one
  inflate budget (`media.InflateBudget`: 8 MB, 4 MB a PDF): a PDF whose content streams
  inflate past it (a zip bomb) is not read further and counts `document_page_text_tokens`
  a page, as one that cannot be read.
- Tools count their definitions and the system prompt Anthropic adds for them; a server
  tool (web search, web fetch, code execution) counts `max_uses` (else
  `server_tool_uses`; at most `server_tool_max_uses`) uses of `server_tool_tokens_per_use`
  (or `max_content_tokens`).
- Every message adds a few tokens of framing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import orjson

from service.config.settings import EstimateSettings
from service.contracts.media import InflateBudget, image_size, pdf_facts

MESSAGE_TOKENS = 4
"""Framing per message (role and separators)."""
_SERVER_TOOLS = ("web_search", "web_fetch", "code_execution")
MAX_CONTENT_TOKENS = 1_000_000
"""The most one server tool use is counted as, whatever its `max_content_tokens`: what it brings
back is read into the context, and no model's context holds more."""


class _Estimator:
    def __init__(self, settings: EstimateSettings, chars_per_token: float, model: str) -> None:
        self.s = settings
        self.cpt = chars_per_token
        high = any(m in model for m in settings.high_res_models)
        self.max_edge = settings.high_res_max_long_edge_px if high else settings.image_max_long_edge_px
        self.max_image = settings.high_res_max_tokens if high else settings.image_max_tokens
        self.pdf_budget = InflateBudget()
        """What the request's PDFs may still inflate, together."""

    def text(self, value: str) -> int:
        return math.ceil(len(value.encode("utf-8", "surrogatepass")) / self.cpt)

    def json(self, value: Any) -> int:
        return math.ceil(len(orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS)) / self.cpt)

    def content(self, content: Any) -> int:
        if content is None:
            return 0
        if isinstance(content, str):
            return self.text(content)
        if isinstance(content, list):
            return sum(self.block(b) for b in content)
        return self.json(content)

    def block(self, block: Any) -> int:
        if not isinstance(block, Mapping):
            return self.json(block)
        kind = block.get("type")
        if kind == "text" and isinstance(block.get("text"), str):
            return self.text(block["text"]) + self.json(block.get("citations") or [])
        if kind == "image":
            return self.image(block.get("source"))
        if kind == "document":
            return self.document(block)
        if kind == "tool_result":
            return self.content(block.get("content")) + MESSAGE_TOKENS
        return self.json(block)

    def image(self, source: Any) -> int:
        if (
            isinstance(source, Mapping)
            and source.get("type") == "base64"
            and isinstance(source.get("data"), str)
        ):
            size = image_size(source["data"])
            if size is not None:
                return self.image_tokens(*size)
        return self.max_image

    def image_tokens(self, width: int, height: int) -> int:
        """Anthropic's rule: scale down to fit the long edge and the token cap, then w*h/750."""
        w, h = float(width), float(height)
        long_edge = max(w, h)
        if long_edge > self.max_edge:
            w, h = w * self.max_edge / long_edge, h * self.max_edge / long_edge
        return max(1, min(self.max_image, math.ceil(w * h / 750)))

    def document(self, block: Mapping[str, Any]) -> int:
        extra = self.text(str(block.get("title") or "")) + self.text(str(block.get("context") or ""))
        source = block.get("source")
        if not isinstance(source, Mapping):
            return extra + self.s.unknown_document_tokens
        kind = source.get("type")
        data = source.get("data")
        if kind == "text" and isinstance(data, str):
            return extra + self.text(data)
        if kind == "content":
            return extra + self.content(source.get("content"))
        if kind == "base64" and isinstance(data, str):
            facts = pdf_facts(data, self.pdf_budget, text=False)
            if facts is not None:
                if facts.content_bytes is None:  # not all read: by page, but never below what was
                    text = max(
                        facts.pages * self.s.document_page_text_tokens,
                        math.ceil(facts.content_read / self.cpt),
                    )
                else:
                    text = math.ceil(facts.content_bytes / self.cpt)
                return extra + facts.pages * self.max_image + text
            # not a PDF that can be read: the simulator bills such a block by its JSON
            return extra + max(self.s.unknown_document_tokens, self.json(block))
        return extra + self.s.unknown_document_tokens

    def tools(self, tools: Any) -> int:
        if not isinstance(tools, list) or not tools:
            return 0
        total = self.s.tool_overhead_tokens
        for tool in tools:
            total += self.json(tool)
            kind = tool.get("type") if isinstance(tool, Mapping) else None
            if isinstance(kind, str) and kind.startswith(_SERVER_TOOLS):
                assert isinstance(tool, Mapping)
                asked = _positive_int(tool.get("max_uses")) or self.s.server_tool_uses
                uses = min(asked, self.s.server_tool_max_uses)
                per_use = min(
                    _positive_int(tool.get("max_content_tokens")) or self.s.server_tool_tokens_per_use,
                    MAX_CONTENT_TOKENS,  # the sender's number: 2**63-1 made an estimate of 4.6e19
                )
                total += uses * per_use
        return total


def _positive_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def estimate_input_tokens(
    params: Mapping[str, Any], settings: EstimateSettings, chars_per_token: float
) -> int:
    """The input tokens `params` (a Messages API request body) is expected to bill, at most."""
    e = _Estimator(settings, chars_per_token, str(params.get("model") or ""))
    total = e.content(params.get("system")) + e.tools(params.get("tools"))
    messages = params.get("messages")
    if isinstance(messages, list):
        for message in messages:
            total += MESSAGE_TOKENS
            if isinstance(message, Mapping):
                total += e.content(message.get("content"))
            else:
                total += e.json(message)
    return max(1, total)
