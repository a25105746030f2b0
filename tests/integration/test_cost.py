"""Cost to the cent, on the real broker with the simulator over real HTTP.

- Mixed traffic (three models at different prices; prompt caching on tools, system and message
  blocks and at the top level, 5-minute and 1-hour TTLs, so the simulator bills cache writes
  and reads; web search; fast mode; Priority Tier; some 500s and 529s retried): the budget
  ledger's spend, `gateway_cost_usd_total` and the sum of the metering records agree (to the
  nano-USD; the requirement is 0.01 USD), every response's `cost` is its metering record's, and
  every cost is what an independent computation from ANTHROPIC.md's multipliers says (cache
  read 0.1x input, 5-minute write 1.25x, 1-hour write 2x), so a kind priced wrong fails here.
- One partner's response topic takes no response: each of its billed calls is dead-lettered
  `response_too_large`, and its metering record says so, once.
- `cache_control` at the top level and on system, message and tool blocks, with `ttl` 5m and
  1h, passes the request schema and reaches Claude: the simulator writes, then reads, the cache.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from fractions import Fraction
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from service.admission.budget import periods
from service.app import Gateway
from service.contracts.schemas import validate
from service.simulator import SimulatorConfig, SimulatorServer
from tests.support.gateway import World, collect, make_world, produce, usage_records

pytestmark = pytest.mark.integration

# USD per million tokens: input, output, cache read, 5-minute write, 1-hour write (None: 2x input)
PRICES: dict[str, dict[str, Any]] = {
    "claude-haiku-4-5": {"input": 1, "output": 5, "read": 0.1, "write_5m": 1.25, "write_1h": None},
    "claude-sonnet-4-6": {"input": 3, "output": 15, "read": 0.3, "write_5m": 3.75, "write_1h": None},
    "claude-opus-4-1": {"input": 15, "output": 75, "read": 1.5, "write_5m": 18.75, "write_1h": 30},
}
PRIORITY = {"claude-sonnet-4-6": 1.5}  # priority_multiplier; 1 for the others
FAST = 6
SEARCH_PER_1K = 10
MODELS = list(PRICES)
EPHEMERAL_5M = {"type": "ephemeral"}  # ttl 5m is the default
EPHEMERAL_1H = {"type": "ephemeral", "ttl": "1h"}


def _models_table() -> dict[str, Any]:
    table = {}
    for model, p in PRICES.items():
        entry = {
            "input_per_mtok_usd": p["input"],
            "output_per_mtok_usd": p["output"],
            "cache_read_per_mtok_usd": p["read"],
            "cache_write_per_mtok_usd": p["write_5m"],
            "priority_multiplier": PRIORITY.get(model, 1),
            "fast_multiplier": FAST,
            "web_search_per_1k_usd": SEARCH_PER_1K,
        }
        if p["write_1h"] is not None:
            entry["cache_write_1h_per_mtok_usd"] = p["write_1h"]
        table[model] = entry
    return table


def _expected_nano_usd(model: str, usage: dict[str, Any]) -> Fraction:
    """The cost from ANTHROPIC.md's rules, computed here without the gateway's pricing code."""
    p = {k: Fraction(str(v)) for k, v in PRICES[model].items() if v is not None}
    one_hour = p.get("write_1h", 2 * p["input"])
    split = usage.get("cache_creation") or {}
    per_mtok = (
        usage["input_tokens"] * p["input"]
        + usage["output_tokens"] * p["output"]
        + usage["cache_read_input_tokens"] * p["read"]
        + split["ephemeral_5m_input_tokens"] * p["write_5m"]
        + split["ephemeral_1h_input_tokens"] * one_hour
    )
    tier = Fraction(str(PRIORITY.get(model, 1))) if usage.get("service_tier") == "priority" else 1
    speed = FAST if usage.get("speed") == "fast" else 1
    searches = (usage.get("server_tool_use") or {}).get("web_search_requests", 0)
    return per_mtok * tier * speed * 1000 + Fraction(searches * SEARCH_PER_1K * 10**9, 1000)


LONG_SYSTEM = "You answer questions about the partner's catalogue, briefly and exactly. " * 120
LONG_DOCUMENT = "Clause 7.2: the supplier delivers within thirty days of the order. " * 130
LOOKUP_TOOL = {
    "name": "lookup",
    "description": "Look a catalogue term up. " + "term " * 1200,
    "input_schema": {"type": "object", "properties": {"term": {"type": "string"}}, "required": ["term"]},
}
KINDS = ("plain", "system_5m", "tool_1h_system_5m", "message_block_5m", "automatic_1h", "web_search", "fast")


def _params(kind: str, model: str, wave: int, i: int) -> dict[str, Any]:
    question = {"role": "user", "content": f"Question {i}: which clause applies?"}
    p: dict[str, Any] = {"model": model, "max_tokens": 64, "messages": [question]}
    if kind == "system_5m":
        p["system"] = [{"type": "text", "text": LONG_SYSTEM, "cache_control": EPHEMERAL_5M}]
    elif kind == "tool_1h_system_5m":
        p["tools"] = [{**LOOKUP_TOOL, "cache_control": EPHEMERAL_1H}]
        p["system"] = [{"type": "text", "text": LONG_SYSTEM + model, "cache_control": EPHEMERAL_5M}]
    elif kind == "message_block_5m":
        document = {
            "type": "text",
            "text": LONG_DOCUMENT,
            "cache_control": {"type": "ephemeral", "ttl": "5m"},
        }
        p["messages"] = [{"role": "user", "content": [document, {"type": "text", "text": f"Question {i}?"}]}]
    elif kind == "automatic_1h":  # the conversation grows in the second wave: reads what the first wrote
        p["cache_control"] = EPHEMERAL_1H
        p["messages"] = [{"role": "user", "content": LONG_DOCUMENT + model}]
        if wave == 2:
            p["messages"] += [{"role": "assistant", "content": "Noted."}, {"role": "user", "content": "And?"}]
    elif kind == "web_search":
        p["tools"] = [{"type": "web_search_20250305", "name": "web_search", "max_uses": 1}]
    elif kind == "fast":
        p["speed"] = "fast"
    if i % 4 == 0:
        p["service_tier"] = "auto"  # the simulated organisation has Priority Tier: billed priority
    return p


def _wave(world: World, wave: int) -> list[tuple[str, bytes | None, bytes | None]]:
    messages = []
    for partner, models in (("acme", MODELS), ("globex", MODELS[wave - 1 : wave])):
        for kind in KINDS:
            for model in models:
                i = len(messages)
                rid = f"{partner}-w{wave}-{kind}-{model}"
                doc = {"request_id": rid, "params": _params(kind, model, wave, i)}
                validate("request", doc)
                messages.append((world.request_topic(partner), rid.encode(), orjson.dumps(doc)))
    return messages


async def _refuse_responses(world: World, partner: str) -> None:
    """The partner's response topic takes no response (each is over 1,200 bytes)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=world.bootstrap)
    await admin.start()
    try:
        topic = world.response_topic(partner)
        await admin.alter_configs(
            [ConfigResource(ConfigResourceType.TOPIC, topic, {"max.message.bytes": "1200"})]
        )
    finally:
        await admin.close()


