"""`meml compare`'s tables: held-out accuracy per row and read-out with 95% intervals, and each row's paired
difference to the baseline row per seed and pooled over seeds, from every run's per-problem eval files.

Read-outs (``READOUTS``) of a run: ``expert0`` and ``expert1`` (the first two of ``experts.ids``: the paper reads
out under Expert1) and ``best-on-dev``, the expert with the highest accuracy on the run's dev problems
(``data.dev_size``), reported on the test problems; a run without dev problems falls back to the expert of highest
training reward (``acc_reward_best``), and the table marks it.

``compare_problems.json`` keeps what the intervals are computed from: per row and seed, which expert each read-out
reads and its correctness on every test and dev problem. :func:`recompute_intervals` gives back every interval of
compare.md from that file alone. ``compare_rows.json`` keeps each run's logged metrics (also for runs evaluated before
per-problem files were written), tabulated as mean ± std over seeds at the end of compare.md.
"""
from __future__ import annotations

import dataclasses
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from megatron_meml.reporting.metrics import natural_key  # noqa: E402
from megatron_meml.reporting.samples import EvalProblem  # noqa: E402
from megatron_meml.reporting.stats import Interval, paired_bootstrap, wilson  # noqa: E402

READOUTS = ("expert0", "expert1", "best-on-dev")
PICK_DEV = "dev"
PICK_REWARD = "training reward"
BASELINE = "MoE-SFT-GRPO"
RESAMPLES = 2000
"""Bootstrap resamples per interval."""
BOOTSTRAP_SEED = 0
"""Seed of every bootstrap (each interval draws from its own generator seeded with it)."""


@dataclass(frozen=True, kw_only=True)
class RunProblems:
    """One finished run's per-problem correctness per read-out and split."""

    variant: str
    seed: int
    readouts: dict[str, str]
    """Read-out -> the expert id it reads (absent where the run has no such expert: expert1 of a one-expert row)."""
    pick: Optional[str]
    """How best-on-dev was picked: ``dev`` (the dev accuracy), ``training reward`` (no dev problems) or None."""
    problem_ids: dict[str, list[str]]
    """Split (``test``, ``dev`` when present) -> problem ids in evaluation order."""
    correct: dict[str, dict[str, list[int]]]
    """Read-out -> split -> 1 where the expert's greedy answer was right (reward > 0), else 0, in problem_ids order."""

    def scores(self, readout: str, split: str = "test") -> dict[str, int]:
        return dict(zip(self.problem_ids[split], self.correct[readout][split]))


@dataclass(frozen=True)
class CompareIntervals:
    """Every interval of compare.md."""

    baseline: str
    resamples: int
    accuracy: dict[tuple[str, str], Interval]
    """(row, read-out) -> test accuracy, mean over seeds."""
    per_seed: dict[tuple[str, str, int], Interval]
    """(row, read-out, seed) -> row minus baseline on the same test problems."""
    pooled: dict[tuple[str, str], Interval]
    """(row, read-out) -> the same over every seed both rows have."""


def best_expert(accuracy: Mapping[str, float]) -> str:
    """The expert of highest accuracy; ties go to the first in ``accuracy``'s order (the experts' order)."""
    return max(accuracy, key=lambda e: (accuracy[e], -list(accuracy).index(e)))


def run_problems(variant: str, seed: int, test: Sequence[EvalProblem], dev: Sequence[EvalProblem],
                 expert_ids: Sequence[str], reward_pick: Optional[str] = None) -> RunProblems:
    """A run's read-outs from its per-problem eval rows (``test``, ``dev``: [] without dev problems);
    ``expert_ids``: the recipe's experts.ids; ``reward_pick``: the expert of highest training reward (the fallback
    without dev problems; None for SFT rows)."""
    present = list(test[0].rewards) if test else []
    readouts = {name: e for name, e in zip(READOUTS[:2], expert_ids) if e in present}
    pick = None
    if dev and present:
        acc = {e: sum(p.rewards.get(e, 0.0) > 0 for p in dev) / len(dev) for e in present}
        readouts["best-on-dev"], pick = best_expert(acc), PICK_DEV
    elif reward_pick in present:
        readouts["best-on-dev"], pick = reward_pick, PICK_REWARD
    splits = {"test": test, **({"dev": dev} if dev else {})}
    return RunProblems(variant=variant, seed=int(seed), readouts=readouts, pick=pick,
                       problem_ids={s: [p.problem_id for p in rows] for s, rows in splits.items()},
                       correct={r: {s: [int(p.rewards.get(e, 0.0) > 0) for p in rows] for s, rows in splits.items()}
                                for r, e in readouts.items()})


