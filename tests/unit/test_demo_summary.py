"""`make demo`'s summary (scripts/demo.py, scripts/demo_report.py): a well-formed request
dead-lettered `outcome_unknown` is expected exactly when the simulator did its call and dropped
the connection; any other difference from the demo's expectation is reported, and only missing
or duplicated outcomes fail the demo."""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType

import pytest

from tests.support.kafka import ROOT, kafka_local


def _load(name: str, file: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / file)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def demo() -> ModuleType:
    """demo.py, with the sibling scripts it imports (kafka_local, demo_report)."""
    sys.modules.setdefault("kafka_local", kafka_local())
    if "demo_report" not in sys.modules:
        _load("demo_report", "demo_report.py")
    return _load("_gateway_demo", "demo.py")


def _run(demo: ModuleType, dropped: set[str], capsys: pytest.CaptureFixture[str]) -> tuple[bool, str]:
    traffic = [
        demo.Sent("acme", "acme-0001", b"{}", "response"),
        demo.Sent("acme", "acme-0002", b"{}", "response"),
        demo.Sent("acme", "bad-json-1", b"{", "malformed_json"),
    ]
    got = demo.Collected()
    got.by_key["acme-0001"].append(demo.Outcome("acme", "response", {"request_id": "acme-0001"}))
    got.by_key["acme-0002"].append(demo.Outcome("acme", "deadletter", {"reason": "outcome_unknown"}))
    got.by_key["bad-json-1"].append(demo.Outcome("acme", "deadletter", {"reason": "malformed_json"}))
    ok = demo.summarise(traffic, got, ["acme"], dropped)
    return ok, capsys.readouterr().out


def test_outcome_unknown_after_a_dropped_connection_is_expected(
    demo: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    ok, out = _run(demo, {"acme-0002"}, capsys)
    assert ok
    assert "1 dead-lettered outcome_unknown, as they must be" in out
    assert "differ from what the demo expected" not in out


def test_outcome_unknown_without_a_dropped_connection_is_reported(
    demo: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    ok, out = _run(demo, {"acme-0001"}, capsys)
    assert ok  # one outcome each: the demo's pass condition
    assert "1 outcomes differ from what the demo expected" in out
    assert "acme-0002: expected response, got outcome_unknown" in out
    assert "as they must be" not in out
