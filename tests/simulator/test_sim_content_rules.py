"""What the real API answers 400 `invalid_request_error` in a body the SDK's types admit, through
the official SDK: on `/v1/messages`, on `count_tokens` and in a Message Batch entry alike.

The real API's words (service/simulator/semantics.py cites each): "text content blocks must be
non-empty"; "...image.source.base64: invalid base64 data" and "The image was specified using
the image/png media type, but the image appears to be a image/jpeg image"; "unexpected
`tool_use_id` found in `tool_result` blocks" and "`tool_use` ids were found without
`tool_result` blocks immediately after"; "A maximum of 4 blocks with cache_control may be
provided. Found 5."; "tools.N.custom.name: String should match pattern
'^[a-zA-Z0-9_-]{1,128}$'"; "tools: Tool names must be unique."; `inference_geo` is `global` or
`us` (data residency docs). Each case below fails without its rule.
"""

from __future__ import annotations

import base64
import random
from typing import Any

import anthropic
import orjson
import pytest

from bench import estimation, traffic
from bench.chaos.traffic import build_requests
from service.simulator import SimulatorConfig
from service.simulator.validation import COUNT_TOKENS_FIELDS, validate_count_tokens, validate_messages
from tests.simulator.batchkit import ended, results
from tests.simulator.conftest import ClientFactory, SimFactory
from tests.simulator.simkit import MODEL
from tests.support.params import (
    BASE,
    SAMPLES,
    TINY_PNG,
    every_block_conversation,
    tool_groups,
    tool_variants,
    with_field,
)

JPEG = base64.b64encode(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + b"\x00" * 32).decode()
GIF = base64.b64encode(b"GIF89a\x01\x00\x01\x00\x00\x00\x00" + b"\x00" * 16).decode()
WEBP = base64.b64encode(b"RIFF\x24\x00\x00\x00WEBPVP8X" + b"\x00" * 24).decode()
LOOKUP = {"name": "lookup", "input_schema": {"type": "object"}}
CACHED = {"type": "ephemeral"}


def image(media_type: str, data: str) -> dict[str, Any]:
    return {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}


def text(value: str, **extra: Any) -> dict[str, Any]:
    return {"type": "text", "text": value, **extra}


def use(use_id: str) -> dict[str, Any]:
    return {"type": "tool_use", "id": use_id, "name": "lookup", "input": {"term": "x"}}


def result(use_id: str, content: Any = "found") -> dict[str, Any]:
    return {"type": "tool_result", "tool_use_id": use_id, "content": content}


def user(*blocks: Any) -> dict[str, Any]:
    return {"role": "user", "content": list(blocks)}


def assistant(*blocks: Any) -> dict[str, Any]:
    return {"role": "assistant", "content": list(blocks)}


ASK = {"role": "user", "content": "Look it up."}
THANKS = {"role": "user", "content": "Thanks."}

