"""The gateway's contract for a request's `params`: the SDK's fields, minus what it refuses.

`params` is what the gateway passes to the SDK's `messages.create()`. Its schema is derived
from the installed SDK (`sdk_schema.py`), and this module holds the gateway's own rules on
top, each with its reason (docs/request-contract.md lists them for partners):

- `REFUSED`: fields the SDK takes that the gateway refuses;
- `TRANSPORT_OPTIONS`: arguments of `create()` that are not part of the request body;
- `REMOVED`: fields older contracts (and older SDKs) took that the current API does not;
- `OVERLAYS`: constraints narrower than the SDK's type (`max_tokens` is at least 1, ...);
- `HEADER_FIELDS`: fields the SDK sends as HTTP headers, whose values HTTP must be able to carry.

`check_request` runs before the schema, so a partner who sends one of those fields, a
`max_tokens` that is not a positive JSON integer, or a header field HTTP cannot carry, reads a
sentence naming the field and why.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from service.contracts.schemas import SchemaViolation, validate

REFUSED: dict[str, str] = {
    "stream": (
        "the gateway publishes each outcome as one whole message on the response topic, so "
        "streaming is refused; leave `stream` out"
    ),
}
TRANSPORT_OPTIONS: dict[str, str] = {
    name: (
        f"`{name}` is an option of the SDK's create() call, not a field of the request: the "
        "gateway owns the transport (keys, headers, timeouts, retries)"
    )
    for name in ("extra_headers", "extra_query", "extra_body", "timeout")
}
REMOVED: dict[str, str] = {
    name: (
        f"`{name}` is no longer accepted by the Claude Messages API (the installed anthropic SDK "
        "has no such parameter); leave it out"
    )
    for name in ("temperature", "top_p", "top_k")
}
MIN_MAX_TOKENS = 1
HEADER_FIELDS: dict[str, str] = {
    "user_profile_id": "anthropic-user-profile-id",
    "workspace_id": "anthropic-workspace-id",
}
"""Fields of `create()` the SDK sends as HTTP headers rather than in the JSON body."""
MAX_HEADER_FIELD_CHARS = 256
HEADER_VALUE_PATTERN = r"^[\x21-\x7e]+$"
"""What a `HEADER_FIELDS` value may be: printable ASCII without spaces (RFC 9110's `VCHAR`),
1 to `MAX_HEADER_FIELD_CHARS` characters. Every such string is a valid HTTP header value,
written as the same bytes whatever encoding the HTTP client uses; h11, which writes the request,
takes more (any byte but NUL and whitespace, with spaces and tabs only between others:
`h11._abnf.field_value`), but no id needs more. Anthropic's ids (`wrkspc_011CZkZaBF1tNoB5wlCeusgy`,
`uprof_...`) are of this form. Without it a value with a line break, a NUL or only a space
passed admission and failed every attempt to write the request, and a 100 KB one reached the
API and came back 400."""
_HEADER_VALUE = re.compile(HEADER_VALUE_PATTERN)  # used with fullmatch: `$` would pass a final "\n"
_CHAR_NAMES = {"\n": "line feed", "\r": "carriage return", "\t": "tab", "\x00": "NUL", " ": "space"}
OVERLAYS: dict[str, dict[str, Any]] = {
    "model": {"minLength": 1, "maxLength": 128},
    "max_tokens": {
        "minimum": MIN_MAX_TOKENS,
        "description": (
            "A JSON integer from 1 to the model's documented maximum (gateway config "
            "`models.<id>.max_output_tokens`). 0 (prompt-cache pre-warming) is refused: it "
            "yields no message, and Message Batches do not take it."
        ),
    },
    "messages": {"minItems": 1},
    **{
        name: {
            "minLength": 1,
            "maxLength": MAX_HEADER_FIELD_CHARS,
            "pattern": HEADER_VALUE_PATTERN,
            "description": (
                f"Sent as the HTTP header {header}: 1 to {MAX_HEADER_FIELD_CHARS} printable ASCII "
                "characters, without spaces or control characters, as Anthropic's ids are."
            ),
        }
        for name, header in HEADER_FIELDS.items()
    },
}
"""Narrower than the SDK's types, as the request contract v1 always was (and, for the header
fields, what HTTP can carry)."""

SERVER_TOOLS = frozenset({"web_search", "web_fetch", "code_execution", "tool_search_tool"})
"""Tool families Anthropic runs (and bills) itself; a partner's `policy.server_tools` lists
which it may use. The family of a tool is its `type` without the version date."""
CLIENT_TOOLS = frozenset({"custom", "bash", "text_editor", "memory", "computer_toolset", "browser_toolset"})
"""Tool families the caller runs: always allowed."""
_VERSION = re.compile(r"(?:_(?:\d{8}|bm25|regex))+$")


def tool_family(tool: Mapping[str, Any]) -> str:
    """`web_search_20250305` -> `web_search`; `tool_search_tool_bm25` -> `tool_search_tool`;
    a tool without a `type` (or `custom`) is a custom tool."""
    kind = tool.get("type")
    if not isinstance(kind, str) or kind == "custom":
        return "custom"
    return _VERSION.sub("", kind)


def server_tools(params: Mapping[str, Any]) -> list[str]:
    """The server tool families `params` asks for, in order, without repeats."""
    out: list[str] = []
    tools = params.get("tools")
    for tool in tools if isinstance(tools, list) else ():
        if isinstance(tool, Mapping):
            family = tool_family(tool)
            if family not in CLIENT_TOOLS and family not in out:
                out.append(family)
    return out


def refused_reason(name: str) -> str | None:
    """Why the gateway refuses the params field `name`, or None."""
    return REFUSED.get(name) or TRANSPORT_OPTIONS.get(name) or REMOVED.get(name)


def _describe(value: Any) -> str:
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, float):
        return f"the number {value!r} (written with a fraction or an exponent, or beyond 64 bits)"
    if value is None:
        return "null"
    if isinstance(value, str):
        return f"a string ({value[:20]!r})"
    return f"a {type(value).__name__}"


def max_tokens_problem(value: Any) -> str | None:
    """Why `value` is not a valid `max_tokens`, or None."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value >= MIN_MAX_TOKENS:
            return None
        if value == 0:
            return (
                "params.max_tokens is 0: prompt-cache pre-warming is not taken by the gateway (it "
                "yields no message); send at least 1"
            )
        return f"params.max_tokens is {value}: it must be at least {MIN_MAX_TOKENS}"
    return f"params.max_tokens must be a JSON integer such as 1024; got {_describe(value)}"


