"""Audit events: who may spend what, and when that changed. Never a secret value.

Each event is one structured log line with `"audit": true` and an `event`
name, and, when `kafka.audit_topic` is set, also a JSON record on that topic
(key: the partner id). Events:

| event | when | fields |
| --- | --- | --- |
| `partner_loaded` | at start, per partner | enabled, signing_required, signing_key_ids |
| `partner_added`, `partner_removed` | on reload | |
| `partner_enabled`, `partner_disabled` | on reload | |
| `signing_required_changed` | on reload | signing_required |
| `signing_key_added`, `signing_key_removed`, `signing_key_replaced` | on reload | key_id |
| `anthropic_key_rotated` | on reload, when the key's value changed | |
| `budget_exhausted` | first refusal of a period | period, period_label, unit, limit, used, on_exhausted |

Key ids are names, not secrets; values are compared, never written.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

import orjson
from aiokafka.errors import KafkaError
from pydantic import SecretStr

if TYPE_CHECKING:
    from service.admission.registry import Partner, Registry
    from service.egress.publisher import Publisher

log = logging.getLogger("service.audit")

Field = str | int | float | bool | None


class Audit:
    """Emits audit events to the log and, once started, to the audit topic."""

    def __init__(
        self, topic: str | None = None, publisher: Publisher | None = None, max_pending: int = 10_000
    ) -> None:
        self._topic = topic
        self._publisher = publisher
        self._queue: asyncio.Queue[tuple[bytes | None, bytes]] | None = None
        self._max_pending = max_pending
        self._pending: list[tuple[bytes | None, bytes]] = []
        self._task: asyncio.Task[None] | None = None
        self.emitted: list[tuple[str, dict[str, Field]]] = []
        """The events of this process, newest last (bounded), for tests and debugging."""

    def emit(self, event: str, partner: str | None = None, **fields: Field) -> None:
        ctx: dict[str, Field] = {"audit": True, "audit_event": event}
        if partner is not None:
            ctx["partner"] = partner
        ctx.update(fields)
        log.info(event, extra=ctx)
        self.emitted.append((event, ctx))
        del self.emitted[: -self._max_pending]
        if self._topic is None or self._publisher is None:
            return
        doc = {"ts": time.time(), "event": event, **{k: v for k, v in ctx.items() if k != "audit"}}
        item = (partner.encode() if partner else None, orjson.dumps(doc))
        if self._queue is None:
            self._pending.append(item)
            del self._pending[: -self._max_pending]
        elif self._queue.full():
            log.warning("audit topic backlog full: event only logged", extra={"audit_event": event})
        else:
            self._queue.put_nowait(item)

    async def start(self) -> None:
        """Start publishing to the audit topic (no-op without one). The publisher must be started."""
        if self._topic is None or self._publisher is None or self._task is not None:
            return
        self._queue = asyncio.Queue(self._max_pending)
        for item in self._pending:
            self._queue.put_nowait(item)
        self._pending.clear()
        self._task = asyncio.create_task(self._drain(self._topic, self._publisher, self._queue))

    async def stop(self, flush_timeout_s: float = 5.0) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        queue = self._queue
        if queue is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(queue.join(), flush_timeout_s)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    @staticmethod
    async def _drain(
        topic: str, publisher: Publisher, queue: asyncio.Queue[tuple[bytes | None, bytes]]
    ) -> None:
        while True:
            key, value = await queue.get()
            try:
                await publisher.publish(topic, key, value, (("content-type", b"application/json"),))
            except asyncio.CancelledError:
                raise
            except KafkaError as exc:  # the log line was written; the topic copy is best effort
                log.warning("audit event not published", extra={"topic": topic, "error": type(exc).__name__})
            finally:
                queue.task_done()

    # -- configuration changes ---------------------------------------------------

    def loaded(self, registry: Registry) -> None:
        for partner in registry.by_id.values():
            ps = partner.settings
            self.emit(
                "partner_loaded",
                partner.id,
                enabled=ps.enabled,
                signing_required=ps.signing.required,
                signing_key_ids=",".join(sorted(partner.signing_keys)),
            )

    def changes(self, old: Registry, new: Registry) -> None:
        """Emit what a reload changed: partners, enablement, keys (by id, never by value)."""
        for pid in sorted(set(new.by_id) - set(old.by_id)):
            self.emit("partner_added", pid, enabled=new.by_id[pid].settings.enabled)
        for pid in sorted(set(old.by_id) - set(new.by_id)):
            self.emit("partner_removed", pid)
        for pid in sorted(set(old.by_id) & set(new.by_id)):
            self._partner_changes(old.by_id[pid], new.by_id[pid])

    def _partner_changes(self, old: Partner, new: Partner) -> None:
        pid = new.id
        if old.settings.enabled != new.settings.enabled:
            self.emit("partner_enabled" if new.settings.enabled else "partner_disabled", pid)
        if old.settings.signing.required != new.settings.signing.required:
            self.emit("signing_required_changed", pid, signing_required=new.settings.signing.required)
        _key_changes(self, pid, old.signing_keys, new.signing_keys)
        if old.api_key.get_secret_value() != new.api_key.get_secret_value():
            self.emit("anthropic_key_rotated", pid)


def _key_changes(audit: Audit, pid: str, old: Mapping[str, SecretStr], new: Mapping[str, SecretStr]) -> None:
    for kid in sorted(set(new) - set(old)):
        audit.emit("signing_key_added", pid, key_id=kid)
    for kid in sorted(set(old) - set(new)):
        audit.emit("signing_key_removed", pid, key_id=kid)
    for kid in sorted(set(old) & set(new)):
        if old[kid].get_secret_value() != new[kid].get_secret_value():
            audit.emit("signing_key_replaced", pid, key_id=kid)
