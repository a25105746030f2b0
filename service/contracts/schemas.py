"""Load the versioned JSON Schemas and compile them into fast validators.

The schemas ship inside the wheel as `service/schemas/` and live at the
repository root as `schemas/` during development.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import fastjsonschema
import orjson

Validator = Callable[[Any], Any]

SCHEMA_FILES = {
    "request": "request.v1.json",
    "response": "response.v1.json",
    "deadletter": "deadletter.v1.json",
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
    """The parsed JSON Schema called `name` (request, response, deadletter)."""
    data: dict[str, Any] = orjson.loads((_schema_dir() / SCHEMA_FILES[name]).read_bytes())
    return data


@cache
def _compiled(name: str) -> Validator:
    validator: Validator = fastjsonschema.compile(load_schema(name), use_formats=False)
    return validator


def validate(name: str, document: Any) -> None:
    """Raise `SchemaViolation` if `document` does not match schema `name`."""
    try:
        _compiled(name)(document)
    except fastjsonschema.JsonSchemaValueException as exc:
        raise SchemaViolation(exc.message) from None
