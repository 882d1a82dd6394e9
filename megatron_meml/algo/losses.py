"""MEML-GRPO loss terms as pure functions of per-token tensors, each returning (loss, metrics).

Inputs are per-token tensors [B, T] aligned with a loss mask [B, T] (1 where the position's next token
is scored); advantages are per row [B] or per token [B, T].

Normalisation is exact under micro-batching and data parallelism. Every loss is a *sum* over the local
rows divided by an explicit ``normaliser`` that the caller computes over the whole step (all
micro-batches on all DP ranks, e.g. with ``local_normaliser`` summed and all-reduced). Summing the
returned losses over micro-batches and DP ranks (gradients all-reduced with SUM, not averaged) then
gives exactly the global objective. Per aggregation:

- ``token_mean``: sum_{b,t} x * m / N_tokens; normaliser = global count of valid tokens.
- ``seq_mean_token_mean``: sum_b (sum_t x * m / len_b) / N_seqs; normaliser = global count of sequences
  with at least one valid token (len_b is local to the row, so this is exact).
- ``seq_mean_token_sum``: sum_{b,t} x * m / N_seqs; normaliser = global count of sequences (Dr. GRPO's
  constant normaliser is N_seqs * max_len: pass that instead).

Metrics are detached fp32 scalars named ``train/...``, divided by the same normaliser so that their
reduction rule is also *sum* over micro-batches and DP ranks. Fractions (clip_frac, ...) are averaged
per token for ``token_mean`` and per sequence (token mean within each row) for the seq_* aggregations,
so with those pass the sequence count as the normaliser for them to read as fractions.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.distributed as dist

from megatron_meml.algo.config import AGGREGATIONS, KL_TYPES
from megatron_meml.algo.logprobs import DEFAULT_CHUNK, vocab_parallel_kl

Normaliser = Union[float, int, torch.Tensor]
Metrics = dict[str, torch.Tensor]
LOG_RATIO_LIMIT = 20.0
"""|log ratio| clamp before exp() in ratios and k3, so one wild token cannot overflow to inf."""


def _check_normaliser(normaliser: Normaliser) -> None:
    if not isinstance(normaliser, torch.Tensor) and normaliser <= 0:
        raise ValueError(f"normaliser must be > 0 (a global token or sequence count), got {normaliser}")


def _check_same_shape(mask: torch.Tensor, **tensors: Optional[torch.Tensor]) -> None:
    for name, t in tensors.items():
        if t is not None and t.shape != mask.shape:
            raise ValueError(f"{name} shape {tuple(t.shape)} must equal loss_mask shape {tuple(mask.shape)}")


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, normaliser: Normaliser,
              aggregation: str = "token_mean") -> torch.Tensor:
    """[B, T] values, [B, T] mask -> scalar contribution of these rows (see the module doc)."""
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got '{aggregation}'")
    _check_normaliser(normaliser)
    masked = per_token * mask
    if aggregation == "seq_mean_token_mean":
        masked = masked.sum(-1) / mask.sum(-1).clamp_min(1)
    return masked.sum() / normaliser


def local_normaliser(mask: torch.Tensor, aggregation: str = "token_mean") -> torch.Tensor:
    """This micro-batch's share of the normaliser: valid tokens (token_mean) or valid sequences."""
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got '{aggregation}'")
    if aggregation == "token_mean":
        return mask.sum().to(torch.float32)
    return (mask.sum(-1) > 0).sum().to(torch.float32)


def _metric_aggregation(aggregation: str) -> str:
    return "token_mean" if aggregation == "token_mean" else "seq_mean_token_mean"


