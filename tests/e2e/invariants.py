"""Metric invariants every RIEL run must keep, shared by the end-to-end tests."""
from __future__ import annotations

import json
import math
from pathlib import Path


def train_rows(run_dir: Path, steps: int) -> list[dict]:
    """The run's per-step train rows from metrics.jsonl, checked to be steps 1..steps."""
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    train = [r for r in rows if r["stage"] == "train"]
    assert [r["step"] for r in train] == list(range(1, steps + 1))
    return train


def check_step(r: dict, *, samples: int, experts: tuple[str, ...], capacity: int) -> None:
    """One step's row: sample count, finite metrics, rewards in [0, 1], and the hard-example store's bookkeeping
    (it holds exactly what was admitted minus what retired, and the per-expert sizes add up)."""
    assert r["rollout/num_samples"] == samples
    for k, v in r.items():
        if isinstance(v, float):
            assert math.isfinite(v), (k, v)
    assert 0.0 <= r["reward/mean"] <= 1.0
    assert 0.1 < r["memory/peak_rss_gb"] < 64  # measured, and in GiB (not KiB or bytes)
    assert r["rollout/staleness"] == 0  # on-policy unless rollout.max_staleness is set
    for eid in experts:
        assert 0.0 <= r[f"expert/{eid}/reward_mean"] <= 1.0
    assert r["hard/size"] <= capacity
    retired = r["hard/retired_solved_total"] + r["hard/retired_max_replays_total"]
    assert r["hard/size"] == r["hard/admissions_total"] - retired
    assert sum(v for k, v in r.items() if k.startswith("hard/expert/") and k.endswith("/size")) == r["hard/size"]
