"""Config loading (YAML, CLI flags, runtime updates) and the CLI process itself."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

import aiohttp
import pytest

from service.simulator import SimulatorConfig, SimulatorConfigError, load_config
from service.simulator.__main__ import build_parser, overrides_from_args
from service.simulator.config import DEFAULT_MODELS, updated_config
from tests.simulator.simkit import body, headers

YAML = """
api_keys:
  alice: sk-alice
models: [claude-haiku-4-5, claude-opus-4-7]
limits: {rpm: 50, itpm: 30000}
model_limits:
  opus: {rpm: 5, itpm: 1000, otpm: 100}
latency: {distribution: lognormal, median_s: 0.2, sigma: 0.3}
output: {distribution: uniform, min_tokens: 10, max_tokens: 20}
faults: {overloaded_rate: 0.1}
seed: 11
round_remaining: false
"""


def test_defaults() -> None:
    config = SimulatorConfig()
    assert config.api_keys == {}
    assert {"claude-sonnet-4-5", "claude-haiku-4-5", "claude-opus-4-1", "claude-sonnet-4-20250514"} <= set(
        config.models
    )
    assert config.max_body_bytes == 32 * 1024 * 1024
    assert config.round_remaining is True
    assert config.latency.fixed_s == 0
    assert config.faults.total == 0


def test_yaml(tmp_path: Path) -> None:
    path = tmp_path / "sim.yaml"
    path.write_text(YAML)
    config = load_config(path)
    assert config.api_keys["alice"].get_secret_value() == "sk-alice"
    assert "sk-alice" not in repr(config)
    assert config.models == ("claude-haiku-4-5", "claude-opus-4-7")
    assert config.limits.rpm == 50
    assert config.limits.otpm == 400_000  # untouched default
    assert config.model_limits["opus"].otpm == 100
    assert config.latency.distribution == "lognormal"
    assert config.output.max_tokens == 20
    assert config.faults.overloaded_rate == 0.1
    assert config.seed == 11
    assert config.round_remaining is False


def test_cli_flags_override_the_file(tmp_path: Path) -> None:
    path = tmp_path / "sim.yaml"
    path.write_text(YAML)
    args = build_parser().parse_args(
        [
            "--config", str(path), "--port", "0", "--rpm", "0", "--otpm", "9000",
            "--api-key", "bob=sk-bob", "--latency-s", "0.5", "--output-tokens", "33",
            "--drop-rate", "0.05", "--seed", "5", "--round-remaining",
        ]
    )  # fmt: skip
    config = load_config(args.config, overrides_from_args(args))
    assert config.limits.rpm == 0
    assert config.limits.itpm == 30_000  # from the file
    assert config.limits.otpm == 9_000
    assert set(config.api_keys) == {"bob"}
    assert config.latency.distribution == "fixed"
    assert config.latency.fixed_s == 0.5
    assert config.output.distribution == "fixed"
    assert config.output.fixed_tokens == 33
    assert config.faults.drop_rate == 0.05
    assert config.faults.overloaded_rate == 0.1
    assert config.seed == 5
    assert config.round_remaining is True


def test_no_flags_means_no_overrides() -> None:
    assert overrides_from_args(build_parser().parse_args([])) == {}


def test_bad_api_key_flag() -> None:
    args = build_parser().parse_args(["--api-key", "no-equals-sign"])
    with pytest.raises(SimulatorConfigError, match="NAME=KEY"):
        overrides_from_args(args)


@pytest.mark.parametrize(
    ("data", "where"),
    [
        ({"faults": {"drop_rate": 1.5}}, "faults.drop_rate"),
        ({"faults": {"drop_rate": 0.6, "api_error_rate": 0.6}}, "add up"),
        ({"limits": {"rpm": -1}}, "limits.rpm"),
        ({"output": {"min_tokens": 9, "max_tokens": 3}}, "min_tokens"),
        ({"latency": {"distribution": "gamma"}}, "latency.distribution"),
        ({"api_keys": {"a": "k", "b": "k"}}, "same key"),
        ({"bogus": 1}, "bogus"),
    ],
)
def test_invalid_config_names_the_setting(tmp_path: Path, data: dict[str, object], where: str) -> None:
    with pytest.raises(SimulatorConfigError, match=where):
        load_config(None, data)


def test_unreadable_or_invalid_file(tmp_path: Path) -> None:
    with pytest.raises(SimulatorConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("limits: [1, 2\n")
    with pytest.raises(SimulatorConfigError, match="YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n")
    with pytest.raises(SimulatorConfigError, match="mapping"):
        load_config(listy)


def test_updated_config_deep_merges() -> None:
    config = SimulatorConfig(api_keys={"a": "sk-a"}, limits={"rpm": 10, "itpm": 20})
    new = updated_config(config, {"limits": {"rpm": 99}})
    assert new.limits.rpm == 99
    assert new.limits.itpm == 20
    assert new.api_keys["a"].get_secret_value() == "sk-a"
    assert new.models == DEFAULT_MODELS


async def _run_cli(stop_signal: signal.Signals) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "service.simulator", "--port", "0", "--seed", "1", "--api-key", "a=sk-a",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), timeout=60)).decode().strip()
        assert line.startswith("SIMULATOR_URL=http://127.0.0.1:"), line
        url = line.split("=", 1)[1]
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{url}/v1/messages", json=body(), headers=headers("sk-a")) as resp:
                assert resp.status == 200
            async with http.get(f"{url}/_sim/stats") as resp:
                assert (await resp.json())["calls_by_key"] == {"a": 1}
        proc.send_signal(stop_signal)
        _, stderr = await asyncio.wait_for(proc.communicate(), timeout=60)
        assert proc.returncode == 0, stderr.decode()
        assert b"Traceback" not in stderr
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
async def test_cli_prints_url_and_stops_on_signal(stop_signal: signal.Signals) -> None:
    await _run_cli(stop_signal)


async def test_cli_rejects_a_bad_config(tmp_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "service.simulator", "--drop-rate", "3",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, stderr = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode == 2
    assert b"faults.drop_rate" in stderr


def test_the_shipped_example_is_valid() -> None:
    path = Path(__file__).parents[2] / "service" / "simulator" / "example.yaml"
    config = load_config(path)
    assert config.api_keys["demo"].get_secret_value() == "sk-sim-demo"
    assert config.latency.distribution == "lognormal"
    assert config.faults.total > 0
