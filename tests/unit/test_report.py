"""Run report: plots for the series present, summary.md values, the compare table, and `meml report`."""
from __future__ import annotations

import json
import math

import matplotlib.image
import pytest

from megatron_meml.cli import main
from megatron_meml.errors import RunError
from megatron_meml.reporting.config import LoggingConfig
from megatron_meml.reporting.metrics import MetricsLogger
from megatron_meml.reporting.compare_tables import compare_stats, paired_differences, write_compare_table
from megatron_meml.reporting.report import centred_mean, final_eval, smoothing_window, write_report
from megatron_meml.reporting.samples import EvalProblem, Sample, eval_file, write_eval_problems
from megatron_meml.reporting.tables import latest_samples, oracle_accuracy, pair_counts, solved_matrix

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _full_run(run_dir):
    """3 experts; SFT 4 steps, RIEL 6 steps, eval at steps 3 and 6 on two benchmarks."""
    with MetricsLogger(run_dir, LoggingConfig(tensorboard=False)) as log:
        for s in range(1, 5):
            log.log(s, {"train/sft_nll": 4.0 / s, "timing/train": 0.5}, stage="sft")
        for s in range(1, 7):
            m = {f"expert/{e}/reward_mean": min(1.0, 0.1 * e + 0.05 * s) for e in range(3)}
            m |= {"reward/mean": 0.1 + 0.05 * s, "train/loss": 1.0 / s, "train/pg_loss": 0.8 / s,
                  "train/mutual_kl": 0.2, "train/sft_nll": 0.3 + 0.1 * (s == 4), "train/mismatch_abs": 1e-3 * s,
                  "train/mismatch_k3": 1e-6, "hard/size": float(2 * s % 7), "hard/admissions": float(s % 3),
                  "timing/rollout": 2.0, "timing/train": 1.0 + s, "timing/step": 3.5 + s}
            log.log(s, m, stage="train")
            if s % 3 == 0:
                log.log(s, {f"eval/{b}/{e}/accuracy": round(0.1 * e + 0.01 * s + (b == "mathqa") * 0.2, 4)
                            for b in ("gsm8k", "mathqa") for e in range(3)} | {"eval/gsm8k/0/pass@4": 0.9},
                        stage="eval")


def _is_png(path):
    assert path.read_bytes()[:8] == PNG_MAGIC
    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 300
    return True


def test_full_run_writes_every_plot_and_the_summary(tmp_path):
    _full_run(tmp_path)
    paths = write_report(tmp_path)
    assert [p.name for p in paths] == ["rewards.png", "losses.png", "sft_losses.png", "mismatch.png",
                                       "hard_store.png", "timings.png", "sft_timings.png", "eval_accuracy.png",
                                       "eval_final.png", "summary.md"]
    assert all(p.parent == tmp_path / "report" for p in paths)
    assert all(_is_png(p) for p in paths[:-1])
    text = paths[-1].read_text()
    # final and best values (losses: min, rewards and store size: max)
    assert "| train | reward/mean | 0.4 | 0.4 (max) | 6 |" in text
    assert "| train | expert/2/reward_mean | 0.5 | 0.5 (max) | 6 |" in text
    assert "| train | train/loss | 0.1667 | 0.1667 (min) | 6 |" in text
    assert "| train | train/sft_nll | 0.3 | 0.3 (min) | 1 |" in text
    assert "| train | hard/size | 5 | 6 (max) | 3 |" in text  # 2, 4, 6, 1, 3, 5
    assert "| sft | train/sft_nll | 1 | 1 (min) | 4 |" in text
    # mean phase timings: rollout 2, train mean(2..7) = 4.5, total mean(4.5..9.5) = 7, 0.5 s outside any phase
    assert "| train | 4.5 | 64.3% |" in text and "| rollout | 2 | 28.6% |" in text
    assert "| (not in a phase timer) | 0.5 | 7.1% |" in text and "| **total** | 7 | |" in text
    # the final eval table is the step-6 evaluation, expert x benchmark
    assert "## Final evaluation (step 6)" in text
    assert "| expert | gsm8k | mathqa |" in text
    assert "| 1 | 0.160 | 0.360 |" in text
    assert "### pass@4" in text and "| 0 | 0.900 |" in text


