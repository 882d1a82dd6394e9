"""The premise of MEML, measured: do K expert prompts find a correct answer on more questions than one prompt
does with the same number of samples? A question whose G samples are all wrong gives GRPO no signal; coverage is
the fraction of questions with at least one correct sample.

For each question, every expert draws K x G samples at the rollout temperature. ``K experts x G`` takes the first G
of each expert's; ``one expert x K·G`` takes all K x G of one expert: the same number of samples per question.
``eval.coverage_samples`` (G) turns it on in ``meml eval``, on the evaluated problems."""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

from megatron_meml.reporting.stats import Interval
from megatron_meml.rewards import score
from megatron_meml.rollout.backend import SamplingSpec
from megatron_meml.types import Problem


@dataclass(frozen=True)
class Coverage:
    """Coverage at equal samples per question."""

    k_experts: float
    """K experts x G samples each."""
    one_expert: dict[str, float]
    """Expert id -> that expert alone with K x G samples."""
    ratio_best: Interval
    """k_experts / the best single expert's coverage, with a 95% bootstrap interval over questions."""
    ratio_first: Interval
    """k_experts / the first expert's (the dataset-style expert: plain GRPO's prompt)."""

    @property
    def best(self) -> str:
        return max(self.one_expert, key=lambda e: self.one_expert[e])

    def metrics(self) -> dict[str, float]:
        m = {"eval/coverage/k_experts": self.k_experts, "eval/coverage/ratio_best": self.ratio_best.value,
             "eval/coverage/ratio_best_low": self.ratio_best.low, "eval/coverage/ratio_best_high":
             self.ratio_best.high, "eval/coverage/ratio_first": self.ratio_first.value}
        m.update({f"eval/coverage/one_expert/{e}": v for e, v in self.one_expert.items()})
        return m


def _ratio(num: Sequence[float], den: Sequence[float], *, resamples: int, seed: int) -> Interval:
    """sum(num) / sum(den) over questions, with a percentile bootstrap interval (questions resampled)."""
    def r(a: Sequence[float], b: Sequence[float]) -> float:
        return sum(a) / sum(b) if sum(b) > 0 else float("inf") if sum(a) > 0 else 1.0

    rng = random.Random(seed)
    n = len(num)
    stats = []
    for _ in range(resamples):
        idx = [rng.randrange(n) for _ in range(n)]
        stats.append(r([num[i] for i in idx], [den[i] for i in idx]))
    stats.sort()
    lo, hi = stats[int(0.025 * (resamples - 1))], stats[int(0.975 * (resamples - 1))]
    return Interval(r(num, den), lo, hi)


def coverage_from_rewards(rewards: Sequence[Sequence[Sequence[float]]], expert_ids: Sequence[str], g: int, *,
                          resamples: int = 2000, seed: int = 0) -> Coverage:
    """``rewards[e][q]``: expert e's K x G sample rewards on question q (K = len(expert_ids)). Pure."""
    k = len(expert_ids)
    if any(len(r) != k * g for per in rewards for r in per):
        raise ValueError(f"coverage: every expert needs K x G = {k * g} samples per question")
    n = len(rewards[0])
    mixed = [1.0 if any(max(rewards[e][q][:g]) > 0 for e in range(k)) else 0.0 for q in range(n)]
    alone = {eid: [1.0 if max(rewards[e][q]) > 0 else 0.0 for q in range(n)] for e, eid in enumerate(expert_ids)}
    best = max(alone, key=lambda e: sum(alone[e]))
    return Coverage(k_experts=sum(mixed) / n, one_expert={e: sum(v) / n for e, v in alone.items()},
                    ratio_best=_ratio(mixed, alone[best], resamples=resamples, seed=seed),
                    ratio_first=_ratio(mixed, alone[expert_ids[0]], resamples=resamples, seed=seed))


def sample_coverage(rollout, experts, problems: Sequence[Problem], cfg, g: int) -> Coverage:
    """Collective: K x G samples per (question, expert) at rollout.temperature, scored by the verifier."""
    k = len(experts)
    prompts = [experts.prompt_ids(e, p) for e in range(k) for p in problems]
    spec = SamplingSpec(n=k * g, temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                        max_tokens=cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens, seed=cfg.seed + 104729)
    outs = rollout.generate(prompts, spec)
    n, fmt = len(problems), cfg.experts.answer_format
    per = k * g
    rewards = [[[score(p, o.text, fmt, cfg.reward).reward for o in outs[(e * n + i) * per:(e * n + i + 1) * per]]
                for i, p in enumerate(problems)] for e in range(k)]
    return coverage_from_rewards(rewards, experts.ids, g, seed=cfg.seed)


def coverage_line(c: Coverage, k: int, g: int, n: int) -> str:
    alone = ", ".join(f"{e} {v:.3f}" for e, v in c.one_expert.items())
    return (f"[eval] coverage on {n} questions, {k * g} samples each: {k} experts x {g} {c.k_experts:.3f}; one expert x "
            f"{k * g}: {alone}\n[eval] coverage K-experts/1-expert ratio {c.ratio_best.value:.3f} "
            f"[{c.ratio_best.low:.3f}, {c.ratio_best.high:.3f}] (against the best single expert, {c.best}; against "
            f"the first expert {c.ratio_first.value:.3f})")
