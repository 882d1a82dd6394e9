"""What a pipeline run did, in one table: held-out accuracy per expert at each stage with 95% intervals, the
any-expert oracle, RL's gain paired on the same problems, what MEML's parts did during RIEL (mutual-learning
pairs, hard examples), whether the experts kept their styles, and the time per stage. ``meml demo`` prints it and
puts it at the top of the RIEL run's summary.md."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from megatron_meml.errors import RunError
from megatron_meml.reporting.metrics import read_metrics
from megatron_meml.reporting.samples import EvalProblem, eval_file, read_eval_problems
from megatron_meml.reporting.stats import Interval, paired_bootstrap, wilson


@dataclass(frozen=True)
class EvalPoint:
    """One evaluation of the pipeline: the model after a stage, on the shared held-out problems."""

    label: str
    """base, after MEF, after RIEL."""
    run_dir: Path
    step: int
    """The evaluation's step in that run (its eval/step_<N>.jsonl)."""


@dataclass(frozen=True)
class StageEval:
    """One evaluation read back: per-problem rewards and the run's metrics at that step."""

    point: EvalPoint
    problems: list[EvalProblem]
    metrics: dict

    def scores(self, expert: str) -> list[float]:
        return [1.0 if p.rewards.get(expert, 0.0) > 0 else 0.0 for p in self.problems]

    def oracle(self) -> list[float]:
        return [1.0 if any(v > 0 for v in p.rewards.values()) else 0.0 for p in self.problems]


def read_stage_eval(point: EvalPoint) -> StageEval:
    path = eval_file(point.run_dir, point.step)
    if not path.is_file():
        raise RunError(f"{path}: no evaluation at step {point.step} for '{point.label}' (did the stage finish?)")
    rows = [r for r in read_metrics(point.run_dir) if r.get("stage") == "eval" and r.get("step") == point.step]
    return StageEval(point, read_eval_problems(path), rows[-1] if rows else {})


def _cell(scores: Sequence[float]) -> str:
    return str(wilson(sum(scores), len(scores)))


def accuracy_section(evals: Sequence[StageEval], expert_ids: Sequence[str], *, gain_from: str,
                     gain_to: str) -> tuple[list[str], dict[str, Interval]]:
    """Markdown lines: experts x stages, each cell accuracy [95% Wilson interval], then the paired gain from stage
    ``gain_from`` to ``gain_to`` (bootstrap over problems); and those gains by expert (the oracle as ``any``)."""
    ids = [p.problem_id for p in evals[0].problems]
    for ev in evals[1:]:
        if [p.problem_id for p in ev.problems] != ids:
            raise RunError(f"{ev.point.run_dir}: the evaluation at step {ev.point.step} is on other problems than "
                           f"{evals[0].point.run_dir}'s; the table compares the same problems only")
    by_label = {ev.point.label: ev for ev in evals}
    head = "| expert | " + " | ".join(ev.point.label for ev in evals) + f" | {gain_to} - {gain_from} (paired) |"
    lines = [head, "| --- |" + " --- |" * (len(evals) + 1)]
    gains: dict[str, Interval] = {}
    rows = [(e, lambda ev, e=e: ev.scores(e)) for e in expert_ids] + [("any expert (oracle)", StageEval.oracle)]
    for name, scores in rows:
        gain = paired_bootstrap([(scores(by_label[gain_to]), scores(by_label[gain_from]))])
        gains[name if name in expert_ids else "any"] = gain
        lines.append(f"| {name} | " + " | ".join(_cell(scores(ev)) for ev in evals) + f" | {gain.signed()} |")
    return lines, gains


def _sum(rows: Sequence[dict], key: str) -> float:
    return sum(float(r.get(key, 0.0)) for r in rows)