# ------------------------------------------------------------------------------------------------ intervals
def accuracy_interval(runs: Sequence[Sequence[int]], *, resamples: int = RESAMPLES,
                      seed: int = BOOTSTRAP_SEED) -> Interval:
    """Mean accuracy over seeds of per-problem 0/1 scores (one list per seed): the Wilson interval for one seed,
    else the two-level bootstrap over seeds and problems (paired_bootstrap against all-zero scores)."""
    if len(runs) == 1:
        return wilson(sum(runs[0]), len(runs[0]))
    return paired_bootstrap([(a, [0] * len(a)) for a in runs], resamples=resamples, seed=seed)


def _pair(run: RunProblems, base: Optional[RunProblems], readout: str) -> Optional[tuple[list[int], list[int]]]:
    """(row, baseline) scores on the test problems both have, in the baseline's order (None: nothing to pair)."""
    if base is None or readout not in run.correct or readout not in base.correct:
        return None
    mine, theirs = run.scores(readout), base.scores(readout)
    common = [pid for pid in base.problem_ids["test"] if pid in mine]
    return ([mine[p] for p in common], [theirs[p] for p in common]) if common else None


def compare_intervals(runs: Sequence[RunProblems], baseline: str = BASELINE, *, resamples: int = RESAMPLES,
                      seed: int = BOOTSTRAP_SEED) -> CompareIntervals:
    """Every row's test accuracy per read-out (:func:`accuracy_interval`) and, against ``baseline``, the paired
    difference per seed (bootstrap over problems) and pooled over the seeds in increasing order (two-level
    bootstrap over seeds, then problems): stats.paired_bootstrap with ``resamples`` and ``seed``."""
    by = {(r.variant, r.seed): r for r in runs}
    accuracy, per_seed, pooled = {}, {}, {}
    for variant in dict.fromkeys(r.variant for r in runs):
        mine = sorted((r for r in runs if r.variant == variant), key=lambda r: r.seed)
        for ro in READOUTS:
            scores = [r.correct[ro]["test"] for r in mine if ro in r.correct and r.correct[ro]["test"]]
            if scores:
                accuracy[variant, ro] = accuracy_interval(scores, resamples=resamples, seed=seed)
            pairs = [] if variant == baseline else [(r.seed, _pair(r, by.get((baseline, r.seed)), ro)) for r in mine]
            pairs = [(s, p) for s, p in pairs if p is not None]
            for s, p in pairs:
                per_seed[variant, ro, s] = paired_bootstrap([p], resamples=resamples, seed=seed)
            if pairs:
                pooled[variant, ro] = paired_bootstrap([p for _, p in pairs], resamples=resamples, seed=seed)
    return CompareIntervals(baseline, resamples, accuracy, per_seed, pooled)


# ------------------------------------------------------------------------------------------------ the file
def write_compare_problems(path: Path | str, runs: Sequence[RunProblems], *, baseline: str = BASELINE,
                           resamples: int = RESAMPLES, seed: int = BOOTSTRAP_SEED,
                           record: Optional[Mapping[str, object]] = None) -> Path:
    """``{"baseline", "resamples", "bootstrap_seed", ...record, "runs": [RunProblems fields ...]}``, one run per
    line. ``record``: what makes the file a compare record that another machine continues (`meml compare
    --resume`): ``recipes`` (the recipe stamp), ``overrides`` (the compare's own), ``rows`` (compare_rows.json) and
    ``dtype`` (the model dtype its runs used, which ``auto`` chooses per machine)."""
    path = Path(path)
    head = json.dumps({"baseline": baseline, "resamples": resamples, "bootstrap_seed": seed})
    extra = "".join(f', "{k}": {json.dumps(v)}' for k, v in (record or {}).items() if k != "rows")
    rows = ",\n".join(json.dumps(r) for r in (record or {}).get("rows", []))
    rows = f', "rows": [\n{rows}\n]' if record and "rows" in record else ""
    body = ",\n".join(json.dumps(dataclasses.asdict(r)) for r in runs)
    path.write_text(f'{head[:-1]}{extra}{rows}, "runs": [\n{body}\n]}}\n', encoding="utf-8")
    return path


