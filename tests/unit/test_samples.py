"""Samples of what the model writes: the seeded picker, the rows a RIEL step and an evaluation write, their
markdown rendering, the eval read-outs that tell format from skill, and the per-problem eval file."""
from __future__ import annotations

import dataclasses
import json
from collections import Counter
from pathlib import Path

import pytest

from megatron_meml.config import MemlConfig
from megatron_meml.experts.config import ExpertsConfig
from megatron_meml.experts.expert_set import synthetic_expert_set
from megatron_meml.reporting.config import LoggingConfig
from megatron_meml.reporting.metrics import SAMPLES_FILE, MetricsLogger, PhaseTimers
from megatron_meml.reporting.samples import (EvalProblem, Sample, clip, eval_file, eval_problem_rows, format_rates,
                                             latest_eval_file, md_cell, pick_samples, read_eval_problems, read_samples,
                                             record_eval, riel_samples, samples_markdown, write_eval_problems)
from megatron_meml.rewards import RewardConfig, score
from megatron_meml.stages.context import RunContext, StopFlag
from megatron_meml.stages.evaluate import read_out, readout_metrics
from megatron_meml.stages.paths import RunPaths
from megatron_meml.types import Completion, ExpertGroup, Problem

SAMPLE_FIELDS = {"stage", "step", "expert", "problem_id", "prompt", "completion", "reward", "extracted", "gold",
                 "finish_reason", "in_format", "sample_index", "prompt_tail"}


def _completion(text: str, finish: str = "stop") -> Completion:
    return Completion(prompt_ids=[1], token_ids=[5] * max(len(text), 1), text=text, logprobs=[0.0] * max(len(text), 1),
                      finish_reason=finish)


def _ctx(tmp_path: Path, *, rank: int = 0, tensorboard: bool = False, **logging) -> RunContext:
    cfg = MemlConfig(logging=LoggingConfig(tensorboard=tensorboard, **logging))
    return RunContext(cfg=cfg, paths=RunPaths(tmp_path), arch=None, experts=synthetic_expert_set(cfg.experts, 3),
                      train_problems=[], eval_problems=[], state=None, trainer=None,
                      logger=MetricsLogger(tmp_path, cfg.logging, enabled=rank == 0), timers=PhaseTimers(),
                      stop=StopFlag(), dp_rank=0, dp_size=1, rank=rank)


# ------------------------------------------------------------------------------------------------ picker
def test_pick_is_deterministic_sized_and_spread_over_experts():
    experts = [e for _ in range(10) for e in range(3) for _ in range(8)]  # problem-major, G=8: 240 candidates
    picks = {seed: pick_samples(experts, 4, seed) for seed in range(20)}
    for seed, picked in picks.items():
        assert picked == pick_samples(experts, 4, seed)  # the same step picks the same samples
        assert len(picked) == len(set(picked)) == 4
        counts = Counter(experts[i] for i in picked)
        assert set(counts) == {0, 1, 2} and sorted(counts.values()) == [1, 1, 2]
    assert len({tuple(p) for p in picks.values()}) == 20  # another step, other samples
    assert len({Counter(experts[i] for i in p).most_common(1)[0][0] for p in picks.values()}) == 3  # rotating start
    assert pick_samples(experts, 0, 1) == [] and pick_samples([], 4, 1) == []
    assert sorted(pick_samples(experts[:5], 99, 1)) == [0, 1, 2, 3, 4]  # fewer candidates than asked: all of them


def test_pick_fills_from_other_experts_when_one_runs_out():
    experts = [0, 0, 0, 0, 1]
    for seed in range(10):
        picked = pick_samples(experts, 4, seed)
        assert 4 in picked and len(set(picked)) == 4
    three = [0, 1, 2] * 3
    assert Counter(three[i] for i in pick_samples(three, 6, 3)) == {0: 2, 1: 2, 2: 2}


# ------------------------------------------------------------------------------------------------ RIEL rows
def _groups() -> list[ExpertGroup]:
    """2 problems x 3 experts x G=2 in the synthetic experts' hash format: expert 0 always in format, expert 1
    never (another marker), expert 2 half the time."""
    texts = {0: ["5 + 2 = 7\n#### 7", "#### 8"], 1: ["The answer is 7.", "The answer is 7."], 2: ["#### 7", "no idea"]}
    out = []
    for q in range(2):
        p = Problem(id=f"p{q}", question=f"What is 5 + 2? ({q})", answer="7")
        for e in range(3):
            outs = [_completion(t, "length" if (e, q) == (2, 1) else "stop") for t in texts[e]]
            out.append(ExpertGroup(problem=p, expert=e, completions=outs,
                                   rewards=[score(p, c.text, "hash").reward for c in outs]))
    return out


