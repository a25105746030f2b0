"""The simulator's settings: one frozen pydantic model, loadable from YAML.

Units are in the names (`_s`, `_bytes`, `_rate`). Every limit is per minute and
`None` or `0` means unlimited. API keys are fake keys for load tests, but they
are still kept as `SecretStr` so they never show up in reprs or in the stats.

YAML layout (every key optional):

    host: 127.0.0.1
    port: 0
    api_keys: {alice: sk-sim-alice}     # name -> key; empty = any key accepted
    models: [claude-sonnet-4-5, ...]
    limits: {rpm: 4000, itpm: 2000000, otpm: 400000}
    model_limits: {opus: {rpm: 50}}      # substring of the model id -> own buckets
    workspaces: {team-a: {keys: [alice], limits: {rpm: 60}}}   # keys' own limits, besides the org's
    count_tokens_rpm: 2000
    latency: {distribution: lognormal, median_s: 0.8, sigma: 0.4, per_output_token_s: 0.01}
    output: {distribution: uniform, min_tokens: 20, max_tokens: 400}
    faults: {api_error_rate: 0.01, overloaded_rate: 0.02, drop_rate: 0.0, spend_limit_rate: 0.0}
    seed: 42
    max_body_bytes: 33554432
    round_remaining: true
    max_tracked_requests: 1000000        # per-request call counts kept (GET /_sim/calls)
    priority_tier: false                 # true: service_tier auto is served as priority
    batches:                             # Message Batches; seconds stand for Anthropic's hours
      processing_s: 1.0                  # a batch's processing time (processing_max_s: a range)
      expiry_s: 24.0                     # expires_at - created_at; unfinished entries end expired
      api_error_rate: 0.0                # also overloaded_rate, expire_rate (shares of entries)
      max_queued_requests: null          # entries processing, org-wide; over it a create is 429
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

#: The model ids the installed SDK (2.13) knows, plus older ids still in use.
DEFAULT_MODELS: tuple[str, ...] = (
    "claude-fable-5-2",
    "claude-mythos-5-2",
    "claude-haiku-5-5",
    "claude-sonnet-5-5",
    "claude-opus-5-5",
    "claude-fable-5-1",
    "claude-mythos-5-1",
    "claude-sonnet-5",
    "claude-fable-5",
    "claude-mythos-5",
    "claude-opus-5",
    "claude-opus-4-8",
    "claude-opus-4-7",
    "claude-opus-4-6",
    "claude-sonnet-4-6",
    "claude-mythos-preview",
    "claude-opus-4-5",
    "claude-opus-4-5-20251101",
    "claude-sonnet-4-5",
    "claude-sonnet-4-5-20250929",
    "claude-haiku-4-5",
    "claude-haiku-4-5-20251001",
    "claude-opus-4-1",
    "claude-opus-4-1-20250805",
    "claude-opus-4-0",
    "claude-opus-4-20250514",
    "claude-sonnet-4-0",
    "claude-sonnet-4-20250514",
    "claude-3-7-sonnet-latest",
    "claude-3-7-sonnet-20250219",
    "claude-3-5-haiku-latest",
    "claude-3-5-haiku-20241022",
)


class SimulatorConfigError(ValueError):
    """The simulator config (file, flags or runtime update) is invalid; the message says where."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class LimitSettings(_Frozen):
    """Organisation limits per minute, as token buckets. `None` or 0 = unlimited."""

    rpm: int | None = Field(default=4_000, ge=0)
    itpm: int | None = Field(default=2_000_000, ge=0)
    otpm: int | None = Field(default=400_000, ge=0)


class LatencySettings(_Frozen):
    """Time to answer a successful call: a base draw plus a per-output-token part.

    `fixed`: `fixed_s`; `lognormal`: `median_s * exp(sigma * N(0, 1))`. The total
    is capped at `max_s`. A total of zero skips the sleep entirely.
    """

    distribution: Literal["fixed", "lognormal"] = "fixed"
    fixed_s: float = Field(default=0.0, ge=0)
    median_s: float = Field(default=0.5, gt=0)
    sigma: float = Field(default=0.5, ge=0)
    per_output_token_s: float = Field(default=0.0, ge=0)
    max_s: float = Field(default=600.0, gt=0)


