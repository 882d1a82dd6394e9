"""The styled real-model default's MEF on SmolLM2-135M-Instruct for two steps: every expert gets the same number of
rows in its own style, the base model and the MEF model are evaluated on the RIEL recipe's held-out problems (step 0
and the last step, one engine for both), with each expert's style rates and the answer agreement."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from megatron_meml.config import load_config
from megatron_meml.reporting.samples import eval_file, read_eval_problems
from megatron_meml.stages.inputs import load_data
from tests.real_model import ROOT, real_model_dir

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_styled_mef_two_steps_with_evaluations_before_and_after(tmp_path):
    model = real_model_dir()
    overrides = [f"output_dir={tmp_path}", "run_name=mef", f"model.hf_path={model}", "train.sft_steps=2",
                 "train.sft_batch_size=6", "train.threads=1", "eval.max_problems=4", "eval.max_new_tokens=40",
                 "eval.at_start=true", "logging.tensorboard=false", "data.synthetic_size=200"]
    proc = subprocess.run([sys.executable, "-m", "megatron_meml.cli", "sft", "smollm2-styles-mef", *overrides],
                          cwd=tmp_path, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    run = tmp_path / "mef"
    rows_line = next(x for x in proc.stdout.splitlines() if x.startswith("[sft] MEF rows:"))
    n_train = 200 - 12  # synthetic_size minus the held-out 6.25%
    assert rows_line == (f"[sft] MEF rows: expert0 {n_train} (plain style), expert1 {n_train} (r1 style), "
                         f"expert2 {n_train} (plan style)")
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    evals = {r["step"]: r for r in records if r["stage"] == "eval"}
    assert sorted(evals) == [0, 2] and [r["step"] for r in records if r["stage"] == "sft"] == [1, 2]
    for r in evals.values():
        assert r["eval/num_problems"] == 4.0 and 0.0 <= r["eval/wordmath/answer_agreement"] <= 1.0
        for eid in ("expert0", "expert1", "expert2"):
            rates = [r[f"eval/wordmath/{eid}/style_{s}"] for s in ("plain", "r1", "plan")]
            assert all(0.0 <= x <= 1.0 for x in rates) and sum(rates) <= 1.0 + 1e-9
    before, after = (read_eval_problems(eval_file(run, s)) for s in (0, 2))
    assert [p.problem_id for p in before] == [p.problem_id for p in after]  # the same held-out problems
    riel = load_data(load_config("smollm2-styles", ["data.synthetic_size=200"])).test[:4]
    assert [p.problem_id for p in before] == [p.id for p in riel]  # the RIEL recipe's levels 5-7, not MEF's 1-4
    assert (run / "final_model").is_dir() and not (run / "checkpoints").exists()
