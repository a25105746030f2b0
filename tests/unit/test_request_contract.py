"""The request contract follows the installed SDK: the checked-in schema is what the generator
derives from it, every field it admits goes through the SDK's create() unchanged, every field
the SDK takes is admitted or refused with a documented reason, and refusals name the field.

ANTHROPIC.md: the body `AsyncMessages.create` takes is typed by `MessageCreateParams`, the
source of truth; `temperature`, `top_p` and `top_k` are gone (`create(temperature=...)` raises
TypeError).
"""

from __future__ import annotations

import importlib.util
import inspect
import json
from pathlib import Path
from typing import Any

import anthropic
import h11
import httpx2
import orjson
import pytest
from pydantic import SecretStr

from service.admission.admit import Admission, Admitted, Record, Rejected
from service.admission.registry import Registry
from service.config.loader import parse_config
from service.config.settings import AnthropicSettings
from service.contracts.params import (
    CLIENT_TOOLS,
    HEADER_FIELDS,
    MAX_HEADER_FIELD_CHARS,
    REFUSED,
    REMOVED,
    SERVER_TOOLS,
    TRANSPORT_OPTIONS,
    check_request,
    header_field_problem,
    params_schema,
    refused_reason,
    server_tools,
    tool_family,
)
from service.contracts.reasons import Reason
from service.contracts.schemas import SchemaViolation, load_schema, validate
from service.contracts.sdk_schema import sdk_fields
from service.upstream.client import ClaudeClient
from tests.support.params import (
    BASE,
    SAMPLES,
    admitted_fields,
    tool_variants,
    user_block_variants,
    with_field,
)

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gen_request_schema.py"
DOC = ROOT / "docs" / "request-contract.md"
OK_BODY = {
    "id": "msg_1", "type": "message", "role": "assistant", "model": BASE["model"],
    "content": [{"type": "text", "text": "ok"}], "stop_reason": "end_turn", "stop_sequence": None,
    "usage": {"input_tokens": 3, "output_tokens": 1},
}  # fmt: skip


PNG = {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}


def _doc(params: dict[str, Any]) -> dict[str, Any]:
    return {"request_id": "r-1", "params": params}


# -- the checked-in schema is the generator's output ----------------------------------------------


