"""Human-readable run reports: PNG plots and summary.md from a run's metrics.jsonl (`meml compare`'s tables are in
compare_tables.py).

``write_report(run_dir)`` writes into ``<run_dir>/report/`` (only for the series the run logged):

====================  =============================================================================
rewards.png           reward/mean and expert/<id>/reward_mean over RIEL steps (and expert/<id>/format_rate)
losses.png            train/loss, train/pg_loss, train/mutual_kl, train/sft_nll over RIEL steps
sft_losses.png        the same for the SFT (MEF) stage
mismatch.png          train/mismatch_abs, train/mismatch_k3 (trainer vs. rollout log-probs)
hard_store.png        hard/size (and per-expert sizes), hard/admissions per step
timings.png           timing/* stacked per RIEL step (sft_timings.png for the SFT stage)
eval_accuracy.png     eval/<bench>/<expert>/<accuracy | pass@k> over eval steps, one panel per benchmark
eval_format.png       accuracy vs. last_number_accuracy (skill) vs. format_rate (format) per expert and benchmark
eval_final.png        the last evaluation's accuracy, expert x benchmark bars
complementarity.png   latest eval: problems expert i solves and expert j fails (from eval/step_<N>.jsonl)
summary.md            final and best values, mean phase timings, the final eval table, the latest samples
                      (samples.jsonl), expert complementarity on the latest evaluation
====================  =============================================================================

Curves with 5 or more points are drawn as a centred rolling mean (window in the legend) over the raw points
(faint line and markers).
"""
from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from megatron_meml.reporting.metrics import natural_key, read_metrics  # noqa: E402
from megatron_meml.reporting.tables import REPORT_SAMPLES, complementarity_section, samples_section  # noqa: E402
from megatron_meml.errors import RunError

REPORT_DIR = "report"
LOSS_KEYS = ("train/loss", "train/pg_loss", "train/mutual_kl", "train/sft_nll")
MISMATCH_KEYS = ("train/mismatch_abs", "train/mismatch_k3")
TIMING_TOTALS = ("timing/step", "timing/total")
"""Timers that enclose the others: drawn as a line over the stack, not stacked."""
SUMMARY_KEYS = {"sft": ("train/sft_nll", "train/loss"),
                "train": ("reward/mean", "expert/*/reward_mean", "expert/*/format_rate", *LOSS_KEYS, *MISMATCH_KEYS,
                          "hard/size", "hard/admissions_total", "train/grad_norm", "train/grad_norm_pg",
                          "train/grad_norm_mutual", "train/grad_norm_sft")}
"""Metrics of summary.md's key-metrics table per stage (``*`` matches one name segment)."""
FORMAT_METRICS = ("accuracy", "last_number_accuracy", "format_rate")
"""Eval read-outs of eval_format.png: format-bound accuracy, the last number's accuracy (skill), the format rate."""
METRIC_NOTES = {
    "last_number_accuracy": "The last number of the greedy completion against the gold answer, whatever its format "
                            "(math problems): arithmetic skill apart from format compliance.",
    "format_rate": "Fraction of greedy completions with an answer in the required format.",
}

Series = tuple[list[int], list[float]]


# ------------------------------------------------------------------------------------------------ series access
def _series(records: Sequence[dict], stage: str, key: str) -> Series:
    """(steps, values) of one metric in one stage; a step logged twice keeps its last value."""
    by_step: dict[int, float] = {}
    for r in records:
        if r["stage"] == stage and key in r:
            by_step[int(r["step"])] = float(r[key])
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def _keys(records: Sequence[dict], stage: str) -> list[str]:
    seen: dict[str, None] = {}
    for r in records:
        if r["stage"] == stage:
            seen.update(dict.fromkeys(k for k in r if k not in ("stage", "step", "time")))
    return sorted(seen, key=natural_key)


