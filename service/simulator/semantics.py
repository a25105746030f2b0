"""What the real API refuses (400 `invalid_request_error`) in a body its types admit.

Run after the type checks of `validation.py`, so every value here has its SDK type. Each rule
answers with the real API's wording where it is known, naming the place (`messages.1.content.0`):

- A text block is non-empty: "text content blocks must be non-empty".
- `thinking` and `redacted_thinking` blocks come from Claude: only in assistant turns.
- A base64 image (also one inside a `tool_result`) is valid base64, not empty, and its bytes
  are the image its `media_type` claims: "The image was specified using the image/png media
  type, but the image appears to be a image/jpeg image". The format is read from the file
  signature (PNG, JPEG, GIF, WebP); bytes of no known format are not judged here.
- Tool use pairs up across turns (consecutive messages of one role are one turn, `system`
  messages are passed over): each `tool_result` answers a `tool_use` of the assistant turn just
  before ("unexpected `tool_use_id` found in `tool_result` blocks"), and each `tool_use` of an
  assistant turn that a user turn follows is answered in that turn ("`tool_use` ids were found
  without `tool_result` blocks immediately after"). A final assistant turn is not judged.
- At most 4 blocks carry `cache_control`, tools, system and message blocks together ("A
  maximum of 4 blocks with cache_control may be provided. Found 5."). The top-level automatic
  `cache_control` is not counted: whether it takes a slot is not documented.
- A custom tool's name matches `^[a-zA-Z0-9_-]{1,128}$`; tool names are unique ("tools: Tool
  names must be unique."); `tool_choice` `{"type": "tool"}` names one of the tools (not judged
  when a tool without a name, a toolset, may bring the named tool).
- `inference_geo` is one the API knows: `global` or `us` (the data residency docs).
"""

from __future__ import annotations

import binascii
import re
from collections.abc import Iterator, Mapping
from typing import Any

from service.simulator.errors import InvalidRequestError

MAX_CACHE_CONTROL_BLOCKS = 4
TOOL_NAME = re.compile(r"[a-zA-Z0-9_-]{1,128}")
INFERENCE_GEOS = ("global", "us")
_THINKING = ("thinking", "redacted_thinking")

Located = tuple[str, Mapping[str, Any]]
"""A content block and its place in the body (`messages.1.content.0`)."""


def _bad(message: str) -> InvalidRequestError:
    return InvalidRequestError(message)


def _blocks(content: Any) -> list[Any]:
    return content if isinstance(content, list) else []


def _message_blocks(messages: list[Any]) -> Iterator[tuple[int, str, Located]]:
    """(message index, role, located block) of every content block of every message."""
    for i, message in enumerate(messages):
        for j, block in enumerate(_blocks(message.get("content"))):
            if isinstance(block, Mapping):
                yield i, str(message.get("role")), (f"messages.{i}.content.{j}", block)


# -- content blocks ---------------------------------------------------------------------------


