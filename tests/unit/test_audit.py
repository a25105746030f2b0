"""Audit events: log lines marked `"audit": true`, and a copy on the audit topic when configured."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import orjson
import pytest

from service.telemetry.audit import Audit


class FakePublisher:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes | None, bytes]] = []

    async def publish(self, topic: str, key: bytes | None, value: bytes, headers: Any = ()) -> None:
        self.sent.append((topic, key, value))


async def test_events_go_to_the_log_and_the_audit_topic(caplog: pytest.LogCaptureFixture) -> None:
    publisher = FakePublisher()
    audit = Audit("claude.audit", publisher)  # type: ignore[arg-type]
    caplog.set_level(logging.INFO, logger="service.audit")
    audit.emit("signing_key_added", "acme", key_id="k2")  # before start: kept, sent once started
    await audit.start()
    audit.emit("partner_disabled", "globex")
    for _ in range(50):
        if len(publisher.sent) == 2:
            break
        await asyncio.sleep(0.01)
    await audit.stop()
    assert [(t, k) for t, k, _ in publisher.sent] == [("claude.audit", b"acme"), ("claude.audit", b"globex")]
    first = orjson.loads(publisher.sent[0][2])
    assert (first["event"], first["audit_event"], first["partner"], first["key_id"]) == (
        "signing_key_added", "signing_key_added", "acme", "k2",
    )  # fmt: skip
    records = [r for r in caplog.records if getattr(r, "audit", False)]
    assert [r.getMessage() for r in records] == ["signing_key_added", "partner_disabled"]


async def test_without_a_topic_only_the_log() -> None:
    audit = Audit()
    audit.emit("budget_exhausted", "acme", period="day")
    await audit.start()
    await audit.stop()
    assert audit.emitted[0][0] == "budget_exhausted"