def _matching(keys: Iterable[str], pattern: str) -> list[str]:
    """Keys matching a pattern whose ``*`` stands for exactly one name segment."""
    want = pattern.split("/")
    return [k for k in keys if len(k.split("/")) == len(want)
            and all(w in ("*", p) for w, p in zip(want, k.split("/")))]


def _eval_keys(keys: Iterable[str]) -> dict[tuple[str, str, str], str]:
    """eval/<bench>/<expert>/<metric> (or eval/<bench>/<metric>, expert "all") -> (bench, expert, metric)."""
    out = {}
    for k in keys:
        parts = k.split("/")
        if parts[0] != "eval" or len(parts) not in (3, 4):
            continue
        bench, expert, metric = (parts[1], parts[2], parts[3]) if len(parts) == 4 else (parts[1], "all", parts[2])
        out[(bench, expert, metric)] = k
    return out


# ------------------------------------------------------------------------------------------------------- plots
def smoothing_window(n: int) -> int:
    """Centred rolling-mean window for a series of ``n`` points: 1 (no smoothing) below 5 points, else the odd
    number nearest n/10, at least 3 and at most 51."""
    if n < 5:
        return 1
    return min(51, max(3, (n // 10) | 1))


def centred_mean(values: Sequence[float], window: int) -> list[float]:
    """Centred rolling mean over ``window`` (odd) points; near the ends, the mean of the points inside the series."""
    if window < 1 or window % 2 == 0:
        raise ValueError(f"centred_mean: window must be odd and >= 1, got {window}")
    h = window // 2
    return [statistics.fmean(values[max(0, i - h): i + h + 1]) for i in range(len(values))]


def _draw(ax, steps: list[int], values: list[float], label: str, **style) -> None:
    w = smoothing_window(len(values))
    if w == 1:
        ax.plot(steps, values, label=label, marker="o", markersize=3, **style)
        return
    line, = ax.plot(steps, values, alpha=0.3, linewidth=0.8, marker=".", markersize=3, **style)
    ax.plot(steps, centred_mean(values, w), label=f"{label} (centred mean, window {w})", color=line.get_color(),
            **{k: v for k, v in style.items() if k != "color"})


def _finish(fig, ax_list, path: Path, title: str) -> Path:
    for ax in ax_list:
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="best")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _panels(records, stage: str, keys: Sequence[str], path: Path, title: str, xlabel: str) -> Optional[Path]:
    """One panel per present key (their scales differ), stacked with a shared x axis."""
    keys = [k for k in keys if _series(records, stage, k)[0]]
    if not keys:
        return None
    fig, axes = plt.subplots(len(keys), 1, figsize=(8, 2.4 * len(keys) + 0.8), sharex=True, squeeze=False)
    for ax, k in zip(axes[:, 0], keys):
        _draw(ax, *_series(records, stage, k), label=k)
        ax.set_ylabel(k.split("/", 1)[1])
    axes[-1, 0].set_xlabel(xlabel)
    return _finish(fig, axes[:, 0], path, title)


def _plot_rewards(records, out: Path) -> Optional[Path]:
    experts = _matching(_keys(records, "train"), "expert/*/reward_mean")
    keys = experts + (["reward/mean"] if _series(records, "train", "reward/mean")[0] else [])
    if not keys:
        return None
    formats = _matching(_keys(records, "train"), "expert/*/format_rate")
    fig, axes = plt.subplots(1 + bool(formats), 1, figsize=(8, 4.5 + 3 * bool(formats)), sharex=True,
                             squeeze=False)
    ax = axes[0, 0]
    for k in experts:
        _draw(ax, *_series(records, "train", k), label=f"expert {k.split('/')[1]}")
    if "reward/mean" in keys:
        _draw(ax, *_series(records, "train", "reward/mean"), label="all experts", color="black", linestyle="--")
    ax.set_ylabel("mean reward of sampled responses")
    for k in formats:
        _draw(axes[1, 0], *_series(records, "train", k), label=f"expert {k.split('/')[1]}")
    if formats:
        axes[1, 0].set_ylabel("answer in required format")
        axes[1, 0].set_ylim(-0.02, 1.02)
    axes[-1, 0].set_xlabel("RIEL step")
    return _finish(fig, list(axes[:, 0]), out / "rewards.png", "Reward per expert")


def _plot_hard(records, out: Path) -> Optional[Path]:
    size = _series(records, "train", "hard/size")
    adm = _series(records, "train", "hard/admissions")
    if not size[0] and not adm[0]:
        return None
    fig, axes = plt.subplots(2, 1, figsize=(8, 5.5), sharex=True)
    if size[0]:
        axes[0].plot(*size, label="all experts", color="black")
    for k in _matching(_keys(records, "train"), "hard/expert/*/size"):
        axes[0].plot(*_series(records, "train", k), label=f"expert {k.split('/')[2]}")
    axes[0].set_ylabel("examples in store")
    if adm[0]:
        axes[1].bar(adm[0], adm[1], width=1.0, label="admissions")
    axes[1].set_ylabel("admitted this step")
    axes[1].set_xlabel("RIEL step")
    return _finish(fig, list(axes), out / "hard_store.png", "Hard-example store")


def _plot_timings(records, stage: str, path: Path) -> Optional[Path]:
    keys = [k for k in _keys(records, stage) if k.startswith("timing/") and k not in TIMING_TOTALS]
    if not keys:
        return None
    steps = sorted({int(r["step"]) for r in records if r["stage"] == stage and any(k in r for k in keys)})
    index = {s: i for i, s in enumerate(steps)}
    stacks = []
    for k in keys:
        col = [0.0] * len(steps)
        for s, v in zip(*_series(records, stage, k)):
            col[index[s]] = v
        stacks.append(col)
    fig, ax = plt.subplots(figsize=(9.5, 4.5))
    ax.stackplot(steps, stacks, labels=[k.split("/", 1)[1] for k in keys], alpha=0.85)
    for k in TIMING_TOTALS:
        if _series(records, stage, k)[0]:
            ax.plot(*_series(records, stage, k), color="black", linewidth=1, label=f"{k.split('/')[1]} (total)")
    ax.set_xlabel(f"{'RIEL' if stage == 'train' else stage.upper()} step")
    ax.set_ylabel("seconds")
    handles, labels = ax.get_legend_handles_labels()
    ax.legend(handles[::-1], labels[::-1], fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(True, alpha=0.3)
    return _finish(fig, [], path, f"Time per step by phase ({stage})")


def _eval_panels(records, ev: Mapping[tuple[str, str, str], str], metrics: Sequence[str], path: Path,
                 title: str) -> Optional[Path]:
    """One panel per benchmark: every expert's curves of ``metrics`` (solid, dashed, dotted ... in that order)."""
    ev = {k: v for k, v in ev.items() if k[2] in metrics or ("pass@*" in metrics and k[2].startswith("pass@"))}
    if not ev:
        return None
    benches = sorted({b for b, _, _ in ev}, key=natural_key)
    experts = sorted({e for _, e, _ in ev}, key=natural_key)
    colour = {e: f"C{i % 10}" for i, e in enumerate(experts)}
    styles = ("-", "--", ":", "-.")
    fig, axes = plt.subplots(1, len(benches), figsize=(5 * len(benches) + 4, 4.5), squeeze=False)
    for ax, bench in zip(axes[0], benches):
        for (b, expert, metric), key in sorted(ev.items(), key=lambda kv: natural_key("/".join(kv[0]))):
            if b == bench:
                rank = metrics.index(metric) if metric in metrics else metrics.index("pass@*")
                _draw(ax, *_series(records, "eval", key), label=f"expert {expert} {metric}", color=colour[expert],
                      linestyle=styles[rank % len(styles)])
        ax.set_title(bench)
        ax.set_xlabel("checkpoint step")
        ax.set_ylabel("accuracy / rate")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(True, alpha=0.3)
    labelled = {lab: h for ax in axes[0] for h, lab in zip(*ax.get_legend_handles_labels())}
    axes[0, -1].legend(labelled.values(), labelled.keys(), fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _finish(fig, [], path, title)


def _plot_eval(records, out: Path) -> list[Path]:
    ev = _eval_keys(_keys(records, "eval"))
    paths = [_eval_panels(records, ev, ("accuracy", "pass@*"), out / "eval_accuracy.png",
                          "Evaluation accuracy (greedy exact match)")]
    if any(m in ("last_number_accuracy", "format_rate") for _, _, m in ev):
        paths.append(_eval_panels(records, ev, FORMAT_METRICS, out / "eval_format.png",
                                  "Format vs. skill: accuracy (solid), last-number accuracy (dashed),\n"
                                  "format rate (dotted)"))
    final = final_eval(records)
    if "accuracy" in final:
        paths.append(_plot_eval_final(final["accuracy"], out / "eval_final.png"))
    return [p for p in paths if p is not None]


def _plot_eval_final(table: Mapping[str, Mapping[str, float]], path: Path) -> Path:
    experts = sorted(table, key=natural_key)
    benches = sorted({b for e in experts for b in table[e]}, key=natural_key)
    width = 0.8 / len(experts)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(benches) * max(1, len(experts) / 2)), 4.5))
    for i, e in enumerate(experts):
        xs = [j + (i - (len(experts) - 1) / 2) * width for j in range(len(benches))]
        ys = [table[e].get(b, math.nan) for b in benches]
        bars = ax.bar(xs, ys, width=width, label=f"expert {e}")
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks(range(len(benches)), benches)
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.08)
    return _finish(fig, [ax], path, "Final evaluation: accuracy per expert prompt and benchmark")


