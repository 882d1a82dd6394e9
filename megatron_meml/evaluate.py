"""Evaluation: greedy exact-match accuracy per expert prompt (and with no expert prompt), plus pass@k."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from megatron_meml.types import Problem


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


def evaluate(ctx: Any, step: int) -> dict[str, float]:
    """Collective: greedy (and pass@k) on the held-out problems through the rollout engine; logged as stage eval."""
    from megatron_meml.rewards.score import score
    from megatron_meml.rollout.backend import SamplingSpec

    cfg = ctx.cfg
    problems = ctx.eval_problems[: cfg.eval.max_problems or None] or ctx.train_problems[: cfg.eval.max_problems]
    shard = problems[ctx.dp_rank::ctx.dp_size]
    experts = ctx.experts
    budget = cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens
    greedy, sampled = [], [] if cfg.eval.pass_k else None
    for e in range(len(experts)):
        prompts = [experts.prompt_ids(e, p) for p in shard]
        outs = ctx.rollout.generate(prompts, SamplingSpec(n=1, temperature=0.0, max_tokens=budget))
        greedy.append([score(p, o.text, cfg.experts.answer_format, cfg.reward).reward for p, o in zip(shard, outs)])
        if sampled is not None:
            k = cfg.eval.pass_k
            outs = ctx.rollout.generate(prompts, SamplingSpec(n=k, temperature=1.0, max_tokens=budget,
                                                              seed=cfg.seed + 7919 * step))
            sampled.append([[score(p, o.text, cfg.experts.answer_format, cfg.reward).reward
                             for o in outs[i * k:(i + 1) * k]] for i, p in enumerate(shard)])
    bench = cfg.data.source
    from megatron_meml.metrics import reduce_across_ranks

    metrics = reduce_across_ranks(accuracy_metrics(shard, experts.ids, greedy, sampled, bench))
    ctx.logger.log(step, metrics, stage="eval")
    if ctx.is_writer:
        cols = [f"{eid}={metrics[f'eval/{bench}/{eid}/accuracy']:.3f}" for eid in experts.ids]
        print(f"[eval] step {step} {bench} greedy accuracy: " + " ".join(cols), flush=True)
    return metrics
