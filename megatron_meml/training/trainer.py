"""The trainer: ``compute_logprobs(batch)`` and ``train_step(batch) -> metrics`` over Megatron's pipeline
schedules. It knows nothing of rollouts or rewards: a TrainBatch comes in, gradients and an optimizer step
come out."""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_meml.algo.config import AlgoConfig
from megatron_meml.training.forward_step import (GRPO, SFT, STUDENT, TEACHER, MicroBatch, StepNormalisers,
                                                 logprob_forward_step, make_forward_step, step_normalisers)
from megatron_meml.training.packing import split_batch, split_packed, take_rows
from megatron_meml.training.setup import TrainState, zero_grads
from megatron_meml.types import TrainBatch


def teacher_ahead(algo: AlgoConfig) -> bool:
    """The mutual-learning teacher rows need no gradient and only their sequence log-prob (sequence KL, no
    teacher NLL): they are scored by one no-grad forward before the step instead of riding forward *and*
    backward in the micro-batches (a backward over a row costs about twice its forward, gradient or not)."""
    return algo.mutual_kind == "sequence" and algo.mutual_teacher_nll == 0


def empty_step_metrics() -> dict[str, float]:
    """A step in which no DP rank scores anything (no GRPO token, pair or SFT token: e.g. every advantage <= 0
    under the paper's loss). It runs no forward, backward or optimizer step, on every rank alike (the counts are
    global): the gradient would be exactly zero, and AdamW on a zero gradient still moves the weights along its
    momentum, which no data asked for. Skipping saves the step's time (docs/performance.md)."""
    return {"train/loss": 0.0, "train/grad_norm": 0.0, "train/update_skipped": 1.0, "train/empty_step": 1.0}


def layout_metrics(micro: list[MicroBatch]) -> dict[str, float]:
    """This rank's ``train/model_tokens`` (positions the model ran over, padding included) and
    ``train/prompt_tokens_shared`` (row positions that a shared prompt covered without computing them again)."""
    model, shared = 0, 0
    for mb in micro:
        if mb.packed is None:
            model += mb.tokens.numel()
            continue
        model += mb.packed.tokens.shape[1]
        if mb.packed.prefix_of is not None:
            at = mb.packed.index[mb.packed.index >= 0]
            shared += at.numel() - at.unique().numel()
    return {"train/model_tokens": float(model), "train/prompt_tokens_shared": float(shared)}


def normaliser_metrics(norm: Optional[StepNormalisers]) -> dict[str, float]:
    """``train/normaliser_pg``, ``_pairs``, ``_sft``: the global counts the step's terms divided by (the same on
    every rank), so that a term's logged value (``train/mutual_kl`` ...) reads as its share of the loss."""
    if norm is None:
        return {}
    return {"train/normaliser_pg": norm.pg, "train/normaliser_pairs": norm.pairs, "train/normaliser_sft": norm.sft}


