"""Evaluation: greedy exact-match accuracy per expert prompt (and with no expert prompt), plus pass@k, and two
read-outs that tell answer-format compliance from skill: the format rate (an answer in the required format) and,
for math, the last-number accuracy (the completion's last number against the gold answer, whatever its format).
The dev problems (``data.dev_size``), when a run has them, get greedy accuracy per expert (``eval/dev/...``)."""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from megatron_meml.config import MemlConfig
from megatron_meml.data import wordmath
from megatron_meml.errors import RunError
from megatron_meml.reporting.metrics import reduce_across_ranks
from megatron_meml.reporting.samples import GreedyResult, record_eval
from megatron_meml.rewards import answer_in_format, score, score_last_number
from megatron_meml.rollout.backend import SamplingSpec
from megatron_meml.stages.context import RunContext, close_run, setup_run
from megatron_meml.stages.coverage import coverage_line, sample_coverage
from megatron_meml.types import Completion, Problem


@dataclass(frozen=True)
class StyleReader:
    """A task family's gold-work styles and how to tell which one a completion is written in."""

    names: tuple[str, ...]
    detect: Callable[[str], Optional[str]]


STYLE_READERS = {"wordmath": StyleReader(names=tuple(wordmath.STYLES), detect=wordmath.detect_style)}
"""Task families whose gold work comes in several styles (experts.styles): evaluation reports each expert's
style rates."""


def read_out(problem: Problem, completion: Completion, answer_format: str, cfg: Any) -> GreedyResult:
    """Score one greedy completion three ways (``cfg``: RewardConfig). Pure."""
    text = completion.text
    return GreedyResult(completion=completion, score=score(problem, text, answer_format, cfg),
                        in_format=answer_in_format(text, answer_format, cfg.tail_chars),
                        last_number=score_last_number(problem, text, cfg) if problem.kind == "math" else None)


def accuracy_metrics(problems: Sequence[Problem], expert_ids: list[str], greedy: list[list[float]],
                     sampled: list[list[list[float]]] | None, bench: str) -> dict[str, float]:
    """``eval/<bench>/<expert>/accuracy`` (and ``pass@k``, ``best_expert/accuracy``): greedy[e][i] = reward of expert
    e's greedy answer to problem i; sampled[e][i] = rewards of its k samples."""
    m: dict[str, float] = {}
    for e, eid in enumerate(expert_ids):
        m[f"eval/{bench}/{eid}/accuracy"] = sum(greedy[e]) / max(len(problems), 1)
        if sampled is not None:
            k = len(sampled[e][0]) if sampled[e] else 0
            m[f"eval/{bench}/{eid}/pass@{k}"] = sum(1.0 for s in sampled[e] if max(s) > 0) / max(len(problems), 1)
    best = max(range(len(expert_ids)), key=lambda e: sum(greedy[e]))
    m[f"eval/{bench}/best_expert/accuracy"] = sum(greedy[best]) / max(len(problems), 1)
    return m


def readout_metrics(expert_ids: list[str], results: list[list[GreedyResult]], bench: str,
                    styles: Optional[StyleReader] = None) -> dict[str, float]:
    """results[e][i] = expert e's greedy read-outs on problem i. ``eval/<bench>/<expert>/format_rate``: fraction
    with an answer in the required format; ``.../last_number_accuracy``: fraction of the math problems whose last
    number is the gold answer (absent without math problems); ``.../style_<name>``: fraction written in each of
    the family's gold-work styles (with ``styles``); ``eval/<bench>/answer_agreement`` (several experts): fraction of
    problems on which every expert found the same answer."""
    m: dict[str, float] = {}
    for eid, mine in zip(expert_ids, results):
        m[f"eval/{bench}/{eid}/format_rate"] = sum(r.in_format for r in mine) / max(len(mine), 1)
        math = [r.last_number.reward for r in mine if r.last_number is not None]
        if math:
            m[f"eval/{bench}/{eid}/last_number_accuracy"] = sum(math) / len(math)
        if styles is not None:
            found = [styles.detect(r.completion.text) for r in mine]
            for name in styles.names:
                m[f"eval/{bench}/{eid}/style_{name}"] = found.count(name) / max(len(found), 1)
    if len(results) > 1 and results[0]:  # (with several experts)
        answers = [{r[i].score.extracted for r in results} for i in range(len(results[0]))]
        m[f"eval/{bench}/answer_agreement"] = sum(len(a) == 1 and None not in a for a in answers) / len(answers)
    return m


def _greedy(ctx: RunContext, problems: Sequence[Problem]) -> list[list[GreedyResult]]:
    """results[e][i]: expert e's greedy read-outs on problems[i]; every expert's prompts in one generation (the
    engine batches them together)."""
    fmt, cfg, n = ctx.cfg.experts.answer_format, ctx.cfg, len(problems)
    prompts = [ctx.experts.prompt_ids(e, p) for e in range(len(ctx.experts)) for p in problems]
    budget = cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens
    outs = ctx.rollout.generate(prompts, SamplingSpec(n=1, temperature=0.0, max_tokens=budget))
    return [[read_out(p, o, fmt, cfg.reward) for p, o in zip(problems, outs[e * n:(e + 1) * n])]
            for e in range(len(ctx.experts))]


