"""The simulator's state and decisions, independent of the HTTP framework.

`SimulatorEngine` owns the config, the single seeded `random.Random`, the
rate limiter, the stats and the key lookup. The aiohttp handlers only move
bytes in and out and ask the engine what to do.
"""

from __future__ import annotations

import hashlib
import itertools
import random
import secrets
import time
from collections.abc import Callable, Mapping
from typing import Any

from service.simulator.batches.store import BatchStore
from service.simulator.buckets import Clock, RateLimiter
from service.simulator.caching import PromptCache
from service.simulator.config import SimulatorConfig
from service.simulator.errors import AuthenticationError, InvalidRequestError
from service.simulator.stats import SimulatorStats
from service.simulator.validation import warm

_BEARER = "bearer "


def key_fingerprint(key: str) -> str:
    """A name for an unconfigured key that does not reveal it: `key-` + 8 hex of its SHA-256."""
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:8]


class SimulatorEngine:
    """Config, randomness, buckets and stats of one simulated organisation."""

    def __init__(
        self,
        config: SimulatorConfig,
        *,
        clock: Clock = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.clock = clock
        self.wall_clock = wall_clock
        self.stats = SimulatorStats(config.max_tracked_requests)
        self._id_prefix = secrets.token_hex(5)
        self._ids = itertools.count(1)
        self.config = config
        self.rng = random.Random(config.seed)
        self.limiter = self._new_limiter(config)
        self.prompt_cache = PromptCache(clock)
        self._key_names = self._key_lookup(config)
        self._fingerprints: dict[str, str] = {}
        self.models = frozenset(config.models)
        self.batches = BatchStore(self._id_prefix)
        warm()  # the body schemas compile once per process

    def _new_limiter(self, config: SimulatorConfig) -> RateLimiter:
        return RateLimiter(
            config.limits,
            config.model_limits,
            config.count_tokens_rpm,
            clock=self.clock,
            workspaces={name: (w.keys, w.limits) for name, w in config.workspaces.items()},
        )

    @staticmethod
    def _key_lookup(config: SimulatorConfig) -> dict[str, str]:
        return {key.get_secret_value(): name for name, key in config.api_keys.items()}

    def reconfigure(self, config: SimulatorConfig) -> None:
        """Switch to `config` at runtime. Buckets are rebuilt (full) only if limits changed;
        the random generator is re-seeded only if the seed changed."""
        old = self.config
        self.config = config
        self.models = frozenset(config.models)
        self._key_names = self._key_lookup(config)
        self._fingerprints.clear()
        self.stats.set_max_tracked(config.max_tracked_requests)
        if (old.limits, old.model_limits, old.count_tokens_rpm, old.workspaces) != (
            config.limits,
            config.model_limits,
            config.count_tokens_rpm,
            config.workspaces,
        ):
            self.limiter = self._new_limiter(config)
        if old.seed != config.seed:
            self.rng = random.Random(config.seed)

    def reset(self, *, empty: bool = False) -> None:
        """Zero the stats, fill (or empty) the buckets, empty the prompt cache, re-seed the
        random generator and forget every Message Batch (a batch in progress would bill into
        the new stats)."""
        self.stats.reset()
        self.batches.clear()
        self.prompt_cache.clear()
        self.limiter.reset(empty=empty)
        self.rng = random.Random(self.config.seed)

    def next_request_id(self) -> str:
        """A unique `request-id` (not drawn from the seeded generator)."""
        return f"req_01{self._id_prefix}{next(self._ids):014x}"

    def next_message_id(self) -> str:
        """A unique message id."""
        return f"msg_01{self._id_prefix}{next(self._ids):014x}"

    def authenticate(self, headers: Mapping[str, str]) -> str:
        """The name of the calling key, from `x-api-key` or `Authorization: Bearer`.

        Raises `AuthenticationError` if no key is sent or (with keys configured)
        the key is unknown. With no keys configured any key is accepted and named
        by its fingerprint.
        """
        key = headers.get("x-api-key")
        if not key:
            auth = headers.get("authorization")
            if auth and auth[:7].lower() == _BEARER:
                key = auth[7:].strip()
        if not key:
            raise AuthenticationError("x-api-key header is required (or Authorization: Bearer <key>)")
        if self._key_names:
            name = self._key_names.get(key)
            if name is None:
                raise AuthenticationError("invalid x-api-key")
        else:
            name = self._fingerprints.get(key)
            if name is None:
                name = key_fingerprint(key)
                if len(self._fingerprints) < 10_000:
                    self._fingerprints[key] = name
        return name

    @staticmethod
    def check_version(headers: Mapping[str, str]) -> None:
        """Raise `InvalidRequestError` unless an `anthropic-version` header is sent."""
        if not headers.get("anthropic-version"):
            raise InvalidRequestError("anthropic-version: header is required")

    def snapshot(self) -> dict[str, Any]:
        """Stats plus current bucket levels, JSON-ready."""
        data = self.stats.as_dict()
        data["batches"].update(self.batches.snapshot())
        data["batches"]["request_counts"]["processing"] = self.batches.queued_requests()
        data["buckets"] = self.limiter.snapshot()
        return data