@pytest.fixture
async def world(kafka_bootstrap: str, tmp_path: Path) -> World:
    return await make_world(kafka_bootstrap, tmp_path, ["acme", "globex"], partitions=2)


async def test_budgets_metrics_and_metering_agree_to_the_cent_on_mixed_traffic(world: World) -> None:
    await _refuse_responses(world, "globex")
    budget = {"usd_per_month": 1_000}
    overrides = {
        "models": _models_table(),
        "partners": [{**p, "budget": budget} for p in world.settings_dict("x")["partners"]],
    }
    sim_config = SimulatorConfig.model_validate(
        {
            "api_keys": world.keys,
            "seed": 11,
            "priority_tier": True,
            "output": {"distribution": "uniform", "min_tokens": 5, "max_tokens": 60},
            "faults": {"api_error_rate": 0.03, "overloaded_rate": 0.03},
        }
    )
    first, second = _wave(world, 1), _wave(world, 2)
    async with SimulatorServer(sim_config) as sim:
        settings = world.settings(sim.url, **overrides)
        gateway = Gateway(settings, serve_http=False)
        stop = asyncio.Event()
        task = asyncio.create_task(gateway.run(stop))
        try:
            await produce(world.bootstrap, first)
            await collect(world, len(first), timeout_s=120)
            await produce(world.bootstrap, second)  # the prompts the first wave cached: reads
            out = await collect(world, len(first) + len(second), timeout_s=120, settle_s=1.0)
            records = await usage_records(world, len(first) + len(second))
            month = next(p for p in periods(settings.partners[0].budget, time.time()) if p.name == "month")
            ledger_nano = sum(gateway.budgets.local.used(p, month).nusd for p in world.partners)
            registry = gateway.metrics.registry
            metric_usd = sum(
                registry.get_sample_value("gateway_cost_usd_total", {"partner": p, "model": m}) or 0.0
                for p in world.partners
                for m in MODELS
            )
        finally:
            stop.set()
            await asyncio.wait_for(task, 60)

    # every request: one outcome; acme's are responses, globex's could not be published
    assert out.total == len(first) + len(second)
    assert all(n == 1 for n in out.request_ids().values())
    assert {d["partner"] for d in out.responses} == {"acme"}
    globex = sum(1 for topic, _, _ in first + second if topic == world.request_topic("globex"))
    assert out.reasons() == {"response_too_large": globex}

    # one metering record per billed call, none twice, each the outcome's
    by_id = {(r["partner"], r["request_id"]): r for r in records}
    assert len(records) == len(by_id) == out.total, Counter((r["partner"], r["request_id"]) for r in records)
    for r in records:
        validate("usage", r)
    for doc in out.responses:
        validate("response", doc)
        record = by_id[(doc["partner"], doc["request_id"])]
        assert (record["outcome"], record["outcome_reason"], record["served_by"]) == (
            "response",
            None,
            "realtime",
        )
        assert record["cost"] == doc["cost"]
        assert record["usage"] == doc["usage"]
        assert (record["upstream_request_id"], record["attempts"]) == (
            doc["upstream_request_id"],
            doc["attempts"],
        )
        assert record["model"] == doc["message"]["model"]
    for dl in out.dead_letters:
        record = by_id[(dl["partner"], dl["request_id"])]
        assert (record["outcome"], record["outcome_reason"]) == ("deadletter", "response_too_large")
        assert record["usage"] == dl["response"]["usage"]
        assert record["origin"] == {k: dl["original"][k] for k in ("topic", "partition", "offset")}
    assert len({tuple(r["origin"].values()) for r in records}) == len(records)

    # every cost is what ANTHROPIC.md's multipliers make of its usage, to a few nano-USD
    for r in records:
        cost = r["cost"]
        assert cost["price_version"].startswith("auto-")
        assert cost["nano_usd"] == sum(part["nano_usd"] for part in cost["breakdown"].values())
        assert abs(cost["nano_usd"] - _expected_nano_usd(r["model"], r["usage"])) <= 4, r
        assert cost["usd"] == cost["nano_usd"] / 1e9

    # the traffic exercised every kind the simulator bills, at more than one price
    units = Counter(
        {kind: sum(r["cost"]["breakdown"][kind]["units"] for r in records) for kind in r["cost"]["breakdown"]}
    )
    for kind in ("input", "output", "cache_read", "cache_write_5m", "cache_write_1h", "web_search"):
        assert units[kind] > 0, f"no {kind} billed: the test would not catch it priced wrong"
    assert {r["model"] for r in records if r["cost"]["breakdown"]["cache_read"]["units"]} == set(MODELS)
    assert any(r["cost"]["speed"] == "fast" for r in records)
    assert any(r["cost"]["multipliers"]["service_tier"] == 1.5 for r in records)
    assert any(r["attempts"] > 1 for r in records), "some 500s and 529s were retried"

    # the three agree: the ledger and the records to the nano-USD, the metric to float precision
    metering_nano = sum(r["cost"]["nano_usd"] for r in records)
    metering_usd = metering_nano / 1e9
    assert ledger_nano == metering_nano
    assert metric_usd == pytest.approx(metering_usd, abs=1e-9)
    ledger_usd = ledger_nano / 1e9
    for a, b in ((ledger_usd, metering_usd), (metric_usd, metering_usd), (ledger_usd, metric_usd)):
        assert abs(a - b) <= 0.01
    assert metering_usd > 0.05  # enough spend that a kind priced wrong shows by more than a cent