def _sampled(ctx: RunContext, problems: Sequence[Problem], k: int, step: int) -> list[list[list[float]]]:
    """rewards[e][i]: the rewards of expert e's k samples at temperature 1 on problems[i] (for pass@k)."""
    cfg, n = ctx.cfg, len(problems)
    prompts = [ctx.experts.prompt_ids(e, p) for e in range(len(ctx.experts)) for p in problems]
    outs = ctx.rollout.generate(prompts, SamplingSpec(n=k, temperature=1.0, seed=cfg.seed + 7919 * step,
                                                      max_tokens=cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens))
    return [[[score(p, o.text, cfg.experts.answer_format, cfg.reward).reward
              for o in outs[(e * n + i) * k:(e * n + i + 1) * k]] for i, p in enumerate(problems)]
            for e in range(len(ctx.experts))]


def evaluate(ctx: RunContext, step: int) -> dict[str, float]:
    """Collective: greedy (and pass@k) on the held-out test problems through the rollout engine, and greedy on the
    dev problems when the run has any (``eval/dev/<expert>/accuracy``); logged as stage eval. Also writes
    <run_dir>/eval/step_<step>.jsonl (per-problem greedy rewards; step_<step>.dev.jsonl for the dev problems) and
    the step's samples."""
    cfg, ids = ctx.cfg, ctx.experts.ids
    problems = ctx.eval_problems[: cfg.eval.max_problems or None] or ctx.train_problems[: cfg.eval.max_problems]
    shard, dev = problems[ctx.dp_rank::ctx.dp_size], ctx.dev_problems[ctx.dp_rank::ctx.dp_size]
    t0 = time.perf_counter()
    both = _greedy(ctx, [*shard, *dev])  # one generation for test and dev
    results, dev_results = [r[: len(shard)] for r in both], [r[len(shard):] for r in both]
    sampled = _sampled(ctx, shard, cfg.eval.pass_k, step) if cfg.eval.pass_k else None
    bench = cfg.data.source
    greedy = [[r.score.reward for r in mine] for mine in results]
    metrics = {"eval/num_problems": float(len(shard))} | accuracy_metrics(shard, ids, greedy, sampled, bench)
    if ctx.dev_problems:
        dev_greedy = [[r.score.reward for r in mine] for mine in dev_results]
        metrics |= {"eval/num_dev_problems": float(len(dev))} | accuracy_metrics(dev, ids, dev_greedy, None, "dev")
    styles = STYLE_READERS.get(bench)
    metrics = metrics | readout_metrics(ids, results, bench, styles)
    metrics["timing/eval"] = time.perf_counter() - t0
    metrics = reduce_across_ranks(metrics)
    ctx.logger.log(step, metrics, stage="eval")
    record_eval(ctx, step, bench, shard, results)
    if ctx.dev_problems:
        record_eval(ctx, step, bench, dev, dev_results, split="dev")
    if ctx.is_writer:
        cols = [f"{eid}={metrics[f'eval/{bench}/{eid}/accuracy']:.3f}" for eid in ids]
        dev_cols = [f"{eid}={metrics[f'eval/dev/{eid}/accuracy']:.3f}" for eid in ids] if ctx.dev_problems else []
        print(f"[eval] step {step} {bench} greedy accuracy on {metrics['eval/num_problems']:.0f} problems: "
              + " ".join(cols) + (" | dev: " + " ".join(dev_cols) if dev_cols else "")
              + f" ({metrics['timing/eval']:.0f} s)", flush=True)
    return metrics


def run_eval(cfg: MemlConfig, checkpoint: Optional[str]) -> dict[str, float]:
    """Collective: greedy accuracy (and pass@k) per expert of a model (``checkpoint``, else model.megatron_path,
    else model.hf_path)."""
    if checkpoint:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, megatron_path=checkpoint))
    ctx = setup_run(cfg, "eval").with_rollout()
    metrics = evaluate(ctx, 0)
    g = cfg.eval.coverage_samples
    if g:
        if ctx.dp_size > 1:
            raise RunError("eval.coverage_samples runs in one data-parallel replica; run meml eval without DP")
        problems = ctx.eval_problems[: cfg.eval.max_problems or None]
        cov = sample_coverage(ctx.rollout, ctx.experts, problems, cfg, g)
        ctx.logger.log(0, cov.metrics(), stage="eval")
        metrics |= cov.metrics()
        if ctx.is_writer:
            print(coverage_line(cov, len(ctx.experts), g, len(problems)), flush=True)
    close_run(ctx)
    return metrics
