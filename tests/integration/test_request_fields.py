"""The request contract end to end, on the real broker, with the simulator over real HTTP.

- one request per field the SDK takes, with ordinary values: each gets a response;
- the old sampling fields, `stream` and transport options each get a dead letter naming the
  field, never `internal_error`;
- `max_tokens` as a float, a string, 0, negative or huge: each its reason;
- a partner's policy on `service_tier`, `speed`, `inference_geo`, `workspace_id` and server tools;
- what the SDK refuses before sending, and what Claude answers 400, is `invalid_request` with
  their message; only a fault of the gateway itself is `internal_error`, and it is counted.

ANTHROPIC.md: `create(temperature=...)` raises TypeError in SDK 2.13; a 400 is not retried.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orjson
import pytest

from service.admission.admit import RecordLike, Rejected
from service.admission.registry import Partner
from service.app import Gateway
from service.contracts.schemas import validate
from service.simulator import SimulatorConfig, SimulatorServer
from service.upstream.client import ClaudeClient, UpstreamResult
from tests.support.gateway import World, collect, make_world, produce
from tests.support.params import (
    BASE,
    SAMPLES,
    every_block_conversation,
    tool_groups,
    tool_variants,
    with_field,
)
from tests.support.trust import metric

pytestmark = pytest.mark.integration

STRICT_POLICY = {
    "service_tier": ["standard_only"],
    "speed": ["standard"],
    "inference_geo": ["us"],
    "workspace_id": [],
    "server_tools": [],
}
WEB_SEARCH = {"type": "web_search_20250305", "name": "web_search", "max_uses": 2}


class _FaultyClaude(ClaudeClient):
    """The gateway's own client with a bug planted for one request id."""

    async def create_message(
        self, partner_id: str, params: Mapping[str, Any], *, request_key: str | None = None
    ) -> UpstreamResult:
        if request_key is not None and request_key.endswith(":gateway-bug"):
            raise RuntimeError("a bug of the gateway")
        return await super().create_message(partner_id, params, request_key=request_key)


def _sdk_drift(rec: RecordLike, partner: Partner, doc: dict[str, Any]) -> Rejected | None:
    """As if the schema admitted a field the SDK no longer takes: it reaches create()."""
    if doc.get("request_id") == "sdk-refusal":
        doc["params"]["temperature"] = 0.5
    return None


def _value(rid: str, params: dict[str, Any]) -> bytes:
    return orjson.dumps({"request_id": rid, "params": params})


def _raw_max_tokens(rid: str, literal: bytes) -> bytes:
    return (
        b'{"request_id": "' + rid.encode() + b'", "params": {"model": "' + BASE["model"].encode() + b'", '
        b'"max_tokens": ' + literal + b', "messages": [{"role": "user", "content": "Hi"}]}}'
    )


@pytest.fixture
async def world(kafka_bootstrap: str, tmp_path: Path) -> World:
    return await make_world(kafka_bootstrap, tmp_path, ["acme", "strict"], partitions=2)


