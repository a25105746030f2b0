"""The gateway's settings model: Kafka, Claude, retries, limits, partners (prices: `prices.py`).

One frozen pydantic object, validated once at start (and on reload). Units are
in the names (`_s`, `_ms`, `_bytes`, `_usd`). Secrets are `SecretRef`s: the
file says where a secret lives, never what it is.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from service.config.batching import BatchSettings, ServiceClass
from service.config.frozen import Frozen as _Frozen
from service.config.policy import ParamsPolicy
from service.config.prices import ModelPrice, default_models
from service.config.response_cache import PartnerCacheSettings, ResponseCacheSettings
from service.config.secrets import SecretRef

_PARTNER_ID = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
_KEY_ID = re.compile(r"^[A-Za-z0-9_-]{1,63}$")


class KafkaSettings(_Frozen):
    """The service's own Kafka connection and topic naming."""

    bootstrap_servers: str = "127.0.0.1:9092"
    group_id: str = "claude-gateway"
    client_id: str = "claude-gateway"
    request_topic_prefix: str = "claude.requests."
    response_topic_prefix: str = "claude.responses."
    deadletter_topic_prefix: str = "claude.deadletter."
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretRef | None = None
    sasl_oauth_token: SecretRef | None = None
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_check_hostname: bool = True
    max_poll_records: int = Field(default=500, gt=0)
    session_timeout_ms: int = Field(default=45_000, gt=0)
    heartbeat_interval_ms: int = Field(default=3_000, gt=0)
    max_poll_interval_ms: int = Field(default=300_000, gt=0)
    producer_linger_ms: int = Field(default=5, ge=0)
    producer_compression: Literal["gzip", "snappy", "lz4", "zstd"] | None = None
    producer_max_request_bytes: int = Field(default=16 * 1024 * 1024, gt=0)
    producer_max_batch_bytes: int = Field(default=512 * 1024, gt=0)
    metadata_max_age_ms: int = Field(default=30_000, gt=0)

    exactly_once: bool = True
    """One transactional producer per owned request partition: outcomes, offsets and
    claims commit together (see docs/exactly-once.md). False: at-least-once, a crash
    may redo and re-bill in-flight work."""
    eos_tick_ms: int = Field(default=20, ge=1)
    """How long outcomes and claims wait to be batched into one transaction."""
    eos_window: int = Field(default=8_192, gt=0, le=16_384)
    """Offsets a partition may run ahead of its commit point; beyond, it is paused.
    Bounded so the commit metadata fits the broker's `offset.metadata.max.bytes`."""
    eos_max_claims: int = Field(default=128, gt=0, le=256)
    """Calls in flight per partition (each is recorded in the commit metadata)."""
    eos_heartbeat_s: float = Field(default=1.0, gt=0)
    """A partition with calls in flight commits at least this often, so a new owner can
    tell a live previous owner (wait for it) from a dead one (resolve its claims)."""
    eos_prepared_idle_ms: int = Field(default=1_000, ge=0)
    """When another tick is expected soon (calls in flight, or three ticks within this time), a
    partition's next transaction begins as soon as one commits, with its likely partitions and
    the group added ahead; ended if nothing comes for it this long (0: never begun ahead)."""
    eos_producers: int = Field(default=2, ge=1, le=4)
    """Transactional producers per owned partition, taking turns: the next tick is sent while the
    last one commits (`service/ingest/turns.py`). 1: each tick waits for the last one's markers."""
    eos_handoff_max_s: float = Field(default=30.0, ge=0)
    """How long a new owner waits for a live previous owner to finish its calls."""
    transaction_timeout_ms: int = Field(default=60_000, gt=0)
    max_partition_fetch_bytes: int = Field(default=256 * 1024, gt=0)
    """Bytes fetched per partition at a time. A paused or sought-back partition drops what
    was fetched and not read, so a smaller value wastes less (a larger record still comes)."""
    fetch_horizon_s: float = Field(default=5.0, gt=0)
    """Fetch per partner only what it can start within this many seconds at its current rate
    (and never more than its `max_queue`): the backlog stays in Kafka."""

    audit_topic: str | None = Field(default=None, min_length=1, max_length=249)
    """Also publish audit events (key rotation, partner enable/disable, budget exhaustion) here."""
    usage_topic: str = Field(default="claude.usage", min_length=1, max_length=249)
    """Metering records (schemas/usage.v1.json): one per billed call, keyed by partner, published
    in the same transaction as the call's outcome (service/egress/metering.py)."""

    @model_validator(mode="after")
    def _sasl_complete(self) -> KafkaSettings:
        sasl = self.security_protocol.startswith("SASL")
        if sasl and self.sasl_mechanism is None:
            raise ValueError(f"kafka.sasl_mechanism is required with {self.security_protocol}")
        if not sasl and self.sasl_mechanism is not None:
            raise ValueError(
                f"kafka.sasl_mechanism is set but kafka.security_protocol is {self.security_protocol}; "
                "use SASL_SSL (or SASL_PLAINTEXT)"
            )
        tls = self.security_protocol in ("SSL", "SASL_SSL")
        for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            if getattr(self, name) is not None and not tls:
                raise ValueError(
                    f"kafka.{name} is set but kafka.security_protocol is {self.security_protocol}; "
                    "use SSL or SASL_SSL"
                )
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise ValueError("kafka.ssl_certfile and kafka.ssl_keyfile go together (client certificate)")
        if self.sasl_mechanism in ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512") and (
            self.sasl_username is None or self.sasl_password is None
        ):
            raise ValueError(
                f"kafka.sasl_username and kafka.sasl_password are required with {self.sasl_mechanism}"
            )
        if self.sasl_mechanism == "OAUTHBEARER" and self.sasl_oauth_token is None:
            raise ValueError("kafka.sasl_oauth_token is required with OAUTHBEARER")
        if self.eos_prepared_idle_ms * 2 > self.transaction_timeout_ms:
            raise ValueError(
                "kafka.eos_prepared_idle_ms must be at most half kafka.transaction_timeout_ms "
                "(the coordinator aborts a transaction open longer and fences its producer)"
            )
        return self


