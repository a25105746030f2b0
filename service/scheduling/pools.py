"""Which org pool a request draws on, and which key scope a partner's calls belong to.

Anthropic pools an organisation's limits per model family (ANTHROPIC.md: a Haiku
bucket, a Sonnet bucket, an Opus bucket). `org_class_limits` names those
classes: a model draws on the first class whose name is a substring of its id
(`"haiku"` matches `claude-haiku-4-5`); a model that matches none draws on
`org_limits`, the `default` class. With no classes configured every model
shares `org_limits`, as before.

A key scope is what a 429 can be about besides the org: the partner's own key,
or the Anthropic workspace the key belongs to (`partners[].workspace`; partners
in one workspace share its limits and its pauses).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from service.config.settings import GatewaySettings, LimitSettings

DEFAULT_CLASS = "default"
DIMENSIONS = ("rpm", "itpm", "otpm")

ScopeKind = Literal["org", "key"]


@dataclass(frozen=True, slots=True)
class PauseScope:
    """What a 429 pauses: an org pool (`org`, its class) or a key scope (`key`, its name)."""

    kind: ScopeKind
    name: str


def model_class(model: str, classes: Iterable[str]) -> str:
    """The pool `model` draws on: the first class named in its id, else `default`."""
    for name in classes:
        if name != DEFAULT_CLASS and name in model:
            return name
    return DEFAULT_CLASS


def key_scope(partner_id: str, workspace: str | None) -> str:
    """The key scope of a partner's calls: its workspace when configured, else its own key."""
    return f"workspace:{workspace}" if workspace else f"key:{partner_id}"


@dataclass(frozen=True, slots=True)
class LimitConfig:
    """Everything a limiter enforces: org pools per class, partner limits, key scopes."""

    pools: Mapping[str, LimitSettings]
    """Class name -> org limits; always has `default`."""
    partners: Mapping[str, LimitSettings] = field(default_factory=dict)
    scopes: Mapping[str, str] = field(default_factory=dict)
    """Partner id -> key scope (see `key_scope`); a partner not listed is its own scope."""
    follow_header_limits: bool = False
    """Let `anthropic-ratelimit-*-limit` headers resize an org pool (else they are only logged)."""

    @classmethod
    def of(cls, settings: GatewaySettings) -> LimitConfig:
        return cls(
            pools={DEFAULT_CLASS: settings.org_limits, **settings.org_class_limits},
            partners={p.id: p.limits for p in settings.partners},
            scopes={p.id: key_scope(p.id, p.workspace) for p in settings.partners},
            follow_header_limits=settings.rate_limits.follow_header_limits,
        )

    @classmethod
    def simple(cls, org: LimitSettings, partners: Mapping[str, LimitSettings] | None = None) -> LimitConfig:
        """One pool for every model (tests, tools)."""
        return cls(pools={DEFAULT_CLASS: org}, partners=dict(partners or {}))

    def model_class(self, model: str) -> str:
        return model_class(model, self.pools)

    def scope_of(self, partner_id: str) -> str:
        return self.scopes.get(partner_id) or key_scope(partner_id, None)

    def members(self, scope: str) -> list[str]:
        """The partners whose calls share key scope `scope`."""
        return [p for p in self.partners if self.scope_of(p) == scope] or (
            [scope.removeprefix("key:")] if scope.startswith("key:") else []
        )

    def pool(self, cls_name: str) -> LimitSettings:
        return self.pools.get(cls_name) or self.pools[DEFAULT_CLASS]


def pool_label(cls_name: str) -> str:
    """How a pool shows in `levels()` and metrics: `org` for the default class, `org:<class>`."""
    return "org" if cls_name == DEFAULT_CLASS else f"org:{cls_name}"
