"""What the client raises.

    Exception
     ├── DeadLettered        the gateway dead-lettered the request (`document`, `reason`)
     └── TimeoutError
          └── OutcomeTimeout no outcome within the time given (`request_id`, `ignored`)

Kafka errors from sending (aiokafka's `KafkaError`) pass through unchanged: after one,
the record may or may not have been written; send again with the same request id.
"""

from __future__ import annotations

from typing import Any


class DeadLettered(Exception):
    """The gateway dead-lettered the request; `document` says why (`reason`, `detail`,
    `retryable`; schemas/deadletter.v1.json)."""

    def __init__(self, document: dict[str, Any]) -> None:
        super().__init__(f"{document.get('reason')}: {document.get('detail')}")
        self.document = document
        self.reason = str(document.get("reason"))
        self.request_id: str | None = document.get("request_id")

    def __reduce__(self) -> tuple[Any, ...]:  # picklable (multiprocessing, task queues)
        return (type(self), (self.document,))


class OutcomeTimeout(TimeoutError):
    """No outcome for `request_id` in time. `ignored`: dead letters seen for it that are not
    its outcome (`replay` of a copy this client sent again), for diagnosis."""

    def __init__(self, request_id: str, timeout_s: float, ignored: list[dict[str, Any]]) -> None:
        more = f"; {len(ignored)} dead letter(s) of copies ignored" if ignored else ""
        super().__init__(f"no outcome for request {request_id!r} within {timeout_s:g}s{more}")
        self.request_id = request_id
        self.timeout_s = timeout_s
        self.ignored = ignored

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.request_id, self.timeout_s, self.ignored))
