"""Evaluation: greedy exact-match accuracy per expert prompt (and with no expert prompt), plus pass@k, and two
read-outs that tell answer-format compliance from skill: the format rate (an answer in the required format) and,
for math, the last-number accuracy (the completion's last number against the gold answer, whatever its format)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

from megatron_meml.rewards import Score, answer_in_format, score, score_last_number
from megatron_meml.types import Completion, Problem


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """What evaluation measures."""

    max_problems: int = 200
    """Held-out problems evaluated (the first N of the held-out split; 0: all)."""
    pass_k: int = 4
    """Samples per problem for pass@k (temperature 1); 0 disables pass@k."""
    every: int = 0
    """Evaluate every N RIEL steps as well as at the end (0: only at the end)."""
    max_new_tokens: int = 0
    """Generation budget; 0: rollout.max_new_tokens."""

    def __post_init__(self) -> None:
        for name in ("max_problems", "pass_k", "every", "max_new_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"eval.{name} must be >= 0, got {getattr(self, name)}")


@dataclass(frozen=True, kw_only=True)
class GreedyResult:
    """One expert's greedy answer to one problem and its read-outs."""

    completion: Completion
    score: Score
    """The format-bound verifier's verdict (what accuracy counts)."""
    in_format: bool
    """An answer in the required format (experts.answer_format) was found."""
    last_number: Optional[Score] = None
    """The last number in the completion against the gold answer (math problems; else None)."""


def read_out(problem: Problem, completion: Completion, answer_format: str, cfg: Any) -> GreedyResult:
    """Score one greedy completion three ways (``cfg``: RewardConfig). Pure."""
    text = completion.text
    return GreedyResult(completion=completion, score=score(problem, text, answer_format, cfg),
                        in_format=answer_in_format(text, answer_format, cfg.tail_chars),
                        last_number=score_last_number(problem, text, cfg) if problem.kind == "math" else None)


def accuracy_metrics(problems: Sequence[Problem], expert_ids: list[str], greedy: list[list[float]],
                     sampled: list[list[list[float]]] | None, bench: str) -> dict[str, float]:
    """greedy[e][i] = reward of expert e's greedy answer to problem i; sampled[e][i] = rewards of its k samples."""
    m: dict[str, float] = {"eval/num_problems": float(len(problems))}
    for e, eid in enumerate(expert_ids):
        m[f"eval/{bench}/{eid}/accuracy"] = sum(greedy[e]) / max(len(problems), 1)
        if sampled is not None:
            k = len(sampled[e][0]) if sampled[e] else 0
            m[f"eval/{bench}/{eid}/pass@{k}"] = sum(1.0 for s in sampled[e] if max(s) > 0) / max(len(problems), 1)
    best = max(range(len(expert_ids)), key=lambda e: sum(greedy[e]))
    m[f"eval/{bench}/best_expert/accuracy"] = sum(greedy[best]) / max(len(problems), 1)
    return m


def readout_metrics(expert_ids: list[str], results: list[list[GreedyResult]], bench: str) -> dict[str, float]:
    """results[e][i] = expert e's greedy read-outs on problem i. ``eval/<bench>/<expert>/format_rate``: fraction
    with an answer in the required format; ``.../last_number_accuracy``: fraction of the math problems whose last
    number is the gold answer (absent without math problems)."""
    m: dict[str, float] = {}
    for eid, mine in zip(expert_ids, results):
        m[f"eval/{bench}/{eid}/format_rate"] = sum(r.in_format for r in mine) / max(len(mine), 1)
        math = [r.last_number.reward for r in mine if r.last_number is not None]
        if math:
            m[f"eval/{bench}/{eid}/last_number_accuracy"] = sum(math) / len(math)
    return m


def evaluate(ctx: Any, step: int) -> dict[str, float]:
    """Collective: greedy (and pass@k) on the held-out problems through the rollout engine; logged as stage eval.
    Also writes <run_dir>/eval/step_<step>.jsonl (per-problem greedy rewards) and the step's samples."""
    from megatron_meml.metrics import reduce_across_ranks
    from megatron_meml.rollout.backend import SamplingSpec
    from megatron_meml.samples import record_eval

    cfg = ctx.cfg
    problems = ctx.eval_problems[: cfg.eval.max_problems or None] or ctx.train_problems[: cfg.eval.max_problems]
    shard = problems[ctx.dp_rank::ctx.dp_size]
    experts, fmt = ctx.experts, cfg.experts.answer_format
    budget = cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens
    results, sampled = [], [] if cfg.eval.pass_k else None
    for e in range(len(experts)):
        prompts = [experts.prompt_ids(e, p) for p in shard]
        outs = ctx.rollout.generate(prompts, SamplingSpec(n=1, temperature=0.0, max_tokens=budget))
        results.append([read_out(p, o, fmt, cfg.reward) for p, o in zip(shard, outs)])
        if sampled is not None:
            k = cfg.eval.pass_k
            outs = ctx.rollout.generate(prompts, SamplingSpec(n=k, temperature=1.0, max_tokens=budget,
                                                              seed=cfg.seed + 7919 * step))
            sampled.append([[score(p, o.text, fmt, cfg.reward).reward
                             for o in outs[i * k:(i + 1) * k]] for i, p in enumerate(shard)])
    bench = cfg.data.source
    greedy = [[r.score.reward for r in mine] for mine in results]
    metrics = accuracy_metrics(shard, experts.ids, greedy, sampled, bench)
    metrics = reduce_across_ranks(metrics | readout_metrics(experts.ids, results, bench))
    ctx.logger.log(step, metrics, stage="eval")
    record_eval(ctx, step, bench, shard, results)
    if ctx.is_writer:
        cols = [f"{eid}={metrics[f'eval/{bench}/{eid}/accuracy']:.3f}" for eid in experts.ids]
        print(f"[eval] step {step} {bench} greedy accuracy: " + " ".join(cols), flush=True)
    return metrics