# ------------------------------------------------------------------------------------------------------ summary
def final_eval(records: Sequence[dict]) -> dict[str, dict[str, dict[str, float]]]:
    """metric -> expert -> benchmark -> the latest logged value (the final evaluation)."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for (bench, expert, metric), key in _eval_keys(_keys(records, "eval")).items():
        steps, values = _series(records, "eval", key)
        out.setdefault(metric, {}).setdefault(expert, {})[bench] = values[-1]
    return out


def _best_rule(key: str) -> str:
    if any(w in key for w in ("loss", "nll", "kl", "mismatch")):
        return "min"
    return "max"


def _fmt(v: float) -> str:
    return f"{v:.4g}"


def _key_metrics_table(records) -> list[str]:
    lines = ["| stage | metric | final | best | best at step |", "| --- | --- | --- | --- | --- |"]
    for stage, patterns in SUMMARY_KEYS.items():
        present = _keys(records, stage)
        for pattern in patterns:
            for key in _matching(present, pattern) if "*" in pattern else [pattern] * (pattern in present):
                steps, values = _series(records, stage, key)
                finite = [(v, s) for s, v in zip(steps, values) if math.isfinite(v)]
                if not finite:
                    continue
                pick = min if _best_rule(key) == "min" else max
                best, at = pick(finite, key=lambda vs: vs[0])
                lines.append(f"| {stage} | {key} | {_fmt(values[-1])} | {_fmt(best)} ({_best_rule(key)}) | {at} |")
    return lines if len(lines) > 2 else []


def _timing_table(records, stage: str) -> list[str]:
    keys = [k for k in _keys(records, stage) if k.startswith("timing/")]
    means = {k: statistics.fmean(_series(records, stage, k)[1]) for k in keys}
    phases = {k: v for k, v in means.items() if k not in TIMING_TOTALS}
    if not means:
        return []
    total = next((means[k] for k in TIMING_TOTALS if k in means), sum(phases.values()))
    lines = [f"### {stage}", "", "| phase | mean s/step | share |", "| --- | --- | --- |"]
    for k, v in sorted(phases.items(), key=lambda kv: -kv[1]):
        share = f"{100 * v / total:.1f}%" if total > 0 else "-"
        lines.append(f"| {k.split('/', 1)[1]} | {v:.4g} | {share} |")
    untimed = total - sum(phases.values())
    if phases and untimed > 1e-3 * total:
        lines.append(f"| (not in a phase timer) | {untimed:.4g} | {100 * untimed / total:.1f}% |")
    lines.append(f"| **total** | {total:.4g} | |")
    return lines + [""]


def _eval_tables(records) -> list[str]:
    final = final_eval(records)
    steps = [int(r["step"]) for r in records if r["stage"] == "eval"]
    if not final:
        return []
    lines = [f"## Final evaluation (step {max(steps)})", ""]
    for metric in sorted(final, key=lambda m: (m != "accuracy", natural_key(m))):
        table = final[metric]
        benches = sorted({b for e in table.values() for b in e}, key=natural_key)
        lines += [f"### {metric}", "", *([METRIC_NOTES[metric], ""] if metric in METRIC_NOTES else []),
                  "| expert | " + " | ".join(benches) + " |", "| --- |" + " --- |" * len(benches)]
        for e in sorted(table, key=natural_key):
            cells = [f"{table[e][b]:.3f}" if b in table[e] else "-" for b in benches]
            lines.append(f"| {e} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def _summary(run_dir: Path, records: Sequence[dict], plots: Sequence[Path], extra: Sequence[str] = ()) -> str:
    lines = [f"# Run report: {run_dir.name}", ""]
    for stage in ("sft", "train", "eval"):
        steps = sorted({int(r["step"]) for r in records if r["stage"] == stage})
        if steps:
            lines.append(f"- {stage}: {len(steps)} logged steps ({steps[0]} to {steps[-1]})")
    lines.append("")
    table = _key_metrics_table(records)
    if table:
        lines += ["## Key metrics", "", "Best is the minimum for losses, KLs and mismatches, else the maximum.", "",
                  *table, ""]
    timing = _timing_table(records, "sft") + _timing_table(records, "train")
    if timing:
        lines += ["## Mean time per step by phase", "", *timing]
    lines += _eval_tables(records)
    lines += extra
    if plots:
        lines += ["## Plots", "", *[f"![{p.stem}]({p.name})" for p in plots], ""]
    return "\n".join(lines)


def write_report(run_dir: Path | str, *, samples: int = REPORT_SAMPLES) -> list[Path]:
    """Read ``<run_dir>/metrics.jsonl`` (and samples.jsonl, eval/step_<N>.jsonl when present); write the plots and
    summary.md (with the latest ``samples`` samples per stage) into ``<run_dir>/report/``; return the written
    paths (summary.md last)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunError(f"run directory {run_dir} does not exist")
    records = read_metrics(run_dir)
    if not records:
        raise RunError(f"{run_dir / 'metrics.jsonl'} holds no metrics yet: run some steps first")
    out = run_dir / REPORT_DIR
    out.mkdir(exist_ok=True)
    candidates = [
        _plot_rewards(records, out),
        _panels(records, "train", LOSS_KEYS, out / "losses.png", "Losses (RIEL)", "RIEL step"),
        _panels(records, "sft", ("train/sft_nll", "train/loss"), out / "sft_losses.png", "Loss (MEF SFT)",
                "SFT step"),
        _panels(records, "train", MISMATCH_KEYS, out / "mismatch.png",
                "Trainer vs. rollout log-prob mismatch", "RIEL step"),
        _plot_hard(records, out),
        _plot_timings(records, "train", out / "timings.png"),
        _plot_timings(records, "sft", out / "sft_timings.png"),
        *_plot_eval(records, out),
    ]
    complementarity, heatmap = complementarity_section(run_dir, out)
    plots = [p for p in [*candidates, heatmap] if p is not None]
    summary = out / "summary.md"
    extra = [*complementarity, *samples_section(run_dir, samples)]
    summary.write_text(_summary(run_dir, records, plots, extra), encoding="utf-8")
    return plots + [summary]
