"""Rows of a TrainBatch from rollouts, mutual-learning pairs and SFT examples; padding to [B, T]."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from megatron_meml.algo.config import AlgoConfig
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


def left_out(advantage: float, *, positive_only: bool, skip_zero: bool) -> bool:
    """Whether ``grpo_rows`` leaves a response with this advantage out of the batch (its loss is exactly 0)."""
    return (positive_only and advantage <= 0) or (skip_zero and advantage == 0.0)


def grpo_rows(groups: Sequence[ExpertGroup], advantages: torch.Tensor, *, positive_only: bool,
              skip_zero: bool = False) -> list[Row]:
    """One row per sampled response; with positive_only (the paper's loss) rows with A <= 0 are left out, since
    they contribute exactly zero; with skip_zero rows whose A is exactly 0 are left out (``left_out_share``: what
    they keep of the loss's normaliser)."""
    rows = []
    for g, adv in zip(groups, advantages.tolist()):
        for c, a in zip(g.completions, adv):
            if c.token_ids and not left_out(a, positive_only=positive_only, skip_zero=skip_zero):
                rows.append(completion_row(c, advantage=float(a)))
    return rows


def response_share(completions: Sequence[Completion], aggregation: str) -> float:
    """What these responses count in a policy normaliser: their scored tokens (token_mean) or, for the
    per-sequence aggregations, how many are non-empty (an empty response has no row)."""
    return sum(float(len(c.token_ids)) if aggregation == "token_mean" else 1.0 for c in completions if c.token_ids)


def left_out_share(groups: Sequence[ExpertGroup], advantages: torch.Tensor, aggregation: str, *,
                   positive_only: bool, skip_zero: bool) -> float:
    """What the GRPO rows that ``grpo_rows`` leaves out (same flags) add to the policy loss's normaliser. Such a
    row's loss and gradient are exactly 0, so leaving it out of the batch while keeping this share in the
    normaliser (``TrainBatch.pg_norm_extra``) gives the same step as training it, for less compute."""
    out = [c for g, adv in zip(groups, advantages.tolist()) for c, a in zip(g.completions, adv)
           if left_out(a, positive_only=positive_only, skip_zero=skip_zero)]
    return response_share(out, aggregation)


def policy_norm_shares(groups: Sequence[ExpertGroup], generated: Sequence[ExpertGroup], advantages: torch.Tensor,
                       algo: AlgoConfig, *, skip_zero: bool) -> tuple[float, float]:
    """This rank's (``TrainBatch.pg_norm_extra``, ``TrainBatch.pg_norm_fallback``) for GRPO rows built from
    ``groups`` (``advantages`` [groups, G]) by ``grpo_rows(positive_only=paper_pg, skip_zero=skip_zero)``: the
    left-out rows' share when they keep it (skip_zero; paper_pg with algo.pg_normaliser=all), and under
    algo.aux_normaliser=policy every ``generated`` response's share (the groups dynamic sampling dropped included)."""
    paper = algo.policy_loss == "paper_pg"
    keep = skip_zero or (paper and algo.pg_normaliser == "all")
    extra = left_out_share(groups, advantages, algo.aggregation, positive_only=paper, skip_zero=skip_zero) \
        if keep else 0.0
    fallback = (response_share([c for g in generated for c in g.completions], algo.aggregation)
                if algo.aux_normaliser == "policy" else 0.0)
    return extra, fallback


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
                   pg_norm_extra: float = 0.0, pg_norm_fallback: float = 0.0) -> TrainBatch:
    """Right-padded [B, T] TrainBatch, rows shortest first; an empty list gives one all-masked padding row (ranks
    must still step). ``pg_norm_extra``, ``pg_norm_fallback``: ``policy_norm_shares``."""
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
                      pair_id=torch.tensor([r.pair for r in rows]), pg_norm_extra=float(pg_norm_extra),
                      pg_norm_fallback=float(pg_norm_fallback))
