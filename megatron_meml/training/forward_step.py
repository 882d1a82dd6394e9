"""Megatron ``forward_step_func`` + ``loss_func`` for a mixed MEML micro-batch.

A micro-batch holds GRPO rows, mutual-learning pairs (student P- and teacher P+ rows scoring the same
response O+, always in the same micro-batch) and SFT rows. Every term is a *sum* over local rows divided by
a global normaliser computed once per step over all micro-batches and DP ranks (``StepNormalisers``), so the
step's objective is exact whatever the micro-batch count or DP size. Megatron's schedule divides each
micro-batch loss by the micro-batch count and DDP averages gradients over DP; the loss handed to backward is
multiplied by ``micro_batches x dp_size`` to undo both.

The output layer runs only on the scored positions (``loss_mask`` > 0) unless told otherwise: a forward pre-hook on
Megatron's output layer picks those hidden states, so the vocabulary matmul, its backward and the fp32 log-softmax
skip the prompt and padding positions that no loss term reads (on the real model's RL rows, the prompt is about
two thirds of a row). Log-probs are 0 at every other position. Not with sequence parallelism, where the output
layer gathers a sequence-sharded input itself: there every position still gets logits.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from megatron.core.packed_seq_params import PackedSeqParams

from megatron_meml.algo.config import AlgoConfig
from megatron_meml.algo.logprobs import vocab_parallel_logprobs
from megatron_meml.algo.losses import (clipped_pg_loss, kl_to_reference_loss, local_normaliser,
                                       mutual_kl_positions, mutual_pair_weights, mutual_teacher_nll_loss,
                                       paper_pg_loss, sequence_logprob, sequence_mutual_kl_loss, sft_nll_loss,
                                       tis_weights, token_mutual_kl_loss)
from megatron_meml.model.provider import causal_mask, unwrap
from megatron_meml.model.sdpa_attention import SharedPromptSeqParams
from megatron_meml.model.sdpa_attention import SDPAttention

GRPO, STUDENT, TEACHER, SFT = 0, 1, 2, 3


@dataclass(kw_only=True)
class PackedRows:
    """A micro-batch's rows laid end to end without padding: Megatron's THD layout (batch dimension 1), each row
    its own sequence in ``cu_seqlens`` with RoPE positions from 0, so no row attends to another. Row r keeps its
    positions 0..(last scored position); later tokens are right padding no scored position sees."""

    tokens: torch.Tensor
    """[1, N] int64."""
    labels: torch.Tensor
    """[1, N] int64: each packed position's next token (pad where the row ends)."""
    position_ids: torch.Tensor
    """[1, N] int64: restarting at 0 in every sequence."""
    cu_seqlens: torch.Tensor
    """[S + 1] int32: sequence boundaries; S = the rows, plus one trailing padding sequence when N is padded up
    (to a multiple of TP for sequence parallelism, or to the fixed micro-batch length under PP)."""
    max_seqlen: int
    """The longest sequence in ``cu_seqlens``."""
    index: torch.Tensor
    """[B, T] int64: where row b's position t sits in the packed stream; -1 past the row's end. Rows that share
    a prompt map their prompt positions to the same stream positions."""
    prefix_of: Optional[torch.Tensor] = None
    """[S] int64: for each sequence, the sequence holding the prompt it continues (it attends to that one too,
    and its positions continue from it), -1 for none; None: no sequence shares a prompt."""

    def to(self, device: torch.device) -> "PackedRows":
        fields = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in vars(self).items()}
        return PackedRows(**fields)

    def params(self):
        """Megatron's PackedSeqParams for this stream (THD, self-attention: q and kv share the boundaries)."""

        if self.prefix_of is not None:
            return SharedPromptSeqParams(qkv_format="thd", cu_seqlens_q=self.cu_seqlens,
                                         cu_seqlens_kv=self.cu_seqlens, max_seqlen_q=self.max_seqlen,
                                         max_seqlen_kv=self.max_seqlen, prefix_of=self.prefix_of.tolist())
        return PackedSeqParams(qkv_format="thd", cu_seqlens_q=self.cu_seqlens, cu_seqlens_kv=self.cu_seqlens,
                               max_seqlen_q=self.max_seqlen, max_seqlen_kv=self.max_seqlen)

    def unpack(self, flat: torch.Tensor) -> torch.Tensor:
        """[N] per packed position -> [B, T] per row position (0 past a row's end); differentiable."""
        padded = torch.cat([flat, flat.new_zeros(1)])  # index -1 reads the appended 0
        return padded[self.index]

    def flat_positions(self, row_flat: torch.Tensor) -> torch.Tensor:
        """Flat positions into [B * T] (row form) -> positions into the packed stream."""
        return self.index.reshape(-1)[row_flat]