def test_format_rates_against_hand_counts():
    rates = format_rates(_groups(), ["a", "b", "c"], "hash", 4096)
    assert rates == {"expert/a/format_rate": 1.0, "expert/b/format_rate": 0.0, "expert/c/format_rate": 0.5}


def test_riel_samples_write_one_row_per_pick_with_every_field(tmp_path):
    ctx = _ctx(tmp_path, samples_per_step=3)
    groups = _groups()
    metrics = riel_samples(ctx, 7, groups)
    ctx.logger.close()
    ids = ctx.experts.ids
    assert metrics == {f"expert/{ids[0]}/format_rate": 1.0, f"expert/{ids[1]}/format_rate": 0.0,
                       f"expert/{ids[2]}/format_rate": 0.5}
    lines = [json.loads(x) for x in (tmp_path / SAMPLES_FILE).read_text().splitlines()]
    assert len(lines) == 3 and all(set(r) == SAMPLE_FIELDS for r in lines)
    assert sorted(r["expert"] for r in lines) == sorted(ids)  # 3 picks over 3 experts: one each
    by_text = {(g.problem.id, ids[g.expert], i): (g, c) for g in groups for i, c in enumerate(g.completions)}
    for r in lines:
        g, c = by_text[(r["problem_id"], r["expert"], r["sample_index"])]
        verdict = score(g.problem, c.text, "hash")
        assert (r["stage"], r["step"], r["completion"], r["prompt"], r["gold"]) == (
            "train", 7, c.text, g.problem.question, "7")
        assert (r["reward"], r["extracted"], r["finish_reason"]) == (verdict.reward, verdict.extracted,
                                                                      c.finish_reason)
        assert r["in_format"] is (r["expert"] != ids[1] and c.text != "no idea")
        assert r["prompt_tail"] == ""
    assert [dataclasses.asdict(s) for s in read_samples(tmp_path)] == lines
    # the same step of another run picks the same samples
    other = _ctx(tmp_path / "again", samples_per_step=3)
    riel_samples(other, 7, groups)
    other.logger.close()
    assert (tmp_path / "again" / SAMPLES_FILE).read_text() == (tmp_path / SAMPLES_FILE).read_text()


def test_samples_off_non_writer_rank_and_prompt_tail(tmp_path):
    ctx = _ctx(tmp_path / "off", samples_per_step=0)
    assert riel_samples(ctx, 1, _groups())  # the format rates still come back
    ctx = _ctx(tmp_path / "rank1", rank=1, samples_per_step=4)
    assert len(riel_samples(ctx, 1, _groups())) == 3
    assert not (tmp_path / "off" / SAMPLES_FILE).exists() and not (tmp_path / "rank1").exists()
    ctx = _ctx(tmp_path / "tail", samples_per_step=2, sample_prompt_chars=20)
    riel_samples(ctx, 1, _groups())
    ctx.logger.close()
    rows = read_samples(tmp_path / "tail")
    assert len(rows) == 2
    for r in rows:
        e = ctx.experts.ids.index(r.expert)
        p = Problem(id=r.problem_id, question=r.prompt, answer="7")
        assert r.prompt_tail == ctx.experts.prompt_text(e, p)[-20:] and len(r.prompt_tail) == 20


