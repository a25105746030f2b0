"""Read and validate the config file, with errors that name the setting.

- A key given twice in one mapping is refused (YAML would keep the last silently).
- A setting that is not known gets a "did you mean", as does an enum value that is
  not one of its choices (enums are case-insensitive: `log_level: debug` is fine).
- No error message repeats a value that could be a secret: strings are quoted back
  only for enum choices and short names, never for secret references, unknown
  keys or anything that looks like a key; a YAML syntax error gives line and
  column, not the line's text.
- `GATEWAY_<SECTION>__<SETTING>` environment variables override the file
  (`GATEWAY_KAFKA__BOOTSTRAP_SERVERS=broker:9092`, `GATEWAY_RUNTIME__LOG_LEVEL=debug`,
  `GATEWAY_REDIS__URL=...`); values are read as YAML scalars (`5`, `true`, `null`).
  Only variables whose first part names a top-level section count; partners are
  set in the file. The CLI passes the environment in (`environ`): nothing here
  reads `os.environ`.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from service.config.settings import GatewaySettings

ENV_PREFIX = "GATEWAY_"
NOT_OVERRIDES = frozenset({"GATEWAY_CONFIG"})
_SECRETISH = re.compile(r"^(sk-|xox|ghp_|AKIA)|^[A-Za-z0-9+/_=.-]{32,}$")
_ECHO_TYPES = frozenset({"literal_error", "enum", "string_pattern_mismatch", "int_parsing", "float_parsing"})


class ConfigError(ValueError):
    """The config file is missing, unreadable or invalid; the message says where."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that refuses a key given twice in one mapping."""


def _mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        line = key_node.start_mark.line + 1
        if key in seen:
            raise ConfigError(f"line {line}: duplicate key {key!r} (first given on line {seen[key]})")
        seen[key] = line
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def _model_at(loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    """The settings model a location points into (`partners.0.budget` -> BudgetSettings)."""
    model: Any = GatewaySettings
    for item in loc:
        if isinstance(item, int):
            continue
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or item not in model.model_fields:
            return None
        model = _inner(model.model_fields[item].annotation)
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _inner(annotation: Any) -> Any:
    """The model inside `X | None`, `list[X]`, `dict[str, X]`."""
    for arg in (*get_args(annotation), annotation):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
        if get_origin(arg) in (list, dict):
            inner = _inner(get_args(arg)[-1])
            if inner is not None:
                return inner
    return None


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


def _suggest(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word.lower(), [c.lower() for c in choices], n=1, cutoff=0.6)
    if not close:
        return ""
    match = next(c for c in choices if c.lower() == close[0])
    return f"; did you mean {match!r}?"


def _message(err: Any) -> str:
    """One error's text, with a hint, and the offending value only where it cannot be a secret."""
    loc = tuple(err["loc"])
    kind = err["type"]
    msg = str(err["msg"]).removeprefix("Value error, ")
    value = err.get("input")
    if kind == "extra_forbidden":
        model = _model_at(loc[:-1])
        known = list(model.model_fields) if model is not None else []
        return f"is not a known setting{_suggest(str(loc[-1]), known)}"
    if kind == "model_type" and (err.get("ctx") or {}).get("class_name") == "SecretRef":
        return (
            "must be a secret reference, {env: VARIABLE} or {file: /path}, never the secret itself "
            "(the value given is not repeated here)"
        )
    if kind == "literal_error" and isinstance(value, str) and not _SECRETISH.search(value):
        choices = re.findall(r"'([^']*)'", err.get("ctx", {}).get("expected", ""))
        return f"{msg} (got {value[:40]!r}){_suggest(value, choices)}"
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return msg
    if isinstance(value, str) and (kind not in _ECHO_TYPES or _SECRETISH.search(value) or len(value) > 60):
        return msg
    if kind != "value_error":
        msg += f" (got {value!r:.60})"
    return msg


def _format(exc: ValidationError, data: dict[str, Any]) -> str:
    lines = []
    for err in exc.errors():
        where = _where(tuple(err["loc"]), data)
        msg = _message(err)
        if not where or msg.startswith((where + ".", where + " ", where + ":")):
            lines.append(f"  {msg}")
        else:
            lines.append(f"  {where}: {msg}")
    return "\n".join(lines)


def env_overrides(environ: Mapping[str, str]) -> tuple[dict[str, Any], list[str]]:
    """(`GATEWAY_A__B=v` as {"a": {"b": v}}, warnings for variables that look meant but match
    no section). Values are YAML scalars."""
    sections = list(GatewaySettings.model_fields)
    out: dict[str, Any] = {}
    warnings: list[str] = []
    for name, raw in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX) or name in NOT_OVERRIDES:
            continue
        path = [p.lower() for p in name[len(ENV_PREFIX) :].split("__")]
        if path[0] not in sections or path[0] == "partners" or not all(path):
            if "__" in name:
                warnings.append(f"{name} overrides nothing{_suggest(path[0], sections)}")
            continue
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                break
        else:
            node[path[-1]] = value
    return out, warnings


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> None:
    for k, v in extra.items():
        if isinstance(v, Mapping) and isinstance(base.get(k), dict):
            _merge(base[k], v)
        else:
            base[k] = v


def parse_config(
    data: object, source: str = "<config>", environ: Mapping[str, str] | None = None
) -> GatewaySettings:
    """Validate an already-parsed mapping (with `GATEWAY_*` overrides from `environ`).
    Errors name each setting (`partners[acme].budget...`)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping")
    if environ:
        _merge(data, env_overrides(environ)[0])
    try:
        return GatewaySettings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{source} is invalid:\n{_format(exc, data)}") from exc


def load_config(path: str | Path, environ: Mapping[str, str] | None = None) -> GatewaySettings:
    """Load a YAML config file. Raises `ConfigError` with every problem listed."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {p}: {exc.strerror}") from exc
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except ConfigError as exc:
        raise ConfigError(f"{p}: {exc}") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{p} is not valid YAML{at}: {exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p} is not valid YAML ({type(exc).__name__})") from None
    return parse_config(data, str(p), environ)
