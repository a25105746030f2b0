"""Read and validate the config file, with errors that name the setting."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from service.config.settings import GatewaySettings


class ConfigError(ValueError):
    """The config file is missing, unreadable or invalid; the message says where."""


def _where(loc: tuple[int | str, ...], data: dict[str, Any]) -> str:
    """`partners.0.api_key` -> `partners[acme].api_key` (by id when the entry has one)."""
    parts: list[str] = []
    node: Any = data
    for item in loc:
        if isinstance(item, int):
            pid = node[item].get("id") if isinstance(node, list) and item < len(node) else None
            valid_id = isinstance(pid, str) and 0 < len(pid) <= 64
            parts[-1:] = [f"{parts[-1] if parts else ''}[{pid if valid_id else item}]"]
        else:
            parts.append(str(item))
        try:
            node = node[item]
        except (KeyError, IndexError, TypeError):
            node = None
    return ".".join(parts)


def _format(exc: ValidationError, data: dict[str, Any]) -> str:
    lines = []
    for err in exc.errors():
        where = _where(tuple(err["loc"]), data)
        msg = err["msg"].removeprefix("Value error, ")
        value = err.get("input")
        scalar = isinstance(value, int | float | str) and not isinstance(value, bool)
        if err["type"] != "value_error" and scalar:
            msg += f" (got {value!r:.60})"
        if not where or msg.startswith((where + ".", where + " ", where + ":")):
            lines.append(f"  {msg}")
        else:
            lines.append(f"  {where}: {msg}")
    return "\n".join(lines)


def parse_config(data: object, source: str = "<config>") -> GatewaySettings:
    """Validate an already-parsed mapping. Errors name each setting (`partners[acme].budget...`)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping")
    try:
        return GatewaySettings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{source} is invalid:\n{_format(exc, data)}") from exc


def load_config(path: str | Path) -> GatewaySettings:
    """Load a YAML config file. Raises `ConfigError` with every problem listed."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {p}: {exc.strerror}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p} is not valid YAML: {exc}") from exc
    return parse_config(data, str(p))