def _per_token(advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    if advantages.shape == mask.shape:
        return advantages
    if advantages.shape == mask.shape[:1]:
        return advantages[:, None]
    raise ValueError(f"advantages must be [B] or [B, T] matching loss_mask {tuple(mask.shape)}, "
                     f"got {tuple(advantages.shape)}")


def _detach(**values: torch.Tensor) -> Metrics:
    return {f"train/{k}": v.detach().to(torch.float32) for k, v in values.items()}


def paper_pg_loss(logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, normaliser: Normaliser,
                  *, aggregation: str = "token_mean",
                  is_weights: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, Metrics]:
    """(a) MEML-GRPO policy gradient: -logp * max(A, 0), only positive advantages train.

    logprobs [B, T] (trainer, with grad); advantages [B] or [B, T]; is_weights [B, T] optional detached
    TIS weights (``tis_weights``). Metrics: train/pg_loss.
    """
    _check_same_shape(mask, logprobs=logprobs, is_weights=is_weights)
    per_token = -logprobs * _per_token(advantages, mask).clamp_min(0.0)
    if is_weights is not None:
        per_token = per_token * is_weights
    loss = aggregate(per_token, mask, normaliser, aggregation)
    return loss, _detach(pg_loss=loss)


def clipped_pg_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                    mask: torch.Tensor, normaliser: Normaliser, *, clip_low: float, clip_high: float,
                    dual_clip: Optional[float] = None, aggregation: str = "token_mean",
                    is_weights: Optional[torch.Tensor] = None,
                    metric_normaliser: Optional[Normaliser] = None) -> tuple[torch.Tensor, Metrics]:
    """(b) PPO/GRPO clipped-ratio objective with clip-higher and dual-clip.

    ratio = exp(logp - old); per token max(-A ratio, -A clip(ratio, 1 - clip_low, 1 + clip_high)); with
    dual_clip c > 1 and A < 0 that is further capped at -A c. Multiplied by is_weights when given.
    Metrics: train/pg_loss, train/clip_frac (clipping was active), train/dual_clip_frac, train/ppo_kl (k1
    of the current policy from the old one); all but pg_loss divided by ``metric_normaliser`` when given (the
    count of the rows present when rows at advantage 0 were left out of the batch but not of ``normaliser``).
    """
    _check_same_shape(mask, logprobs=logprobs, old_logprobs=old_logprobs, is_weights=is_weights)
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1 or None, got {dual_clip}")
    adv = _per_token(advantages, mask)
    log_ratio = (logprobs - old_logprobs.detach()).clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
    ratio = log_ratio.exp()
    pg_unclipped = -adv * ratio
    pg_clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    per_token = torch.maximum(pg_unclipped, pg_clipped)
    clipped = pg_clipped > pg_unclipped
    dual = torch.zeros_like(clipped)
    if dual_clip is not None:
        cap = -adv * dual_clip
        dual = (adv < 0) & (per_token > cap)
        per_token = torch.where(dual, cap, per_token)
    if is_weights is not None:
        per_token = per_token * is_weights
    loss = aggregate(per_token, mask, normaliser, aggregation)
    agg = _metric_aggregation(aggregation)
    m_norm = normaliser if metric_normaliser is None else metric_normaliser
    return loss, _detach(pg_loss=loss, clip_frac=aggregate(clipped.float(), mask, m_norm, agg),
                         dual_clip_frac=aggregate(dual.float(), mask, m_norm, agg),
                         ppo_kl=aggregate(-log_ratio.detach(), mask, m_norm, agg))


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """Per-token estimator of KL(pi || pi_ref) on tokens sampled from pi.

    k1 = logp - logp_ref;  k3 = exp(logp_ref - logp) - (logp_ref - logp) - 1 (>= 0, unbiased).
    """
    if kind not in KL_TYPES:
        raise ValueError(f"kl kind must be one of {KL_TYPES}, got '{kind}'")
    delta = ref_logprobs - logprobs
    if kind == "k1":
        return -delta
    delta = delta.clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
    return delta.exp() - delta - 1.0


def kl_to_reference_loss(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor,
                         normaliser: Normaliser, *, kind: str = "k3",
                         aggregation: str = "token_mean") -> tuple[torch.Tensor, Metrics]:
    """(c) KL penalty to a frozen reference policy (unweighted: the caller multiplies by kl_coef).

    logprobs [B, T] (with grad); ref_logprobs [B, T] (detached). Metrics: train/kl_ref.
    """
    _check_same_shape(mask, logprobs=logprobs, ref_logprobs=ref_logprobs)
    loss = aggregate(kl_estimate(logprobs, ref_logprobs.detach(), kind), mask, normaliser, aggregation)
    return loss, _detach(kl_ref=loss)


def tis_weights(old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, mask: torch.Tensor,
                normaliser: Normaliser, *, cap: Optional[float],
                aggregation: str = "token_mean") -> tuple[torch.Tensor, Metrics]:
    """(d) Truncated importance sampling between the rollout engine and the trainer.

    The rollout engine samples with slightly different numerics than the trainer; each token is
    reweighted by min(exp(logp_trainer_old - logp_rollout), cap), detached (cap None: weights 1, metrics
    only). Returns (weights [B, T], metrics) rather than a loss: pass the weights as ``is_weights``.
    Metrics: train/mismatch_abs (mean |delta logp|), train/mismatch_k3 (k3 estimate of
    KL(rollout || trainer) on the rollout's samples: r - 1 - log r with r = p_trainer / p_rollout),
    train/tis_clip_frac (tokens above the cap).
    """
    _check_same_shape(mask, old_logprobs=old_logprobs, rollout_logprobs=rollout_logprobs)
    if cap is not None and cap <= 0:
        raise ValueError(f"tis cap must be > 0 or None, got {cap}")
    log_ratio = (old_logprobs - rollout_logprobs).detach().to(torch.float32)  # log p_trainer / p_rollout
    raw = log_ratio.clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT).exp()
    weights = torch.ones_like(raw) if cap is None else raw.clamp_max(cap)
    capped = torch.zeros_like(raw) if cap is None else (raw > cap).float()
    agg = _metric_aggregation(aggregation)
    return weights, _detach(mismatch_abs=aggregate(log_ratio.abs(), mask, normaliser, agg),
                            mismatch_k3=aggregate(kl_estimate(-log_ratio, torch.zeros_like(log_ratio), "k3"),
                                                  mask, normaliser, agg),
                            tis_clip_frac=aggregate(capped, mask, normaliser, agg))