def read_compare_problems(path: Path | str) -> tuple[list[RunProblems], dict]:
    """(runs, settings: baseline, resamples, bootstrap_seed, and, in a compare record, recipes, overrides, rows and
    dtype where recorded) of a compare_problems.json."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
        runs = [RunProblems(**r) for r in doc["runs"]]
        settings = {k: doc[k] for k in ("baseline", "resamples", "bootstrap_seed")}
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a compare_problems.json ({e})") from None
    return runs, settings | {k: doc[k] for k in ("recipes", "overrides", "rows", "dtype") if k in doc}


def recompute_intervals(path: Path | str) -> CompareIntervals:
    """Every interval of compare.md from its compare_problems.json alone, with the settings recorded there."""
    runs, s = read_compare_problems(path)
    return compare_intervals(runs, s["baseline"], resamples=s["resamples"], seed=s["bootstrap_seed"])


# ------------------------------------------------------------------------------------------------ markdown
def _signed(iv: Optional[Interval]) -> str:
    return "-" if iv is None else iv.signed() + (" *" if iv.excludes_zero else "")


def _picks(runs: Sequence[RunProblems], variant: str) -> str:
    mine = sorted((r for r in runs if r.variant == variant), key=lambda r: r.seed)
    return ", ".join(f"{r.readouts['best-on-dev']}{'†' if r.pick == PICK_REWARD else ''}"
                     if r.pick else "-" for r in mine)


def interval_sections(runs: Sequence[RunProblems], iv: CompareIntervals, missing: Sequence[str] = ()) -> list[str]:
    """compare.md's accuracy table and one paired-difference table per read-out."""
    variants = list(dict.fromkeys(r.variant for r in runs))
    seeds = sorted({r.seed for r in runs})
    n_test = sorted({len(r.problem_ids["test"]) for r in runs})
    n_dev = sorted({len(r.problem_ids.get("dev", [])) for r in runs})
    lines = [f"## Test accuracy ({'/'.join(map(str, n_test))} problems per seed)", "",
             "| row | seeds | " + " | ".join(READOUTS) + " | best-on-dev picks (per seed) |",
             "| --- | --- |" + " --- |" * (len(READOUTS) + 1)]
    for v in variants:
        n = len({r.seed for r in runs if r.variant == v})
        cells = [str(iv.accuracy[v, ro]) if (v, ro) in iv.accuracy else "-" for ro in READOUTS]
        lines.append(f"| {v} | {n} | " + " | ".join(cells) + f" | {_picks(runs, v)} |")
    fallback = any(r.pick == PICK_REWARD for r in runs)
    lines += ["", "Mean over seeds with a 95% interval: Wilson for one seed, else a two-level bootstrap (seeds, then "
              f"problems; {iv.resamples} resamples). best-on-dev: the expert with the highest accuracy on the run's "
              f"{'/'.join(map(str, n_dev))} dev problems, reported on the test problems"
              + ("; † no dev problems in that run: the expert with the highest training reward over its last steps "
                 "(acc_reward_best)." if fallback else "."), ""]
    if iv.baseline in variants:
        for ro in READOUTS:
            rows = [v for v in variants if v != iv.baseline and (v, ro) in iv.pooled]
            if not rows:
                continue
            lines += [f"## Paired difference to {iv.baseline}: {ro}", "",
                      "| row | " + " | ".join(f"seed {s}" for s in seeds) + " | pooled |",
                      "| --- |" + " --- |" * (len(seeds) + 1)]
            lines += [f"| {v} | " + " | ".join(_signed(iv.per_seed.get((v, ro, s))) for s in seeds)
                      + f" | {_signed(iv.pooled[v, ro])} |" for v in rows]
            lines.append("")
        lines += [f"Row minus {iv.baseline} on the same test problems and seed (same MEF start), mean with a 95% "
                  f"percentile bootstrap interval ({iv.resamples} resamples): per seed over problems, pooled over "
                  "seeds then problems within each seed; * the interval excludes 0.", ""]
    if missing:
        lines += ["Runs without per-problem eval files (evaluated before those were written), in the metrics tables "
                  "below only: " + ", ".join(missing) + ".", ""]
    return lines


