"""The Claude client holds exactly the registry's partner keys, each partner calling with its own."""

from __future__ import annotations

import logging
import warnings
from datetime import UTC, date, datetime

import httpx2
import orjson
import pytest
from anthropic._data import DEPRECATED_MODELS
from pydantic import SecretStr

from service.config.settings import AnthropicSettings
from service.contracts.reasons import Reason
from service.upstream.client import ClaudeClient, UnknownPartnerKey, end_of_life_passed
from service.upstream.errors import InvalidParams

PARAMS = {"model": "claude-haiku-4-5", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
BODY = {
    "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-haiku-4-5",
    "content": [{"type": "text", "text": "ok"}], "stop_reason": "end_turn", "stop_sequence": None,
    "usage": {"input_tokens": 3, "output_tokens": 1},
}  # fmt: skip


async def test_sync_keys_rotates_removes_and_keeps_unchanged_clients() -> None:
    seen: list[str] = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        seen.append(request.headers.get("authorization") or request.headers.get("x-api-key") or "")
        return httpx2.Response(200, content=orjson.dumps(BODY), headers={"content-type": "application/json"})

    client = ClaudeClient(
        AnthropicSettings(base_url="http://claude.test"),
        http_client=httpx2.AsyncClient(transport=httpx2.MockTransport(handler)),
    )
    client.sync_keys({"a": SecretStr("sk-a1"), "b": SecretStr("sk-b1")})
    b_client = client._clients["b"]
    await client.create_message("a", PARAMS)
    client.sync_keys({"a": SecretStr("sk-a2"), "b": SecretStr("sk-b1")})
    assert client._clients["b"] is b_client  # unchanged key: same client, same pool
    await client.create_message("a", PARAMS)
    await client.create_message("b", PARAMS)
    assert [s.split()[-1] for s in seen] == ["sk-a1", "sk-a2", "sk-b1"]
    client.sync_keys({"b": SecretStr("sk-b1")})
    with pytest.raises(UnknownPartnerKey):
        await client.create_message("a", PARAMS)
    await client.aclose()


async def test_what_the_sdk_refuses_before_sending_is_invalid_params_and_nothing_is_sent() -> None:
    """ANTHROPIC.md: `create(temperature=...)` raises TypeError in SDK 2.13; the gateway calls that
    the partner's mistake (InvalidParams, dead-lettered invalid_request), never its own fault."""
    sent: list[httpx2.Request] = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        sent.append(request)
        return httpx2.Response(200, content=orjson.dumps(BODY), headers={"content-type": "application/json"})

    client = ClaudeClient(
        AnthropicSettings(base_url="http://claude.test"),
        http_client=httpx2.AsyncClient(transport=httpx2.MockTransport(handler)),
    )
    client.sync_keys({"a": SecretStr("sk-a1")})
    for name, value in (("temperature", 0.5), ("top_k", 5), ("stream_options", {})):
        with pytest.raises(InvalidParams) as info:
            await client.create_message("a", {**PARAMS, name: value})
        assert name in str(info.value)
        assert info.value.failure().reason is Reason.INVALID_REQUEST
        assert not info.value.failure().retryable
        assert "sk-a1" not in str(info.value)
    assert sent == []
    await client.create_message("a", PARAMS)  # the client is still fine
    assert len(sent) == 1
    await client.aclose()


async def test_a_failure_after_sending_is_not_invalid_params() -> None:
    def garbled(_: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(200, content=b"not json", headers={"content-type": "application/json"})

    client = ClaudeClient(
        AnthropicSettings(base_url="http://claude.test"),
        http_client=httpx2.AsyncClient(transport=httpx2.MockTransport(garbled)),
    )
    client.sync_keys({"a": SecretStr("sk-a1")})
    with pytest.raises(orjson.JSONDecodeError):  # the gateway's fault to handle, maybe billed
        await client.create_message("a", PARAMS)
    await client.aclose()


async def test_a_deprecated_model_is_called_and_said_once_even_where_warnings_are_errors(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The SDK warns (DeprecationWarning) from `create()` for a model past its deprecation date
    (claude-sonnet-4-5: end of life November 30th, 2026, in SDK 2.13). Under `-W error` (this
    suite's `filterwarnings = error`) that warning raised through the call: found when the crash
    tests' traffic mixed models, every sonnet-4-5 request was an internal_error dead letter."""

    model = "claude-sonnet-4-5"
    assert model in DEPRECATED_MODELS, "the SDK no longer lists it: pick another deprecated model"
    sent: list[httpx2.Request] = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        sent.append(request)
        return httpx2.Response(200, content=orjson.dumps(BODY), headers={"content-type": "application/json"})

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        client = ClaudeClient(
            AnthropicSettings(base_url="http://claude.test"),
            http_client=httpx2.AsyncClient(transport=httpx2.MockTransport(handler)),
        )
        client.sync_keys({"a": SecretStr("sk-a1"), "b": SecretStr("sk-b1")})
        with caplog.at_level(logging.WARNING, logger="service.upstream"):
            for partner in ("a", "b", "a"):
                result = await client.create_message(partner, {**PARAMS, "model": model})
                assert result.body["id"] == "msg_1"
            await client.create_message("a", PARAMS)
        with pytest.raises(UserWarning):  # other code keeps the process's filters
            warnings.warn("still an error elsewhere", UserWarning, stacklevel=1)
    assert len(sent) == 4
    notices = [r for r in caplog.records if "deprecated" in r.getMessage()]
    assert len(notices) == 1, "once per model, not per call"
    assert (notices[0].__dict__["model"], notices[0].__dict__["end_of_life"]) == (
        model,
        DEPRECATED_MODELS[model],
    )
    past = end_of_life_passed(DEPRECATED_MODELS[model], datetime.now(UTC).date())
    assert notices[0].__dict__["past_end_of_life"] is past
    assert ("past its end of life" in notices[0].getMessage()) is bool(past)
    await client.aclose()


@pytest.mark.parametrize(
    ("text", "today", "passed"),
    [
        ("November 30th, 2026", date(2026, 12, 4), True),
        ("November 30th, 2026", date(2026, 11, 30), False),  # the last day it is served
        ("January 22nd, 2027", date(2026, 12, 4), False),
        ("June 1st, 2026", date(2026, 6, 2), True),
        ("March 3rd, 2027", date(2027, 3, 4), True),
        ("February 30th, 2027", date(2027, 3, 4), None),  # no such day
        ("Smarch 3rd, 2027", date(2027, 3, 4), None),  # no such month
        ("soon", date(2026, 12, 4), None),  # wording the SDK may use one day
    ],
)
def test_the_sdks_end_of_life_dates_are_read(text: str, today: date, passed: bool | None) -> None:
    assert end_of_life_passed(text, today) is passed
