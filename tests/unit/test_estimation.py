"""The input-token reservation is conservative: admission's estimate (request bytes over
`runtime.estimate_chars_per_token`) is never below the tokens the upstream bills, here
the simulator's count (~4 chars a token plus a per-message overhead), across request
shapes from one word to long multi-turn conversations with system prompts and tools."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from bench.estimation import estimate_and_billed, estimation_error
from service.admission.admit import Admission
from service.admission.registry import Registry
from service.config.loader import parse_config

_ADMISSION = Admission(
    Registry.build(
        parse_config({"partners": [{"id": "acme", "api_key": {"env": "K"}, "max_request_bytes": 4_000_000}]}),
        environ={"K": "sk-x"},
    )
)

text = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=4000)


def _estimate(params: dict[str, object]) -> tuple[int, int]:
    return estimate_and_billed(_ADMISSION, params)


@settings(max_examples=300, deadline=None)
@given(
    turns=st.lists(text, min_size=1, max_size=12),
    system=st.none() | text,
    tools=st.booleans(),
)
def test_the_estimate_never_undercounts(turns: list[str], system: str | None, tools: bool) -> None:
    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]
    params: dict[str, object] = {"model": "claude-haiku-4-5", "max_tokens": 64, "messages": messages}
    if system is not None:
        params["system"] = system
    if tools:
        params["tools"] = [
            {"name": "lookup", "description": "find a record", "input_schema": {"type": "object"}}
        ]
    estimate, billed = _estimate(params)
    assert estimate >= billed


def test_typical_overestimate_is_bounded() -> None:
    err = estimation_error(300)
    assert err["min"] >= 1.0
    assert err["p50"] <= 2.0, err  # the reservation holds at most ~2x what is billed