# ------------------------------------------------------------------------------------------------ metrics tables
def compare_stats(rows: Sequence[Mapping[str, object]]) -> dict[str, dict[str, tuple[float, float, int]]]:
    """variant -> metric -> (mean, sample std over seeds (0 for one seed), number of seeds), variants and metrics
    in first-appearance order."""
    values: dict[str, dict[str, list[float]]] = {}
    for i, row in enumerate(rows):
        if "variant" not in row or "seed" not in row:
            raise ValueError(f"compare row {i} needs 'variant' and 'seed' keys, got {sorted(row)}")
        per = values.setdefault(str(row["variant"]), {})
        for k, v in row.items():
            if k not in ("variant", "seed"):
                per.setdefault(k, []).append(float(v))
    return {variant: {m: (statistics.fmean(vs), statistics.stdev(vs) if len(vs) > 1 else 0.0, len(vs))
                      for m, vs in per.items()} for variant, per in values.items()}


def paired_differences(rows: Sequence[Mapping[str, object]], baseline: str,
                       metric: str) -> dict[str, tuple[float, float, int]]:
    """variant -> (mean, sample std, seeds) of ``metric`` minus the baseline's on the same seed, over the seeds both
    have (the RL variants of one seed share their MoE-SFT start, so this removes the start's variance)."""
    base = {str(r["seed"]): float(r[metric]) for r in rows if str(r["variant"]) == baseline and metric in r}
    diffs: dict[str, list[float]] = {}
    for r in rows:
        v, seed = str(r["variant"]), str(r["seed"])
        if v != baseline and metric in r and seed in base:
            diffs.setdefault(v, []).append(float(r[metric]) - base[seed])
    return {v: (statistics.fmean(d), statistics.stdev(d) if len(d) > 1 else 0.0, len(d)) for v, d in diffs.items()}


def _metric_order(rows: Sequence[Mapping[str, object]]) -> list[str]:
    seen: dict[str, None] = {}
    for row in rows:
        seen.update(dict.fromkeys(k for k in row if k not in ("variant", "seed")))
    return list(seen)


def _mean_std(mean: float, std: float, n: int, sign: str = "") -> str:
    return f"{mean:{sign}.3f} ± {std:.3f}" if n > 1 else f"{mean:{sign}.3f} (one seed)"


def metric_sections(rows: Sequence[Mapping[str, object]], baseline: str) -> list[str]:
    """Mean ± sample std over seeds of every logged metric per variant, then each variant's paired difference to
    ``baseline`` (mean ± std over seeds) when it is present."""
    stats, metrics = compare_stats(rows), _metric_order(rows)
    seeds = sorted({str(r["seed"]) for r in rows}, key=natural_key)
    lines = [f"Mean ± sample standard deviation over seeds ({', '.join(seeds)}).", "",
             "| variant | seeds | " + " | ".join(metrics) + " |", "| --- | --- |" + " --- |" * len(metrics)]
    for variant, per in stats.items():
        n = max(c for _, _, c in per.values())
        lines.append(f"| {variant} | {n} | " + " | ".join(_mean_std(*per[m]) if m in per else "-" for m in metrics)
                     + " |")
    lines.append("")
    if baseline in stats:
        per_metric = {m: paired_differences(rows, baseline, m) for m in metrics}
        lines += [f"Paired difference to {baseline} on the same seed (mean ± std over seeds):", "",
                  "| variant | " + " | ".join(metrics) + " |", "| --- |" + " --- |" * len(metrics)]
        for variant in stats:
            if variant != baseline and any(variant in d for d in per_metric.values()):
                cells = [_mean_std(*per_metric[m][variant], sign="+") if variant in per_metric[m] else "-"
                         for m in metrics]
                lines.append(f"| {variant} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def write_compare_table(rows: Sequence[Mapping[str, object]], out_dir: Path | str, *, baseline: str = BASELINE,
                        runs: Sequence[RunProblems] = (), intervals: Optional[CompareIntervals] = None,
                        resamples: int = RESAMPLES, seed: int = BOOTSTRAP_SEED) -> list[Path]:
    """compare.md and compare.png in ``out_dir``; returns both paths. With ``runs`` (per-problem data), compare.md
    opens with the interval tables (:func:`interval_sections`) and compare.png shows the pooled paired differences
    with their intervals; the logged metrics of ``rows`` (:func:`metric_sections`) follow, under their own heading
    when intervals precede them. The (variant, seed) of ``rows`` without ``runs`` are listed as such.
    ``intervals``: compare_intervals(runs, baseline, resamples=resamples, seed=seed) when already computed."""
    if not rows:
        raise ValueError("write_compare_table: no rows")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    iv = intervals or (compare_intervals(runs, baseline, resamples=resamples, seed=seed) if runs else None)
    have = {(r.variant, r.seed) for r in runs}
    missing = [f"{r['variant']} seed {r['seed']}" for r in rows if (r["variant"], int(r["seed"])) not in have]
    lines = []
    if iv is not None:
        lines += ["# meml compare", "", *interval_sections(runs, iv, missing), "## Logged metrics of every run", ""]
    lines += metric_sections(rows, baseline)
    md = out / "compare.md"
    md.write_text("\n".join(lines), encoding="utf-8")
    png = out / "compare.png"
    if iv is not None and iv.pooled:
        return [md, _plot_pooled(iv, png)]
    return [md, _plot_metrics(rows, compare_stats(rows), _metric_order(rows), png)]


