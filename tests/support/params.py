"""Ordinary values for every field of the request contract's `params`, as a partner writes them,
and one minimal instance of every tool and every user content block the SDK types.

The minimal instances are shapes for schema checks; what is sent to the simulator (or Claude)
goes through `tool_groups` and `every_block_conversation`, which the real API takes: tool names
unique within a request, each block in the turn it belongs to, a `tool_result` answering the
`tool_use` just before it, an image whose bytes are the image its `media_type` says.

`SAMPLES` must cover every field the schema admits (tests/unit/test_request_contract.py checks
it), so a new SDK field needs a sample here before the suite passes.
"""

from __future__ import annotations

import base64
import copy
from typing import Any

from service.contracts.params import params_schema
from service.contracts.sdk_schema import definitions

MODEL = "claude-haiku-4-5"  # not deprecated in the installed SDK (it warns on deprecated ones)
BASE: dict[str, Any] = {"model": MODEL, "max_tokens": 64, "messages": [{"role": "user", "content": "Hello"}]}

SAMPLES: dict[str, Any] = {
    "model": MODEL,
    "max_tokens": 64,
    "messages": [
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": [{"type": "text", "text": "And 3 + 3?"}]},
    ],
    "cache_control": {"type": "ephemeral", "ttl": "5m"},
    "container": "container_011CZkZaBF1tNoB5wlCeusgy",
    "diagnostics": {"previous_message_id": None},
    "inference_geo": "us",
    "metadata": {"user_id": "user-42"},
    "output_config": {"effort": "low"},
    "service_tier": "standard_only",
    "speed": "fast",
    "stop_sequences": ["\n\nEND"],
    "system": [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
    "thinking": {"type": "adaptive"},
    "tool_choice": {"type": "auto"},
    "tools": [
        {
            "name": "get_weather",
            "description": "Weather in a city",
            "input_schema": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        }
    ],
    "user_profile_id": "uprof_011CZkZaBF1tNoB5wlCeusgy",
    "workspace_id": "wrkspc_011CZkZaBF1tNoB5wlCeusgy",
}


def with_field(name: str, value: Any = ...) -> dict[str, Any]:
    """`BASE` plus one field (its sample unless `value` is given)."""
    params = copy.deepcopy(BASE)
    params[name] = copy.deepcopy(SAMPLES[name] if value is ... else value)
    return params


def admitted_fields() -> set[str]:
    return set(params_schema()["properties"])


def minimal(schema: dict[str, Any]) -> Any:
    """The smallest value `schema` (of the generated contract) takes: required keys only, the
    first enum value, the first member of a union, one item per array."""
    defs = definitions()
    while "$ref" in schema:
        schema = defs[schema["$ref"].rsplit("/", 1)[-1]]
    if "enum" in schema:
        return next(v for v in schema["enum"] if v is not None)
    if "anyOf" in schema:
        return minimal(next(s for s in schema["anyOf"] if s.get("type") != "null"))
    if "allOf" in schema:  # a tagged union: its first member
        return minimal(schema["allOf"][0]["then"])
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next(k for k in kind if k != "null")
    if kind == "object":
        props = schema.get("properties", {})
        return {k: minimal(props[k]) for k in schema.get("required", [])}
    if kind == "array":
        return [minimal(schema["items"])] if "items" in schema else []
    return {"string": "x", "integer": 1, "number": 1, "boolean": False, "null": None}.get(kind, {})


def members(union: str) -> list[dict[str, Any]]:
    """A minimal instance of each member of the tagged union definition `union`."""
    return [minimal(branch["then"]) for branch in definitions()[union]["allOf"]]


def union_of(field_schema: dict[str, Any]) -> str:
    """The tagged-union definition the items of an array field refer to."""
    return str(field_schema["items"]["$ref"].rsplit("/", 1)[-1])


def tool_variants() -> list[dict[str, Any]]:
    return members(union_of(params_schema()["properties"]["tools"]))


def user_block_variants() -> list[dict[str, Any]]:
    content = definitions()["UserMessageParam"]["properties"]["content"]
    return members(union_of(content))


def tool_groups(tools: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """`tools` in as few lists as hold each name once, in order: the API refuses a request whose
    tools share a name ("tools: Tool names must be unique."), as the versions of one server tool
    (`web_search_20250305`, `web_search_20260209`, ...) do."""
    groups: list[list[dict[str, Any]]] = []
    for tool in tools:
        name = tool.get("name")
        free = (g for g in groups if name is None or all(t.get("name") != name for t in g))
        group = next(free, None)
        if group is None:
            group = []
            groups.append(group)
        group.append(tool)
    return groups


TINY_PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
"""A 1x1 PNG, base64."""
TINY_PDF = base64.b64encode(
    b"%PDF-1.4\n1 0 obj\n<< /Type /Catalog /Pages 2 0 R >>\nendobj\n"
    b"2 0 obj\n<< /Type /Pages /Kids [3 0 R] /Count 1 >>\nendobj\n"
    b"3 0 obj\n<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] >>\nendobj\n"
    b"trailer\n<< /Root 1 0 R >>\n%%EOF\n"
).decode()
"""A one-page PDF, base64."""
_FROM_CLAUDE = ("thinking", "redacted_thinking", "tool_use", "server_tool_use")


def _from_claude(block: dict[str, Any]) -> bool:
    """A block Claude writes (an assistant turn's): thinking, tool uses, server tool results."""
    kind = str(block["type"])
    return kind in _FROM_CLAUDE or (kind.endswith("_tool_result") and kind != "tool_result")


def every_block_conversation() -> list[dict[str, Any]]:
    """Messages holding every block of `user_block_variants`, each where the API takes it: what
    Claude writes (thinking first) in an assistant turn, the rest in the user turn after it,
    the `tool_result` first and answering the `tool_use`; the image and the PDF real files."""
    claude: list[dict[str, Any]] = []
    user: list[dict[str, Any]] = []
    for block in user_block_variants():
        if block["type"] == "tool_use":
            block = {**block, "id": "toolu_every_block"}
        elif block["type"] == "tool_result":
            block = {**block, "tool_use_id": "toolu_every_block"}
        elif block["type"] == "image":
            block = {**block, "source": {"type": "base64", "media_type": "image/png", "data": TINY_PNG}}
        elif block["type"] == "document" and block["source"].get("type") == "base64":
            block = {**block, "source": {**block["source"], "data": TINY_PDF}}
        (claude if _from_claude(block) else user).append(block)
    user.sort(key=lambda b: b["type"] != "tool_result")
    return [
        {"role": "user", "content": "Use every kind of block."},
        {"role": "assistant", "content": claude},
        {"role": "user", "content": user},
    ]