PLACEMENTS: dict[str, tuple[dict[str, Any], str]] = {
    "top level, 5m": (
        {"cache_control": EPHEMERAL_5M, "messages": [{"role": "user", "content": LONG_DOCUMENT + "a"}]},
        "5m",
    ),
    "top level, 1h": (
        {"cache_control": EPHEMERAL_1H, "messages": [{"role": "user", "content": LONG_DOCUMENT + "b"}]},
        "1h",
    ),
    "system block, 5m": (
        {"system": [{"type": "text", "text": LONG_SYSTEM, "cache_control": EPHEMERAL_5M}]},
        "5m",
    ),
    "system block, 1h": (
        {"system": [{"type": "text", "text": LONG_SYSTEM + "c", "cache_control": EPHEMERAL_1H}]},
        "1h",
    ),
    "message block, 1h": (
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": LONG_DOCUMENT, "cache_control": EPHEMERAL_1H},
                        {"type": "text", "text": "Which clause?"},
                    ],
                }
            ]
        },
        "1h",
    ),
    "tool, 1h": ({"tools": [{**LOOKUP_TOOL, "cache_control": EPHEMERAL_1H}]}, "1h"),
    "tool, 5m": (
        {
            "tools": [
                {
                    **LOOKUP_TOOL,
                    "description": "Other. " + LOOKUP_TOOL["description"],
                    "cache_control": EPHEMERAL_5M,
                }
            ]
        },
        "5m",
    ),
}


