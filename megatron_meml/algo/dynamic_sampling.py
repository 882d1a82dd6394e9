"""DAPO's dynamic sampling, for sparse rewards: drop the questions whose rewards are all equal, refill the batch.

A question whose samples are all right or all wrong gives every response the same advantage (zero after
centring), so it adds tokens to the normaliser and nothing to the gradient. Dynamic sampling draws further
batches of questions until ``problems_per_step`` informative ones are found or ``algo.dynamic_sampling_max_gen_batches``
batches were generated, as NeMo-RL (``use_dynamic_sampling``), verl (``filter_groups``) and Megatron-LM RL
(``--grpo-filter-groups-with-same-reward``) do.

The unit is the question with its K expert groups, not one expert's group: MEML's signal is across experts. A
question that expert A always solves and expert B never does has all-equal rewards inside each group, yet it is the
most informative kind: it gives mutual-learning pairs (A teaches B) and, under the pooled advantage, non-zero
advantages. With K = 1 (plain GRPO, DAPO itself) the two units coincide. Equality is judged on the verifier's
rewards (correctness), not on shaped rewards, as DAPO filters on accuracy.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from megatron_meml.types import ExpertGroup


class DynamicSamplingExhausted(RuntimeError):
    """Too few informative questions within the generation budget (``dynamic_sampling_on_exhausted=error``)."""


def question_groups(groups: list[ExpertGroup], num_experts: int) -> list[list[ExpertGroup]]:
    """Groups (question-major, K experts each, as ``ExpertSet.expand`` orders them) per question."""
    if len(groups) % num_experts:
        raise ValueError(f"{len(groups)} expert groups are not a whole number of questions x {num_experts} experts")
    return [groups[i:i + num_experts] for i in range(0, len(groups), num_experts)]


def informative(question: list[ExpertGroup]) -> bool:
    """Not every reward of the question's K x G samples equal."""
    rewards = [r for g in question for r in g.rewards]
    return bool(rewards) and max(rewards) != min(rewards)


@dataclass(kw_only=True)
class DynamicBatch:
    """What a step trains on, and everything it generated."""

    kept: list[ExpertGroup]
    """The groups of the first ``wanted`` informative questions, in draw order (question-major)."""
    generated: list[ExpertGroup]
    """Every group generated this step, informative or not: mutual-learning pairs, hard-example admissions and the
    rollout metrics see all of them."""
    gen_batches: int = 1
    """Generation batches drawn (1: no refill)."""
    filtered: int = 0
    """Questions dropped for all-equal rewards."""
    shortfall: int = 0
    """Informative questions missing from a full batch when the budget ran out."""
    surplus: list[ExpertGroup] = field(default_factory=list)
    """Informative questions' groups beyond ``wanted`` (generated, not trained on the GRPO term)."""

    num_experts: int = 1

    def metrics(self) -> dict[str, float]:
        return {"rollout/gen_batches": float(self.gen_batches), "rollout/filtered_groups": float(self.filtered),
                "rollout/ds_shortfall": float(self.shortfall),
                "rollout/informative_questions": float(len(self.kept) // self.num_experts)}


def collect(first: list[ExpertGroup], draw: Callable[[int], list[ExpertGroup]], *, num_experts: int, wanted: int,
            max_gen_batches: int, on_exhausted: str) -> DynamicBatch:
    """Keep the informative questions of ``first``; while fewer than ``wanted`` and fewer than ``max_gen_batches``
    batches were drawn, call ``draw(j)`` (the j-th refill, j >= 1) for another batch of groups. ``on_exhausted``:
    ``train`` (train on what there is, report the shortfall) or ``error`` (raise DynamicSamplingExhausted, the
    behaviour of NeMo-RL, verl and SkyRL)."""
    generated, kept, surplus, filtered, batches = [], [], [], 0, 0
    batch = first
    while True:
        batches += 1
        generated += batch
        for q in question_groups(batch, num_experts):
            if not informative(q):
                filtered += 1
            elif len(kept) < wanted * num_experts:
                kept += q
            else:
                surplus += q
        if len(kept) >= wanted * num_experts or batches >= max_gen_batches:
            break
        batch = draw(batches)
    shortfall = wanted - len(kept) // num_experts
    if shortfall and on_exhausted == "error":
        raise DynamicSamplingExhausted(
            f"dynamic sampling: {len(kept) // num_experts} of {wanted} questions had informative rewards after "
            f"{batches} generation batches (algo.dynamic_sampling_max_gen_batches={max_gen_batches}); raise it, "
            "or set algo.dynamic_sampling_on_exhausted=train to train on the questions there are")
    return DynamicBatch(kept=kept, generated=generated, gen_batches=batches, filtered=filtered,
                        shortfall=shortfall, surplus=surplus, num_experts=num_experts)