@dataclass(kw_only=True)
class MicroBatch:
    """One micro-batch; tensors [B, T] unless stated. labels[b, t] = tokens[b, t + 1] (last: pad)."""

    tokens: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    """[B, T] float: 1 where labels[b, t] is scored."""
    row_kind: torch.Tensor
    """[B] int64: GRPO, STUDENT, TEACHER, SFT (padding rows are GRPO rows with an all-zero mask)."""
    advantages: torch.Tensor
    """[B] float: a GRPO row's advantage; a STUDENT row's scheduled pair weight (lambda1 warm-up, 1 without)."""
    partner: torch.Tensor
    """[B] int64: for a STUDENT row, the row index of its TEACHER in this micro-batch; -1 elsewhere."""
    old_logprobs: Optional[torch.Tensor] = None
    rollout_logprobs: Optional[torch.Tensor] = None
    ref_logprobs: Optional[torch.Tensor] = None
    teacher_seq: Optional[torch.Tensor] = None
    """[B] float: a STUDENT row's teacher sequence log-prob log pi(O+ | Q, P+), scored before the step, when the
    teacher row is not in the micro-batch (then ``partner`` is -1); None: the teacher row is here (``partner``)."""
    packed: Optional[PackedRows] = None
    """The rows packed padding-free (the model then runs on these); None: the model runs on ``tokens`` [B, T].
    Every other field keeps the row form [B, T] either way, so the loss terms are the same code."""
    scored: Optional[torch.Tensor] = None
    """[n] int64 row-form flat positions (b * T + t) that the output layer ran on, in order (set by the forward
    step: the positions with ``loss_mask`` > 0, at least one); None: logits at every position the model saw."""

    def to(self, device: torch.device) -> "MicroBatch":
        """The same micro-batch with every tensor on ``device`` (the model's)."""
        fields = {k: (v.to(device) if isinstance(v, (torch.Tensor, PackedRows)) else v) for k, v in vars(self).items()}
        return MicroBatch(**fields)

    @property
    def model_seq_length(self) -> int:
        """The sequence length the model sees (Megatron's schedule sizes pipeline messages by it)."""
        return self.packed.tokens.shape[1] if self.packed is not None else self.tokens.shape[1]


def scored_positions(loss_mask: torch.Tensor) -> torch.Tensor:
    """[n] row-form flat positions with ``loss_mask`` > 0; position 0 alone when there are none (a padding
    micro-batch still runs the output layer, so the graph and the pipeline's shapes stay as they are)."""
    pos = loss_mask.reshape(-1).nonzero().squeeze(-1)
    return pos if pos.numel() else pos.new_zeros(1)


def row_logprobs(logits: torch.Tensor, mb: MicroBatch, tp_group) -> torch.Tensor:
    """[B, T] fp32 log-prob of each row's next token, from the model's output (packed or not; at the scored
    positions only, 0 elsewhere, when ``mb.scored`` is set)."""
    if mb.scored is not None:
        labels = mb.labels.reshape(-1)[mb.scored]
        flat, _ = vocab_parallel_logprobs(logits.reshape(-1, logits.shape[-1]), labels, tp_group)
        out = flat.new_zeros(mb.labels.numel()).index_copy(0, mb.scored, flat)
        return out.view(mb.labels.shape)
    if mb.packed is None:
        return vocab_parallel_logprobs(logits, mb.labels, tp_group)[0]
    flat, _ = vocab_parallel_logprobs(logits, mb.packed.labels, tp_group)
    return mb.packed.unpack(flat.reshape(-1))


@dataclass(frozen=True, kw_only=True)
class StepNormalisers:
    """Global (all micro-batches, all DP ranks) denominators of each term; each >= 1."""

    pg: float
    """GRPO tokens (token_mean) or GRPO sequences (seq_* aggregations), with those of rows left out of the batch
    (``TrainBatch.pg_norm_extra``)."""
    pairs: float
    """What the mutual-learning terms divide by: the pair count (algo.aux_normaliser=own) or the policy count
    (policy, ``policy_normaliser``)."""
    sft: float
    """What the SFT term divides by: SFT target tokens (token_mean) or SFT sequences (seq_* aggregations) under
    algo.aux_normaliser=own; the policy count under policy (``policy_normaliser``)."""
    scored: float = 1.0
    """The three counts summed before the >= 1 floor: 0 when no DP rank has anything to score this step."""
    pg_present: float
    """``pg`` without the rows left out: what the policy term's metrics (clip fraction, mismatch) average over."""


