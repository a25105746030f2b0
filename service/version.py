"""The installed version of the gateway (the package metadata; `0+unknown` when run from a bare tree)."""

from __future__ import annotations

from importlib import metadata

DISTRIBUTION = "claude-partner-gateway"


def version() -> str:
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:  # pragma: no cover - a source tree that was never installed
        return "0+unknown"
