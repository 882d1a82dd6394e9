"""`meml demo`: the stage list of each embedded default and the before/after table (no stage is run here)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_meml.defaults import DEFAULTS, resolve, trace_overrides
from megatron_meml.demo import _stages, before_after_table


def _argvs(default: str, tmp_path: Path) -> tuple[list[tuple[str, list[str]]], dict]:
    d, mef, riel = resolve(default, None)
    evals: dict = {}
    out = []
    for name, argv in _stages(d, mef, riel, ["seed=3"], tmp_path / "mef", tmp_path / "riel", evals):
        if callable(argv):
            (tmp_path / "mef" / "traces").mkdir(parents=True, exist_ok=True)
            (tmp_path / "mef" / "traces" / "traces.yaml").write_text(
                "experts:\n  teacher_traces:\n    expert1: /t/expert1.jsonl\n    expert2: /t/expert2.jsonl\n")
            argv = argv()
        out.append((name, argv))
    return out, evals


def test_toy_stages(tmp_path):
    stages, evals = _argvs("toy", tmp_path)
    assert [a[0] for _, a in stages] == ["sft", "train"]
    assert f"model.megatron_path={tmp_path / 'mef' / 'final_model'}" in stages[1][1]
    assert evals == {}


def test_real_model_stages(tmp_path):
    stages, evals = _argvs("smollm2", tmp_path)
    assert [a[0] for _, a in stages] == ["traces", "eval", "sft", "eval", "train"]
    sft = stages[2][1]
    assert "experts.teacher_traces.expert1=/t/expert1.jsonl" in sft and "eval.max_problems=0" in sft
    assert stages[3][1][-2:] == ["--checkpoint", str(tmp_path / "mef" / "final_model")]
    assert all("seed=3" in a for _, a in stages)
    # every evaluation has its own run dir, none of them the MEF or RIEL run's
    assert evals == {"base model": tmp_path / "riel-base", "after MEF": tmp_path / "riel-mef-eval"}
    assert {f"run_name={p.name}" for p in evals.values()} <= {x for _, a in stages for x in a}


def test_unknown_default_and_missing_fragment(tmp_path):
    with pytest.raises(ValueError, match="unknown; choose one of"):
        resolve("nope", None)
    with pytest.raises(FileNotFoundError, match="did `meml traces` finish"):
        trace_overrides(tmp_path)
    assert set(DEFAULTS) == {"toy", "smollm2", "smollm2-sparse"}


def test_before_after_table(tmp_path):
    runs = {}
    for label, acc in (("base", (0.2, 0.05)), ("after RIEL", (0.86, 0.84))):
        run = tmp_path / label.replace(" ", "_")
        run.mkdir()
        rows = [{"stage": "train", "step": 1},
                {"stage": "eval", "step": 0, "eval/num_problems": 100.0, "eval/wordmath/e0/accuracy": 0.0,
                 "eval/wordmath/e1/accuracy": 0.0},
                {"stage": "eval", "step": 5, "eval/num_problems": 100.0, "eval/wordmath/e0/accuracy": acc[0],
                 "eval/wordmath/e1/accuracy": acc[1], "eval/wordmath/e0/last_number_accuracy": acc[0] + 0.01}]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        runs[label] = run
    table = before_after_table(runs, ["e0", "e1"], "wordmath")
    assert "100 problems" in table
    assert "| base | 0.200 (0.210) | 0.050 |" in table
    assert "| after RIEL | 0.860 (0.870) | 0.840 |" in table


def test_sparse_real_default_keeps_rl_levels_out_of_mef():
    """The sparse default's point: RL trains and is judged on levels MEF never saw (so its rewards start sparse),
    on the same model, traces and RL settings as the plain real-model default."""
    from megatron_meml.config import load_config

    _, mef, riel = resolve("smollm2-sparse", None)
    _, _, plain = resolve("smollm2", None)
    m, r, p = load_config(mef, []), load_config(riel, []), load_config(plain, [])
    assert set(m.data.synthetic_levels).isdisjoint(r.data.synthetic_levels) and max(m.data.synthetic_levels) < min(
        r.data.synthetic_levels)
    assert DEFAULTS["smollm2-sparse"].traces and m.traces == load_config(resolve("smollm2", None)[1], []).traces
    assert (r.model, r.rollout, r.algo, r.train) == (p.model, p.rollout, p.algo, p.train)