REFUSED: dict[str, tuple[dict[str, Any], str]] = {
    # name: (fields of the body besides model and max_tokens, what the message says)
    "image media_type not its bytes": (
        {"messages": [user(image("image/png", JPEG), text("What is it?"))]},
        "messages.0.content.0.image.source.base64: The image was specified using the image/png media "
        "type, but the image appears to be a image/jpeg image",
    ),
    "image base64 not base64": (
        {"messages": [user(image("image/png", "not base64!"), text("What is it?"))]},
        "messages.0.content.0.image.source.base64: invalid base64 data",
    ),
    "image base64 unpadded": (
        {"messages": [user(image("image/png", TINY_PNG.rstrip("=")), text("What is it?"))]},
        "messages.0.content.0.image.source.base64: invalid base64 data",
    ),
    "image empty": (
        {"messages": [user(image("image/gif", ""), text("What is it?"))]},
        "messages.0.content.0.image.source.base64: image cannot be empty",
    ),
    "image in a tool_result not its media_type": (
        {
            "messages": [
                ASK,
                assistant(use("toolu_1")),
                user(result("toolu_1", [image("image/gif", TINY_PNG)])),
            ]
        },
        "messages.2.content.0.tool_result.content.0.image.source.base64: The image was specified using "
        "the image/gif media type, but the image appears to be a image/png image",
    ),
    "tool_result answering nothing": (
        {"messages": [ASK, assistant(text("Sure.")), user(result("toolu_9"))]},
        "messages.2.content.0: unexpected `tool_use_id` found in `tool_result` blocks: toolu_9. Each "
        "`tool_result` block must have a corresponding `tool_use` block in the previous message.",
    ),
    "tool_result in the first message": (
        {"messages": [user(result("toolu_1"))]},
        "messages.0.content.0: unexpected `tool_use_id` found in `tool_result` blocks: toolu_1",
    ),
    "tool_result answering a tool_use of an earlier turn": (
        {
            "messages": [
                ASK,
                assistant(use("toolu_1")),
                user(result("toolu_1")),
                assistant(text("Anything else?")),
                user(result("toolu_1"), text("Again.")),
            ]
        },
        "messages.4.content.0: unexpected `tool_use_id` found in `tool_result` blocks: toolu_1",
    ),
    "tool_use not answered": (
        {"messages": [ASK, assistant(text("Looking."), use("toolu_1")), THANKS]},
        "messages.1: `tool_use` ids were found without `tool_result` blocks immediately after: toolu_1. "
        "Each `tool_use` block must have a corresponding `tool_result` block in the next message.",
    ),
    "one of two tool_uses not answered": (
        {"messages": [ASK, assistant(use("toolu_1"), use("toolu_2")), user(result("toolu_1"))]},
        "messages.1: `tool_use` ids were found without `tool_result` blocks immediately after: toolu_2.",
    ),
    "thinking in a user turn": (
        {"messages": [user({"type": "thinking", "thinking": "hm", "signature": "sig"}, text("Hi"))]},
        "messages.0.content.0: `thinking` blocks may only appear in `assistant` messages",
    ),
    "redacted_thinking in a user turn": (
        {"messages": [user(text("Hi"), {"type": "redacted_thinking", "data": "abc"})]},
        "messages.0.content.1: `redacted_thinking` blocks may only appear in `assistant` messages",
    ),
    "empty text block": (
        {"messages": [user(text("Hi"), text(""))]},
        "messages.0.content.1.text: text content blocks must be non-empty",
    ),
    "empty text block in an earlier assistant turn": (
        {"messages": [ASK, assistant(text("")), THANKS]},
        "messages.1.content.0.text: text content blocks must be non-empty",
    ),
    "five cache_control blocks": (
        {
            "tools": [{**LOOKUP, "cache_control": CACHED}],
            "system": [text("a", cache_control=CACHED), text("b", cache_control=CACHED)],
            "messages": [user(text("c", cache_control=CACHED), text("d", cache_control=CACHED))],
        },
        "A maximum of 4 blocks with cache_control may be provided. Found 5.",
    ),
    "tool name with a space": (
        {"tools": [{"name": "look up", "input_schema": {"type": "object"}}], "messages": [ASK]},
        "tools.0.custom.name: String should match pattern '^[a-zA-Z0-9_-]{1,128}$'",
    ),
    "tool name with a dot": (
        {"tools": [LOOKUP, {**LOOKUP, "name": "service.lookup"}], "messages": [ASK]},
        "tools.1.custom.name: String should match pattern",
    ),
    "tool name of 129 characters": (
        {"tools": [{**LOOKUP, "name": "t" * 129}], "messages": [ASK]},
        "tools.0.custom.name: String should match pattern",
    ),
    "two tools of one name": (
        {"tools": [LOOKUP, {**LOOKUP, "description": "again"}], "messages": [ASK]},
        "tools: Tool names must be unique.",
    ),
    "a custom tool named as a server tool": (
        {
            "tools": [
                {**LOOKUP, "name": "web_search"},
                {"type": "web_search_20250305", "name": "web_search"},
            ],
            "messages": [ASK],
        },
        "tools: Tool names must be unique.",
    ),
    "tool_choice naming no tool": (
        {"tools": [LOOKUP], "tool_choice": {"type": "tool", "name": "search"}, "messages": [ASK]},
        "tool_choice.name: there is no tool named 'search'",
    ),
    "tool_choice naming a tool without tools": (
        {"tool_choice": {"type": "tool", "name": "lookup"}, "messages": [ASK]},
        "tool_choice.name: there is no tool named 'lookup'",
    ),
}
GEO = {"inference_geo": "eu"}  # count_tokens has no inference_geo field


def _params(fields: dict[str, Any], max_tokens: int | None = 64) -> dict[str, Any]:
    doc: dict[str, Any] = {"model": MODEL, **fields}
    if max_tokens is not None:
        doc["max_tokens"] = max_tokens
    return doc


@pytest.mark.parametrize("case", [*REFUSED, "inference_geo unknown"])
async def test_messages_refuses_what_the_api_refuses(
    make_sim: SimFactory, make_client: ClientFactory, case: str
) -> None:
    fields, says = REFUSED.get(case) or ({**GEO, "messages": [ASK]}, "inference_geo: Input should be")
    sim = await make_sim()
    with pytest.raises(anthropic.BadRequestError) as info:
        await make_client(sim).messages.create(**_params(fields))
    assert info.value.type == "invalid_request_error"
    assert says in str(info.value.api_message)
    assert sim.stats()["status_counts"] == {"400": 1}


@pytest.mark.parametrize("case", list(REFUSED))
async def test_count_tokens_refuses_them_too(
    make_sim: SimFactory, make_client: ClientFactory, case: str
) -> None:
    fields, says = REFUSED[case]
    sim = await make_sim()
    with pytest.raises(anthropic.BadRequestError) as info:
        await make_client(sim).messages.count_tokens(**_params(fields, max_tokens=None))
    assert info.value.type == "invalid_request_error"
    assert says in str(info.value.api_message)


