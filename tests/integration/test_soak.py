"""The gateway's RSS stays flat under pause/resume churn: the short version of `make soak`.

One gateway process, `max_queue: 20` and `kafka.max_poll_records: 20`, ~100 requests/s of mixed
shapes with a backlog in Kafka (`bench/soak.py`), 20 s of warm-up (from when outcomes flow)
then 30 s measured, an RSS sample a second. Before the fix of issue 9 the same run grew by
more than 100% (aiokafka's dropped fetch buffers were garbage cycles, and the collector was
tuned to never run a full collection: ~18 MB/s).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from bench.common import Simulator
from bench.soak import SoakConfig, soak

pytestmark = pytest.mark.integration

CONFIG = SoakConfig(duration_s=30, warmup_s=20, sample_s=1, max_growth=0.10)


@pytest.mark.timeout(240)
async def test_rss_stays_flat_under_pause_resume_churn(kafka_bootstrap: str, tmp_path: Path) -> None:
    sim_config = tmp_path / "simulator.yaml"
    sim_config.write_text(yaml.safe_dump(CONFIG.simulator()))
    with Simulator(["--config", str(sim_config)], name=f"soak-test/{tmp_path.name}") as sim:
        result = await soak(kafka_bootstrap, sim.url, CONFIG, tmp_path)
    summary = {k: v for k, v in result.items() if k != "rss_samples_mb"}
    assert result["paused_share"] >= 0.3, f"no pause/resume churn to speak of: {summary}"
    assert result["outcomes"] > 1_000, summary
    assert result["exit_code"] == 0, summary
    assert result["growth_ratio"] <= CONFIG.max_growth, f"RSS grew: {result}"
    assert result["peak_ratio"] <= 2 * CONFIG.max_growth, f"RSS peaked: {result}"
    assert result["pass"], summary
