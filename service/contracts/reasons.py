"""Why a request ended as a dead letter. The values are the wire contract."""

from __future__ import annotations

from enum import StrEnum


class Reason(StrEnum):
    # decoding
    OVERSIZE = "oversize"
    INVALID_ENCODING = "invalid_encoding"
    UNDECODABLE_RECORD = "undecodable_record"
    """The Kafka client could not decode the record itself (e.g. a header name not UTF-8)."""
    MALFORMED_JSON = "malformed_json"
    SCHEMA_VIOLATION = "schema_violation"
    # identity and integrity
    UNKNOWN_PARTNER = "unknown_partner"
    PARTNER_DISABLED = "partner_disabled"
    IDENTITY_MISMATCH = "identity_mismatch"
    MISSING_SIGNATURE = "missing_signature"
    BAD_SIGNATURE = "bad_signature"
    UNKNOWN_SIGNING_KEY = "unknown_signing_key"
    STALE_TIMESTAMP = "stale_timestamp"
    REPLAY = "replay"
    # policy and budget
    UNKNOWN_MODEL = "unknown_model"
    MODEL_NOT_ALLOWED = "model_not_allowed"
    MAX_TOKENS_EXCEEDED = "max_tokens_exceeded"
    """Over the partner's `max_tokens_cap` or the model's documented maximum."""
    PARAM_NOT_ALLOWED = "param_not_allowed"
    """A value of `service_tier`, `speed`, `inference_geo`, `workspace_id` or a server tool that
    the partner's `policy` does not allow."""
    BUDGET_EXHAUSTED = "budget_exhausted"
    # upstream
    INVALID_REQUEST = "invalid_request"
    """The SDK (before sending) or Claude (400 `invalid_request_error`) refused the request's
    content; `detail` carries their message. Sending it again unchanged fails again."""
    UPSTREAM_BAD_REQUEST = "upstream_bad_request"
    """Not written any more (a 400 is `invalid_request`); kept so old dead letters still validate."""
    UPSTREAM_AUTHENTICATION = "upstream_authentication"
    UPSTREAM_PERMISSION = "upstream_permission"
    UPSTREAM_NOT_FOUND = "upstream_not_found"
    UPSTREAM_TOO_LARGE = "upstream_too_large"
    UPSTREAM_SPEND_LIMIT = "upstream_spend_limit"
    UPSTREAM_REJECTED = "upstream_rejected"
    OVER_RATE_LIMIT = "over_rate_limit"
    """Claude answered 429 for a request that needs more of a per-minute limit than the limit
    itself (`max_tokens` above the output-tokens limit, say): no wait lets it through."""
    RETRIES_EXHAUSTED = "retries_exhausted"
    OUTCOME_UNKNOWN = "outcome_unknown"
    RESPONSE_TOO_LARGE = "response_too_large"
    BATCH_EXPIRED = "batch_expired"
    BATCH_CANCELED = "batch_canceled"
    # the gateway itself
    INTERNAL_ERROR = "internal_error"


RETRYABLE_REASONS = frozenset(
    {
        Reason.BUDGET_EXHAUSTED,
        Reason.RETRIES_EXHAUSTED,
        Reason.UPSTREAM_SPEND_LIMIT,
        Reason.INTERNAL_ERROR,
        Reason.BATCH_EXPIRED,
        Reason.BATCH_CANCELED,
    }
)
