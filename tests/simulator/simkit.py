"""Helpers shared by the simulator tests: a fake clock (tests/support/clock.py), request bodies, headers."""

from __future__ import annotations

from typing import Any

from tests.support.clock import FakeClock as FakeClock  # re-exported: the simulator tests import it here

API_VERSION = "2023-06-01"
MODEL = "claude-haiku-4-5"  # not deprecated in the installed SDK (which warns on deprecated ones)


def body(**overrides: Any) -> dict[str, Any]:
    """A valid Messages body, with overrides (a value of ... removes the field)."""
    doc: dict[str, Any] = {
        "model": MODEL,
        "max_tokens": 100,
        "messages": [{"role": "user", "content": "Hello, simulator!"}],
    }
    for key, value in overrides.items():
        if value is ...:
            doc.pop(key, None)
        else:
            doc[key] = value
    return doc


def headers(key: str = "sk-test", **extra: str) -> dict[str, str]:
    """Headers as the SDK sends them (Bearer auth and a version)."""
    h = {"authorization": f"Bearer {key}", "anthropic-version": API_VERSION}
    h.update(extra)
    return h
