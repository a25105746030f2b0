"""The official SDK against the simulator: parsed messages, headers, and one exception class per error.

ANTHROPIC.md: the SDK maps 400 BadRequest, 401 Authentication, 404 NotFound, 413
ContentTooLarge, 429 RateLimit, 500 InternalServer, 529 Overloaded, a dropped
connection to APIConnectionError, and a 429 with `error.details.error_code`
`enforced_spend_limit_reached` to EnforcedSpendLimitReachedError.
"""

from __future__ import annotations

from typing import Any

import anthropic
import pytest

from service.simulator import SimulatorConfig
from tests.simulator.conftest import SDK_KEY as KEY
from tests.simulator.conftest import ClientFactory, SimFactory
from tests.simulator.simkit import MODEL, FakeClock

MESSAGES: list[Any] = [{"role": "user", "content": "Hello, Claude"}]


async def test_the_sdk_sends_bearer_auth_and_is_accepted(
    make_sim: SimFactory, make_client: ClientFactory
) -> None:
    sim = await make_sim(SimulatorConfig(api_keys={"alice": KEY}, output={"fixed_tokens": 12}))
    client = make_client(sim)
    raw = await client.messages.with_raw_response.create(model=MODEL, max_tokens=100, messages=MESSAGES)
    message = await raw.parse()
    assert message.type == "message"
    assert message.role == "assistant"
    assert message.model == MODEL
    assert message.stop_reason == "end_turn"
    assert message.usage.output_tokens == 12
    assert message.usage.input_tokens > 0
    assert message.content[0].type == "text"
    assert raw.headers["request-id"].startswith("req_")
    assert raw.headers["anthropic-ratelimit-requests-limit"] == "4000"
    assert raw.headers["anthropic-ratelimit-output-tokens-reset"].endswith("Z")
    assert sim.stats()["calls_by_key"] == {"alice": 1}


async def test_count_tokens_through_the_sdk(make_sim: SimFactory, make_client: ClientFactory) -> None:
    sim = await make_sim()
    client = make_client(sim)
    counted = await client.messages.count_tokens(model=MODEL, messages=MESSAGES, system="Be brief.")
    message = await client.messages.create(model=MODEL, max_tokens=10, messages=MESSAGES, system="Be brief.")
    assert counted.input_tokens == message.usage.input_tokens


async def test_max_tokens_stop_reason(make_sim: SimFactory, make_client: ClientFactory) -> None:
    sim = await make_sim(SimulatorConfig(output={"fixed_tokens": 50}))
    message = await make_client(sim).messages.create(model=MODEL, max_tokens=5, messages=MESSAGES)
    assert message.stop_reason == "max_tokens"
    assert message.usage.output_tokens == 5


async def test_400_bad_request(make_sim: SimFactory, make_client: ClientFactory) -> None:
    sim = await make_sim()
    with pytest.raises(anthropic.BadRequestError) as info:
        await make_client(sim).messages.create(model=MODEL, max_tokens=10, messages=[])
    assert info.value.status_code == 400
    assert info.value.type == "invalid_request_error"
    assert info.value.request_id is not None
    assert info.value.api_message is not None
    assert "messages" in info.value.api_message


async def test_400_for_an_unknown_field(make_sim: SimFactory, make_client: ClientFactory) -> None:
    sim = await make_sim()
    with pytest.raises(anthropic.BadRequestError, match="frequency_penalty"):
        await make_client(sim).messages.create(
            model=MODEL, max_tokens=10, messages=MESSAGES, extra_body={"frequency_penalty": 1}
        )


async def test_401_authentication(make_sim: SimFactory, make_client: ClientFactory) -> None:
    sim = await make_sim(SimulatorConfig(api_keys={"alice": KEY}))
    with pytest.raises(anthropic.AuthenticationError) as info:
        await make_client(sim, api_key="sk-wrong").messages.create(
            model=MODEL, max_tokens=10, messages=MESSAGES
        )
    assert info.value.type == "authentication_error"


