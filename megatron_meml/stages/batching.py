"""Rows of a TrainBatch from rollouts, mutual-learning pairs and SFT examples; padding to [B, T]."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from megatron_meml.algo.mutual import MutualPair
from megatron_meml.experts.expert_set import ExpertSet, SFTExample
from megatron_meml.training.forward_step import GRPO, SFT, STUDENT, TEACHER
from megatron_meml.types import Completion, ExpertGroup, TrainBatch


@dataclass(frozen=True, kw_only=True)
class Row:
    """One sequence to train on; lists are [T_row]; loss_mask[t] = 1 where tokens[t + 1] is scored."""

    tokens: list[int]
    loss_mask: list[float]
    kind: int
    advantage: float = 0.0
    rollout_logprobs: Optional[list[float]] = None
    """Engine log-probs aligned with loss_mask (0 where unscored)."""
    pair: int = -1


def completion_row(c: Completion, *, kind: int = GRPO, advantage: float = 0.0, prompt: Optional[list[int]] = None,
                   pair: int = -1, with_logprobs: bool = True) -> Row:
    """prompt + response; scored positions p-1 .. p+r-2 (each predicts a response token)."""
    p_ids = list(prompt if prompt is not None else c.prompt_ids)
    tokens = p_ids + list(c.token_ids)
    p, r = len(p_ids), len(c.token_ids)
    mask = [0.0] * len(tokens)
    lps = [0.0] * len(tokens) if with_logprobs else None
    for i in range(r):
        mask[p - 1 + i] = 1.0
        if lps is not None:
            lps[p - 1 + i] = c.logprobs[i]
    return Row(tokens=tokens, loss_mask=mask, kind=kind, advantage=advantage, rollout_logprobs=lps, pair=pair)


def grpo_rows(groups: Sequence[ExpertGroup], advantages: torch.Tensor, *, positive_only: bool,
              skip_zero: bool = False) -> list[Row]:
    """One row per sampled response; with positive_only (the paper's loss) rows with A <= 0 are left out, since
    they contribute exactly zero; with skip_zero rows whose A is exactly 0 are left out (their share of the loss's
    normaliser is ``zero_advantage_share``)."""
    rows = []
    for g, adv in zip(groups, advantages.tolist()):
        for c, a in zip(g.completions, adv):
            if (positive_only and a <= 0) or (skip_zero and a == 0.0):
                continue
            if c.token_ids:
                rows.append(completion_row(c, advantage=float(a)))
    return rows


def zero_advantage_share(groups: Sequence[ExpertGroup], advantages: torch.Tensor, aggregation: str) -> float:
    """What the GRPO rows with A exactly 0 add to the policy loss's normaliser: their scored tokens (token_mean)
    or their count (the per-sequence aggregations). With the clipped loss and no reference KL such a row's loss
    and gradient are exactly 0, so leaving it out of the batch while keeping this share in the normaliser
    (``TrainBatch.pg_norm_extra``) gives the same step for less compute."""
    share = 0.0
    for g, adv in zip(groups, advantages.tolist()):
        for c, a in zip(g.completions, adv):
            if a == 0.0 and c.token_ids:
                share += float(len(c.token_ids)) if aggregation == "token_mean" else 1.0
    return share


def pair_rows(pairs: Sequence[MutualPair], experts: ExpertSet, *, weight: float = 1.0) -> list[Row]:
    """Student (P-, Q, O+) and teacher (P+, Q, O+) rows per pair, sharing a pair id; the student row carries the
    pair's scheduled weight (``mutual_weight``) in its advantage slot."""
    rows = []
    for i, pr in enumerate(pairs):
        student = experts.prompt_ids(pr.weak, pr.problem)
        rows.append(completion_row(pr.response, kind=STUDENT, advantage=weight, prompt=student, pair=i,
                                   with_logprobs=False))
        rows.append(completion_row(pr.response, kind=TEACHER, pair=i, with_logprobs=False))
    return rows


def mutual_weight(step: int, warmup_steps: int) -> float:
    """lambda1's warm-up factor at RIEL step ``step`` (1-based): step / warmup_steps, capped at 1."""
    return 1.0 if warmup_steps <= 0 else min(1.0, step / warmup_steps)


def sft_rows(examples: Sequence[SFTExample]) -> list[Row]:
    return [Row(tokens=list(e.tokens), loss_mask=list(e.loss_mask), kind=SFT) for e in examples]


def to_train_batch(rows: Sequence[Row], pad_id: int, *, max_len: Optional[int] = None,
                   pg_norm_extra: float = 0.0) -> TrainBatch:
    """Right-padded [B, T] TrainBatch, rows shortest first; an empty list gives one all-masked padding row (ranks
    must still step). ``pg_norm_extra``: the policy-loss normaliser's share of GRPO rows left out
    (``zero_advantage_share``)."""
    # Rows sorted by length (stable): micro-batches then hold similar lengths and are trimmed to them. The loss is a
    # sum over rows with global normalisers, so the order does not change the step's objective.
    rows = sorted(rows, key=lambda r: len(r.tokens)) or [Row(tokens=[pad_id, pad_id], loss_mask=[0.0, 0.0],
                                                              kind=GRPO)]
    t = max(len(r.tokens) for r in rows)
    if max_len is not None and t > max_len:
        raise ValueError(f"a training sequence has {t} tokens, more than the model's {max_len} positions; "
                         "lower rollout.max_new_tokens or shorten prompts")
    b = len(rows)
    tokens = torch.full((b, t), pad_id, dtype=torch.long)
    mask = torch.zeros(b, t)
    rollout = torch.zeros(b, t)
    for i, r in enumerate(rows):
        n = len(r.tokens)
        tokens[i, :n] = torch.tensor(r.tokens)
        mask[i, :n] = torch.tensor(r.loss_mask)
        if r.rollout_logprobs is not None:
            rollout[i, :n] = torch.tensor(r.rollout_logprobs)
    has_rollout = any(r.rollout_logprobs is not None for r in rows)
    return TrainBatch(tokens=tokens, loss_mask=mask, row_kind=torch.tensor([r.kind for r in rows]),
                      advantages=torch.tensor([r.advantage for r in rows], dtype=torch.float32),
                      rollout_logprobs=rollout if has_rollout else None,
                      pair_id=torch.tensor([r.pair for r in rows]), pg_norm_extra=float(pg_norm_extra))