def _script() -> Any:
    spec = importlib.util.spec_from_file_location("gen_request_schema", SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_checked_in_schema_is_what_the_installed_sdk_gives(capsys: pytest.CaptureFixture[str]) -> None:
    assert _script().main(["--check"]) == 0, capsys.readouterr().err
    assert f"up to date with anthropic {anthropic.__version__}" in capsys.readouterr().out


def test_the_check_fails_when_the_file_drifts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    script = _script()
    doc = json.loads((ROOT / "schemas" / "request.v1.json").read_text())
    doc["properties"]["params"]["properties"]["temperature"] = {"type": "number"}  # the old contract
    stale = tmp_path / "request.v1.json"
    stale.write_text(json.dumps(doc))
    assert script.main(["--check", "--path", str(stale)]) == 1
    assert "gen_request_schema.py" in capsys.readouterr().err
    assert script.main(["--path", str(stale)]) == 0  # regenerating repairs it
    assert script.main(["--check", "--path", str(stale)]) == 0
    assert "temperature" not in json.loads(stale.read_text())["properties"]["params"]["properties"]


# -- every SDK field admitted or refused with a reason -----------------------------------------------


def test_every_field_of_create_is_admitted_or_refused_with_a_documented_reason() -> None:
    takes = set(inspect.signature(anthropic.resources.messages.AsyncMessages.create).parameters) - {"self"}
    assert set(sdk_fields()) <= takes
    admitted = admitted_fields()
    refused = {name for name in takes if refused_reason(name) is not None}
    assert admitted | refused == takes, f"neither admitted nor refused: {takes - admitted - refused}"
    assert not admitted & refused
    assert refused == set(REFUSED) | set(TRANSPORT_OPTIONS)
    docs = DOC.read_text()
    for name in refused | set(REMOVED):
        assert f"`{name}`" in docs, f"docs/request-contract.md does not say why {name} is refused"


def test_the_schema_admits_nothing_the_sdk_does_not_take() -> None:
    assert admitted_fields() <= set(sdk_fields())
    assert not admitted_fields() & set(REMOVED)
    assert load_schema("request")["properties"]["params"] == params_schema()


def test_samples_cover_every_admitted_field() -> None:
    assert set(SAMPLES) == admitted_fields()


# -- what the schema admits, the SDK's create() takes and sends unchanged ------------------------------


async def _sent_through_the_gateways_client(params: dict[str, Any]) -> httpx2.Request:
    seen: list[httpx2.Request] = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        seen.append(request)
        return httpx2.Response(
            200, content=orjson.dumps(OK_BODY), headers={"content-type": "application/json"}
        )

    client = ClaudeClient(
        AnthropicSettings(base_url="http://claude.test"),
        http_client=httpx2.AsyncClient(transport=httpx2.MockTransport(handler)),
    )
    client.sync_keys({"acme": SecretStr("sk-test")})
    try:
        result = await client.create_message("acme", params, request_key="acme:r-1")
    finally:
        await client.aclose()
    assert result.body["id"] == "msg_1"
    assert len(seen) == 1
    return seen[0]


@pytest.mark.parametrize("name", sorted(SAMPLES))
async def test_each_admitted_field_passes_the_schema_and_the_sdk_sends_it(name: str) -> None:
    params = with_field(name)
    check_request(_doc(params))
    request = await _sent_through_the_gateways_client(params)
    body = orjson.loads(request.content)
    if name in HEADER_FIELDS:
        assert request.headers[HEADER_FIELDS[name]] == SAMPLES[name]
        assert name not in body
    else:
        assert body[name] == SAMPLES[name]


async def test_every_field_at_once_and_every_tool_and_content_block() -> None:
    params = {**SAMPLES, "tools": [*SAMPLES["tools"], *tool_variants()]}
    params["messages"] = [{"role": "user", "content": user_block_variants()}]
    check_request(_doc(params))
    body = orjson.loads((await _sent_through_the_gateways_client(params)).content)
    assert body["tools"] == params["tools"]
    assert body["messages"] == params["messages"]
    assert len(body["tools"]) == 22
    assert {b["type"] for b in body["messages"][0]["content"]} >= {"text", "image", "document", "tool_result"}


async def test_a_name_given_twice_is_read_once_by_the_policy_and_the_call_alike() -> None:
    """Last one wins, and the Claude call sends what the policy checked: a duplicate cannot pass
    `allowed_models` and `max_tokens_cap` with one value and reach Claude with another."""
    registry = Registry.build(
        parse_config(
            {
                "partners": [
                    {
                        "id": "acme",
                        "api_key": {"env": "K"},
                        "allowed_models": [BASE["model"]],
                        "max_tokens_cap": 50,
                    },
                    {"id": "globex", "api_key": {"env": "K"}},
                ]
            }
        ),
        environ={"K": "sk-test"},
    )
    value = (
        b'{"request_id": "r-1", "partner": "globex", "params": {"model": "claude-opus-4-1", '
        b'"max_tokens": 4000, "messages": [{"role": "user", "content": "hi"}], '
        b'"model": "' + BASE["model"].encode() + b'", "max_tokens": 20}, '
        b'"request_id": "r-2", "partner": "acme"}'
    )
    verdict = Admission(registry).admit(Record("claude.requests.acme", 0, 1, 0, b"k", value, ()))
    assert isinstance(verdict, Admitted), verdict
    assert (verdict.request_id, verdict.model, verdict.max_tokens) == ("r-2", BASE["model"], 20)
    body = orjson.loads((await _sent_through_the_gateways_client(verdict.params)).content)
    assert (body["model"], body["max_tokens"]) == (BASE["model"], 20)
    first_wins = value.replace(b', "model": "' + BASE["model"].encode() + b'", "max_tokens": 20}', b"}")
    refused = Admission(registry).admit(Record("claude.requests.acme", 0, 2, 0, b"k", first_wins, ()))
    assert isinstance(refused, Rejected)
    assert refused.reason is Reason.MODEL_NOT_ALLOWED


def test_old_v1_requests_still_pass() -> None:
    """Every shape the old contract took (and Claude accepts) is still v1."""
    old = [
        {"request_id": "a", "params": BASE},
        {"request_id": "b", "schema_version": 1, "partner": "acme", "metadata": {"k": "v"}, "params": BASE},
        _doc({**BASE, "system": "Be brief.", "stop_sequences": ["x"], "metadata": {"user_id": "u"}}),
        _doc({**BASE, "system": [{"type": "text", "text": "Be brief."}]}),
        _doc({**BASE, "messages": [
            {"role": "user", "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image", "source": PNG},
            ]},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "look", "input": {}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "a cat"}]},
        ]}),
        _doc({**BASE, "max_tokens": 2048, "thinking": {"type": "enabled", "budget_tokens": 1024}}),
        _doc({**BASE, "tools": [{"name": "look", "input_schema": {"type": "object"}}],
              "tool_choice": {"type": "tool", "name": "look"}}),
        _doc({**BASE, "tools": [{"type": "web_search_20250305", "name": "web_search", "max_uses": 3}]}),
    ]  # fmt: skip
    for doc in old:
        check_request(doc)


