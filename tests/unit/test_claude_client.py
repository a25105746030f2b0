"""The Claude client holds exactly the registry's partner keys, each partner calling with its own."""

from __future__ import annotations

import httpx2
import orjson
import pytest
from pydantic import SecretStr

from service.config.settings import AnthropicSettings
from service.upstream.client import ClaudeClient, UnknownPartnerKey

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
