"""Admission of the params fields that cost or move: a partner's policy allows or denies
`service_tier`, `speed`, `inference_geo`, `workspace_id` and server tools; `max_tokens` stays
within the model's documented maximum; refused fields and bad `max_tokens` are named."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from service.admission.admit import Admission, Admitted, Record, Rejected
from service.admission.registry import Registry
from service.config.loader import ConfigError, parse_config
from service.contracts.reasons import Reason

ENV = {"ACME_KEY": "sk-acme-secret"}
WEB_SEARCH = {"type": "web_search_20250305", "name": "web_search", "max_uses": 2}
CUSTOM = {"name": "lookup", "input_schema": {"type": "object"}}


def _admission(**acme: Any) -> Admission:
    settings = parse_config({"partners": [{"id": "acme", "api_key": {"env": "ACME_KEY"}, **acme}]})
    return Admission(Registry.build(settings, environ=ENV))


def _verdict(admission: Admission, **params: Any) -> Admitted | Rejected:
    p = {"model": "claude-haiku-4-5", "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}]}
    p.update(params)
    value = orjson.dumps({"request_id": "r-1", "params": p})
    return admission.admit(Record("claude.requests.acme", 0, 1, None, b"k", value, ()))


def _rejected(verdict: Admitted | Rejected, reason: Reason, *says: str) -> None:
    assert isinstance(verdict, Rejected), verdict
    assert verdict.reason is reason
    assert verdict.request_id == "r-1"
    for text in says:
        assert text in verdict.detail


def test_by_default_every_value_the_api_takes_passes() -> None:
    admission = _admission()
    verdict = _verdict(
        admission,
        service_tier="auto",
        speed="fast",
        inference_geo="us",
        workspace_id="wrkspc_1",
        tools=[WEB_SEARCH, CUSTOM, {"type": "code_execution_20250825", "name": "code_execution"}],
    )
    assert isinstance(verdict, Admitted)
    assert verdict.params["speed"] == "fast"


@pytest.mark.parametrize(
    ("policy", "params", "says"),
    [
        (
            {"speed": ["standard"]},
            {"speed": "fast"},
            "params.speed 'fast' is not allowed by partners[acme].policy.speed",
        ),
        ({"service_tier": ["standard_only"]}, {"service_tier": "auto"}, "policy.service_tier"),
        ({"inference_geo": ["us"]}, {"inference_geo": "eu"}, "policy.inference_geo (['us'])"),
        ({"workspace_id": []}, {"workspace_id": "wrkspc_other"}, "policy.workspace_id ([])"),
        ({"server_tools": []}, {"tools": [CUSTOM, WEB_SEARCH]}, "server tool 'web_search'"),
        ({"server_tools": ["web_fetch"]}, {"tools": [WEB_SEARCH]}, "policy.server_tools (['web_fetch'])"),
    ],
)
def test_the_policy_denies_what_it_does_not_list(
    policy: dict[str, Any], params: dict[str, Any], says: str
) -> None:
    _rejected(_verdict(_admission(policy=policy), **params), Reason.PARAM_NOT_ALLOWED, says)


@pytest.mark.parametrize(
    ("policy", "params"),
    [
        ({"speed": ["standard"]}, {"speed": "standard"}),
        ({"speed": ["standard"]}, {"speed": None}),
        ({"speed": ["standard"]}, {}),
        ({"server_tools": []}, {"tools": [CUSTOM, {"type": "bash_20250124", "name": "bash"}]}),
        ({"server_tools": ["web_search"]}, {"tools": [WEB_SEARCH]}),
        ({"inference_geo": ["us"]}, {"inference_geo": "us"}),
    ],
)
def test_the_policy_allows_what_it_lists_and_what_is_absent(
    policy: dict[str, Any], params: dict[str, Any]
) -> None:
    assert isinstance(_verdict(_admission(policy=policy), **params), Admitted)


def test_an_unknown_server_tool_in_the_policy_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"policy\.server_tools: unknown server tool 'web_surf'"):
        _admission(policy={"server_tools": ["web_surf"]})


def test_max_tokens_within_the_models_documented_maximum() -> None:
    admission = _admission()
    assert isinstance(_verdict(admission, max_tokens=64_000), Admitted)
    _rejected(
        _verdict(admission, max_tokens=64_001),
        Reason.MAX_TOKENS_EXCEEDED,
        "exceeds the documented maximum of claude-haiku-4-5 (64000",
    )
    _rejected(_verdict(admission, model="claude-opus-4-1", max_tokens=32_001), Reason.MAX_TOKENS_EXCEEDED)
    # the partner's cap with clamp lowers it first: no refusal
    clamped = _verdict(_admission(max_tokens_cap=4096, max_tokens_policy="clamp"), max_tokens=100_000)
    assert isinstance(clamped, Admitted)
    assert clamped.max_tokens == 4096


@pytest.mark.parametrize(
    ("max_tokens", "says"),
    [(32.0, "JSON integer"), ("32", "a string"), (0, "pre-warming"), (-1, "at least 1"), (1e30, "64 bits")],
)
def test_bad_max_tokens_is_a_schema_violation_naming_it(max_tokens: Any, says: str) -> None:
    _rejected(
        _verdict(_admission(), max_tokens=max_tokens), Reason.SCHEMA_VIOLATION, "params.max_tokens", says
    )


@pytest.mark.parametrize("name", ["temperature", "top_p", "top_k", "stream", "extra_headers", "timeout"])
def test_refused_fields_are_schema_violations_naming_the_field(name: str) -> None:
    _rejected(_verdict(_admission(), **{name: 1}), Reason.SCHEMA_VIOLATION, f"params.{name} is refused")
