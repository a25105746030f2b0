"""The partner registry: which topic belongs to which partner, with its resolved secrets.

Built from settings at start and on every reload; swapped atomically, so a
disabled partner or a removed key takes effect for the next message.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from pydantic import SecretStr

from service.config.secrets import SecretResolutionError
from service.config.settings import GatewaySettings, PartnerSettings


@dataclass(frozen=True, slots=True)
class Partner:
    settings: PartnerSettings
    api_key: SecretStr
    signing_keys: Mapping[str, SecretStr] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return self.settings.id


class RegistryError(ValueError):
    """A partner's secret could not be resolved; the message names the setting."""


@dataclass(frozen=True, slots=True)
class Registry:
    settings: GatewaySettings
    by_topic: Mapping[str, Partner]
    by_id: Mapping[str, Partner]

    @classmethod
    def build(cls, settings: GatewaySettings, environ: Mapping[str, str] | None = None) -> Registry:
        by_topic: dict[str, Partner] = {}
        by_id: dict[str, Partner] = {}
        errors: list[str] = []
        for ps in settings.partners:
            try:
                key = ps.api_key.resolve(environ)
            except SecretResolutionError as exc:
                errors.append(f"partners[{ps.id}].api_key ({ps.api_key.describe()}): {exc}")
                continue
            signing: dict[str, SecretStr] = {}
            for kid, ref in ps.signing.keys.items():
                try:
                    signing[kid] = ref.resolve(environ)
                except SecretResolutionError as exc:
                    errors.append(f"partners[{ps.id}].signing.keys.{kid} ({ref.describe()}): {exc}")
            partner = Partner(ps, key, signing)
            by_topic[settings.request_topic(ps)] = partner
            by_id[ps.id] = partner
        if errors:
            raise RegistryError("cannot load partner secrets:\n  " + "\n  ".join(errors))
        return cls(settings, by_topic, by_id)

    def api_keys(self) -> dict[str, SecretStr]:
        """Each partner's own Anthropic key."""
        return {pid: partner.api_key for pid, partner in self.by_id.items()}

    def partner_id_for_topic(self, topic: str) -> str:
        """The partner a topic belongs to; for unknown topics, the topic's suffix."""
        partner = self.by_topic.get(topic)
        if partner is not None:
            return partner.id
        prefix = self.settings.kafka.request_topic_prefix
        return topic[len(prefix) :] if topic.startswith(prefix) else topic
