"""The request schema's tagged unions (`if` a discriminator `then` a member) are compiled to one
test of `type` (service/contracts/schemas.py), not fastjsonschema's trial validation of each
`if`. Same verdicts and messages as the trial on every member and on broken members, and no
exception raised per block: a 1 MB request of tiny blocks took 2 s of the event loop before."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import fastjsonschema
import pytest

from service.contracts import schemas
from service.contracts.schemas import Validator, compile_strict, load_schema
from tests.support.params import BASE, SAMPLES, tool_variants, user_block_variants


@pytest.fixture(scope="module")
def validators() -> tuple[Validator, Validator]:
    """(as compiled, with fastjsonschema's own trial `if`)."""
    ours = compile_strict(load_schema("request"))
    own = schemas._StrictIntegers.generate_if_then_else
    try:
        schemas._StrictIntegers.generate_if_then_else = schemas._Draft07.generate_if_then_else
        trial = compile_strict(load_schema("request"))
    finally:
        schemas._StrictIntegers.generate_if_then_else = own
    return ours, trial


def _broken(block: dict[str, Any], others: list[str]) -> Iterator[Any]:
    """`block` with its discriminator or fields spoiled in every way a partner might."""
    yield {k: v for k, v in block.items() if k != "type"}  # no type
    for value in (None, 1, True, ["text"], {"t": 1}, "", "TEXT", "no-such-type"):
        yield {**block, "type": value}
    for other in others[:4]:  # another member's tag on this member's fields
        yield {**block, "type": other}
    yield {**block, "unexpected_field": 1}
    for key in [k for k in block if k != "type"]:
        yield {k: v for k, v in block.items() if k != key}  # a required field missing
        yield {**block, key: 12345}
    for value in ("text", 7, None, [], [block]):
        yield value  # not an object at all


def _documents() -> Iterator[dict[str, Any]]:
    tools, blocks = tool_variants(), user_block_variants()
    tool_types = [t.get("type", "custom") for t in tools]
    block_types = [str(b["type"]) for b in blocks]
    yield {"request_id": "r", "params": {**SAMPLES, "tools": [*SAMPLES["tools"], *tools]}}
    for block in blocks:
        for variant in [block, *_broken(block, [t for t in block_types if t != block["type"]])]:
            params = copy.deepcopy(BASE)
            params["messages"] = [{"role": "user", "content": [variant]}]
            yield {"request_id": "r", "params": params}
    for tool in tools:
        for variant in [tool, *_broken(tool, [t for t in tool_types if t != tool.get("type")])]:
            yield {"request_id": "r", "params": {**copy.deepcopy(BASE), "tools": [variant]}}


def _verdict(validate: Validator, doc: dict[str, Any]) -> str:
    try:
        validate(copy.deepcopy(doc))
    except fastjsonschema.JsonSchemaValueException as exc:
        return f"refused: {exc.message}"
    return "admitted"


def test_the_same_verdict_and_message_as_the_trial_if(validators: tuple[Validator, Validator]) -> None:
    ours, trial = validators
    docs = list(_documents())
    verdicts = [(_verdict(ours, d), _verdict(trial, d)) for d in docs]
    differ = [(d, v) for d, v in zip(docs, verdicts, strict=True) if v[0] != v[1]]
    assert not differ, differ[:3]
    admitted = sum(1 for v, _ in verdicts if v == "admitted")
    assert len(docs) > 500
    assert 30 < admitted < len(docs) - 300  # both kinds were tried, many of each


def test_no_exception_is_raised_per_block(
    validators: tuple[Validator, Validator], monkeypatch: pytest.MonkeyPatch
) -> None:
    ours, trial = validators
    raised: list[int] = []
    init = fastjsonschema.JsonSchemaValueException.__init__

    def counting(self: Any, *args: Any, **kw: Any) -> None:
        raised.append(1)
        init(self, *args, **kw)

    monkeypatch.setattr(fastjsonschema.JsonSchemaValueException, "__init__", counting)
    blocks = [{"type": "text", "text": "x"}] * 1000
    doc = {"request_id": "r", "params": {**BASE, "messages": [{"role": "user", "content": blocks}]}}
    trial(doc)
    assert len(raised) >= 1000  # what the trial `if` costs: several raised and caught a block
    raised.clear()
    ours(doc)
    assert len(raised) < 50