def test_samples_go_to_tensorboard_text(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ctx = _ctx(tmp_path, samples_per_step=2, tensorboard=True)
    riel_samples(ctx, 3, _groups())
    ctx.logger.close()
    acc = EventAccumulator(str(tmp_path / "tb" / "train"))
    acc.Reload()
    [event] = acc.Tensors("samples/text_summary")
    assert event.step == 3
    text = event.tensor_proto.string_val[0].decode()
    assert text.startswith("| step | expert | problem | question | completion |") and text.count("\n") == 3


# ------------------------------------------------------------------------------------------------ markdown
def _sample(**kw) -> Sample:
    base = dict(stage="eval", step=2, expert="e0", problem_id="p1", prompt="What | is\n2+2?", completion="4",
                reward=1.0, extracted="4", gold="4", finish_reason="stop", in_format=True)
    return Sample(**(base | kw))


def test_clip_keeps_head_and_tail():
    assert clip("abcdefghij", 10) == "abcdefghij"
    assert clip("abcdefghij", 7) == "a … hij"  # 4 characters kept: 1 of the head, 3 of the tail
    assert len(clip("x" * 1000, 300)) == 300


def test_md_cell_escapes_pipes_html_and_newlines():
    assert md_cell("a | b\nc\r\nd <think> & e", 100) == "a \\| b<br>c<br>d &lt;think&gt; &amp; e"
    assert md_cell(None, 10) == "-"
    assert md_cell("\\boxed{7} *x* $5 a_b `c` [d] ~e", 100) == (
        "\\\\boxed{7} \\*x\\* \\$5 a\\_b \\`c\\` \\[d\\] \\~e")  # shown as written, not rendered
    assert md_cell("a\x0fb\tc\x7f", 100) == "a\\x0fb c\\x7f"
    assert md_cell("0123456789", 7) == "0 … 789"


def test_samples_table_rows_and_prompt_tail_column():
    table = samples_markdown([_sample(), _sample(expert="e1", reward=0.0, extracted=None, in_format=False,
                                              completion="x|y\n" + "z" * 500, finish_reason="length")])
    lines = table.split("\n")
    assert lines[0] == ("| step | expert | problem | question | completion | reward | extracted | gold | finish "
                        "| in format |")
    assert lines[2] == "| 2 | e0 | p1 | What \\| is<br>2+2? | 4 | 1 | 4 | 4 | stop | yes |"
    assert lines[3].startswith("| 2 | e1 | p1 | What \\| is<br>2+2? | x\\|y<br>zzz") and "…" in lines[3]
    assert lines[3].endswith(" | 0 | - | 4 | length | no |") and len(lines) == 4
    assert all(line.count(" | ") == 9 for line in lines[2:])  # every cell stays in its column
    with_tail = samples_markdown([_sample(prompt_tail="<|im_start|>assistant\n")])
    assert "| question | prompt tail | completion |" in with_tail
    assert "| &lt;\\|im\\_start\\|&gt;assistant<br> |" in with_tail


# ------------------------------------------------------------------------------------------------ eval read-outs
MATH = [Problem(id="m1", question="q1", answer="7"), Problem(id="m2", question="q2", answer="12")]
CHOICE = Problem(id="c1", question="q3", answer="b", kind="choice", options=(("a", "1"), ("b", "2")))


def _results(texts: dict[str, list[str]], problems=MATH, fmt="the_answer_is"):
    return [[read_out(p, _completion(t), fmt, RewardConfig()) for p, t in zip(problems, ts)] for ts in texts.values()]


def test_eval_read_outs_tell_format_from_skill():
    texts = {"a": ["The answer is 7.", "so it is 12"],  # one in format (right); one right but out of format
             "b": ["The answer is 8. Check: 7", "The answer is 12."]}  # the strict verifier and the last number differ
    results = _results(texts)
    assert [[r.score.reward for r in mine] for mine in results] == [[1.0, 0.0], [0.0, 1.0]]
    assert readout_metrics(list(texts), results, "gsm8k") == {
        "eval/gsm8k/a/format_rate": 0.5, "eval/gsm8k/a/last_number_accuracy": 1.0,
        "eval/gsm8k/b/format_rate": 1.0, "eval/gsm8k/b/last_number_accuracy": 1.0,
        "eval/gsm8k/answer_agreement": 0.0}  # 7 vs 8; no answer vs 12
    choice = _results({"a": ["The answer is b"]}, problems=[CHOICE])
    assert choice[0][0].last_number is None
    assert readout_metrics(["a"], choice, "mathqa") == {"eval/mathqa/a/format_rate": 1.0}  # no math: no last number



def test_eval_style_rates_and_answer_agreement():
    """Each expert's share of completions in each wordmath style, and the problems on which all experts agree."""
    from megatron_meml.stages.evaluate import STYLE_READERS

    texts = {"a": ["We need x.\nStep 1: 2 + 3 = 5 after. Check: 5 - 3 = 2.\nThe answer is 5.",
                   "So 1 + 1 = 2.\nThe answer is 2.", "The answer is 9."],
             "b": ["Plan: the x after.\nQ1: 2 + 3 = 5.\nConclusion: x: 5.\nThe answer is 5.",
                   "Plan: the x after.\nQ1: 1 + 1 = 2.\nThe answer is 3.", "It is 9"]}
    problems = [Problem(id=f"w{i}", question="q", answer=a) for i, a in enumerate(("5", "2", "9"))]
    m = readout_metrics(list(texts), _results(texts, problems), "wordmath", STYLE_READERS["wordmath"])
    assert {k: v for k, v in m.items() if "style_" in k} == pytest.approx({
        "eval/wordmath/a/style_plain": 1 / 3, "eval/wordmath/a/style_r1": 1 / 3, "eval/wordmath/a/style_plan": 0.0,
        "eval/wordmath/b/style_plain": 0.0, "eval/wordmath/b/style_r1": 0.0, "eval/wordmath/b/style_plan": 2 / 3})
    assert m["eval/wordmath/answer_agreement"] == pytest.approx(1 / 3)  # 5 = 5; 2 != 3; 9 vs no answer

def test_eval_problem_rows_roundtrip_and_latest_file(tmp_path):
    results = _results({"a": ["The answer is 7.", "so it is 12"], "b": ["The answer is 8.", "The answer is 12."]})
    rows = eval_problem_rows(5, "gsm8k", MATH, [0, 1], ["a", "b"], results)
    assert rows[1] == EvalProblem(step=5, bench="gsm8k", index=1, problem_id="m2", gold="12",
                                  rewards={"a": 0.0, "b": 1.0}, extracted={"a": None, "b": "12"},
                                  in_format={"a": False, "b": True}, last_number_rewards={"a": 1.0, "b": 1.0})
    write_eval_problems(eval_file(tmp_path, 5), rows)
    assert read_eval_problems(eval_file(tmp_path, 5)) == rows
    write_eval_problems(eval_file(tmp_path, 10), rows[:1])
    write_eval_problems(eval_file(tmp_path, 9), rows)
    assert latest_eval_file(tmp_path) == tmp_path / "eval" / "step_10.jsonl"  # by number, not by name
    assert latest_eval_file(tmp_path / "none") is None
    (tmp_path / "eval" / "step_10.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(ValueError, match=r"step_10.jsonl: line 1 is not a EvalProblem row"):
        read_eval_problems(tmp_path / "eval" / "step_10.jsonl")


def test_record_eval_writes_the_problem_file_and_eval_samples(tmp_path):
    ctx = _ctx(tmp_path, samples_per_step=3)
    ids = ctx.experts.ids
    texts = {e: ["#### 7", "#### 11"] for e in ids}
    results = _results(texts, fmt="hash")
    record_eval(ctx, 4, "synthetic", MATH, results)
    ctx.logger.close()
    rows = read_eval_problems(tmp_path / "eval" / "step_4.jsonl")
    assert [r.problem_id for r in rows] == ["m1", "m2"]
    assert [r.rewards for r in rows] == [dict.fromkeys(ids, 1.0), dict.fromkeys(ids, 0.0)]
    samples = read_samples(tmp_path)
    assert len(samples) == 3 and {s.stage for s in samples} == {"eval"} and {s.step for s in samples} == {4}
    assert sorted(s.expert for s in samples) == sorted(ids)
    for s in samples:
        assert s.in_format and s.extracted == ("7" if s.problem_id == "m1" else "11")
        assert s.reward == (1.0 if s.problem_id == "m1" else 0.0) and s.sample_index == 0


def test_logging_config_checks_sample_fields():
    with pytest.raises(ValueError, match="logging.samples_per_step must be >= 0"):
        LoggingConfig(samples_per_step=-1)
    with pytest.raises(ValueError, match="logging.sample_prompt_chars must be >= 0"):
        LoggingConfig(sample_prompt_chars=-2)
    assert ExpertsConfig().answer_format == "hash"  # the synthetic experts these tests use write "#### X"


def test_coverage_hand_worked():
    """K=2 experts, G=2: 'K experts x G' looks at the first 2 samples of each expert, 'one expert x K·G' at all 4
    of one expert."""
    from megatron_meml.stages.coverage import coverage_from_rewards

    e0 = [[0, 0, 0, 1], [0, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]]  # alone: q0, q2 -> 0.5; first two: q2
    e1 = [[0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0], [0, 0, 1, 1]]  # alone: q1, q3 -> 0.5; first two: q1
    c = coverage_from_rewards([e0, e1], ["e0", "e1"], 2, resamples=200)
    assert c.k_experts == 0.5 and c.one_expert == {"e0": 0.5, "e1": 0.5}  # {q1, q2} vs {q0, q2} / {q1, q3}
    assert c.ratio_best.value == 1.0 and c.ratio_first.value == 1.0 and c.best == "e0"
    assert c.ratio_best.low <= 1.0 <= c.ratio_best.high
    assert c.metrics()["eval/coverage/one_expert/e1"] == 0.5
    e1_strong = [[1, 0, 0, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 1]]  # first two solve q0, q1, q2
    c = coverage_from_rewards([e0, e1_strong], ["e0", "e1"], 2, resamples=200)
    assert c.k_experts == 0.75 and c.one_expert["e1"] == 1.0 and c.ratio_best.value == 0.75
    assert c.ratio_first.value == 1.5
    with pytest.raises(ValueError, match="K x G = 4"):
        coverage_from_rewards([[[0, 0, 0]]], ["e0", "e1"], 2)
