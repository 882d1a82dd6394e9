"""Data that crosses module boundaries. Shapes are given as [B, T] etc.; B = rows, T = padded length."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch

KINDS = ("math", "choice", "bool")
"""Problem kinds: a number, an option letter, yes/no."""
ANSWER_FORMATS = ("boxed", "the_answer_is", "hash")
"""How an expert writes its final answer (experts.answer_format): \\boxed{X}, "The answer is X.", #### X."""


@dataclass(frozen=True, kw_only=True)
class Problem:
    """One question with its verifiable gold answer."""

    id: str
    """Stable id (source + index or the dataset's own id)."""
    question: str
    """The question text shown to the model."""
    answer: str
    """Canonical gold answer: a number/expression (math), an option letter (choice), 'yes'/'no' (bool)."""
    solution: str = ""
    """Gold reasoning text (SFT target for the ground-truth expert and the hard-example store)."""
    kind: str = "math"
    """math | choice | bool."""
    options: tuple[tuple[str, str], ...] = ()
    """Choice problems: ((letter, value), ...)."""
    source: str = ""
    """Where it came from (gsm8k, mathqa, strategyqa, jsonl:<file>, synthetic)."""
    meta: dict[str, Any] = field(default_factory=dict)
    """Anything else (level, per-style solutions for synthetic problems, ...)."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Problem.kind must be one of {KINDS}, got '{self.kind}'")


@dataclass(frozen=True, kw_only=True)
class ProblemSplits:
    """A run's problems in three disjoint parts."""

    train: list[Problem]
    """What RL samples from and MEF learns."""
    test: list[Problem]
    """The held-out problems every accuracy is reported on."""
    dev: list[Problem] = field(default_factory=list)
    """Validation problems (``data.dev_size``; empty by default): for choices such as which expert to read out, so
    that the test problems are not used to make them."""


@dataclass(frozen=True, kw_only=True)
class Completion:
    """One sampled response from the rollout engine."""

    prompt_ids: list[int]
    """Prompt token ids [P]."""
    token_ids: list[int]
    """Response token ids [R] (EOS included when generated)."""
    text: str
    """Decoded response."""
    logprobs: list[float]
    """Per-token sampling log-probs [R] from the engine."""
    finish_reason: str
    """stop | length."""
    policy_version: int = 0
    """Version of the weights that sampled it: the optimizer steps applied to them (``rollout.max_staleness``)."""


@dataclass(kw_only=True)
class ExpertGroup:
    """The G responses of one expert to one problem, with rewards."""

    problem: Problem
    expert: int
    """Expert index into the active expert list."""
    completions: list[Completion]
    rewards: list[float]
    """[G] verifier rewards in [0, 1]."""

    @property
    def mean_reward(self) -> float:
        return sum(self.rewards) / max(len(self.rewards), 1)

    @property
    def num_wrong(self) -> int:
        return sum(1 for r in self.rewards if r <= 0.0)


@dataclass(kw_only=True)
class TrainBatch:
    """Rows for one train step; all tensors are [B, T] (right-padded) unless stated.

    Row kinds: 0 = GRPO (policy gradient on a sampled response), 1 = mutual-learning student (P- branch),
    2 = mutual-learning teacher (P+ branch; no gradient), 3 = SFT (hard example / MEF).
    Teacher/student rows of one pair share ``pair_id`` and the same response tokens.
    """

    tokens: torch.Tensor
    """[B, T] int64 input ids (prompt + response)."""
    loss_mask: torch.Tensor
    """[B, T] float: 1 on positions whose *next* token is a response token to score."""
    row_kind: torch.Tensor
    """[B] int64 row kind (see class doc)."""
    advantages: torch.Tensor
    """[B] float: a GRPO row's advantage; a STUDENT row's scheduled pair weight (1 without a lambda1 warm-up);
    0 elsewhere."""
    old_logprobs: Optional[torch.Tensor] = None
    """[B, T] float log-probs of the labels under the behaviour policy (trainer recompute), aligned with loss_mask."""
    rollout_logprobs: Optional[torch.Tensor] = None
    """[B, T] float log-probs of the labels from the rollout engine (for the TIS correction / mismatch)."""
    ref_logprobs: Optional[torch.Tensor] = None
    """[B, T] float reference-policy log-probs (KL-to-reference)."""
    pair_id: Optional[torch.Tensor] = None
    """[B] int64 mutual-learning pair id (-1 when not a pair row)."""
    position_ids: Optional[torch.Tensor] = None
    """[B, T] int64 positions (None: 0..T-1)."""
    pg_norm_extra: float = 0.0
    """This rank's share of the policy loss's normaliser from GRPO rows left out of the batch because their loss
    and gradient are exactly 0 (advantage 0 under the clipped loss without reference KL; advantage <= 0 under
    paper_pg with algo.pg_normaliser=all): their scored tokens (token_mean) or their count (per-sequence
    aggregations). Metrics other than the loss average over the rows present."""
    pg_norm_fallback: float = 0.0
    """This rank's share of every response generated in the step (tokens or count, like ``pg_norm_extra``): what
    the auxiliary terms divide by under algo.aux_normaliser=policy when the step has no GRPO row at all (e.g.
    dynamic sampling kept no question)."""

    @property
    def num_rows(self) -> int:
        return int(self.tokens.shape[0])
