"""Structured JSON logs: one event per line, with context fields and trace ids.

Context goes in `extra={...}` (partner, request_id, topic, partition, offset,
...); `trace_id`/`span_id` come from the current span. No secret is written:
`SecretStr` values print as stars, and every value registered with
`register_secrets` (the gateway registers its keys and passwords when it loads
them) is masked wherever it appears in a line, tracebacks included, so a
secret that reaches a log call by mistake is masked rather than written.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

import orjson
from opentelemetry import trace
from pydantic import SecretStr

_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}
MASK = "**********"
MIN_SECRET_CHARS = 6
"""Shorter values are not masked: they would garble ordinary words and are no real secret."""

_secrets: tuple[str, ...] = ()


def register_secrets(values: Iterable[SecretStr | str]) -> None:
    """Mask these values in every log line from now on (process-wide, like logging itself)."""
    global _secrets
    plain = {v.get_secret_value() if isinstance(v, SecretStr) else v for v in values}
    known = set(_secrets) | {v for v in plain if len(v) >= MIN_SECRET_CHARS}
    _secrets = tuple(sorted(known, key=len, reverse=True))  # a secret containing another: masked whole


def redact(line: str) -> str:
    """`line` with every registered secret masked."""
    for secret in _secrets:
        if secret in line:
            line = line.replace(secret, MASK)
    return line


REPEAT_S = 60.0
"""A condition that lasts is warned about at most this often."""


class Throttle:
    """When to repeat a warning about a condition that lasts: `due()` is true the first time,
    then at most once every `every_s`; `clear()` when the condition is over (the next one is
    warned about at once). `warned` says whether it was since the last `clear()`."""

    def __init__(self, every_s: float = REPEAT_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.every_s = every_s
        self._clock = clock
        self._at: float | None = None

    @property
    def warned(self) -> bool:
        return self._at is not None

    def due(self) -> bool:
        now = self._clock()
        if self._at is not None and now - self._at < self.every_s:
            return False
        self._at = now
        return True

    def clear(self) -> None:
        self._at = None


class RepeatFilter(logging.Filter):
    """A client library's identical record (same logger, message and arguments) passes at most
    once per `every_s`; the next one that passes says how many were dropped (`repeated`).
    aiokafka logs `Topic %s not found in cluster metadata` at ERROR about ten times a second
    for as long as a topic it waits for is missing (2,103 lines in 3 minutes, measured)."""

    def __init__(
        self,
        prefixes: tuple[str, ...] = ("aiokafka",),
        every_s: float = REPEAT_S,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = 1_000,
    ) -> None:
        super().__init__()
        self._prefixes, self._every_s, self._clock, self._max_keys = prefixes, every_s, clock, max_keys
        self._seen: dict[tuple[str, str, str], list[float]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(self._prefixes):
            return True
        key = (record.name, str(record.msg), repr(record.args))
        now = self._clock()
        seen = self._seen.get(key)
        if seen is not None and now - seen[0] < self._every_s:
            seen[1] += 1
            return False
        if len(self._seen) >= self._max_keys:
            self._seen.clear()
        self._seen[key] = [now, 0]
        if seen is not None and seen[1]:
            record.repeated = int(seen[1])
        return True


def _jsonable(value: Any) -> Any:
    if isinstance(value, SecretStr):
        return "**********"
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        event: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        span = trace.get_current_span().get_span_context()
        if span.is_valid:
            event["trace_id"] = format(span.trace_id, "032x")
            event["span_id"] = format(span.span_id, "016x")
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                event[key] = _jsonable(value)
        if record.exc_info and record.exc_info[0] is not None:
            event["error_type"] = record.exc_info[0].__name__
            event["traceback"] = self.formatException(record.exc_info)
        return redact(orjson.dumps(event).decode())


def configure_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RepeatFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("aiokafka", "httpx2", "httpcore", "anthropic"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))
