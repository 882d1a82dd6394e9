"""`meml compare` end to end at the smallest size: SFT start, RL rows (incl. an extra --variant), table, plot, and a
re-run that reuses every finished run instead of training again."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.test_resume_and_sigterm import SMALL

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]


def _compare(out: Path) -> subprocess.CompletedProcess:
    args = ["compare", "--seeds", "1", "--out", str(out), "--only", "MoE-SFT-GRPO,MEML-GRPO-paper,DAPO-1exp",
            "--variant", "MEML-prot: algo.mutual_teacher_nll=0.5",
            *[o for o in SMALL if not o.startswith("eval.")], "eval.max_problems=6", "train.sft_steps=3",
            "train.steps=2", "train.sft_batch_size=8"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "megatron_meml.cli", *args], cwd=ROOT, env=env, timeout=1200,
                          capture_output=True, text=True)


def test_compare_rows_table_and_reuse(tmp_path):
    out = tmp_path / "cmp"
    first = _compare(out)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    rows = json.loads((out / "compare_rows.json").read_text())
    assert [r["variant"] for r in rows] == ["MoE-SFT", "MoE-SFT-GRPO", "MEML-GRPO-paper", "DAPO-1exp", "MEML-prot"]
    for r in rows:
        assert 0.0 <= r["acc_expert0"] <= r["acc_best_expert"] <= 1.0, r
    table = (out / "compare.md").read_text()
    assert "MEML-prot" in table and (out / "compare.png").stat().st_size > 0
    train = [json.loads(x) for x in (out / "MEML-prot-s1" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert [r["step"] for r in train if r["stage"] == "train"] == [1, 2]
    tok = (out / "MEML-prot-s1" / "config.train.yaml").read_text()
    assert "mutual_normalise: token" in tok and "mutual_teacher_nll: 0.5" in tok  # recipe + variant
    assert "mutual_normalise: sequence" in (out / "MEML-GRPO-paper-s1" / "config.train.yaml").read_text()
    # the DAPO row stops at the plain rows' budget of 2 steps x 2 problems x 3 experts x 4 samples completions
    dapo = [json.loads(x) for x in (out / "DAPO-1exp-s1" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    dapo_train = [r for r in dapo if r["stage"] == "train"]
    totals = [r["rollout/completions_total"] for r in dapo_train]
    assert totals[-1] >= 48 and all(t < 48 for t in totals[:-1]), totals
    assert all(r["rollout/num_samples"] % 24 == 0 for r in dapo_train)  # batches of 6 questions x 1 expert x 4
    assert (out / "DAPO-1exp-s1" / "final_model").is_dir() and any(r["stage"] == "eval" for r in dapo)
    # finished runs keep their final model and metrics, not their resumable checkpoints (GBs on a real model)
    assert not list(out.glob("*/checkpoints")) and (out / "MoE-SFT-s1" / "final_model").is_dir()
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/metrics.jsonl")}
    second = _compare(out)
    assert second.returncode == 0, second.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/metrics.jsonl")} == stamps  # nothing ran again
    assert json.loads((out / "compare_rows.json").read_text()) == rows