class AnthropicSettings(_Frozen):
    """How the service reaches Claude."""

    base_url: str = "https://api.anthropic.com"
    timeout_s: float = Field(default=600.0, gt=0)
    connect_timeout_s: float = Field(default=10.0, gt=0)
    max_connections: int = Field(default=512, gt=0)


class RetrySettings(_Frozen):
    """The service's own retry policy (the SDK runs with max_retries=0)."""

    max_attempts: int = Field(default=6, ge=1)
    base_delay_s: float = Field(default=0.5, gt=0)
    max_delay_s: float = Field(default=30.0, gt=0)
    max_elapsed_s: float = Field(default=600.0, gt=0)
    max_retry_after_s: float = Field(default=120.0, gt=0)


class LimitSettings(_Frozen):
    """Requests / input tokens / output tokens per minute. None means no limit."""

    rpm: int | None = Field(default=None, gt=0)
    itpm: int | None = Field(default=None, gt=0)
    otpm: int | None = Field(default=None, gt=0)


class RateLimitSettings(_Frozen):
    """How the shared limits react to the upstream: 429 pauses and rate-limit headers."""

    max_pause_s: float = Field(default=60.0, gt=0)
    """The longest a 429 pauses its scope (an org pool, or one key or workspace), whatever its
    `retry-after` says."""
    follow_header_limits: bool = False
    """Let the `anthropic-ratelimit-*-limit` headers resize an org pool. Off: a limit that
    differs from the configured one is logged, and the configured limit is kept."""