def policy_normaliser(pg: float, fallback: float) -> float:
    """The count the auxiliary terms divide by under algo.aux_normaliser=policy, from global counts: the policy
    term's (``pg``, rows left out included) when the step has any GRPO token (row), else ``fallback`` (every
    response generated in the step, ``TrainBatch.pg_norm_fallback``: e.g. dynamic sampling kept no question); 0
    when both are 0 (then each term keeps its own count rather than dividing by a made-up 1)."""
    return pg if pg > 0 else max(fallback, 0.0)


def step_normalisers(micro: list[MicroBatch], algo: AlgoConfig, dp_group=None, *,
                     pg_extra: float = 0.0, pg_fallback: float = 0.0) -> StepNormalisers:
    """Sum the local counts over micro-batches (or any objects with ``row_kind`` and ``loss_mask``, e.g. the whole
    TrainBatch: the counts do not depend on the split), then over the DP group. ``pg_extra``: this rank's share of
    the policy normaliser from GRPO rows left out of the batch (``TrainBatch.pg_norm_extra``); ``pg_fallback``: its
    share of every generated response (``TrainBatch.pg_norm_fallback``, read under aux_normaliser=policy only)."""
    counts = torch.zeros(5, dtype=torch.float64)
    for mb in micro:
        kind = mb.row_kind[:, None]
        counts[0] += float(local_normaliser(mb.loss_mask * (kind == GRPO), algo.aggregation))
        counts[1] += float((mb.row_kind == STUDENT).sum())
        counts[2] += float(local_normaliser(mb.loss_mask * (kind == SFT), algo.sft_aggregation))
    counts[3] = pg_extra
    counts[4] = pg_fallback
    if dp_group is not None and dist.get_world_size(dp_group) > 1:
        dist.all_reduce(counts, group=dp_group)
    present, pairs, sft = (max(float(c), 1.0) for c in counts[:3])
    pg = float(counts[0] + counts[3])
    if algo.aux_normaliser == "policy":
        aux = policy_normaliser(pg, float(counts[4]))
        if aux > 0:
            pairs = sft = aux
    return StepNormalisers(pg=max(pg, 1.0), pairs=pairs, sft=sft, scored=float(counts[:4].sum()),
                           pg_present=present)


