"""The base of every settings model: frozen, no unknown keys, enum values in any case."""

from __future__ import annotations

from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel, ConfigDict, model_validator


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _enums_any_case(cls, data: Any) -> Any:
        """Enum settings (`Literal` choices) match whatever their case: `log_level: debug`."""
        if not isinstance(data, dict):
            return data
        fixed = None
        for name, choices in _choices(cls).items():
            value = data.get(name)
            if isinstance(value, str) and value not in choices:
                for choice in choices:
                    if choice.lower() == value.lower():
                        fixed = fixed if fixed is not None else dict(data)
                        fixed[name] = choice
        return fixed if fixed is not None else data


_CHOICES: dict[type, dict[str, tuple[str, ...]]] = {}


def _choices(model: type[BaseModel]) -> dict[str, tuple[str, ...]]:
    """The string choices of each `Literal` field of a model (also in `Literal[...] | None`)."""
    found = _CHOICES.get(model)
    if found is None:
        found = {}
        for name, info in model.model_fields.items():
            for arg in (info.annotation, *get_args(info.annotation)):
                if get_origin(arg) is Literal:
                    found[name] = tuple(c for c in get_args(arg) if isinstance(c, str))
        _CHOICES[model] = found
    return found
