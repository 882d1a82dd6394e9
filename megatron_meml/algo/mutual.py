"""Inter-expert mutual-learning pair selection (DESIGN.md, RIEL step 4): pure, per question."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from megatron_meml.types import Completion, ExpertGroup, Problem


@dataclass(frozen=True, kw_only=True)
class MutualPair:
    """The weak expert E- learns the strong expert E+'s correct response O+ under its own prompt."""

    problem: Problem
    strong: int
    """E+: expert index with the highest mean reward."""
    weak: int
    """E-: expert index with the lowest mean reward."""
    response: Completion
    """O+: a correct response of E+ (its first, so the choice is deterministic)."""


def select_pairs(groups: Sequence[ExpertGroup], *, min_gap: float = 0.0) -> list[MutualPair]:
    """At most one pair per question: best vs worst expert by mean reward (ties: lowest index wins best, highest
    index wins worst), only when they differ by more than ``min_gap`` and E+ has a correct response."""
    by_problem: dict[str, list[ExpertGroup]] = {}
    for g in groups:
        by_problem.setdefault(g.problem.id, []).append(g)
    pairs = []
    for pid in sorted(by_problem, key=lambda k: [g.problem.id for g in groups].index(k)):
        gs = sorted(by_problem[pid], key=lambda g: g.expert)
        best = max(gs, key=lambda g: (g.mean_reward, -g.expert))
        worst = min(gs, key=lambda g: (g.mean_reward, -g.expert))
        if best.expert == worst.expert or best.mean_reward - worst.mean_reward <= min_gap:
            continue
        correct = [c for c, r in zip(best.completions, best.rewards) if r > 0]
        if correct:
            pairs.append(MutualPair(problem=best.problem, strong=best.expert, weak=worst.expert,
                                    response=correct[0]))
    return pairs
