"""The report's views of what the model wrote: the latest samples per stage, and expert complementarity on the
latest evaluation (which problems one expert solves and another fails, and the oracle "any expert" accuracy:
the heterogeneity MEML-GRPO's mutual learning feeds on). ``report.write_report`` puts both in summary.md."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import matplotlib

matplotlib.use("Agg")  # plots go to files; no display
import matplotlib.pyplot as plt  # noqa: E402

from megatron_meml.reporting.samples import (EVAL_DIR, EvalProblem, Sample, latest_eval_file,  # noqa: E402
                                             read_eval_problems, read_samples, samples_markdown)

REPORT_SAMPLES = 8
"""Samples per stage shown in summary.md (the latest ones)."""


# ------------------------------------------------------------------------------------------------ samples
def latest_samples(rows: Sequence[Sample], stage: str, n: int) -> list[Sample]:
    """The last ``n`` rows of ``stage`` by step (file order within a step), in step order."""
    mine = sorted((r for r in rows if r.stage == stage), key=lambda r: r.step)  # stable: file order within a step
    return mine[-n:] if n > 0 else []


def samples_section(run_dir: Path, n: int = REPORT_SAMPLES) -> list[str]:
    """summary.md lines: per stage, a table of its latest ``n`` samples ([] without samples.jsonl)."""
    rows = read_samples(run_dir)
    if not rows or n <= 0:
        return []
    lines = ["## Samples", "",
             f"The latest {n} completions per stage from samples.jsonl (picked per step by a seeded draw spread over "
             "the experts; long text is clipped around \"…\"). *in format*: the answer is written in the required "
             "format.", ""]
    for stage in ("train", "eval"):
        latest = latest_samples(rows, stage, n)
        if latest:
            title = {"train": "RIEL rollouts", "eval": "greedy evaluation answers"}[stage]
            lines += [f"### {stage}: {title}", "", samples_markdown(latest), ""]
    return lines


# ------------------------------------------------------------------------------------------------ complementarity
@dataclass(frozen=True, kw_only=True)
class PairCounts:
    """How two experts' greedy answers agree over the evaluated problems."""

    i: str
    j: str
    only_i: int
    """Problems i solves and j fails."""
    only_j: int
    """Problems j solves and i fails."""
    both: int
    neither: int


def pair_counts(solved: Sequence[Sequence[bool]], expert_ids: Sequence[str]) -> list[PairCounts]:
    """Every pair (i < j) of experts; ``solved[p][e]``: expert e's greedy answer to problem p is correct."""
    out = []
    for a in range(len(expert_ids)):
        for b in range(a + 1, len(expert_ids)):
            col = [(row[a], row[b]) for row in solved]
            out.append(PairCounts(i=expert_ids[a], j=expert_ids[b], only_i=sum(x and not y for x, y in col),
                                  only_j=sum(y and not x for x, y in col), both=sum(x and y for x, y in col),
                                  neither=sum(not x and not y for x, y in col)))
    return out


def oracle_accuracy(solved: Sequence[Sequence[bool]]) -> float:
    """Fraction of problems that at least one expert solves (an oracle choosing the expert per problem)."""
    return sum(any(row) for row in solved) / max(len(solved), 1)


def solved_matrix(rows: Sequence[EvalProblem]) -> tuple[list[str], list[list[bool]]]:
    """(expert ids, solved[p][e]) from an evaluation's per-problem rows (reward > 0 is solved)."""
    ids = list(rows[0].rewards) if rows else []
    return ids, [[r.rewards.get(e, 0.0) > 0 for e in ids] for r in rows]


def complementarity_section(run_dir: Path, out: Path) -> tuple[list[str], Optional[Path]]:
    """summary.md lines and the heatmap for the latest evaluation's per-problem file (([], None) without one)."""
    path = latest_eval_file(run_dir)
    rows = read_eval_problems(path) if path is not None else []
    if not rows:
        return [], None
    ids, solved = solved_matrix(rows)
    n = len(rows)
    acc = {e: sum(row[k] for row in solved) / n for k, e in enumerate(ids)}
    best = max(ids, key=lambda e: acc[e])
    oracle = oracle_accuracy(solved)
    lines = [f"## Expert complementarity (eval step {rows[0].step}, {rows[0].bench}, {n} problems)", "",
             f"Greedy answers per problem from {EVAL_DIR}/{path.name}. Oracle (\"any expert\") accuracy: "
             f"**{oracle:.3f}** ({sum(any(r) for r in solved)}/{n}); best single expert: {best} {acc[best]:.3f}; "
             "per expert: " + ", ".join(f"{e} {acc[e]:.3f}" for e in ids) + ".", ""]
    pairs = pair_counts(solved, ids)
    if pairs:
        lines += ["| expert i | expert j | i right, j wrong | j right, i wrong | both right | both wrong |",
                  "| --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {p.i} | {p.j} | {p.only_i} | {p.only_j} | {p.both} | {p.neither} |" for p in pairs]
        lines.append("")
    return lines, _plot_complementarity(ids, solved, out / "complementarity.png", rows[0].step)


def _plot_complementarity(ids: list[str], solved: list[list[bool]], path: Path, step: int) -> Path:
    k = len(ids)
    grid = [[sum(row[a] and (a == b or not row[b]) for row in solved) for b in range(k)] for a in range(k)]
    fig, ax = plt.subplots(figsize=(2.2 + 1.1 * k, 1.8 + 1.0 * k))
    im = ax.imshow(grid, cmap="viridis")
    for a in range(k):
        for b in range(k):
            ax.text(b, a, str(grid[a][b]), ha="center", va="center", color="white" if grid[a][b] < max(
                max(r) for r in grid) / 2 else "black", fontsize=9)
    ax.set_xticks(range(k), ids, rotation=20, ha="right")
    ax.set_yticks(range(k), ids)
    ax.set_xlabel("expert j (wrong)")
    ax.set_ylabel("expert i (right)")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set_title(f"Problems i solves and j fails (diagonal: i solves), eval step {step}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