def meml_loss(logits: torch.Tensor, mb: MicroBatch, norm: StepNormalisers, algo: AlgoConfig, tp_group,
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The micro-batch's share of L = L_pg (+ kl_coef L_ref) + lambda1 L_mutual + lambda2 L_sft (sum form); each
    term divides by its entry of ``norm`` (under algo.aux_normaliser=policy the auxiliary ones by the policy's)."""
    lp = row_logprobs(logits, mb, tp_group)
    kind = mb.row_kind[:, None]
    mask = mb.loss_mask.to(lp.dtype)
    g_mask = mask * (kind == GRPO)
    is_w, metrics = None, {}
    if mb.rollout_logprobs is not None:  # on-policy (one update per rollout): old = this forward, detached
        old = mb.old_logprobs if mb.old_logprobs is not None else lp.detach()
        is_w, metrics = tis_weights(old, mb.rollout_logprobs, g_mask, norm.pg_present, cap=algo.tis_cap,
                                    aggregation=algo.aggregation)
    if algo.policy_loss == "paper_pg":
        loss, m = paper_pg_loss(lp, mb.advantages, g_mask, norm.pg, aggregation=algo.aggregation,
                                is_weights=is_w)
    else:
        old = mb.old_logprobs if mb.old_logprobs is not None else lp.detach()
        loss, m = clipped_pg_loss(lp, old, mb.advantages, g_mask, norm.pg, clip_low=algo.clip_low,
                                  clip_high=algo.clip_high, dual_clip=algo.dual_clip,
                                  aggregation=algo.aggregation, is_weights=is_w, metric_normaliser=norm.pg_present)
    metrics.update(m)
    if algo.kl_coef > 0 and mb.ref_logprobs is not None:
        kl, m = kl_to_reference_loss(lp, mb.ref_logprobs, g_mask, norm.pg, kind=algo.kl_type,
                                     aggregation=algo.aggregation)
        loss = loss + algo.kl_coef * kl
        metrics.update(m)
    students = (mb.row_kind == STUDENT).nonzero().squeeze(-1)
    if students.numel():
        loss = loss + _mutual_terms(lp, logits, mask, mb, students, norm, algo, tp_group, metrics)
    s_mask = mask * (kind == SFT)
    if bool(s_mask.any()):
        sft, m = sft_nll_loss(lp, s_mask, norm.sft, aggregation=algo.sft_aggregation)
        loss = loss + algo.lambda_sft * sft
        metrics.update(m)
    metrics["train/loss"] = loss.detach().float()
    return loss, metrics


def _mutual_terms(lp, logits, mask, mb: MicroBatch, students: torch.Tensor, norm: StepNormalisers,
                  algo: AlgoConfig, tp_group, metrics: dict) -> torch.Tensor:
    """lambda1 L_mutual (+ the strong-expert protection term) of this micro-batch's pairs; adds their metrics."""
    teachers = mb.partner[students]
    if mb.teacher_seq is not None and (algo.mutual_kind != "sequence" or algo.mutual_teacher_nll > 0):
        raise ValueError("teacher log-probs scored ahead serve only algo.mutual_kind=sequence without "
                         "algo.mutual_teacher_nll: the other variants need the teacher row in the micro-batch")
    w, m = mutual_pair_weights(lp[students], mask[students], mb.advantages[students],
                               normalise=algo.mutual_normalise, min_student_logprob=algo.mutual_min_student_logprob)
    metrics.update(m)
    if algo.mutual_kind == "sequence":
        t_seq = (mb.teacher_seq[students].to(lp.dtype) if mb.teacher_seq is not None
                 else sequence_logprob(lp[teachers], mask[teachers]).detach())
        kl, m = sequence_mutual_kl_loss(lp[students], mask[students], t_seq, norm.pairs, pair_weights=w)
    else:
        s_pos, t_pos = mutual_kl_positions(mask, students, teachers)
        if mb.scored is not None:  # the logits are the scored positions', in order
            where = torch.full((mb.labels.numel(),), -1, dtype=torch.long, device=mb.scored.device)
            where[mb.scored] = torch.arange(mb.scored.numel(), device=mb.scored.device)
            s_pos, t_pos = where[s_pos], where[t_pos]
        elif mb.packed is not None:  # the logits are the packed stream's
            s_pos, t_pos = mb.packed.flat_positions(s_pos), mb.packed.flat_positions(t_pos)
        per_pos = w.repeat_interleave(mask[students].sum(-1).long())
        kl, m = token_mutual_kl_loss(logits, s_pos, t_pos, norm.pairs, tp_group, position_weights=per_pos)
    metrics.update(m)
    out = algo.lambda_kl * kl
    if algo.mutual_teacher_nll > 0:
        agg = algo.aggregation if algo.aux_normaliser == "policy" else "seq_mean_token_mean"
        nll, m = mutual_teacher_nll_loss(lp[teachers], mask[teachers], norm.pairs, aggregation=agg)
        metrics.update(m)
        out = out + algo.mutual_teacher_nll * nll
    return out


def _loss_func(mb: MicroBatch, norm: StepNormalisers, algo: AlgoConfig, tp_group, scale: float,
               output_tensor: torch.Tensor):
    loss, metrics = meml_loss(output_tensor, mb, norm, algo, tp_group)
    return loss * scale, metrics


@contextmanager
def _output_layer_on(head: torch.nn.Module, hidden_index: torch.Tensor):
    """Inside: ``head`` (Megatron's output layer, input [S, B, H]) sees only the hidden states at
    ``hidden_index`` into the flattened S x B positions, as [n, 1, H]."""

    def pick(_module, args):
        hidden = args[0]
        return (hidden.reshape(-1, hidden.shape[-1]).index_select(0, hidden_index).unsqueeze(1), *args[1:])

    handle = head.register_forward_pre_hook(pick)
    try:
        yield
    finally:
        handle.remove()


def _forward(data_iterator: Iterator[MicroBatch], model, scored_only: bool) -> tuple[MicroBatch, torch.Tensor]:
    """The next micro-batch on the model's device and this stage's output (logits on the last stage: at
    ``mb.scored`` only, when ``scored_only`` and the stage has an output layer without sequence parallelism)."""
    dev = next(model.parameters()).device
    mb = next(data_iterator).to(dev)
    core = unwrap(model)
    head = getattr(core, "output_layer", None) if getattr(core, "post_process", False) else None
    if not scored_only or head is None or getattr(head, "sequence_parallel", False):
        if mb.packed is not None and mb.packed.prefix_of is not None and head is not None:
            raise ValueError("train.share_prompts needs the output layer on the scored positions only "
                             "(train.logits_at_scored_only=true, no sequence parallelism): rows sharing a prompt "
                             "score different next tokens at its last position")
        return mb, _run(model, mb, dev)
    mb.scored = scored_positions(mb.loss_mask)
    if mb.packed is not None:  # hidden [N, 1, H]: packed stream order
        hidden_index = mb.packed.flat_positions(mb.scored)
    else:  # hidden [T, B, H]: position (b, t) is row t * B + b
        b, t = mb.tokens.shape
        hidden_index = (mb.scored % t) * b + mb.scored // t
    with _output_layer_on(head, hidden_index):
        return mb, _run(model, mb, dev)


@contextmanager
def _rope_at(core, position_ids: torch.Tensor):
    """Inside: Megatron's rotary embedding gives one angle per packed token, at ``position_ids`` [1, N] (a
    response after a shared prompt continues the prompt's positions). Its THD RoPE then maps each token to its own
    entry (the entries number the stream's tokens) instead of restarting at 0 in every sequence."""
    rope = getattr(core, "rotary_pos_emb", None)
    if rope is None or getattr(core, "position_embedding_type", None) != "rope":
        raise ValueError("train.share_prompts needs a model with rotary position embeddings (position_embedding_type "
                         f"rope), got {getattr(core, 'position_embedding_type', None)}")
    if getattr(core.config, "apply_rope_fusion", False):
        raise ValueError("train.share_prompts needs apply_rope_fusion off (the fused THD RoPE restarts positions in "
                         "every sequence)")
    if not getattr(core, "_meml_sdpa_attention", None):
        core._meml_sdpa_attention = any(isinstance(m, SDPAttention) for m in core.modules())
        if not core._meml_sdpa_attention:
            raise ValueError("train.share_prompts needs the sdpa layer spec (model.layer_spec sdpa): another core "
                             "attention would not let a response see its shared prompt")
    pos = position_ids.reshape(-1)

    def per_token(module, args, output):
        return module.forward(int(pos.max()) + 1, *args[1:])[pos]

    handle = rope.register_forward_hook(per_token)
    try:
        yield
    finally:
        handle.remove()


def _run(model, mb: MicroBatch, dev) -> torch.Tensor:
    if mb.packed is not None:
        p = mb.packed
        if p.prefix_of is None:
            return model(p.tokens, p.position_ids, None, packed_seq_params=p.params())
        with _rope_at(unwrap(model), p.position_ids):
            return model(p.tokens, p.position_ids, None, packed_seq_params=p.params())
    t = mb.tokens.shape[1]
    pos = torch.arange(t, device=dev)[None].expand(mb.tokens.shape[0], t)
    return model(mb.tokens, pos, causal_mask(t, dev))


def make_forward_step(norm: StepNormalisers, algo: AlgoConfig, *, num_microbatches: int, dp_size: int,
                      tp_group=None, scored_only: bool = True):
    """A Megatron forward_step_func over an iterator of MicroBatch (tokens are needed on every stage);
    ``scored_only``: the output layer runs on the scored positions only (module docstring)."""
    scale = float(num_microbatches * dp_size)

    def forward_step(data_iterator: Iterator[MicroBatch], model):
        mb, out = _forward(data_iterator, model, scored_only)
        return out, partial(_loss_func, mb, norm, algo, tp_group, scale)

    return forward_step


def logprob_forward_step(tp_group=None, scored_only: bool = True):
    """forward_step_func for forward-only log-prob computation: the loss_func returns [B, T] log-probs (0 where
    ``loss_mask`` is 0 when ``scored_only``)."""

    def forward_step(data_iterator: Iterator[MicroBatch], model):
        mb, out = _forward(data_iterator, model, scored_only)

        def loss_func(output_tensor):
            lp = row_logprobs(output_tensor, mb, tp_group)
            return lp.sum() * 0.0, {"logprobs": lp.detach()}

        return out, loss_func

    return forward_step
