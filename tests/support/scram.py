"""Change a user's SCRAM password on a running broker, from Python (no Java, no kafka-configs.sh).

Kafka's AlterUserScramCredentials (API key 51, KIP-554), version 0, a flexible version (compact
strings, arrays and bytes, tagged fields). aiokafka 0.14 has no such request: it is written here
with aiokafka's protocol types, as service/ingest/open_transactions.py writes DescribeProducers.
The client sends the salted password, never the password: SaltedPassword = Hi(password, salt,
iterations) of RFC 5802, i.e. PBKDF2 with the mechanism's HMAC. An upsertion creates the user's
credential for that mechanism or replaces it (one password per user and mechanism).

    await set_scram_password(broker.plaintext, "gateway", "n3w-passw0rd")

The broker must allow it: without an authorizer (tests/support/secure_kafka.py) any client may;
with one, the principal needs ALTER on the cluster.
"""

from __future__ import annotations

import hashlib
import secrets

from aiokafka import AIOKafkaClient
from aiokafka.errors import for_code
from aiokafka.protocol.api import Request, RequestStruct, Response
from aiokafka.protocol.types import (
    CompactArray,
    CompactBytes,
    CompactString,
    Int8,
    Int16,
    Int32,
    Schema,
    TaggedFields,
)

API_KEY = 51
MECHANISMS = {"SCRAM-SHA-256": (1, "sha256"), "SCRAM-SHA-512": (2, "sha512")}
"""Mechanism name -> (its id in the request, its hash)."""
ITERATIONS = 4096  # Kafka's minimum (and its tools' default)


class AlterUserScramCredentialsResponse_v0(Response):  # type: ignore[misc]
    API_KEY = API_KEY
    API_VERSION = 0
    SCHEMA = Schema(
        ("throttle_time_ms", Int32),
        (
            "results",
            CompactArray(
                ("user", CompactString("utf-8")),
                ("error_code", Int16),
                ("error_message", CompactString("utf-8")),
                ("tags", TaggedFields),
            ),
        ),
        ("tags", TaggedFields),
    )


class AlterUserScramCredentialsRequest_v0(RequestStruct):  # type: ignore[misc]
    FLEXIBLE_VERSION = True
    API_KEY = API_KEY
    API_VERSION = 0
    RESPONSE_TYPE = AlterUserScramCredentialsResponse_v0
    SCHEMA = Schema(
        (
            "deletions",
            CompactArray(
                ("name", CompactString("utf-8")),
                ("mechanism", Int8),
                ("tags", TaggedFields),
            ),
        ),
        (
            "upsertions",
            CompactArray(
                ("name", CompactString("utf-8")),
                ("mechanism", Int8),
                ("iterations", Int32),
                ("salt", CompactBytes),
                ("salted_password", CompactBytes),
                ("tags", TaggedFields),
            ),
        ),
        ("tags", TaggedFields),
    )


def salted_password(password: str, salt: bytes, iterations: int, mechanism: str = "SCRAM-SHA-512") -> bytes:
    """Hi(password, salt, i) of RFC 5802: PBKDF2-HMAC with the mechanism's hash."""
    return hashlib.pbkdf2_hmac(MECHANISMS[mechanism][1], password.encode(), salt, iterations)


class AlterUserScramCredentialsRequest(Request[AlterUserScramCredentialsRequest_v0]):  # type: ignore[misc]
    API_KEY = API_KEY

    def __init__(
        self, user: str, password: str, mechanism: str = "SCRAM-SHA-512", iterations: int = ITERATIONS
    ) -> None:
        salt = secrets.token_bytes(32)
        self._upsertion: tuple[str, int, int, bytes, bytes, dict[int, bytes]] = (
            user,
            MECHANISMS[mechanism][0],
            iterations,
            salt,
            salted_password(password, salt, iterations, mechanism),
            {},
        )

    def build(
        self, request_struct_class: type[AlterUserScramCredentialsRequest_v0]
    ) -> AlterUserScramCredentialsRequest_v0:
        return request_struct_class([], [self._upsertion], {})


async def set_scram_password(
    bootstrap: str, user: str, password: str, mechanism: str = "SCRAM-SHA-512", iterations: int = ITERATIONS
) -> None:
    """Create or replace `user`'s `mechanism` credential with `password`, through `bootstrap`
    (a listener that needs no authentication). Raises the broker's error, if any. The broker
    answers once its controller committed the change; connections authenticated before keep
    their session (until `connections.max.reauth.ms`, if set)."""
    client = AIOKafkaClient(bootstrap_servers=bootstrap, client_id="tests-scram")
    await client.bootstrap()
    try:
        node = client.get_random_node()
        response = await client.send(
            node, AlterUserScramCredentialsRequest(user, password, mechanism, iterations)
        )
    finally:
        await client.close()
    for name, code, message, _tags in response.results:
        if code:
            raise for_code(code)(f"AlterUserScramCredentials for {name}: {message}")