class EstimateSettings(_Frozen):
    """How admission estimates a request's input tokens before the call (see
    service/admission/estimate.py). Every figure errs on the side of reserving more."""

    image_max_long_edge_px: int = Field(default=1568, gt=0)
    image_max_tokens: int = Field(default=1_600, gt=0)
    """An image is scaled down to fit both (Anthropic's resizing), then costs w*h/750 tokens."""
    high_res_models: list[str] = Field(default_factory=lambda: ["opus-4-7", "opus-4-8"])
    """Models (substrings of the id) that keep images up to the `high_res_*` sizes."""
    high_res_max_long_edge_px: int = Field(default=2576, gt=0)
    high_res_max_tokens: int = Field(default=4_784, gt=0)
    document_page_text_tokens: int = Field(default=3_000, gt=0)
    """The most text one PDF page is counted for (Anthropic: 1,500-3,000 a page), beside its image."""
    unknown_document_tokens: int = Field(default=100_000, gt=0)
    """A document whose size cannot be known here (a URL, a file id, an unreadable PDF)."""
    tool_overhead_tokens: int = Field(default=350, ge=0)
    """The system prompt Anthropic adds when tools are given (346 tokens on Claude 4 models)."""
    server_tool_uses: int = Field(default=5, gt=0)
    """Uses assumed for a server tool (web search, web fetch) without `max_uses`."""
    server_tool_tokens_per_use: int = Field(default=20_000, gt=0)
    """Input tokens one server tool use adds (search results, a fetched page)."""
    server_tool_max_uses: int = Field(default=100, gt=0)
    """`max_uses` counted at most: a limit set far beyond any call's use (2**64, say) would reserve
    more than any budget or ITPM bucket holds, and stall every partner's calls until it settled."""


class SigningSettings(_Frozen):
    """HMAC-SHA256 request signatures: key id -> secret reference (several at once, to rotate)."""

    required: bool = False
    keys: dict[str, SecretRef] = Field(default_factory=dict)
    max_skew_s: float = Field(default=300.0, gt=0)

    @field_validator("keys")
    @classmethod
    def _key_ids(cls, value: dict[str, SecretRef]) -> dict[str, SecretRef]:
        for kid in value:
            if not _KEY_ID.match(kid):
                raise ValueError(
                    f"signing key id {kid!r} must match {_KEY_ID.pattern} (it is sent as a header)"
                )
        return value

    @model_validator(mode="after")
    def _keys_when_required(self) -> SigningSettings:
        if self.required and not self.keys:
            raise ValueError("signing.required is true but signing.keys is empty")
        return self


class BudgetSettings(_Frozen):
    """Spend caps per partner. None means no cap."""

    tokens_per_day: int | None = Field(default=None, gt=0)
    tokens_per_month: int | None = Field(default=None, gt=0)
    usd_per_day: float | None = Field(default=None, gt=0)
    usd_per_month: float | None = Field(default=None, gt=0)
    on_exhausted: Literal["deadletter", "defer"] = "deadletter"


