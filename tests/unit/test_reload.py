"""Reload on change or request: the watcher, `Gateway.reload`, and the audit trail it leaves."""

from __future__ import annotations

import asyncio
import io
import logging
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from claude_gateway_client.signing import sign

from service.admission.admit import Admitted, Record, Rejected
from service.admission.registry import RegistryError
from service.app import Gateway
from service.config.loader import load_config
from service.config.reload import ConfigWatcher
from service.config.settings import GatewaySettings
from service.contracts.reasons import Reason
from service.telemetry.logs import JsonFormatter
from tests.support.polling import until

TOPIC = "claude.requests.acme"


class Files:
    """A config file and its secret files, as a mounted ConfigMap and Secret would be."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.config = root / "gateway.yaml"
        self.cfg: dict[str, Any] = {
            "runtime": {"http_port": 0},
            "partners": [
                {
                    "id": "acme",
                    "api_key": {"file": str(self.secret("acme.key", "sk-ant-acme-OLD"))},
                    "signing": {
                        "required": True,
                        "keys": {"k1": {"file": str(self.secret("acme.k1", "sig-ONE"))}},
                    },
                },
                {"id": "globex", "api_key": {"file": str(self.secret("globex.key", "sk-ant-globex"))}},
            ],
        }
        self.write()

    def secret(self, name: str, value: str) -> Path:
        path = self.root / name
        path.write_text(value)
        return path

    def write(self) -> None:
        self.config.write_text(yaml.safe_dump(self.cfg))

    @property
    def acme(self) -> dict[str, Any]:
        partner: dict[str, Any] = self.cfg["partners"][0]
        return partner


@pytest.fixture
def files(tmp_path: Path) -> Files:
    return Files(tmp_path)


class Applied:
    def __init__(self, fail_with: Exception | None = None) -> None:
        self.calls: list[GatewaySettings] = []
        self.fail_with = fail_with

    def __call__(self, settings: GatewaySettings) -> None:
        if self.fail_with is not None:
            raise self.fail_with
        self.calls.append(settings)


@pytest.fixture
def log_lines() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.addHandler(handler)
    old = root.level
    root.setLevel(logging.INFO)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(old)


def _events(stream: io.StringIO) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in stream.getvalue().splitlines()]


def _bump(path: Path) -> None:
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


# -- the watcher ----------------------------------------------------------------------------------------


def test_nothing_changed_nothing_applied(files: Files) -> None:
    applied = Applied()
    watcher = ConfigWatcher(files.config, applied, load_config(files.config))
    assert not watcher.changed()
    assert applied.calls == []


def test_config_change_is_applied(files: Files) -> None:
    applied = Applied()
    watcher = ConfigWatcher(files.config, applied, load_config(files.config))
    files.acme["enabled"] = False
    files.write()
    _bump(files.config)
    assert watcher.changed()
    assert watcher.reload()
    assert applied.calls[-1].partners[0].enabled is False
    assert not watcher.changed()


def test_a_write_during_a_reload_is_seen_at_the_next_turn(files: Files) -> None:
    """The file changes after the reload read it (a SIGHUP's reload racing an edit): the
    watcher must not take the new file for the one it applied."""
    applied = Applied()

    def load_then_edit(path: Path) -> GatewaySettings:
        settings = load_config(path)
        files.acme["enabled"] = False
        files.write()
        _bump(files.config)
        return settings

    watcher = ConfigWatcher(files.config, applied, load_config(files.config), load=load_then_edit)
    assert watcher.reload()
    assert applied.calls[-1].partners[0].enabled is True  # what it read
    assert watcher.changed()  # the edit is still to be applied


def test_secret_file_change_is_seen(files: Files) -> None:
    watcher = ConfigWatcher(files.config, Applied(), load_config(files.config))
    files.secret("acme.key", "sk-ant-acme-NEW-LONGER")
    assert watcher.changed()


def test_kubernetes_symlink_swap_is_seen(tmp_path: Path) -> None:
    # kubelet: <mount>/acme.key -> ..data/acme.key, ..data -> ..2026_11_24_1; an update swaps ..data
    mount = tmp_path / "mount"
    (mount / "..v1").mkdir(parents=True)
    (mount / "..v1" / "acme.key").write_text("sk-ant-v1")
    (mount / "..data").symlink_to("..v1")
    (mount / "acme.key").symlink_to("..data/acme.key")
    config = tmp_path / "gateway.yaml"
    config.write_text(
        yaml.safe_dump({"partners": [{"id": "acme", "api_key": {"file": str(mount / "acme.key")}}]})
    )
    watcher = ConfigWatcher(config, Applied(), load_config(config))
    (mount / "..v2").mkdir()
    (mount / "..v2" / "acme.key").write_text("sk-ant-v2")  # same size, maybe the same mtime
    (mount / "..data_tmp").symlink_to("..v2")
    os.replace(mount / "..data_tmp", mount / "..data")
    assert watcher.changed()


def test_invalid_config_is_rejected_and_the_old_one_kept(files: Files, log_lines: io.StringIO) -> None:
    applied = Applied()
    watcher = ConfigWatcher(files.config, applied, load_config(files.config))
    files.acme["budget"] = {"usd_per_day": -3}
    files.write()
    assert not watcher.reload()
    assert applied.calls == []
    assert watcher.failures == 1
    (event,) = [e for e in _events(log_lines) if e["event"].startswith("reload rejected")]
    assert event["level"] == "error"
    assert "partners[acme].budget.usd_per_day" in event["error"]
    assert not watcher.changed(), "a rejected file is not retried until it changes again"
    files.acme["budget"] = {"usd_per_day": 3}
    files.write()
    _bump(files.config)
    assert watcher.changed()
    assert watcher.reload()
    assert applied.calls[-1].partners[0].budget.usd_per_day == 3


def test_refused_by_apply_names_the_secret(files: Files, log_lines: io.StringIO) -> None:
    error = RegistryError("cannot load partner secrets:\n  partners[acme].signing.keys.k2 (file:/x): missing")
    watcher = ConfigWatcher(files.config, Applied(fail_with=error), load_config(files.config))
    assert not watcher.reload()
    (event,) = [e for e in _events(log_lines) if e["event"].startswith("reload rejected")]
    assert "partners[acme].signing.keys.k2" in event["error"]


async def test_run_polls_and_request_forces_a_reload(files: Files) -> None:
    applied = Applied()
    watcher = ConfigWatcher(files.config, applied, load_config(files.config), interval_s=0.05)
    stop = asyncio.Event()
    task = asyncio.create_task(watcher.run(stop))
    try:
        await asyncio.sleep(0.2)
        assert applied.calls == []
        watcher.request()  # SIGHUP
        await until(lambda: len(applied.calls) >= 1, timeout_s=5)
        await asyncio.sleep(0.2)
        assert len(applied.calls) == 1
        files.secret("acme.k1", "sig-ONE-rotated")
        await until(lambda: len(applied.calls) >= 2, timeout_s=5)
        await asyncio.sleep(0.2)
        assert len(applied.calls) == 2
    finally:
        stop.set()
        await asyncio.wait_for(task, 2)


# -- Gateway.reload -------------------------------------------------------------------------------------


@pytest.fixture
async def gateway(files: Files) -> AsyncIterator[Gateway]:
    gw = Gateway(load_config(files.config), serve_http=False)
    try:
        yield gw
    finally:
        await gw.claude.aclose()


def _record(offset: int, key_id: str, secret: str, topic: str = TOPIC) -> Record:
    rid = f"r{offset}"
    value = orjson.dumps(
        {
            "request_id": rid,
            "params": {
                "model": "claude-haiku-4-5",
                "max_tokens": 8,
                "messages": [{"role": "user", "content": "x"}],
            },
        }
    )
    return Record(
        topic,
        0,
        offset,
        None,
        rid.encode(),
        value,
        tuple(sign(topic, rid.encode(), value, rid, key_id, secret)),
    )


def _reason(gw: Gateway, rec: Record) -> Reason | None:
    verdict = gw.admission.admit(rec)
    return verdict.reason if isinstance(verdict, Rejected) else None


async def test_rotation_disable_and_audit(gateway: Gateway, files: Files, log_lines: io.StringIO) -> None:
    watcher = ConfigWatcher(files.config, gateway.reload, gateway.settings)
    assert isinstance(gateway.admission.admit(_record(1, "k1", "sig-ONE")), Admitted)
    assert _reason(gateway, _record(2, "k2", "sig-TWO")) is Reason.UNKNOWN_SIGNING_KEY

    # 1. add k2: both work
    files.acme["signing"]["keys"]["k2"] = {"file": str(files.secret("acme.k2", "sig-TWO"))}
    files.write()
    assert watcher.reload()
    assert isinstance(gateway.admission.admit(_record(3, "k1", "sig-ONE")), Admitted)
    assert isinstance(gateway.admission.admit(_record(4, "k2", "sig-TWO")), Admitted)

    # 2. remove k1 and rotate the Anthropic key: k1 stops at once, the client uses the new key
    del files.acme["signing"]["keys"]["k1"]
    files.write()
    files.secret("acme.key", "sk-ant-acme-NEW")
    assert watcher.reload()
    assert _reason(gateway, _record(5, "k1", "sig-ONE")) is Reason.UNKNOWN_SIGNING_KEY
    assert isinstance(gateway.admission.admit(_record(6, "k2", "sig-TWO")), Admitted)
    assert gateway.claude._keys["acme"].get_secret_value() == "sk-ant-acme-NEW"

    # 3. disable globex: takes effect for the next message
    files.cfg["partners"][1]["enabled"] = False
    files.write()
    assert watcher.reload()
    value = orjson.dumps(
        {"request_id": "g1", "params": {"model": "claude-haiku-4-5", "max_tokens": 8,
                                         "messages": [{"role": "user", "content": "x"}]}}
    )  # fmt: skip
    assert (
        _reason(gateway, Record("claude.requests.globex", 0, 1, None, None, value, ()))
        is Reason.PARTNER_DISABLED
    )

    audit = [e for e in _events(log_lines) if e.get("audit") is True]
    seen = [(e["audit_event"], e.get("partner"), e.get("key_id")) for e in audit]
    assert ("signing_key_added", "acme", "k2") in seen
    assert ("signing_key_removed", "acme", "k1") in seen
    assert ("anthropic_key_rotated", "acme", None) in seen
    assert ("partner_disabled", "globex", None) in seen
    everything = log_lines.getvalue()
    for secret in ("sig-ONE", "sig-TWO", "sk-ant-acme-OLD", "sk-ant-acme-NEW", "sk-ant-globex"):
        assert secret not in everything


async def test_reload_with_an_unreadable_secret_changes_nothing(gateway: Gateway, files: Files) -> None:
    watcher = ConfigWatcher(files.config, gateway.reload, gateway.settings)
    files.acme["signing"]["keys"]["k2"] = {"file": str(files.root / "missing.k2")}
    files.acme["enabled"] = False
    files.write()
    before = gateway.registry
    assert not watcher.reload()
    assert gateway.registry is before
    assert isinstance(gateway.admission.admit(_record(1, "k1", "sig-ONE")), Admitted)
    files.secret("missing.k2", "sig-TWO")  # the missing file appears: the next look applies it
    assert watcher.changed()
    assert watcher.reload()
    assert _reason(gateway, _record(2, "k2", "sig-TWO")) is Reason.PARTNER_DISABLED
