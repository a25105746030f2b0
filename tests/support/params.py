"""Ordinary values for every field of the request contract's `params`, as a partner writes them,
and one minimal instance of every tool and every user content block the SDK types.

`SAMPLES` must cover every field the schema admits (tests/unit/test_request_contract.py checks
it), so a new SDK field needs a sample here before the suite passes.
"""

from __future__ import annotations

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