class PartnerSettings(_Frozen):
    """One partner: identity, limits, policy, budget and keys."""

    id: str
    enabled: bool = True
    request_topic: str | None = None
    weight: float = Field(default=1.0, gt=0)
    max_concurrency: int = Field(default=32, gt=0)
    max_queue: int = Field(default=1_000, gt=0)
    limits: LimitSettings = LimitSettings()
    api_key: SecretRef
    allowed_models: list[str] | None = None
    max_tokens_cap: int | None = Field(default=None, gt=0)
    max_tokens_policy: Literal["reject", "clamp"] = "reject"
    max_request_bytes: int = Field(default=1024 * 1024, gt=0)
    signing: SigningSettings = SigningSettings()
    dedupe: bool = False
    """Reject a request id seen again within `replay_window_s` even without signing
    (always on when `signing.required`)."""
    replay_window_s: float | None = Field(default=None, gt=0)
    """How long a request id is remembered, from the record's reference time (its LogAppendTime,
    else when the gateway reads it), and at least until its signature expires (its timestamp +
    `signing.max_skew_s`); default 2 x `signing.max_skew_s` (service/admission/replay.py)."""
    budget: BudgetSettings = BudgetSettings()
    policy: ParamsPolicy = ParamsPolicy()
    """Which values of `service_tier`, `speed`, `inference_geo`, `workspace_id` and which server
    tools the partner may send (service/config/policy.py); by default any."""
    workspace: str | None = Field(default=None, min_length=1, max_length=128)
    """The Anthropic workspace of this partner's key. Partners in one workspace share its
    limits: a 429 about the workspace pauses them all, and no one else."""
    on_unknown: Literal["deadletter", "retry"] = "deadletter"
    service_class: ServiceClass = "realtime"
    """A request's class when it names none: `batch` and `auto` use Message Batches
    (half price) when `batches.enabled` (docs/batches.md)."""
    """A call whose outcome is unknown (its owner died mid-call, a timeout or dropped
    connection after sending): dead-letter `outcome_unknown`, or call again and maybe pay twice."""
    cache: PartnerCacheSettings = PartnerCacheSettings()
    """The exact response cache (service/response_cache/): off unless `enabled`."""

    @model_validator(mode="after")
    def _replay_window_covers_skew(self) -> PartnerSettings:
        window = self.replay_window_s
        if self.signing.required and window is not None and window < 2 * self.signing.max_skew_s:
            raise ValueError(
                f"replay_window_s ({window:g}) must be at least 2 x signing.max_skew_s "
                f"({2 * self.signing.max_skew_s:g}): a signature is valid max_skew_s either side of its "
                "timestamp, and a request id signed again within that time must still be a replay"
            )
        return self

    @field_validator("id")
    @classmethod
    def _id_format(cls, value: str) -> str:
        if not _PARTNER_ID.match(value):
            raise ValueError(
                f"partner id {value!r} must match {_PARTNER_ID.pattern} (it becomes a topic suffix)"
            )
        return value


class RedisSettings(_Frozen):
    """Shared limits and budgets across replicas."""

    url: str = "redis://127.0.0.1:6379/0"
    password: SecretRef | None = None
    key_prefix: str = "claude-gateway"
    timeout_s: float = Field(default=0.5, gt=0)
    max_connections: int = Field(default=32, gt=0)
    pool_timeout_s: float = Field(default=2.0, gt=0)
    """How long a call waits for a free connection of the pool when all `max_connections` are
    in use (a burst). Running out is this replica's queue, not Redis failing: that call falls
    back to the local state, and Redis' health is unchanged."""
    degraded_share: float = Field(default=0.0, ge=0, le=1)
    """Share of the org limits one replica may use while Redis is unreachable
    (0 = 1/expected_replicas)."""
    expected_replicas: int = Field(default=1, gt=0)


class RuntimeSettings(_Frozen):
    """Concurrency, draining and the service's own HTTP endpoint."""

    max_in_flight: int = Field(default=1_024, gt=0)
    drain_timeout_s: float = Field(default=25.0, gt=0)
    commit_interval_s: float = Field(default=0.5, gt=0)
    http_host: str = "0.0.0.0"  # noqa: S104 - the metrics/health port must be reachable in a pod
    http_port: int = Field(default=9464, ge=0, le=65535)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    estimate_chars_per_token: float = Field(default=3.0, gt=0)
    replay_cache_max_entries: int = Field(default=200_000, gt=0)
    """Request ids remembered in process for replay protection (Redis holds them too, if configured)."""
    budget_defer_poll_s: float = Field(default=5.0, gt=0)
    """How often a request deferred by an exhausted budget looks again (another replica may refund)."""


class AdminSettings(_Frozen):
    """The admin console and its API under `/admin` on the HTTP port (docs/operations.md#admin-console).

    Without this section the console is off (404)."""

    token: SecretRef
    """The operators' token (a secret reference): `Authorization: Bearer <token>` for the API,
    a login form for the page. Every page and action asks for it."""


