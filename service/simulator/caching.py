"""Prompt caching, as Anthropic bills it, so cost accounting can be tested end to end.

- The prompt is read in the order Claude caches it: `tools`, then `system`, then each message's
  content blocks (a string content is one block). A block with `cache_control` (`ttl` "5m",
  the default, or "1h") is a breakpoint; a top-level `cache_control` (automatic caching) puts
  one on the last block of the prompt.
- A prefix is identified by its content (the blocks with their `cache_control` left out) and
  the model, in one cache for the whole simulated organisation. A request reads the longest
  cached prefix ending at a breakpoint or at one of the 20 blocks before one (Anthropic's
  lookback), and writes each later breakpoint's prefix, billed at that breakpoint's TTL.
- A prefix shorter than `MIN_CACHEABLE_TOKENS` is not cached (Anthropic: 1,024 tokens on most
  models); a read refreshes the entry's lifetime; an entry is readable only once the call that
  wrote it was billed (`PromptCache.commit`), so two identical requests at once both write.
- Prefix tokens follow the counting rule of `tokens.py` over the prefix's blocks (tools by
  their JSON), never more than the request's whole input, of which they are a part:
  `input_tokens` is what is left after the reads and writes.

`usage` then reports `cache_read_input_tokens`, `cache_creation_input_tokens` and their
split `cache_creation.ephemeral_5m_input_tokens` / `ephemeral_1h_input_tokens`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from service.contracts.media import InflateBudget
from service.simulator.tokens import CHARS_PER_TOKEN, MESSAGE_OVERHEAD_TOKENS, block_chars

MIN_CACHEABLE_TOKENS = 1_024
LOOKBACK_BLOCKS = 20
TTL_S = {"5m": 300.0, "1h": 3_600.0}
MAX_ENTRIES = 100_000


@dataclass(frozen=True, slots=True)
class CacheUse:
    """What one request reads from and writes to the cache (tokens)."""

    read: int = 0
    write_5m: int = 0
    write_1h: int = 0
    writes: tuple[tuple[bytes, float], ...] = field(default=(), repr=False)
    """(key, lifetime in seconds) of the prefixes written, and of the one read (refreshed)."""

    @property
    def written(self) -> int:
        return self.write_5m + self.write_1h


NO_CACHE = CacheUse()


@dataclass(frozen=True, slots=True)
class _Point:
    key: bytes
    tokens: int
    """Tokens of the prompt up to and including this block."""
    ttl: str | None
    """The block's `cache_control` TTL when it is a breakpoint."""


def _ttl(cache_control: Any) -> str | None:
    if not isinstance(cache_control, Mapping):
        return None
    ttl = cache_control.get("ttl")
    return ttl if ttl in TTL_S else "5m"


def _blocks(body: Mapping[str, Any]) -> Iterator[tuple[bytes, Any, bool]]:
    """(segment tag, block, starts a message) in cache order."""
    tools = body.get("tools")
    for tool in tools if isinstance(tools, list) else ():
        yield b"tool", tool, False
    system = body.get("system")
    if isinstance(system, str):
        yield b"system", {"type": "text", "text": system}, False
    elif isinstance(system, list):
        for block in system:
            yield b"system", block, False
    for message in body.get("messages") or ():
        if not isinstance(message, Mapping):
            continue
        role = str(message.get("role")).encode()
        content = message.get("content")
        blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content or []
        for i, block in enumerate(blocks):
            yield role, block, i == 0


def _points(body: Mapping[str, Any], model: str, total_tokens: int) -> list[_Point]:
    """Every block boundary of the prompt: its prefix key, tokens and breakpoint TTL."""
    digest = hashlib.sha256(model.encode())
    chars = flat = messages = 0
    budget = InflateBudget()  # the PDFs are read as `count_input_tokens` reads them: together
    points: list[_Point] = []
    for tag, block, starts_message in _blocks(body):
        plain = block
        if isinstance(block, Mapping) and "cache_control" in block:
            plain = {k: v for k, v in block.items() if k != "cache_control"}
        digest.update(tag + b"\0" + orjson.dumps(plain, option=orjson.OPT_SORT_KEYS) + b"\0")
        if tag == b"tool":
            chars += len(orjson.dumps(block))
        else:
            c, f = block_chars(block, model, budget)
            chars, flat = chars + c, flat + f
        messages += starts_message
        tokens = -(-chars // CHARS_PER_TOKEN) + flat + MESSAGE_OVERHEAD_TOKENS * messages
        ttl = _ttl(block.get("cache_control")) if isinstance(block, Mapping) else None
        points.append(_Point(digest.digest(), min(tokens, total_tokens), ttl))
    automatic = _ttl(body.get("cache_control"))
    if automatic is not None and points and points[-1].ttl is None:
        last = points[-1]
        points[-1] = _Point(last.key, last.tokens, automatic)
    return points


class PromptCache:
    """One simulated organisation's prompt cache: prefix key -> (expires at, lifetime)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._entries: dict[bytes, tuple[float, float]] = {}

    def plan(self, model: str, body: Mapping[str, Any], total_tokens: int) -> CacheUse:
        """What `body` would read and write now (nothing is stored until `commit`)."""
        if not _asks_for_caching(body):
            return NO_CACHE
        points = _points(body, model, total_tokens)
        breakpoints = [i for i, p in enumerate(points) if p.ttl is not None]
        if not breakpoints:
            return NO_CACHE
        now = self._clock()
        candidates = sorted({j for i in breakpoints for j in range(max(0, i - LOOKBACK_BLOCKS), i + 1)})
        hit = -1
        for j in reversed(candidates):
            entry = self._entries.get(points[j].key)
            if entry is not None and entry[0] > now and points[j].tokens >= MIN_CACHEABLE_TOKENS:
                hit = j
                break
        read = points[hit].tokens if hit >= 0 else 0
        writes: list[tuple[bytes, float]] = []
        if hit >= 0:
            writes.append((points[hit].key, self._entries[points[hit].key][1]))
        done, split = read, {"5m": 0, "1h": 0}
        for i in breakpoints:
            p = points[i]
            if i <= hit or p.tokens < MIN_CACHEABLE_TOKENS or p.tokens <= done:
                continue
            assert p.ttl is not None
            split[p.ttl] += p.tokens - done
            done = p.tokens
            writes.append((p.key, TTL_S[p.ttl]))
        return CacheUse(read, split["5m"], split["1h"], tuple(writes))

    def commit(self, use: CacheUse) -> None:
        """The call was billed: its written prefixes become readable, the one read is refreshed."""
        if not use.writes:
            return
        now = self._clock()
        for key, lifetime in use.writes:
            self._entries.pop(key, None)  # re-inserted last: the oldest entries come first
            self._entries[key] = (now + lifetime, lifetime)
        if len(self._entries) > MAX_ENTRIES:
            self._entries = {k: v for k, v in self._entries.items() if v[0] > now}
            while len(self._entries) > MAX_ENTRIES:
                del self._entries[next(iter(self._entries))]

    def clear(self) -> None:
        self._entries.clear()


def _asks_for_caching(body: Mapping[str, Any]) -> bool:
    """Whether the request sets any `cache_control` (most do not: they cost no hashing)."""
    return body.get("cache_control") is not None or any(
        isinstance(block, Mapping) and block.get("cache_control") is not None for _, block, _ in _blocks(body)
    )
