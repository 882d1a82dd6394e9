"""Metric sinks: JSONL (append, torn line, resume truncation), TensorBoard events, W&B absence, progress lines,
phase timers and the reduction table."""
from __future__ import annotations

import dataclasses
import json
import sys
import time

import pytest
import torch

from megatron_meml.errors import RunError
from megatron_meml.reporting.config import LoggingConfig
from megatron_meml.reporting.metrics import (METRICS_FILE, SAMPLES_FILE, MetricsLogger, PhaseTimers, format_progress,
                                             read_jsonl, read_metrics, reduce_across_ranks, reduction_for)

NO_TB = LoggingConfig(tensorboard=False)


def _metric_rows(records):
    return [(r["stage"], r["step"], {k: v for k, v in r.items() if k not in ("stage", "step", "time")})
            for r in records]


def test_jsonl_appends_one_complete_line_per_call(tmp_path):
    before = time.time()
    with MetricsLogger(tmp_path, NO_TB) as log:
        log.log(1, {"train/sft_nll": torch.tensor(2.5)}, stage="sft")
        log.log(1, {"reward/mean": 0.25, "hard/size": 3}, stage="train")
        # each line is on disk (flushed) before the logger closes
        assert len((tmp_path / METRICS_FILE).read_text().splitlines()) == 2
    with MetricsLogger(tmp_path, NO_TB) as log:  # a second process appends
        log.log(2, {"reward/mean": 0.5}, stage="train")
    lines = (tmp_path / METRICS_FILE).read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 1, 2]
    records = read_metrics(tmp_path)
    assert _metric_rows(records) == [("sft", 1, {"train/sft_nll": 2.5}),
                                     ("train", 1, {"reward/mean": 0.25, "hard/size": 3.0}),
                                     ("train", 2, {"reward/mean": 0.5})]
    assert all(before <= r["time"] <= time.time() for r in records)


def test_torn_last_line_is_skipped_with_a_warning_and_repaired_on_reopen(tmp_path):
    with MetricsLogger(tmp_path, NO_TB) as log:
        log.log(1, {"reward/mean": 0.1}, stage="train")
        log.log(2, {"reward/mean": 0.2}, stage="train")
    path = tmp_path / METRICS_FILE
    with open(path, "a") as f:
        f.write('{"stage": "train", "step": 3, "rew')  # the process died mid-write
    with pytest.warns(UserWarning, match="line 3 is incomplete"):
        assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    with pytest.warns(UserWarning, match="incomplete"):
        log = MetricsLogger(tmp_path, NO_TB)
    log.log(3, {"reward/mean": 0.3}, stage="train")
    log.close()
    assert [(r["step"], r["reward/mean"]) for r in read_metrics(tmp_path)] == [(1, 0.1), (2, 0.2), (3, 0.3)]