async def test_prompt_caching_parameters_pass_the_schema_and_reach_claude(world: World) -> None:
    base = {
        "model": "claude-haiku-4-5",
        "max_tokens": 32,
        "messages": [{"role": "user", "content": "Which clause?"}],
    }

    def wave(n: int) -> list[tuple[str, bytes | None, bytes | None]]:
        out = []
        for name, (fields, _) in PLACEMENTS.items():
            doc = {
                "request_id": f"{name.replace(' ', '').replace(',', '-')}-{n}",
                "params": {**base, **fields},
            }
            validate("request", doc)
            out.append((world.request_topic("acme"), None, orjson.dumps(doc)))
        return out

    async with SimulatorServer(SimulatorConfig.model_validate({"api_keys": world.keys, "seed": 3})) as sim:
        gateway = Gateway(world.settings(sim.url), serve_http=False)
        stop = asyncio.Event()
        task = asyncio.create_task(gateway.run(stop))
        try:
            await produce(world.bootstrap, wave(1))
            await collect(world, len(PLACEMENTS), timeout_s=60)
            await produce(world.bootstrap, wave(2))
            out = await collect(world, 2 * len(PLACEMENTS), timeout_s=60)
        finally:
            stop.set()
            await asyncio.wait_for(task, 60)
    assert not out.dead_letters, out.reasons()
    usage = {d["request_id"]: d["usage"] for d in out.responses}
    for name, (_, ttl) in PLACEMENTS.items():
        rid = name.replace(" ", "").replace(",", "-")
        written, read = usage[f"{rid}-1"], usage[f"{rid}-2"]
        assert written["cache_creation"][f"ephemeral_{ttl}_input_tokens"] >= 1024, (name, written)
        assert (
            written["cache_creation_input_tokens"]
            == written["cache_creation"][f"ephemeral_{ttl}_input_tokens"]
        )
        assert read["cache_read_input_tokens"] == written["cache_creation_input_tokens"], (name, read)