# -- refusals name the field ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted([*REFUSED, *TRANSPORT_OPTIONS, *REMOVED]))
def test_a_refused_field_is_named_with_its_reason(name: str) -> None:
    with pytest.raises(SchemaViolation) as info:
        check_request(_doc({**BASE, name: 0.5}))
    assert str(info.value).startswith(f"params.{name} is refused: ")
    assert refused_reason(name) in str(info.value)


@pytest.mark.parametrize(
    ("value", "says"),
    [
        (32.0, "JSON integer"),
        (1e3, "JSON integer"),
        (1e30, "beyond 64 bits"),
        ("32", "a string"),
        (True, "boolean"),
        (None, "null"),
        (0, "pre-warming"),
        (-5, "at least 1"),
    ],
)
def test_max_tokens_is_a_positive_json_integer(value: Any, says: str) -> None:
    raw = orjson.dumps(_doc({**BASE, "max_tokens": value}))
    with pytest.raises(SchemaViolation) as info:
        check_request(orjson.loads(raw))
    assert "params.max_tokens" in str(info.value)
    assert says in str(info.value)


def test_a_huge_integer_literal_is_refused_by_name() -> None:
    raw = b'{"request_id": "r", "params": {"model": "m", "max_tokens": 1000000000000000000000000000000,'
    raw += b' "messages": [{"role": "user", "content": "x"}]}}'
    with pytest.raises(SchemaViolation, match=r"params\.max_tokens .*beyond 64 bits"):
        check_request(orjson.loads(raw))