def test_final_eval_takes_each_key_latest_value(tmp_path):
    _full_run(tmp_path)
    from megatron_meml.reporting.metrics import read_metrics

    final = final_eval(read_metrics(tmp_path))
    assert final["accuracy"]["2"] == {"gsm8k": pytest.approx(0.26), "mathqa": pytest.approx(0.46)}
    assert final["pass@4"] == {"0": {"gsm8k": 0.9}}


def test_only_present_series_are_plotted(tmp_path):
    with MetricsLogger(tmp_path, LoggingConfig(tensorboard=False)) as log:
        for s in (1, 2, 3):
            log.log(s, {"train/sft_nll": 3.0 - s}, stage="sft")
    paths = write_report(tmp_path)
    assert [p.name for p in paths] == ["sft_losses.png", "summary.md"]
    text = paths[-1].read_text()
    assert "| sft | train/sft_nll | 0 | 0 (min) | 3 |" in text
    assert "Final evaluation" not in text and "Mean time" not in text


def test_report_errors_name_what_is_missing(tmp_path):
    with pytest.raises(RunError, match="does not exist"):
        write_report(tmp_path / "nope")
    with pytest.raises(RunError, match="metrics.jsonl does not exist"):
        write_report(tmp_path)
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(ValueError, match="holds no metrics yet"):
        write_report(tmp_path)


def test_meml_report_command(tmp_path, capsys):
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert f"run directory {tmp_path / 'missing'} does not exist" in capsys.readouterr().err
    assert main(["report", str(tmp_path)]) == 2
    assert "metrics.jsonl does not exist" in capsys.readouterr().err
    _full_run(tmp_path)
    assert main(["report", str(tmp_path)]) == 0
    assert f"wrote 10 files to {tmp_path / 'report'}" in capsys.readouterr().out
    assert (tmp_path / "report" / "rewards.png").is_file()


# ------------------------------------------------------------------------------------------------ smoothing
def test_centred_mean_against_hand_worked_numbers():
    assert centred_mean([0, 3, 6, 3, 0], 3) == [1.5, 3, 4, 3, 1.5]  # ends: the mean of the points that exist
    assert centred_mean([0, 3, 6, 3, 0], 5) == [3, 3, 2.4, 3, 3]
    assert centred_mean([2.0, 4.0], 1) == [2.0, 4.0]
    with pytest.raises(ValueError, match="window must be odd"):
        centred_mean([1.0], 4)
    assert [smoothing_window(n) for n in (4, 5, 39, 40, 100, 10_000)] == [1, 3, 3, 5, 11, 51]


def test_curves_keep_the_raw_points_and_name_the_window():
    import matplotlib.pyplot as plt

    from megatron_meml.reporting.report import _draw

    fig, ax = plt.subplots()
    values = [0.0, 3.0, 6.0, 3.0, 0.0]
    _draw(ax, [1, 2, 3, 4, 5], values, "expert 0")
    raw, smooth = ax.get_lines()
    assert list(raw.get_ydata()) == values and raw.get_alpha() == 0.3 and raw.get_marker() == "."
    assert list(smooth.get_ydata()) == [1.5, 3, 4, 3, 1.5] and smooth.get_color() == raw.get_color()
    assert ax.get_legend_handles_labels()[1] == ["expert 0 (centred mean, window 3)"]
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ complementarity
SOLVED = [[True, False, False],  # p1: only expert 0
          [True, True, False],   # p2: 0 and 1
          [False, True, False],  # p3: only 1
          [False, False, False],  # p4: nobody
          [True, False, True]]   # p5: 0 and 2