# ------------------------------------------------------------------------------------------------ plots
def _save(fig, path: Path, title: str) -> Path:
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_pooled(iv: CompareIntervals, path: Path) -> Path:
    """One panel per read-out: each row's pooled difference to the baseline with its 95% interval."""
    readouts = [ro for ro in READOUTS if any(k[1] == ro for k in iv.pooled)]
    variants = list(dict.fromkeys(v for v, _ in iv.pooled))
    fig, axes = plt.subplots(1, len(readouts), figsize=(4.2 * len(readouts) + 1.5, 0.45 * len(variants) + 1.8),
                             sharex=True, sharey=True, squeeze=False)
    for ax, ro in zip(axes[0], readouts):
        for y, v in enumerate(variants):
            if (v, ro) in iv.pooled:
                c = iv.pooled[v, ro]
                ax.errorbar([c.value], [y], xerr=[[c.value - c.low], [c.high - c.value]], fmt="o", capsize=3,
                            color="C3" if c.excludes_zero else "C0")
        ax.axvline(0.0, color="black", linewidth=0.8)
        ax.set_title(ro)
        ax.set_xlabel(f"accuracy minus {iv.baseline}")
        ax.grid(True, axis="x", alpha=0.3)
    axes[0, 0].set_yticks(range(len(variants)), variants)
    axes[0, 0].invert_yaxis()
    return _save(fig, path, "Paired difference on the test problems, pooled over seeds (95% bootstrap interval)")


def _plot_metrics(rows, stats, metrics: list[str], path: Path) -> Path:
    """Without per-problem data: bars of each metric's mean over seeds with std error bars, one dot per seed."""
    variants = list(stats)
    width = 0.8 / len(metrics)
    fig, ax = plt.subplots(figsize=(max(7, 1.3 * len(variants) * max(1, len(metrics) / 2)), 4.8))
    for i, m in enumerate(metrics):
        offset = (i - (len(metrics) - 1) / 2) * width
        xs = [j + offset for j in range(len(variants))]
        mean = [stats[v][m][0] if m in stats[v] else math.nan for v in variants]
        std = [stats[v][m][1] if m in stats[v] else 0.0 for v in variants]
        bars = ax.bar(xs, mean, width=width, yerr=std, capsize=3, label=m, alpha=0.85)
        for j, v in enumerate(variants):
            pts = [float(r[m]) for r in rows if str(r["variant"]) == v and m in r]
            ax.scatter([xs[j]] * len(pts), pts, s=9, color="black", zorder=3)
        ax.bar_label(bars, fmt="%.3f", fontsize=7, label_type="center", color="white")
    ax.set_xticks(range(len(variants)), variants, rotation=20, ha="right")
    ax.set_ylabel("value (mean over seeds, error bar: std)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return _save(fig, path, "Variants compared (dots: individual seeds)")