class OutputSettings(_Frozen):
    """How many output tokens a successful call generates (then capped by `max_tokens`).

    `fixed`: `fixed_tokens`; `uniform`: an integer in [`min_tokens`, `max_tokens`];
    `lognormal`: `median_tokens * exp(sigma * N(0, 1))`, at least 1.
    `stop_sequence_rate`: share of calls that carry `stop_sequences` and end on
    the first of them (stop_reason `stop_sequence`).
    """

    distribution: Literal["fixed", "uniform", "lognormal"] = "fixed"
    fixed_tokens: int = Field(default=64, ge=1)
    min_tokens: int = Field(default=16, ge=1)
    max_tokens: int = Field(default=256, ge=1)
    median_tokens: float = Field(default=128.0, gt=0)
    sigma: float = Field(default=0.6, ge=0)
    stop_sequence_rate: float = Field(default=0.0, ge=0, le=1)

    @model_validator(mode="after")
    def _range(self) -> OutputSettings:
        if self.min_tokens > self.max_tokens:
            raise ValueError("output.min_tokens must not exceed output.max_tokens")
        return self


class FaultSettings(_Frozen):
    """Share of otherwise valid calls that fail on purpose (each in 0..1, sum <= 1).

    500 `api_error`, 529 `overloaded_error` and the spend-limit 429 are answered
    at once, before the rate limiter, and use no capacity. A dropped call is
    admitted, does its work (tokens counted, latency spent), then the connection
    is closed without a response: the "unknown outcome" case.
    """

    api_error_rate: float = Field(default=0.0, ge=0, le=1)
    overloaded_rate: float = Field(default=0.0, ge=0, le=1)
    drop_rate: float = Field(default=0.0, ge=0, le=1)
    spend_limit_rate: float = Field(default=0.0, ge=0, le=1)

    @model_validator(mode="after")
    def _sum(self) -> FaultSettings:
        if self.total > 1.0 + 1e-9:
            raise ValueError("the fault rates (faults.*_rate) must add up to at most 1")
        return self

    @property
    def total(self) -> float:
        """Sum of all fault rates; 0 means no random draw is made per call."""
        return self.api_error_rate + self.overloaded_rate + self.drop_rate + self.spend_limit_rate


#: Anthropic's limits on one Message Batch (ANTHROPIC.md, Message Batches).
MAX_BATCH_REQUESTS = 100_000
MAX_BATCH_BYTES = 256 * 1024 * 1024


class BatchSettings(_Frozen):
    """Message Batches (`/v1/messages/batches`, see service/simulator/batches/), in compressed
    time: by default one second stands for one of Anthropic's hours.

    - `processing_s`: how long a batch takes (its entries finish evenly over that time);
      with `processing_max_s` set, each batch's time is drawn uniformly in between.
    - `expiry_s`: Anthropic's 24 hours; `expires_at` is `created_at` + this, and the entries
      not finished by then end `expired`.
    - `retention_s`: Anthropic's 29 days; an ended batch and its results are deleted this
      long after it was created (memory stays bounded in long runs).
    - `api_error_rate`, `overloaded_rate`: share of valid entries that end `errored` with
      `api_error` / `overloaded_error`; `expire_rate`: share that never finish (the batch then
      ends at `expires_at`, those entries `expired`). Drawn from a generator seeded by `seed`
      and the batch's number, so a seed reproduces every batch whatever else runs.
    - `max_queued_requests`: entries still processing, over all batches of the organisation,
      above which a create answers 429 `rate_limit_error` (None = no limit).
    - `max_requests`, `max_bytes`: one batch's size limits (400 above them).
    - `shuffle_results`: results come in a seeded shuffled order (stable for a batch), as
      Anthropic gives them "in any order"; false = request order.
    """

    processing_s: float = Field(default=1.0, ge=0)
    processing_max_s: float | None = Field(default=None, ge=0)
    expiry_s: float = Field(default=24.0, gt=0)
    retention_s: float = Field(default=29 * 24.0, gt=0)
    api_error_rate: float = Field(default=0.0, ge=0, le=1)
    overloaded_rate: float = Field(default=0.0, ge=0, le=1)
    expire_rate: float = Field(default=0.0, ge=0, le=1)
    max_queued_requests: int | None = Field(default=None, ge=1)
    max_requests: int = Field(default=MAX_BATCH_REQUESTS, ge=1)
    max_bytes: int = Field(default=MAX_BATCH_BYTES, ge=1)
    shuffle_results: bool = True

    @model_validator(mode="after")
    def _check(self) -> BatchSettings:
        if self.processing_max_s is not None and self.processing_max_s < self.processing_s:
            raise ValueError("batches.processing_max_s must not be below batches.processing_s")
        if self.api_error_rate + self.overloaded_rate + self.expire_rate > 1.0 + 1e-9:
            raise ValueError("batches: api_error_rate + overloaded_rate + expire_rate must be at most 1")
        return self

    @property
    def outcome_rate(self) -> float:
        """Share of entries with a drawn outcome; 0 means no draw per entry."""
        return self.api_error_rate + self.overloaded_rate + self.expire_rate