def meml_parts_lines(riel_run: Path) -> list[str]:
    """Mutual-learning pairs formed and trained on, hard examples admitted, replayed and retired, over RIEL."""
    steps = [r for r in read_metrics(riel_run) if r.get("stage") == "train"]
    if not steps:
        return []
    formed, trained = _sum(steps, "rollout/mutual_pairs"), _sum(steps, "train/mutual_active_pairs")
    lines = [f"- RIEL steps: {len(steps)}; sampled reward per step {min(r.get('reward/mean', 0) for r in steps):.2f}"
             f"-{max(r.get('reward/mean', 0) for r in steps):.2f}; groups with all-equal rewards "
             f"{_mean(steps, 'train/adv_zero_group_frac'):.0%} on average.",
             f"- Mutual learning: {formed:.0f} pairs formed (a weak expert shown a stronger expert's correct answer), "
             f"{trained:.0f} trained on (the others failed the plausibility gate, algo.mutual_min_student_logprob)."]
    last = steps[-1]
    if "hard/admissions_total" in last:
        solved, spent = last.get("hard/retired_solved_total", 0.0), last.get("hard/retired_max_replays_total", 0.0)
        batches = sum(1 for r in steps if r.get("hard/replays", 0.0) > 0)
        lines.append(f"- Hard examples: {last['hard/admissions_total']:.0f} admitted, "
                     f"{last.get('hard/replays_total', 0):.0f} replays in {batches} SFT batches, {solved + spent:.0f} retired ({solved:.0f} solved, "
                     f"{spent:.0f} after their last replay); {last.get('hard/size', 0):.0f} in the store at the end.")
    return lines


def _mean(rows: Sequence[dict], key: str) -> float:
    vals = [float(r[key]) for r in rows if key in r]
    return sum(vals) / len(vals) if vals else math.nan


def style_lines(evals: Sequence[StageEval], expert_ids: Sequence[str], styles: dict[str, str]) -> list[str]:
    """Per stage: each styled expert's share of answers in its own style, and the answer agreement."""
    if not styles:
        return []
    out = []
    for ev in evals:
        bench = next((k.split("/")[1] for k in ev.metrics if k.endswith("/answer_agreement")), None)
        if bench is None:
            continue
        parts = [f"{e} {ev.metrics.get(f'eval/{bench}/{e}/style_{styles[e]}', math.nan):.2f}"
                 for e in expert_ids if e in styles]
        out.append(f"- {ev.point.label}: own style {', '.join(parts)}; all experts give the same answer on "
                   f"{ev.metrics[f'eval/{bench}/answer_agreement']:.2f} of the problems.")
    return ["Styles (experts.styles: " + ", ".join(f"{e} {s}" for e, s in styles.items()) + "):", *out] if out else []


def pipeline_summary(evals: Sequence[EvalPoint], expert_ids: Sequence[str], *, riel_run: Path,
                     stage_seconds: dict[str, float], styles: Optional[dict[str, str]] = None,
                     where: Sequence[str] = ()) -> str:
    """The markdown summary of a base -> MEF -> RIEL pipeline (the evaluations on the same held-out problems)."""
    read = [read_stage_eval(p) for p in evals]
    n = len(read[0].problems)
    first, last = read[-2].point.label if len(read) > 1 else read[0].point.label, read[-1].point.label
    table, gains = accuracy_section(read, expert_ids, gain_from=first, gain_to=last)
    final = read[-1]
    best = max(expert_ids, key=lambda e: sum(final.scores(e)))
    g = gains[best]
    verdict = "above" if g.low > 0 else ("below" if g.high < 0 else "not distinguishable from")
    lines = [f"## Summary: {n} held-out problems, greedy accuracy [95% interval]", "", *table, "",
             f"Best expert {last}: **{best}**, {_cell(final.scores(best))}: {g.signed()} against {first}, {verdict} "
             f"its {first} accuracy at 95% (paired bootstrap over the {n} problems; the best expert is picked on "
             "these same problems).", ""]
    parts = meml_parts_lines(riel_run)
    if parts:
        lines += ["What MEML's parts did during RIEL:", *parts, ""]
    st = style_lines(read, expert_ids, styles or {})
    if st:
        lines += [*st, ""]
    if stage_seconds:
        total = sum(stage_seconds.values())
        lines += ["| stage | seconds |", "| --- | --- |"]
        lines += [f"| {name} | {sec:.0f} |" for name, sec in stage_seconds.items()]
        lines += [f"| total | {total:.0f} ({total / 60:.1f} min) |", ""]
    lines += list(where)
    return "\n".join(lines).rstrip() + "\n"
