"""The real pretrained model end to end: SmolLM2-135M-Instruct (HF weights, real tokenizer and ChatML template,
vocab 49,152, in the dtype that `model.dtype: auto` picks on this machine) through 2 RIEL steps of the real-model
recipe with all three experts, mutual learning and the hard-example store, then a held-out evaluation; asserts
metric invariants."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from megatron_meml.model.dtype import auto_dtype
from tests.e2e.invariants import check_step, train_rows
from tests.real_model import ROOT, real_model_dir

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
RECIPE = ROOT / "recipes" / "smollm2-wordmath.yaml"


def test_real_model_two_riel_steps(tmp_path):
    model = real_model_dir()
    overrides = [f"output_dir={tmp_path}", "run_name=real", f"model.hf_path={model}", "train.steps=2",
                 "train.problems_per_step=2", "train.threads=1", "rollout.samples_per_expert=4",
                 "rollout.max_new_tokens=48", "eval.max_problems=6", "eval.max_new_tokens=48",
                 "checkpoint.save_every=0", "logging.tensorboard=false", "hard_examples.capacity=2",
                 "hard_examples.k_wrong=2", "data.synthetic_size=200"]
    proc = subprocess.run([sys.executable, "-m", "megatron_meml.cli", "train", str(RECIPE), *overrides], cwd=ROOT,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"weights from hf:{model}" in proc.stderr + proc.stdout
    run = tmp_path / "real"
    dtype, _ = auto_dtype()  # the recipe's auto, made concrete for this machine and recorded with the run
    assert f"model.dtype=auto -> {dtype}" in proc.stderr
    assert yaml.safe_load((run / "config.train.yaml").read_text())["model"]["dtype"] == dtype
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    for r in train_rows(run, 2):
        check_step(r, samples=2 * 3 * 4, experts=("expert0", "expert1", "expert2"), capacity=2)
        assert 1.0 <= r["rollout/mean_length"] <= 48.0
        # trainer vs engine in the same dtype on a real 30-layer model: bounded (bf16: ~0.02), not equal
        if "train/mismatch_abs" in r:
            assert r["train/mismatch_abs"] < 0.2, r["train/mismatch_abs"]
    evals = [r for r in rows if r["stage"] == "eval"]
    assert evals and evals[-1]["eval/num_problems"] == 6.0
    for eid in ("expert0", "expert1", "expert2", "best_expert"):
        assert 0.0 <= evals[-1][f"eval/wordmath/{eid}/accuracy"] <= 1.0
    assert (run / "final_model").is_dir()
    assert (run / "rollout_model" / "config.json").is_file()  # the engine's start weights (0.5 GB) are removed
    assert not list((run / "rollout_model").glob("*.safetensors"))
    assert (run / "report" / "summary.md").is_file()
