"""Request body checks for `/v1/messages` and `/v1/messages/count_tokens`.

The fields, and the type of every value in them, are the API's as the installed anthropic
SDK types them (`service/contracts/sdk_schema.py`): an unknown field is 400 "Extra inputs are
not permitted", a value of the wrong type or shape is 400 naming its place. Before that, the
checks the types cannot express run with messages in the style of the real API
(`messages.0.role: ...`): `max_tokens` from 0 (prompt-cache pre-warming) to the limit, the
order of turns, non-empty content, thinking's budget below `max_tokens`, no streaming. After
the types, what the API refuses in a well-typed body (`semantics.py`: tool use pairing, images,
cache_control, tool names, ...). The model is checked last, against the configured list, with
`NotFoundError`.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from functools import cache
from typing import Any, Literal, TypeGuard

import fastjsonschema

from service.contracts.schemas import Validator, compile_strict
from service.contracts.sdk_schema import api_params_schema
from service.simulator.errors import InvalidRequestError, NotFoundError
from service.simulator.semantics import check_semantics

Endpoint = Literal["messages", "count_tokens"]
MESSAGES_FIELDS = frozenset(api_params_schema("messages")["properties"])
COUNT_TOKENS_FIELDS = frozenset(api_params_schema("count_tokens")["properties"])
_ROLES = ("user", "assistant", "system")
_INDEX = re.compile(r"\[(\d+)\]")


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _bad(message: str) -> InvalidRequestError:
    return InvalidRequestError(message)


def _check_blocks(where: str, blocks: list[Any]) -> None:
    for i, block in enumerate(blocks):
        if not isinstance(block, Mapping):
            raise _bad(f"{where}.{i}: Input should be a valid dictionary")
        kind = block.get("type")
        if not isinstance(kind, str):
            raise _bad(f"{where}.{i}.type: Field required")
        if kind == "text" and not isinstance(block.get("text"), str):
            raise _bad(f"{where}.{i}.text: Field required (a string)")


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list):
        raise _bad("messages: Input should be a valid list")
    if not messages:
        raise _bad("messages: at least one message is required")
    last = len(messages) - 1
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise _bad(f"messages.{i}: Input should be a valid dictionary")
        role = message.get("role")
        if role not in _ROLES:
            raise _bad(f"messages.{i}.role: Input should be 'user', 'assistant' or 'system'")
        extra = set(message) - {"role", "content"}
        if extra:
            raise _bad(f"messages.{i}.{sorted(extra)[0]}: Extra inputs are not permitted")
        content = message.get("content")
        if isinstance(content, str):
            empty = not content
        elif isinstance(content, list):
            _check_blocks(f"messages.{i}.content", content)
            empty = not content
        else:
            raise _bad(f"messages.{i}.content: Input should be a valid string or a list of content blocks")
        if empty and not (i == last and role == "assistant"):
            raise _bad(
                f"messages.{i}: all messages must have non-empty content "
                "except for the optional final assistant message"
            )
    turns = [m for m in messages if m.get("role") != "system"]
    if not turns or turns[0].get("role") != "user":
        raise _bad("messages: the first message (after system messages) must use the 'user' role")


def _check_system(system: Any) -> None:
    if isinstance(system, str):
        return
    if isinstance(system, list):
        _check_blocks("system", system)
        for i, block in enumerate(system):
            if block.get("type") != "text":
                raise _bad(f"system.{i}.type: Input should be 'text'")
        return
    raise _bad("system: Input should be a valid string or a list of text blocks")


def _check_tools(body: Mapping[str, Any]) -> None:
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise _bad("tools: Input should be a valid list")
        for i, tool in enumerate(tools):
            if not isinstance(tool, Mapping):
                raise _bad(f"tools.{i}: Input should be a valid dictionary")
            custom = tool.get("type") in (None, "custom")  # Anthropic's own tools have fixed names
            if custom and (not isinstance(tool.get("name"), str) or not tool["name"]):
                raise _bad(f"tools.{i}.name: Field required")
    choice = body.get("tool_choice")
    named = isinstance(choice, Mapping) and isinstance(choice.get("name"), str)
    if isinstance(choice, Mapping) and choice.get("type") == "tool" and not named:
        raise _bad("tool_choice.name: Field required")


def _check_thinking(thinking: Any, max_tokens: int | None) -> None:
    if isinstance(thinking, Mapping) and thinking.get("type") == "enabled":
        budget = thinking.get("budget_tokens")
        if not _is_int(budget) or budget < 1024:
            raise _bad("thinking.budget_tokens: Input should be an integer of at least 1024")
        if max_tokens is not None and budget >= max_tokens:
            raise _bad("thinking.budget_tokens: must be less than max_tokens")


def _check_stops_and_metadata(body: Mapping[str, Any]) -> None:
    stops = body.get("stop_sequences")
    if stops is not None and (not isinstance(stops, list) or not all(isinstance(s, str) for s in stops)):
        raise _bad("stop_sequences: Input should be a list of strings")
    metadata = body.get("metadata")
    if metadata is not None:
        if not isinstance(metadata, Mapping):
            raise _bad("metadata: Input should be a valid dictionary")
        extra = set(metadata) - {"user_id"}
        if extra:
            raise _bad(f"metadata.{sorted(extra)[0]}: Extra inputs are not permitted")
        user_id = metadata.get("user_id")
        if user_id is not None and not isinstance(user_id, str):
            raise _bad("metadata.user_id: Input should be a valid string")


def _check_model(body: Mapping[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("model: Field required (a string)")
    return model


@cache
def _validator(endpoint: Endpoint) -> Validator:
    return compile_strict(api_params_schema(endpoint))


def warm() -> None:
    """Compile the body schemas now (about a second), not on the first request."""
    _validator("messages")
    _validator("count_tokens")


def _check_types(body: Mapping[str, Any], endpoint: Endpoint) -> None:
    try:
        _validator(endpoint)(body)
    except fastjsonschema.JsonSchemaValueException as exc:
        # "data.messages[0].content[1].type must be one of [...]" -> "messages.0.content.1.type: ..."
        where, _, what = exc.message.partition(" ")
        path = _INDEX.sub(r".\1", where.removeprefix("data").lstrip("."))
        raise _bad(f"{path or 'body'}: {what}") from None


def validate_messages(body: Any, models: Collection[str], max_tokens_limit: int) -> str:
    """Check a `/v1/messages` body; return the model. Raises `ApiError` subclasses."""
    if not isinstance(body, Mapping):
        raise _bad("the request body must be a JSON object")
    unknown = set(body) - MESSAGES_FIELDS
    if unknown:
        raise _bad(f"{sorted(unknown)[0]}: Extra inputs are not permitted")
    model = _check_model(body)
    max_tokens = body.get("max_tokens")
    if max_tokens is None:
        raise _bad("max_tokens: Field required")
    if not _is_int(max_tokens) or max_tokens < 0:
        raise _bad("max_tokens: Input should be a non-negative integer (0 only pre-warms the cache)")
    if max_tokens > max_tokens_limit:
        raise _bad(f"max_tokens: {max_tokens} > {max_tokens_limit}, which is the maximum allowed for {model}")
    _check_messages(body.get("messages"))
    if "system" in body:
        _check_system(body["system"])
    _check_stops_and_metadata(body)
    _check_tools(body)
    if body.get("thinking") is not None:
        _check_thinking(body["thinking"], max_tokens)
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise _bad("stream: Input should be a valid boolean")
    if stream:
        raise _bad("stream: streaming is not supported by the simulator; send stream=false")
    _check_types(body, "messages")
    check_semantics(body)
    if model not in models:
        raise NotFoundError(f"model: {model}")
    return model


def validate_count_tokens(body: Any, models: Collection[str]) -> str:
    """Check a `/v1/messages/count_tokens` body; return the model."""
    if not isinstance(body, Mapping):
        raise _bad("the request body must be a JSON object")
    unknown = set(body) - COUNT_TOKENS_FIELDS
    if unknown:
        raise _bad(f"{sorted(unknown)[0]}: Extra inputs are not permitted")
    model = _check_model(body)
    _check_messages(body.get("messages"))
    if "system" in body:
        _check_system(body["system"])
    _check_tools(body)
    if body.get("thinking") is not None:
        _check_thinking(body["thinking"], None)
    _check_types(body, "count_tokens")
    check_semantics(body)
    if model not in models:
        raise NotFoundError(f"model: {model}")
    return model
