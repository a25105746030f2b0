"""Secret references: a secret lives in an environment variable or a mounted file.

The config file names where a secret is, never the secret itself. Values are
resolved into `pydantic.SecretStr` so they never show in reprs, logs or dumps.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from pydantic import BaseModel, ConfigDict, SecretStr, model_validator


class SecretResolutionError(ValueError):
    """A secret reference points at nothing (unset variable, missing file)."""


class SecretRef(BaseModel):
    """Where a secret is: exactly one of `env` (variable name) or `file` (path)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    env: str | None = None
    file: Path | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> SecretRef:
        if (self.env is None) == (self.file is None):
            raise ValueError("a secret reference needs exactly one of 'env' or 'file'")
        return self

    def describe(self) -> str:
        """Where the secret is, for error messages (never the value)."""
        return f"env:{self.env}" if self.env is not None else f"file:{self.file}"

    def resolve(self, environ: Mapping[str, str] | None = None) -> SecretStr:
        """Read the secret now. Raises `SecretResolutionError` naming the reference."""
        if self.env is not None:
            env = os.environ if environ is None else environ
            value = env.get(self.env)
            if not value:
                raise SecretResolutionError(f"environment variable {self.env} is not set")
            return SecretStr(value)
        assert self.file is not None
        try:
            value = self.file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise SecretResolutionError(f"cannot read secret file {self.file}: {exc.strerror}") from exc
        if not value:
            raise SecretResolutionError(f"secret file {self.file} is empty")
        return SecretStr(value)