async def test_a_batch_entry_errors_alone_with_the_same_message(
    make_sim: SimFactory, make_client: ClientFactory
) -> None:
    sim = await make_sim(SimulatorConfig(seed=4, batches={"processing_s": 0.1}))
    client = make_client(sim)
    cases = {
        **REFUSED,
        "inference_geo unknown": ({**GEO, "messages": [ASK]}, "inference_geo: Input should be"),
    }
    ids = {f"bad-{i}": case for i, case in enumerate(cases)}
    requests: list[Any] = [{"custom_id": cid, "params": _params(cases[case][0])} for cid, case in ids.items()]
    requests.append({"custom_id": "good", "params": _params({"messages": [ASK]})})
    batch = await client.messages.batches.create(requests=requests)
    assert (await ended(client, batch.id)).request_counts.errored == len(cases)
    by_id = {line.custom_id: line.result for line in await results(client, batch.id)}
    assert by_id["good"].type == "succeeded"
    for cid, case in ids.items():
        outcome = by_id[cid]
        assert outcome.type == "errored", case
        assert outcome.error.error.type == "invalid_request_error", case
        assert cases[case][1] in outcome.error.error.message, case


ACCEPTED: dict[str, dict[str, Any]] = {
    "images whose bytes are their media_type": {
        "messages": [
            user(
                image("image/png", TINY_PNG),
                image("image/jpeg", JPEG),
                image("image/gif", GIF),
                image("image/webp", WEBP),
                text("Which is which?"),
            )
        ]
    },
    "a tool conversation, results in two messages of one turn": {
        "tools": [LOOKUP],
        "tool_choice": {"type": "tool", "name": "lookup"},
        "messages": [
            ASK,
            assistant(text("Two lookups."), use("toolu_1"), use("toolu_2")),
            user(result("toolu_1", [text("one"), image("image/png", TINY_PNG)])),
            user(result("toolu_2"), text("Go on.")),
            assistant(text("Done: one and two.")),
            THANKS,
        ],
    },
    "four cache_control blocks and automatic caching": {
        "cache_control": CACHED,
        "tools": [{**LOOKUP, "cache_control": CACHED}],
        "system": [text("a", cache_control=CACHED)],
        "messages": [user(text("c", cache_control=CACHED), text("d", cache_control=CACHED))],
    },
    "tool_choice naming a server tool": {
        "tools": [LOOKUP, {"type": "web_search_20250305", "name": "web_search"}],
        "tool_choice": {"type": "tool", "name": "web_search"},
        "messages": [ASK],
    },
    "names of 128 characters, digits, dashes and underscores": {
        "tools": [{**LOOKUP, "name": "t" * 128}, {**LOOKUP, "name": "Look-up_2"}],
        "messages": [ASK],
    },
    "inference_geo global": {"inference_geo": "global", "messages": [ASK]},
    "inference_geo null": {"inference_geo": None, "messages": [ASK]},
}


@pytest.mark.parametrize("case", list(ACCEPTED))
async def test_what_the_api_takes_is_still_answered(
    make_sim: SimFactory, make_client: ClientFactory, case: str
) -> None:
    sim = await make_sim()
    client = make_client(sim)
    message = await client.messages.create(**_params(ACCEPTED[case]))
    assert message.type == "message"
    if "inference_geo" not in ACCEPTED[case]:  # not a count_tokens field
        counted = await client.messages.count_tokens(**_params(ACCEPTED[case], max_tokens=None))
        assert counted.input_tokens == message.usage.input_tokens


def _generated() -> list[tuple[str, dict[str, Any]]]:
    """Requests of the project's traffic generators (benches, chaos, the contract samples)."""
    rng = random.Random(11)
    out = [(f"chaos {r.content}", orjson.loads(r.value)["params"]) for r in build_requests(400, 11, "t")]
    out += [("bench", traffic.draw(rng)[1]) for _ in range(200)]
    out += [(f"estimation {kind}", make(rng)) for kind, make in estimation.KINDS.items() for _ in range(10)]
    out += [(f"field {name}", with_field(name)) for name in SAMPLES]
    out += [
        ("all fields", {**SAMPLES, "tools": tools})
        for tools in tool_groups([*SAMPLES["tools"], *tool_variants()])
    ]
    out += [("every block", {**BASE, "messages": every_block_conversation()})]
    return out


def test_the_traffic_generators_send_what_the_api_takes() -> None:
    config = SimulatorConfig()
    for name, params in _generated():
        for header in ("user_profile_id", "workspace_id"):  # the SDK sends these as headers
            params.pop(header, None)
        validate_messages(params, config.models, config.max_tokens_limit)
        count = {k: v for k, v in params.items() if k in COUNT_TOKENS_FIELDS}
        assert validate_count_tokens(count, config.models), name