@pytest.mark.parametrize(
    ("params", "says"),
    [
        ({"service_tier": "priority"}, "params.service_tier must be one of"),
        ({"speed": "turbo"}, "params.speed must be one of"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": "x", "foo": 1}]}]}, "foo"),
        ({"messages": [{"role": "user", "content": [{"type": "txt"}]}]}, "content[0].type must be one of"),
        ({"thinking": {"type": "enabled"}}, "budget_tokens"),
        ({"tools": [{"type": "web_search_20250305", "name": "web_search", "max_uses": 2.0}]}, "max_uses"),
        ({"unheard_of": 1}, "unheard_of"),
    ],
)
def test_deeper_mistakes_name_their_place(params: dict[str, Any], says: str) -> None:
    with pytest.raises(SchemaViolation) as info:
        check_request(_doc({**BASE, **params}))
    assert says in str(info.value)


# -- the fields the SDK sends as HTTP headers hold what HTTP can carry ----------------------------------

UNSENDABLE = {  # a value the SDK would put in a header: what the refusal says
    "line feed": ("a\nb", "the character U+000A (line feed) at index 1"),
    "carriage return": ("a\rb", "the character U+000D (carriage return) at index 1"),
    "NUL": ("a\x00b", "the character U+0000 (NUL) at index 1"),
    "a space only": (" ", "the character U+0020 (space) at index 0"),
    "a final line feed": ("wrkspc_01\n", "U+000A (line feed) at index 9"),
    "a space inside": ("wrkspc 01", "U+0020 (space) at index 6"),
    "a tab": ("wrkspc_01\t", "the character U+0009 (tab) at index 9"),
    "DEL": ("wrkspc_\x7f", "the character U+007F at index 7"),
    "non-ASCII": ("wrkspc_\u00e9", "the non-ASCII character U+00E9 at index 7"),
    "empty": ("", "it is empty"),
    "100 KB": ("w" * 100_000, "it is 100000 characters long"),
    "one too many": (
        "w" * (MAX_HEADER_FIELD_CHARS + 1),
        f"it is {MAX_HEADER_FIELD_CHARS + 1} characters long",
    ),
}


@pytest.mark.parametrize("name", sorted(HEADER_FIELDS))
@pytest.mark.parametrize("case", sorted(UNSENDABLE))
def test_a_header_field_http_cannot_carry_is_refused_by_name(name: str, case: str) -> None:
    """Such a value used to pass, then fail every attempt to write the request (h11 refuses it),
    read as a connection failure: a `retries_exhausted` dead letter after 6 attempts."""
    value, says = UNSENDABLE[case]
    with pytest.raises(SchemaViolation) as info:
        check_request(_doc({**BASE, name: value}))
    message = str(info.value)
    assert message.startswith(f"params.{name} must be 1 to 256 printable ASCII characters, "), message
    assert f"(it is sent as the HTTP header {HEADER_FIELDS[name]})" in message
    assert message.endswith(says)
    assert len(message) < 300  # the value is not quoted
    with pytest.raises(SchemaViolation, match=rf"^data\.params\.{name} must "):  # the schema alone too
        validate("request", _doc({**BASE, name: value}))


def test_a_header_field_http_cannot_carry_is_a_schema_violation_at_admission() -> None:
    registry = Registry.build(
        parse_config({"partners": [{"id": "acme", "api_key": {"env": "K"}}]}), {"K": "k"}
    )
    for offset, (name, value) in enumerate([("workspace_id", "a\nb"), ("user_profile_id", "a\x00b")]):
        raw = orjson.dumps({"request_id": f"r-{offset}", "params": {**BASE, name: value}})
        verdict = Admission(registry).admit(Record("claude.requests.acme", 0, offset, 0, b"k", raw, ()))
        assert isinstance(verdict, Rejected), verdict
        assert verdict.reason is Reason.SCHEMA_VIOLATION
        assert verdict.detail.startswith(f"request.v1 schema: params.{name} must be "), verdict.detail
        assert HEADER_FIELDS[name] in verdict.detail


@pytest.mark.parametrize("name", sorted(HEADER_FIELDS))
def test_every_header_field_value_the_contract_admits_http_can_carry(name: str) -> None:
    """Whatever passes admission, h11 (which writes the request) takes as a header value; an
    Anthropic id passes. One character at a time: admitted exactly when printable ASCII."""
    admitted = [
        SAMPLES[name],
        "wrkspc_011CZkZaBF1tNoB5wlCeusgy",
        "".join(map(chr, range(0x21, 0x7F))),
        "w" * MAX_HEADER_FIELD_CHARS,
        *map(chr, range(0x21, 0x7F)),
    ]
    for value in admitted:
        check_request(_doc({**BASE, name: value}))
        h11.Request(
            method="POST", target="/v1/messages", headers=[("host", "x"), (HEADER_FIELDS[name], value)]
        )
    for code in [*range(0x100), 0x2028, 0xFEFF]:
        admits = header_field_problem(name, chr(code)) is None
        assert admits == (0x21 <= code <= 0x7E), hex(code)


def test_every_tool_the_sdk_types_is_known_as_a_server_or_a_client_tool() -> None:
    """A new tool in the SDK must be classified before the partner policy can govern it."""
    families = {tool_family(t) for t in tool_variants()}
    assert families <= SERVER_TOOLS | CLIENT_TOOLS, families - SERVER_TOOLS - CLIENT_TOOLS
    assert families >= SERVER_TOOLS  # every server family still exists in the SDK
    assert server_tools({"tools": tool_variants()}) == [
        "code_execution",
        "web_search",
        "web_fetch",
        "tool_search_tool",
    ]
