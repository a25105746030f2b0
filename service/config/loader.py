"""Read and validate the config file, with errors that name the setting."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import ValidationError

from service.config.settings import GatewaySettings


class ConfigError(ValueError):
    """The config file is missing, unreadable or invalid; the message says where."""


def _format(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        lines.append(f"  {where}: {err['msg']}")
    return "\n".join(lines)


def parse_config(data: object, source: str = "<config>") -> GatewaySettings:
    """Validate an already-parsed mapping."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping")
    try:
        return GatewaySettings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{source} is invalid:\n{_format(exc)}") from exc


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
