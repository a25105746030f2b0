"""The `usage` object of a simulated answer: tokens, and how the request was served.

- `service_tier`: `standard`, or `priority` when the request says `service_tier: auto` and the
  simulated organisation has Priority Tier capacity (`priority_tier: true` in the config);
  `standard_only` is always `standard`; `batch` for an entry of a Message Batch.
- `speed`: the request's `speed` (`fast` or `standard`), `standard` when it has none.
- `inference_geo`: the request's `inference_geo`, when it has one.
- `server_tool_use`: one web search per `web_search` tool and one web fetch per `web_fetch`
  tool offered (never more than a tool's `max_uses`), so cost accounting can be tested.
- prompt caching (`caching.py`): of the request's input tokens, those read from the cache are
  `cache_read_input_tokens`, those written `cache_creation_input_tokens` (split by TTL in
  `cache_creation`), and the rest `input_tokens`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from service.simulator.caching import NO_CACHE, CacheUse


def _server_tool_use(tools: Any) -> dict[str, int]:
    counts = {"web_search_requests": 0, "web_fetch_requests": 0}
    for tool in tools if isinstance(tools, list) else ():
        kind = tool.get("type") if isinstance(tool, Mapping) else None
        for family in ("web_search", "web_fetch"):
            if isinstance(kind, str) and kind.startswith(family + "_"):
                uses = tool.get("max_uses")
                counts[f"{family}_requests"] += 1 if uses is None else min(1, uses)
    return counts


def usage_of(
    body: Mapping[str, Any],
    input_tokens: int,
    output_tokens: int,
    *,
    priority_tier: bool = False,
    batch: bool = False,
    cache: CacheUse = NO_CACHE,
) -> dict[str, Any]:
    """`usage` for a validated `/v1/messages` body that was answered (`batch`: as a batch
    entry); `input_tokens` is the whole prompt, `cache` what of it was read from and written
    to the prompt cache."""
    if batch:
        tier = "batch"
    else:
        tier = "priority" if priority_tier and body.get("service_tier") == "auto" else "standard"
    usage: dict[str, Any] = {
        "input_tokens": input_tokens - cache.read - cache.written,
        "output_tokens": output_tokens,
        "cache_creation_input_tokens": cache.written,
        "cache_read_input_tokens": cache.read,
        "cache_creation": {
            "ephemeral_5m_input_tokens": cache.write_5m,
            "ephemeral_1h_input_tokens": cache.write_1h,
        },
        "service_tier": tier,
        "speed": body.get("speed") or "standard",
    }
    if body.get("inference_geo"):
        usage["inference_geo"] = body["inference_geo"]
    tools = _server_tool_use(body.get("tools"))
    if any(tools.values()):
        usage["server_tool_use"] = tools
    return usage