class WorkspaceSettings(_Frozen):
    """A workspace: its keys (by name, as in `api_keys`) draw on its limits as well as the org's.
    Unset limits are unlimited here (only the org's apply)."""

    keys: list[str] = Field(default_factory=list)
    limits: LimitSettings = LimitSettings(rpm=None, itpm=None, otpm=None)


class SimulatorConfig(_Frozen):
    """Everything the simulator can be told. See the module docstring for YAML."""

    host: str = "127.0.0.1"
    port: int = Field(default=0, ge=0, le=65535)
    api_keys: dict[str, SecretStr] = Field(default_factory=dict)
    models: tuple[str, ...] = DEFAULT_MODELS
    limits: LimitSettings = LimitSettings()
    model_limits: dict[str, LimitSettings] = Field(default_factory=dict)
    workspaces: dict[str, WorkspaceSettings] = Field(default_factory=dict)
    count_tokens_rpm: int | None = Field(default=2_000, ge=0)
    max_tokens_limit: int = Field(default=128_000, ge=1)
    priority_tier: bool = False
    """The organisation has Priority Tier capacity: `service_tier: auto` is served (and
    reported in `usage.service_tier`) as `priority`."""
    latency: LatencySettings = LatencySettings()
    output: OutputSettings = OutputSettings()
    faults: FaultSettings = FaultSettings()
    seed: int | None = None
    max_body_bytes: int = Field(default=32 * 1024 * 1024, ge=1)
    round_remaining: bool = True
    max_tracked_requests: int = Field(default=1_000_000, ge=0)
    """Requests whose calls are counted one by one (see service/simulator/calls.py); 0 = none."""
    batches: BatchSettings = BatchSettings()

    @model_validator(mode="after")
    def _keys_unique(self) -> SimulatorConfig:
        secrets = [k.get_secret_value() for k in self.api_keys.values()]
        if len(set(secrets)) != len(secrets):
            raise ValueError("api_keys: two names share the same key")
        if any(not s for s in secrets):
            raise ValueError("api_keys: a key must not be empty")
        return self


def _format(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        lines.append(f"  {where}: {err['msg']}")
    return "\n".join(lines)


#: Mapping-valued settings that an update replaces whole instead of merging into.
REPLACED_WHOLE = frozenset({"api_keys", "model_limits", "workspaces"})


def deep_merge(base: Mapping[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    """`base` updated by `changes`, merging nested settings (`limits`, `faults`, ...) key by
    key; `api_keys`, `model_limits` and `workspaces` are replaced whole so that entries can be removed."""
    merged = dict(base)
    for key, value in changes.items():
        current = merged.get(key)
        if key not in REPLACED_WHOLE and isinstance(current, Mapping) and isinstance(value, Mapping):
            merged[key] = deep_merge(current, value)
        else:
            merged[key] = value
    return merged


def config_as_dict(config: SimulatorConfig) -> dict[str, Any]:
    """The config as plain data, keys revealed, so that it can be merged and re-validated."""
    data = config.model_dump()
    data["api_keys"] = {name: key.get_secret_value() for name, key in config.api_keys.items()}
    return data


def parse_config(data: object, source: str = "<config>") -> SimulatorConfig:
    """Validate an already-parsed mapping; raises `SimulatorConfigError` listing every problem."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise SimulatorConfigError(f"{source}: the top level must be a mapping")
    try:
        return SimulatorConfig.model_validate(dict(data))
    except ValidationError as exc:
        raise SimulatorConfigError(f"{source} is invalid:\n{_format(exc)}") from exc


def updated_config(config: SimulatorConfig, changes: Mapping[str, Any]) -> SimulatorConfig:
    """`config` with `changes` deep-merged in and validated again."""
    return parse_config(deep_merge(config_as_dict(config), changes), "config update")


def load_config(
    path: str | Path | None = None, overrides: Mapping[str, Any] | None = None
) -> SimulatorConfig:
    """Load YAML from `path` (if any), deep-merge `overrides` (e.g. CLI flags), validate."""
    data: Any = {}
    source = "<defaults>"
    if path is not None:
        p = Path(path)
        source = str(p)
        try:
            text = p.read_text(encoding="utf-8")
        except OSError as exc:
            raise SimulatorConfigError(f"cannot read simulator config {p}: {exc.strerror}") from exc
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise SimulatorConfigError(f"{p} is not valid YAML: {exc}") from exc
        if not isinstance(data, Mapping):
            raise SimulatorConfigError(f"{source}: the top level must be a mapping")
    if overrides:
        data = deep_merge(data, overrides)
    return parse_config(data, source)