async def test_404_unknown_model(make_sim: SimFactory, make_client: ClientFactory) -> None:
    sim = await make_sim()
    with pytest.raises(anthropic.NotFoundError) as info:
        await make_client(sim).messages.create(model="claude-imaginary-1", max_tokens=10, messages=MESSAGES)
    assert info.value.type == "not_found_error"


async def test_413_content_too_large(make_sim: SimFactory, make_client: ClientFactory) -> None:
    sim = await make_sim(SimulatorConfig(max_body_bytes=1_000))
    with pytest.raises(anthropic.ContentTooLargeError) as info:
        await make_client(sim).messages.create(
            model=MODEL, max_tokens=10, messages=[{"role": "user", "content": "x" * 5_000}]
        )
    assert info.value.status_code == 413
    # Not in the SDK's ErrorType literal, but what the API documents for 413.
    assert info.value.response.json()["error"]["type"] == "request_too_large"


async def test_429_rate_limit_with_retry_after(make_sim: SimFactory, make_client: ClientFactory) -> None:
    sim = await make_sim(SimulatorConfig(limits={"rpm": 4}), clock=FakeClock())
    client = make_client(sim)
    for _ in range(4):
        await client.messages.create(model=MODEL, max_tokens=10, messages=MESSAGES)
    with pytest.raises(anthropic.RateLimitError) as info:
        await client.messages.create(model=MODEL, max_tokens=10, messages=MESSAGES)
    assert info.value.type == "rate_limit_error"
    assert info.value.error_code is None  # a plain rate limit: retryable
    assert info.value.response.headers["retry-after"] == "15"
    assert info.value.response.headers["anthropic-ratelimit-requests-remaining"] == "0"


async def test_429_spend_limit(make_sim: SimFactory, make_client: ClientFactory) -> None:
    sim = await make_sim(SimulatorConfig(faults={"spend_limit_rate": 1.0}))
    with pytest.raises(anthropic.EnforcedSpendLimitReachedError) as info:
        await make_client(sim).messages.create(model=MODEL, max_tokens=10, messages=MESSAGES)
    assert isinstance(info.value, anthropic.RateLimitError)
    assert info.value.error_code == "enforced_spend_limit_reached"
    assert sim.stats()["spend_limit_429"] == 1


async def test_500_internal_server_error(make_sim: SimFactory, make_client: ClientFactory) -> None:
    sim = await make_sim(SimulatorConfig(faults={"api_error_rate": 1.0}))
    with pytest.raises(anthropic.InternalServerError) as info:
        await make_client(sim).messages.create(model=MODEL, max_tokens=10, messages=MESSAGES)
    assert type(info.value) is anthropic.InternalServerError
    assert info.value.status_code == 500
    assert info.value.type == "api_error"


async def test_529_overloaded(make_sim: SimFactory, make_client: ClientFactory) -> None:
    sim = await make_sim(SimulatorConfig(faults={"overloaded_rate": 1.0}))
    with pytest.raises(anthropic.OverloadedError) as info:
        await make_client(sim).messages.create(model=MODEL, max_tokens=10, messages=MESSAGES)
    assert info.value.status_code == 529
    assert info.value.type == "overloaded_error"


async def test_dropped_connection(make_sim: SimFactory, make_client: ClientFactory) -> None:
    sim = await make_sim(SimulatorConfig(faults={"drop_rate": 1.0}, output={"fixed_tokens": 9}))
    client = make_client(sim)
    with pytest.raises(anthropic.APIConnectionError) as info:
        await client.messages.create(model=MODEL, max_tokens=10, messages=MESSAGES)
    assert not isinstance(info.value, anthropic.APITimeoutError)
    stats = sim.stats()
    assert stats["status_counts"] == {"dropped": 1}
    assert stats["output_tokens_total"] == 9  # the work was done (and would be billed)
    # The client recovers on a new connection.
    sim.update_config({"faults": {"drop_rate": 0.0}})
    message = await client.messages.create(model=MODEL, max_tokens=10, messages=MESSAGES)
    assert message.usage.output_tokens == 9