def test_a_bad_line_in_the_middle_is_an_error_naming_the_line(tmp_path):
    (tmp_path / METRICS_FILE).write_text('{"stage": "train", "step": 1}\nnot json\n{"stage": "train", "step": 2}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl: line 2 is not a metrics record"):
        read_metrics(tmp_path)


def test_missing_metrics_file_names_the_path(tmp_path):
    with pytest.raises(RunError, match="metrics.jsonl does not exist"):
        read_metrics(tmp_path)


def test_resume_drops_train_lines_after_the_checkpoint_step(tmp_path):
    with MetricsLogger(tmp_path, NO_TB) as log:
        for s in (1, 2, 3):
            log.log(s, {"train/sft_nll": float(s)}, stage="sft")
        for s in (1, 2, 3, 4, 5):
            log.log(s, {"reward/mean": s / 10}, stage="train")
            if s % 2 == 0:
                log.log(s, {"eval/gsm8k/0/accuracy": s / 100}, stage="eval")
    with MetricsLogger(tmp_path, NO_TB, resume_step=3) as log:
        log.log(4, {"reward/mean": 0.44}, stage="train")
    got = [(r["stage"], r["step"]) for r in read_metrics(tmp_path)]
    assert got == [("sft", 1), ("sft", 2), ("sft", 3), ("train", 1), ("train", 2), ("eval", 2), ("train", 3),
                   ("eval", 4), ("train", 4)]
    assert read_metrics(tmp_path)[-1]["reward/mean"] == 0.44
    assert sorted(p.name for p in tmp_path.iterdir()) == [METRICS_FILE]  # the atomic rewrite left no temp file
    with MetricsLogger(tmp_path, NO_TB, resume_step=1, resume_stages=("sft", "eval")):
        pass
    got = [(r["stage"], r["step"]) for r in read_metrics(tmp_path)]
    assert got == [("sft", 1), ("train", 1), ("train", 2), ("train", 3), ("train", 4)]


@dataclasses.dataclass(frozen=True)
class _Row:
    stage: str
    step: int
    text: str


def test_samples_append_one_line_per_row_and_resume_drops_later_steps(tmp_path):
    with MetricsLogger(tmp_path, NO_TB) as log:
        log.log_samples([_Row("train", s, f"t{s}|\n") for s in (1, 2, 3)])
        log.log_samples([_Row("eval", 3, "e3")])
        log.log_samples([])
    path = tmp_path / SAMPLES_FILE
    assert [json.loads(x) for x in path.read_text().splitlines()] == [
        {"stage": "train", "step": s, "text": f"t{s}|\n"} for s in (1, 2, 3)] + [
        {"stage": "eval", "step": 3, "text": "e3"}]
    with MetricsLogger(tmp_path, NO_TB, resume_step=2, resume_stages=("train", "eval")) as log:
        assert path.read_text().count("\n") == 2  # cut on opening, as metrics.jsonl
        log.log_samples([_Row("train", 3, "again")])
    assert [(r["stage"], r["step"], r["text"]) for r in read_jsonl(path)] == [
        ("train", 1, "t1|\n"), ("train", 2, "t2|\n"), ("train", 3, "again")]
    with MetricsLogger(tmp_path, NO_TB, resume_step=1):  # the default resume stage, train only
        pass
    assert [r["step"] for r in read_jsonl(path)] == [1]
    with pytest.raises(ValueError, match="metrics stage must be one of"):
        with MetricsLogger(tmp_path, NO_TB) as log:
            log.log_samples([_Row("rollout", 1, "x")])
    with MetricsLogger(tmp_path / "off", NO_TB, enabled=False) as log:
        log.log_samples([_Row("train", 1, "x")])
        log.log_text(1, "samples", "x", stage="train")
    assert not (tmp_path / "off").exists()


def _scalars(logdir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return [(e.step, pytest.approx(e.value)) for e in acc.Scalars(tag)]


def test_tensorboard_one_run_per_stage_and_resume_hides_later_steps(tmp_path):
    cfg = LoggingConfig(jsonl=False)
    with MetricsLogger(tmp_path, cfg) as log:
        for s in (1, 2, 3, 4):
            log.log(s, {"reward/mean": float(s)}, stage="train")
        log.log(1, {"train/sft_nll": 7.0}, stage="sft")
    assert not (tmp_path / METRICS_FILE).exists()
    assert _scalars(tmp_path / "tb" / "train", "reward/mean") == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0)]
    assert _scalars(tmp_path / "tb" / "sft", "train/sft_nll") == [(1, 7.0)]
    time.sleep(1.1)  # event file names carry the second; the resumed writer opens a new file
    with MetricsLogger(tmp_path, cfg, resume_step=2) as log:
        log.log(3, {"reward/mean": 30.0}, stage="train")
    assert _scalars(tmp_path / "tb" / "train", "reward/mean") == [(1, 1.0), (2, 2.0), (3, 30.0)]


def test_disabled_logger_writes_nothing(tmp_path, capsys):
    run = tmp_path / "run"
    log = MetricsLogger(run, LoggingConfig(wandb=True), enabled=False)
    log.log(1, {"reward/mean": 1.0}, stage="train")
    log.progress(1, 10, {"reward/mean": 1.0}, stage="train")
    log.close()
    assert not run.exists()
    assert capsys.readouterr().out == ""


def test_wandb_absent_gives_one_warning_and_logging_goes_on(tmp_path, monkeypatch, recwarn):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    with MetricsLogger(tmp_path, LoggingConfig(wandb=True, tensorboard=False)) as log:
        log.log(1, {"reward/mean": 1.0}, stage="train")
        log.log(2, {"reward/mean": 1.0}, stage="train")
    assert [str(w.message) for w in recwarn if "wandb" in str(w.message)] == [
        "logging.wandb=true but the wandb package is not installed; metrics go to metrics.jsonl and TensorBoard "
        "only (pip install wandb to enable it)"]
    assert len(read_metrics(tmp_path)) == 2


def test_bad_stage_reserved_name_and_non_numbers_are_errors(tmp_path):
    with MetricsLogger(tmp_path, NO_TB) as log:
        with pytest.raises(ValueError, match="stage must be one of"):
            log.log(1, {"reward/mean": 1.0}, stage="rl")
        with pytest.raises(ValueError, match="'step' is reserved"):
            log.log(1, {"step": 1.0}, stage="train")
        with pytest.raises(TypeError, match="metric 'reward/mean' must be a number"):
            log.log(1, {"reward/mean": "high"}, stage="train")
        with pytest.raises(TypeError, match=r"must be a scalar, got a tensor of shape \(2,\)"):
            log.log(1, {"reward/mean": torch.ones(2)}, stage="train")


