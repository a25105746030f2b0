"""Request body checks for `/v1/messages` and `/v1/messages/count_tokens`.

Each check raises `InvalidRequestError` with a message naming the field, in
the style of the real API (`messages.0.role: ...`). The model is checked
last, against the configured list, with `NotFoundError`.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any, TypeGuard

from service.simulator.errors import InvalidRequestError, NotFoundError

_COMMON_FIELDS = frozenset(
    {
        "model",
        "messages",
        "system",
        "tools",
        "tool_choice",
        "thinking",
        "cache_control",
        "output_config",
        "speed",
        "mcp_servers",
        "context_management",
    }
)
MESSAGES_FIELDS = _COMMON_FIELDS | {
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "stop_sequences",
    "metadata",
    "stream",
    "service_tier",
    "container",
    "diagnostics",
    "inference_geo",
    "user_profile_id",
    "workspace_id",
}
COUNT_TOKENS_FIELDS = _COMMON_FIELDS
_ROLES = ("user", "assistant")
_TOOL_CHOICES = frozenset({"auto", "any", "tool", "none"})
_THINKING_TYPES = frozenset({"enabled", "disabled", "adaptive"})


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


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
            raise _bad(f"messages.{i}.role: Input should be 'user' or 'assistant'")
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
    if messages[0].get("role") != "user":
        raise _bad("messages: the first message must use the 'user' role")


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
            if not isinstance(tool.get("name"), str) or not tool["name"]:
                raise _bad(f"tools.{i}.name: Field required")
    choice = body.get("tool_choice")
    if choice is not None:
        if not isinstance(choice, Mapping) or choice.get("type") not in _TOOL_CHOICES:
            raise _bad("tool_choice.type: Input should be 'auto', 'any', 'tool' or 'none'")
        if choice.get("type") == "tool" and not isinstance(choice.get("name"), str):
            raise _bad("tool_choice.name: Field required")


def _check_thinking(thinking: Any, max_tokens: int | None) -> None:
    if not isinstance(thinking, Mapping) or thinking.get("type") not in _THINKING_TYPES:
        raise _bad("thinking.type: Input should be 'enabled', 'disabled' or 'adaptive'")
    if thinking.get("type") == "enabled":
        budget = thinking.get("budget_tokens")
        if not _is_int(budget) or budget < 1024:
            raise _bad("thinking.budget_tokens: Input should be an integer of at least 1024")
        if max_tokens is not None and budget >= max_tokens:
            raise _bad("thinking.budget_tokens: must be less than max_tokens")


def _check_sampling(body: Mapping[str, Any]) -> None:
    for name in ("temperature", "top_p"):
        value = body.get(name)
        if value is not None and (not _is_number(value) or not 0.0 <= value <= 1.0):
            raise _bad(f"{name}: Input should be a number between 0 and 1")
    top_k = body.get("top_k")
    if top_k is not None and (not _is_int(top_k) or top_k < 0):
        raise _bad("top_k: Input should be a non-negative integer")
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
    if not _is_int(max_tokens) or max_tokens < 1:
        raise _bad("max_tokens: Input should be a positive integer")
    if max_tokens > max_tokens_limit:
        raise _bad(f"max_tokens: {max_tokens} > {max_tokens_limit}, which is the maximum allowed for {model}")
    _check_messages(body.get("messages"))
    if "system" in body:
        _check_system(body["system"])
    _check_sampling(body)
    _check_tools(body)
    if body.get("thinking") is not None:
        _check_thinking(body["thinking"], max_tokens)
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise _bad("stream: Input should be a valid boolean")
    if stream:
        raise _bad("stream: streaming is not supported by the simulator; send stream=false")
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
    if model not in models:
        raise NotFoundError(f"model: {model}")
    return model
