"""Claude Partner Gateway client: sign requests, produce them, await their outcomes.

    from claude_gateway_client import PartnerClient, SyncPartnerClient, DeadLettered

    async with PartnerClient("kafka:9092", "acme", key_id="k2025a", secret=secret) as client:
        response = await client.request(params)

    with SyncPartnerClient("kafka:9092", "acme", key_id="k2025a", secret=secret) as client:
        response = client.request(params)

Needs aiokafka and orjson only (not the gateway).
"""

from __future__ import annotations

from claude_gateway_client.client import PartnerClient
from claude_gateway_client.correlation import Correlation, RecordRef
from claude_gateway_client.errors import DeadLettered, OutcomeTimeout
from claude_gateway_client.signing import sign
from claude_gateway_client.sync import SyncPartnerClient

__version__ = "0.1.0"

__all__ = [
    "Correlation",
    "DeadLettered",
    "OutcomeTimeout",
    "PartnerClient",
    "RecordRef",
    "SyncPartnerClient",
    "__version__",
    "sign",
]
