"""The partner client against the running gateway: sign, produce, await the correlated outcome."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from service.app import Gateway
from service.partner.client import DeadLettered, PartnerClient
from service.simulator import SimulatorConfig, SimulatorServer
from tests.support.gateway import World, make_world

pytestmark = pytest.mark.integration

SECRET = "sig-client-test-0123456789"
PARAMS = {"model": "claude-haiku-4-5", "max_tokens": 16, "messages": [{"role": "user", "content": "Hi"}]}


@pytest.fixture
async def world(kafka_bootstrap: str, tmp_path: Path) -> World:
    (tmp_path / "acme.k1").write_text(SECRET)
    return await make_world(kafka_bootstrap, tmp_path, ["acme"])


async def test_signed_request_gets_its_response_and_a_bad_one_its_dead_letter(world: World) -> None:
    sim_cfg = SimulatorConfig.model_validate(
        {"api_keys": world.keys, "latency": {"distribution": "fixed", "fixed_s": 0.01}}
    )
    async with SimulatorServer(sim_cfg) as sim:
        signing = {"required": True, "keys": {"k1": {"file": str(world.key_dir / "acme.k1")}}}
        cfg = world.settings_dict(sim.url)
        cfg["partners"][0]["signing"] = signing
        gateway = Gateway(world.settings(sim.url, partners=cfg["partners"]), serve_http=False)
        stop = asyncio.Event()
        task = asyncio.create_task(gateway.run(stop))
        try:
            prefix = f"{world.tag}."
            async with PartnerClient(
                world.bootstrap, "acme", key_id="k1", secret=SECRET, topic_prefix=prefix
            ) as c:
                response = await c.request(PARAMS, request_id="client-1", timeout_s=60)
                assert response["request_id"] == "client-1"
                assert response["message"]["role"] == "assistant"
                with pytest.raises(DeadLettered) as caught:
                    await c.request({**PARAMS, "model": "gpt-5"}, request_id="client-2", timeout_s=60)
                assert caught.value.reason == "unknown_model"
                with pytest.raises(DeadLettered) as caught:  # the same request id again: a replay
                    await c.request(PARAMS, request_id="client-1", timeout_s=60)
                assert caught.value.reason == "replay"
            async with PartnerClient(
                world.bootstrap, "acme", key_id="k1", secret="wrong", topic_prefix=prefix
            ) as c:
                with pytest.raises(DeadLettered) as caught:
                    await c.request(PARAMS, request_id="client-3", timeout_s=60)
                assert caught.value.reason == "bad_signature"
        finally:
            stop.set()
            await asyncio.wait_for(task, 60)