class OperatorReplaySettings(_Frozen):
    """Keys that sign operator replays of dead letters (`claude-gateway dlq replay`); the gateway
    accepts a replayed request through the signature and replay checks only with a valid one."""

    keys: dict[str, SecretRef]
    """Key id -> secret reference (several at once, to rotate)."""
    max_age_s: float = Field(default=300.0, gt=0)
    """How long after `dlq replay` signed it a replayed request is accepted."""

    @field_validator("keys")
    @classmethod
    def _key_ids(cls, value: dict[str, SecretRef]) -> dict[str, SecretRef]:
        if not value:
            raise ValueError("operator_replay.keys needs at least one key")
        for kid in value:
            if not _KEY_ID.match(kid):
                raise ValueError(f"operator replay key id {kid!r} must match {_KEY_ID.pattern}")
        return value


class GatewaySettings(_Frozen):
    """Everything the service needs, from one file."""

    kafka: KafkaSettings = KafkaSettings()
    anthropic: AnthropicSettings = AnthropicSettings()
    retry: RetrySettings = RetrySettings()
    runtime: RuntimeSettings = RuntimeSettings()
    org_limits: LimitSettings = LimitSettings()
    """The org's limits for models of no class in `org_class_limits` (all models when it is empty)."""
    org_class_limits: dict[str, LimitSettings] = Field(default_factory=dict)
    """Org limits per model class, pooled as Anthropic pools them: `{haiku: {...}, opus: {...}}`.
    A model draws on the first class whose name is a substring of its id."""
    rate_limits: RateLimitSettings = RateLimitSettings()
    estimates: EstimateSettings = EstimateSettings()
    limiter_backend: Literal["local", "redis"] = "local"
    redis: RedisSettings | None = None
    admin: AdminSettings | None = None
    operator_replay: OperatorReplaySettings | None = None
    batches: BatchSettings = BatchSettings()
    models: dict[str, ModelPrice] = Field(default_factory=default_models)
    price_version: str | None = Field(default=None, min_length=1, max_length=64)
    """Names the prices in `models`; every `cost` carries it. None: derived from the table
    (`auto-` and 12 hex digits of its SHA-256), so any change of a price changes it."""
    response_cache: ResponseCacheSettings = ResponseCacheSettings()
    """The exact response cache's store and sharing; partners opt in with `partners[].cache`."""
    partners: list[PartnerSettings]

    @model_validator(mode="after")
    def _consistent(self) -> GatewaySettings:
        seen: set[str] = set()
        topics: set[str] = set()
        for p in self.partners:
            if p.id in seen:
                raise ValueError(f"partners: duplicate partner id {p.id!r}")
            seen.add(p.id)
            topic = self.request_topic(p)
            if topic in topics:
                raise ValueError(f"partners[{p.id}].request_topic: {topic!r} is used twice")
            topics.add(topic)
            for model in p.allowed_models or []:
                if model not in self.models:
                    raise ValueError(
                        f"partners[{p.id}].allowed_models: {model!r} is not in the models price table"
                    )
        for name in self.org_class_limits:
            if not name or name == "default":
                raise ValueError(f"org_class_limits: {name!r} is not a class name (a part of model ids)")
        unknown = self.response_cache.unknown_partners(seen)
        if unknown:
            raise ValueError(unknown[0])
        if self.limiter_backend == "redis" and self.redis is None:
            raise ValueError("limiter_backend is 'redis' but the redis section is missing")
        return self

    def request_topic(self, partner: PartnerSettings) -> str:
        return partner.request_topic or f"{self.kafka.request_topic_prefix}{partner.id}"

    def response_topic(self, partner_id: str) -> str:
        return f"{self.kafka.response_topic_prefix}{partner_id}"

    def deadletter_topic(self, partner_id: str) -> str:
        return f"{self.kafka.deadletter_topic_prefix}{partner_id}"

    def realtime_topic(self) -> str:
        """Where the batch path sends requests back to real time (inside the subscription)."""
        return self.batches.realtime_topic or f"{self.kafka.request_topic_prefix}_gateway.realtime"