def test_pair_counts_and_oracle_on_a_hand_worked_matrix():
    pairs = pair_counts(SOLVED, ["a", "b", "c"])
    assert [(p.i, p.j, p.only_i, p.only_j, p.both, p.neither) for p in pairs] == [
        ("a", "b", 2, 1, 1, 1),  # a alone: p1 p5; b alone: p3; both: p2; neither: p4
        ("a", "c", 2, 0, 1, 2),  # a alone: p1 p2; both: p5; neither: p3 p4
        ("b", "c", 2, 1, 0, 2)]  # b alone: p2 p3; c alone: p5; neither: p1 p4
    assert all(p.only_i + p.only_j + p.both + p.neither == 5 for p in pairs)
    assert oracle_accuracy(SOLVED) == 0.8 and oracle_accuracy([]) == 0.0
    assert pair_counts([[True]], ["a"]) == []


def _eval_rows(step: int) -> list[EvalProblem]:
    ids = ["a", "b", "c"]
    return [EvalProblem(step=step, bench="gsm8k", index=i, problem_id=f"p{i + 1}", gold="1",
                        rewards={e: float(ok) for e, ok in zip(ids, row)}, extracted=dict.fromkeys(ids, "1"),
                        in_format=dict.fromkeys(ids, True)) for i, row in enumerate(SOLVED)]


def test_solved_matrix_reads_rewards_in_expert_order():
    assert solved_matrix(_eval_rows(1)) == (["a", "b", "c"], SOLVED)
    assert solved_matrix([]) == ([], [])


def _sample(stage: str, step: int, k: int, **kw) -> Sample:
    return Sample(**(dict(stage=stage, step=step, expert=f"e{k % 3}", problem_id=f"p{k}", prompt="Q | 1\nQ 2",
                          completion=f"c{step}.{k}", reward=float(k % 2), extracted=None if k == 0 else "1",
                          gold="1", finish_reason="stop", in_format=k % 2 == 1) | kw))


def test_latest_samples_per_stage():
    rows = [_sample("train", s, k) for s in (1, 2, 3) for k in range(4)] + [_sample("eval", 3, 0)]
    assert [(r.step, r.problem_id) for r in latest_samples(rows, "train", 6)] == [
        (2, "p2"), (2, "p3"), (3, "p0"), (3, "p1"), (3, "p2"), (3, "p3")]
    assert len(latest_samples(rows, "eval", 6)) == 1 and latest_samples(rows, "train", 0) == []


def test_summary_has_samples_and_complementarity_sections(tmp_path):
    _full_run(tmp_path)
    with MetricsLogger(tmp_path, LoggingConfig(tensorboard=False)) as log:
        log.log_samples([_sample("train", s, k) for s in range(1, 7) for k in range(4)])
        log.log_samples([_sample("eval", 6, 1, completion="x | y\n" + "z" * 400)])
        log.log(6, {"eval/gsm8k/0/format_rate": 0.5, "eval/gsm8k/0/last_number_accuracy": 0.75}, stage="eval")
    write_eval_problems(eval_file(tmp_path, 3), _eval_rows(3)[:2])
    write_eval_problems(eval_file(tmp_path, 6), _eval_rows(6))
    paths = write_report(tmp_path, samples=5)
    names = [p.name for p in paths]
    assert "complementarity.png" in names and "eval_format.png" in names and _is_png(tmp_path / "report" /
                                                                                    "complementarity.png")
    text = paths[-1].read_text()
    assert "## Expert complementarity (eval step 6, gsm8k, 5 problems)" in text  # the latest eval, not step 3
    assert "Oracle (\"any expert\") accuracy: **0.800** (4/5); best single expert: a 0.600" in text
    assert "| a | b | 2 | 1 | 1 | 1 |" in text and "| b | c | 2 | 1 | 0 | 2 |" in text
    assert "### format_rate" in text and "Fraction of greedy completions with an answer in the required" in text
    samples = text[text.index("## Samples"):text.index("## Plots")]
    train = samples[samples.index("### train"):samples.index("### eval")]
    table = [line for line in train.splitlines() if line.startswith("| ")][2:]  # after the header lines
    assert [line.split(" | ")[4] for line in table] == ["c5.3", "c6.0", "c6.1", "c6.2", "c6.3"]  # the latest 5
    assert all(" | Q \\| 1<br>Q 2 | " in line for line in table)
    assert table[1].endswith(" | 0 | - | 1 | stop | no |")
    [eval_row] = [line for line in samples[samples.index("### eval"):].splitlines() if line.startswith("| 6 ")]
    assert "x \\| y<br>zzz" in eval_row and "…" in eval_row and eval_row.count(" | ") == 9