def header_values(params: Mapping[str, Any]) -> dict[str, str]:
    """The `HEADER_FIELDS` a request sets, by name: its call's HTTP headers. On the batch path
    they are the create call's (`batches.create(workspace_id=..., user_profile_id=...)`, one
    value for the whole batch) and are not part of a member's `params`."""
    return {name: str(params[name]) for name in HEADER_FIELDS if name in params}


def body_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """`params` without the `HEADER_FIELDS`: what goes in the body (a batch member's `params`)."""
    return {k: v for k, v in params.items() if k not in HEADER_FIELDS}


def header_field_problem(name: str, value: Any) -> str | None:
    """Why `value` cannot be `params.<name>`, a field the SDK sends as an HTTP header, or None.
    A value that is not a string is left to the schema. The value itself is not quoted."""
    if not isinstance(value, str) or (
        len(value) <= MAX_HEADER_FIELD_CHARS and _HEADER_VALUE.fullmatch(value) is not None
    ):
        return None
    rule = (
        f"params.{name} must be 1 to {MAX_HEADER_FIELD_CHARS} printable ASCII characters, without "
        f"spaces or control characters (it is sent as the HTTP header {HEADER_FIELDS[name]}); "
    )
    if not value:
        return rule + "it is empty"
    if len(value) > MAX_HEADER_FIELD_CHARS:
        return rule + f"it is {len(value)} characters long"
    at = next(i for i, ch in enumerate(value) if _HEADER_VALUE.fullmatch(ch) is None)
    ch = value[at]
    kind = "non-ASCII character" if ord(ch) > 0x7F else "character"
    named = f" ({_CHAR_NAMES[ch]})" if ch in _CHAR_NAMES else ""
    return rule + f"it has the {kind} U+{ord(ch):04X}{named} at index {at}"


def check_request(doc: Any) -> None:
    """Validate a request document; raise `SchemaViolation` with a sentence a partner can act
    on. Refused fields, `max_tokens` and the header fields are checked first, by name; the schema
    then checks the rest."""
    params = doc.get("params") if isinstance(doc, dict) else None
    if isinstance(params, dict):
        for name in params:
            why = refused_reason(name)
            if why is not None:
                raise SchemaViolation(f"params.{name} is refused: {why}")
        if "max_tokens" in params:
            problem = max_tokens_problem(params["max_tokens"])
            if problem is not None:
                raise SchemaViolation(problem)
        for name in HEADER_FIELDS:
            problem = header_field_problem(name, params.get(name))
            if problem is not None:
                raise SchemaViolation(problem)
    validate("request", doc)


PARAMS_DESCRIPTION = (
    "Messages API parameters, as the installed anthropic SDK's MessageCreateParams types them "
    "(generated by scripts/gen_request_schema.py; do not edit by hand). Refused by the gateway: "
)


def params_schema() -> dict[str, Any]:
    """The `params` schema of the request contract: the SDK's fields, without `REFUSED`, with
    `OVERLAYS`. Its references point into `sdk_schema.definitions()`."""
    from service.contracts import sdk_schema  # the SDK's types are read only to generate

    props = sdk_schema.params_properties()
    for name in REFUSED:
        props.pop(name, None)
    for name, extra in OVERLAYS.items():
        props[name] = {**props[name], **extra}
    required = sorted(k for k, (_, req) in sdk_schema.sdk_fields().items() if req and k in props)
    refused = ", ".join(sorted([*REFUSED, *TRANSPORT_OPTIONS, *REMOVED]))
    return {
        "type": "object",
        "description": PARAMS_DESCRIPTION + refused + " (docs/request-contract.md says why).",
        "required": required,
        "additionalProperties": False,
        "properties": props,
    }