async def test_every_sdk_field_answered_and_every_mistake_its_own_reason(world: World) -> None:
    acme, strict = world.request_topic("acme"), world.request_topic("strict")
    answered: dict[str, tuple[str, bytes]] = {
        f"field-{n}": (acme, _value(f"field-{n}", with_field(n))) for n in SAMPLES
    }
    for k, tools in enumerate(tool_groups([*SAMPLES["tools"], *tool_variants()])):  # names unique
        answered[f"all-fields-{k}"] = (acme, _value(f"all-fields-{k}", {**SAMPLES, "tools": tools}))
    blocks = {**BASE, "messages": every_block_conversation()}
    answered["all-blocks"] = (acme, _value("all-blocks", blocks))
    allowed = {**BASE, "service_tier": "standard_only", "speed": "standard", "inference_geo": "us"}
    answered["strict-allowed"] = (strict, _value("strict-allowed", allowed))
    # rid -> (topic, value, reason, words the detail must contain)
    refused: dict[str, tuple[str, bytes, str, str]] = {}
    for name, value in [("temperature", 0.5), ("top_p", 0.9), ("top_k", 40), ("stream", True),
                        ("extra_headers", {"x": "y"}), ("timeout", 30)]:  # fmt: skip
        refused[f"old-{name}"] = (
            acme,
            _value(f"old-{name}", {**BASE, name: value}),
            "schema_violation",
            f"params.{name}",
        )
    for rid, literal, reason, says in [
        ("mt-float", b"32.0", "schema_violation", "JSON integer"),
        ("mt-exponent", b"1e3", "schema_violation", "JSON integer"),
        ("mt-string", b'"32"', "schema_violation", "a string"),
        ("mt-zero", b"0", "schema_violation", "pre-warming"),
        ("mt-negative", b"-5", "schema_violation", "at least 1"),
        ("mt-huge-float", b"1e30", "schema_violation", "beyond 64 bits"),
        ("mt-huge-int", b"1" + b"0" * 30, "schema_violation", "beyond 64 bits"),
        ("mt-over-model", b"64001", "max_tokens_exceeded", "documented maximum of claude-haiku-4-5"),
    ]:
        refused[rid] = (acme, _raw_max_tokens(rid, literal), reason, says)
    for rid, extra, says in [
        ("pol-tier", {"service_tier": "auto"}, "policy.service_tier"),
        ("pol-speed", {"speed": "fast"}, "policy.speed"),
        ("pol-geo", {"inference_geo": "eu"}, "policy.inference_geo"),
        ("pol-workspace", {"workspace_id": "wrkspc_other"}, "policy.workspace_id"),
        ("pol-tool", {"tools": [WEB_SEARCH]}, "server tool 'web_search'"),
    ]:
        refused[rid] = (strict, _value(rid, {**BASE, **extra}), "param_not_allowed", says)
    first_assistant = {**BASE, "messages": [{"role": "assistant", "content": "Hi"}]}
    refused["claude-400"] = (acme, _value("claude-400", first_assistant), "invalid_request", "HTTP 400")
    refused["sdk-refusal"] = (acme, _value("sdk-refusal", BASE), "invalid_request", "'temperature'")
    refused["gateway-bug"] = (acme, _value("gateway-bug", BASE), "internal_error", "RuntimeError")

    partners = world.settings_dict("x")["partners"]
    partners[1] = {**partners[1], "policy": STRICT_POLICY}
    sim_cfg = SimulatorConfig.model_validate({"api_keys": world.keys, "output": {"fixed_tokens": 5}})
    async with SimulatorServer(sim_cfg) as sim:
        settings = world.settings(sim.url, partners=partners)
        gateway = Gateway(settings, claude=_FaultyClaude(settings.anthropic), serve_http=False)
        gateway.admission.extra_checks.append(_sdk_drift)
        stop = asyncio.Event()
        task = asyncio.create_task(gateway.run(stop))
        try:
            messages = [(t, rid.encode(), v) for rid, (t, v) in answered.items()]
            messages += [(t, rid.encode(), v) for rid, (t, v, _, _) in refused.items()]
            await produce(world.bootstrap, messages)
            out = await collect(world, len(messages), timeout_s=120, settle_s=1.0)
        finally:
            stop.set()
            await task
        calls = sim.stats()["status_counts"]

    responses = {d["request_id"]: d for d in out.responses}
    dead = {d["request_id"]: d for d in out.dead_letters}
    assert out.total == len(messages)
    assert set(responses) == set(answered), (
        f"dead-lettered: { {k: dead[k]['detail'] for k in dead.keys() & answered.keys()} }"
    )
    for rid, (_, _, reason, says) in refused.items():
        dl = dead[rid]
        validate("deadletter", dl)
        assert (dl["reason"], says in dl["detail"]) == (reason, True), (rid, dl["reason"], dl["detail"])
        assert dl["retryable"] is (reason == "internal_error")
    assert dead["claude-400"]["upstream"]["status"] == 400
    assert "first message" in dead["claude-400"]["detail"]  # the simulator's own words
    assert dead["claude-400"]["attempts"] == 1  # a 400 is not retried
    # the refused never reached Claude: answered ones, plus the one 400
    assert calls == {"200": len(answered), "400": 1}
    # served as asked, reported in usage
    assert responses["field-speed"]["usage"]["speed"] == "fast"
    assert responses["field-service_tier"]["usage"]["service_tier"] == "standard"
    assert responses["field-inference_geo"]["usage"]["inference_geo"] == "us"
    # only the gateway's own fault counts as an internal error
    assert metric(gateway.metrics.registry, "gateway_internal_errors_total") == 1
    assert metric(gateway.metrics.registry, "gateway_internal_errors_total", {"partner": "acme"}) == 1
