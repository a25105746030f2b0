"""Configuration: one validated settings object, read from a YAML file at the edge."""

from service.config.loader import ConfigError, load_config
from service.config.secrets import SecretRef
from service.config.settings import (
    AnthropicSettings,
    GatewaySettings,
    KafkaSettings,
    LimitSettings,
    PartnerSettings,
    RetrySettings,
    RuntimeSettings,
)

__all__ = [
    "AnthropicSettings",
    "ConfigError",
    "GatewaySettings",
    "KafkaSettings",
    "LimitSettings",
    "PartnerSettings",
    "RetrySettings",
    "RuntimeSettings",
    "SecretRef",
    "load_config",
]
