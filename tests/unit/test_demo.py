"""`meml demo`: the stages of each embedded default, the recipes behind them, and the summary it prints (built
here from hand-made run directories; no stage runs)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_meml.config import load_config
from megatron_meml.errors import ConfigError, RunError
from megatron_meml.experiments.defaults import DEFAULTS, resolve, trace_overrides
from megatron_meml.experiments.demo import plan_demo
from megatron_meml.reporting.samples import EvalProblem, eval_file, write_eval_problems
from megatron_meml.reporting.summary import EvalPoint, pipeline_summary


def _plan(default: str, tmp_path: Path):
    d, mef, riel = resolve(default, None)
    over = ["seed=3", f"output_dir={tmp_path}"]
    return d, plan_demo(d, mef, riel, load_config(mef, over), load_config(riel, over), over)


def _argvs(plan, tmp_path: Path) -> list[list[str]]:
    traces = tmp_path / "smollm2-wordmath-mef" / "traces"
    traces.mkdir(parents=True, exist_ok=True)
    (traces / "traces.yaml").write_text("experts:\n  teacher_traces:\n    expert1: /t/e1.jsonl\n    expert2: /t/e2.jsonl\n")
    return [s.argv() for s in plan.stages if s.argv is not None]


def test_main_default_is_the_styled_real_model(tmp_path):
    d, plan = _plan(next(iter(DEFAULTS)), tmp_path)
    assert d.name == "smollm2-styles" and d.traces == "rendered"
    argvs = _argvs(plan, tmp_path)
    assert [s.name.split()[0] for s in plan.stages] == ["model", "MEF", "RIEL"]
    assert [a[0] for a in argvs] == ["sft", "train"]
    assert "eval.at_start=true" in argvs[0] and all("seed=3" in a for a in argvs)
    assert f"model.megatron_path={tmp_path / 'smollm2-styles-mef' / 'final_model'}" in argvs[1]
    mef_cfg = load_config(resolve("smollm2-styles", None)[1], [])
    assert [(p.label, p.run_dir.name, p.step) for p in plan.evals] == [
        ("base", "smollm2-styles-mef", 0), ("after MEF", "smollm2-styles-mef", mef_cfg.train.sft_steps),
        ("after RIEL", "smollm2-styles", load_config(resolve("smollm2-styles", None)[2], []).train.steps)]


def test_styled_default_recipes():
    """MEF on levels 1-4 in three styles, judged on exactly the RIEL recipe's held-out problems (levels 5-7)."""
    from megatron_meml.stages.inputs import load_data

    _, mef, riel = resolve("smollm2-styles", None)
    m, r = load_config(mef, []), load_config(riel, [])
    assert m.experts.styles == r.experts.styles == {"expert0": "plain", "expert1": "r1", "expert2": "plan"}
    assert max(m.data.synthetic_levels) < min(r.data.synthetic_levels) == 5
    (m_train, m_test), (r_train, r_test) = [(s.train, s.test) for s in (load_data(m), load_data(r))]
    assert [p.id for p in m_test] == [p.id for p in r_test] and len(r_test) >= r.eval.max_problems >= 100
    assert {p.meta["level"] for p in m_train} == {1, 2, 3, 4} and {p.meta["level"] for p in r_train} == {5, 6, 7}


def test_teacher_trace_and_toy_stages(tmp_path):
    _, plan = _plan("smollm2", tmp_path)
    argvs = _argvs(plan, tmp_path)
    assert [a[0] for a in argvs] == ["traces", "eval", "sft", "eval", "train"]
    assert "experts.teacher_traces.expert1=/t/e1.jsonl" in argvs[2] and "eval.max_problems=0" in argvs[2]
    assert argvs[3][-2:] == ["--checkpoint", str(tmp_path / "smollm2-wordmath-mef" / "final_model")]
    assert [p.run_dir.name for p in plan.evals] == ["smollm2-wordmath-base", "smollm2-wordmath-mef-eval",
                                                    "smollm2-wordmath"]
    _, toy = _plan("toy", tmp_path)
    assert [a[0] for a in _argvs(toy, tmp_path)] == ["sft", "train"] and toy.evals == []


