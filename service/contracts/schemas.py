"""Load the versioned JSON Schemas and compile them into fast validators.

The schemas ship inside the wheel as `service/schemas/` and live at the
repository root as `schemas/` during development.

An `integer` is a JSON integer: `32`, not `32.0` nor `1e3` (nor an integer too large for
64 bits, which the JSON parser reads as a float). Draft-07 counts a float without a fraction
as an integer; the Claude API does not, so the validators are compiled with draft-04's
stricter integer check and draft-07 for everything else.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import fastjsonschema
import orjson
from fastjsonschema.draft04 import CodeGeneratorDraft04
from fastjsonschema.draft07 import CodeGeneratorDraft07
from fastjsonschema.ref_resolver import RefResolver

Validator = Callable[[Any], Any]
_Draft07: Any = CodeGeneratorDraft07  # fastjsonschema's generators are not typed
_Draft04: Any = CodeGeneratorDraft04

SCHEMA_FILES = {
    "request": "request.v1.json",
    "response": "response.v1.json",
    "deadletter": "deadletter.v1.json",
    "usage": "usage.v1.json",
}


class SchemaViolation(ValueError):
    """A document does not match its schema; the message says where."""


def _schema_dir() -> Path:
    packaged = Path(str(resources.files("service"))) / "schemas"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[2] / "schemas"


@cache
def load_schema(name: str) -> dict[str, Any]:
    """The parsed JSON Schema called `name` (request, response, deadletter, usage)."""
    data: dict[str, Any] = orjson.loads((_schema_dir() / SCHEMA_FILES[name]).read_bytes())
    return data


class _StrictIntegers(_Draft07):  # type: ignore[misc]
    """Draft-07, but an integer is never a float (`32.0` is refused, as the Claude API does)."""

    def generate_type(self) -> None:
        _Draft04.generate_type(self)

    def generate_if_then_else(self) -> None:
        """An `if` that only tests a discriminator (`{"properties": {"type": {"enum": [...]}},
        "required": ["type"]}`, as every union of the request schema is written) becomes one
        test. fastjsonschema validates an `if` by trial, raising and catching an exception for
        each member a block is not: a request of many small blocks spent seconds there."""
        values = _discriminator(self._definition["if"])
        if values is None or "else" in self._definition or "then" not in self._definition:
            _Draft07.generate_if_then_else(self)
            return
        # The `if` holds for a non-object (`properties` and `required` apply to objects only).
        test = "if not isinstance({variable}, dict) or ('type' in {variable} and {variable}['type'] in {}):"
        with self.l(test, repr(values)):
            code_len = len(self._code)
            self.generate_func_code_block(
                self._definition["then"], self._variable, self._variable_name, clear_variables=True
            )
            if len(self._code) == code_len:
                self.l("pass")

    def exc(self, msg: str, *args: Any, append_to_msg: str | None = None, rule: str | None = None) -> None:
        """Raise with the message only: the value and the definition a detailed exception also
        carries cost more than the check when a union tries its members (nothing reads them)."""
        definition = self._expand_refs(self._definition)
        rule_value = definition.get(rule) if isinstance(definition, dict) else None
        text = '"' + msg + '"' + (f" + ({append_to_msg})" if append_to_msg else "")
        self.l(f"raise JsonSchemaValueException({text})", *args, definition_rule=self.e(rule_value))


def _discriminator(schema: Any) -> tuple[str, ...] | None:
    """The string values of `{"properties": {"type": {"enum": [...]}}, "required": ["type"]}`,
    or None when `schema` is anything else."""
    if not isinstance(schema, dict) or set(schema) != {"properties", "required"}:
        return None
    props, required = schema["properties"], schema["required"]
    if required != ["type"] or not isinstance(props, dict) or set(props) != {"type"}:
        return None
    enum = props["type"]
    if not isinstance(enum, dict) or set(enum) != {"enum"} or not isinstance(enum["enum"], list):
        return None
    if not enum["enum"] or not all(isinstance(v, str) for v in enum["enum"]):
        return None
    return tuple(enum["enum"])


def compile_strict(schema: dict[str, Any]) -> Validator:
    """A validator for `schema` (draft-07 with strict integers); raises `SchemaViolation`
    through `validate`, `fastjsonschema.JsonSchemaValueException` when called directly."""
    schema = copy.deepcopy(schema)  # the resolver rewrites every `$ref` in place
    resolver = RefResolver.from_schema(schema, handlers={}, store={})
    generator = _StrictIntegers(schema, resolver=resolver, use_formats=False)
    scope: dict[str, Any] = generator.global_state
    exec(generator.func_code, scope)  # noqa: S102 - fastjsonschema's own compile() does the same
    validator: Validator = scope[resolver.get_scope_name()]
    return validator


@cache
def compiled(name: str) -> Validator:
    """The validator of schema `name`, compiled once (the request schema takes about a second)."""
    return compile_strict(load_schema(name))


def validate(name: str, document: Any) -> None:
    """Raise `SchemaViolation` if `document` does not match schema `name`."""
    try:
        compiled(name)(document)
    except fastjsonschema.JsonSchemaValueException as exc:
        raise SchemaViolation(exc.message) from None