def image_type(head: bytes) -> str | None:
    """The media type the first bytes of an image file show, or None for none of the four."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if head.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    return None


def _check_image(where: str, block: Mapping[str, Any]) -> None:
    source = block.get("source")
    if not isinstance(source, Mapping) or source.get("type") != "base64":
        return
    data, media_type = source.get("data"), source.get("media_type")
    if not isinstance(data, str):
        return
    where = f"{where}.image.source.base64"
    if not data:
        raise _bad(f"{where}: image cannot be empty")
    try:
        raw = binascii.a2b_base64(data, strict_mode=True)
    except (binascii.Error, ValueError):  # ValueError: a character outside ASCII
        raise _bad(f"{where}: invalid base64 data") from None
    seen = image_type(raw[:16])
    if seen is not None and seen != media_type:
        raise _bad(
            f"{where}: The image was specified using the {media_type} media type, "
            f"but the image appears to be a {seen} image"
        )


def _check_block(where: str, block: Mapping[str, Any], role: str) -> None:
    kind = block.get("type")
    if kind == "text" and block.get("text") == "":
        raise _bad(f"{where}.text: text content blocks must be non-empty")
    if kind in _THINKING and role != "assistant":
        raise _bad(f"{where}: `{kind}` blocks may only appear in `assistant` messages, not in `{role}` ones")
    if kind == "image":
        _check_image(where, block)
    elif kind == "tool_result":
        for k, inner in enumerate(_blocks(block.get("content"))):
            if isinstance(inner, Mapping) and inner.get("type") == "image":
                _check_image(f"{where}.tool_result.content.{k}", inner)


# -- tool use across turns --------------------------------------------------------------------


Turn = tuple[str, list[tuple[int, str, Mapping[str, Any]]]]
"""(role, [(message index, place, block)]) of one turn."""


def _turns(messages: list[Any]) -> list[Turn]:
    """The turns of the conversation: consecutive user or assistant messages are one turn, as
    the API reads them; `system` messages are passed over."""
    turns: list[Turn] = []
    for i, message in enumerate(messages):
        role = str(message.get("role"))
        if role == "system":
            continue
        content = enumerate(_blocks(message.get("content")))
        blocks = [(i, f"messages.{i}.content.{j}", b) for j, b in content if isinstance(b, Mapping)]
        if turns and turns[-1][0] == role:
            turns[-1][1].extend(blocks)
        else:
            turns.append((role, blocks))
    return turns


def _check_tool_pairs(messages: list[Any]) -> None:
    turns = _turns(messages)
    for t, (role, blocks) in enumerate(turns):
        if role == "user":
            before = turns[t - 1] if t > 0 and turns[t - 1][0] == "assistant" else ("assistant", [])
            uses = {b.get("id") for _, _, b in before[1] if b.get("type") == "tool_use"}
            for _, where, block in blocks:
                if block.get("type") == "tool_result" and block.get("tool_use_id") not in uses:
                    raise _bad(
                        f"{where}: unexpected `tool_use_id` found in `tool_result` blocks: "
                        f"{block.get('tool_use_id')}. Each `tool_result` block must have a corresponding "
                        "`tool_use` block in the previous message."
                    )
        elif role == "assistant" and t + 1 < len(turns) and turns[t + 1][0] == "user":
            answered = {b.get("tool_use_id") for _, _, b in turns[t + 1][1] if b.get("type") == "tool_result"}
            missing = [(i, b.get("id")) for i, _, b in blocks if b.get("type") == "tool_use"]
            missing = [(i, use_id) for i, use_id in missing if use_id not in answered]
            if missing:
                raise _bad(
                    f"messages.{missing[0][0]}: `tool_use` ids were found without `tool_result` blocks "
                    f"immediately after: {', '.join(str(use_id) for _, use_id in missing)}. Each `tool_use` "
                    "block must have a corresponding `tool_result` block in the next message."
                )


# -- cache_control, tools, inference_geo ------------------------------------------------------


def _check_cache_control(body: Mapping[str, Any], messages: list[Any]) -> None:
    blocks: list[Any] = [*_blocks(body.get("tools")), *_blocks(body.get("system"))]
    blocks += [block for _, _, (_, block) in _message_blocks(messages)]
    found = sum(1 for b in blocks if isinstance(b, Mapping) and b.get("cache_control") is not None)
    if found > MAX_CACHE_CONTROL_BLOCKS:
        most = MAX_CACHE_CONTROL_BLOCKS
        raise _bad(f"A maximum of {most} blocks with cache_control may be provided. Found {found}.")


def _check_tools(body: Mapping[str, Any]) -> None:
    tools = [t for t in _blocks(body.get("tools")) if isinstance(t, Mapping)]
    names: list[str] = []
    for i, tool in enumerate(tools):
        name = tool.get("name")
        if tool.get("type") in (None, "custom") and not (isinstance(name, str) and TOOL_NAME.fullmatch(name)):
            raise _bad(f"tools.{i}.custom.name: String should match pattern '^[a-zA-Z0-9_-]{{1,128}}$'")
        if isinstance(name, str):
            names.append(name)
    if len(set(names)) != len(names):
        raise _bad("tools: Tool names must be unique.")
    choice = body.get("tool_choice")
    named = choice.get("name") if isinstance(choice, Mapping) and choice.get("type") == "tool" else None
    if named is not None and len(names) == len(tools) and named not in names:
        raise _bad(f"tool_choice.name: there is no tool named '{named}' in `tools`")


def check_semantics(body: Mapping[str, Any]) -> None:
    """Check a type-checked Messages or count_tokens body; raise `InvalidRequestError`."""
    messages = [m for m in _blocks(body.get("messages")) if isinstance(m, Mapping)]
    for _, role, (where, block) in _message_blocks(messages):
        _check_block(where, block, role)
    _check_tool_pairs(messages)
    _check_cache_control(body, messages)
    _check_tools(body)
    geo = body.get("inference_geo")
    if geo is not None and geo not in INFERENCE_GEOS:
        raise _bad(f"inference_geo: Input should be {' or '.join(repr(g) for g in INFERENCE_GEOS)}")