def test_unknown_default_and_missing_fragment(tmp_path):
    with pytest.raises(ConfigError, match="unknown; choose one of"):
        resolve("nope", None)
    with pytest.raises(RunError, match="did `meml traces` finish"):
        trace_overrides(tmp_path)
    assert set(DEFAULTS) == {"smollm2-styles", "toy", "smollm2", "smollm2-sparse"}


def _run(root: Path, step: int, rewards: list[dict[str, float]], metrics: list[dict]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rows = [EvalProblem(step=step, bench="wordmath", index=i, problem_id=f"p{i}", gold="1", rewards=r,
                        extracted={k: "1" for k in r}, in_format={k: True for k in r}) for i, r in enumerate(rewards)]
    write_eval_problems(eval_file(root, step), rows)
    with open(root / "metrics.jsonl", "a") as f:
        for m in metrics:
            f.write(json.dumps(m) + "\n")
    return root


def test_pipeline_summary_matches_the_runs(tmp_path):
    """Every figure of the printed summary comes from the runs: accuracies and intervals from the per-problem
    files, the gain paired on the same problems, MEML's parts from the RIEL metrics, the styles from the eval
    metrics."""
    n = 40
    base = [{"e0": 0.0, "e1": 0.0} for _ in range(n)]
    mef = [{"e0": float(i < 4), "e1": float(i < 2)} for i in range(n)]
    riel = [{"e0": float(i < 16), "e1": float(i < 6)} for i in range(n)]
    ev = {"stage": "eval", "eval/wordmath/e0/style_plain": 0.9, "eval/wordmath/e1/style_r1": 0.8,
          "eval/wordmath/answer_agreement": 0.25}
    m = _run(tmp_path / "mef", 0, base, [{**ev, "step": 0}])
    _run(m, 30, mef, [{**ev, "step": 30}])
    steps = [{"stage": "train", "step": s, "reward/mean": 0.1 * s, "train/adv_zero_group_frac": 0.5,
              "rollout/mutual_pairs": 3.0, "train/mutual_active_pairs": 1.0, "hard/replays": 8.0 * (s == 2),
              "hard/admissions_total": 5.0 * s, "hard/replays_total": 8.0, "hard/retired_solved_total": 2.0,
              "hard/retired_max_replays_total": 1.0, "hard/size": 4.0} for s in (1, 2)]
    r = _run(tmp_path / "riel", 2, riel, [*steps, {**ev, "step": 2, "eval/wordmath/answer_agreement": 0.5}])
    text = pipeline_summary([EvalPoint("base", m, 0), EvalPoint("after MEF", m, 30), EvalPoint("after RIEL", r, 2)],
                            ["e0", "e1"], riel_run=r, stage_seconds={"MEF": 100.0, "RIEL": 200.0},
                            styles={"e0": "plain", "e1": "r1"}, where=["Report: x"])
    assert "## Summary: 40 held-out problems" in text
    assert "| e0 | 0.000 [0.000, 0.088] | 0.100 [0.040, 0.231] | 0.400 [0.263, 0.554] | +0.300 [" in text
    assert "| any expert (oracle) | 0.000 [0.000, 0.088] | 0.100 [" in text
    assert "Best expert after RIEL: **e0**, 0.400 [0.263, 0.554]: +0.300 [" in text and "above its after MEF" in text
    assert "6 pairs formed" in text and "2 trained on" in text
    assert "10 admitted, 8 replays in 1 SFT batches, 3 retired (2 solved, 1 after their last replay); 4 in" in text
    assert "- after RIEL: own style e0 0.90, e1 0.80; all experts give the same answer on 0.50" in text
    assert "| total | 300 (5.0 min) |" in text and text.rstrip().endswith("Report: x")
    _run(tmp_path / "other", 2, riel[:-1], [{**ev, "step": 2}])
    with pytest.raises(RunError, match="other problems"):
        pipeline_summary([EvalPoint("after MEF", m, 30), EvalPoint("after RIEL", tmp_path / "other", 2)],
                         ["e0"], riel_run=r, stage_seconds={})
