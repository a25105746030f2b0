"""Helpers shared by the simulator tests: a fake clock, request bodies and headers."""

from __future__ import annotations

from typing import Any

API_VERSION = "2023-06-01"
MODEL = "claude-haiku-4-5"  # not deprecated in the installed SDK (which warns on deprecated ones)


class FakeClock:
    """A clock that only moves when told to."""

    def __init__(self, start: float = 1_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


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