class Trainer:
    """Runs Megatron's forward/backward schedule on TrainBatches for one model replica."""

    def __init__(self, state: TrainState, algo: AlgoConfig, *, micro_batch_size: int, pad_id: int,
                 score_teachers_ahead: bool = True, max_tokens_per_micro_batch: int = 0,
                 reference: Optional[list] = None, logits_at_scored_only: bool = True,
                 log_term_grad_norms: bool = False, share_prompts: bool = False):
        self.state, self.algo = state, algo
        self.score_teachers_ahead = score_teachers_ahead and teacher_ahead(algo)
        self.micro_batch_size, self.pad_id = micro_batch_size, pad_id
        self.tp_group = ps.get_tensor_model_parallel_group()
        self.dp_group = ps.get_data_parallel_group()
        self.pp_group = ps.get_pipeline_model_parallel_group()
        self.is_last = ps.is_pipeline_last_stage()
        self.last_rank = ps.get_pipeline_model_parallel_last_rank()
        # Without PP each micro-batch runs at its own length (a multiple of TP, for sequence parallelism) and
        # with its own rows only (a step of 3 rows at micro_batch_size 8 runs 3 rows, not 8).
        pp_size = ps.get_pipeline_model_parallel_world_size()
        self.trim_multiple = ps.get_tensor_model_parallel_world_size() if pp_size == 1 else 0
        self.trim_rows = pp_size == 1
        self.max_tokens = max_tokens_per_micro_batch
        """> 0: rows packed padding-free into micro-batches of this many tokens (fixed under PP)."""
        self.tp_size, self.pp_size = ps.get_tensor_model_parallel_world_size(), pp_size
        self.reference = reference
        """The frozen reference policy's chunks (``setup.build_reference``) when algo.kl_coef > 0."""
        self.scored_only = logits_at_scored_only
        """The output layer runs on the scored positions only (``forward_step``); False: on every position."""
        self.log_term_grad_norms = log_term_grad_norms
        """Each step also logs each loss term's own gradient norm (``term_grad_norms``): a diagnostic."""
        self.share_prompts = share_prompts
        """Packed rows with the same prompt share one copy of it (``split_packed``)."""
        self.last_layout: dict[str, float] = {}
        """``layout_metrics`` of the last backward's micro-batches."""
        self.last_norm: Optional[StepNormalisers] = None
        """The normalisers of the last backward."""
        if share_prompts and (self.max_tokens <= 0 or not logits_at_scored_only):
            raise ValueError("share_prompts needs max_tokens_per_micro_batch > 0 and logits_at_scored_only")

    def _split(self, batch: TrainBatch, *, trim: bool, teacher_seq: Optional[torch.Tensor] = None):
        """(micro-batches, their rows): packed by token budget when set, else by row count."""
        if self.max_tokens > 0:
            return split_packed(batch, self.max_tokens, self.pad_id, multiple=self.tp_size, fixed=self.pp_size > 1,
                                teacher_seq=teacher_seq, share_prompts=self.share_prompts)
        return split_batch(batch, self.micro_batch_size, self.pad_id, trim_multiple=self.trim_multiple if trim else 0,
                           trim_rows=self.trim_rows, teacher_seq=teacher_seq)

    def _schedule(self, fwd, micro: list[MicroBatch], forward_only: bool, model: Optional[list] = None):
        model = self.state.model if model is None else model
        it = iter(micro) if len(model) == 1 else [iter(micro) for _ in model]
        return get_forward_backward_func()(
            forward_step_func=fwd, data_iterator=it, model=model, num_microbatches=len(micro),
            seq_length=micro[0].model_seq_length, forward_only=forward_only,
            micro_batch_size=1 if micro[0].packed is not None else self.micro_batch_size)

    def compute_logprobs(self, batch: TrainBatch, *, model: Optional[list] = None) -> torch.Tensor:
        """[B, T] fp32 log-probs of each next token under the current weights (no grad), on every PP rank, where
        ``loss_mask`` > 0 (0 elsewhere unless ``logits_at_scored_only`` is off); ``model``: other chunks of the
        same layout (the reference policy) instead of the policy's."""
        micro, groups = self._split(batch, trim=False)
        chunks = self.state.model if model is None else model
        for chunk in chunks:
            chunk.eval()
        with torch.no_grad():
            outs = self._schedule(logprob_forward_step(self.tp_group, self.scored_only), micro, forward_only=True,
                                  model=chunks)
        if model is None:
            for chunk in chunks:
                chunk.train()
        result = torch.zeros(batch.tokens.shape, dtype=torch.float32)
        if self.is_last:
            for rows, out in zip(groups, outs):
                lp = out["logprobs"][: len(rows)].float().cpu()
                result[rows, : lp.shape[1]] = lp  # packed: each row up to its last scored position
        if dist.get_world_size(self.pp_group) > 1:
            dist.broadcast(result, src=self.last_rank, group=self.pp_group)
        return result

    def train_step(self, batch: TrainBatch) -> dict[str, float]:
        """Forward/backward over all micro-batches, one optimizer step; metrics summed over the step."""
        diag = self.term_grad_norms(batch) if self.log_term_grad_norms else {}
        done = self._backward(batch)
        if done is None:
            return {**empty_step_metrics(), **diag}
        ok, grad_norm, _ = self.state.optimizer.step()
        metrics = self._reduce(done)
        metrics["train/grad_norm"] = float(grad_norm) if grad_norm is not None else 0.0
        metrics["train/update_skipped"] = 0.0 if ok else 1.0
        metrics["train/empty_step"] = 0.0
        return {**metrics, **self.last_layout, **normaliser_metrics(self.last_norm), **diag}

    def term_grad_norms(self, batch: TrainBatch) -> dict[str, float]:
        """``train/grad_norm_<term>``: the global norm (before clipping) of each loss term's gradient alone, for
        pg (the policy gradient, with the reference KL when on), mutual (the pairs: student and teacher rows) and
        sft. Each term's rows form their own batch, divided by the step's normalisers (under
        algo.aux_normaliser=policy the auxiliary terms divide by the policy count, which their own rows do not hold),
        so that batch's gradient is exactly the term's share of the step's. One more forward/backward per term; the
        step's own backward starts from zeroed gradients, so the step itself is unchanged."""
        kind, out = batch.row_kind, {}
        norm = self.normalisers([batch], batch)
        for term, kinds in (("pg", (GRPO,)), ("mutual", (STUDENT, TEACHER)), ("sft", (SFT,))):
            rows = [i for i, k in enumerate(kind.tolist()) if k in kinds]
            if not rows:  # a row scored nowhere, so every rank runs the same collectives
                sub = take_rows(batch, [0])
                sub = dataclasses.replace(sub, loss_mask=torch.zeros_like(sub.loss_mask),
                                          row_kind=torch.full_like(sub.row_kind, GRPO),
                                          pair_id=torch.full_like(sub.pair_id, -1))
            else:
                sub = take_rows(batch, rows)
            sub = dataclasses.replace(sub, pg_norm_extra=batch.pg_norm_extra if term == "pg" else 0.0)
            if self._backward(sub, norm=norm) is not None:
                self.state.optimizer.prepare_grads()
                out[f"train/grad_norm_{term}"] = float(self.state.optimizer.get_grad_norm())
        return out

    def normalisers(self, counted: list, batch: TrainBatch) -> StepNormalisers:
        """Collective over DP: the step's normalisers over ``counted`` (the batch's micro-batches, or ``[batch]``)
        and the batch's shares of rows left out (``pg_norm_extra``, ``pg_norm_fallback``)."""
        return step_normalisers(counted, self.algo, self.dp_group, pg_extra=batch.pg_norm_extra,
                                pg_fallback=batch.pg_norm_fallback)

    def _backward(self, batch: TrainBatch, norm: Optional[StepNormalisers] = None) -> Optional[list[dict]]:
        """Zeroed gradients, then forward/backward over the batch's micro-batches (the loss-function outputs); None
        when no DP rank scores anything in it (nothing ran). ``norm``: divide by these normalisers instead of the
        batch's own (``term_grad_norms``: a term's rows over the whole step's counts)."""
        teacher_seq = None
        if self.algo.kl_coef > 0 and bool((batch.row_kind == GRPO).any()):
            if self.reference is None:
                raise ValueError("algo.kl_coef > 0 needs the reference policy: Trainer(reference=...) "
                                 "(training.setup.build_reference)")
            batch = self.with_reference(batch)
        if self.score_teachers_ahead and bool((batch.row_kind == TEACHER).any()):
            batch, teacher_seq = self._score_teachers(batch)
        micro, _ = self._split(batch, trim=True, teacher_seq=teacher_seq)
        self.last_layout = layout_metrics(micro)
        own = self.normalisers(micro, batch)
        if own.scored == 0:
            return None
        norm = own if norm is None else norm
        self.last_norm = norm
        dp = dist.get_world_size(self.dp_group)
        fwd = make_forward_step(norm, self.algo, num_microbatches=len(micro), dp_size=dp, tp_group=self.tp_group,
                                scored_only=self.scored_only)
        zero_grads(self.state)
        return self._schedule(fwd, micro, forward_only=False)

    def with_reference(self, batch: TrainBatch) -> TrainBatch:
        """The batch with ``ref_logprobs`` [B, T]: the frozen reference policy's log-probs on its GRPO rows (the
        only rows the KL term scores), 0 elsewhere."""
        rows = (batch.row_kind == GRPO).nonzero().squeeze(-1).tolist()
        ref = torch.zeros(batch.tokens.shape, dtype=torch.float32)
        if rows:
            ref[rows] = self.compute_logprobs(take_rows(batch, rows), model=self.reference)
        return dataclasses.replace(batch, ref_logprobs=ref)

    def _score_teachers(self, batch: TrainBatch) -> tuple[TrainBatch, torch.Tensor]:
        """(the batch without its TEACHER rows, [B'] each STUDENT row's teacher log pi(O+ | Q, P+) under the
        current weights, 0 elsewhere). Same weights and tokens as in the micro-batch, so the same value."""
        kind = batch.row_kind
        teachers = (kind == TEACHER).nonzero().squeeze(-1).tolist()
        rest = (kind != TEACHER).nonzero().squeeze(-1).tolist()
        scored = take_rows(batch, teachers)
        scored = dataclasses.replace(scored, row_kind=torch.full_like(scored.row_kind, GRPO))  # plain rows, unpaired
        lp = self.compute_logprobs(scored)
        seq_of = dict(zip(scored.pair_id.tolist(), (lp * scored.loss_mask).sum(-1).tolist()))
        out = take_rows(batch, rest)
        teacher_seq = torch.tensor([seq_of[int(p)] if int(k) == STUDENT else 0.0
                                    for k, p in zip(out.row_kind, out.pair_id)], dtype=torch.float32)
        return out, teacher_seq

    def _reduce(self, outs: list[dict]) -> dict[str, float]:
        """Sum-form metrics: summed over micro-batches, then over DP; broadcast to every PP rank."""
        box: list[Optional[dict]] = [None]
        if self.is_last:
            keys = {k for o in outs for k in o}
            if dist.get_world_size(self.dp_group) > 1:  # ranks may lack a term (no pairs, no SFT rows)
                every: list = [None] * dist.get_world_size(self.dp_group)
                dist.all_gather_object(every, keys, group=self.dp_group)
                keys = set().union(*every)
            keys = sorted(keys)
            vec = torch.tensor([sum(float(o[k]) for o in outs if k in o) for k in keys], dtype=torch.float64)
            if dist.get_world_size(self.dp_group) > 1:
                dist.all_reduce(vec, group=self.dp_group)
            box[0] = dict(zip(keys, vec.tolist()))
        if dist.get_world_size(self.pp_group) > 1:
            dist.broadcast_object_list(box, src=self.last_rank, group=self.pp_group)
        return dict(box[0] or {})
