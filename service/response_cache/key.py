"""The cache key: SHA-256 over canonical JSON of the format version, the scope and the params.

Canonical: orjson with sorted keys (at every depth) and no whitespace, over the params as
admitted (after `max_tokens_policy: clamp`), so key order and spacing in the partner's JSON
never matter, and any other change to a param (a word, a number, a tool, `1` for `1.0`)
gives another key. When unsure whether a param changes the answer, it is in the key.

Left out (`EXCLUDED_PARAMS`), because they do not change the answer:

- `stream`: how an answer is delivered, not what it is (the gateway refuses it anyway);
- `metadata`: Anthropic's `metadata.user_id`, an opaque end-user id for abuse detection.
  The answer is a function of the prompt, not of who asked; a partner that wants answers
  kept per end user puts the user in the prompt, or leaves the cache off.

The request's own `metadata` (beside `params`) is not a param at all: it is echoed from the
request being answered, never from the one that filled the cache.

Everything else is in: `model`, `messages`, `system`, `max_tokens` (a shorter limit may cut
the answer), `stop_sequences`, `tools`, `tool_choice`, `thinking`, `output_config`,
`cache_control` (top level and in blocks), `container`, `service_tier`, `speed`,
`inference_geo`, `workspace_id`, `user_profile_id`, `diagnostics`.

The scope makes a partner's entries its own: `partner:<id>`, or `shared:<a>,<b>` for a
partner in a `response_cache.share` group (ids sorted, so every member computes the same).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import orjson

CACHE_FORMAT = 1
"""Bumped when what an entry holds, or what goes into the key, changes: old entries are then
never read again (they expire or are evicted)."""
EXCLUDED_PARAMS = frozenset({"stream", "metadata"})


def scope_of(partner_id: str, share: Sequence[Sequence[str]]) -> str:
    """Whose entries `partner_id` reads and writes: its own, or its sharing group's."""
    for group in share:
        if partner_id in group:
            return "shared:" + ",".join(sorted(set(group)))
    return f"partner:{partner_id}"


def canonical(scope: str, params: Mapping[str, Any]) -> bytes:
    """The bytes the key digests (exposed for tests and for explaining a key)."""
    kept = {k: v for k, v in params.items() if k not in EXCLUDED_PARAMS}
    return orjson.dumps({"format": CACHE_FORMAT, "scope": scope, "params": kept}, option=orjson.OPT_SORT_KEYS)


def cache_key(scope: str, params: Mapping[str, Any]) -> str:
    """The entry's key: 64 hex digits."""
    return hashlib.sha256(canonical(scope, params)).hexdigest()
