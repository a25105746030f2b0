"""Body and header checks: 400/401/404/413 with Anthropic's error body and request-id."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from service.simulator import SimulatorConfig
from tests.simulator.conftest import SimFactory
from tests.simulator.simkit import API_VERSION, MODEL, body, headers

BAD_BODIES: list[tuple[dict[str, Any], str]] = [
    (body(model=...), "model"),
    (body(model=7), "model"),
    (body(max_tokens=...), "max_tokens"),
    (body(max_tokens=-5), "max_tokens"),
    (body(max_tokens=1.5), "max_tokens"),
    (body(max_tokens=True), "max_tokens"),
    (body(max_tokens=10**9), "max_tokens"),
    (body(messages=...), "messages"),
    (body(messages=[]), "messages"),
    (body(messages="hi"), "messages"),
    (body(messages=["hi"]), "messages.0"),
    (body(messages=[{"role": "bot", "content": "x"}]), "messages.0.role"),
    (body(messages=[{"role": "system", "content": "x"}]), "first message"),
    (body(messages=[{"role": "assistant", "content": "x"}]), "first message"),
    (body(messages=[{"role": "user", "content": 5}]), "messages.0.content"),
    (body(messages=[{"role": "user", "content": ""}]), "non-empty"),
    (body(messages=[{"role": "user", "content": [{"text": "x"}]}]), "messages.0.content.0.type"),
    (body(messages=[{"role": "user", "content": [{"type": "text"}]}]), "messages.0.content.0.text"),
    (body(messages=[{"role": "user", "content": "x", "name": "bob"}]), "messages.0.name"),
    (body(system=5), "system"),
    (body(system=[{"type": "image"}]), "system.0"),
    (body(temperature=0.5), "temperature: Extra inputs are not permitted"),  # gone from the API
    (body(top_p=0.9), "top_p: Extra inputs"),
    (body(top_k=5), "top_k: Extra inputs"),
    (body(user_profile_id="u"), "user_profile_id: Extra inputs"),  # a header, not a body field
    (body(service_tier="priority"), "service_tier: must be one of"),
    (body(speed="turbo"), "speed: must be one of"),
    (body(inference_geo=5), "inference_geo: must be string or null"),
    (body(cache_control={"type": "persistent"}), "cache_control"),
    (body(output_config={"effort": "extreme"}), "output_config.effort"),
    (body(container=7), "container"),
    (body(diagnostics={"previous": "msg_1"}), "diagnostics"),
    (body(messages=[{"role": "user", "content": [{"type": "text", "text": "x", "foo": 1}]}]), "content.0"),
    (body(tools=[{"type": "web_search_20250305", "name": "web_search", "max_uses": 1.0}]), "max_uses"),
    (body(stop_sequences="END"), "stop_sequences"),
    (body(stop_sequences=[1]), "stop_sequences"),
    (body(metadata="me"), "metadata"),
    (body(metadata={"user_id": 5}), "metadata.user_id"),
    (body(metadata={"email": "a@b"}), "metadata.email"),
    (body(tools={"name": "x"}), "tools"),
    (body(tools=[{"description": "no name"}]), "tools.0.name"),
    (body(tool_choice={"type": "sometimes"}), "tool_choice"),
    (body(tool_choice={"type": "tool"}), "tool_choice.name"),
    (body(thinking={"type": "maybe"}), "thinking.type"),
    (body(thinking={"type": "enabled", "budget_tokens": 100}, max_tokens=4000), "thinking.budget_tokens"),
    (body(thinking={"type": "enabled", "budget_tokens": 2000}, max_tokens=2000), "thinking.budget_tokens"),
    (body(frequency_penalty=0.5), "frequency_penalty"),
    (body(stream="yes"), "stream"),
    (body(stream=True), "stream"),
]


@pytest.mark.parametrize(("doc", "mentions"), BAD_BODIES)
async def test_invalid_bodies_are_400_naming_the_field(
    make_sim: SimFactory, http: aiohttp.ClientSession, doc: dict[str, Any], mentions: str
) -> None:
    sim = await make_sim()
    async with http.post(f"{sim.url}/v1/messages", json=doc, headers=headers()) as resp:
        assert resp.status == 400
        data = await resp.json()
        assert resp.headers["request-id"].startswith("req_")
    assert data["type"] == "error"
    assert data["error"]["type"] == "invalid_request_error"
    assert mentions in data["error"]["message"]
    assert data["request_id"] == resp.headers["request-id"]


async def test_a_full_valid_body_is_accepted(make_sim: SimFactory, http: aiohttp.ClientSession) -> None:
    sim = await make_sim()
    doc = body(
        max_tokens=4096,
        system=[{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
        messages=[
            {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
            {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": ""},  # an empty final assistant turn is allowed
        ],
        stop_sequences=["END"],
        metadata={"user_id": "u-1"},
        tools=[{"name": "weather", "input_schema": {"type": "object"}}],
        tool_choice={"type": "tool", "name": "weather"},
        thinking={"type": "enabled", "budget_tokens": 1024},
        stream=False,
    )
    async with http.post(f"{sim.url}/v1/messages", json=doc, headers=headers()) as resp:
        assert resp.status == 200, await resp.text()


async def test_malformed_json_is_400(make_sim: SimFactory, http: aiohttp.ClientSession) -> None:
    sim = await make_sim()
    async with http.post(f"{sim.url}/v1/messages", data=b"{not json", headers=headers()) as resp:
        assert resp.status == 400
        data = await resp.json()
    assert data["error"]["type"] == "invalid_request_error"
    assert "JSON" in data["error"]["message"]


async def test_body_that_is_not_an_object_is_400(make_sim: SimFactory, http: aiohttp.ClientSession) -> None:
    sim = await make_sim()
    async with http.post(f"{sim.url}/v1/messages", json=[1, 2], headers=headers()) as resp:
        assert resp.status == 400


async def test_unknown_model_is_404(make_sim: SimFactory, http: aiohttp.ClientSession) -> None:
    sim = await make_sim()
    async with http.post(
        f"{sim.url}/v1/messages", json=body(model="claude-nonexistent-9"), headers=headers()
    ) as resp:
        assert resp.status == 404
        data = await resp.json()
    assert data["error"] == {"type": "not_found_error", "message": "model: claude-nonexistent-9"}


async def test_missing_version_header_is_400(make_sim: SimFactory, http: aiohttp.ClientSession) -> None:
    sim = await make_sim()
    async with http.post(f"{sim.url}/v1/messages", json=body(), headers={"x-api-key": "sk-test"}) as resp:
        assert resp.status == 400
        data = await resp.json()
    assert "anthropic-version" in data["error"]["message"]


@pytest.mark.parametrize(
    "auth",
    [
        {},
        {"authorization": "Bearer sk-wrong"},
        {"x-api-key": "sk-wrong"},
        {"authorization": "Basic sk-alice"},
    ],
)
async def test_missing_or_unknown_key_is_401(
    make_sim: SimFactory, http: aiohttp.ClientSession, auth: dict[str, str]
) -> None:
    sim = await make_sim(SimulatorConfig(api_keys={"alice": "sk-alice"}))
    hdrs = {"anthropic-version": API_VERSION, **auth}
    async with http.post(f"{sim.url}/v1/messages", json=body(), headers=hdrs) as resp:
        assert resp.status == 401
        data = await resp.json()
        assert "anthropic-ratelimit-requests-limit" in resp.headers
    assert data["error"]["type"] == "authentication_error"
    assert "sk-alice" not in data["error"]["message"]


@pytest.mark.parametrize("auth", [{"authorization": "Bearer sk-alice"}, {"x-api-key": "sk-alice"}])
async def test_configured_key_is_accepted_either_way(
    make_sim: SimFactory, http: aiohttp.ClientSession, auth: dict[str, str]
) -> None:
    sim = await make_sim(SimulatorConfig(api_keys={"alice": "sk-alice"}))
    hdrs = {"anthropic-version": API_VERSION, **auth}
    async with http.post(f"{sim.url}/v1/messages", json=body(), headers=hdrs) as resp:
        assert resp.status == 200


@pytest.mark.parametrize("chunked", [False, True])
async def test_body_over_the_limit_is_413(
    make_sim: SimFactory, http: aiohttp.ClientSession, chunked: bool
) -> None:
    sim = await make_sim(SimulatorConfig(max_body_bytes=2_000))
    payload = b'{"model": "' + b"x" * 5_000 + b'"}'

    async def gen() -> Any:
        for i in range(0, len(payload), 500):
            yield payload[i : i + 500]

    data: Any = gen() if chunked else payload
    async with http.post(f"{sim.url}/v1/messages", data=data, headers=headers()) as resp:
        assert resp.status == 413
        doc = await resp.json()
    assert doc["error"]["type"] == "request_too_large"
    assert "2000 bytes" in doc["error"]["message"]


async def test_default_body_limit_is_32_mb() -> None:
    assert SimulatorConfig().max_body_bytes == 32 * 1024 * 1024


async def test_unknown_path_and_wrong_method(make_sim: SimFactory, http: aiohttp.ClientSession) -> None:
    sim = await make_sim()
    async with http.post(f"{sim.url}/v1/complete", json={}, headers=headers()) as resp:
        assert resp.status == 404
        assert (await resp.json())["error"]["type"] == "not_found_error"
        assert "request-id" in resp.headers
    async with http.get(f"{sim.url}/v1/messages", headers=headers()) as resp:
        assert resp.status == 405
        assert (await resp.json())["type"] == "error"


async def test_count_tokens_validation(make_sim: SimFactory, http: aiohttp.ClientSession) -> None:
    sim = await make_sim()
    url = f"{sim.url}/v1/messages/count_tokens"
    doc = {"model": MODEL, "messages": [{"role": "user", "content": "x" * 40}]}
    async with http.post(url, json=doc, headers=headers()) as resp:
        assert resp.status == 200
        assert await resp.json() == {"input_tokens": 13}
    async with http.post(url, json={**doc, "max_tokens": 5}, headers=headers()) as resp:
        assert resp.status == 400
    async with http.post(url, json={**doc, "model": "nope"}, headers=headers()) as resp:
        assert resp.status == 404