def test_progress_line_has_the_key_numbers():
    m = {"train/loss": 0.123456, "reward/mean": 0.25, "expert/10/reward_mean": 0.5, "expert/2/reward_mean": 0.0,
         "expert/0/reward_mean": 0.25, "hard/size": 64.0, "train/mismatch_abs": 0.0012, "timing/rollout": 9.0}
    line = format_progress(12, 300, m, stage="train", sec_per_step=3.0)
    assert line == ("[train] step 12/300 | loss 0.1235 | reward 0.25 | experts 0:0.25 2:0 10:0.5 | hard 64 | "
                    "mismatch 0.0012 | 3.00 s/step | ETA 14:24")  # 288 steps x 3 s
    sft = format_progress(5, 5, {"train/sft_nll": 1.5}, stage="sft", sec_per_step=4000.0)
    assert sft == "[sft] step 5/5 | loss 1.5 | 4000.00 s/step | ETA 0:00"
    assert format_progress(1, 9, {}, stage="train", sec_per_step=4000.0).endswith("ETA 8:53:20")
    ev = format_progress(3, 3, {"eval/a/0/accuracy": 0.5, "eval/b/0/accuracy": 0.25}, stage="eval",
                         sec_per_step=None)
    assert ev == "[eval] step 3/3 | eval acc mean 0.375"


def test_progress_prints_one_line_per_step_or_a_bar(tmp_path, capsys):
    with MetricsLogger(tmp_path, NO_TB) as log:
        for s in (1, 2, 3):
            log.progress(s, 3, {"reward/mean": s / 4}, stage="train")
    out = capsys.readouterr().out.splitlines()
    assert [line.split(" | ")[:2] for line in out] == [["[train] step 1/3", "reward 0.25"],
                                                       ["[train] step 2/3", "reward 0.5"],
                                                       ["[train] step 3/3", "reward 0.75"]]
    assert all("s/step" in line and "ETA" in line for line in out)
    with MetricsLogger(tmp_path, LoggingConfig(tensorboard=False, progress="bar")) as log:
        for s in (1, 2):
            log.progress(s, 4, {"reward/mean": 0.5}, stage="train")
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "2/4" in captured.err and "reward 0.5" in captured.err


def test_phase_timers_accumulate_and_pop_resets():
    timers = PhaseTimers()
    for _ in range(2):
        with timers("rollout"):
            time.sleep(0.02)
    with pytest.raises(RuntimeError):
        with timers("train"):
            raise RuntimeError("the phase failed")  # the time up to the failure still counts
    got = timers.pop()
    assert sorted(got) == ["timing/rollout", "timing/train"]
    assert got["timing/rollout"] >= 0.04
    assert timers.pop() == {}


def test_reduction_table_rules():
    assert reduction_for("rollout/response_len") == "mean"
    assert reduction_for("rollout/num_samples") == "sum"  # full name beats its namespace
    assert reduction_for("rollout/mutual_pairs") == "sum"  # a count, like train/mutual_active_pairs
    assert reduction_for("expert/3/reward_mean") == "mean"
    assert reduction_for("hard/expert/1/size") == "last"
    assert reduction_for("timing/rollout") == "max"
    assert reduction_for("weight_sync/bytes") == "sum"
    assert reduction_for("weight_sync/seconds") == "max"
    with pytest.raises(KeyError, match="metric 'loss' has no reduction rule"):
        reduction_for("loss")
    with pytest.raises(KeyError, match="'rolloutx/a'"):
        reduction_for("rolloutx/a")


def test_reduce_without_a_process_group_checks_rules_and_returns_floats():
    assert reduce_across_ranks({"reward/mean": torch.tensor(0.5), "hard/size": 3}) == {"hard/size": 3.0,
                                                                                       "reward/mean": 0.5}
    with pytest.raises(KeyError, match="'bogus'"):
        reduce_across_ranks({"bogus": 1.0})


def test_memory_metrics_track_the_peak_resident_set():
    import os

    import torch

    from megatron_meml.reporting.metrics import memory_metrics, reduction_for

    before = memory_metrics()["memory/peak_rss_gb"]
    with open("/proc/self/statm") as f:
        rss_now = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30
    extra = max(before - rss_now, 0.0) + 0.25  # enough to lift the peak by 0.25 GiB wherever it stood
    block = torch.ones(int(extra * 2**30) // 4, dtype=torch.float32)  # every page touched
    after = memory_metrics()["memory/peak_rss_gb"]
    del block
    assert after >= before + 0.2, (before, rss_now, after)
    assert memory_metrics()["memory/peak_rss_gb"] >= after  # a peak never falls
    assert reduction_for("memory/peak_rss_gb") == "max"