def sequence_logprob(logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, T] per-token log-probs, [B, T] mask -> [B] log p(response | prompt)."""
    return (logprobs * mask).sum(-1)


def sequence_mutual_kl_loss(student_logprobs: torch.Tensor, student_mask: torch.Tensor,
                            teacher_seq_logprobs: torch.Tensor,
                            normaliser: Normaliser, *,
                            pair_weights: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, Metrics]:
    """(e1) Inter-expert mutual learning, sequence-level Monte-Carlo KL on the best expert's O+.

    Per pair p: L_p = log pi(O+ | Q, P+).detach() - log pi(O+ | Q, P-), a one-sample estimate of
    KL(pi(.|Q,P+) || pi(.|Q,P-)) whose gradient raises the weak expert's likelihood of O+ (DESIGN.md:
    this order follows the stated purpose; the reverse would push O+ away). Loss = sum_p w_p L_p / normaliser
    (normaliser = global pair count; w_p = 1 unless ``pair_weights`` [P] is given, see ``mutual_pair_weights``).
    student_logprobs/student_mask [P, T] are the P- rows; teacher_seq_logprobs [P] is ``sequence_logprob`` of
    the matching P+ rows (same forward or a no-grad pass). Metrics: train/mutual_kl.
    """
    _check_same_shape(student_mask, student_logprobs=student_logprobs)
    if teacher_seq_logprobs.shape != student_mask.shape[:1]:
        raise ValueError(f"teacher_seq_logprobs must be [{student_mask.shape[0]}] (one per pair), "
                         f"got {tuple(teacher_seq_logprobs.shape)}")
    _check_normaliser(normaliser)
    per_pair = teacher_seq_logprobs.detach() - sequence_logprob(student_logprobs, student_mask)
    if pair_weights is not None:
        if pair_weights.shape != per_pair.shape:
            raise ValueError(f"pair_weights must be [{per_pair.shape[0]}] (one per pair), "
                             f"got {tuple(pair_weights.shape)}")
        per_pair = per_pair * pair_weights.detach().to(per_pair.dtype)
    loss = per_pair.sum() / normaliser
    return loss, _detach(mutual_kl=loss)


def mutual_pair_weights(student_logprobs: torch.Tensor, student_mask: torch.Tensor, base: torch.Tensor, *,
                        normalise: str = "sequence",
                        min_student_logprob: Optional[float] = None) -> tuple[torch.Tensor, Metrics]:
    """Per-pair weights of the mutual-learning term (no gradient).

    student_logprobs/student_mask [P, T] are the P- rows, base [P] each pair's scheduled weight (lambda1 warm-up).
    normalise="token" divides by the length of O+ (a per-token mean); "sequence" (the paper) keeps the sum.
    min_student_logprob gates pairs whose mean per-token log-prob of O+ under P- is below it (weight 0).
    Metrics (sum form, divide by the pair count): train/mutual_active_pairs.
    """
    _check_same_shape(student_mask, student_logprobs=student_logprobs)
    if base.shape != student_mask.shape[:1]:
        raise ValueError(f"base must be [{student_mask.shape[0]}] (one per pair), got {tuple(base.shape)}")
    length = student_mask.sum(-1).clamp_min(1.0)
    w = base.detach().to(student_logprobs.dtype).clone()
    if normalise == "token":
        w = w / length
    elif normalise != "sequence":
        raise ValueError(f"normalise must be 'sequence' or 'token', got '{normalise}'")
    if min_student_logprob is not None:
        mean_lp = sequence_logprob(student_logprobs.detach(), student_mask) / length
        w = w * (mean_lp >= min_student_logprob).to(w.dtype)
    return w, _detach(mutual_active_pairs=(w > 0).sum().to(student_logprobs.dtype))


def mutual_teacher_nll_loss(teacher_logprobs: torch.Tensor, teacher_mask: torch.Tensor,
                            normaliser: Normaliser, *,
                            aggregation: str = "seq_mean_token_mean") -> tuple[torch.Tensor, Metrics]:
    """Strong-expert protection: -log pi(O+ | Q, P+) as a per-token mean per pair (``aggregation``
    seq_mean_token_mean; token_mean and seq_mean_token_sum: the token sum), summed over the P+ rows [P, T] and
    divided by the normaliser (global pair count, or the policy count). Metrics: train/mutual_teacher_nll."""
    _check_same_shape(teacher_mask, teacher_logprobs=teacher_logprobs)
    loss = aggregate(-teacher_logprobs, teacher_mask, normaliser, aggregation)
    return loss, _detach(mutual_teacher_nll=loss)


def mutual_kl_positions(mask: torch.Tensor, student_rows: torch.Tensor,
                        teacher_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat positions (into [B * T]) of the scored tokens of each P- row and its P+ row, in order.

    mask [B, T]; student_rows, teacher_rows [P] row indices of each pair. Both rows of a pair score the
    same response O+, so they must have the same number of scored positions. Returns ([M], [M]) int64.
    """
    if student_rows.shape != teacher_rows.shape:
        raise ValueError("student_rows and teacher_rows must have the same length (one entry per pair)")
    t_len = mask.shape[1]
    s_pos, t_pos = [], []
    for p, (s, t) in enumerate(zip(student_rows.tolist(), teacher_rows.tolist())):
        s_idx, t_idx = mask[s].nonzero().squeeze(-1), mask[t].nonzero().squeeze(-1)
        if s_idx.numel() != t_idx.numel():
            raise ValueError(f"mutual-learning pair {p}: student row {s} scores {s_idx.numel()} tokens but "
                             f"teacher row {t} scores {t_idx.numel()}; both must cover the same response O+")
        s_pos.append(s_idx + s * t_len)
        t_pos.append(t_idx + t * t_len)
    empty = torch.zeros(0, dtype=torch.long, device=mask.device)
    return (torch.cat(s_pos) if s_pos else empty), (torch.cat(t_pos) if t_pos else empty)