def test_report_without_samples_or_eval_files_has_neither_section(tmp_path):
    _full_run(tmp_path)
    text = write_report(tmp_path)[-1].read_text()
    assert "## Samples" not in text and "complementarity" not in text


ROWS = [
    {"variant": "MoE-SFT-GRPO", "seed": 1, "acc_expert0": 0.05, "acc_best": 0.5},
    {"variant": "MEML-GRPO", "seed": 1, "acc_expert0": 0.1, "acc_best": 0.6},
    {"variant": "MoE-SFT-GRPO", "seed": 2, "acc_expert0": 0.05, "acc_best": 0.5},
    {"variant": "MEML-GRPO", "seed": 2, "acc_expert0": 0.2, "acc_best": 0.6},
    {"variant": "MoE-SFT-GRPO", "seed": 3, "acc_expert0": 0.11, "acc_best": 0.5},
    {"variant": "MEML-GRPO", "seed": 3, "acc_expert0": 0.3, "acc_best": 0.9},
    {"variant": "Expert0-SFT", "seed": 1, "acc_expert0": 0.4},
]


def test_compare_stats_against_hand_worked_numbers():
    stats = compare_stats(ROWS)
    assert list(stats) == ["MoE-SFT-GRPO", "MEML-GRPO", "Expert0-SFT"]
    # 0.05, 0.05, 0.11: mean 0.07; deviations -.02, -.02, .04: sum of squares .0024 / (3-1) -> std sqrt(.0012)
    mean, std, n = stats["MoE-SFT-GRPO"]["acc_expert0"]
    assert (mean, std, n) == (pytest.approx(0.07), pytest.approx(math.sqrt(0.0012)), 3)
    assert stats["MEML-GRPO"]["acc_expert0"][:2] == (pytest.approx(0.2), pytest.approx(0.1))
    assert stats["MEML-GRPO"]["acc_best"][:2] == (pytest.approx(0.7), pytest.approx(math.sqrt(0.03)))
    assert stats["Expert0-SFT"] == {"acc_expert0": (0.4, 0.0, 1)}
    with pytest.raises(ValueError, match="row 0 needs 'variant' and 'seed'"):
        compare_stats([{"variant": "x", "acc": 1.0}])


def test_compare_table_and_plot(tmp_path):
    md, png = write_compare_table(ROWS, tmp_path / "cmp")
    assert (md.name, png.name) == ("compare.md", "compare.png") and _is_png(png)
    lines = md.read_text().splitlines()
    assert lines[0] == "Mean ± sample standard deviation over seeds (1, 2, 3)."
    assert lines[2] == "| variant | seeds | acc_expert0 | acc_best |"
    assert lines[4] == "| MoE-SFT-GRPO | 3 | 0.070 ± 0.035 | 0.500 ± 0.000 |"
    assert lines[5] == "| MEML-GRPO | 3 | 0.200 ± 0.100 | 0.700 ± 0.173 |"
    assert lines[6] == "| Expert0-SFT | 1 | 0.400 (one seed) | - |"
    # paired: MEML - GRPO per seed = .05, .15, .19 (mean .13, std sqrt(.0052)); best .1, .1, .4 (mean .2, std
    # sqrt(.03)); Expert0-SFT has seed 1 only: .4 - .05
    assert lines[8] == "Paired difference to MoE-SFT-GRPO on the same seed (mean ± std over seeds):"
    assert lines[12] == "| MEML-GRPO | +0.130 ± 0.072 | +0.200 ± 0.173 |"
    assert lines[13] == "| Expert0-SFT | +0.350 (one seed) | - |"
    assert paired_differences(ROWS, "MoE-SFT-GRPO", "acc_expert0")["MEML-GRPO"] == (
        pytest.approx(0.13), pytest.approx(math.sqrt(0.0052)), 3)
    json.dumps(compare_stats(ROWS))  # plain data, ready for a results file
