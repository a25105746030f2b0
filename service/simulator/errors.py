"""API errors the simulator answers with, in Anthropic's error body shape.

    {"type": "error", "error": {"type": ..., "message": ..., ["details": {...}]}}

`ApiError` is raised by validation and turned into a response by the handler.
Each subclass fixes the HTTP status and `error.type` the SDK maps to its own
exception class (400 BadRequestError ... 529 OverloadedError).
"""

from __future__ import annotations

from typing import Any, ClassVar

import orjson


class ApiError(Exception):
    """An error answer: `status` and `error_type` per class, message per instance."""

    status: ClassVar[int] = 500
    error_type: ClassVar[str] = "api_error"

    def __init__(self, message: str, *, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def body(self, request_id: str | None = None) -> bytes:
        """The JSON error body."""
        error: dict[str, Any] = {"type": self.error_type, "message": self.message}
        if self.details is not None:
            error["details"] = self.details
        doc: dict[str, Any] = {"type": "error", "error": error}
        if request_id is not None:
            doc["request_id"] = request_id
        return orjson.dumps(doc)


class InvalidRequestError(ApiError):
    """400: the body or a header is wrong."""

    status = 400
    error_type = "invalid_request_error"


class AuthenticationError(ApiError):
    """401: the key is missing or unknown."""

    status = 401
    error_type = "authentication_error"


class NotFoundError(ApiError):
    """404: unknown model (or path)."""

    status = 404
    error_type = "not_found_error"


class RequestTooLargeError(ApiError):
    """413: the body is over `max_body_bytes`."""

    status = 413
    error_type = "request_too_large"


class RateLimitError(ApiError):
    """429: a bucket lacks capacity, or (with details) a spend limit was reached."""

    status = 429
    error_type = "rate_limit_error"


class InternalApiError(ApiError):
    """500: an injected internal error."""

    status = 500
    error_type = "api_error"


class OverloadedError(ApiError):
    """529: an injected overload."""

    status = 529
    error_type = "overloaded_error"
