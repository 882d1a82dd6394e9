"""Group-relative advantages from verifier rewards.

Rewards arrive as [N_groups, G]: one row per (question, expert) group of G sampled responses. Every
variant gives exactly 0 (never NaN) for a group whose rewards are all equal: such a group carries no
learning signal, and floating-point means of equal values are not always equal to them.

- paper:  A = max(r - mean_group(r), 0)   (MEML-GRPO: no std division, only positive advantages train)
- grpo:   A = (r - mean_group(r)) / (std_group(r) + eps), std with Bessel's correction (G > 1)
- drgrpo: A = r - mean_group(r)           (Dr. GRPO: no std division, no length normalisation here)
- pooled: A = r - mean_question(r), the baseline pooled over every expert's group of the same question
          (question_index [N_groups] names the question of each group); exact 0 when all equal.
"""
from __future__ import annotations

from typing import Optional

import torch

from megatron_meml.algo.config import AlgoConfig


def _check_rewards(rewards: torch.Tensor) -> torch.Tensor:
    if rewards.dim() != 2 or rewards.shape[1] < 1:
        raise ValueError(f"rewards must be [N_groups, G] with G >= 1, got shape {tuple(rewards.shape)}")
    if not torch.isfinite(rewards).all():
        raise ValueError("rewards contain NaN or inf")
    return rewards.to(torch.float32)


def _centred(rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """([N, G] r - group mean with exact zeros for all-equal groups, [N] bool all-equal)."""
    r = _check_rewards(rewards)
    flat = r.amax(1) == r.amin(1)
    centred = r - r.mean(1, keepdim=True)
    return torch.where(flat[:, None], torch.zeros_like(centred), centred), flat


def paper_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """[N, G] rewards -> [N, G] max(r - mean, 0)."""
    return _centred(rewards)[0].clamp_min(0.0)


def drgrpo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """[N, G] rewards -> [N, G] r - mean."""
    return _centred(rewards)[0]


def grpo_advantages(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """[N, G] rewards -> [N, G] (r - mean) / (std + eps); groups of one or all-equal groups give 0."""
    centred, flat = _centred(rewards)
    if rewards.shape[1] == 1:
        return centred
    std = rewards.to(torch.float32).std(1, correction=1, keepdim=True)
    return torch.where(flat[:, None], torch.zeros_like(centred), centred / (std + eps))


def pooled_advantages(rewards: torch.Tensor, question_index: torch.Tensor) -> torch.Tensor:
    """[N, G] rewards, [N] int64 question of each group -> [N, G] r - mean over the question's groups."""
    r = _check_rewards(rewards)
    if question_index.shape != (r.shape[0],):
        raise ValueError(f"question_index must be [{r.shape[0]}] (one per group), got {tuple(question_index.shape)}")
    _, q = torch.unique(question_index, return_inverse=True)
    n_q = int(q.max()) + 1 if q.numel() else 0
    sums = torch.zeros(n_q).index_add_(0, q, r.sum(1))
    counts = torch.zeros(n_q).index_add_(0, q, torch.full((r.shape[0],), float(r.shape[1])))
    hi = torch.full((n_q,), -torch.inf).scatter_reduce(0, q, r.amax(1), "amax")
    lo = torch.full((n_q,), torch.inf).scatter_reduce(0, q, r.amin(1), "amin")
    centred = r - (sums / counts)[q][:, None]
    return torch.where((hi == lo)[q][:, None], torch.zeros_like(centred), centred)


def compute_advantages(rewards: torch.Tensor, cfg: AlgoConfig,
                       question_index: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Dispatch on ``cfg.advantage``: [N_groups, G] rewards -> [N_groups, G] fp32 advantages."""
    if cfg.advantage == "paper":
        return paper_advantages(rewards)
    if cfg.advantage == "grpo":
        return grpo_advantages(rewards, cfg.adv_eps)
    if cfg.advantage == "drgrpo":
        return drgrpo_advantages(rewards)
    if question_index is None:
        raise ValueError("algo.advantage=pooled needs question_index (the question of each group)")
    return pooled_advantages(rewards, question_index)


def advantage_metrics(rewards: torch.Tensor, advantages: torch.Tensor) -> dict[str, torch.Tensor]:
    """Step-level diagnostics: fraction of groups with no signal (all rewards equal), mean advantage."""
    r = _check_rewards(rewards)
    return {"train/adv_zero_group_frac": (r.amax(1) == r.amin(1)).float().mean(),
            "train/adv_mean": advantages.float().mean(),
            "train/adv_pos_frac": (advantages > 0).float().mean()}