def token_mutual_kl_loss(logits: torch.Tensor, student_pos: torch.Tensor, teacher_pos: torch.Tensor,
                         normaliser: Normaliser, group: Optional[dist.ProcessGroup] = None, *,
                         teacher_logits: Optional[torch.Tensor] = None,
                         chunk_size: int = DEFAULT_CHUNK,
                         position_weights: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, Metrics]:
    """(e2) Inter-expert mutual learning, token-level: full-vocabulary KL(p(.|P+) || p(.|P-)) along O+.

    logits [B, T, V_local] (this TP rank's vocab shard); student_pos, teacher_pos [M] flat positions from
    ``mutual_kl_positions``. Teacher logits default to ``logits`` (the P+ rows of the same micro-batch),
    always detached. Loss = sum over the M positions / normaliser (global pair count: summed over each
    pair's response, like the sequence form; or the global count of O+ tokens for a per-token mean).
    position_weights [M] (no gradient) weighs each position, e.g. its pair's ``mutual_pair_weights``.
    Metrics: train/mutual_kl.
    """
    _check_normaliser(normaliser)
    teacher = logits if teacher_logits is None else teacher_logits
    kl = vocab_parallel_kl(logits, teacher, group, chunk_size=chunk_size, student_index=student_pos,
                           teacher_index=teacher_pos)
    if position_weights is not None:
        if position_weights.shape != kl.shape:
            raise ValueError(f"position_weights must be [{kl.shape[0]}] (one per position), "
                             f"got {tuple(position_weights.shape)}")
        kl = kl * position_weights.detach().to(kl.dtype)
    loss = kl.sum() / normaliser
    return loss, _detach(mutual_kl=loss)


def sft_nll_loss(logprobs: torch.Tensor, mask: torch.Tensor, normaliser: Normaliser, *,
                 aggregation: str = "token_mean") -> tuple[torch.Tensor, Metrics]:
    """(f) Negative log-likelihood of the target tokens: hard-example SFT and the MEF stage.

    token_mean: normaliser = global target-token count; seq_mean_token_mean: each sequence's mean NLL,
    normaliser = global sequence count; seq_mean_token_sum: summed NLL per sequence (the paper's
    -sum log p(O_gt | Q, P_i)), normaliser = global sequence count. Metrics: train/sft_nll.
    """
    _check_same_shape(mask, logprobs=logprobs)
    loss = aggregate(-logprobs, mask, normaliser, aggregation)
    return loss, _detach(sft_nll=loss)
